"""Augmentation on the training device: workers send raw regions, the GPU resamples them.

Why: a loader worker that zooms and rotates on its CPU spends most of its time interpolating
(a trilinear `grid_sample` of a 160³ patch is about 0.12 s on one core), so a GPU that consumes
25-30 samples/s would need several cores of workers for interpolation alone. With
`LoaderConfig.augment_on_device` a worker does only what needs the files: it draws every random
parameter of a sample (the same draws, in the same order, as the CPU path), reads and
decompresses exactly the source region those parameters need, and packs the regions of a batch
into one flat buffer (`RawBatch`). `RawBatch.to(device)` copies that buffer once and applies, on
the device:
- zoom / rotation per sample with `PatchWarp`'s torch calls (trilinear for the image, nearest for
  the anonymization mask): the very code the CPU path runs, on another device;
- mirroring;
- brightness, contrast and gamma batched over the samples that drew them
  (`apply_intensity_batch`, the torch twin of `augment.apply_intensity`).

Determinism is untouched: the parameters are a pure function of (seed, step, global sample index)
as on the CPU path, so resume and DDP equivalence hold as before, and on the CPU device the
patches equal the CPU path's up to float rounding (`tests/test_dataloading_device_augment.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nnssl.dataloading.augment import (
    GAMMA_MIN_RANGE,
    STD_FLOOR,
    IntensityParams,
    PatchWarp,
    SpatialParams,
)
from nnssl.dataloading.batch import Batch

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class RawSample:
    """Where one sample's region sits in its `RawBatch` and how to augment it."""

    image_id: str
    start: Triple  # patch start in the case's voxel grid (before augmentation)
    spatial: SpatialParams
    intensity: IntensityParams
    image_offset: int  # first element of its (C, *region) image region in RawBatch.images
    mask_offset: int | None  # first element of its (1, *region) mask region in RawBatch.masks;
    # None: the region holds no defaced voxel (the mask is all False, nothing was sent)


@dataclass
class RawBatch:
    """A batch before augmentation: every sample's source region, packed, plus its parameters.

    One flat buffer per dtype (not one tensor per sample) so the worker-to-trainer transfer, the
    pinning and the host-to-device copy each happen once per batch. `to(device)` returns the
    augmented `Batch` on that device.
    """

    images: torch.Tensor  # float32, flat: the samples' image regions one after the other
    masks: torch.Tensor  # uint8, flat: the mask regions that contain defaced voxels
    samples: list[RawSample]
    patch_size: Triple
    num_channels: int
    step: int

    @property
    def image_ids(self) -> list[str]:
        return [s.image_id for s in self.samples]

    @property
    def data(self) -> torch.Tensor:
        raise AttributeError("this batch is not augmented yet (LoaderConfig.augment_on_device): call "
                             "batch.to(device) first, which augments it on that device and returns a Batch")

    def pin_memory(self) -> RawBatch:  # called by DataLoader's pin-memory thread
        return RawBatch(self.images.pin_memory(), self.masks.pin_memory(), self.samples, self.patch_size,
                        self.num_channels, self.step)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """Copy the regions to `device` and augment them there (see the module docstring)."""
        return augment_on_device(self, torch.device(device), non_blocking)


def _flip(patch: torch.Tensor, flips: tuple[bool, bool, bool]) -> torch.Tensor:
    dims = [a + 1 for a in range(3) if flips[a]]
    return torch.flip(patch, dims) if dims else patch


