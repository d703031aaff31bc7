"""Masked autoencoders (MAE): the reconstruction baselines I-JEPA is compared against.

Two variants (each registers its builders, `methods/registry.py`):

- **Primus** (`mae_primus.PrimusMAE`, the OpenMind / nnssl `BaseEvaMAETrainer` recipe): 75% of
  the 8³ tokens are dropped *before* the encoder, which runs on the visible 25% only; a small Eva
  decoder fills the sequence with a shared mask token and reconstructs the dropped tokens' voxels.
- **Convolutional U-Nets** (`mae_unet.UNetMAE`, nnssl `BaseMAETrainer`, "Revisiting MAE
  pre-training for 3D medical image segmentation"; every family in `CONV_UNET_FAMILIES`: ResEnc-L
  and nnU-Net's default PlainConvUNet): 75% of the 16³ input blocks are set to zero and the whole
  U-Net reconstructs the volume (a CNN cannot drop tokens).

Both compute the MSE on the masked voxels only, excluding defaced voxels (the anonymization
mask), in fp32 whatever the autocast state. This module holds what they share: the random mask
sampler, the masked MSE, the settings (`MAEConfig`), the checks and the registry entry.

Masks are a pure function of (seed, step, stream, global sample index), drawn with a local
generator per sample seeded by hashing those (`nnssl.methods.masks.seeded_generator`, blake2b, the
same convention as I-JEPA's sampler), never the global RNG: a resumed or multi-GPU run draws
exactly the masks an uninterrupted single-process run would (methods/base.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from nnssl.errors import InvalidInput
from nnssl.methods.masks import seeded_generator
from nnssl.methods.registry import MethodEntry, register_method

if TYPE_CHECKING:
    from nnssl.methods.base import MethodInputs
    from nnssl.models.registry import BackboneEntry


# Backbone families whose MAE zeroes input blocks and reconstructs them with the whole U-Net
# (`mae_unet.py` registers its builder for each; the block-size checks and the CNN recipe below
# apply to each). A new dynamic-network-architectures U-Net family joins MAE by its name here.
CONV_UNET_FAMILIES: tuple[str, ...] = ("resenc", "plainconv")


class InvalidMAEConfig(InvalidInput, ValueError):
    """MAE settings that cannot work; `problems` lists every issue."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid MAE settings:", problems)


class RandomMasks(NamedTuple):
    """Which cells (Primus tokens or U-Net input blocks) of each sample are visible / masked.

    Both are int64 [B, K] / [B, M] with ascending indices (C-order over the cell grid, Primus's
    token order), disjoint, together every cell; K and M are the same for every sample, so the
    batch stays one tensor (no ragged padding)."""

    keep: torch.Tensor
    masked: torch.Tensor

    @property
    def num_cells(self) -> int:
        return int(self.keep.shape[1] + self.masked.shape[1])

    @property
    def masked_fraction(self) -> float:
        """Known on the host: logging it costs no device sync."""
        return self.masked.shape[1] / self.num_cells

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RandomMasks:
        return RandomMasks(self.keep.to(device, non_blocking=non_blocking),
                           self.masked.to(device, non_blocking=non_blocking))

    def masked_cells(self) -> torch.Tensor:
        """bool [B, N], True where the cell is masked."""
        out = torch.zeros(self.masked.shape[0], self.num_cells, dtype=torch.bool, device=self.masked.device)
        return out.scatter_(1, self.masked, True)


@dataclass(frozen=True)
class RandomMaskSampler:
    """Uniformly random masking, independently per sample, of exactly round(ratio · N) cells.

    The count is exact rather than Bernoulli per cell so the loss has the same number of terms
    every step and the batch needs no padding (MAE's "shuffle and keep the first K")."""

    mask_ratio: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise InvalidMAEConfig([f"mask ratio must be in (0, 1), got {self.mask_ratio}"])

    def num_masked(self, num_cells: int) -> int:
        """round(ratio · N) (half up, not Python's banker's rounding), refused when it would leave
        no visible or no masked cell."""
        masked = math.floor(self.mask_ratio * num_cells + 0.5)
        if not 1 <= masked <= num_cells - 1:
            raise InvalidMAEConfig([(f"mask ratio {self.mask_ratio} of {num_cells} cells masks {masked}: MAE needs "
                                     "at least one visible and one masked cell; use a larger patch size or a ratio "
                                     f"between {1.5 / num_cells:.3g} and {1 - 1.5 / num_cells:.3g}")])
        return masked

    def __call__(self, batch_size: int, num_cells: int, step: int, first_index: int = 0,
                 stream: int = 0) -> RandomMasks:
        """CPU masks of the global samples first_index .. first_index + batch_size − 1 of `step`
        (rank r of a run with local batch b passes first_index = r·b); move them with `.to(device)`."""
        masked = self.num_masked(num_cells)
        keys = [torch.rand(num_cells, generator=seeded_generator("mae", int(self.seed), int(step), int(stream),
                                                           int(first_index) + i)) for i in range(batch_size)]
        order = torch.stack(keys).argsort(dim=1)
        return RandomMasks(keep=order[:, masked:].sort(dim=1).values, masked=order[:, :masked].sort(dim=1).values)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """Mean of (prediction - target)² over the elements where `include` (bool, broadcast against
    the prediction, e.g. [B, 1, X, Y, Z] against [B, C, X, Y, Z]) is True; the same per-voxel
    normalisation as the reference's `MAEMSELoss`. fp32 whatever the autocast state: bf16 sums
    over millions of voxels lose the small late-training differences. Zero, and still
    differentiable, when nothing is included (a masked region that is entirely defaced)."""
    if prediction.shape != target.shape:
        raise InvalidInput(f"reconstruction {list(prediction.shape)} and target {list(target.shape)} differ in shape")
    with torch.autocast(prediction.device.type, enabled=False):
        include = include.to(torch.bool).expand_as(prediction)
        squared = (prediction.float() - target.float()).square()
        return torch.where(include, squared, 0.0).sum() / include.sum().clamp_min(1)


