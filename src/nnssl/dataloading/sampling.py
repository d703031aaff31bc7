"""One training sample and one batch, as pure functions of (seed, rank, step).

Every random draw of batch `step` on rank `rank` comes from generators seeded with
`(seed, rank, step, sample index)`, never from global state, so a batch can be rebuilt from
its step alone (resume needs only the step), does not depend on how many workers produced it,
and ranks see different streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nnssl.dataloading.augment import (
    AugmentConfig,
    PatchWarp,
    augment_intensity,
    mirror,
    sample_spatial,
)
from nnssl.dataloading.case_index import CaseIndex
from nnssl.dataloading.dataset import CaseRecord
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

    def sample_into(self, rng: np.random.Generator, data_out: np.ndarray, mask_out: np.ndarray) -> SampleInfo:
        """Fill `data_out` (C, *patch) float32 and `mask_out` (1, *patch) bool with one sample.

        Raises CaseReadError (bad data) or SampleError (anything else), both naming the case.
        """
        record = self.cases[int(rng.integers(len(self.cases)))]
        try:
            case = open_case(record, self.spec.num_channels)
            start, on_foreground = self._place(case, rng)
            return self._build(case, rng, start, on_foreground, data_out, mask_out)
        except CaseReadError:
            raise  # bad data: already names the case and the file
        except Exception as e:
            raise SampleError(record.image_id, str(record.image), f"{type(e).__name__}: {e}") from e

    def _build(self, case: OpenCase, rng: np.random.Generator, start: Triple, on_foreground: bool,
               data_out: np.ndarray, mask_out: np.ndarray) -> SampleInfo:
        aug, patch = self.spec.augment, self.spec.patch_size
        params = sample_spatial(rng, aug)
        geometry = PatchWarp(start, patch, params)
        region = read_case_region(case, "image", geometry.lo, geometry.hi)
        data_out[...] = mirror(geometry.image(region), params.mirror)
        augment_intensity(data_out, rng, aug)
        if case.anonymization_mask is None:
            mask_out[...] = False
        else:
            region = read_case_region(case, "anonymization_mask", geometry.lo, geometry.hi)
            mask_out[...] = mirror(geometry.mask(region), params.mirror) != 0
        return SampleInfo(case.record.image_id, start, on_foreground, (geometry.lo, geometry.hi))

    def fill_batch(self, seed: int, step: int, data: np.ndarray, mask: np.ndarray,
                   first_index: int = 0) -> list[SampleInfo]:
        """Fill preallocated batch arrays (B, C, *patch) / (B, 1, *patch) with the global samples
        first_index .. first_index + B − 1 of `step`."""
        return [self.sample_into(sample_rng(seed, step, first_index + i), data[i], mask[i])
                for i in range(data.shape[0])]