def augment_on_device(raw: RawBatch, device: torch.device, non_blocking: bool = True) -> Batch:
    """The `Batch` the CPU path would have built from the same parameters, built on `device`."""
    images = raw.images.to(device, non_blocking=non_blocking)
    masks = raw.masks.to(device, non_blocking=non_blocking)
    size, channels = len(raw.samples), raw.num_channels
    data = torch.empty((size, channels, *raw.patch_size), dtype=torch.float32, device=device)
    anon = torch.zeros((size, 1, *raw.patch_size), dtype=torch.bool, device=device)
    for i, sample in enumerate(raw.samples):
        try:
            warp = PatchWarp(sample.start, raw.patch_size, sample.spatial)
            voxels = math.prod(warp.region_shape)
            region = images[sample.image_offset:sample.image_offset + channels * voxels]
            data[i] = _flip(warp.image_tensor(region.view(channels, *warp.region_shape)), sample.spatial.mirror)
            if sample.mask_offset is not None:
                mask = masks[sample.mask_offset:sample.mask_offset + voxels].view(1, *warp.region_shape)
                anon[i] = _flip(warp.mask_tensor(mask), sample.spatial.mirror) != 0
        except Exception as e:  # a bug or an exhausted device: say which sample it was
            e.add_note(f"while augmenting sample {i} ({sample.image_id}) of step {raw.step} on {device}")
            raise
    apply_intensity_batch(data, [s.intensity for s in raw.samples])
    return Batch(data, anon, raw.image_ids, raw.step)


def _statistics_dtype(device: torch.device) -> torch.dtype:
    # float64 statistics as the NumPy path computes them; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def _rows(params: list[IntensityParams], name: str, device: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row indices, values as a float64 column [n, 1, 1, 1, 1]) of the samples that drew `name`."""
    rows = [(i, getattr(p, name)) for i, p in enumerate(params) if getattr(p, name) is not None]
    if not rows:
        return None
    index = torch.tensor([i for i, _ in rows], device=device)
    values = torch.tensor([v for _, v in rows], dtype=torch.float64).view(-1, 1, 1, 1, 1)
    return index, values.to(device)


def apply_intensity_batch(data: torch.Tensor, params: list[IntensityParams]) -> None:
    """`augment.apply_intensity` for a whole batch [B, C, X, Y, Z] on its device, in place: each
    change runs once over the samples that drew it (gathered, changed in place, written back),
    with per-sample statistics (min, max, mean, std over all channels), float32 arithmetic and
    float64 statistics as on the CPU path. No value is read back to the host (no device sync)."""
    device, stats = data.device, _statistics_dtype(data.device)
    f32 = torch.float32
    brightness = _rows(params, "brightness", device)
    if brightness is not None:
        index, factor = brightness
        data.index_copy_(0, index, data.index_select(0, index).mul_(factor.to(f32)))
    contrast = _rows(params, "contrast", device)
    if contrast is not None:
        index, factor = contrast
        x = data.index_select(0, index)
        flat = x.flatten(1)
        lo, hi = flat.amin(1).view(-1, 1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1, 1)
        mean = flat.mean(1, dtype=stats).to(f32).view(-1, 1, 1, 1, 1)
        x.sub_(mean).mul_(factor.to(f32)).add_(mean).clamp_(lo, hi)
        data.index_copy_(0, index, x)
    gamma = _rows(params, "gamma", device)
    if gamma is not None:
        index, exponent = gamma
        x = data.index_select(0, index)
        flat = x.flatten(1)
        lo, hi = flat.amin(1).to(stats).view(-1, 1, 1, 1, 1), flat.amax(1).to(stats).view(-1, 1, 1, 1, 1)
        std, mean = torch.std_mean(flat.to(stats), dim=1, correction=0)
        bent = (x - lo.to(f32)).mul_((1.0 / (hi - lo)).to(f32)).pow_(exponent.to(f32))
        new_std, new_mean = torch.std_mean(bent.flatten(1).to(stats), dim=1, correction=0)
        scale = (std / new_std.clamp_min(STD_FLOOR)).to(f32).view(-1, 1, 1, 1, 1)
        bent.sub_(new_mean.to(f32).view(-1, 1, 1, 1, 1)).mul_(scale).add_(mean.to(f32).view(-1, 1, 1, 1, 1))
        # a (nearly) constant patch has no contrast to bend: kept as it is, as on the CPU path
        data.index_copy_(0, index, torch.where(hi - lo > GAMMA_MIN_RANGE, bent, x))
