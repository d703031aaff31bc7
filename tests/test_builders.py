"""Dataset builders: BIDS trees and flat folders to pretrain_data.json, and their two commands."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnssl.cli.dataset import create_dataset_main, generate_phantoms_main
from nnssl.data.builders import (
    DEFAULT_SESSION,
    collection_from_bids,
    collection_from_flat_folder,
    create_dataset,
    detect_layout,
)
from nnssl.data.collection import Collection
from nnssl.errors import InvalidInput, NnsslError


def _image(path: Path, value: int = 1) -> Path:
    """A tiny real image file (the builders never read voxels, but validation checks files exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), value, np.uint8)), str(path))
    return path


def _bids_dataset(root: Path, sessions: bool = True) -> Path:
    ses = ["ses-1"] if sessions else [None]
    for subject, session_ids in (("sub-01", ses), ("sub-02", ["ses-1", "ses-2"] if sessions else [None])):
        for session in session_ids:
            folder = root / subject / (session or "") / "anat"
            prefix = f"{subject}_{session}" if session else subject
            _image(folder / f"{prefix}_T1w.nii.gz")
            (folder / f"{prefix}_T1w.json").write_text("{}")
            _image(folder / f"{prefix}_FLAIR.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tscore\tgroup\n"
                                           "sub-01\t34\tF\t1.5\tn/a\n02\t51\tM\t2\tcontrol\n")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "Test set", "BIDSVersion": "1.9.0"}))
    return root


