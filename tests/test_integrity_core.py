"""The header-only integrity check reports every problem of a dataset at once."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from nnssl.cli.verify import main as verify_main
from nnssl.data.builders import create_dataset
from nnssl.data.collection import Collection
from nnssl.data.imageio import write_image
from nnssl.data.integrity import verify_collection


def _dataset(root, n=4):
    bids = root / "Dataset010_Check" / "bids"
    for i in range(1, n + 1):
        anat = bids / f"sub-{i:02d}" / "anat"
        anat.mkdir(parents=True)
        write_image(anat / f"sub-{i:02d}_T1w.nii.gz", np.ones((6, 7, 8), np.float32), (1.0, 1.0, 2.0))
        write_image(anat / f"sub-{i:02d}_T1w_anatmask.nii.gz", np.ones((6, 7, 8), np.uint8), (1.0, 1.0, 2.0))
    return bids


def test_clean_dataset_passes(nnssl_roots, capsys):
    create_dataset(_dataset(nnssl_roots.raw), 10, "Check")
    assert verify_main(["-d", "10", "-np", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 images checked: no problems" in out
    report = json.loads((nnssl_roots.raw / "Dataset010_Check" / "integrity_report.json").read_text())
    assert report["ok"] is True and report["num_checked"] == 4


def test_every_problem_reported(nnssl_roots, monkeypatch, tmp_path, capsys):
    bids = _dataset(nnssl_roots.raw, n=5)
    path, collection = create_dataset(bids, 10, "Check")
    images = list(collection.iter_images())
    images[0].image_path().unlink()                                                   # missing file
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(images[1].image_path()))  # 2D
    write_image(images[2].anatomy_mask_path(), np.ones((6, 7, 9), np.uint8), (1, 1, 2))  # mask shape mismatch
    images[3].entry.image_path = "$UNSET_ROOT/x.nii.gz"                               # unset variable
    monkeypatch.delenv("UNSET_ROOT", raising=False)
    images[4].image_path().write_bytes(b"garbage")                                    # corrupt header
    collection.save(path)

    report = verify_collection(Collection.load(path), num_processes=2)
    problems = {i.location: i.problem for i in report.issues}
    assert len(report.issues) == 5, report.format_table()
    assert "file not found" in problems[images[0].location + ".image_path"]
    assert "2D image" in problems[images[1].location + ".image_path"]
    assert "shape (6, 7, 9) differs" in problems[images[2].location + ".associated_masks.anatomy_mask"]
    assert "UNSET_ROOT" in problems[images[3].location]
    assert "header cannot be read" in problems[images[4].location + ".image_path"]

    out_json = tmp_path / "r.json"
    assert verify_main(["-d", "Dataset010_Check", "-np", "2", "-o", str(out_json)]) == 1
    table = capsys.readouterr().out
    assert "5 problems in 5 images" in table
    assert json.loads(out_json.read_text())["num_issues"] == 5


def test_unknown_dataset_is_a_usage_error(nnssl_roots, capsys):
    assert verify_main(["-d", "77"]) == 2
    assert "Dataset077_" in capsys.readouterr().err