def check_anonymization_mask(mask: torch.Tensor | None, volumes: torch.Tensor) -> torch.Tensor | None:
    """The anonymization mask as bool [B, 1, X, Y, Z] (True = defaced, excluded from the loss), or
    None when there is none."""
    if mask is None:
        return None
    expected = (volumes.shape[0], 1, *volumes.shape[2:])
    if tuple(mask.shape) != expected:
        raise InvalidInput(f"anonymization mask has shape {list(mask.shape)}, expected {list(expected)} (one "
                           "channel, same batch and spatial size as the volumes); crop it together with the image")
    return mask.to(device=volumes.device, dtype=torch.bool)


def cpu_state_dict(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies of the entries of `state` inside the modules `prefixes`
    (exact module membership: `encoder.stem` selects `encoder.stem.*`, not `encoder.stem2.*`).
    CPU because nnU-Net calls `torch.load` without `map_location`."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()
            if any(k == p or k.startswith(p + ".") for p in prefixes)}


@dataclass(frozen=True)
class MAEConfig:
    """MAE settings (section `mae` of the training configuration).

    `mask_ratio`: fraction of cells masked (Primus: 8³ tokens dropped before the encoder; U-Nets:
    `block_size`³ input blocks zeroed). `decoder_width` / `decoder_depth`: the small Eva decoder of
    the Primus variant (the U-Net variant reconstructs with the U-Net's own decoder)."""

    mask_ratio: float = 0.75
    block_size: int = 16
    decoder_width: int = 384
    decoder_depth: int = 2

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.mask_ratio < 1.0:
            problems.append(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.block_size < 1:
            problems.append(f"block_size must be >= 1, got {self.block_size}")
        if self.decoder_depth < 1:
            problems.append(f"decoder_depth must be >= 1, got {self.decoder_depth}: without decoder blocks the mask "
                            "tokens never see the encoder output and the encoder gets no gradient")
        if self.decoder_width < 6:
            problems.append(f"decoder_width must be >= 6 (3D sin-cos positions need 2 channels per axis), got "
                            f"{self.decoder_width}")
        if problems:
            raise InvalidMAEConfig(problems)


def mae_problems(config: MethodInputs, backbone: BackboneEntry) -> list[str]:
    """Why `config` cannot build an MAE on `backbone` (empty: it can): every masked cell count
    must leave at least one visible and one masked cell; a U-Net needs more than one bottleneck
    cell (InstanceNorm refuses a 1-voxel map while training, a crash in the first step)."""
    patch = tuple(config.patch_size or ())
    if backbone.family in CONV_UNET_FAMILIES:  # the masked cells are input blocks, not tokens
        cell = (config.mae.block_size,) * 3
        if len(patch) == 3 and any(p % config.mae.block_size for p in patch):
            return [f"mae.block_size {config.mae.block_size} must divide the patch size {patch}"]
        bottleneck = tuple(backbone.cell_size(config.model))
        if patch == bottleneck:
            return [f"patch size {patch} is a single bottleneck cell of {backbone.name}: the U-Net's bottleneck "
                    "InstanceNorm needs more than one voxel per channel while training; use at least "
                    f"{2 * bottleneck[0]} on one axis"]
    else:
        cell = backbone.cell_size(config.model)
    if len(patch) != 3 or any(p < c or p % c for p, c in zip(patch, cell)):
        return []  # the backbone's own check reports the patch size
    try:
        RandomMaskSampler(config.mae.mask_ratio).num_masked(math.prod(p // c for p, c in zip(patch, cell)))
    except InvalidMAEConfig as e:
        return list(e.problems)
    return []


MAE_CITATION = {
    "type": "method", "name": "MAE",
    "apa_citations": ["He, K., Chen, X., Xie, S., Li, Y., Dollar, P., & Girshick, R. (2022). Masked Autoencoders "
                      "Are Scalable Vision Learners. CVPR 2022. arXiv:2111.06377",
                      "Wald, T., Ulrich, C., Suprijadi, J., Ziegler, S., Nohel, M., Peretzke, R., Kohler, G., & "
                      "Maier-Hein, K. H. (2025). An OpenMind for 3D medical vision self-supervised learning. "
                      "arXiv:2412.17041"],
}

# The reference nnssl MAE recipe where our schedule can express it: AdamW betas (0.9, 0.98),
# constant weight decay 0.05, drop path 0.2 for Primus (the U-Nets have none), gradient clipping
# 1 (Primus) / 12 (ResEnc, and the other U-Nets with it); warm-up + cosine instead of its poly lr.
_RECIPE = {"optim.betas": (0.9, 0.98), "optim.start_weight_decay": 0.05, "optim.final_weight_decay": 0.05}
register_method(MethodEntry(
    name="MAETrainer", display_name="MAE", citation=MAE_CITATION,
    description="MAE: reconstruct masked voxels (Primus: 75% of tokens dropped; CNN U-Nets: 16³ blocks zeroed)",
    exports="the encoder", problems=mae_problems, listing_order=10,
    defaults={"primus": {**_RECIPE, "model.drop_path_rate": 0.2, "optim.grad_clip": 1.0},
              **{family: {**_RECIPE, "optim.grad_clip": 12.0} for family in CONV_UNET_FAMILIES}}))
