"""Plans: reference fields, transpose from the median spacing, normalisation per modality."""

from __future__ import annotations

import json

import pytest

from nnssl.errors import NnsslError
from nnssl.planning.planner import plan_experiment, transpose_from_spacing
from nnssl.planning.plans import Plans


def _fingerprint(spacing=(0.9, 0.9, 3.0), shape=(200, 240, 50)):
    images = {f"img{i}": {"spacing": list(spacing), "shape": list(shape), "modality": m}
              for i, m in enumerate(["T1w", "ct", "T1w"])}
    return {"images": images, "intensity_statistics_per_modality": {
        "T1w": {"mean": 300.0, "std": 50.0, "percentile_00_5": 10.0, "percentile_99_5": 900.0},
        "ct": {"mean": 40.0, "std": 300.0, "percentile_00_5": -1000.0, "percentile_99_5": 1500.0}}}


def test_transpose_puts_the_coarsest_axis_first():
    assert transpose_from_spacing([0.9, 0.9, 3.0]) == ([2, 0, 1], [1, 2, 0])
    assert transpose_from_spacing([1.0, 1.0, 1.0])[0] == [0, 1, 2]


def test_reference_fields_and_our_additions(tmp_path):
    plans = plan_experiment("Dataset001_X", _fingerprint())
    d = json.loads(json.dumps(plans.to_dict()))
    for key in ("dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
                "transpose_forward", "transpose_backward", "experiment_planner_used", "configurations"):
        assert key in d
    assert set(d["configurations"]) == {"onemmiso", "median", "noresample"}
    iso = plans.configuration("onemmiso")
    assert iso.data_identifier == "nnsslPlans_onemmiso" and iso.spacing == [1.0, 1.0, 1.0]
    assert iso.median_shape_after_resampling == [150.0, 180.0, 216.0]  # 50*3, 200*.9, 240*.9, transposed
    assert iso.patch_size == [152, 160, 160] and iso.batch_size == 8 and "160" in iso.reasoning["patch_size"]
    assert plans.configuration("median").spacing == [3.0, 0.9, 0.9]
    # per-image z-score for every modality by default: what nnU-Net's Workflow B applies downstream
    assert plans.normalization_per_modality == {"T1w": {"scheme": "ZScoreNormalization"},
                                                "ct": {"scheme": "ZScoreNormalization"}}
    assert iso.normalization_schemes == ["ZScoreNormalization"]
    plans.save(tmp_path / "nnsslPlans.json")
    assert Plans.load(tmp_path / "nnsslPlans.json").to_dict() == plans.to_dict()


def test_ct_clip_and_dataset_zscore_is_an_explicit_plan_choice(tmp_path, monkeypatch):
    plans = plan_experiment("Dataset001_X", _fingerprint(), ct_normalization="CTNormalization")
    assert plans.normalization_per_modality["ct"] == {"scheme": "CTNormalization", "mean": 40.0, "std": 300.0,
                                                      "percentile_00_5": -1000.0, "percentile_99_5": 1500.0}
    assert plans.normalization_per_modality["T1w"] == {"scheme": "ZScoreNormalization"}  # CT only
    assert plans.configuration("onemmiso").normalization_schemes == ["CTNormalization", "ZScoreNormalization"]
    with pytest.raises(NnsslError, match="choose one of ZScoreNormalization, CTNormalization"):
        plan_experiment("Dataset001_X", _fingerprint(), ct_normalization="clip")
    # the planner commands expose it
    from nnssl.cli import preprocess as cli
    from nnssl.preprocessing import runner

    seen = []
    monkeypatch.setattr(runner, "plan_and_save", lambda d, ct, plans: seen.append((d, ct)) or tmp_path / "p.json")
    assert cli.plan_experiment_main(["-d", "1", "-ct_norm", "CTNormalization"]) == 0
    assert cli.plan_experiment_main(["-d", "2"]) == 0
    assert seen == [("1", "CTNormalization"), ("2", "ZScoreNormalization")]


def test_unknown_keys_kept_and_errors_list_valid_configurations(tmp_path):
    d = plan_experiment("Dataset001_X", _fingerprint()).to_dict()
    d["reference_only_key"] = 1
    d["configurations"]["onemmiso"]["custom"] = "x"
    plans = Plans.from_dict(d)
    assert plans.to_dict() == d
    with pytest.raises(NnsslError, match="valid: median, noresample, onemmiso"):
        plans.configuration("3d_fullres")


def test_plan_hash_tracks_preprocessing_relevant_changes():
    plans = plan_experiment("Dataset001_X", _fingerprint())
    h = plans.plan_hash("onemmiso")
    plans.configuration("onemmiso").patch_size = [64, 64, 64]  # training-only field
    assert plans.plan_hash("onemmiso") == h
    plans.configuration("onemmiso").spacing = [1.5, 1.5, 1.5]
    assert plans.plan_hash("onemmiso") != h


def test_no_readable_image_is_a_clear_error():
    with pytest.raises(NnsslError, match="no readable image"):
        plan_experiment("Dataset001_X", {"images": {}})
