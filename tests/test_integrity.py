"""The integrity check reports every problem of every image and mask, attributes each to its
place in pretrain_data.json, survives crashing workers, and speaks through the CLI's exit codes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnssl.cli.verify import main as verify_main
from nnssl.data import integrity
from nnssl.data.builders import create_dataset
from nnssl.data.collection import Collection, Session
from nnssl.data.imageio import write_image
from nnssl.data.integrity import IntegrityIssue, IntegrityReport, verify_collection

SHAPE, SPACING = (6, 7, 8), (2.0, 1.0, 1.0)


def _dataset(raw, n):
    """n subjects, each one T1w image with an anatomy and an anonymization mask."""
    bids = raw / "Dataset011_Integrity" / "bids"
    for i in range(1, n + 1):
        anat = bids / f"sub-{i:02d}" / "anat"
        anat.mkdir(parents=True)
        stem = f"sub-{i:02d}_T1w"
        write_image(anat / f"{stem}.nii.gz", np.ones(SHAPE, np.float32), SPACING)
        for mask in ("anatmask", "anonmask"):
            write_image(anat / f"{stem}_{mask}.nii.gz", np.ones(SHAPE, np.uint8), SPACING)
    return create_dataset(bids, 11, "Integrity")


def _break_dataset(path, collection, monkeypatch):
    """Eight different mistakes in seven images, plus one in the collection's structure."""
    imgs = list(collection.iter_images())
    imgs[0].image_path().unlink()                                   # missing image...
    imgs[0].anatomy_mask_path().unlink()                            # ...and missing mask
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7), np.float32)), str(imgs[1].image_path()))  # 2D
    write_image(imgs[2].anatomy_mask_path(), np.ones((6, 7, 9), np.uint8), SPACING)   # mask shape
    monkeypatch.delenv("UNSET_INTEGRITY", raising=False)
    imgs[3].entry.image_path = "$UNSET_INTEGRITY/a.nii.gz"          # unset $VAR, used twice
    imgs[3].entry.associated_masks.anatomy_mask = "$UNSET_INTEGRITY/a_anatmask.nii.gz"
    imgs[4].image_path().write_bytes(b"\x00garbage, not a NIfTI header")               # corrupt header
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(np.ones(SHAPE, np.float32))] * 3)
    sitk.WriteImage(four_d, str(imgs[5].image_path()))                                # 4D, 3 volumes
    write_image(imgs[6].anonymization_mask_path(), np.ones(SHAPE, np.uint8), SPACING,
                origin=(1.0, 0.0, 0.0))                                               # mask origin
    subject = collection.datasets[imgs[7].dataset_key].subjects[imgs[7].subject_id]
    subject.sessions["ses-empty"] = Session("ses-empty")                              # structure
    collection.save(path)
    return imgs


def test_every_problem_is_reported_with_its_location(nnssl_roots, monkeypatch):
    path, collection = _dataset(nnssl_roots.raw, 8)
    imgs = _break_dataset(path, collection, monkeypatch)
    report = verify_collection(Collection.load(path), num_processes=1)

    found = {i.location: i.problem.split(": ", 1)[-1] for i in report.issues}  # text after the file name
    loc = [img.location for img in imgs]
    expected = {
        (loc[0] + ".image_path", "file not found"),
        (loc[0] + ".associated_masks.anatomy_mask", "file not found"),
        (loc[1] + ".image_path", "a 2D image of shape (6, 7)"),
        (loc[2] + ".associated_masks.anatomy_mask", "does not match its image " + str(imgs[2].image_path())),
        (loc[4] + ".image_path", f"header cannot be read ({imgs[4].image_path()} is not recognized as a "
                                 "NIFTI file)"),
        (loc[5] + ".image_path", "4D image with 3 volumes"),
        (loc[6] + ".associated_masks.anonymization_mask",
         "does not match its image " + str(imgs[6].image_path())),
    }
    for location, start in expected:
        assert found.get(location, "").startswith(start), (location, report.format_table())
    assert len(report.issues) == 9, report.format_table()
    by_location = {i.location: i for i in report.issues}
    unset = by_location[loc[3]]
    assert "'UNSET_INTEGRITY' is not set" in unset.problem and "used by 2 path(s)" in unset.problem
    assert unset.image_id == imgs[3].image_id and unset.path is None
    assert "shape (6, 7, 9) differs" in by_location[loc[2] + ".associated_masks.anatomy_mask"].problem
    assert "origin (1.0, 0.0, 0.0) differs" in by_location[loc[6] + ".associated_masks.anonymization_mask"].problem
    structure = [i for i in report.issues if i.image_id is None]
    assert len(structure) == 1 and structure[0].location.endswith("sessions.ses-empty")
    # files are named on every image issue; the 2D image's (valid) masks produce no noise
    assert all(i.path for i in report.issues if i.image_id and i is not unset)
    assert not any(i.location.startswith(loc[1] + ".associated") for i in report.issues)
    assert (report.num_images, report.num_checked) == (8, 7)  # the unset-$VAR image cannot be checked

    table = report.format_table().splitlines()
    assert table[0].split() == ["location", "problem"] and len(table) == 1 + 9 + 1
    assert table[-1] == "7 of 8 images checked: 9 problems in 7 images (1 in the collection's structure)"

    parallel = verify_collection(Collection.load(path), num_processes=2)
    assert parallel.to_dict() == report.to_dict()


