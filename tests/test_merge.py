"""The merge of a sharded run: pretrain_data__<config>.json rebuilt from what is complete on disk,
by string paths and the collection's own dict (no second Collection), checked in workers."""

from __future__ import annotations

import json

import numpy as np

from nnssl.data.collection import Collection
from nnssl.dataloading import load_cases
from nnssl.planning.planner import plan_experiment
from nnssl.preprocessing import merge, storage
from nnssl.preprocessing.merge import write_preprocessed_collection

NAME = "Dataset050_Merge"


def _collection(roots) -> Collection:
    images = []
    for i in range(5):
        masks = {"anatomy_mask": f"$nnssl_raw/{NAME}/m{i}.nii.gz", "anonymization_mask": None,
                 "anatomy_mask_inverted": True}
        images.append({"name": f"img{i}.nii.gz", "modality": "T1w", "image_info": {"score": i},
                       "image_path": f"$nnssl_raw/{NAME}/img{i}.nii.gz", "associated_masks": masks})
    subjects = {f"sub-{i}": {"subject_id": f"sub-{i}", "subject_info": None,
                             "sessions": {"ses-1": {"session_id": "ses-1", "session_info": None, "images": [image]}}}
                for i, image in enumerate(images)}
    return Collection.from_dict({"collection_index": 50, "collection_name": NAME, "datasets": {
        "ds1": {"dataset_index": "ds1", "name": None, "dataset_info": None, "subjects": subjects}}})


def _plans():
    fingerprint = {"images": {"a": {"spacing": [1.0, 1.0, 1.0], "shape": [8, 8, 8]}},
                   "intensity_statistics_per_modality": {}}
    return plan_experiment(NAME, fingerprint)


def _write_case(root, i, plan_hash, masks=()):
    stem = root / NAME / "ds1" / f"sub-{i}" / "ses-1" / f"img{i}"
    files = storage.CaseFiles.for_stem(stem)
    storage.save_array(files.image, np.ones((1, 4, 4, 4), np.float32), patch_size=(4, 4, 4))
    arrays = {"image": {"shape": [1, 4, 4, 4]}}
    for key in masks:
        storage.save_array(getattr(files, key), np.ones((1, 4, 4, 4), np.uint8), patch_size=(4, 4, 4))
        arrays[key] = {"shape": [1, 4, 4, 4]}
    storage.save_properties(files.properties, {"plan_hash": plan_hash, "arrays": arrays})
    return files


def test_merge_lists_complete_cases_with_the_masks_their_properties_vouch_for(nnssl_roots, monkeypatch):
    monkeypatch.setattr(merge, "CASES_PER_TASK", 2)  # several batches, so their order is tested
    collection, plans = _collection(nnssl_roots), _plans()
    plan_hash = plans.plan_hash("onemmiso")
    root = nnssl_roots.preprocessed / NAME / "nnsslPlans_onemmiso"
    _write_case(root, 0, plan_hash, ("anatomy_mask", "anonymization_mask"))
    stale = _write_case(root, 1, plan_hash)
    storage.save_array(stale.anatomy_mask, np.ones((1, 4, 4, 4), np.uint8))  # left from earlier data, not listed
    _write_case(root, 2, "another plan")
    broken = _write_case(root, 3, plan_hash, ("anonymization_mask",))
    broken.anonymization_mask.write_bytes(b"truncated")  # a listed array that does not open
    before = collection.to_dict()
    outputs = []
    for workers in (1, 2):
        destination = nnssl_roots.preprocessed / NAME / f"merged{workers}.json"
        assert write_preprocessed_collection(collection, plans, "onemmiso", root, destination, workers) == 2
        outputs.append(destination.read_text())
    assert outputs[0] == outputs[1]  # the workers' batches come back in file order
    assert collection.to_dict() == before  # the collection is reused for the next configuration
    data = json.loads(outputs[0])
    images = {s: data["datasets"]["ds1"]["subjects"][s]["sessions"]["ses-1"]["images"]
              for s in data["datasets"]["ds1"]["subjects"]}
    assert [len(images[f"sub-{i}"]) for i in range(5)] == [1, 1, 0, 0, 0]
    first, second = images["sub-0"][0], images["sub-1"][0]
    prefix = f"$nnssl_preprocessed/{NAME}/nnsslPlans_onemmiso/{NAME}/ds1"
    assert first["image_path"] == f"{prefix}/sub-0/ses-1/img0.b2nd"
    assert first["associated_masks"] == {"anatomy_mask": f"{prefix}/sub-0/ses-1/img0__anat.b2nd",
                                         "anonymization_mask": f"{prefix}/sub-0/ses-1/img0__anon.b2nd"}
    assert second["associated_masks"] == {"anatomy_mask": None, "anonymization_mask": None}
    assert first["image_info"] == {"score": 0} and list(first) == list(before["datasets"]["ds1"]["subjects"]
                                                                       ["sub-0"]["sessions"]["ses-1"]["images"][0])
    cases = load_cases(nnssl_roots.preprocessed / NAME / "merged1.json")
    assert [c.image for c in cases] == [root / NAME / "ds1" / "sub-0" / "ses-1" / "img0.b2nd",
                                        root / NAME / "ds1" / "sub-1" / "ses-1" / "img1.b2nd"]


def test_the_merge_holds_its_lock_from_the_scan_to_the_rename(nnssl_roots, monkeypatch):
    # Parts finishing together take turns: a part that scanned before another part's last cases
    # were complete must not rename its file after that part's (which would drop those cases).
    import fcntl

    collection, plans = _collection(nnssl_roots), _plans()
    root = nnssl_roots.preprocessed / NAME / "nnsslPlans_onemmiso"
    _write_case(root, 0, plans.plan_hash("onemmiso"))
    destination = nnssl_roots.preprocessed / NAME / "pretrain_data__onemmiso.json"
    seen = []

    def lock_is_held() -> bool:
        with open(merge.lock_path(destination), "a") as other:  # another open file: another part's view
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(other, fcntl.LOCK_UN)
            return False

    scan, write = merge.case_flags, merge.write_collection_dict
    monkeypatch.setattr(merge, "case_flags", lambda *a: (seen.append(("scan", lock_is_held())), scan(*a))[1])
    monkeypatch.setattr(merge, "write_collection_dict",
                        lambda *a, **k: (seen.append(("write", lock_is_held())), write(*a, **k))[1])
    assert write_preprocessed_collection(collection, plans, "onemmiso", root, destination) == 1
    assert seen == [("scan", True), ("write", True)] and not lock_is_held()
