"""ResEnc-L: nnU-Net's `ResEncL` preset of dynamic-network-architectures' ResidualEncoderUNet.

The exported checkpoint must load into exactly the network nnU-Net builds for `ResEncL`
(CONTRACTS.md "Architectures"), so the constructor arguments live in one place here and the
handshake test builds the downstream network from them.
"""

from __future__ import annotations

from typing import Any

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from nnssl.errors import InvalidInput
from nnssl.models.backbone import BackboneSpec

RESENC_L_STAGES = 6
# total downsampling of the encoder: the bottleneck grid is input / 32
RESENC_L_STRIDE = 32


def resenc_l_arch_kwargs(input_channels: int = 1, num_classes: int = 1, deep_supervision: bool = False
                         ) -> dict[str, Any]:
    """Constructor kwargs of nnU-Net's ResEncL (features 32-320, 6 stages, blocks 1-3-4-6-6-6,
    conv bias, affine InstanceNorm, LeakyReLU), with classes for the *_op kwargs."""
    if input_channels < 1 or num_classes < 1:
        raise InvalidInput(f"ResEnc-L needs input_channels >= 1 and num_classes >= 1, got "
                           f"{input_channels} and {num_classes}")
    n = RESENC_L_STAGES
    return {
        "input_channels": int(input_channels), "n_stages": n,
        "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": nn.Conv3d,
        "kernel_sizes": [[3, 3, 3] for _ in range(n)],
        "strides": [[1, 1, 1]] + [[2, 2, 2] for _ in range(n - 1)],
        "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "num_classes": int(num_classes),
        "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
        "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True},
        "deep_supervision": bool(deep_supervision),
    }


def check_resenc_patch_size(patch_size: tuple[int, int, int]) -> None:
    if len(patch_size) != 3 or any(p < RESENC_L_STRIDE or p % RESENC_L_STRIDE for p in patch_size):
        raise InvalidInput(f"ResEnc-L needs a patch size that is a positive multiple of {RESENC_L_STRIDE} on "
                           f"every axis (5 stride-2 stages), got {tuple(patch_size)}")


def build_resenc_l(input_channels: int = 1, num_classes: int = 1, deep_supervision: bool = False
                   ) -> ResidualEncoderUNet:
    """The stock network nnU-Net fine-tunes (random init)."""
    return ResidualEncoderUNet(**resenc_l_arch_kwargs(input_channels, num_classes, deep_supervision))


def resenc_backbone_spec(network: ResidualEncoderUNet, kwargs: dict[str, Any],
                         patch_size: tuple[int, int, int]) -> BackboneSpec:
    """Exports as `ResEncL` (the preset nnU-Net builds by name), with the full kwargs."""
    return BackboneSpec.from_network(network, "ResEncL", kwargs, patch_size)
