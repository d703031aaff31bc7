"""ResEnc-L: nnU-Net's `ResEncL` preset of dynamic-network-architectures' ResidualEncoderUNet.

The exported checkpoint must load into exactly the network nnU-Net builds for `ResEncL`
(documentation/finetuning_nnunet.md), so the constructor arguments live in one place here and the
handshake test builds the downstream network from them.
"""

from __future__ import annotations

from typing import Any

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from nnssl.errors import InvalidInput
from nnssl.models.backbone import BackboneSpec, conv_unet_problems, importable_arch_kwargs, plain_arch_kwargs
from nnssl.models.registry import BackboneEntry, BackboneFamily, ModelSettings, register_backbone, register_family
from nnssl.models.sparse_resenc import ResEncTokenEncoder

RESENC_L_STAGES = 6
# total downsampling of the encoder: the bottleneck grid is input / 32
RESENC_L_STRIDE = 32


# features and residual blocks per stage; "L" is nnU-Net's ResEncL, "Tiny" keeps its layout
# (6 stages, total stride 32) with few channels so tests and the demo run on a CPU
RESENC_PRESETS: dict[str, dict[str, list[int]]] = {
    "L": {"features_per_stage": [32, 64, 128, 256, 320, 320], "n_blocks_per_stage": [1, 3, 4, 6, 6, 6]},
    "Tiny": {"features_per_stage": [8, 16, 32, 48, 64, 64], "n_blocks_per_stage": [1, 1, 1, 1, 1, 1]},
}


def resenc_l_arch_kwargs(input_channels: int = 1, num_classes: int = 1, deep_supervision: bool = False,
                         preset: str = "L") -> dict[str, Any]:
    """Constructor kwargs of nnU-Net's ResEncL (features 32-320, 6 stages, blocks 1-3-4-6-6-6,
    conv bias, affine InstanceNorm, LeakyReLU), with classes for the *_op kwargs; `preset="Tiny"`
    changes only the widths and block counts."""
    problems = []
    if input_channels < 1 or num_classes < 1:
        problems.append(f"input_channels and num_classes must be >= 1, got {input_channels} and {num_classes}")
    if preset not in RESENC_PRESETS:
        problems.append(f"unknown ResEnc preset {preset!r}; choose one of {sorted(RESENC_PRESETS)}")
    if problems:
        raise InvalidInput("cannot build ResEnc:", problems)
    n = RESENC_L_STAGES
    return {
        "input_channels": int(input_channels), "n_stages": n,
        "features_per_stage": list(RESENC_PRESETS[preset]["features_per_stage"]), "conv_op": nn.Conv3d,
        "kernel_sizes": [[3, 3, 3] for _ in range(n)],
        "strides": [[1, 1, 1]] + [[2, 2, 2] for _ in range(n - 1)],
        "n_blocks_per_stage": list(RESENC_PRESETS[preset]["n_blocks_per_stage"]), "num_classes": int(num_classes),
        "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
        "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True},
        "deep_supervision": bool(deep_supervision),
    }


def build_resenc_l(input_channels: int = 1, num_classes: int = 1, deep_supervision: bool = False,
                   preset: str = "L") -> ResidualEncoderUNet:
    """The stock network nnU-Net fine-tunes (random init)."""
    return ResidualEncoderUNet(**resenc_l_arch_kwargs(input_channels, num_classes, deep_supervision, preset))


