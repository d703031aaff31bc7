"""nnssl_plan_and_preprocess end to end: files, masks, failures, resume, sharding (tiny phantoms)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from nnssl.cli.preprocess import plan_and_preprocess_main, preprocess_main
from nnssl.data.builders import create_dataset
from nnssl.data.imageio import write_image
from nnssl.data.phantom_files import write_phantom_collection
from nnssl.data.phantoms import PhantomConfig
from nnssl.dataloading import load_cases
from nnssl.preprocessing import storage

NAME = "Dataset040_Pre"


@pytest.fixture
def dataset(nnssl_roots, request):
    n = getattr(request, "param", 6)
    bids = nnssl_roots.raw / NAME / "bids"
    write_phantom_collection(bids, PhantomConfig(num_volumes=n, shape=(24, 24, 24)))
    path, collection = create_dataset(bids, 40, "Pre")
    return nnssl_roots, path, collection


def _pre(roots):
    return roots.preprocessed / NAME


def test_cli_end_to_end_writes_every_file(dataset, capsys):
    roots, _, collection = dataset
    assert plan_and_preprocess_main(["-d", "40", "-np", "2", "-npfp", "2"]) == 0
    pre = _pre(roots)
    for name in ("dataset_fingerprint.json", "nnsslPlans.json", "preprocessing_report__onemmiso.json",
                 "pretrain_data__onemmiso.json"):
        assert (pre / name).is_file(), name
    cases = load_cases(pre / "pretrain_data__onemmiso.json")
    assert len(cases) == 6 and all(c.anatomy_mask is not None for c in cases)
    props = json.loads(cases[0].image.with_suffix(".json").read_text())
    for key in ("original_spacing", "target_spacing", "shape_before_cropping", "bbox_used_for_cropping",
                "shape_after_cropping", "shape_after_resampling", "normalization", "plan_hash"):
        assert key in props
    arr = storage.open_array(cases[0].image)
    assert arr.dtype == np.float32 and list(arr.shape[1:]) == props["shape_after_resampling"]
    assert storage.open_array(cases[0].anatomy_mask).dtype == np.uint8
    assert "6 preprocessed" in capsys.readouterr().out
    report = json.loads((pre / "preprocessing_report__onemmiso.json").read_text())
    assert report["anatomy_masks_marking_background"] == 0  # MR and CT phantoms' body masks pass the check


def test_masks_are_never_swapped(dataset):
    roots, path, collection = dataset
    img = next(collection.iter_images())
    image, _ = sitk.GetArrayFromImage(sitk.ReadImage(str(img.image_path()))), None
    geometry = sitk.ReadImage(str(img.image_path()))
    anon = img.image_path().with_name(img.image_path().name.replace(".nii.gz", "_anonmask.nii.gz"))
    only_corner = np.zeros(image.shape, np.uint8)
    only_corner[:2, :2, :2] = 1
    m = sitk.GetImageFromArray(only_corner)
    m.CopyInformation(geometry)
    sitk.WriteImage(m, str(anon))
    img.entry.associated_masks.anonymization_mask = str(anon)
    collection.save(path)
    assert plan_and_preprocess_main(["-d", "40", "-np", "1", "-npfp", "1"]) == 0
    case = [c for c in load_cases(_pre(roots) / "pretrain_data__onemmiso.json") if c.image_id == img.image_id][0]
    anat = storage.open_array(case.anatomy_mask)[:]
    anon_arr = storage.open_array(case.anonymization_mask)[:]
    assert anat.sum() > 10 * max(anon_arr.sum(), 1)  # anatomy = the body, anonymization = a corner


@pytest.mark.parametrize("dataset", [9], indirect=True)
def test_bad_cases_are_reported_and_the_rest_is_done(dataset, monkeypatch, capsys):
    roots, path, collection = dataset
    images = list(collection.iter_images())
    nan = np.ones((8, 8, 8), np.float32)
    nan[2, 2, 2] = np.nan
    write_image(images[0].image_path(), nan, (1, 1, 1))                                   # NaN voxels
    images[1].image_path().write_bytes(images[1].image_path().read_bytes()[:200])           # corrupt/truncated
    images[2].entry.image_path = "$UNSET_PP/x.nii.gz"                                     # unset $VAR
    monkeypatch.delenv("UNSET_PP", raising=False)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 7), np.float32)), str(images[3].image_path()))  # 2D
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(np.ones((5, 6, 7), np.float32))] * 2)
    sitk.WriteImage(four_d, str(images[4].image_path()))                                  # 4D
    images[5].image_path().unlink()                                                       # missing file
    write_image(images[6].anatomy_mask_path(), np.ones((3, 3, 3), np.uint8), (1, 1, 1))  # mask shape mismatch
    collection.save(path)
    assert plan_and_preprocess_main(["-d", "40", "-np", "2", "-npfp", "1"]) == 1
    report = json.loads((_pre(roots) / "preprocessing_report__onemmiso.json").read_text())
    reasons = {f["image_id"]: f["reason"] for f in report["failures"]}
    assert report["done"] == 2 and report["failed"] == 7, reasons
    assert "NaN" in reasons[images[0].image_id]
    assert "corrupt" in reasons[images[1].image_id] or "cannot be read" in reasons[images[1].image_id]
    assert "UNSET_PP" in reasons[images[2].image_id]
    assert "2D image" in reasons[images[3].image_id]
    assert "4D image with 2 volumes" in reasons[images[4].image_id]
    assert "file not found" in reasons[images[5].image_id]
    assert "does not match its image" in reasons[images[6].image_id]
    assert len(load_cases(_pre(roots) / "pretrain_data__onemmiso.json")) == 2
    assert "FAILED" in capsys.readouterr().out


def test_resume_after_a_kill_redoes_only_incomplete_cases(dataset, capsys):
    roots, _, _ = dataset
    assert plan_and_preprocess_main(["-d", "40", "-np", "1", "-npfp", "1"]) == 0
    cases = load_cases(_pre(roots) / "pretrain_data__onemmiso.json")
    cases[0].image.with_suffix(".json").unlink()   # killed before the properties were written
    cases[1].image.write_bytes(b"half-written")    # killed mid-array (properties say otherwise)
    capsys.readouterr()
    assert preprocess_main(["-d", "40", "-np", "1"]) == 0
    assert "2 preprocessed, 4 already complete" in capsys.readouterr().out
    assert all(storage.open_array(c.image).shape for c in cases)


def test_shards_cover_every_case_without_overlap(dataset, capsys):
    roots, _, _ = dataset
    assert plan_and_preprocess_main(["-d", "40", "--no_pp", "-npfp", "1"]) == 0
    assert not (_pre(roots) / "pretrain_data__onemmiso.json").exists()
    assert preprocess_main(["-d", "40", "-np", "1", "-part", "0", "-total_parts", "2"]) == 0
    first = len(load_cases(_pre(roots) / "pretrain_data__onemmiso.json"))
    assert preprocess_main(["-d", "40", "-np", "1", "-part", "1", "-total_parts", "2"]) == 0
    assert first == 3 and len(load_cases(_pre(roots) / "pretrain_data__onemmiso.json")) == 6
    reports = sorted(p.name for p in _pre(roots).glob("preprocessing_report_part*"))
    assert reports == ["preprocessing_report_part0of2__onemmiso.json", "preprocessing_report_part1of2__onemmiso.json"]
    assert preprocess_main(["-d", "40", "-part", "2", "-total_parts", "2"]) == 2


def test_clean_redoes_the_fingerprint_and_only_the_explicit_flag_deletes(dataset, capsys, caplog):
    """`--clean` means nnU-Net's "extract the fingerprint again"; deleting arrays takes
    `--delete_preprocessed_data`, which names what it deleted and keeps plans and splits."""
    roots, path, _ = dataset
    logger = logging.getLogger("nnssl")  # does not propagate to caplog's root handler: listen on it
    logger.addHandler(caplog.handler)
    try:
        _clean_and_delete(roots, path, capsys, caplog)
    finally:
        logger.removeHandler(caplog.handler)


def _clean_and_delete(roots, path, capsys, caplog):
    from nnssl.cli.preprocess import extract_fingerprint_main
    from nnssl.data.collection import Collection

    pre = _pre(roots)
    assert plan_and_preprocess_main(["-d", "40", "-np", "1", "-npfp", "1"]) == 0
    fingerprint = pre / "dataset_fingerprint.json"
    fingerprint.write_text(fingerprint.read_text().replace('"num_failed"', '"marker": 1, "num_failed"'))
    (pre / "nnsslPlans_custom.json").write_text((pre / "nnsslPlans.json").read_text())
    (pre / "splits_final.json").write_text('{"train": [], "val": []}')
    arrays = sorted((pre / "nnsslPlans_onemmiso").rglob("*.b2nd"))
    assert plan_and_preprocess_main(["-d", "40", "-np", "1", "-npfp", "1"]) == 0
    assert '"marker"' in fingerprint.read_text()  # reused, as in nnU-Net
    assert "6 already complete" in capsys.readouterr().out
    assert extract_fingerprint_main(["-d", "40", "--clean", "-np", "1"]) == 0
    assert '"marker"' not in fingerprint.read_text() and "wrote" in capsys.readouterr().out

    # a fingerprint that no longer matches pretrain_data.json is not reused silently
    collection = Collection.load(path)
    dataset_entry = next(iter(collection.datasets.values()))
    dataset_entry.subjects.pop(sorted(dataset_entry.subjects)[0])
    collection.save(path)
    assert plan_and_preprocess_main(["-d", "40", "-np", "1", "-npfp", "1", "--no_pp"]) == 2
    assert "out of date" in capsys.readouterr().err
    assert plan_and_preprocess_main(["-d", "40", "-np", "1", "-npfp", "1", "--no_pp", "--clean"]) == 0

    # a hand-edited plans file is kept as .previous when re-planning replaces it
    plans = json.loads((pre / "nnsslPlans.json").read_text())
    plans["configurations"]["onemmiso"]["patch_size"] = [16, 16, 16]
    (pre / "nnsslPlans.json").write_text(json.dumps(plans))
    assert plan_and_preprocess_main(["-d", "40", "--no_pp", "-npfp", "1"]) == 0
    previous = json.loads((pre / "nnsslPlans.json.previous").read_text())
    assert previous["configurations"]["onemmiso"]["patch_size"] == [16, 16, 16]
    assert "configurations.onemmiso.patch_size" in caplog.text

    assert preprocess_main(["-d", "40", "-np", "1", "--delete_preprocessed_data"]) == 0
    assert "5 preprocessed, 0 already complete" in capsys.readouterr().out
    assert f"deleted {pre / 'nnsslPlans_onemmiso'}/ ({3 * 6} files" in caplog.text  # 6 cases: image, mask, json
    assert len(arrays) == 12 and (pre / "nnsslPlans_custom.json").is_file() and (pre / "splits_final.json").is_file()
    assert preprocess_main(["-d", "40", "--delete_preprocessed_data", "-part", "0", "-total_parts", "2"]) == 2
    assert "other parts' work" in capsys.readouterr().err


def test_reference_planner_flags(dataset, capsys):
    """`-pl`, `-np` per configuration and `-overwrite_plans_name` as nnU-Net users type them."""
    roots, _, _ = dataset
    pre = _pre(roots)
    assert plan_and_preprocess_main(["-d", "40", "-c", "onemmiso", "noresample", "-np", "1", "1", "-npfp", "1",
                                     "-pl", "ExperimentPlanner", "-overwrite_plans_name", "nnsslPlans_zs"]) == 0
    plans = json.loads((pre / "nnsslPlans_zs.json").read_text())
    assert plans["plans_name"] == "nnsslPlans_zs" and not (pre / "nnsslPlans.json").exists()
    assert {c["data_identifier"] for c in plans["configurations"].values()} == {
        "nnsslPlans_zs_onemmiso", "nnsslPlans_zs_median", "nnsslPlans_zs_noresample"}
    assert len(load_cases(pre / "pretrain_data__nnsslPlans_zs_noresample.json")) == 6
    assert preprocess_main(["-d", "40", "-c", "onemmiso", "median", "-np", "1", "2", "3"]) == 2
    assert "one per configuration (-c onemmiso median: 2 values)" in capsys.readouterr().err
    for flag, value, equivalent in (("-pl", "nnUNetPlannerResEncL", "_ResEncL"),
                                    ("-gpu_memory_target", "24", "_GA4"),
                                    ("-overwrite_target_spacing", "1 1 3", "-c"),
                                    ("-preprocessor_name", "Mine", "-ct_norm")):
        with pytest.raises(SystemExit):
            plan_and_preprocess_main(["-d", "40", flag, *value.split()])
        assert equivalent in capsys.readouterr().err
