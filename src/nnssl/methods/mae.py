"""Masked autoencoders (MAE): the reconstruction baselines I-JEPA is compared against.

Two variants, chosen by the backbone family of the training configuration (`build_mae`):

- **Primus** (`mae_primus.PrimusMAE`, the OpenMind / nnssl `BaseEvaMAETrainer` recipe): 75% of
  the 8³ tokens are dropped *before* the encoder, which runs on the visible 25% only; a small Eva
  decoder fills the sequence with a shared mask token and reconstructs the dropped tokens' voxels.
- **ResEnc-L** (`mae_resenc.ResEncMAE`, nnssl `BaseMAETrainer`, "Revisiting MAE pre-training for
  3D medical image segmentation"): 75% of the 16³ input blocks are set to zero and the whole
  residual-encoder U-Net reconstructs the volume (a CNN cannot drop tokens).

Both compute the MSE on the masked voxels only, excluding defaced voxels (the anonymization
mask), in fp32 whatever the autocast state. This module holds what they share: the random mask
sampler, the masked MSE, the AdamW groups and the configuration checks.

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

if TYPE_CHECKING:
    from nnssl.methods.base import PretrainingMethod
    from nnssl.training.config import TrainingConfig


class InvalidMAEConfig(InvalidInput, ValueError):
    """MAE settings that cannot work; `problems` lists every issue."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid MAE settings:", problems)


class RandomMasks(NamedTuple):
    """Which cells (Primus tokens or ResEnc input blocks) of each sample are visible / masked.

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


def mae_config_problems(config: TrainingConfig) -> list[str]:
    """Every reason `config` cannot build an MAE (the general configuration checks included)."""
    problems = list(config.problems())
    token = config.token_size if config.backbone_family == "primus" else (config.mae_block_size,) * 3
    if config.backbone_family == "resenc" and (config.mae_block_size < 1 or
                                               any(p % config.mae_block_size for p in config.patch_size)):
        problems.append(f"mae_block_size {config.mae_block_size} must divide the patch size {config.patch_size}")
    elif all(t >= 1 and p >= t and p % t == 0 for p, t in zip(config.patch_size, token)) and \
            0.0 < config.mae_mask_ratio < 1.0:
        cells = math.prod(p // t for p, t in zip(config.patch_size, token))
        try:
            RandomMaskSampler(config.mae_mask_ratio).num_masked(cells)
        except InvalidMAEConfig as e:
            problems += e.problems
    if config.backbone_family == "primus":
        if config.mae_decoder_depth < 1:
            problems.append(f"mae_decoder_depth must be >= 1, got {config.mae_decoder_depth}: without decoder "
                            "blocks the mask tokens never see the encoder output and the encoder gets no gradient")
        if config.mae_decoder_width < 6:
            problems.append(f"mae_decoder_width must be >= 6 (3D sin-cos positions need 2 channels per axis), "
                            f"got {config.mae_decoder_width}")
    return list(dict.fromkeys(problems))


def build_mae(config: TrainingConfig, input_channels: int = 1) -> PretrainingMethod:
    """The MAE of `config.backbone_family` ("primus" or "resenc"), random init from the global
    RNG (`methods.factory.build_method` seeds it with `config.seed`; the masks use their own
    generator). Raises `InvalidMAEConfig` listing every problem."""
    problems = mae_config_problems(config)
    if input_channels < 1:
        problems.append(f"input_channels must be >= 1, got {input_channels}")
    if problems:
        raise InvalidMAEConfig(problems)
    if config.backbone_family == "primus":
        from nnssl.methods.mae_primus import build_primus_mae

        return build_primus_mae(config, input_channels)
    from nnssl.methods.mae_resenc import build_resenc_mae

    return build_resenc_mae(config, input_channels)