# nnU-Net passes these itself when it builds a network from a plan (get_network_from_plans:
# `input_channels=..., num_classes=..., **arch_kwargs`, and it sets deep_supervision), so a plan
# that also holds them fails with "got multiple values for keyword argument".
NNUNET_PASSES_ITSELF = ("input_channels", "num_classes", "deep_supervision")
RESENC_CLASS_PATH = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def nnunet_resenc_architecture(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`architecture_plans` that nnU-Net master builds into the ResidualEncoderUNet of `kwargs`:
    `ResEncL` with `arch_kwargs: null` (built by name, like the reference nnssl) when it is
    nnU-Net's ResEncL, otherwise the class path with the constructor kwargs minus the ones
    nnU-Net passes itself (`NNUNET_PASSES_ITSELF`)."""
    plain, requiring = plain_arch_kwargs({k: v for k, v in kwargs.items() if k not in NNUNET_PASSES_ITSELF})
    reference, _ = plain_arch_kwargs({k: v for k, v in resenc_l_arch_kwargs().items() if k not in NNUNET_PASSES_ITSELF})
    if plain == reference:
        return {"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": []}
    return {"arch_class_name": RESENC_CLASS_PATH, "arch_kwargs": plain, "arch_kwargs_requiring_import": requiring}


def resenc_backbone_spec(network: ResidualEncoderUNet, kwargs: dict[str, Any],
                         patch_size: tuple[int, int, int]) -> BackboneSpec:
    """ResEnc-L exports as `ResEncL` (the preset nnU-Net builds by name); other widths (Tiny) by
    the class's import path (`nnunet_resenc_architecture`). The spec's `arch_kwargs` keep the
    complete constructor arguments either way, so `BackboneSpec.build` rebuilds exactly."""
    name = nnunet_resenc_architecture(kwargs)["arch_class_name"]
    return BackboneSpec.from_network(network, name, kwargs, patch_size)


# ---- registry entries (models/registry.py) -----------------------------------------------------

RESENC_CITATION = {
    "type": "architecture", "name": "ResEnc-L",
    "apa_citations": ["Isensee, F., Wald, T., Ulrich, C., Baumgartner, M., Roy, S., Maier-Hein, K., & Jaeger, "
                      "P. F. (2024). nnU-Net Revisited: A Call for Rigorous Validation in 3D Medical Image "
                      "Segmentation. MICCAI 2024. arXiv:2404.09556"],
}


def _problems(settings: ModelSettings, patch_size: tuple[int, int, int]) -> list[str]:
    return conv_unet_problems(settings, patch_size, "ResEnc", "ResidualEncoderUNet", RESENC_L_STRIDE)


def _builder(preset: str):
    def build(input_channels: int, input_shape: tuple[int, int, int], settings: ModelSettings,
              num_classes: int = 1) -> tuple[ResidualEncoderUNet, BackboneSpec]:
        kwargs = resenc_l_arch_kwargs(input_channels, num_classes=num_classes, preset=preset)
        network = ResidualEncoderUNet(**kwargs)
        return network, resenc_backbone_spec(network, kwargs, input_shape)
    return build


register_family(BackboneFamily(
    name="resenc", display_name="Residual-encoder U-Net (3D CNN, nnU-Net's ResEnc presets)",
    citation=RESENC_CITATION, token_encoder=lambda network, input_shape: ResEncTokenEncoder(network, input_shape),
    cell_size=lambda settings: (RESENC_L_STRIDE,) * 3, problems=_problems, network_class=RESENC_CLASS_PATH,
    nnunet_architecture=lambda spec: nnunet_resenc_architecture(
        importable_arch_kwargs(spec.arch_kwargs, spec.arch_kwargs_requiring_import)),
    # the bottleneck grid is small (5³ cells at 160³, 2³ at 64³): boxes of a few cells, a small context floor
    defaults={"mask.min_keep": 4}))
register_backbone(BackboneEntry(
    name="ResEncL", family="resenc", build=_builder("L"),
    description="ResEnc-L (3D residual-encoder U-Net, nnU-Net's ResEncL preset)"))
register_backbone(BackboneEntry(
    name="ResEncTiny", family="resenc", build=_builder("Tiny"), cpu_sized=True,
    description="a tiny residual-encoder U-Net for CPU runs (ResEnc-L's layout, 8-64 channels)",
    defaults={"num_epochs": 2, "iterations_per_epoch": 5, "num_val_iterations": 1,
              "ijepa.predictor_width": 64, "ijepa.predictor_depth": 2}))
