"""Experiment planning: from a fingerprint to `nnsslPlans.json`.

Follows nnU-Net / the reference: the axis with the largest median spacing goes first
(`transpose_forward`), configurations `onemmiso` (1 mm isotropic, default), `median` (median
spacing) and `noresample`. Beyond the reference, each configuration records its median shape
after resampling, and a pretraining patch and batch size with the reasoning behind them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nnssl.errors import NnsslError
from nnssl.planning.plans import ConfigurationPlan, Plans

CONFIGURATIONS = ("onemmiso", "median", "noresample")
DEFAULT_PATCH = 160
DEFAULT_BATCH = 8
TOKEN = 8  # Primus patch embedding: patch sides must be multiples of 8
CT_MODALITIES = frozenset({"ct", "CT"})
PLANNER_NAME = "nnssl.planning.planner.plan_experiment"  # recorded as experiment_planner_used
# `-pl` values that mean this planner: its own names and the default planner class of nnU-Net
# and the reference (both `ExperimentPlanner`), so their users' commands run unchanged
PLANNER_NAMES = ("ExperimentPlanner", "plan_experiment", PLANNER_NAME)


def transpose_from_spacing(median_spacing: list[float]) -> tuple[list[int], list[int]]:
    first = int(np.argmax(median_spacing))
    forward = [first] + [a for a in range(3) if a != first]
    backward = [forward.index(a) for a in range(3)]
    return forward, backward


# How CT is normalised before pretraining (`plan_experiment(ct_normalization=...)`, the planners'
# `-ct_norm` flag, or edit `normalization_per_modality` in nnsslPlans.json before preprocessing):
# - "ZScoreNormalization" (default): per-image z-score, like every other modality and like the
#   reference nnssl. nnU-Net's recommended fine-tuning (Workflow B, nnUNetv2_preprocess_like_nnssl)
#   z-scores every channel per image, so the encoder sees at fine-tuning what it saw in pretraining.
# - "CTNormalization": nnU-Net's CT scheme, clip to the dataset's 0.5/99.5 percentiles and z-score
#   with the dataset's mean and std. Workflow A (nnUNetv2_plan_like_dynamic) keeps the downstream
#   plan's CTNormalization, computed with the *downstream* dataset's statistics.
CT_NORMALIZATIONS = ("ZScoreNormalization", "CTNormalization")


def normalization_for(intensity: dict[str, dict[str, float]],
                      ct_normalization: str = "ZScoreNormalization") -> dict[str, dict[str, Any]]:
    """The normalisation per modality: per-image z-score for every modality, unless
    `ct_normalization="CTNormalization"` (then CT is clipped to the dataset's 0.5/99.5
    percentiles and z-scored with the dataset's statistics, which are recorded here)."""
    if ct_normalization not in CT_NORMALIZATIONS:
        raise NnsslError(f"unknown CT normalisation {ct_normalization!r}; choose one of {', '.join(CT_NORMALIZATIONS)}")
    out = {}
    for modality, stats in intensity.items():
        if modality in CT_MODALITIES and ct_normalization == "CTNormalization":
            out[modality] = {"scheme": "CTNormalization", "mean": stats["mean"], "std": stats["std"],
                             "percentile_00_5": stats["percentile_00_5"],
                             "percentile_99_5": stats["percentile_99_5"]}
        else:
            out[modality] = {"scheme": "ZScoreNormalization"}
    return out


def _patch_for(median_shape: list[float]) -> tuple[list[int], str]:
    patch = [min(DEFAULT_PATCH, max(TOKEN * 4, TOKEN * math.ceil(s / TOKEN))) for s in median_shape]
    why = (f"reference default {DEFAULT_PATCH}³ (Primus-M, batch {DEFAULT_BATCH} fits an 80 GB GPU in "
           "bf16), reduced on axes where the median volume is smaller (rounded up to multiples of "
           f"{TOKEN}, at least {TOKEN * 4}) so patches are not mostly padding")
    return patch, why


def plan_experiment(dataset_name: str, fingerprint: dict[str, Any],
                    configurations: tuple[str, ...] = CONFIGURATIONS,
                    ct_normalization: str = "ZScoreNormalization", plans_name: str = "nnsslPlans") -> Plans:
    """The plans; `plans_name` also names each configuration's data (`<plans_name>_<config>`), so
    plans written under another name (`-overwrite_plans_name`) never preprocess into, or over,
    the default plans' arrays."""
    if not fingerprint.get("images"):
        raise NnsslError(f"{dataset_name}: the fingerprint has no readable image; fix the failures it "
                         "lists and re-run nnssl_extract_fingerprint")
    spacings = np.array([v["spacing"] for v in fingerprint["images"].values()], dtype=float)
    shapes = np.array([v["shape"] for v in fingerprint["images"].values()], dtype=float)
    median_spacing = np.median(spacings, 0)
    forward, backward = transpose_from_spacing(median_spacing.tolist())
    median_spacing_t = median_spacing[forward]
    physical = np.median(shapes * spacings, 0)[forward]  # median extent in mm, transposed
    normalization = normalization_for(fingerprint.get("intensity_statistics_per_modality", {}), ct_normalization)
    configs = {}
    for name in configurations:
        if name not in CONFIGURATIONS:
            raise NnsslError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGURATIONS)}")
        if name == "onemmiso":
            spacing: list[float] | None = [1.0, 1.0, 1.0]
        elif name == "median":
            spacing = median_spacing_t.tolist()
        else:
            spacing = None
        eff = np.array(spacing) if spacing is not None else median_spacing_t
        median_shape = (physical / eff).round(1).tolist()
        patch, why = _patch_for(median_shape)
        configs[name] = ConfigurationPlan(
            data_identifier=f"{plans_name}_{name}", preprocessor_name="DefaultPreprocessor",
            spacing_style=name, spacing=spacing,
            normalization_schemes=sorted({v["scheme"] for v in normalization.values()}) or ["ZScoreNormalization"],
            use_mask_for_norm=[False],
            resampling_fn_data="no_resampling" if spacing is None else "resample_data_or_seg_to_shape",
            resampling_fn_data_kwargs={"is_seg": False, "method": "linear"},
            resampling_fn_mask="no_resampling" if spacing is None else "resample_data_or_seg_to_shape",
            resampling_fn_mask_kwargs={"is_seg": True, "order": 0, "order_z": 0, "force_separate_z": None},
            patch_size=patch, batch_size=DEFAULT_BATCH, median_shape_after_resampling=median_shape,
            reasoning={"patch_size": why, "batch_size": f"reference default {DEFAULT_BATCH} (global, split over GPUs)"},
        )
    return Plans(dataset_name=dataset_name, plans_name=plans_name,
                 original_median_spacing_after_transp=median_spacing_t.tolist(),
                 image_reader_writer="SimpleITKIO", transpose_forward=forward, transpose_backward=backward,
                 experiment_planner_used=PLANNER_NAME,
                 configurations=configs, normalization_per_modality=normalization)
