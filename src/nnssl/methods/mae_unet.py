"""MAE on nnU-Net's convolutional U-Nets (ResEnc-L, PlainConvUNet): zero 75% of the 16³ input
blocks, reconstruct the volume with the whole U-Net.

The recipe of nnssl's `BaseMAETrainer` (Wald et al., "Revisiting MAE pre-training for 3D
medical image segmentation", CVPR 2025; the OpenMind benchmark's CNN baseline), in the Spark3D
tradition of masked image modelling with CNNs: a convolution cannot skip tokens, so masked
blocks are set to zero in the input and the *whole* U-Net (num_classes = input channels, no deep
supervision) reconstructs every voxel; the MSE counts the masked voxels only, excluding defaced
ones.

Any dynamic-network-architectures U-Net works the same way (an `encoder` returning the skips, a
`UNetDecoder` with `seg_layers`), so one class serves every family in `CONV_UNET_FAMILIES`
(`methods/mae.py`): `ResidualEncoderUNet` and `PlainConvUNet`.

Only the network's own transfer keys are exported (`key_to_stem` / `key_to_encoder`: ResEnc's
`encoder.stem.*` and `encoder.stages.*`; PlainConvUNet's `encoder.stages.*`, whose stage 0 is its
stem), which is what nnU-Net's fine-tuning transfers; the U-Net decoder is pretraining-only.
`decoder.encoder.*` (the decoder keeps a reference to the encoder) and `decoder.*` start with
neither prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnssl.errors import InvalidInput
from nnssl.methods.base import TRAIN_STREAM, MethodOutput, PretrainingMethod, parameter_groups_by_part
from nnssl.methods.mae import (
    CONV_UNET_FAMILIES,
    RandomMasks,
    RandomMaskSampler,
    check_anonymization_mask,
    cpu_state_dict,
    masked_mse,
)
from nnssl.methods.registry import register_builder
from nnssl.models.backbone import BackboneSpec

if TYPE_CHECKING:
    from nnssl.methods.base import MethodInputs
    from nnssl.models.registry import BackboneEntry


@dataclass
class UNetMAEOutput:
    loss: torch.Tensor            # scalar, fp32
    reconstruction: torch.Tensor  # [B, C, X, Y, Z]
    voxel_mask: torch.Tensor      # bool [B, 1, X, Y, Z], True = masked (zeroed in the input)
    bottleneck: torch.Tensor      # [B, N, F]: deepest encoder features of the masked input, C-order


def total_stride(encoder: Any) -> tuple[int, int, int]:
    """Per-axis downsampling of a dynamic-network-architectures encoder (`encoder.strides`)."""
    strides = [(s,) * 3 if isinstance(s, int) else tuple(s) for s in encoder.strides]
    return tuple(math.prod(int(s[a]) for s in strides) for a in range(3))  # type: ignore[return-value]


class UNetMAE(PretrainingMethod):
    """A dynamic-network-architectures U-Net (`ResidualEncoderUNet`, `PlainConvUNet`) trained to
    fill in zeroed 16³ blocks (`network.*` in the state dict, everything needed to resume)."""

    def __init__(self, network: ResidualEncoderUNet | PlainConvUNet, mask_sampler: RandomMaskSampler | None = None,
                 block_size: int = 16, backbone: BackboneSpec | None = None) -> None:
        super().__init__()
        in_channels = int(next(m for m in network.encoder.modules() if isinstance(m, _ConvNd)).in_channels)
        out_channels = int(network.decoder.seg_layers[-1].out_channels)
        if network.decoder.deep_supervision or out_channels != in_channels:
            raise InvalidInput(f"the MAE U-Net must reconstruct its {in_channels} input channel(s) at full "
                               f"resolution: build it with num_classes={in_channels} and deep_supervision=False "
                               f"(got {out_channels} output channel(s), deep_supervision="
                               f"{network.decoder.deep_supervision})")
        if block_size < 1:
            raise InvalidInput(f"mask block size must be >= 1, got {block_size}")
        self.network = network
        self.mask_sampler = mask_sampler if mask_sampler is not None else RandomMaskSampler()
        self.block_size = int(block_size)
        self.stride = total_stride(network.encoder)
        self.backbone = backbone  # type: ignore[assignment]
        self.embed_dim = int(network.encoder.output_channels[-1])
        # without deep supervision the decoder only applies its last segmentation layer; the others
        # would never get a gradient (DDP's unused-parameter error, dead optimizer state)
        for layer in network.decoder.seg_layers[:-1]:
            layer.requires_grad_(False)

    def block_grid(self, spatial: tuple[int, ...]) -> tuple[int, int, int]:
        """Blocks per axis for a volume of `spatial` voxels."""
        b = self.block_size
        if len(spatial) != 3 or any(s < t or s % t or s % b for s, t in zip(spatial, self.stride)):
            raise InvalidInput(f"U-Net MAE needs volumes whose sides are multiples of the network's total stride "
                               f"{self.stride} and of the mask block size {b}, got {tuple(spatial)}; crop the "
                               "input or change the patch size")
        return tuple(s // b for s in spatial)  # type: ignore[return-value]

    def sample_masks(self, volumes_shape: tuple[int, ...], step: int, first_index: int = 0,
                     stream: int = TRAIN_STREAM) -> RandomMasks:
        grid = self.block_grid(tuple(volumes_shape[2:]))
        return self.mask_sampler(int(volumes_shape[0]), math.prod(grid), step, first_index=first_index, stream=stream)

    def voxel_mask(self, masks: RandomMasks, spatial: tuple[int, ...]) -> torch.Tensor:
        """Block masks -> bool [B, 1, X, Y, Z] (True = masked): every block a constant 16³ cube,
        blocks in C-order over the block grid."""
        (gx, gy, gz), b = self.block_grid(tuple(spatial)), self.block_size
        if masks.num_cells != gx * gy * gz:
            raise InvalidInput(f"masks have {masks.num_cells} blocks, volumes of {tuple(spatial)} voxels have "
                               f"{gx * gy * gz}; sample them with `sample_masks(volumes.shape, step)`")
        cells = masks.masked_cells().reshape(-1, 1, gx, 1, gy, 1, gz, 1)
        return cells.expand(-1, -1, -1, b, -1, b, -1, b).reshape(-1, 1, gx * b, gy * b, gz * b)

    def forward(self, volumes: torch.Tensor, anonymization_mask: torch.Tensor | None,
                masks: RandomMasks) -> UNetMAEOutput:
        if masks.keep.shape[0] != volumes.shape[0]:
            raise InvalidInput(f"masks are for a batch of {masks.keep.shape[0]}, the volumes are a batch of "
                               f"{volumes.shape[0]}; sample them with `sample_masks(volumes.shape, step)`")
        voxel_mask = self.voxel_mask(masks, tuple(volumes.shape[2:]))
        skips = self.network.encoder(volumes.masked_fill(voxel_mask, 0.0))
        reconstruction = self.network.decoder(skips)
        loss = self.reconstruction_loss(reconstruction, volumes, anonymization_mask, voxel_mask)
        bottleneck = skips[-1].flatten(2).transpose(1, 2)                          # [B, N, F], C-order
        return UNetMAEOutput(loss, reconstruction, voxel_mask, bottleneck)

    @staticmethod
    def reconstruction_loss(reconstruction: torch.Tensor, volumes: torch.Tensor,
                            anonymization_mask: torch.Tensor | None, voxel_mask: torch.Tensor) -> torch.Tensor:
        """MSE over the masked voxels that are not defaced."""
        anonymized = check_anonymization_mask(anonymization_mask, volumes)
        include = voxel_mask if anonymized is None else voxel_mask & ~anonymized
        return masked_mse(reconstruction, volumes, include)

    # ---- the training loop's interface (methods/base.py) --------------------------------------

    def training_output(self, volumes: torch.Tensor, anonymization_mask: torch.Tensor | None, step: int,
                        rank: int = 0, world_size: int = 1, stream: int = TRAIN_STREAM) -> MethodOutput:
        """Block masks of this rank's global samples at (step, stream), then `forward`. Monitor
        tokens: the bottleneck features [B, N, F] of the masked input (N = input / total stride)."""
        masks = self.sample_masks(tuple(volumes.shape), step, first_index=rank * volumes.shape[0],
                                  stream=stream).to(volumes.device)
        out = self(volumes, anonymization_mask, masks)
        return MethodOutput(out.loss, monitor_tokens=out.bottleneck.detach(),
                            scalars={"masked_fraction": masks.masked_fraction,
                                     "masked_blocks": float(masks.masked.shape[1])})

    def after_optimizer_step(self, step: int, momentum: float) -> None:
        """Nothing to do: MAE has no EMA teacher."""

    def _decoder_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        encoder = {id(p) for p in self.network.encoder.parameters()}
        return [(n, p) for n, p in self.network.decoder.named_parameters() if id(p) not in encoder]

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """`encoder_*` (stem and stages) and `decoder_*` (the U-Net decoder, without the encoder it
        references and without the frozen deep-supervision heads) groups, each split into decayed
        conv weights and exempt biases / norm parameters."""
        return parameter_groups_by_part((("encoder", list(self.network.encoder.named_parameters())),
                                     ("decoder", self._decoder_named_parameters())), weight_decay)

    def export_encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The keys under the network's `key_to_stem` / `key_to_encoder`, detached contiguous CPU copies."""
        return cpu_state_dict(self.network.state_dict(), (self.network.key_to_stem, self.network.key_to_encoder))


def build_unet_mae(config: MethodInputs, backbone: BackboneEntry, input_channels: int = 1) -> UNetMAE:
    """The U-Net MAE of a training configuration (the U-Net reconstructs every input channel),
    initialised as nnU-Net initialises its networks (`network.initialize`: He init; for ResEnc
    also the zeroed last norm of each residual block)."""
    network, spec = backbone.build(input_channels, tuple(config.patch_size), config.model, input_channels)
    network.apply(network.initialize)
    return UNetMAE(network, RandomMaskSampler(config.mae.mask_ratio, config.seed), config.mae.block_size, spec)


for _family in CONV_UNET_FAMILIES:
    register_builder("MAETrainer", _family)(build_unet_mae)
