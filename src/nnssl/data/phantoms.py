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

`PhantomConfig.shape` is the voxel grid at 1 mm isotropic spacing: the field of view is fixed
at `shape` millimetres, and a volume sampled at another spacing gets `round(fov / spacing)`
voxels per axis. `write_phantom_collection` writes them as a BIDS tree (images, anatomy masks,
participants.tsv) with the label maps under derivatives/ and a cases.json for evaluation.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from nnssl.data.paired_organs import CONTEXT_LABELS, PAIRED_LABELS, TWIN_LANDMARK_SIDE, TWIN_OTHER_SIDE, paired_layout
from nnssl.errors import InvalidInput, NnsslError
from nnssl.io_utils import atomic_path, read_json, write_json
from nnssl.log import get_logger

logger = get_logger(__name__)

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
        if isinstance(self.shape, (list, tuple)) and all(_is_int(s) for s in self.shape):
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        for name in ("num_volumes", "num_classes", "seed"):
            if _is_int(getattr(self, name)):
                object.__setattr__(self, name, int(getattr(self, name)))
        if isinstance(self.key_organ_scale, (int, float, np.floating)) and not isinstance(self.key_organ_scale, bool):
            object.__setattr__(self, "key_organ_scale", float(self.key_organ_scale))
        self.validate()

    def validate(self) -> None:
        """Raise InvalidInput listing every bad value at once."""
        problems = []
        if not _is_int(self.num_volumes) or self.num_volumes < 1:
            problems.append(f"num_volumes must be an integer >= 1, got {self.num_volumes!r}")
        if (not isinstance(self.shape, tuple) or len(self.shape) != 3
                or not all(_is_int(s) and s >= MIN_SIDE for s in self.shape)):
            problems.append(f"shape must be 3 integers >= {MIN_SIDE}, got {self.shape!r}")
        if self.modality not in MODALITIES:
            problems.append(f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        if not _is_int(self.num_classes) or not 1 <= self.num_classes <= len(KEY_ORGAN_SHAPES):
            problems.append(f"num_classes must be between 1 and {len(KEY_ORGAN_SHAPES)} (key organ "
                            f"shapes {', '.join(KEY_ORGAN_SHAPES)}), got {self.num_classes!r}")
        if not isinstance(self.key_organ_scale, (int, float)) or not 0.5 <= self.key_organ_scale <= 2.0:
            problems.append(f"key_organ_scale must be a number between 0.5 and 2.0, got {self.key_organ_scale!r}")
        if not _is_int(self.seed) or self.seed < 0:
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


def _is_int(value: Any) -> bool:
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


# ------------------------------------------------------------------------------ writing
GENERATOR_NAME = "nnssl_generate_phantoms"  # marks a folder as ours, so a re-run may replace it
SESSION_ID = "ses-01"
_OUR_FILE = re.compile(r"^sub-\d+_ses-01_(T1w|ct|T1w_anatmask|ct_anatmask|dseg)\.nii\.gz$")


@dataclass(frozen=True)
class PhantomCase:
    case_id: str  # "sub-001", also the BIDS subject id
    session_id: str
    image: Path
    anatomy_mask: Path | None
    label_map: Path
    class_label: int
    modality: str  # "T1w" or "ct"


@dataclass
class PhantomManifest:
    out_dir: Path
    config: PhantomConfig
    cases: list[PhantomCase]
    cases_json: Path
    participants_tsv: Path
    dataset_description: Path

    def class_labels(self) -> list[int]:
        return [case.class_label for case in self.cases]


def _case_files(out_dir: Path, index: int, config: PhantomConfig) -> PhantomCase:
    _, kind = volume_assignment(index, config)
    suffix = MODALITY_SUFFIX[kind]
    subject = f"sub-{index + 1:0{max(3, len(str(config.num_volumes)))}d}"
    datatype = "anat" if kind == "MR" else "ct"
    stem = f"{subject}_{SESSION_ID}_{suffix}"
    folder = out_dir / subject / SESSION_ID / datatype
    return PhantomCase(
        case_id=subject, session_id=SESSION_ID, image=folder / f"{stem}.nii.gz",
        anatomy_mask=folder / f"{stem}_anatmask.nii.gz" if config.anatomy_masks else None,
        # Outside the raw folders so dataset builders never take a label map for an image.
        label_map=out_dir / "derivatives" / "labels" / subject / SESSION_ID / datatype
        / f"{subject}_{SESSION_ID}_dseg.nii.gz",
        class_label=volume_assignment(index, config)[0], modality=suffix)


def _write_case(out_dir: Path, index: int, config: PhantomConfig) -> PhantomCase:
    from nnssl.data.imageio import write_image

    case = _case_files(out_dir, index, config)
    phantom = make_phantom(index, config)
    geometry = {"spacing": phantom.spacing, "origin": phantom.origin, "direction": phantom.direction}
    write_image(case.image, phantom.image, **geometry)
    if case.anatomy_mask is not None:
        write_image(case.anatomy_mask, phantom.anatomy_mask, **geometry)
    write_image(case.label_map, phantom.label_map, **geometry)
    return case


def _clear_previous(out_dir: Path) -> None:
    """Accept an empty folder or one we wrote before; remove the old phantom files in the latter.

    Stale volumes of a previous, larger run would otherwise be picked up as images by
    nnssl_create_dataset. Our dataset_description.json is written before any volume, so a
    crashed run is recognised too; only files named like ours are deleted.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NnsslError(f"{out_dir} exists and is not a folder; choose another output folder.")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    try:
        generated_by = read_json(out_dir / "dataset_description.json")["GeneratedBy"][0]["Name"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        generated_by = None
    if generated_by != GENERATOR_NAME:
        raise NnsslError(f"{out_dir} is not empty and holds no phantom collection written by "
                         f"{GENERATOR_NAME}; choose an empty or new output folder.")
    (out_dir / "cases.json").unlink(missing_ok=True)  # describes the old volumes; rewritten at the end
    labels = out_dir / "derivatives" / "labels"
    for path in [*out_dir.glob("sub-*/*/*/*.nii.gz"), *labels.glob("sub-*/*/*/*.nii.gz")]:
        if _OUR_FILE.match(path.name):
            path.unlink()
    for subject in [*out_dir.glob("sub-*"), *labels.glob("sub-*")]:
        for folder, _, _ in sorted(os.walk(subject), key=lambda entry: -len(entry[0])):
            if not any(Path(folder).iterdir()):
                Path(folder).rmdir()


def _write_tsv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_path(path) as tmp:
        lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_phantom_collection(out_dir: Path, config: PhantomConfig, num_processes: int = 1) -> PhantomManifest:
    """Write `config.num_volumes` phantoms as a BIDS tree under `out_dir` (see module docstring)."""
    if not _is_int(num_processes) or num_processes < 1:
        raise NnsslError(f"num_processes must be an integer >= 1, got {num_processes!r}")
    out_dir = Path(out_dir).absolute()
    generated_by = [{"Name": GENERATOR_NAME, "Description": "nnssl synthetic anatomy-like phantoms"}]
    description = {"Name": "nnssl phantoms", "BIDSVersion": "1.9.0", "DatasetType": "raw",
                   "GeneratedBy": generated_by, "nnssl_phantom_config": config.to_dict()}
    _clear_previous(out_dir)
    write_json(out_dir / "dataset_description.json", description)
    indices = range(config.num_volumes)
    if num_processes == 1:
        cases = [_write_case(out_dir, i, config) for i in indices]
    else:
        # fork starts workers instantly; nothing in the parent holds threads or locks yet.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(num_processes, mp_context=get_context(method)) as pool:
            cases = list(pool.map(_write_case, [out_dir] * len(indices), indices, [config] * len(indices),
                                  chunksize=max(1, len(indices) // (4 * num_processes))))

    def rel(path: Path | None) -> str | None:
        return None if path is None else path.relative_to(out_dir).as_posix()

    participants = out_dir / "participants.tsv"
    rows = []
    for case in cases:
        rng = np.random.default_rng([config.seed, 3, int(case.case_id[4:])])
        rows.append([case.case_id, case.class_label, int(rng.integers(20, 81)), ("F", "M")[int(rng.integers(2))]])
    _write_tsv(participants, ["participant_id", "class_label", "age", "sex"], rows)
    labels_dir = out_dir / "derivatives" / "labels"
    write_json(labels_dir / "dataset_description.json",
               {"Name": "nnssl phantom label maps", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                "GeneratedBy": generated_by})
    _write_tsv(labels_dir / "dseg.tsv", ["index", "name"], [[k, v] for k, v in config.labels.items()])
    cases_json = out_dir / "cases.json"
    content: dict[str, Any] = {
        "num_classes": config.num_classes,
        "class_names": list(KEY_ORGAN_SHAPES[: config.num_classes]),
        "labels": {str(k): v for k, v in config.labels.items()},
    }
    if config.paired_organs:  # the labels the dense context probe classifies (documentation/evaluation.md)
        content["context_labels"] = list(CONTEXT_LABELS)
    content["cases"] = [{"case_id": c.case_id, "image": rel(c.image), "anatomy_mask": rel(c.anatomy_mask),
                         "label_map": rel(c.label_map), "class_label": c.class_label, "modality": c.modality}
                        for c in cases]
    if config.paired_organs:  # splits stratified by class and landmark side: no position bias to learn
        for entry in content["cases"]:
            side = landmark_side(int(entry["case_id"][4:]) - 1, config)
            entry["stratum"] = entry["class_label"] + config.num_classes * (side < 0)
    write_json(cases_json, content)
    logger.debug("wrote %d phantoms to %s", len(cases), out_dir)
    return PhantomManifest(out_dir=out_dir, config=config, cases=cases, cases_json=cases_json,
                           participants_tsv=participants, dataset_description=out_dir / "dataset_description.json")