def test_bids_with_sessions(tmp_path):
    root = _bids_dataset(tmp_path / "ds001")
    collection = collection_from_bids(root, 7, "Dataset007_Test")
    assert list(collection.datasets) == ["ds001"]
    dataset = collection.datasets["ds001"]
    assert dataset.name == "Test set" and dataset.dataset_info["BIDSVersion"] == "1.9.0"
    assert list(dataset.subjects) == ["sub-01", "sub-02"]
    assert dataset.subjects["sub-01"].subject_info == {"participant_id": "sub-01", "age": 34, "sex": "F",
                                                       "score": 1.5, "group": None}
    assert dataset.subjects["sub-02"].subject_info["age"] == 51  # "02" in participants.tsv = sub-02
    assert list(dataset.subjects["sub-02"].sessions) == ["ses-1", "ses-2"]
    images = dataset.subjects["sub-01"].sessions["ses-1"].images
    assert [(i.name, i.modality) for i in images] == [("sub-01_ses-1_FLAIR.nii.gz", "FLAIR"),
                                                      ("sub-01_ses-1_T1w.nii.gz", "T1w")]
    assert Path(images[1].image_path) == (root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz").absolute()
    assert collection.num_images() == 6 and collection.validate(check_files=True) == []


def test_bids_without_sessions_uses_default_session(tmp_path):
    collection = collection_from_bids(_bids_dataset(tmp_path / "ds", sessions=False), 1, "Dataset001_X")
    subject = collection.datasets["ds"].subjects["sub-01"]
    assert list(subject.sessions) == [DEFAULT_SESSION] and DEFAULT_SESSION == "ses-DEFAULT"
    assert subject.sessions[DEFAULT_SESSION].session_id == "ses-DEFAULT"
    assert [i.name for i in subject.sessions[DEFAULT_SESSION].images] == ["sub-01_FLAIR.nii.gz", "sub-01_T1w.nii.gz"]


def test_folder_of_several_bids_datasets(tmp_path, caplog):
    _bids_dataset(tmp_path / "ds002")
    _bids_dataset(tmp_path / "ds001", sessions=False)
    _image(tmp_path / "derivatives" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _image(tmp_path / "notbids" / "scan.nii.gz")
    with caplog.at_level(logging.WARNING, logger="nnssl"):
        collection = collection_from_bids(tmp_path, 1, "Dataset001_Multi")
    assert list(collection.datasets) == ["ds001", "ds002"]
    assert collection.num_images() == 4 + 6
    assert "notbids" in caplog.text  # left out, but said so
    assert detect_layout(tmp_path) == "bids" and detect_layout(tmp_path / "ds001") == "bids"


def test_masks_attached_to_their_own_image_and_never_images(tmp_path):
    anat = tmp_path / "ds" / "sub-01" / "anat"
    for name in ("sub-01_T1w.nii.gz", "sub-01_T1w_anatmask.nii.gz", "sub-01_T1w_anonmask.nii.gz",
                 "sub-01_T2w.nii.gz", "sub-01_T2w_anonmask.nii.gz", "sub-01_dseg.nii.gz",
                 "sub-01_label-GM_probseg.nii.gz", "sub-01_mod-T1w_defacemask.nii.gz", "sub-01_mask.nii.gz",
                 ".sub-01_hidden_T1w.nii.gz"):
        _image(anat / name)
    _image(tmp_path / "ds" / "derivatives" / "labels" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _image(tmp_path / "ds" / "sourcedata" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    collection = collection_from_bids(tmp_path / "ds", 1, "Dataset001_M")
    images = {i.name: i for i in collection.datasets["ds"].subjects["sub-01"].sessions[DEFAULT_SESSION].images}
    assert sorted(images) == ["sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz"]
    t1, t2 = images["sub-01_T1w.nii.gz"].associated_masks, images["sub-01_T2w.nii.gz"].associated_masks
    assert Path(t1.anatomy_mask).name == "sub-01_T1w_anatmask.nii.gz"
    assert Path(t1.anonymization_mask).name == "sub-01_T1w_anonmask.nii.gz"
    assert t2.anatomy_mask is None and Path(t2.anonymization_mask).name == "sub-01_T2w_anonmask.nii.gz"
    summary = collection.summary()
    assert summary["anatomy_masks"] == 1 and summary["anonymization_masks"] == 2


def test_orphan_mask_and_bad_participants_reported_together(tmp_path):
    anat = tmp_path / "ds" / "sub-01" / "anat"
    _image(anat / "sub-01_T1w.nii.gz")
    _image(anat / "sub-01_T2w_anatmask.nii.gz")
    _image(anat / "sub-01_T1w.nrrd")
    (tmp_path / "ds" / "participants.tsv").write_text("participant_id\tage\nsub-01\t3\textra\n")
    with pytest.raises(InvalidInput) as e:
        collection_from_bids(tmp_path / "ds", 1, "Dataset001_M")
    problems = "\n".join(e.value.problems)
    assert len(e.value.problems) == 3
    assert "sub-01_T2w_anatmask.nii.gz" in problems and "without an image" in problems
    assert "two images with the stem 'sub-01_T1w'" in problems and "line 2" in problems


def test_flat_folder(tmp_path):
    flat = tmp_path / "scans"
    _image(flat / "case_001_T1w.nii.gz")
    _image(flat / "case_001_T1w_anatmask.nii.gz")
    _image(flat / "case-002.nii.gz")
    _image(flat / "patient 3_ct.mha")
    (flat / "readme.txt").write_text("x")
    assert detect_layout(flat) == "flat"
    collection = collection_from_flat_folder(flat, 5, "Dataset005_Flat")
    dataset = collection.datasets["scans"]
    assert list(dataset.subjects) == ["sub-case001T1w", "sub-case002", "sub-patient3ct"]
    modalities = {s: sub.sessions[DEFAULT_SESSION].images[0].modality for s, sub in dataset.subjects.items()}
    assert modalities == {"sub-case001T1w": "T1w", "sub-case002": "unknown", "sub-patient3ct": "ct"}
    first = dataset.subjects["sub-case001T1w"].sessions[DEFAULT_SESSION].images[0]
    assert Path(first.associated_masks.anatomy_mask).name == "case_001_T1w_anatmask.nii.gz"
    forced = collection_from_flat_folder(flat, 5, "Dataset005_Flat", modality="T2w")
    assert set(forced.modalities()) == {"T2w"}
    _image(flat / "case_002.nii.gz")
    with pytest.raises(InvalidInput, match="both become subject sub-case002"):
        collection_from_flat_folder(flat, 5, "Dataset005_Flat")


def test_create_dataset_writes_portable_paths_and_refuses_overwrite(nnssl_roots):
    source = _bids_dataset(nnssl_roots.raw / "Dataset010_Brains" / "bids")
    path, collection = create_dataset(source, 10, "Brains")
    assert path == nnssl_roots.raw / "Dataset010_Brains" / "pretrain_data.json"
    data = json.loads(path.read_text())
    assert data["collection_index"] == 10 and data["collection_name"] == "Dataset010_Brains"
    image = data["datasets"]["bids"]["subjects"]["sub-01"]["sessions"]["ses-1"]["images"][1]
    assert image["image_path"] == "$nnssl_raw/Dataset010_Brains/bids/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert image["associated_masks"] == {"anatomy_mask": None, "anonymization_mask": None}
    assert Collection.load(path).to_dict() == collection.to_dict()
    with pytest.raises(NnsslError, match="--overwrite"):
        create_dataset(source, 10, "Brains")
    create_dataset(source, 10, "Brains", overwrite=True)
    with pytest.raises(NnsslError, match="Dataset010_Brains"):
        create_dataset(source, 10, "Other")  # same id, another name: -d 10 would be ambiguous
    with pytest.raises(NnsslError, match="flat folders only"):
        create_dataset(source, 11, "Brains2", modality="T1w")


def test_create_dataset_outside_raw_and_errors(nnssl_roots, tmp_path):
    flat = tmp_path / "elsewhere"
    _image(flat / "a_T1w.nii.gz")
    path, _ = create_dataset(flat, 12, "Flat", layout="flat")
    image_path = json.loads(path.read_text())["datasets"]["elsewhere"]["subjects"]["sub-aT1w"]["sessions"][
        DEFAULT_SESSION]["images"][0]["image_path"]
    assert image_path == str((flat / "a_T1w.nii.gz").absolute())
    (tmp_path / "empty").mkdir()
    with pytest.raises(NnsslError, match="no images found"):
        create_dataset(tmp_path / "empty", 13, "Empty")
    with pytest.raises(NnsslError, match="not a folder"):
        create_dataset(tmp_path / "missing", 13, "Missing")
    with pytest.raises(NnsslError, match="layout"):
        create_dataset(flat, 13, "X", layout="nested")
    assert not (nnssl_roots.raw / "Dataset013_Empty").exists()


def test_create_dataset_cli(nnssl_roots, tmp_path, capsys):
    source = _bids_dataset(tmp_path / "ds")
    assert create_dataset_main(["-i", str(source), "-d", "20", "-n", "Cli"]) == 0
    out = capsys.readouterr().out
    assert "Dataset020_Cli" in out and "subjects     2" in out and "images       6" in out and "FLAIR 3" in out
    assert create_dataset_main(["-i", str(source), "-d", "20", "-n", "Cli"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    flat = tmp_path / "flat"
    _image(flat / "scan1.nii.gz")
    assert create_dataset_main(["-i", str(flat), "-d", "21", "-n", "Flat"]) == 0
    assert "modality 'unknown'" in capsys.readouterr().out


def test_generate_phantoms_cli_creates_dataset(nnssl_roots, capsys):
    out = nnssl_roots.raw / "Dataset030_Phantoms" / "bids"
    code = generate_phantoms_main(["-o", str(out), "--num_volumes", "4", "--shape", "16", "16", "16",
                                   "--modality", "CT", "-d", "30", "--name", "Phantoms"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 4 phantoms" in printed and "images       4" in printed
    collection = Collection.load(nnssl_roots.raw / "Dataset030_Phantoms" / "pretrain_data.json")
    images = list(collection.iter_images())
    assert len(images) == 4 and all(f.entry.modality == "ct" for f in images)
    assert all(f.entry.image_path.startswith("$nnssl_raw/Dataset030_Phantoms/bids/sub-") for f in images)
    assert all(f.anatomy_mask_path().name.endswith("_ct_anatmask.nii.gz") for f in images)
    assert all(f.entry.associated_masks.anonymization_mask is None for f in images)
    assert collection.datasets["bids"].subjects["sub-001"].subject_info["class_label"] in (0, 1)
    assert generate_phantoms_main(["-o", str(out), "--num_volumes", "4", "-d", "30"]) == 2  # --name missing
    assert "--name" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # -n is a name in nnssl and nnU-Net; the count has its own flag
        generate_phantoms_main(["-o", str(out), "-n", "4"])
    assert "--num_volumes" in capsys.readouterr().err
