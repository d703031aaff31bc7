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

# Blocks are blosc2's unit of decompression: a random patch decompresses every block it touches,
# so what it wastes (the blocks cut by its faces) depends on the block side in voxels, whatever
# the dtype. Hence a budget in voxels (40³, cubic), capped in bytes to fit one core's L2 cache
# (float64 gets 32³). Against nnU-Net 2.8's rule (16³ blocks for float32, 16x32x32 for uint8,
# chunks ~80x64x64 / 80x128x128), random 160³ patch reads of a 221x220x220 case took 0.8-0.86x
# the time for the float32 image (writes 0.65x) and the same for the uint8 mask (reads 1.0x,
# writes 0.85x) (benchmarks/preprocessing.py, `chunking_160_patches`, medians of 5 interleaved
# rounds; 24³ and 32³ blocks were no faster). Sizing blocks by bytes alone had given masks 64³
# blocks and 1.4x slower patch reads than nnU-Net's.
BLOCK_VOXELS = 40 ** 3
BLOCK_BYTES = 256 * 1024
# Chunks are the unit of I/O and carry a fixed cost per write call, so they are sized in bytes:
# about 2 MB of whole blocks, 80³ for float32 and 120³ for uint8. For masks, 120³ chunks wrote in
# 0.41x the time of 80³ ones (nnU-Net's 80x128x128: 0.59x) with the same 160³ read time (median
# of 20 writes of 4 masks); the whole volume as one chunk wrote faster still but read 2.3x slower.
CHUNK_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class CaseFiles:
    stem: Path
    image: Path
    anonymization_mask: Path
    anatomy_mask: Path
    properties: Path

    @classmethod
    def for_stem(cls, stem: Path) -> CaseFiles:
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
    block = _cube(spatial, max(1, min(BLOCK_VOXELS, BLOCK_BYTES // itemsize)))
    chunk_vox = max(math.prod(block), CHUNK_BYTES // itemsize)
    chunk = _cube(spatial, min(chunk_vox, math.prod(patch_size)))  # no bigger than one patch
    # whole blocks, except that a chunk spanning an axis keeps the whole axis
    chunk = tuple(s if c >= s else min(s, max(b, (c // b) * b)) for c, b, s in zip(chunk, block, spatial))
    if channels is None:
        return chunk, block
    return (1, *chunk), (1, *block)


# Codec, measured on a preprocessed 221x220x220 float32 MR phantom, one thread (median of 3):
# ZSTD clevel 1 + SHUFFLE wrote in 0.08 s with ratio 1.43 and read a random 160³ patch in 13 ms;
# clevel 3 (used before) took 0.35 s for the same ratio, clevel 8 (nnU-Net's) 2.6 s for the
# same ratio; LZ4 wrote in 0.06 s and read in 8 ms but stored 14% more (ratio 1.25); BITSHUFFLE
# was bigger and slower to read than SHUFFLE. Float data gains nothing from a higher clevel.
# uint8 masks take no filter (byte-shuffling one-byte items has nothing to regroup), and without
# it a 160³ mask patch read in 1.8 ms instead of 10.5 ms, at the same size (74 kB) and write time.
CODEC = blosc2.Codec.ZSTD
CLEVEL = 1


def filters_for(itemsize: int) -> list:
    """Byte shuffle for multi-byte items (float images), nothing for uint8 masks (see above)."""
    return [blosc2.Filter.SHUFFLE] if itemsize > 1 else [blosc2.Filter.NOFILTER]


def save_array(path: Path, array: np.ndarray, patch_size: tuple[int, int, int] = (160, 160, 160),
               clevel: int = CLEVEL, layout: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> None:
    """Write `array` as blosc2 atomically (temporary name, then rename).

    `layout` (chunks, blocks) overrides `blosc2_chunks_and_blocks`, e.g. to compare layouts.
    """
    path = Path(path)
    if path.name.endswith((ANON_SUFFIX, ANAT_SUFFIX)) and array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise NnsslError(f"{path}: mask values must be integers 0..255")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise NnsslError(f"{path}: mask values must be in 0..255 (found {array.min()}..{array.max()}); "
                             "they would wrap around in uint8")
        array = array.astype(np.uint8)
    chunks, blocks = layout or blosc2_chunks_and_blocks(array.shape, array.dtype.itemsize, patch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.b2nd")
    try:
        # empty + one assignment lets blosc2 cut the chunks in C; `asarray` copies each chunk
        # through numpy first and took 1.2x as long (median of 9, same file byte for byte)
        cparams = {"codec": CODEC, "clevel": clevel, "filters": filters_for(array.dtype.itemsize)}
        stored = blosc2.empty(array.shape, array.dtype, urlpath=str(tmp), mode="w", chunks=chunks,
                              blocks=blocks, cparams=cparams)
        stored[...] = np.ascontiguousarray(array)
        del stored  # flushed and closed before the rename
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


def complete_arrays(files: CaseFiles, expected_plan_hash: str) -> frozenset[str] | None:
    """The arrays of a complete case ("image" and the masks it has), or None when the case is not
    complete: its properties JSON is missing, unreadable or from another plan, or an array it
    lists is missing or does not open with the recorded shape. Masks are taken from the JSON, so a
    stale mask file left from earlier data is never listed."""
    if not files.properties.is_file():
        return None
    try:
        props = load_properties(files.properties)
        if props.get("plan_hash") != expected_plan_hash:
            return None
        listed = props.get("arrays", {})
        for key, path in (("image", files.image), ("anonymization_mask", files.anonymization_mask),
                          ("anatomy_mask", files.anatomy_mask)):
            expected = listed.get(key)
            if expected is None:
                continue
            if list(open_array(path).shape) != list(expected["shape"]):
                return None
        return frozenset(listed) if "image" in listed else None
    except Exception:  # any unreadable piece means "redo this case", never "trust it"
        return None


def case_is_complete(files: CaseFiles, expected_plan_hash: str) -> bool:
    """True when the properties JSON exists, matches the plan and every array it lists opens."""
    return complete_arrays(files, expected_plan_hash) is not None
