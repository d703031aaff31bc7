"""One training sample and one batch, as pure functions of (seed, rank, step).

Every random draw of batch `step` on rank `rank` comes from generators seeded with
`(seed, rank, step, sample index)`, never from global state, so a batch can be rebuilt from
its step alone (resume needs only the step), does not depend on how many workers produced it,
and ranks see different streams.

A sample's draws (case, placement, geometry, intensity) all happen before any voxel is read
(`_Draw`), so the same draws either finish the patch here (`sample_into`, augmentation in the
worker) or travel with the raw region to the training device (`raw_batch`, device_augment.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from nnssl.dataloading.augment import (
    AugmentConfig,
    IntensityParams,
    PatchWarp,
    SpatialParams,
    apply_intensity,
    mirror,
    sample_intensity,
    sample_spatial,
)
from nnssl.dataloading.case_index import CaseIndex
from nnssl.dataloading.dataset import CaseRecord
from nnssl.dataloading.device_augment import RawBatch, RawSample
from nnssl.dataloading.patches import (
    CaseReadError,
    ForegroundIndex,
    OpenCase,
    foreground_start,
    open_case,
    random_start,
    read_case_region,
)

Triple = tuple[int, int, int]


class SampleError(RuntimeError):
    """An unexpected failure (a bug, not bad data) while augmenting a case; names the case."""

    def __init__(self, image_id: str, path: str, reason: str) -> None:
        self.image_id, self.path, self.reason = image_id, str(path), reason
        super().__init__(f"failed to build a sample from case {image_id} ({path}): {reason}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.image_id, self.path, self.reason))


# share of patches centred on anatomy (or nonzero voxels), the rest uniform over the volume
FOREGROUND_PROBABILITY = 0.33


@dataclass(frozen=True)
class SampleSpec:
    """What the sampler needs to know; plain data so it pickles into worker processes."""

    patch_size: Triple
    num_channels: int = 1
    foreground_probability: float = FOREGROUND_PROBABILITY
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class SampleInfo:
    image_id: str
    start: Triple  # patch start in the case's voxel grid (before augmentation)
    foreground: bool  # centred on a foreground voxel
    region: tuple[Triple, Triple]  # the box read from storage


def sample_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator of sample `index` of the *global* batch of `step`. Indexing by the global
    position (not by rank) makes the global batch independent of the number of GPUs: rank r of
    R with local batch b builds samples r·b .. r·b + b − 1, so a 2-GPU run sees exactly the
    data of a 1-GPU run with the same global batch."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, index]))


class PatchSampler:
    """Draws patches from `cases`; holds a per-process foreground cache, nothing else. The cases
    are kept as a `CaseIndex`, whose pages a forked worker never writes to (see case_index.py)."""

    def __init__(self, cases: Sequence[CaseRecord], spec: SampleSpec) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        self.cases = CaseIndex.of(cases)
        self.spec = spec
        self.foreground = ForegroundIndex()

    def _place(self, case: OpenCase, rng: np.random.Generator) -> tuple[Triple, bool]:
        shape, patch = case.spatial_shape, self.spec.patch_size
        if rng.random() < self.spec.foreground_probability:
            points = self.foreground.get(case)
            if len(points):
                return foreground_start(shape, patch, points[rng.integers(len(points))]), True
        return random_start(shape, patch, rng), False

    def _draw(self, record: CaseRecord, rng: np.random.Generator) -> _Draw:
        """Every remaining random draw of one sample, in the stream's order: placement, geometry,
        intensity (reading voxels draws nothing, so drawing intensity before the read changes no
        value)."""
        case = open_case(record, self.spec.num_channels)
        start, on_foreground = self._place(case, rng)
        spatial = sample_spatial(rng, self.spec.augment)
        intensity = sample_intensity(rng, self.spec.augment)
        return _Draw(case, start, on_foreground, spatial, intensity, PatchWarp(start, self.spec.patch_size, spatial))

    def _record(self, rng: np.random.Generator) -> CaseRecord:
        return self.cases[int(rng.integers(len(self.cases)))]

    def sample_into(self, rng: np.random.Generator, data_out: np.ndarray, mask_out: np.ndarray) -> SampleInfo:
        """Fill `data_out` (C, *patch) float32 and `mask_out` (1, *patch) bool with one sample.

        Raises CaseReadError (bad data) or SampleError (anything else), both naming the case.
        """
        record = self._record(rng)
        with _naming(record):
            draw = self._draw(record, rng)
            case, warp, flips = draw.case, draw.warp, draw.spatial.mirror
            data_out[...] = mirror(warp.image(read_case_region(case, "image", warp.lo, warp.hi)), flips)
            apply_intensity(data_out, draw.intensity)
            if case.anonymization_mask is None:
                mask_out[...] = False
            else:
                region = read_case_region(case, "anonymization_mask", warp.lo, warp.hi)
                mask_out[...] = mirror(warp.mask(region), flips) != 0
            return SampleInfo(record.image_id, draw.start, draw.on_foreground, (warp.lo, warp.hi))

    def fill_batch(self, seed: int, step: int, data: np.ndarray, mask: np.ndarray,
                   first_index: int = 0) -> list[SampleInfo]:
        """Fill preallocated batch arrays (B, C, *patch) / (B, 1, *patch) with the global samples
        first_index .. first_index + B − 1 of `step`."""
        return [self.sample_into(sample_rng(seed, step, first_index + i), data[i], mask[i])
                for i in range(data.shape[0])]

    def raw_batch(self, seed: int, step: int, size: int, first_index: int = 0) -> RawBatch:
        """The same global samples as `fill_batch`, not augmented: each sample's source region
        (exactly the voxels its geometry reads) and its drawn parameters, packed into one buffer
        per dtype for `RawBatch.to(device)`. Mask regions without a defaced voxel are not sent."""
        draws = []
        for i in range(size):
            rng = sample_rng(seed, step, first_index + i)
            record = self._record(rng)
            with _naming(record):
                draws.append(self._draw(record, rng))
        channels = self.spec.num_channels
        images = torch.empty(sum(channels * math.prod(d.warp.region_shape) for d in draws), dtype=torch.float32)
        masks: list[np.ndarray] = []
        samples, offset, mask_offset = [], 0, 0
        for draw in draws:
            case, warp = draw.case, draw.warp
            size_here = channels * math.prod(warp.region_shape)
            sample_mask_offset = None
            with _naming(case.record):
                target = images[offset:offset + size_here].numpy().reshape(channels, *warp.region_shape)
                target[...] = read_case_region(case, "image", warp.lo, warp.hi)
                if case.anonymization_mask is not None:
                    region = read_case_region(case, "anonymization_mask", warp.lo, warp.hi)
                    if region.any():
                        masks.append(region.ravel())
                        sample_mask_offset, mask_offset = mask_offset, mask_offset + region.size
            samples.append(RawSample(case.record.image_id, draw.start, draw.spatial, draw.intensity, offset,
                                     sample_mask_offset))
            offset += size_here
        packed_masks = torch.from_numpy(np.concatenate(masks)) if masks else torch.empty(0, dtype=torch.uint8)
        return RawBatch(images, packed_masks, samples, self.spec.patch_size, channels, step)


@dataclass
class _Draw:
    """One sample's random draws and the geometry they imply."""

    case: OpenCase
    start: Triple
    on_foreground: bool
    spatial: SpatialParams
    intensity: IntensityParams
    warp: PatchWarp


@contextmanager
def _naming(record: CaseRecord) -> Iterator[None]:
    """CaseReadError (bad data) passes through; anything else becomes a SampleError naming the case."""
    try:
        yield
    except CaseReadError:
        raise  # bad data: already names the case and the file
    except Exception as e:
        raise SampleError(record.image_id, str(record.image), f"{type(e).__name__}: {e}") from e
