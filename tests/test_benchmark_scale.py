"""benchmarks/scale.py's pieces that its numbers rest on, at a tiny size (the full run takes an
hour; `--quick` about 20 s, run by hand): the resized collections list the right images, the 2x
one gives distinct ids over the same preprocessed files, and the per-case slope is right."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def scale_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _scale_tree
    import scale

    yield _scale_tree, scale
    for name in ("_scale_tree", "scale", "openmind_conversion"):
        sys.modules.pop(name, None)


def _images(data):
    return [(ds, sub, ses, image["name"]) for ds, d in data["datasets"].items() for sub, s in d["subjects"].items()
            for ses, session in s["sessions"].items() for image in session["images"]]


def _collection(datasets: int = 2, subjects: int = 3, images: int = 2):
    def image(i):
        return {"name": f"img{i}.nii.gz", "image_path": f"$nnssl_raw/x/img{i}.nii.gz"}
    return {"collection_index": 1, "collection_name": "C", "datasets": {
        f"ds{d}": {"dataset_index": f"ds{d}", "subjects": {
            f"sub-{s}": {"subject_id": f"sub-{s}", "sessions": {
                "ses-1": {"session_id": "ses-1", "images": [image(i) for i in range(images)]}}}
            for s in range(subjects)}} for d in range(datasets)}}


def test_resized_collections_take_the_first_images_or_repeat_them_under_new_dataset_keys(scale_modules):
    tree, _ = scale_modules
    data = _collection()  # 12 images
    everything = _images(data)
    assert _images(tree.resized(data, 5)) == everything[:5]
    assert _images(tree.resized(data, 12)) == everything
    doubled = _images(tree.resized(data, 24))
    assert doubled[:12] == everything and len(set(doubled)) == 24
    assert [row[0] for row in doubled[12:]] == ["ds0_r1"] * 6 + ["ds1_r1"] * 6
    assert len(_images(tree.resized(data, 17))) == 17


def test_the_repeated_datasets_link_to_the_preprocessed_folders_of_their_originals(scale_modules, tmp_path):
    tree, _ = scale_modules
    source = tmp_path / "pre" / "Big"
    for key in ("ds0", "ds1"):
        (source / key).mkdir(parents=True)
        (source / key / "marker").write_text(key)
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(tree.resized(_collection(), 24)))
    target = tmp_path / "pre" / "Twice"
    assert tree.link_preprocessed(source, target, raw) == 4
    assert (target / "ds1_r1" / "marker").read_text() == "ds1"
    assert tree.link_preprocessed(source, target, raw) == 0  # existing links are kept


def test_memory_per_case_is_the_slope_between_the_smallest_and_largest_size_in_kb(scale_modules):
    _, scale = scale_modules
    rows = {1000: {"peak_growth_mb": 10.0, "w": [{"uss_mb": 1.0}]},
            11000: {"peak_growth_mb": 20.0, "w": [{"uss_mb": 1.0}]}}
    assert scale._slope(rows, ("peak_growth_mb",)) == pytest.approx(1024 * 10 / 10_000, abs=1e-3)
    assert scale._slope(rows, ("w", 0, "uss_mb")) == 0.0
    assert scale._slope(rows, ("missing",)) is None
