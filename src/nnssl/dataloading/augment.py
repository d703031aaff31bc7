"""Augmentation for single-view pretraining (I-JEPA, MAE): geometry and light intensity changes.

Why not batchgenerators' SpatialTransform: it needs the whole region that *any* allowed
rotation/zoom could touch before it knows what it will sample (the reference reads 257³ voxels
for every 160³ patch) and it draws from NumPy's global RNG, which breaks "batch k is a pure
function of (seed, rank, k)". Here the random parameters are drawn first, from a generator
the caller owns, and `source_region` then says exactly which voxels the transform reads, so the
loader decompresses only those.

Geometry (voxel space, arrays are (C, X, Y, Z)): output voxel `o` of a patch of size `P` sits at
offset `u = o - (P - 1) / 2` from the patch centre `c` and samples the source at
`x = c + R @ u / zoom`. `zoom > 1` enlarges anatomy (the patch covers fewer source voxels).
Three paths, cheapest first, chosen per sample:
- no zoom, no rotation: a plain crop (reads exactly the patch);
- zoom only: separable trilinear `F.interpolate` of an axis-aligned region (~6x faster than a
  sampling grid on CPU). The source extent is rounded to whole voxels, so the effective zoom is
  `(P - 1) / round((P - 1) / zoom)`, within 1 % of the drawn one;
- rotation (with or without zoom): trilinear `F.grid_sample` on the bounding box of the rotated
  patch, plus one voxel for the interpolation neighbours.
Masks follow the same geometry with nearest-neighbour sampling. Mirroring is a flip of the
finished patch.

Every random parameter (`sample_spatial`, `sample_intensity`) is drawn before any voxel is
touched, so the same parameters can be applied in a loader worker (NumPy / CPU torch, here) or,
batched, on the training device (`device_augment.py`), with the same result up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from nnssl.errors import InvalidInput

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample augmentation; every transform is switched off by setting its probability to 0.

    Defaults are deliberately light: I-JEPA predicts target-encoder features of other regions of
    the *same* view, so heavy photometric changes buy nothing and cost CPU time.
    """

    zoom_probability: float = 0.2
    zoom_range: tuple[float, float] = (0.85, 1.25)
    rotation_probability: float = 0.2
    rotation_degrees: float = 15.0  # each axis uniformly in [-deg, deg]
    mirror_probability: float = 0.5  # per axis in mirror_axes
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    brightness_probability: float = 0.15  # multiply by a factor from brightness_range
    brightness_range: tuple[float, float] = (0.85, 1.15)
    contrast_probability: float = 0.15  # scale around the mean, clipped to the original range
    contrast_range: tuple[float, float] = (0.85, 1.15)
    gamma_probability: float = 0.15  # gamma on the min-max rescaled patch, mean/std restored
    gamma_range: tuple[float, float] = (0.8, 1.25)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise InvalidInput("invalid augmentation configuration:", problems)

    def problems(self) -> list[str]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_probability") and not 0.0 <= value <= 1.0:
                out.append(f"{f.name} must be in [0, 1], got {value}")
            if f.name.endswith("_range"):
                if len(value) != 2 or not 0.0 < value[0] <= value[1]:
                    out.append(f"{f.name} must be (low, high) with 0 < low <= high, got {value}")
        if not 0.0 <= self.rotation_degrees <= 45.0:
            out.append(f"rotation_degrees must be in [0, 45], got {self.rotation_degrees}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes) or len(set(self.mirror_axes)) != len(
            self.mirror_axes
        ):
            out.append(f"mirror_axes must be distinct values of 0, 1, 2, got {self.mirror_axes}")
        return out

    @classmethod
    def disabled(cls) -> AugmentConfig:
        """Plain random crops (validation, benchmarks of the read path)."""
        return cls(
            zoom_probability=0.0, rotation_probability=0.0, mirror_probability=0.0,
            brightness_probability=0.0, contrast_probability=0.0, gamma_probability=0.0,
        )


@dataclass(frozen=True)
class SpatialParams:
    """The geometric draw for one sample. `rotation` is None when the sample is not rotated."""

    zoom: float = 1.0
    rotation: np.ndarray | None = None
    mirror: tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_crop(self) -> bool:
        return self.zoom == 1.0 and self.rotation is None


