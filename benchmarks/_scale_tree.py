"""The synthetic collections of `benchmarks/scale.py`: an OpenMind-shaped tree of tiny volumes and
collections of 1k ... 100k images over it.

The tree is the one of `benchmarks/openmind_conversion.py` (datasets of 20 subjects, half with
sessions, T1w with a defacing and an (inverted, as OpenMind's) anatomy mask, T2w/FLAIR, DWI with
derived FA/MD maps), its files written as real gzipped NIfTI volumes of about 16³ voxels (2-4 kB on
disk) instead of empty ones, so every stage reads real headers and voxels. A handful of volumes
are encoded once and their bytes reused: what grows with the number of cases is the number of
files, JSON entries and Python objects, which is what the benchmark measures.

The smaller collections take the first N images of the big one; the 2x collection lists every
image twice under renamed dataset keys (`ds000001_r1`), which gives distinct image ids over the
same files. Their preprocessed folders are symbolic links to the big collection's, so after one
preprocessing run every size is complete on disk and the merge, `load_cases` and the loader see a
fully preprocessed dataset of their size.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

# (shape, spacing): tiny volumes, 1 mm so `onemmiso` keeps them tiny
VARIANTS = (((16, 16, 16), (1.0, 1.0, 1.0)), ((14, 16, 12), (1.0, 1.0, 1.0)), ((16, 14, 16), (1.0, 1.0, 1.2)))
REPEAT_SUFFIX = "_r"


def _nifti_bytes(data: np.ndarray, spacing: tuple[float, float, float]) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    image.header.set_zooms(spacing)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _templates() -> dict[tuple[int, str], bytes]:
    """(variant, kind) -> the gzipped file: an ellipsoid image, its anatomy mask in OpenMind's
    inverted convention (1 outside the anatomy) and a defacing mask (a corner)."""
    out = {}
    for v, (shape, spacing) in enumerate(VARIANTS):
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        inside = (grid ** 2).sum(0) < 0.7
        image = np.where(inside, 400 + 300 * grid[0] + 50 * v, 0).astype(np.int16)
        deface = np.zeros(shape, np.uint8)
        deface[: shape[0] // 4, : shape[1] // 4] = 1
        out[(v, "image")] = _nifti_bytes(image, spacing)
        out[(v, "anatomy_mask")] = _nifti_bytes((~inside).astype(np.uint8), spacing)
        out[(v, "anonymization_mask")] = _nifti_bytes(deface, spacing)
    return out


def write_tree(root: Path, num_rows: int) -> dict[str, Any]:
    """OpenMind's download layout with `num_rows` images (and their masks) under `root`."""
    from openmind_conversion import write_openmind_tree  # benchmarks/ is on sys.path (scale.py)

    templates = _templates()
    counts = {"files": 0, "bytes": 0}

    def write_file(path: Path, row: dict, kind: str) -> None:
        variant = zlib.crc32(row["image_path"].encode()) % len(VARIANTS)  # an image and its masks agree
        data = templates[(variant, kind)]
        path.write_bytes(data)
        counts["files"] += 1
        counts["bytes"] += len(data)

    write_openmind_tree(root, num_rows, write_file=write_file)
    return counts


def resized(data: dict[str, Any], size: int) -> dict[str, Any]:
    """A pretrain_data.json dict with `size` images: the first `size` images of `data` (in file
    order), or, when `size` is larger, `data`'s images repeated under renamed dataset keys."""
    total = sum(len(ses["images"]) for ds in data["datasets"].values() for sub in ds["subjects"].values()
                for ses in sub["sessions"].values())
    out = {k: v for k, v in data.items() if k != "datasets"}
    out["datasets"] = {}
    left = size
    for repeat in range(-(-size // total)):
        for key, dataset in data["datasets"].items():
            if left == 0:
                return out
            new_key = key if repeat == 0 else f"{key}{REPEAT_SUFFIX}{repeat}"
            copied = dict(dataset, dataset_index=new_key, subjects={})
            for sub_key, subject in dataset["subjects"].items():
                if left == 0:
                    break
                sessions = {}
                for ses_key, session in subject["sessions"].items():
                    if left == 0:
                        break
                    images = copy.deepcopy(session["images"][:left])
                    left -= len(images)
                    sessions[ses_key] = dict(session, images=images)
                copied["subjects"][sub_key] = dict(subject, sessions=sessions)
            out["datasets"][new_key] = copied
    return out


def write_resized(source: Path, target: Path, size: int, collection_name: str, index: int) -> int:
    """Write `resized(source, size)` as `target` (a pretrain_data.json); returns its image count."""
    from nnssl.io_utils import write_json

    data = resized(json.loads(source.read_text()), size)
    data["collection_name"], data["collection_index"] = collection_name, index
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, data)  # the writer (and indentation) of the source
    return sum(len(ses["images"]) for ds in data["datasets"].values() for sub in ds["subjects"].values()
               for ses in sub["sessions"].values())


def link_preprocessed(source_root: Path, target_root: Path, collection: Path) -> int:
    """Link every dataset folder that `collection` (a raw pretrain_data.json of the target)
    lists to the source's preprocessed folder of the same dataset (repeat suffix removed);
    returns the number of links."""
    data = json.loads(collection.read_text())
    target_root.mkdir(parents=True, exist_ok=True)
    made = 0
    for key in data["datasets"]:
        original = key.split(REPEAT_SUFFIX)[0]
        link = target_root / key
        if not link.exists():
            os.symlink(source_root / original, link, target_is_directory=True)
            made += 1
    return made


def disk_usage_mb(path: Path) -> float:
    """Allocated size of the files under `path` (what `du` counts; links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return round(total / 1e6, 1)
