"""Case index over pretrain_data__<config>.json and the subject-level train/val split.

Also home of `build_dataset`, the small preprocessed-dataset writer the other
test_dataloading_* files import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nnssl.dataloading.dataset import (
    CaseRecord,
    load_cases,
    make_or_load_splits,
    num_val_subjects,
    split_cases,
)
from nnssl.errors import InvalidInput
from nnssl.preprocessing.storage import save_array

DATASET = "Dataset001_Tiny"


def build_dataset(preprocessed: Path, cases: list[dict[str, Any]], patch_size=(16, 16, 16)) -> Path:
    """Write arrays with the project's storage plus a preprocessed collection JSON.

    Each case: {"subject", "image": (C,X,Y,Z) float32, optional "session", "dataset", "anon",
    "anat" (uint8 (1,X,Y,Z))}. Paths are written in "$nnssl_preprocessed/..." form.
    """
    datasets: dict[str, Any] = {}
    for i, case in enumerate(cases):
        ds, subject, session = case.get("dataset", "ds1"), case["subject"], case.get("session", "ses-1")
        rel = Path(DATASET) / "nnsslPlans_onemmiso" / DATASET / ds / subject / session
        name = f"{subject}_{session}_img{i}"
        (preprocessed / rel).mkdir(parents=True, exist_ok=True)
        save_array(preprocessed / rel / f"{name}.b2nd", case["image"], patch_size=patch_size)
        masks = {"anatomy_mask": None, "anonymization_mask": None}
        for key, suffix, field in (("anon", "__anon", "anonymization_mask"),
                                   ("anat", "__anat", "anatomy_mask")):
            if case.get(key) is not None:
                save_array(preprocessed / rel / f"{name}{suffix}.b2nd", case[key], patch_size=patch_size)
                masks[field] = f"$nnssl_preprocessed/{(rel / f'{name}{suffix}.b2nd').as_posix()}"
        sessions = datasets.setdefault(ds, {"dataset_index": ds, "name": None, "dataset_info": None,
                                            "subjects": {}})["subjects"].setdefault(
            subject, {"subject_id": subject, "subject_info": None, "sessions": {}})["sessions"]
        images = sessions.setdefault(session, {"session_id": session, "session_info": None, "images": []})
        images["images"].append({
            "name": f"{name}.nii.gz", "modality": "T1w", "image_info": None,
            "image_path": f"$nnssl_preprocessed/{(rel / f'{name}.b2nd').as_posix()}",
            "associated_masks": masks,
        })
    path = preprocessed / DATASET / "pretrain_data__onemmiso.json"
    path.write_text(json.dumps({"collection_index": 1, "collection_name": DATASET, "datasets": datasets}))
    return path


def _image(shape=(12, 14, 10), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32)


def test_load_cases_resolves_paths_and_masks(nnssl_roots):
    anon = np.zeros((1, 12, 14, 10), np.uint8)
    path = build_dataset(nnssl_roots.preprocessed, [
        {"subject": "sub-01", "image": _image(), "anon": anon, "anat": anon},
        {"subject": "sub-02", "image": _image(seed=1)},
    ])
    cases = load_cases(path)
    assert [c.subject_key for c in cases] == [f"{DATASET}__ds1__sub-01", f"{DATASET}__ds1__sub-02"]
    assert cases[0].image_id == f"{DATASET}__ds1__sub-01__ses-1__sub-01_ses-1_img0.nii.gz"
    assert cases[0].image.is_file() and cases[0].image.is_relative_to(nnssl_roots.preprocessed)
    assert cases[0].anonymization_mask.name.endswith("__anon.b2nd")
    assert cases[0].anatomy_mask.name.endswith("__anat.b2nd")
    assert cases[1].anonymization_mask is None and cases[1].anatomy_mask is None


def test_load_cases_reports_every_missing_file(nnssl_roots):
    anon = np.zeros((1, 12, 14, 10), np.uint8)
    path = build_dataset(nnssl_roots.preprocessed, [
        {"subject": "sub-01", "image": _image(), "anon": anon},
        {"subject": "sub-02", "image": _image()},
    ])
    cases = load_cases(path)
    cases[0].anonymization_mask.unlink()
    cases[1].image.unlink()
    with pytest.raises(InvalidInput) as err:
        load_cases(path)
    assert str(cases[0].anonymization_mask) in str(err.value)
    assert str(cases[1].image) in str(err.value)
    assert len(err.value.problems) == 2
    assert len(load_cases(path, check_files=False)) == 2
    with pytest.raises(InvalidInput, match="not found"):
        load_cases(nnssl_roots.preprocessed / "missing.json")


def _cases(subjects: int, images_per_subject: int = 1) -> list[CaseRecord]:
    return [CaseRecord(f"c__d__s{s:03d}__ses-{i}__img", f"c__d__s{s:03d}", Path(f"/x/{s}_{i}.b2nd"))
            for s in range(subjects) for i in range(images_per_subject)]


@pytest.mark.parametrize("subjects", [1, 2, 3, 4, 5, 6, 10, 200])
def test_tiny_and_large_datasets_always_keep_training_subjects(tmp_path, subjects):
    splits = make_or_load_splits(_cases(subjects), tmp_path / "splits_final.json")
    assert len(splits["train"]) >= (subjects + 1) // 2 >= 1
    assert len(splits["val"]) == num_val_subjects(subjects, 0.05, 3)
    if subjects >= 2:
        assert splits["val"], "a few validation subjects even for tiny datasets"
    if subjects >= 200:
        assert len(splits["val"]) == 10  # 5 %
    assert sorted(splits["train"] + splits["val"]) == sorted({c.subject_key for c in _cases(subjects)})


def test_split_is_by_subject_seeded_and_reused(tmp_path):
    cases = _cases(20, images_per_subject=3)
    path = tmp_path / "splits_final.json"
    splits = make_or_load_splits(cases, path, seed=7)
    assert json.loads(path.read_text()) == splits
    assert make_or_load_splits(cases, tmp_path / "other.json", seed=7) == splits
    assert make_or_load_splits(cases, tmp_path / "third.json", seed=8) != splits
    train, val = split_cases(cases, splits)
    assert {c.subject_key for c in train}.isdisjoint({c.subject_key for c in val})
    assert len(train) + len(val) == 60 and len(val) == 3 * len(splits["val"])
    edited = {"train": splits["train"][1:], "val": splits["val"] + splits["train"][:1]}
    path.write_text(json.dumps(edited))
    assert make_or_load_splits(cases, path, seed=7) == edited  # an existing split is reused as is


def test_stale_or_malformed_split_is_reported(tmp_path):
    cases = _cases(4)
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps({"train": ["c__d__s000", "c__d__gone"], "val": ["c__d__s000"]}))
    with pytest.raises(InvalidInput) as err:
        make_or_load_splits(cases, path)
    text = str(err.value)
    assert "c__d__gone" in text and "both train and val" in text and "c__d__s003" in text
    assert "delete it" in text
    path.write_text(json.dumps([{"train": [], "val": []}]))
    with pytest.raises(InvalidInput, match="must be"):
        make_or_load_splits(cases, path)
