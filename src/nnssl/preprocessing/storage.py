"""blosc2 storage of preprocessed cases: chunking for patch reads, atomic writes, JSON properties.

Each case is `<stem>.b2nd` (float32 image, shape (C, X, Y, Z)), optional uint8 masks
`<stem>__anon.b2nd` / `<stem>__anat.b2nd`, and `<stem>.json` with its properties. The JSON is
written last and records the plan hash and the arrays it vouches for, so a case is complete
exactly when its JSON exists and agrees with the arrays: a killed run never looks complete.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blosc2
import numpy as np

from nnssl.errors import NnsslError
from nnssl.io_utils import read_json, write_json

IMAGE_SUFFIX = ".b2nd"
ANON_SUFFIX = "__anon.b2nd"
ANAT_SUFFIX = "__anat.b2nd"
PROPERTIES_SUFFIX = ".json"

# Block budget: a block is blosc2's unit of decompression, so it should fit the L2 cache of one
# core (~256-512 kB) and be cubic so a random patch touches few wasted voxels on any axis.
BLOCK_BYTES = 256 * 1024
# Chunk budget: the unit of I/O; a few MB keeps metadata small while a 160³ patch (16 MB float32)
# spans a handful of chunks.
CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class CaseFiles:
    stem: Path
    image: Path
    anonymization_mask: Path
    anatomy_mask: Path
    properties: Path

    @classmethod
    def for_stem(cls, stem: Path) -> "CaseFiles":
        stem = Path(stem)
        return cls(stem, stem.with_name(stem.name + IMAGE_SUFFIX),
                   stem.with_name(stem.name + ANON_SUFFIX), stem.with_name(stem.name + ANAT_SUFFIX),
                   stem.with_name(stem.name + PROPERTIES_SUFFIX))


def _cube(spatial: tuple[int, ...], voxels: int) -> tuple[int, ...]:
    """Largest near-cubic box of at most `voxels` voxels that fits in `spatial`."""
    side = max(1, int(round(voxels ** (1 / 3))))
    box = [min(side, s) for s in spatial]
    # give the budget freed by short axes to the others
    for _ in range(3):
        free = voxels / max(1, math.prod(box))
        if free < 1.5:
            break
        grow = [i for i, s in enumerate(spatial) if box[i] < s]
        if not grow:
            break
        factor = free ** (1 / len(grow))
        for i in grow:
            box[i] = min(spatial[i], max(box[i], int(box[i] * factor)))
    return tuple(box)


def blosc2_chunks_and_blocks(shape: tuple[int, ...], itemsize: int,
                             patch_size: tuple[int, int, int] = (160, 160, 160)
                             ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunk and block shapes for an array (C, X, Y, Z) read by random 3D patches."""
    channels, spatial = (shape[0], tuple(shape[1:])) if len(shape) == 4 else (None, tuple(shape))
    block = _cube(spatial, max(1, BLOCK_BYTES // itemsize))
    # chunks: whole blocks, about a patch's worth of bytes but within the budget
    chunk_vox = max(math.prod(block), CHUNK_BYTES // itemsize)
    chunk = _cube(spatial, min(chunk_vox, math.prod(patch_size)))
    chunk = tuple(min(s, max(b, (c // b) * b)) for c, b, s in zip(chunk, block, spatial))
    if channels is None:
        return chunk, block
    return (1, *chunk), (1, *block)


def save_array(path: Path, array: np.ndarray, patch_size: tuple[int, int, int] = (160, 160, 160),
               clevel: int = 3) -> None:
    """Write `array` as blosc2 atomically (temporary name, then rename)."""
    path = Path(path)
    if path.name.endswith((ANON_SUFFIX, ANAT_SUFFIX)) and array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise NnsslError(f"{path}: mask values must be integers 0..255")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise NnsslError(f"{path}: mask values must be in 0..255 (found {array.min()}..{array.max()}); "
                             "they would wrap around in uint8")
        array = array.astype(np.uint8)
    chunks, blocks = blosc2_chunks_and_blocks(array.shape, array.dtype.itemsize, patch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.b2nd")
    try:
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(tmp), mode="w", chunks=chunks,
                       blocks=blocks, cparams={"codec": blosc2.Codec.ZSTD, "clevel": clevel,
                                               "filters": [blosc2.Filter.SHUFFLE]})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def open_array(path: Path) -> Any:
    """Open read-only and memory-mapped: cheap per sample, decompresses nothing yet."""
    return blosc2.open(str(path), mode="r", mmap_mode="r")


def read_region(array: Any, slices: tuple[slice, ...]) -> np.ndarray:
    """Decompress only the chunks/blocks that `slices` touches."""
    return array[slices]


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"property {where} has type {type(value).__name__}; only plain JSON types are stored")


def save_properties(path: Path, properties: dict[str, Any]) -> None:
    write_json(path, _plain(properties, "properties"))


def load_properties(path: Path) -> dict[str, Any]:
    return read_json(path)


def case_is_complete(files: CaseFiles, expected_plan_hash: str) -> bool:
    """True when the properties JSON exists, matches the plan and every array it lists opens."""
    if not files.properties.is_file():
        return False
    try:
        props = load_properties(files.properties)
        if props.get("plan_hash") != expected_plan_hash:
            return False
        for key, path in (("image", files.image), ("anonymization_mask", files.anonymization_mask),
                          ("anatomy_mask", files.anatomy_mask)):
            expected = props.get("arrays", {}).get(key)
            if expected is None:
                continue
            if list(open_array(path).shape) != list(expected["shape"]):
                return False
        return "image" in props.get("arrays", {})
    except Exception:  # any unreadable piece means "redo this case", never "trust it"
        return False