def rotation_matrix(angles_rad: tuple[float, float, float]) -> np.ndarray:
    """Rotation about axis 0, then 1, then 2 (voxel axes X, Y, Z)."""
    a, b, g = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_spatial(rng: np.random.Generator, cfg: AugmentConfig) -> SpatialParams:
    zoom = 1.0
    if rng.random() < cfg.zoom_probability:
        lo, hi = cfg.zoom_range
        zoom = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))  # symmetric in/out
    rotation = None
    if rng.random() < cfg.rotation_probability and cfg.rotation_degrees > 0:
        angles = rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees, size=3)
        rotation = rotation_matrix(tuple(np.deg2rad(angles)))
    flips = rng.random(3) < cfg.mirror_probability
    mirror = tuple(bool(flips[a]) and a in cfg.mirror_axes for a in range(3))
    return SpatialParams(zoom=zoom, rotation=rotation, mirror=mirror)  # type: ignore[arg-type]


def _zoom_spans(patch_size: Triple, zoom: float) -> list[int]:
    """Source extent (in voxel steps) of each axis for the zoom-only path."""
    return [max(1, round((p - 1) / zoom)) for p in patch_size]


def source_region(start: Triple, patch_size: Triple, params: SpatialParams) -> tuple[Triple, Triple]:
    """Half-open voxel box [lo, hi) that the transformed patch at `start` reads (may leave the volume)."""
    if params.is_crop:
        return start, tuple(s + p for s, p in zip(start, patch_size))  # type: ignore[return-value]
    centre = np.array(start, dtype=np.float64) + (np.array(patch_size) - 1) / 2.0
    if params.rotation is None:
        spans = _zoom_spans(patch_size, params.zoom)
        lo = tuple(int(round(c - n / 2.0)) for c, n in zip(centre, spans))
        return lo, tuple(a + n + 1 for a, n in zip(lo, spans))  # type: ignore[return-value]
    half = (np.array(patch_size, dtype=np.float64) - 1) / 2.0
    corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(3, -1)
    mapped = centre[:, None] + (params.rotation / params.zoom) @ corners
    lo = np.floor(mapped.min(axis=1)).astype(int)
    hi = np.floor(mapped.max(axis=1)).astype(int) + 2  # +1 neighbour for trilinear, +1 half-open
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)  # type: ignore[return-value]


