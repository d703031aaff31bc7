"""blosc2 case storage: chunking, exact region reads, atomic writes, completeness."""

from __future__ import annotations

import blosc2
import numpy as np
import pytest

from nnssl.errors import NnsslError
from nnssl.preprocessing import storage


@pytest.mark.parametrize("shape", [(1, 200, 240, 160), (1, 20, 30, 40), (1, 1, 5, 300), (2, 64, 64, 64)])
def test_chunks_and_blocks_are_sane(shape):
    chunks, blocks = storage.blosc2_chunks_and_blocks(shape, 4)
    assert len(chunks) == len(blocks) == 4 and chunks[0] == blocks[0] == 1
    for s, c, b in zip(shape[1:], chunks[1:], blocks[1:]):
        assert 1 <= b <= c <= s
        assert c % b == 0 or c == s  # chunks hold whole blocks
    assert np.prod(blocks) * 4 <= storage.BLOCK_BYTES * 1.01


def test_large_volume_blocks_are_cubic_and_small():
    chunks, blocks = storage.blosc2_chunks_and_blocks((1, 400, 400, 400), 4)
    assert len(set(blocks[1:])) == 1 and np.prod(blocks) * 4 <= storage.BLOCK_BYTES
    # a 160³ patch touches at most 3 chunks per axis
    assert all(160 / c <= 3 for c in chunks[1:])


def test_region_reads_are_exact(tmp_path):
    data = np.random.default_rng(0).random((1, 90, 70, 50)).astype(np.float32)
    storage.save_array(tmp_path / "a.b2nd", data, patch_size=(32, 32, 32))
    arr = storage.open_array(tmp_path / "a.b2nd")
    box = (slice(None), slice(10, 61), slice(0, 70), slice(33, 50))
    assert np.array_equal(storage.read_region(arr, box), data[box])
    assert arr.dtype == np.float32 and tuple(arr.shape) == data.shape
    assert [p.name for p in tmp_path.iterdir()] == ["a.b2nd"]  # no temp files left


def test_masks_are_uint8_and_never_wrap(tmp_path):
    files = storage.CaseFiles.for_stem(tmp_path / "case")
    storage.save_array(files.anatomy_mask, np.ones((1, 4, 4, 4), np.float32))
    assert storage.open_array(files.anatomy_mask).dtype == np.uint8
    # no byte shuffle for one-byte masks (6x faster patch reads); images keep it
    assert blosc2.Filter.SHUFFLE not in storage.open_array(files.anatomy_mask).cparams.filters
    storage.save_array(files.image, np.ones((1, 4, 4, 4), np.float32))
    assert blosc2.Filter.SHUFFLE in storage.open_array(files.image).cparams.filters
    with pytest.raises(NnsslError, match="would wrap around"):  # reference turned -1 into 255
        storage.save_array(files.anonymization_mask, -np.ones((1, 4, 4, 4), np.float32))
    with pytest.raises(NnsslError, match="integers"):
        storage.save_array(files.anonymization_mask, np.full((1, 4, 4, 4), 0.5, np.float32))


def test_case_files_names():
    f = storage.CaseFiles.for_stem(storage.Path("/x/sub-01_T1w"))
    assert (f.image.name, f.anonymization_mask.name, f.anatomy_mask.name, f.properties.name) == (
        "sub-01_T1w.b2nd", "sub-01_T1w__anon.b2nd", "sub-01_T1w__anat.b2nd", "sub-01_T1w.json")


def test_properties_plain_json_and_completeness(tmp_path):
    files = storage.CaseFiles.for_stem(tmp_path / "c")
    storage.save_array(files.image, np.zeros((1, 5, 6, 7), np.float32))
    assert not storage.case_is_complete(files, "h1")  # no properties yet: a killed run
    props = {"plan_hash": "h1", "spacing": (1.0, np.float64(2.0), 3), "shape": np.array([5, 6, 7]),
             "arrays": {"image": {"shape": [1, 5, 6, 7]}}}
    storage.save_properties(files.properties, props)
    loaded = storage.load_properties(files.properties)
    assert loaded["spacing"] == [1.0, 2.0, 3] and loaded["shape"] == [5, 6, 7]
    assert storage.case_is_complete(files, "h1")
    assert not storage.case_is_complete(files, "other-plan")
    files.image.write_bytes(b"broken")  # truncated array: redo, never trust
    assert not storage.case_is_complete(files, "h1")
    with pytest.raises(TypeError, match="only plain JSON types"):
        storage.save_properties(files.properties, {"x": object()})


def test_blocks_are_sized_in_voxels_and_chunks_in_bytes():
    """Patch reads waste the blocks cut by the patch faces, which depends on voxels, so a uint8 mask
    gets the image's blocks (byte-sized blocks made mask reads 1.4x slower); chunks carry a cost
    per write call, so they are sized in bytes (80³ mask chunks wrote 2.4x slower than 120³)."""
    for shape in [(1, 221, 220, 220), (1, 180, 216, 220)]:
        image_chunks, image_blocks = storage.blosc2_chunks_and_blocks(shape, 4)
        mask_chunks, mask_blocks = storage.blosc2_chunks_and_blocks(shape, 1)
        assert mask_blocks == image_blocks
        assert np.prod(mask_chunks) > 2 * np.prod(image_chunks)
        assert np.prod(mask_chunks) <= storage.CHUNK_BYTES and np.prod(image_chunks) * 4 <= storage.CHUNK_BYTES
    assert np.prod(storage.blosc2_chunks_and_blocks((1, 300, 300, 300), 8)[1]) * 8 <= storage.BLOCK_BYTES
    # a chunk spanning an axis keeps all of it rather than dropping to whole blocks
    assert storage.blosc2_chunks_and_blocks((1, 90, 70, 50), 4)[0] == (1, 90, 70, 50)


def test_explicit_layout_is_used(tmp_path):
    data = np.arange(2 * 24 * 24 * 24, dtype=np.float32).reshape(2, 24, 24, 24)
    storage.save_array(tmp_path / "x.b2nd", data, layout=((1, 16, 16, 16), (1, 8, 8, 8)))
    arr = storage.open_array(tmp_path / "x.b2nd")
    assert tuple(arr.chunks) == (1, 16, 16, 16) and tuple(arr.blocks) == (1, 8, 8, 8)
    assert np.array_equal(arr[:], data)