def test_report_json_shape(nnssl_roots, tmp_path):
    report = IntegrityReport(num_images=3, num_checked=2, issues=[
        IntegrityIssue("c__d__s__t__a.nii.gz", "datasets.d.subjects.s.sessions.t.images[0].image_path",
                       "/x/a.nii.gz", "/x/a.nii.gz: file not found; fix the path in pretrain_data.json")])
    out = tmp_path / "reports" / "r.json"
    report.save(out)
    data = json.loads(out.read_text())
    assert data == {"ok": False, "num_images": 3, "num_checked": 2, "num_issues": 1, "issues": [
        {"image_id": "c__d__s__t__a.nii.gz", "location": "datasets.d.subjects.s.sessions.t.images[0].image_path",
         "path": "/x/a.nii.gz", "problem": "/x/a.nii.gz: file not found; fix the path in pretrain_data.json"}]}
    assert os.listdir(out.parent) == ["r.json"]  # atomic write leaves no temporary file
    assert IntegrityReport(2, 2).to_dict()["ok"] is True
    assert IntegrityReport(2, 2).format_table() == "2 of 2 images checked: no problems"


def test_worker_crash_is_pinned_on_its_image(nnssl_roots, monkeypatch):
    path, collection = _dataset(nnssl_roots.raw, 5)
    imgs = list(collection.iter_images())
    write_image(imgs[4].anatomy_mask_path(), np.ones((6, 7, 9), np.uint8), SPACING)
    real = integrity.read_header

    def dies_on_sub02(p):  # inherited by the forked workers
        if "sub-02_T1w.nii.gz" in str(p):
            os._exit(3)
        return real(p)

    monkeypatch.setattr(integrity, "read_header", dies_on_sub02)
    report = verify_collection(collection, num_processes=2)
    assert {i.location for i in report.issues} == {
        imgs[1].location + ".image_path", imgs[4].location + ".associated_masks.anatomy_mask"}
    crash = next(i for i in report.issues if i.image_id == imgs[1].image_id)
    assert "crashed the worker process" in crash.problem and crash.path == str(imgs[1].image_path())
    assert report.num_checked == 5


def test_unexpected_exception_becomes_an_issue(nnssl_roots, monkeypatch):
    path, collection = _dataset(nnssl_roots.raw, 2)
    imgs = list(collection.iter_images())
    real = integrity.read_header

    def raises_on_anonmask(p):
        if str(p) == str(imgs[0].anonymization_mask_path()):
            raise MemoryError("simulated")
        return real(p)

    monkeypatch.setattr(integrity, "read_header", raises_on_anonmask)
    report = verify_collection(collection, num_processes=1)
    assert len(report.issues) == 1 and report.issues[0].image_id == imgs[0].image_id
    assert "unexpected error while checking: MemoryError: simulated" in report.issues[0].problem
    with pytest.raises(integrity.InvalidInput, match="num_processes must be at least 1"):
        verify_collection(collection, num_processes=0)


def test_cli_exit_codes_table_and_default_report(nnssl_roots, monkeypatch, capsys):
    path, collection = _dataset(nnssl_roots.raw, 3)
    default = nnssl_roots.raw / "Dataset011_Integrity" / "integrity_report.json"
    assert verify_main(["-d", "11", "-np", "1"]) == 0
    assert "3 of 3 images checked: no problems" in capsys.readouterr().out
    assert json.loads(default.read_text())["ok"] is True

    imgs = list(collection.iter_images())
    imgs[2].image_path().unlink()
    assert verify_main(["-d", "Dataset011_Integrity", "-np", "2"]) == 1
    out = capsys.readouterr().out
    assert f"{imgs[2].location}.image_path" in out and "file not found" in out
    assert f"report written to {default}" in out
    saved = json.loads(default.read_text())
    assert saved["num_issues"] == 1 and saved["issues"][0]["path"] == str(imgs[2].image_path())

    with pytest.raises(SystemExit) as usage:
        verify_main(["-d", "11", "-np", "0"])
    assert usage.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    path.unlink()
    assert verify_main(["-d", "11"]) == 2
    assert "pretrain_data.json does not exist" in capsys.readouterr().err
    monkeypatch.delenv("nnssl_raw")
    assert verify_main(["-d", "11"]) == 2
    assert "nnssl_raw" in capsys.readouterr().err
