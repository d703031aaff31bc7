"""The nnU-Net handshake: our checkpoints load into the downstream networks the way nnU-Net loads
them (tests/downstream_nnunet.py), at the pretraining and at another patch size, with more input
channels, and the loaded encoder computes exactly what the I-JEPA teacher computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from downstream_nnunet import load_like_nnunet
from nnssl.export.adaptation_plan import adaptation_plan, citations
from nnssl.methods.factory import build_method
from nnssl.models.primus import PrimusTokenEncoder
from nnssl.planning.plans import ConfigurationPlan, Plans
from nnssl.training.checkpoint import save_checkpoint
from nnssl.training.names import resolve_config


def _plans() -> Plans:
    config = ConfigurationPlan(data_identifier="nnsslPlans_onemmiso", preprocessor_name="DefaultPreprocessor",
                               spacing_style="onemmiso", spacing=[1.0, 1.0, 1.0],
                               normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False],
                               resampling_fn_data="resample_torch", resampling_fn_data_kwargs={},
                               resampling_fn_mask="resample_torch", resampling_fn_mask_kwargs={},
                               patch_size=[160, 160, 160])
    return Plans(dataset_name="Dataset900_Phantoms", plans_name="nnsslPlans",
                 original_median_spacing_after_transp=[1.0, 1.0, 1.0], image_reader_writer="SimpleITKIO",
                 transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2],
                 experiment_planner_used="ExperimentPlanner", configurations={"onemmiso": config})


def _checkpoint(trainer: str, patch: int, path: Path, steps: int = 1):
    """A method after `steps` real optimizer steps, saved with the trainer's own checkpoint fields."""
    config = resolve_config(trainer, overrides={"patch_size": (patch,) * 3})
    method = build_method(config)
    opt = torch.optim.AdamW(method.parameter_groups(0.04), lr=1e-3)
    x = torch.randn(2, 1, patch, patch, patch)
    for step in range(steps):
        out = method.training_output(x, torch.zeros_like(x, dtype=torch.bool), step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(step, 0.9)  # a visible EMA: teacher != student
    save_checkpoint(path, {"network_weights": method.export_encoder_state_dict(),
                           "nnssl_adaptation_plan": adaptation_plan(method.backbone, _plans(), "onemmiso", 1),
                           "trainer_name": trainer, "citations": citations(config.method, config.backbone)})
    return method


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, torch.Tensor))


# Primus-M's real widths and depth at a small input (the checkpoint's keys and shapes are what
# matter; M at 160³ does not fit a CPU test). M skips the optimizer step (140 M parameters).
PRIMUS_CASES = [("IJEPATrainer_Tiny", 32, 48, 1), ("IJEPATrainer_PrimusM", 32, 48, 0)]


@pytest.mark.parametrize("trainer,patch,downstream,steps", PRIMUS_CASES)
def test_primus_checkpoint_loads_like_nnunet_and_equals_the_teacher(trainer, patch, downstream, steps, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "checkpoint_final.pth"
    method = _checkpoint(trainer, patch, path, steps)
    ckpt = torch.load(path, weights_only=True)
    plan = ckpt["nnssl_adaptation_plan"]
    assert _plain(plan) and json.dumps({k: v for k, v in plan.items()})  # plain, JSON-serialisable
    assert {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels", "recommended_downstream_patchsize",
            "key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe"} <= set(plan)
    assert plan["pretrain_plan"]["configurations"]["onemmiso"]["patch_size"] == [patch] * 3
    assert all(v.device.type == "cpu" for v in ckpt["network_weights"].values())
    if trainer.endswith("PrimusM"):
        assert plan["architecture_plans"]["arch_class_name"] == "PrimusM"

    # same patch size, one channel: the loaded encoder is the teacher
    network, _ = load_like_nnunet(str(path), 1, 3, (patch,) * 3)
    x = torch.randn(2, 1, patch, patch, patch)
    network.eval()
    with torch.no_grad():
        assert torch.allclose(PrimusTokenEncoder(network)(x), method.teacher(x), atol=1e-5, rtol=1e-5)
        if steps:  # after an update the student has moved away: the export really is the EMA teacher
            assert not torch.allclose(method.student(x), method.teacher(x), atol=1e-4)
        assert network(x).shape == (2, 3, patch, patch, patch)

    # another patch size and more input channels: interpolated positions, repeated in-projection
    network, _ = load_like_nnunet(str(path), 2, 4, (downstream,) * 3)
    with torch.no_grad():
        y = network(torch.randn(1, 2, downstream, downstream, downstream))
    assert y.shape == (1, 4, downstream, downstream, downstream) and torch.isfinite(y).all()


def test_resenc_l_checkpoint_loads_like_nnunet_and_equals_the_teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "checkpoint_final.pth"
    method = _checkpoint("IJEPATrainer_ResEncL", 64, path, steps=0)
    ckpt = torch.load(path, weights_only=True)
    plan = ckpt["nnssl_adaptation_plan"]
    assert plan["architecture_plans"]["arch_class_name"] == "ResEncL" and plan["key_to_lpe"] is None
    assert plan["keys_to_in_proj"] == ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]
    assert all(k.startswith(("encoder.stem.", "encoder.stages.")) for k in ckpt["network_weights"])
    network, _ = load_like_nnunet(str(path), 1, 2, (64, 64, 64))
    network.eval()
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        bottleneck = network.encoder(x)[-1]  # [1, 320, 2, 2, 2]
        assert torch.allclose(bottleneck.flatten(2).transpose(1, 2), method.teacher(x), atol=1e-5, rtol=1e-5)
    network, _ = load_like_nnunet(str(path), 2, 3, (96, 96, 96))  # more channels, another patch size
    with torch.no_grad():
        y = network(torch.randn(1, 2, 96, 96, 96))
    assert y.shape == (1, 3, 96, 96, 96) and torch.isfinite(y).all()


def test_no_key_outside_the_downstream_prefixes(tmp_path):
    path = tmp_path / "c.pth"
    _checkpoint("IJEPATrainer_Tiny", 32, path)
    ckpt = torch.load(path, weights_only=True)
    keys = list(ckpt["network_weights"])
    assert keys and all(k.startswith(("eva.", "down_projection.")) for k in keys)
    assert not any(k.startswith(("eva_", "evaT", "down_projection_")) for k in keys)
