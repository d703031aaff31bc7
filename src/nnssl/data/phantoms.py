"""Synthetic anatomy-like phantoms: a ready-made BIDS dataset for demos, tests and probes.

Every phantom is a body (a slightly deformed elliptic trunk with a fat rim) in air, holding
organ-like nested ellipsoids, a bone-like rod and one "key organ". The anatomy is defined in
physical millimetres and then sampled on a voxel grid with a random anisotropic spacing and a
random axis permutation/flip in the direction matrix, so the same subject looks the same in
world space however it was "scanned" - which is what preprocessing (reorientation, resampling
to 1 mm) has to undo on real data.

The per-volume class label is carried by the SHAPE of the key organ (sphere, cuboid, rod or a
pair of spheres) at equal volume and equal intensity distribution, so global intensity
statistics do not reveal it but a spatially aware feature extractor can. That is what lets a
linear probe show that pretrained features beat random ones.

With `paired_organs=True` (`nnssl.data.paired_organs`) the phantoms also hold twin organs of
one tissue whose labels only context tells apart: the dense context task of evaluation.

`PhantomConfig.shape` is the voxel grid at 1 mm isotropic spacing: the field of view is fixed
at `shape` millimetres, and a volume sampled at another spacing gets `round(fov / spacing)`
voxels per axis. `write_phantom_collection` writes them as a BIDS tree (images, anatomy masks,
participants.tsv) with the label maps under derivatives/ and a cases.json for evaluation
(`nnssl.data.phantom_files.write_phantom_collection`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from nnssl.data.paired_organs import (
    PAIRED_LABELS,
    TWIN_LANDMARK_SIDE,
    TWIN_OTHER_SIDE,
    paired_layout,
)
from nnssl.errors import InvalidInput

MODALITIES = ("MR", "CT", "mixed")
MODALITY_SUFFIX = {"MR": "T1w", "CT": "ct"}  # BIDS suffix written into file names
KEY_ORGAN_SHAPES = ("sphere", "cuboid", "rod", "pair")  # class k -> KEY_ORGAN_SHAPES[k]
LABELS = {0: "background", 1: "body", 2: "key_organ", 3: "organ_a", 4: "organ_a_core", 5: "organ_b",
          6: "bone"}
MIN_SIDE = 16

# Mean tissue values per label: T1w-like arbitrary units (0..~1000) and Hounsfield units.
# Index 7 is the subcutaneous fat rim, which belongs to label 1 (body).
_FAT = 7
_TISSUE = {
    "MR": {0: 0.0, 1: 350.0, 2: 520.0, 3: 280.0, 4: 620.0, 5: 450.0, 6: 120.0, _FAT: 800.0},
    "CT": {0: -1000.0, 1: 40.0, 2: 70.0, 3: 55.0, 4: 110.0, 5: 25.0, 6: 700.0, _FAT: -100.0},
}


@dataclass(frozen=True)
class PhantomConfig:
    num_volumes: int = 20
    shape: tuple[int, int, int] = (64, 64, 64)  # voxels at 1 mm = field of view in mm (array order)
    modality: str = "mixed"  # "MR", "CT" or "mixed" (balanced per class)
    anisotropic: bool = True  # random spacing: in-plane 0.7-1.2 mm, one axis 2-4 mm
    random_orientation: bool = True  # random signed axis permutation as direction matrix
    anatomy_masks: bool = True  # write `<stem>_anatmask` next to each image
    num_classes: int = 2  # 1..4 key-organ shapes
    key_organ_scale: float = 1.0  # key-organ radius factor (1.0: 6-7 mm at 48^3; 1.5 makes the class easier to see)
    seed: int = 0
    # twin organs told apart only by context (nnssl.data.paired_organs); off keeps the default anatomy
    paired_organs: bool = False

    def __post_init__(self) -> None:
        # Plain ints (numpy or argparse values are accepted) so the config can go into JSON.
        if isinstance(self.shape, (list, tuple)) and all(is_int(s) for s in self.shape):
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        for name in ("num_volumes", "num_classes", "seed"):
            if is_int(getattr(self, name)):
                object.__setattr__(self, name, int(getattr(self, name)))
        if isinstance(self.key_organ_scale, (int, float, np.floating)) and not isinstance(self.key_organ_scale, bool):
            object.__setattr__(self, "key_organ_scale", float(self.key_organ_scale))
        self.validate()

    def validate(self) -> None:
        """Raise InvalidInput listing every bad value at once."""
        problems = []
        if not is_int(self.num_volumes) or self.num_volumes < 1:
            problems.append(f"num_volumes must be an integer >= 1, got {self.num_volumes!r}")
        if (not isinstance(self.shape, tuple) or len(self.shape) != 3
                or not all(is_int(s) and s >= MIN_SIDE for s in self.shape)):
            problems.append(f"shape must be 3 integers >= {MIN_SIDE}, got {self.shape!r}")
        if self.modality not in MODALITIES:
            problems.append(f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        if not is_int(self.num_classes) or not 1 <= self.num_classes <= len(KEY_ORGAN_SHAPES):
            problems.append(f"num_classes must be between 1 and {len(KEY_ORGAN_SHAPES)} (key organ "
                            f"shapes {', '.join(KEY_ORGAN_SHAPES)}), got {self.num_classes!r}")
        if not isinstance(self.key_organ_scale, (int, float)) or not 0.5 <= self.key_organ_scale <= 2.0:
            problems.append(f"key_organ_scale must be a number between 0.5 and 2.0, got {self.key_organ_scale!r}")
        if not is_int(self.seed) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("anisotropic", "random_orientation", "anatomy_masks", "paired_organs"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if problems:
            raise InvalidInput("invalid phantom configuration:", problems)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @property
    def labels(self) -> dict[int, str]:
        """The label-map values this configuration writes, with their names."""
        return {**LABELS, **PAIRED_LABELS} if self.paired_organs else dict(LABELS)


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class Phantom:
    index: int
    image: np.ndarray  # float32, array order (z, y, x)
    label_map: np.ndarray  # uint8, see LABELS
    anatomy_mask: np.ndarray  # uint8, 1 inside the body
    spacing: tuple[float, float, float]  # array order, mm
    direction: tuple[float, ...]  # ITK row-major 3x3
    origin: tuple[float, float, float]  # ITK order (x, y, z), mm
    class_label: int
    modality: str  # BIDS suffix: "T1w" (MR) or "ct" (CT)


def volume_assignment(index: int, config: PhantomConfig) -> tuple[int, str]:
    """(class label, "MR"/"CT") of volume `index`: balanced over the collection, shuffled by seed.

    A seeded permutation of the volume indices is dealt out round-robin, so classes are as
    balanced as `num_volumes` allows and, in "mixed" mode, each class gets both modalities.
    """
    if not 0 <= index < config.num_volumes:
        raise IndexError(f"phantom index {index} outside 0..{config.num_volumes - 1}")
    rank = int(np.random.default_rng([config.seed]).permutation(config.num_volumes)[index])
    class_label = rank % config.num_classes
    if config.modality == "mixed":
        kind = ("MR", "CT")[(rank // config.num_classes) % 2]
    else:
        kind = config.modality
    return class_label, kind


def landmark_side(index: int, config: PhantomConfig) -> float:
    """The landmark's side (+1 or -1 along x) of paired-organ volume `index`: dealt from the same
    seeded ranks as the classes, alternating within each class (and modality), so a collection
    holds both sides equally often and a twin's position says nothing about its label."""
    rank = int(np.random.default_rng([config.seed]).permutation(config.num_volumes)[index])
    period = config.num_classes * (2 if config.modality == "mixed" else 1)
    return (1.0, -1.0)[(rank // period) % 2]


# ------------------------------------------------------------------------------ geometry
@dataclass
class _Grid:
    shape: tuple[int, int, int]  # array order
    spacing: tuple[float, float, float]  # array order
    direction: np.ndarray  # 3x3, ITK
    origin: np.ndarray  # ITK order
    coords: list[np.ndarray]  # per PHYSICAL axis x, y, z: mm / scale, broadcastable in array order
    half_extent: np.ndarray  # per physical axis, in the same units


def _make_grid(rng: np.random.Generator, config: PhantomConfig) -> _Grid:
    fov = np.array(config.shape[::-1], dtype=np.float64)  # physical x, y, z extents (mm)
    if config.anisotropic:
        spacing_itk = np.full(3, rng.uniform(0.7, 1.2))
        spacing_itk[rng.integers(3)] = rng.uniform(2.0, 4.0)
    else:
        spacing_itk = np.ones(3)
    direction = np.eye(3)
    if config.random_orientation:
        perm = rng.permutation(3)  # ITK index axis a runs along physical axis perm[a]
        signs = rng.choice([-1.0, 1.0], size=3)
        direction = np.zeros((3, 3))
        direction[perm, np.arange(3)] = signs
    physical_axis = np.argmax(np.abs(direction), axis=0)  # per ITK axis
    size_itk = np.maximum(4, np.round(fov[physical_axis] / spacing_itk)).astype(int)
    # Centre the field of view on the physical origin so anatomy sits at the same place.
    origin = -(direction @ (spacing_itk * (size_itk - 1) / 2.0))
    scale = fov.min() / 2.0  # one unit = half the smallest FOV side: spheres stay spheres
    coords: list[np.ndarray] = [np.empty(0)] * 3
    for a in range(3):
        p = physical_axis[a]
        mm = origin[p] + direction[p, a] * spacing_itk[a] * np.arange(size_itk[a])
        view = [1, 1, 1]
        view[2 - a] = size_itk[a]  # ITK axis a is array axis 2 - a
        coords[p] = (mm / scale).astype(np.float32).reshape(view)
    return _Grid(shape=tuple(int(s) for s in size_itk[::-1]), spacing=tuple(float(s) for s in spacing_itk[::-1]),
                 direction=direction, origin=origin, coords=coords, half_extent=fov / 2.0 / scale)


def _level(coords: list[np.ndarray], center, axes, power: float = 2.0) -> np.ndarray:
    """Superellipsoid level: < 1 inside. power 2 is an ellipsoid, large powers tend to a box."""
    total = None
    for u, c, a in zip(coords, center, axes):
        term = np.abs((u - np.float32(c)) / np.float32(a)) ** power
        total = term if total is None else total + term
    return total


def _key_organ(coords: list[np.ndarray], shape: str, center: np.ndarray, radius: float,
               rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the class-defining organ; every shape has the volume of the sphere."""
    if shape == "sphere":
        return _level(coords, center, (radius,) * 3) < 1
    if shape == "cuboid":
        power = 8.0
        unit_volume = 8 * math.gamma(1 + 1 / power) ** 3 / math.gamma(1 + 3 / power)
        half = radius * (4 / 3 * math.pi / unit_volume) ** (1 / 3)
        return _level(coords, center, (half,) * 3, power) < 1
    if shape == "rod":
        # Aspect 3 along the body axis (z); a*b*c = r^3 keeps the volume.
        return _level(coords, center, (radius * 3 ** (-1 / 3),) * 2 + (radius * 3 ** (2 / 3),)) < 1
    if shape == "pair":
        small = radius / 2 ** (1 / 3)
        offset = np.zeros(3)
        offset[rng.integers(3)] = 1.25 * small
        return (_level(coords, center + offset, (small,) * 3) < 1) | (_level(coords, center - offset, (small,) * 3) < 1)
    raise ValueError(shape)


def _plane_waves(coords: list[np.ndarray], rng: np.random.Generator, count: int, k_range) -> np.ndarray:
    """Smooth random texture in physical space (sum of cosines), so it survives any resampling."""
    total = None
    for _ in range(count):
        k = rng.normal(size=3)
        k *= rng.uniform(*k_range) / np.linalg.norm(k)
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        arg = coords[0] * np.float32(k[0]) + coords[1] * np.float32(k[1]) + coords[2] * np.float32(k[2])
        wave = np.cos(arg + phase)
        total = wave if total is None else total + wave
    return total / np.float32(math.sqrt(count))


# ------------------------------------------------------------------------------ phantoms
def make_phantom(index: int, config: PhantomConfig) -> Phantom:
    """Generate volume `index` of the collection; deterministic in (config.seed, index)."""
    class_label, kind = volume_assignment(index, config)
    # Separate streams: the same subject gets the same anatomy whatever spacing/orientation it is
    # "scanned" with, so isotropic and anisotropic versions can be compared in world space.
    grid = _make_grid(np.random.default_rng([config.seed, 1, index]), config)
    rng = np.random.default_rng([config.seed, 2, index])
    u = grid.coords
    h = grid.half_extent

    # Body: elliptic trunk through the whole z range, boundary wobbled by low-frequency terms.
    body_axes = (h[0] * rng.uniform(0.85, 0.95), h[1] * rng.uniform(0.68, 0.78), h[2] * 1.3)
    wobble = (np.float32(rng.uniform(0.03, 0.06)) * np.sin(u[0] * np.float32(2.5) + np.float32(rng.uniform(0, 6.3)))
              * np.cos(u[2] * np.float32(2.0) + np.float32(rng.uniform(0, 6.3)))
              + np.float32(rng.uniform(0.02, 0.04)) * np.sin(u[1] * np.float32(3.0) + np.float32(rng.uniform(0, 6.3))))
    body_level = np.sqrt(_level(u, (0, 0, 0), body_axes)) - (1 + wobble)
    body = body_level < 0
    labels = body.astype(np.uint8)
    values = dict(_TISSUE[kind])
    for key in values:  # per-volume tissue jitter so global statistics vary for every class
        if key != 0:
            values[key] = values[key] * rng.uniform(0.9, 1.1) if kind == "MR" else values[key] + rng.normal(0, 8)
    tissue = np.where(body, np.float32(values[1]), np.float32(values[0])).astype(np.float32)
    tissue[body & (body_level > -rng.uniform(0.06, 0.1))] = values[_FAT]

    side = rng.choice([-1.0, 1.0])
    # Every draw below happens in this order whatever the options, so the same subject keeps its
    # anatomy, texture and noise with and without paired organs (they have a stream of their own).
    organ_a_center = np.array([side * rng.uniform(0.45, 0.55), rng.uniform(-0.1, 0.1), rng.uniform(-0.3, 0.3)])
    organ_a_axes = np.array([0.24, 0.32, 0.38]) * rng.uniform(0.85, 1.15, size=3)
    organ_b_center = np.array([-side * rng.uniform(0.4, 0.5), rng.uniform(0.2, 0.3), rng.uniform(-0.4, 0.4)])
    core_offset = rng.uniform(-0.05, 0.05, 3)
    core_scale = rng.uniform(0.35, 0.5)
    organ_b_axes = np.array([0.12, 0.12, 0.2]) * rng.uniform(0.85, 1.15, 3)
    bone_center = (rng.uniform(-0.05, 0.05), rng.uniform(0.44, 0.5))
    key_center = np.array([rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.08), rng.uniform(-0.2, 0.2)])
    key_shape = KEY_ORGAN_SHAPES[class_label]
    radius = rng.uniform(0.24, 0.3) * config.key_organ_scale  # drawn before scaling: same stream at any scale
    paired = None
    if config.paired_organs:
        side = landmark_side(index, config)
        paired = paired_layout(np.random.default_rng([config.seed, 4, index]), side, kind)
    if paired is not None:
        organ_a_center, organ_a_axes = paired.organ_a_center, paired.organ_a_axes
        organ_b_center, organ_b_axes = paired.organ_b_center, paired.organ_b_axes
        key_center = paired.key_center
    # (label, mask, tissue value), painted in order
    structures = [
        (3, _level(u, organ_a_center, organ_a_axes) < 1, values[3]),
        (4, _level(u, organ_a_center + core_offset, organ_a_axes * core_scale) < 1, values[4]),
        (5, _level(u, organ_b_center, organ_b_axes) < 1, values[5]),
        (6, _level(u[:2], bone_center, (0.1, 0.09)) < 1, values[6]),
    ]
    if paired is not None:
        structures += [
            (TWIN_LANDMARK_SIDE, _level(u, paired.twin_landmark_side_center, paired.twin_axes) < 1,
             paired.twin_value),
            (TWIN_OTHER_SIDE, _level(u, paired.twin_other_side_center, paired.twin_axes) < 1, paired.twin_value),
        ]
    # Painted last so its shape, the class signal, is never cut by another organ.
    structures.append((2, _key_organ(u, key_shape, key_center, radius, rng), values[2]))
    for label, mask, value in structures:
        mask = np.broadcast_to(mask, grid.shape) & body
        labels[mask] = label
        tissue[mask] = value

    texture_amplitude = 25.0 if kind == "MR" else 12.0
    texture = _plane_waves(u, rng, 4, (3.0, 8.0)) * np.float32(texture_amplitude * rng.uniform(0.7, 1.3))
    image = tissue + np.where(body, texture, np.float32(0))
    # Partial-volume blur proportional to the voxel size, as a scanner's point spread function.
    image = ndimage.gaussian_filter(image, sigma=0.5, mode="nearest")
    if kind == "MR":
        bias = 1 + np.float32(0.15) * _plane_waves(u, rng, 2, (0.5, 1.5))
        sigma = np.float32(rng.uniform(8, 20))
        real = image * bias + sigma * rng.standard_normal(grid.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(grid.shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)  # magnitude image: Rician noise
    else:
        image = image + np.float32(rng.uniform(10, 25)) * rng.standard_normal(grid.shape, dtype=np.float32)
        np.maximum(image, np.float32(-1024), out=image)
    return Phantom(
        index=index,
        image=np.ascontiguousarray(image, dtype=np.float32),
        label_map=labels,
        anatomy_mask=(labels > 0).astype(np.uint8),
        spacing=grid.spacing,
        direction=tuple(float(v) for v in grid.direction.ravel()),
        origin=tuple(float(v) for v in grid.origin),
        class_label=class_label,
        modality=MODALITY_SUFFIX[kind],
    )

