"""pretrain_data.json model: round trip, `$VAR` paths, structural and semantic validation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from nnssl.data.collection import (
    AssociatedMasks,
    Collection,
    DatasetEntry,
    ImageEntry,
    Problem,
    Session,
    Subject,
    make_image_id,
    portable_path,
    resolve_path,
)
from nnssl.data.collection_validate import MAX_LISTED_PROBLEMS, raise_problems
from nnssl.errors import InvalidInput, MissingEnvironmentVariable, NnsslError

FIXTURE = Path(__file__).parent / "fixtures" / "openmind_like_pretrain_data.json"
DS1_SUB1 = "datasets.ds000001.subjects.sub-01"
IMG0 = f"{DS1_SUB1}.sessions.ses-DEFAULT.images[0]"


@pytest.fixture
def raw_data() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def _image(data: dict[str, Any], ds: str = "ds000001", sub: str = "sub-01", ses: str = "ses-DEFAULT",
           i: int = 0) -> dict[str, Any]:
    return data["datasets"][ds]["subjects"][sub]["sessions"][ses]["images"][i]


def _all_paths(data: dict[str, Any]) -> list[str]:
    paths = []
    for ds in data["datasets"].values():
        for sub in ds["subjects"].values():
            for ses in sub["sessions"].values():
                for img in ses["images"]:
                    paths.append(img["image_path"])
                    for mask in (img.get("associated_masks") or {}).values():
                        if mask is not None:
                            paths.append(mask)
    return paths


@pytest.fixture
def files_on_disk(nnssl_roots, raw_data) -> dict[str, Any]:
    """Create an empty file for every path of the fixture under a temporary $nnssl_raw."""
    for stored in _all_paths(raw_data):
        path = resolve_path(stored)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return raw_data


def _structural_problems(data: dict[str, Any]) -> list[Problem]:
    with pytest.raises(InvalidInput) as info:
        Collection.from_dict(data, source="test.json")
    assert "test.json" in str(info.value)
    return info.value.all_problems


# ------------------------------------------------------------------------------ round trip
def test_fixture_round_trip_is_identical_including_key_order(raw_data, tmp_path, no_nnssl_roots):
    collection = Collection.load(FIXTURE)
    assert json.dumps(collection.to_dict()) == json.dumps(raw_data)
    collection.save(tmp_path / "pretrain_data.json")
    assert json.dumps(json.loads((tmp_path / "pretrain_data.json").read_text())) == json.dumps(raw_data)
    assert Collection.load(tmp_path / "pretrain_data.json") == collection


def test_extra_keys_are_kept_in_place(raw_data):
    raw_data = {"note": "top", **raw_data, "version": 2}
    raw_data["datasets"]["ds000001"]["license"] = "CC0"
    raw_data["datasets"]["ds000001"]["subjects"]["sub-01"] = {
        "cohort": "A", **raw_data["datasets"]["ds000001"]["subjects"]["sub-01"]}
    _image(raw_data)["associated_masks"]["brain_mask"] = "$nnssl_raw/x.nii.gz"
    _image(raw_data, "ds004215", "sub-0827")["acquisition"] = {"run": 1}
    collection = Collection.from_dict(raw_data)
    assert collection.extra == {"note": "top", "version": 2}
    assert collection.datasets["ds000001"].extra == {"license": "CC0"}
    first = collection.datasets["ds004215"].subjects["sub-0827"].sessions["ses-DEFAULT"].images[0]
    assert first.extra == {"image_quality_score": 0.93, "acquisition": {"run": 1}}
    assert json.dumps(collection.to_dict()) == json.dumps(raw_data)


def test_absent_optional_keys_stay_absent_and_inner_ids_default_to_keys(raw_data):
    subject = raw_data["datasets"]["ds000002"]["subjects"]["sub-01"]
    del subject["subject_info"], subject["subject_id"]
    del _image(raw_data, "ds000002", "sub-01", "ses-01")["image_info"]
    del raw_data["datasets"]["ds000002"]["name"]
    collection = Collection.from_dict(raw_data)
    assert collection.datasets["ds000002"].subjects["sub-01"].subject_id == "sub-01"
    out = collection.to_dict()
    out_subject = out["datasets"]["ds000002"]["subjects"]["sub-01"]
    assert "subject_info" not in out_subject and out_subject["subject_id"] == "sub-01"
    assert "image_info" not in _image(out, "ds000002", "sub-01", "ses-01")
    assert "name" not in out["datasets"]["ds000002"]


def test_objects_built_in_code_use_schema_order():
    image = ImageEntry("a.nii.gz", "/x/a.nii.gz", "T1w", associated_masks=AssociatedMasks(anatomy_mask="/x/m.nii.gz"))
    collection = Collection(1, "Dataset001_X", {"d": DatasetEntry("d", subjects={"s": Subject(
        "s", sessions={"t": Session("t", images=[image])})})})
    out = collection.to_dict()
    assert list(out) == ["collection_index", "collection_name", "datasets"]
    assert list(out["datasets"]["d"]) == ["dataset_index", "name", "dataset_info", "subjects"]
    assert list(out["datasets"]["d"]["subjects"]["s"]) == ["subject_id", "subject_info", "sessions"]
    assert list(_image(out, "d", "s", "t")) == ["name", "modality", "image_info", "image_path", "associated_masks"]
    assert _image(out, "d", "s", "t")["associated_masks"] == {"anatomy_mask": "/x/m.nii.gz",
                                                             "anonymization_mask": None}


# ------------------------------------------------------------------------------------ paths
def test_resolve_path_forms(nnssl_roots, monkeypatch):
    raw = nnssl_roots.raw
    assert resolve_path("$nnssl_raw/Dataset1_X/a.nii.gz") == raw / "Dataset1_X" / "a.nii.gz"
    assert resolve_path("${nnssl_raw}/a.nii.gz") == raw / "a.nii.gz"
    assert resolve_path("$nnssl_raw") == raw
    assert resolve_path("$nnssl_raw//a.nii.gz") == raw / "a.nii.gz"
    assert resolve_path("/abs/a.nii.gz") == Path("/abs/a.nii.gz")
    assert resolve_path("rel/a.nii.gz") == Path("rel/a.nii.gz")
    assert resolve_path("$5/a") == Path("$5/a")  # not a variable name: a literal folder
    monkeypatch.setenv("HOME", "/home/someone")
    assert resolve_path("~/a.nii.gz") == Path("/home/someone/a.nii.gz")
    monkeypatch.setenv("MY_DATA", "/data/")
    assert resolve_path("$MY_DATA/a/b.nii.gz") == Path("/data/a/b.nii.gz")


def test_resolve_path_unset_variable_names_it(no_nnssl_roots):
    with pytest.raises(MissingEnvironmentVariable) as info:
        resolve_path("${nnssl_raw}/a.nii.gz")
    assert info.value.name == "nnssl_raw" and "nnssl_raw" in str(info.value)


def test_portable_path(nnssl_roots, monkeypatch):
    raw, pre = nnssl_roots.raw, nnssl_roots.preprocessed
    assert portable_path(raw / "Dataset1_X" / "a.nii.gz") == "$nnssl_raw/Dataset1_X/a.nii.gz"
    assert portable_path(str(pre / "b.b2nd")) == "$nnssl_preprocessed/b.b2nd"
    assert portable_path(raw) == "$nnssl_raw"
    assert portable_path(f"{raw}/x/../y.nii.gz") == "$nnssl_raw/y.nii.gz"
    assert portable_path("/elsewhere/a.nii.gz") == "/elsewhere/a.nii.gz"
    assert portable_path("rel/a.nii.gz") == "rel/a.nii.gz"
    assert portable_path("$nnssl_raw/a.nii.gz") == "$nnssl_raw/a.nii.gz"
    assert portable_path(f"{raw}_other/a.nii.gz") == f"{raw}_other/a.nii.gz"  # prefix is not a parent
    monkeypatch.setenv("nnssl_preprocessed", str(raw / "pp"))  # nested roots: deepest wins
    assert portable_path(raw / "pp" / "c.b2nd") == "$nnssl_preprocessed/c.b2nd"
    monkeypatch.delenv("nnssl_preprocessed")  # unset roots are skipped, not an error
    assert portable_path(raw / "pp" / "c.b2nd") == "$nnssl_raw/pp/c.b2nd"


def test_save_writes_portable_paths(nnssl_roots, raw_data, tmp_path):
    _image(raw_data)["image_path"] = str(nnssl_roots.raw / "D" / "a.nii.gz")
    collection = Collection.from_dict(raw_data)
    collection.save(tmp_path / "out.json")
    assert _image(json.loads((tmp_path / "out.json").read_text()))["image_path"] == "$nnssl_raw/D/a.nii.gz"
    assert collection.datasets["ds000001"].subjects["sub-01"].sessions["ses-DEFAULT"].images[0].image_path \
        == str(nnssl_roots.raw / "D" / "a.nii.gz")  # the object itself is not changed
    collection.save(tmp_path / "abs.json", portable=False)
    assert _image(json.loads((tmp_path / "abs.json").read_text()))["image_path"].startswith(str(nnssl_roots.raw))


def test_save_refuses_invalid_objects_and_nan(tmp_path, raw_data):
    collection = Collection.from_dict(raw_data)
    collection.datasets["ds000001"].subjects["sub-01"].subject_id = 7  # type: ignore[assignment]
    with pytest.raises(InvalidInput, match=r"not written.*\n.*sub-01\.subject_id: must be a string"):
        collection.save(tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    collection = Collection.from_dict(raw_data)
    collection.datasets["ds000002"].dataset_info["image_quality_score"][0]["image_quality_score"] = math.nan
    with pytest.raises(InvalidInput, match=r"datasets\.ds000002\.dataset_info\.image_quality_score\[0\]"):
        collection.save(tmp_path / "nan.json")
    assert list(tmp_path.iterdir()) == []  # no leftover temporary files either


# --------------------------------------------------------------------- structural problems
def _set(path: list[Any], value: Any):
    def apply(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return apply


_S1 = ["datasets", "ds000001", "subjects", "sub-01"]
_IMG0 = _S1 + ["sessions", "ses-DEFAULT", "images", 0]

STRUCTURAL_CASES = [
    (_set(["collection_index"], "745"), "collection_index", "must be an integer, got the string '745'"),
    (_set(["collection_index"], True), "collection_index", "must be an integer, got true"),
    (_set(["collection_name"], KeyError), "collection_name", "required key is missing"),
    (_set(["collection_name"], ""), "collection_name", "must not be empty"),
    (_set(["datasets"], []), "datasets", "must be an object {...}, got a list"),
    (_set(["datasets", "ds000001"], "x"), "datasets.ds000001", "must be an object {...} describing a dataset"),
    (_set(["datasets", "ds000001", "dataset_index"], KeyError), "datasets.ds000001.dataset_index",
     "required key is missing"),
    (_set(["datasets", "ds000001", "dataset_index"], "ds9"), "datasets.ds000001.dataset_index",
     "dataset_index 'ds9' differs from the key 'ds000001'"),
    (_set(["datasets", "ds000001", "dataset_info"], [1]), "datasets.ds000001.dataset_info",
     "must be an object {...} or null, got a list"),
    (_set(["datasets", "ds000001", "subjects"], KeyError), "datasets.ds000001.subjects", "required key is missing"),
    (_set(_S1 + ["subject_id"], 1), f"{DS1_SUB1}.subject_id", "must be a string, got the number 1"),
    (_set(_S1 + ["subject_id"], "sub-02"), f"{DS1_SUB1}.subject_id", "subject_id 'sub-02' differs from the key"),
    (_set(_S1 + ["sessions"], None), f"{DS1_SUB1}.sessions", "must be an object {...}, got null"),
    (_set(_S1 + ["sessions", "ses-DEFAULT", "session_id"], "ses-1"), f"{DS1_SUB1}.sessions.ses-DEFAULT.session_id",
     "differs from the key 'ses-DEFAULT'"),
    (_set(_S1 + ["sessions", "ses-DEFAULT", "images"], {}), f"{DS1_SUB1}.sessions.ses-DEFAULT.images",
     "must be a list [...], got an object"),
    (_set(_IMG0, "a.nii.gz"), IMG0, "must be an object {...} describing an image"),
    (_set(_IMG0 + ["image_path"], KeyError), f"{IMG0}.image_path", "required key is missing"),
    (_set(_IMG0 + ["name"], KeyError), f"{IMG0}.name", "required key is missing"),
    (_set(_IMG0 + ["name"], "anat/a.nii.gz"), f"{IMG0}.name", "must be a file name without '/'"),
    (_set(_IMG0 + ["modality"], KeyError), f"{IMG0}.modality", "required key is missing"),
    (_set(_IMG0 + ["modality"], 3), f"{IMG0}.modality", "must be a string or null, got the number 3"),
    (_set(_IMG0 + ["image_info"], "3T"), f"{IMG0}.image_info", "must be an object {...} or null"),
    (_set(_IMG0 + ["associated_masks", "anatomy_mask"], 0), f"{IMG0}.associated_masks.anatomy_mask",
     "must be a string or null, got the number 0"),
    (_set(_IMG0 + ["associated_masks", "anonymization_mask"], ""),
     f"{IMG0}.associated_masks.anonymization_mask", "must not be empty; use null for none"),
]


@pytest.mark.parametrize("mutate, location, message", STRUCTURAL_CASES,
                         ids=[f"{c[1]}:{c[2][:25]}" for c in STRUCTURAL_CASES])
def test_each_structural_problem_has_its_location(raw_data, mutate, location, message):
    mutate(raw_data)
    problems = _structural_problems(raw_data)
    assert len(problems) == 1, problems
    assert problems[0].location == location
    assert message in problems[0].message


def test_liberal_where_the_reference_is(raw_data):
    _image(raw_data)["modality"] = None
    del _image(raw_data)["associated_masks"]["anatomy_mask"]
    _image(raw_data, i=1)["associated_masks"] = None
    collection = Collection.from_dict(raw_data)
    entry = collection.datasets["ds000001"].subjects["sub-01"].sessions["ses-DEFAULT"].images
    assert entry[0].modality is None and entry[0].associated_masks.anatomy_mask is None
    assert entry[1].associated_masks is None
    assert collection.modalities()["unknown"] == 1


def test_all_structural_problems_are_reported_together(raw_data):
    raw_data["collection_index"] = "x"
    raw_data["datasets"]["ds000002"]["dataset_index"] = 2
    _set(_S1 + ["sessions", "ses-DEFAULT", "images"], "none")(raw_data)
    del _image(raw_data, "ds004215", "sub-0827", i=1)["image_path"]
    _image(raw_data, "ds004215", "sub-0913", i=2)["name"] = None
    problems = _structural_problems(raw_data)
    assert [p.location for p in problems] == [
        "collection_index",
        f"{DS1_SUB1}.sessions.ses-DEFAULT.images",
        "datasets.ds000002.dataset_index",
        "datasets.ds004215.subjects.sub-0827.sessions.ses-DEFAULT.images[1].image_path",
        "datasets.ds004215.subjects.sub-0913.sessions.ses-DEFAULT.images[2].name",
    ]


def test_top_level_must_be_an_object():
    with pytest.raises(InvalidInput, match="top level, got a list"):
        Collection.from_dict([], source="x.json")


def test_load_reports_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "pretrain_data.json"
    bad.write_text('{"collection_index": 1,\n "datasets": {,}}')
    with pytest.raises(InvalidInput, match=rf"{bad} is not valid JSON: .* line 2"):
        Collection.load(bad)
    with pytest.raises(NnsslError, match="does not exist.*nnssl_create_dataset"):
        Collection.load(tmp_path / "missing.json")


def test_problem_list_in_message_is_capped_but_complete_on_the_exception():
    problems = [Problem(f"loc{i}", "bad") for i in range(MAX_LISTED_PROBLEMS + 50)]
    with pytest.raises(InvalidInput) as info:
        raise_problems(problems, "f.json: {n} problem(s)")
    assert str(info.value).startswith(f"f.json: {MAX_LISTED_PROBLEMS + 50} problem(s)")
    assert len(info.value.problems) == MAX_LISTED_PROBLEMS + 1 and "50 more" in info.value.problems[-1]
    assert info.value.all_problems == problems


# ----------------------------------------------------------------------- semantic problems
def test_complete_collection_on_disk_is_valid(files_on_disk):
    collection = Collection.from_dict(files_on_disk)
    assert collection.validate() == []
    collection.check()  # does not raise


def test_missing_files_masks_and_folders(files_on_disk, nnssl_roots):
    resolve_path(_image(files_on_disk)["image_path"]).unlink()
    resolve_path(_image(files_on_disk, i=1)["associated_masks"]["anatomy_mask"]).unlink()
    folder = nnssl_roots.raw / "a_folder.nii.gz"
    folder.mkdir()
    _image(files_on_disk, "ds000002", "sub-02", "ses-02", 1)["image_path"] = "${nnssl_raw}/a_folder.nii.gz"
    problems = Collection.from_dict(files_on_disk).validate()
    assert [p.location for p in problems] == [
        f"{IMG0}.image_path",
        f"{DS1_SUB1}.sessions.ses-DEFAULT.images[1].associated_masks.anatomy_mask",
        "datasets.ds000002.subjects.sub-02.sessions.ses-02.images[1].image_path",
    ]
    assert problems[0].message.startswith(f"file not found: {nnssl_roots.raw}/Dataset745_OpenMind/")
    assert "(path in file: $nnssl_raw/Dataset745_OpenMind/" in problems[0].message
    assert problems[2].message.startswith("not a regular file")


def test_duplicate_ids_mask_equal_to_image_and_relative_paths(files_on_disk):
    images = files_on_disk["datasets"]["ds000002"]["subjects"]["sub-01"]["sessions"]["ses-01"]["images"]
    images[1]["name"] = images[0]["name"]
    _image(files_on_disk)["associated_masks"]["anatomy_mask"] = _image(files_on_disk)["image_path"]
    _image(files_on_disk, i=1)["image_path"] = "anat/sub-01_T2w.nii.gz"
    problems = Collection.from_dict(files_on_disk).validate(check_files=False)
    where = "datasets.ds000002.subjects.sub-01.sessions.ses-01.images"
    assert [str(p).split(":")[0] for p in problems] == [
        f"{IMG0}.associated_masks.anatomy_mask",
        f"{DS1_SUB1}.sessions.ses-DEFAULT.images[1].image_path",
        f"{where}[1]",
    ]
    assert "anatomy_mask is the image itself" in problems[0].message
    assert problems[1].message.startswith("relative path 'anat/sub-01_T2w.nii.gz'")
    assert problems[2].message == (
        "duplicate image id 'Dataset745_OpenMind__ds000002__sub-01__ses-01__sub-01_ses-01_FLAIR.nii.gz' "
        f"(also at {where}[0]); give every image of a session a different name")


def test_unset_variables_reported_once_each_and_checking_continues(files_on_disk, monkeypatch):
    monkeypatch.delenv("OTHER_ROOT", raising=False)
    for i in range(2):
        _image(files_on_disk, "ds004215", "sub-0913", i=i)["image_path"] = f"$OTHER_ROOT/x{i}.nii.gz"
    resolve_path(_image(files_on_disk)["image_path"]).unlink()
    problems = Collection.from_dict(files_on_disk).validate()
    assert [p.location for p in problems] == [
        f"{IMG0}.image_path", "datasets.ds004215.subjects.sub-0913.sessions.ses-DEFAULT.images[0].image_path"]
    assert problems[1].message.startswith(
        "environment variable 'OTHER_ROOT' is not set, so the 2 path(s) starting with $OTHER_ROOT")
    monkeypatch.delenv("nnssl_raw")
    problems = Collection.from_dict(files_on_disk).validate()
    assert len(problems) == 2 and "'nnssl_raw' is not set, so the 39 path(s)" in problems[0].message


def test_empty_containers_are_no_images(raw_data):
    raw_data["datasets"]["ds000001"]["subjects"]["sub-02"]["sessions"]["ses-DEFAULT"]["images"] = []
    raw_data["datasets"]["ds000002"]["subjects"]["sub-02"]["sessions"] = {}
    raw_data["datasets"]["empty"] = {"dataset_index": "empty", "subjects": {}}
    problems = Collection.from_dict(raw_data).validate(check_files=False)
    assert [p.location for p in problems] == [
        "datasets.ds000001.subjects.sub-02.sessions.ses-DEFAULT",
        "datasets.ds000002.subjects.sub-02",
        "datasets.empty",
    ]
    assert all(p.message.startswith("no images") for p in problems)
    raw_data["datasets"] = {}
    assert [str(p)[:20] for p in Collection.from_dict(raw_data).validate()] == ["datasets: no images:"]


def test_check_files_false_needs_no_environment_or_files(raw_data, no_nnssl_roots):
    assert Collection.from_dict(raw_data).validate(check_files=False) == []


def test_check_raises_with_every_problem(no_nnssl_roots):
    collection = Collection.load(FIXTURE)
    collection.datasets["ds000001"].subjects["sub-02"].sessions["ses-DEFAULT"].images.clear()
    with pytest.raises(InvalidInput) as info:
        collection.check()
    assert str(FIXTURE) in str(info.value) and "2 problem(s)" in str(info.value)
    assert [p.split(":")[0] for p in info.value.problems] == [
        f"{IMG0}.image_path", "datasets.ds000001.subjects.sub-02.sessions.ses-DEFAULT"]


# ---------------------------------------------------------------------------- flat view
def test_flat_images_ids_keys_locations_and_paths(raw_data, nnssl_roots):
    flat = list(Collection.from_dict(raw_data).iter_images())
    assert len(flat) == 22 and len({f.image_id for f in flat}) == 22
    first = flat[0]
    assert first.image_id == "Dataset745_OpenMind__ds000001__sub-01__ses-DEFAULT__sub-01_T1w.nii.gz"
    assert first.subject_key == "Dataset745_OpenMind__ds000001__sub-01"
    assert (first.dataset_key, first.subject_id, first.session_id) == ("ds000001", "sub-01", "ses-DEFAULT")
    assert first.location == IMG0
    assert first.image_path() == nnssl_roots.raw / "Dataset745_OpenMind/OpenMind/ds000001/sub-01/anat/sub-01_T1w.nii.gz"
    assert first.anatomy_mask_path().name == "sub-01_T1w_anat_mask.nii.gz"
    assert first.anonymization_mask_path().name == "sub-01_T1w_anon_mask.nii.gz"
    t1_ds2 = next(f for f in flat if f.entry.name == "sub-02_ses-02_T1w.nii.gz")
    assert t1_ds2.anatomy_mask_path() is None and t1_ds2.anonymization_mask_path() is None
    assert t1_ds2.location == "datasets.ds000002.subjects.sub-02.sessions.ses-02.images[1]"
    assert len({f.subject_key for f in flat}) == 7
    assert make_image_id("a", "b", "c") == "a__b__c"


def test_summary_counts(raw_data):
    summary = Collection.from_dict(raw_data).summary()
    assert summary == {
        "collection_name": "Dataset745_OpenMind",
        "collection_index": 745,
        "datasets": 3,
        "subjects": 7,
        "sessions": 9,
        "images": 22,
        "modalities": {"T1w": 9, "FLAIR": 4, "T2w": 3, "ADC": 2, "DWI": 2, "FA": 2},
        "anatomy_masks": 11,
        "anonymization_masks": 8,
    }
    assert json.loads(json.dumps(summary)) == summary
