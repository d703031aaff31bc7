"""nnssl_train at the seams users hit: exact resume, kill + --c, preemption signals, DDP on two
CPU processes, non-finite losses, warm start, and the CLI's errors. Tiny Primus on phantoms."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nnssl.cli.train import main as train_main
from nnssl.training.names import resolve_config
from nnssl.training.options import RunOptions
from nnssl.training.run import train

TINY = "IJEPATrainer_Tiny_P32_BS2_2ep_3it"


def _fold(results: Path, trainer: str) -> Path:
    return results / "Dataset900_Phantoms" / f"{trainer}__nnsslPlans__onemmiso" / "fold_all"


def _options(**kwargs) -> RunOptions:
    base = dict(device="cpu", num_workers=0, log_every=1, progress_bar=False)
    base.update(kwargs)
    return RunOptions(**base)


def _train(trainer: str = TINY, **kwargs):
    return train(_options(**kwargs), resolve_config(trainer))


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)  # what users and nnU-Net do


def test_run_writes_the_reference_layout_and_a_complete_checkpoint(roots):
    outcome = _train()
    fold = _fold(roots, TINY)
    assert outcome.finished and outcome.step == 6
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "progress.png", "training_config.json"):
        assert (fold / name).is_file(), name
    assert list(fold.glob("training_log_*.txt"))
    assert (fold.parent / "plans.json").is_file() and (fold.parent / "adaptation_plan.json").is_file()
    ckpt = _load(fold / "checkpoint_final.pth")
    for key in ("method_state", "optimizer_state", "grad_scaler_state", "step", "rng", "history",
                "training_config", "network_weights", "nnssl_adaptation_plan", "trainer_name", "citations"):
        assert key in ckpt, key
    assert all(k.startswith(("eva.", "down_projection.")) for k in ckpt["network_weights"])
    prefix = "teacher.primus."
    teacher = {k[len(prefix):]: v for k, v in ckpt["method_state"].items() if k.startswith(prefix)}
    assert all(torch.equal(v, teacher[k]) for k, v in ckpt["network_weights"].items())  # the EMA teacher
    history = ckpt["history"]
    assert [p[0] for p in history["train_loss"]] == list(range(1, 7))
    assert {"lr", "weight_decay", "ema_momentum", "samples_per_s", "data_wait_fraction", "token_rankme",
            "target_std", "cos_across", "val_loss"} <= set(history)
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "val_loss" in log and "train_loss" in log


@pytest.mark.parametrize("augment_on_device", [None, True], ids=["auto", "on_device"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(roots, tmp_path, monkeypatch, augment_on_device):
    config = resolve_config(TINY)
    # on_device: the path a CUDA run takes by default (RawBatch.to(device) in the loop), here on the CPU
    config = replace(config, loader=replace(config.loader, augment_on_device=augment_on_device))
    full = train(_options(), config)
    reference = _load(Path(full.checkpoint))
    monkeypatch.setenv("nnssl_results", str(tmp_path / "resumed"))
    stopped = train(_options(stop_at_step=4), config)  # mid-epoch, after a validation and a checkpoint
    assert not stopped.finished and stopped.stopped_by == "stop_at_step" and stopped.step == 4
    resumed = train(_options(continue_training=True), config)
    assert resumed.finished and resumed.step == 6
    again = _load(Path(resumed.checkpoint))
    assert again["history"]["train_loss"] == reference["history"]["train_loss"]
    assert again["history"]["val_loss"] == reference["history"]["val_loss"]
    for key, value in reference["method_state"].items():
        assert torch.equal(value, again["method_state"][key]), key


def test_continue_after_finish_does_nothing_and_resume_checks_the_trainer(roots):
    _train()
    again = _train(continue_training=True)
    assert again.finished
    other = _fold(roots, TINY.replace("3it", "4it"))
    other.mkdir(parents=True)
    shutil.copy(_fold(roots, TINY) / "checkpoint_latest.pth", other / "checkpoint_latest.pth")
    from nnssl.checkpoints.format import CheckpointError

    with pytest.raises(CheckpointError, match="trainer"):
        _train(TINY.replace("3it", "4it"), continue_training=True)


def test_bf16_on_a_cpu_without_native_bf16_warns_in_the_log_and_still_trains(roots, monkeypatch):
    import nnssl.training.loop as loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    trainer = "IJEPATrainer_Tiny_P32_BS2_1ep_2it"
    outcome = _train(trainer, precision="bf16")
    assert outcome.finished
    log = next(_fold(roots, trainer).glob("training_log_*.txt")).read_text()
    assert "without native bf16" in log and "--precision fp32" in log


def test_nonfinite_losses_skip_steps_then_stop_with_an_intact_checkpoint(roots, monkeypatch):
    from nnssl.methods.ijepa import IJEPA
    from nnssl.training.loop import TrainingDiverged

    original = IJEPA.training_output

    def poisoned(self, volumes, anon, step, **kwargs):
        out = original(self, volumes, anon, step, **kwargs)
        if step >= 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(IJEPA, "training_output", poisoned)
    with pytest.raises(TrainingDiverged, match="not finite for 2 consecutive steps") as e:
        _train(max_nonfinite_steps=2)
    assert "Dataset900_Phantoms" in str(e.value)  # names the cases
    ckpt = _load(_fold(roots, TINY) / "checkpoint_latest.pth")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["method_state"].values() if v.is_floating_point())


def test_pretrained_weights_warm_start_student_and_teacher(roots):
    source = _load(Path(_train().checkpoint))["network_weights"]
    other = TINY.replace("2ep", "1ep")
    start = _train(other, pretrained_weights=_fold(roots, TINY) / "checkpoint_final.pth",
                           stop_at_step=0)
    state = _load(Path(start.checkpoint))["method_state"]
    for key, value in source.items():
        assert torch.equal(state["student.primus." + key], value) and torch.equal(state["teacher.primus." + key], value)


def _spawned_rank_dumps_state(options: RunOptions, config, out: str) -> None:
    """A DDP rank that trains, then saves its own copy of the method state."""
    from nnssl.training import loop, run

    original = loop.Trainer.run

    def run_and_dump(self):
        result = original(self)
        torch.save(self.method.state_dict(), Path(out) / f"rank{self.dist.rank}.pt")
        return result

    loop.Trainer.run = run_and_dump
    torch.set_num_threads(1)
    run._spawned_rank(options, config)


def test_two_cpu_processes_match_each_other_and_one_process(roots, tmp_path):
    from nnssl.training.distributed import spawn_local

    trainer = "IJEPATrainer_Tiny_P32_BS4_1ep_3it"
    spawn_local(_spawned_rank_dumps_state, 2, (_options(), resolve_config(trainer), str(tmp_path)))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(v, rank1[k]) for k, v in rank0.items())  # student, teacher, predictor
    os.environ["nnssl_results"] = str(tmp_path / "single")
    single = _load(Path(_train(trainer).checkpoint))["method_state"]
    for key, value in single.items():
        assert torch.allclose(value, rank0[key], rtol=1e-4, atol=1e-5), key


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nnssl.cli.train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() - start < timeout, f"{path} did not appear"
        time.sleep(0.02)


def test_sigterm_and_sigusr1_both_request_a_stop_and_handlers_are_restored():
    """The two preemption signals (SLURM sends SIGUSR1 with --signal, then SIGTERM) share one
    handler; the CLI test below drives SIGTERM end to end."""
    from nnssl.training.loop import _StopSignals

    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        with _StopSignals() as stop:
            assert stop.received is None
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
            assert stop.received == sig.name
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_cli_killed_or_preempted_then_continued(roots, how):
    trainer = "IJEPATrainer_Tiny_P32_BS2_8ep_2it"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fold = _fold(roots, trainer)
    process = _cli(["900", "-tr", trainer, "-np", "0", "-device", "cpu"], env)
    _wait_for(fold / "checkpoint_latest.pth", process)
    process.send_signal(getattr(signal, how))
    output = process.communicate(timeout=120)[0]
    if how != "SIGKILL":  # preemption: a checkpoint at the current step, exit status 3
        assert process.returncode == 3, output
        assert "resume with --c" in output
    else:
        assert process.returncode == -signal.SIGKILL
    step = _load(fold / "checkpoint_latest.pth")["step"]
    assert 0 < step < 16
    assert not (fold / "checkpoint_final.pth").exists()
    done = subprocess.run([sys.executable, "-m", "nnssl.cli.train", "900", "-tr", trainer, "-np", "0", "-device",
                           "cpu", "--c"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming {fold / 'checkpoint_latest.pth'} from step {step}" in done.stderr
    assert _load(fold / "checkpoint_final.pth")["step"] == 16


def test_cli_lists_trainers_and_rejects_unknown_names_and_flags(roots, capsys):
    assert train_main(["--list_trainers"]) == 0
    listed = capsys.readouterr().out
    assert "IJEPATrainer_BS8" in listed and "BS<N>" in listed and "_Tiny" in listed
    assert train_main(["900", "-tr", "IJEPATrainer_BS8_XL"]) == 2
    assert "unknown suffix 'XL'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["900", "--num_gpus", "2"])  # a typo is an error, not ignored


def test_cli_short_form_picks_the_only_dataset_and_errors_list_several(roots, prepared, capsys, monkeypatch):
    assert train_main(["-tr", TINY, "-np", "0", "-device", "cpu", "--stop_at_step", "1"]) == 3
    extra = Path(os.environ["nnssl_preprocessed"]).parent / "more"
    shutil.copytree(prepared / "nnssl_preprocessed", extra)
    (extra / "Dataset900_Phantoms").rename(extra / "Dataset901_Other")
    shutil.copytree(prepared / "nnssl_preprocessed" / "Dataset900_Phantoms", extra / "Dataset900_Phantoms")
    monkeypatch.setenv("nnssl_preprocessed", str(extra))
    assert train_main(["-tr", TINY, "-device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Dataset900_Phantoms" in err and "Dataset901_Other" in err


@pytest.mark.parametrize("trainer", ["MAETrainer_Tiny_P32_BS2_1ep_2it", "IJEPATrainer_ResEncTiny_BS2_1ep_2it",
                                     "MAETrainer_ResEncTiny_BS2_1ep_2it"])
def test_every_method_and_backbone_trains_resumes_and_exports(roots, trainer, tmp_path):
    from downstream_nnunet import load_like_nnunet
    from nnssl.export.share import export

    stopped = _train(trainer, stop_at_step=1)
    assert stopped.step == 1 and not stopped.finished
    done = _train(trainer, continue_training=True)
    assert done.finished and done.step == 2
    shared = export(_fold(roots, trainer).parent, tmp_path / "shared")
    ckpt = torch.load(shared.folder / "checkpoint_final.pth", weights_only=True)
    patch = ckpt["nnssl_adaptation_plan"]["recommended_downstream_patchsize"]
    network, _ = load_like_nnunet(str(shared.folder / "checkpoint_final.pth"), 1, 2, tuple(patch))
    with torch.no_grad():
        assert network(torch.randn(1, 1, *patch)).shape == (1, 2, *patch)


def test_disable_checkpointing_writes_only_the_final_checkpoint(roots):
    """The reference's `--disable_checkpointing` (trial runs): no periodic checkpoint_latest.pth."""
    outcome = _train(periodic_checkpoints=False)
    fold = _fold(roots, TINY)
    assert outcome.finished and (fold / "checkpoint_final.pth").is_file()
    assert not (fold / "checkpoint_latest.pth").exists()


@pytest.mark.parametrize("flag, equivalent", [("--npz", "nnUNetv2_train"), ("--val", "nnssl_evaluate"),
                                              ("--val_best", "nnssl_evaluate")])
def test_reference_flags_without_a_pretraining_meaning_name_the_equivalent(flag, equivalent, capsys):
    with pytest.raises(SystemExit) as stop:
        train_main(["900", "onemmiso", "-tr", TINY, flag])
    assert stop.value.code == 2 and equivalent in capsys.readouterr().err
