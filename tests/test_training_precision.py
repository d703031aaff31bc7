"""Gradient accumulation and fp16 with loss scaling: the same update as one big batch, exact
resume, and the scale in the checkpoint (CPU; the CUDA choice of --precision auto is a one-liner
covered by the GPU check)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nnssl.methods.factory import build_method
from nnssl.training.loop import resolve_precision
from nnssl.training.names import resolve_config
from nnssl.training.options import RunOptions
from nnssl.training.run import train
from nnssl.training.step import optimizer_step


@pytest.mark.parametrize("trainer", ["IJEPATrainer_Tiny_P32_BS4", "MAETrainer_Tiny_P32_BS4"])
def test_accumulated_micro_batches_give_the_update_of_one_batch(trainer, one_thread):
    config = resolve_config(trainer)
    x = torch.randn(4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    anon = torch.zeros_like(x, dtype=torch.bool)
    states = []
    for micro in (1, 2, 4):
        method = build_method(config)
        optimizer = torch.optim.AdamW(method.parameter_groups(0.04), lr=1e-3)
        losses = [optimizer_step(method, optimizer, x, anon, step, config.schedule_config(), 1.0,
                                 micro_batches=micro).loss for step in range(2)]
        states.append((losses, method.state_dict()))
    (ref_losses, ref), others = states[0], states[1:]
    for losses, state in others:
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for key, value in ref.items():
            assert torch.allclose(value, state[key], rtol=1e-4, atol=1e-6), key


def test_precision_auto_picks_fp32_on_the_cpu_and_keeps_explicit_choices():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def _run(trainer: str, **kwargs):
    options = RunOptions(device="cpu", num_workers=0, log_every=1, progress_bar=False, **kwargs)
    return train(options, resolve_config(trainer))


def test_accumulation_through_the_trainer_matches_and_resumes_exactly(roots, monkeypatch, tmp_path, one_thread):
    plain = torch.load(_run("IJEPATrainer_Tiny_P32_BS4_1ep_4it").checkpoint, weights_only=True)
    trainer = "IJEPATrainer_Tiny_P32_BS4_GA2_1ep_4it"
    accumulated = torch.load(_run(trainer).checkpoint, weights_only=True)
    for key, value in plain["method_state"].items():
        assert torch.allclose(value, accumulated["method_state"][key], rtol=1e-4, atol=1e-6), key
    monkeypatch.setenv("nnssl_results", str(tmp_path / "resumed"))
    assert not _run(trainer, stop_at_step=2).finished
    resumed = torch.load(_run(trainer, continue_training=True).checkpoint, weights_only=True)
    for key, value in accumulated["method_state"].items():
        assert torch.equal(value, resumed["method_state"][key]), key


def test_fp16_with_loss_scaling_trains_saves_its_scale_and_resumes_exactly(roots, monkeypatch, tmp_path,
                                                                           one_thread):
    trainer = "IJEPATrainer_Tiny_P32_BS2_1ep_4it"
    full = _run(trainer, precision="fp16")
    done = torch.load(full.checkpoint, weights_only=True)
    assert full.finished and done["grad_scaler_state"]["scale"] > 0
    assert "loss_scale" in done["history"]
    log = next(Path(full.checkpoint).parent.glob("training_log_*.txt")).read_text()
    assert "precision fp16 (--precision fp16 on cpu)" in log
    monkeypatch.setenv("nnssl_results", str(tmp_path / "resumed"))
    stopped = torch.load(_run(trainer, precision="fp16", stop_at_step=2).checkpoint, weights_only=True)
    assert stopped["grad_scaler_state"]["scale"] > 0
    resumed = torch.load(_run(trainer, precision="fp16", continue_training=True).checkpoint, weights_only=True)
    for key, value in done["method_state"].items():
        assert torch.equal(value, resumed["method_state"][key]), key
    assert resumed["grad_scaler_state"] == done["grad_scaler_state"]
