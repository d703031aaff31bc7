"""nnU-Net's default 3D U-Net (`PlainConvUNet`, models/plainconv.py) as a backbone family: the
architecture is exactly what nnU-Net's default planner writes for `3d_fullres`, the export
holds the `encoder.stages.*` keys (stage 0 is the stem) and reloads strictly, MAE reaches the
family with the CNN recipe, I-JEPA refuses it with its reason, and nnU-Net's real fine-tuning
client builds the network from the adaptation plan and loads the weights (when it is set up).

The method x backbone matrix (test_registry_matrix.py) trains one step of every accepted pair."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from downstream_nnunet import load_like_nnunet
from nnssl.checkpoints.format import save_checkpoint
from nnssl.checkpoints.handshake import adaptation_plan, citations
from nnssl.errors import InvalidInput
from nnssl.export.features import load_pretrained_encoder
from nnssl.export.model_card import model_card
from nnssl.methods.factory import build_method
from nnssl.models.backbone import BackboneSpec, import_class
from nnssl.models.registry import ModelSettings, get_backbone, nnunet_architecture_plans
from nnssl.training.names import UnknownTrainer, resolve_config
from test_export_handshake import _plans

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
# `architecture` of `3d_fullres` as nnU-Net's default ExperimentPlanner writes it into
# nnUNetPlans.json for an isotropic 160³ patch (nnunetv2/experiment_planning/experiment_planners/
# default_experiment_planner.py): a class path plus kwargs without input_channels / num_classes /
# deep_supervision, which get_network_from_plans passes itself.
NNUNET_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
NNUNET_3D_FULLRES = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_conv_per_stage": [2] * 6,
    "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}
NNUNET_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")
PASSED_BY_NNUNET = ("input_channels", "num_classes", "deep_supervision")


def _like_get_network_from_plans(arch_kwargs: dict, requiring: list | tuple, input_channels: int,
                                 num_classes: int) -> PlainConvUNet:
    """nnU-Net's `get_network_from_plans`: import the named kwargs, then pass the channels, the
    classes and deep supervision as keywords next to them (a plan repeating them is a TypeError)."""
    kwargs = dict(arch_kwargs)
    for key in requiring:
        if kwargs[key] is not None:
            kwargs[key] = import_class(kwargs[key])
    kwargs["deep_supervision"] = True
    return import_class(NNUNET_CLASS)(input_channels=input_channels, num_classes=num_classes, **kwargs)


def _shapes(network: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def test_the_default_size_is_nnunets_3d_fullres_network_and_its_plan_leaves_out_what_nnunet_passes():
    network, spec = get_backbone("PlainConvUNet").build(1, (160, 160, 160), ModelSettings(), 1)
    arch = nnunet_architecture_plans(spec)
    assert arch["arch_class_name"] == NNUNET_CLASS and isinstance(network, PlainConvUNet)
    kwargs = arch["arch_kwargs"]
    assert set(kwargs) == set(NNUNET_3D_FULLRES) and not set(PASSED_BY_NNUNET) & set(kwargs)
    for key, theirs in NNUNET_3D_FULLRES.items():
        if key in NNUNET_REQUIRES_IMPORT and theirs is not None:   # torch.nn.LeakyReLU vs its module path
            assert key in arch["arch_kwargs_requiring_import"] and import_class(kwargs[key]) is import_class(theirs)
        else:
            assert kwargs[key] == theirs, key
    # nnU-Net builds it from our plan for its own task (2 channels, 3 classes): the very network its
    # planner's plan gives, and the pretraining network (the export's `nnssl_backbone`) rebuilds exactly
    ours = _like_get_network_from_plans(kwargs, arch["arch_kwargs_requiring_import"], 2, 3)
    assert _shapes(ours) == _shapes(_like_get_network_from_plans(NNUNET_3D_FULLRES, NNUNET_REQUIRES_IMPORT, 2, 3))
    assert {k: spec.arch_kwargs[k] for k in PASSED_BY_NNUNET} == {"input_channels": 1, "num_classes": 1,
                                                                  "deep_supervision": False}  # kept for our rebuild
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    assert _shapes(spec.build()) == _shapes(network)


def _export(tmp_path: Path, with_backbone: bool = True):
    config = resolve_config("MAETrainer_PlainConvTiny_P64_BS2")
    method = build_method(config)
    weights = method.export_encoder_state_dict()
    payload = {"network_weights": weights, "trainer_name": config.trainer_name,
               "nnssl_adaptation_plan": adaptation_plan(method.backbone, _plans(), "onemmiso", 1),
               "citations": citations(config.method, config.backbone)}
    if with_backbone:
        payload["nnssl_backbone"] = method.backbone.to_dict()
    return config, method, weights, save_checkpoint(tmp_path / "checkpoint_final.pth", payload)


def test_mae_exports_the_encoder_stages_which_reload_strictly_as_nnunet_loads_them(tmp_path):
    config, method, weights, path = _export(tmp_path)
    assert config.optim.grad_clip == 12.0 and config.optim.betas == (0.9, 0.98)   # the CNN MAE recipe
    spec = method.backbone
    assert (spec.key_to_encoder, spec.key_to_stem, spec.key_to_lpe) == ("encoder.stages", "encoder.stages.0", None)
    # the encoder with its stem (stage 0) and nothing else: no decoder, not the decoder's encoder reference
    network_keys = method.network.state_dict()
    assert set(weights) == {k for k in network_keys if k.startswith("encoder.stages.")}
    assert any(k.startswith("encoder.stages.0.") for k in weights)
    assert all(k + ".weight" in weights for k in spec.keys_to_in_proj) and len(spec.keys_to_in_proj) == 2
    # nnssl's reader loads like nnU-Net (per prefix, strict): every tensor back, bit for bit, with
    # and without our own architecture description (then from the nnU-Net-style plan alone)
    for with_backbone in (True, False):
        if not with_backbone:
            path = _export(tmp_path, with_backbone=False)[3]
        encoder = load_pretrained_encoder(path)
        assert (encoder.family, encoder.grid, encoder.embed_dim) == ("plainconv", (2, 2, 2), 64)
        loaded = encoder.network.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    # the project's nnU-Net double on a 2-channel, 3-class task: the in-projection is repeated / 2
    network, _ = load_like_nnunet(str(path), 2, 3, (64, 64, 64))
    loaded = network.state_dict()
    in_proj = {k + ".weight" for k in spec.keys_to_in_proj}
    assert all(torch.allclose(loaded[k], weights[k].repeat(1, 2, 1, 1, 1) / 2) for k in in_proj)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items() if k not in in_proj)
    ckpt = torch.load(path, weights_only=True)
    assert [c["name"] for c in ckpt["citations"]] == ["MAE", "nnU-Net (PlainConvUNet)", "nnssl"]
    card = model_card(ckpt, str(tmp_path))   # a CNN fine-tunes with nnU-Net's default PretrainedTrainer
    assert "PretrainedTrainer_Primus" not in card and "nnU-Net (PlainConvUNet)" in card


def test_ijepa_refuses_the_family_with_its_reason():
    reason = ("I-JEPA needs token-level access to the encoder, which the 'plainconv' backbone family does not "
              "provide (BackboneFamily.token_encoder); pretrain it with another method")
    assert get_backbone("PlainConvTiny").family_entry.token_encoder is None
    with pytest.raises(UnknownTrainer) as refused:
        resolve_config("IJEPATrainer_PlainConvTiny_P64")
    assert reason in str(refused.value)
    unchecked = dataclasses.replace(resolve_config("IJEPATrainer_PlainConvTiny"), patch_size=(64, 64, 64))
    with pytest.raises(InvalidInput) as refused:   # the builder does not fall back to anything either
        build_method(unchecked)
    assert str(refused.value) == reason


def test_mae_refuses_a_crop_of_one_bottleneck_cell_which_would_crash_its_first_step():
    with pytest.raises(UnknownTrainer, match=r"single bottleneck cell of PlainConvTiny.*use at least 64"):
        resolve_config("MAETrainer_PlainConvTiny_P32")
    unchecked = dataclasses.replace(resolve_config("MAETrainer_PlainConvTiny"), patch_size=(32, 32, 32))
    with pytest.raises(ValueError, match="more than 1 spatial element"):   # what the check prevents
        build_method(unchecked).training_output(torch.randn(2, 1, 32, 32, 32), None, step=0)
    assert resolve_config("MAETrainer_PlainConvTiny", overrides={"patch_size": [64, 32, 32]}).patch_size == (64, 32, 32)


CLIENT_PYTHON = Path(os.environ.get("NNUNET_CLIENT_DIR", "/tmp/nnunet_client")) / "venv" / "bin" / "python"
CLIENT_CHECK = Path(os.environ.get("NNUNET_CLIENT_CHECK", REPO.parent / "shared" / "tools" / "nnunet_client" /
                                   "check.py"))


@pytest.mark.skipif(not (CLIENT_PYTHON.is_file() and CLIENT_CHECK.is_file()),
                    reason=f"nnU-Net's real fine-tuning client is not set up ({CLIENT_PYTHON}, {CLIENT_CHECK}): "
                           "bash ../shared/tools/nnunet_client/setup.sh .venv/bin/python; NNUNET_CLIENT_DIR and "
                           "NNUNET_CLIENT_CHECK point elsewhere")
def test_nnunets_real_client_builds_the_network_from_the_plan_and_loads_every_tensor(tmp_path):
    path = _export(tmp_path, with_backbone=False)[3]   # only what nnU-Net reads
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    run = subprocess.run([str(CLIENT_PYTHON), str(CLIENT_CHECK), str(path), "--mode", "direct", "--workdir",
                          str(tmp_path / "client")], capture_output=True, text=True, env=env, timeout=300, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "PASS" in out, out[-3000:]
    # PretrainedTrainer.build_network_architecture took the class path + kwargs, load_pretrained_weights
    # loaded encoder.stages and encoder.stages.0 strictly, and every tensor is the checkpoint's
    assert "build_network_architecture('dynamic_network_architectures.architectures.unet.PlainConvUNet'" in out
    assert "loaded 96/96 encoder+stem tensors (96 bit-identical" in out, out[-3000:]