class PatchWarp:
    """The resampling of one sample, shared by its image and mask (the grid is built once).

    `lo`, `hi`: the half-open source box to read (see `source_region`). Mirroring is not applied
    here (see `mirror`). The `*_tensor` methods run on the region's device: the worker calls them
    on CPU tensors (via `image` / `mask` on NumPy arrays), the training process on its GPU
    (`dataloading/device_augment.py`); the same torch calls on the same device give the same patch.
    """

    def __init__(self, start: Triple, patch_size: Triple, params: SpatialParams) -> None:
        self.start, self.patch_size, self.params = start, patch_size, params
        self.lo, self.hi = source_region(start, patch_size, params)
        self._grid: torch.Tensor | None = None

    @property
    def region_shape(self) -> Triple:
        return tuple(b - a for a, b in zip(self.lo, self.hi))  # type: ignore[return-value]

    def image(self, region: np.ndarray) -> np.ndarray:
        """Trilinear resampling of the float32 `region` (C, ...) read at [lo, hi)."""
        if self.params.is_crop:
            return region
        return self.image_tensor(torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))).numpy()

    def mask(self, region: np.ndarray) -> np.ndarray:
        """Nearest-neighbour resampling of a uint8 mask region, aligned with `image`."""
        if not region.any():  # most patches miss the defaced area: nothing to resample
            return np.zeros((region.shape[0], *self.patch_size), dtype=region.dtype)
        if self.params.is_crop:
            return region
        return self.mask_tensor(torch.from_numpy(np.ascontiguousarray(region))).numpy()

    def image_tensor(self, region: torch.Tensor) -> torch.Tensor:
        """`image` on a float32 tensor (C, *region_shape), on its device."""
        if self.params.is_crop:
            return region
        if self.params.rotation is None:
            return F.interpolate(region[None], size=tuple(self.patch_size), mode="trilinear", align_corners=True)[0]
        # "bilinear" is trilinear for 5-D input
        return F.grid_sample(region[None], self._grid_on(region), mode="bilinear", padding_mode="zeros",
                             align_corners=True)[0]

    def mask_tensor(self, region: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour resampling of a mask tensor (C, *region_shape), same dtype, on its device."""
        if self.params.is_crop:
            return region
        if self.params.rotation is None:
            # nearest neighbour with the same corner-aligned geometry as the trilinear image path
            out = region
            for axis, (p, n) in enumerate(zip(self.patch_size, _zoom_spans(self.patch_size, self.params.zoom))):
                index = np.rint(np.arange(p) * (n / max(p - 1, 1))).astype(np.int64)
                out = out.index_select(axis + 1, torch.from_numpy(index).to(region.device))
            return out
        src = region.to(torch.float32)[None]
        out = F.grid_sample(src, self._grid_on(region), mode="nearest", padding_mode="zeros", align_corners=True)[0]
        return out.to(region.dtype)

    def _grid_on(self, region: torch.Tensor) -> torch.Tensor:
        if self._grid is None or self._grid.device != region.device:
            assert self.params.rotation is not None
            self._grid = _sampling_grid(self.region_shape, self.lo, self.start, self.patch_size,
                                        self.params.rotation / self.params.zoom, region.device)
        return self._grid


def _sampling_grid(region_shape: Triple, region_lo: Triple, start: Triple, patch_size: Triple,
                   matrix: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """`grid_sample` grid (1, Px, Py, Pz, 3); last dim ordered (Z, Y, X) as torch expects.
    Built on `device` (float64 offsets rounded once to float32: the same grid on every device)."""
    centre = np.array(start, dtype=np.float64) + (np.array(patch_size) - 1) / 2.0
    offsets = [torch.arange(p, dtype=torch.float64, device=device) - (p - 1) / 2.0 for p in patch_size]
    grid = torch.empty((*patch_size, 3), dtype=torch.float32, device=device)
    for k in range(3):  # source axis k, normalised to [-1, 1] over the region (align_corners=True)
        norm = 2.0 / max(region_shape[k] - 1, 1)
        a = [float(matrix[k, j]) * norm * offsets[j] for j in range(3)]
        b = float((centre[k] - region_lo[k]) * norm - 1.0)
        plane = (a[0].view(-1, 1) + a[1].view(1, -1)).to(torch.float32)
        torch.add(plane[:, :, None], (a[2] + b).to(torch.float32)[None, None, :], out=grid[..., 2 - k])
    return grid[None]


def mirror(patch: np.ndarray, flips: tuple[bool, bool, bool]) -> np.ndarray:
    """Flip the spatial axes marked in `flips` (a view; copy when writing into a batch)."""
    axes = tuple(a + 1 for a in range(3) if flips[a])
    return np.flip(patch, axis=axes) if axes else patch


GAMMA_MIN_RANGE = 1e-6  # patches with a smaller intensity range are left as they are by gamma
STD_FLOOR = 1e-8  # guards the std restoration after gamma against a flattened patch


@dataclass(frozen=True)
class IntensityParams:
    """The photometric draw for one sample; None: that change is not applied."""

    brightness: float | None = None
    contrast: float | None = None
    gamma: float | None = None


def sample_intensity(rng: np.random.Generator, cfg: AugmentConfig) -> IntensityParams:
    """Draw brightness, contrast and gamma (in this order, one `random()` each and a value when
    applied): the draws `augment_intensity` has always made, so the stream is unchanged."""
    values = []
    for probability, value_range in ((cfg.brightness_probability, cfg.brightness_range),
                                     (cfg.contrast_probability, cfg.contrast_range),
                                     (cfg.gamma_probability, cfg.gamma_range)):
        values.append(float(rng.uniform(*value_range)) if rng.random() < probability else None)
    return IntensityParams(*values)


def apply_intensity(patch: np.ndarray, params: IntensityParams) -> None:
    """Light photometric changes, in place on a float32 (C, X, Y, Z) patch, same for all channels.
    `device_augment.apply_intensity_batch` is the batched torch twin; keep them in step."""
    if params.brightness is not None:
        patch *= np.float32(params.brightness)
    if params.contrast is not None:
        factor = np.float32(params.contrast)
        lo, hi, mean = patch.min(), patch.max(), patch.mean(dtype=np.float64)
        patch -= np.float32(mean)
        patch *= factor
        patch += np.float32(mean)
        np.clip(patch, lo, hi, out=patch)
    if params.gamma is not None:
        lo, hi = float(patch.min()), float(patch.max())
        if hi - lo > GAMMA_MIN_RANGE:  # a constant patch has no contrast to bend
            mean, std = patch.mean(dtype=np.float64), patch.std(dtype=np.float64)
            patch -= np.float32(lo)
            patch *= np.float32(1.0 / (hi - lo))
            np.power(patch, np.float32(params.gamma), out=patch)
            new_mean, new_std = patch.mean(dtype=np.float64), patch.std(dtype=np.float64)
            patch -= np.float32(new_mean)
            patch *= np.float32(std / max(new_std, STD_FLOOR))
            patch += np.float32(mean)


def augment_intensity(patch: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> None:
    """Draw (`sample_intensity`) and apply (`apply_intensity`) in place."""
    apply_intensity(patch, sample_intensity(rng, cfg))
