"""Labeled evaluation sets (`cases.json`) and volume preparation consistent with pretraining.

Format (the one `nnssl.data.phantom_files.write_phantom_collection` writes; documentation/evaluation.md):

    {"class_names": ["sphere", "cuboid"],            # optional: names of class labels 0..K-1
     "labels": {"0": "background", "1": "body"},     # optional: names of label-map values
     "context_labels": [7, 8],                       # optional: label values of the context probe
     "cases": [{"case_id": "sub-001",                # optional, default: the image's stem
                "image": "sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz",  # relative or absolute
                "class_label": 0,                    # a class per volume, and/or
                "label_map": "derivatives/...dseg.nii.gz",                 # a label map on the image grid
                "modality": "T1w",                   # optional: selects the plan's normalisation
                "stratum": 3}, ...]}                 # optional: split stratum (default: class_label)

Every case needs `class_label` or `label_map`; a probe task runs when every case has its label
(a set where only some cases carry one is an error, not a silently smaller probe). Other keys
(`anatomy_mask`, ...) are ignored. `context_labels` (with label maps) names the label values
told apart only by context (`nnssl.data.paired_organs` writes them); the context probe
classifies the tokens carrying them. `stratum` (given for every case or none) replaces the class
label as what the train/test splits are stratified by: the paired-organ phantoms give the class
combined with the landmark's side, so every training half holds both sides equally often and a
probe cannot learn a position bias that the test half then reverses.

Preparation follows preprocessing step by step (`nnssl.preprocessing.steps`, the same order
as `preprocessing.runner`): the plan's axis transpose, crop to the nonzero box, the plan's
normalisation for the case's modality, resampling to the plan's spacing with the plan's method;
then a centre crop / zero pad to the encoder's input shape (zero is the mean after z-scoring,
and what the pretraining loader pads with). Label maps follow every geometric step with
nearest neighbour. Preprocessing does not reorient to a canonical orientation, so neither does
this: features see volumes in the orientation statistics pretraining saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnssl.errors import InvalidInput
from nnssl.io_utils import read_json

CASES_FILE = "cases.json"


class InvalidLabeledSet(InvalidInput):
    """A labeled folder that cannot be evaluated; the message names the file and the fix."""


@dataclass(frozen=True)
class LabeledCase:
    case_id: str
    image: Path
    class_label: int | None
    label_map: Path | None
    modality: str | None
    stratum: int | None = None


@dataclass(frozen=True)
class LabeledSet:
    folder: Path
    cases: list[LabeledCase]
    class_names: list[str]
    label_names: dict[int, str]
    context_labels: tuple[int, ...] = ()  # label values of the context probe; () = no context probe

    @property
    def has_class_labels(self) -> bool:
        return all(c.class_label is not None for c in self.cases)

    @property
    def has_label_maps(self) -> bool:
        return all(c.label_map is not None for c in self.cases)

    def class_labels(self) -> np.ndarray:
        return np.array([c.class_label for c in self.cases], dtype=np.int64)

    def split_strata(self) -> np.ndarray | None:
        """What the train/test splits are stratified by: the cases' `stratum`, else their class
        labels, else nothing (None)."""
        if self.cases and all(c.stratum is not None for c in self.cases):
            return np.array([c.stratum for c in self.cases], dtype=np.int64)
        return self.class_labels() if self.has_class_labels else None


def _path(folder: Path, value: Any) -> Path:
    path = Path(str(value))
    return path if path.is_absolute() else folder / path


def load_labeled_set(folder: str | Path) -> LabeledSet:
    """Read and check `FOLDER/cases.json`: every problem (missing files, bad labels, duplicate
    ids, a label present on only some cases) is reported at once."""
    folder = Path(folder).absolute()
    cases_json = folder / CASES_FILE
    if not folder.is_dir():
        raise InvalidLabeledSet(f"{folder}: labeled folder not found; pass a folder holding {CASES_FILE} "
                                "(e.g. one written by nnssl_generate_phantoms)")
    if not cases_json.is_file():
        raise InvalidLabeledSet(f"{cases_json}: not found; a labeled folder needs a {CASES_FILE} listing its cases "
                                "(format: documentation/evaluation.md; nnssl_generate_phantoms writes one)")
    try:
        data = read_json(cases_json)
    except ValueError as e:
        raise InvalidLabeledSet(f"{cases_json}: not valid JSON ({e}); fix the file") from e
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or not data["cases"]:
        raise InvalidLabeledSet(f"{cases_json}: needs a non-empty list under \"cases\" "
                                "(format: documentation/evaluation.md)")
    problems: list[str] = []
    cases: list[LabeledCase] = []
    for i, entry in enumerate(data["cases"]):
        where = f"cases[{i}]"
        if not isinstance(entry, dict) or not entry.get("image"):
            problems.append(f"{where}: needs an \"image\" path")
            continue
        image = _path(folder, entry["image"])
        case_id = str(entry.get("case_id") or image.name.split(".")[0])
        where = f"cases[{i}] ({case_id})"
        if not image.is_file():
            problems.append(f"{where}: image {image} not found")
        label = entry.get("class_label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            problems.append(f"{where}: class_label must be an integer >= 0, got {label!r}")
            label = None
        label_map = _path(folder, entry["label_map"]) if entry.get("label_map") else None
        if label_map is not None and not label_map.is_file():
            problems.append(f"{where}: label map {label_map} not found")
        if entry.get("class_label") is None and label_map is None:
            problems.append(f"{where}: has neither class_label nor label_map")
        stratum = entry.get("stratum")
        if stratum is not None and (isinstance(stratum, bool) or not isinstance(stratum, int) or stratum < 0):
            problems.append(f"{where}: stratum must be an integer >= 0, got {stratum!r}")
            stratum = None
        cases.append(LabeledCase(case_id, image, label, label_map, entry.get("modality"), stratum))
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        problems.append(f"duplicate case_id {', '.join(duplicates)}")
    for key, name in (("class_label", "class labels"), ("label_map", "label maps"), ("stratum", "strata")):
        have = sum(isinstance(e, dict) and e.get(key) is not None for e in data["cases"])
        if 0 < have < len(data["cases"]):
            problems.append(f"{have} of {len(data['cases'])} cases have {key}: give {name} for every case or none")
    context = data.get("context_labels", [])
    if not _valid_context_labels(context):
        problems.append(f"context_labels must list at least two distinct label values (integers >= 0), got "
                        f"{context!r}; remove the key for a set without a context task")
        context = []
    elif context and not all(isinstance(e, dict) and e.get("label_map") for e in data["cases"]):
        problems.append("context_labels needs a label_map for every case")
    if problems:
        raise InvalidLabeledSet(f"{cases_json}: cannot evaluate on this labeled set:", problems)
    labeled = LabeledSet(folder, cases, [str(n) for n in data.get("class_names") or []],
                         {int(k): str(v) for k, v in (data.get("labels") or {}).items()},
                         tuple(int(v) for v in context))
    if labeled.has_class_labels and len(set(labeled.class_labels().tolist())) < 2:
        raise InvalidLabeledSet(f"{cases_json}: every case has the same class_label; a probe needs two classes")
    return labeled


def _valid_context_labels(value: Any) -> bool:
    if value == []:  # no context task
        return True
    return (isinstance(value, list) and len(value) >= 2 and len(set(value)) == len(value)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


# ---------------------------------------------------------------------------- preparation

@dataclass(frozen=True)
class Preparation:
    """How pretraining prepared volumes, read from the pretrain plan (see module docstring)."""

    input_shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None  # None: no resampling (noresample plans)
    transpose_forward: tuple[int, int, int] = (0, 1, 2)
    normalization_per_modality: dict[str, dict[str, Any]] | None = None
    resampling_method: str = "torch_linear"

    @classmethod
    def for_encoder(cls, encoder: Any) -> Preparation:
        """From a `nnssl.export.features.PretrainedEncoder`."""
        plan = encoder.pretrain_plan
        method = (encoder.plan.get("resampling_fn_data_kwargs") or {}).get("method", "scipy_nnunet")
        return cls(input_shape=encoder.patch_size, spacing=encoder.spacing,
                   transpose_forward=encoder.transpose_forward,
                   normalization_per_modality=dict(plan.get("normalization_per_modality") or {}),
                   resampling_method=method)

    def normalization(self, modality: str | None) -> dict[str, Any]:
        return (self.normalization_per_modality or {}).get(modality or "unknown", {"scheme": "ZScoreNormalization"})


def centre_crop_or_pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre `array` [C, *spatial] in `shape`: crop larger axes, zero-pad smaller ones."""
    out = np.zeros((array.shape[0], *shape), dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for have, want in zip(array.shape[1:], shape):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = array[tuple(src)]
    return out


def prepare_case(case: LabeledCase, prep: Preparation) -> tuple[np.ndarray, np.ndarray | None]:
    """(volume float32 [1, *input_shape], label map uint8 [*input_shape] or None)."""
    from nnssl.data.imageio import read_image, read_mask
    from nnssl.preprocessing import steps

    image, header = read_image(case.image)
    label = read_mask(case.label_map, header)[None] if case.label_map is not None else None
    data, spacing = steps.transpose_case(image[None], header.spacing[-3:], prep.transpose_forward)
    if label is not None:
        label = steps.transpose_case(label, header.spacing[-3:], prep.transpose_forward)[0]
    bbox = steps.nonzero_bbox(data)
    if bbox is None:
        raise InvalidLabeledSet(f"{case.image}: the image is entirely zero; remove case {case.case_id} from "
                                "cases.json")
    data = steps.crop_to_bbox(data, bbox)
    label = steps.crop_to_bbox(label, bbox) if label is not None else None
    norm = prep.normalization(case.modality)
    if norm.get("scheme") == "CTNormalization":
        stats = steps.IntensityStats(norm["mean"], norm["std"], norm["percentile_00_5"], norm["percentile_99_5"])
        data, _ = steps.ct_normalize(data, stats)
    else:
        data, _ = steps.zscore_normalize(data)
    if prep.spacing is not None:
        new_shape = steps.new_shape_for_spacing(data.shape[1:], spacing, prep.spacing)
        data = steps.resample_image(data, spacing, prep.spacing, new_shape=new_shape, method=prep.resampling_method)
        if label is not None:
            label = steps.resample_mask(label, spacing, prep.spacing, new_shape=new_shape)
    data = centre_crop_or_pad(data.astype(np.float32, copy=False), prep.input_shape)
    label = centre_crop_or_pad(label, prep.input_shape)[0] if label is not None else None
    return data, label


def token_labels(label_map: np.ndarray, grid: tuple[int, int, int], mode: str = "centre") -> np.ndarray:
    """Per-token labels [N] (C order over `grid`) of a label map [X, Y, Z] whose shape is a
    multiple of `grid`: the voxel at each cell's centre (index side // 2), or the most frequent
    label within the cell (`majority`, ties to the smaller label)."""
    cell = tuple(s // g for s, g in zip(label_map.shape, grid))
    if any(s != g * c for s, g, c in zip(label_map.shape, grid, cell)):
        raise InvalidInput(f"label map {label_map.shape} is not a multiple of the token grid {grid}")
    if mode == "centre":
        centres = tuple(slice(c // 2, None, c) for c in cell)
        return np.ascontiguousarray(label_map[centres]).reshape(-1)
    if mode == "majority":
        (gx, gy, gz), (cx, cy, cz) = grid, cell
        blocks = label_map.reshape(gx, cx, gy, cy, gz, cz).transpose(0, 2, 4, 1, 3, 5).reshape(gx * gy * gz, -1)
        counts = np.stack([(blocks == v).sum(1) for v in range(int(label_map.max()) + 1)], axis=1)
        return counts.argmax(1).astype(label_map.dtype)
    raise InvalidInput(f"token label mode {mode!r} must be 'centre' or 'majority'")
