"""OpenMind: `nnssl_create_dataset --openmind DIR` on a synthetic download folder with OpenMind's
layout, the image-quality filter (`--max_iqs`, `loader.max_iqs`) and its anatomy masks (which
mark the background) through preprocessing."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from nnssl.cli.dataset import create_dataset_main
from nnssl.data.collection import Collection
from nnssl.data.openmind import select_by_iqs

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "openmind_conversion.py"
_spec = importlib.util.spec_from_file_location("openmind_conversion", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # type: ignore[union-attr]

ROWS = 3000
REFERENCE_IMAGE_KEYS = {"name", "image_path", "modality", "image_info", "associated_masks"}  # its Image(**entry)


def _csv(root: Path) -> list[dict[str, str]]:
    with open(root / "openneuro_metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_openmind_download_folder_becomes_a_collection(nnssl_roots, capsys):
    root = bench.write_openmind_tree(nnssl_roots.raw / "Dataset745_OpenMind", ROWS)
    assert create_dataset_main(["--openmind", str(root), "-d", "745", "-n", "OpenMind"]) == 0
    assert f"images       {ROWS}" in capsys.readouterr().out
    path = nnssl_roots.raw / "Dataset745_OpenMind" / "pretrain_data.json"
    collection = Collection.load(path)
    data = json.loads(path.read_text())
    with_sessions, without = collection.datasets["ds000001"], collection.datasets["ds000002"]
    assert set(with_sessions.subjects["sub-01"].sessions) == {"ses-01", "ses-02"}
    assert set(without.subjects["sub-01"].sessions) == {"ses-DEFAULT"}
    subject = with_sessions.subjects["sub-04"]
    assert set(subject.subject_info) == {"age", "sex", "handedness", "health_status"}  # empty cells left out
    images = {i.name: i for i in subject.sessions["ses-01"].images}
    derived = images["sub-04_ses-01_dwi_FA.nii.gz"]  # <stem>__Data/FA.nii.gz, named as the reference does
    assert derived.image_path == ("$nnssl_raw/Dataset745_OpenMind/OpenMind/ds000001/sub-04/ses-01/dwi/"
                                  "sub-04_ses-01_dwi__Data/FA.nii.gz")
    assert derived.image_info["derived_from"] == "DWI" and derived.modality == "FA"
    t1 = images["sub-04_ses-01_T1w.nii.gz"]
    info = t1.image_info
    assert info["magnetic_field_strength"] == 3.0 and info["is_brain_extract"] is False
    assert info["manufacturer"] == "Siemens" and "scanner_notes" not in info
    assert info["unique_id"].startswith("ds000001__")
    masks = t1.associated_masks
    assert masks.anatomy_mask.endswith("sub-04_ses-01_T1w__Data/fb_mask.nii.gz")
    assert masks.anonymization_mask.endswith("sub-04_ses-01_T1w__Data/deface_mask.nii.gz")
    assert masks.extra == {"anatomy_mask_inverted": True}
    t2 = next(i for i in with_sessions.subjects["sub-03"].sessions["ses-01"].images if i.modality == "T2w")
    assert t2.name == "sub-03_ses-01_T2w.nii.gz" and t2.associated_masks.anatomy_mask is None

    # every image row's score, and one per (modality, derived_from) group per dataset where the
    # reference's IQS filter reads it
    rows = _csv(root)
    scored = [r for r in rows if r["image_quality_score"]]
    assert sum(1 for i in collection.iter_images() if "image_quality_score" in i.entry.image_info) == len(scored)
    groups = with_sessions.dataset_info["image_quality_score"]
    assert {(g["modality"], g["derived_from"]) for g in groups} >= {("T1w", None), ("FA", "DWI")}
    # the reference can read it back: no image-level keys its Image(**entry) would reject
    for dataset in data["datasets"].values():
        for subject in dataset["subjects"].values():
            for session in subject["sessions"].values():
                assert all(set(image) <= REFERENCE_IMAGE_KEYS for image in session["images"])

    # the filter keeps what the reference's would (score at most the threshold)
    kept, above, unscored = select_by_iqs(collection, 2.5)
    expected = sum(1 for r in rows if r["image_quality_score"] and float(r["image_quality_score"]) <= 2.5)
    assert len(kept) == expected and above + unscored == ROWS - expected and unscored > 0


def test_openmind_table_problems_are_listed_with_their_lines(nnssl_roots, capsys):
    root = nnssl_roots.raw / "om"
    assert create_dataset_main(["--openmind", str(root), "-d", "745", "-n", "OpenMind"]) == 2
    assert "openneuro_metadata.csv not found" in capsys.readouterr().err
    bench.write_openmind_tree(root, 5)
    rows = _csv(root)
    rows[1]["image_path"] = "ds000001/file.nii.gz"
    rows[3]["modality"] = ""
    rows.append(dict(rows[0]))
    with open(root / "openneuro_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert create_dataset_main(["--openmind", str(root), "-d", "745", "-n", "OpenMind"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "line 3: image_path 'ds000001/file.nii.gz'" in err
    assert "line 5:" in err and "the modality is missing" in err and "(first on line 2)" in err
    with pytest.raises(SystemExit):
        create_dataset_main(["--openmind", str(root), "-i", str(root), "-d", "745", "-n", "OpenMind"])
    assert "not allowed with" in capsys.readouterr().err


# the small tree for the pipeline: real 16³ volumes, bright "anatomy" in a centred cube
SCORES = {"T1w": "1.5", "T2w": "3.5", "FLAIR": ""}


def _tiny_volumes(path: Path, row: dict, kind: str) -> None:
    from nnssl.data.imageio import write_image

    inside = np.zeros((16, 16, 16), bool)
    inside[4:12, 4:12, 4:12] = True
    if kind == "image":
        volume = np.where(inside, 100.0, 1.0).astype(np.float32)
    elif kind == "anatomy_mask":
        volume = (~inside).astype(np.uint8)  # OpenMind's fb_mask: 1 = background
    else:
        volume = np.zeros((16, 16, 16), np.uint8)
    write_image(path, volume, (1.0, 1.0, 1.0))


def test_quality_filter_and_background_masks_through_preprocessing_and_training(nnssl_roots, capsys):
    from nnssl.cli.preprocess import plan_and_preprocess_main
    from nnssl.dataloading import load_cases
    from nnssl.errors import NnsslError
    from nnssl.preprocessing import storage
    from nnssl.settings import parse_assignments
    from nnssl.training.names import resolve_config
    from nnssl.training.options import RunOptions
    from nnssl.training.setup import load_data

    root = bench.write_openmind_tree(nnssl_roots.raw / "Dataset746_OM" / "download", 12, write_file=_tiny_volumes)
    rows = [r for r in _csv(root) if r["modality"] in SCORES]
    for r in rows:
        r["image_quality_score"] = SCORES[r["modality"]]
    with open(root / "openneuro_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert create_dataset_main(["--openmind", str(root), "-d", "746", "-n", "OM"]) == 0
    assert plan_and_preprocess_main(["-d", "746", "-np", "1", "-npfp", "1"]) == 0
    capsys.readouterr()
    pre = nnssl_roots.preprocessed / "Dataset746_OM"
    cases = load_cases(pre / "pretrain_data__onemmiso.json")
    with_mask = [c for c in cases if c.anatomy_mask is not None]
    assert len(cases) == len(rows) and with_mask
    anatomy = np.asarray(storage.open_array(with_mask[0].anatomy_mask)[:])
    image = np.asarray(storage.open_array(with_mask[0].image)[:])
    assert anatomy.sum() > 0 and image[anatomy > 0].mean() > image[anatomy == 0].mean()  # 1 = anatomy now
    report = json.loads((pre / "preprocessing_report__onemmiso.json").read_text())
    assert report["anatomy_masks_marking_background"] == 0

    # a file without the mark (as the reference's converter writes it) is reported, case by case
    raw = nnssl_roots.raw / "Dataset746_OM" / "pretrain_data.json"
    raw.write_text(raw.read_text().replace('"anatomy_mask_inverted": true', '"x": 0'))
    assert plan_and_preprocess_main(["-d", "746", "-np", "1", "-npfp", "1", "--delete_preprocessed_data"]) == 0
    report = json.loads((pre / "preprocessing_report__onemmiso.json").read_text())
    assert report["anatomy_masks_marking_background"] == len(with_mask)
    assert "seems to mark the background" in report["anatomy_masks_marking_background_examples"][0]

    # converting with --max_iqs leaves the others out of pretrain_data.json
    assert create_dataset_main(["--openmind", str(root), "-d", "747", "-n", "OMgood", "--max_iqs", "2.5"]) == 0
    assert "left out     4 image(s)" in capsys.readouterr().out  # 2 T2w above 2.5, 2 FLAIR without a score
    assert Collection.load(nnssl_roots.raw / "Dataset747_OMgood" / "pretrain_data.json").num_images() == 7

    # training keeps the images scored at most loader.max_iqs (the reference's `score <= X`)
    config = resolve_config("IJEPATrainer", None, parse_assignments(["loader.max_iqs=2.5"]))
    assert config.loader.max_iqs == 2.5
    with pytest.raises(NnsslError, match="max_iqs must be a finite number"):
        resolve_config("IJEPATrainer", None, parse_assignments(["loader.max_iqs=Infinity"]))
    options = RunOptions(dataset="746", device="cpu", num_workers=0)
    everything = load_data(options, seed=0)
    data = load_data(options, seed=0, max_iqs=2.5)
    chosen = data.train_cases + data.val_cases
    assert len(everything.train_cases + everything.val_cases) == len(rows)
    assert chosen and all("_T1w" in c.image_id for c in chosen)
    assert len(chosen) == sum(r["modality"] == "T1w" for r in rows)
    assert json.loads((pre / "splits_final.json").read_text())  # the split covers every subject
    with pytest.raises(NnsslError, match="leaves no training case"):
        load_data(options, seed=0, max_iqs=1.0)


def test_reference_iqs_trainer_names_name_the_setting():
    from nnssl.training.names import UnknownTrainer, resolve_config

    with pytest.raises(UnknownTrainer, match=r"-tr BaseMAETrainer_BS8 --set loader\.max_iqs=2\.5 "):
        resolve_config("BaseMAETrainer_BS8_IQS2_5")
