"""nnU-Net's default 3D U-Net: dynamic-network-architectures' `PlainConvUNet`, as `3d_fullres` of
the default `nnUNetPlans` builds it for an isotropic 160³ patch.

Six stages of 32-64-128-256-320-320 features, two 3³ convs per stage in the encoder and in the
decoder, strides 1-2-2-2-2-2 (total 32), conv bias, affine InstanceNorm (eps 1e-5), LeakyReLU.
Fine-tuning builds it from the class's import path and these kwargs (`get_network_from_plans`),
exactly as a plans file describes it; nnU-Net has no preset name for it.

The encoder contains its stem: `key_to_encoder = "encoder.stages"`, `key_to_stem =
"encoder.stages.0"` (the network's own attributes). nnU-Net's `load_pretrained_weights` handles
that: it loads `encoder.stages` and then `encoder.stages.0` again from the same tensors, so the
export is just the `encoder.stages.*` keys.

No token-level access: I-JEPA's sparse student exists for ResEnc only (`models/sparse_resenc.py`),
so this family registers `token_encoder=None` and I-JEPA refuses it; MAE (zero-masked 16³ blocks,
`methods/mae_unet.py`) pretrains it.
"""

from __future__ import annotations

import math
from typing import Any

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnssl.errors import InvalidInput
from nnssl.models.backbone import BackboneSpec, class_path, conv_unet_problems
from nnssl.models.registry import BackboneEntry, BackboneFamily, ModelSettings, register_backbone, register_family

PLAINCONV_STAGES = 6
PLAINCONV_STRIDES = [[1, 1, 1]] + [[2, 2, 2] for _ in range(PLAINCONV_STAGES - 1)]
# total downsampling of the encoder: the bottleneck grid is input / 32
PLAINCONV_STRIDE = math.prod(s[0] for s in PLAINCONV_STRIDES)
PLAINCONV_CLASS = class_path(PlainConvUNet)

# features and convs per stage; "Default" is nnUNetPlans' 3d_fullres (features double from 32 up
# to nnU-Net's 3D cap of 320), "Tiny" keeps its layout with few channels so tests run on a CPU
PLAINCONV_PRESETS: dict[str, dict[str, list[int]]] = {
    "Default": {"features_per_stage": [32, 64, 128, 256, 320, 320], "n_conv_per_stage": [2] * PLAINCONV_STAGES},
    "Tiny": {"features_per_stage": [8, 16, 32, 48, 64, 64], "n_conv_per_stage": [2] * PLAINCONV_STAGES},
}

def plainconv_arch_kwargs(preset: str = "Default") -> dict[str, Any]:
    """The `arch_kwargs` of nnU-Net's default plans for this network (classes for the *_op
    kwargs; `BackboneSpec` writes them as import paths): everything but the input channels,
    classes and deep supervision, which nnU-Net passes itself."""
    if preset not in PLAINCONV_PRESETS:
        raise InvalidInput(f"unknown PlainConvUNet preset {preset!r}; choose one of {sorted(PLAINCONV_PRESETS)}")
    n = PLAINCONV_STAGES
    return {
        "n_stages": n, "features_per_stage": list(PLAINCONV_PRESETS[preset]["features_per_stage"]),
        "conv_op": nn.Conv3d, "kernel_sizes": [[3, 3, 3] for _ in range(n)],
        "strides": [list(s) for s in PLAINCONV_STRIDES],
        "n_conv_per_stage": list(PLAINCONV_PRESETS[preset]["n_conv_per_stage"]),
        "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
        "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True},
    }


def build_plainconv_unet(input_channels: int = 1, num_classes: int = 1, deep_supervision: bool = False,
                         preset: str = "Default") -> PlainConvUNet:
    """The stock network nnU-Net fine-tunes (random init)."""
    if input_channels < 1 or num_classes < 1:
        raise InvalidInput(f"input_channels and num_classes must be >= 1, got {input_channels} and {num_classes}")
    return PlainConvUNet(input_channels=int(input_channels), num_classes=int(num_classes),
                         deep_supervision=bool(deep_supervision), **plainconv_arch_kwargs(preset))


# ---- registry entries (models/registry.py) -----------------------------------------------------

PLAINCONV_CITATION = {
    "type": "architecture", "name": "nnU-Net (PlainConvUNet)",
    "apa_citations": ["Isensee, F., Jaeger, P. F., Kohl, S. A. A., Petersen, J., & Maier-Hein, K. H. (2021). "
                      "nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation. "
                      "Nature Methods, 18(2), 203-211. doi:10.1038/s41592-020-01008-z"],
}


def _problems(settings: ModelSettings, patch_size: tuple[int, int, int]) -> list[str]:
    return conv_unet_problems(settings, patch_size, "PlainConvUNet", "PlainConvUNet", PLAINCONV_STRIDE)


def _builder(preset: str):
    def build(input_channels: int, input_shape: tuple[int, int, int], settings: ModelSettings,
              num_classes: int = 1) -> tuple[PlainConvUNet, BackboneSpec]:
        network = build_plainconv_unet(input_channels, num_classes, preset=preset)
        kwargs = {**plainconv_arch_kwargs(preset), "input_channels": int(input_channels),
                  "num_classes": int(num_classes), "deep_supervision": False}
        return network, BackboneSpec.from_network(network, PLAINCONV_CLASS, kwargs, input_shape)
    return build


register_family(BackboneFamily(
    name="plainconv", display_name="Plain-convolution U-Net (3D CNN, nnU-Net's default 3d_fullres network)",
    citation=PLAINCONV_CITATION, token_encoder=None,  # no sparse student: I-JEPA refuses this family
    cell_size=lambda settings: (PLAINCONV_STRIDE,) * 3, problems=_problems,
    network_class=PLAINCONV_CLASS))  # nnU-Net builds it from the class path (its generic form)
register_backbone(BackboneEntry(
    name="PlainConvUNet", family="plainconv", build=_builder("Default"),
    description="nnU-Net's default 3D U-Net (PlainConvUNet of nnUNetPlans' 3d_fullres: 6 stages, 32-320 "
                "features, 2 convs per stage)"))
register_backbone(BackboneEntry(
    name="PlainConvTiny", family="plainconv", build=_builder("Tiny"), cpu_sized=True,
    description="a tiny PlainConvUNet for CPU runs (the default's layout, 8-64 channels)",
    defaults={"num_epochs": 2, "iterations_per_epoch": 5, "num_val_iterations": 1}))
