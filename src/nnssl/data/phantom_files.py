"""Phantom collections on disk: a BIDS tree with label maps, participants.tsv and cases.json.

`write_phantom_collection` (re-exported by `nnssl.data.phantoms`) writes the volumes of
`nnssl.data.phantoms.make_phantom` as NIfTI, the label maps under derivatives/ (so dataset
builders never take one for an image), and the `cases.json` evaluation reads
(documentation/evaluation.md). Re-running into a folder it wrote replaces the old phantoms.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from nnssl.data.paired_organs import CONTEXT_LABELS
from nnssl.data.phantoms import (
    KEY_ORGAN_SHAPES,
    MODALITY_SUFFIX,
    PhantomConfig,
    is_int,
    landmark_side,
    make_phantom,
    volume_assignment,
)
from nnssl.errors import NnsslError
from nnssl.io_utils import atomic_path, read_json, write_json
from nnssl.log import get_logger

logger = get_logger(__name__)

GENERATOR_NAME = "nnssl_generate_phantoms"  # marks a folder as ours, so a re-run may replace it
SESSION_ID = "ses-01"
_OUR_FILE = re.compile(r"^sub-\d+_ses-01_(T1w|ct|T1w_anatmask|ct_anatmask|dseg)\.nii\.gz$")


@dataclass(frozen=True)
class PhantomCase:
    case_id: str  # "sub-001", also the BIDS subject id
    session_id: str
    image: Path
    anatomy_mask: Path | None
    label_map: Path
    class_label: int
    modality: str  # "T1w" or "ct"


@dataclass
class PhantomManifest:
    out_dir: Path
    config: PhantomConfig
    cases: list[PhantomCase]
    cases_json: Path
    participants_tsv: Path
    dataset_description: Path

    def class_labels(self) -> list[int]:
        return [case.class_label for case in self.cases]


def _case_files(out_dir: Path, index: int, config: PhantomConfig) -> PhantomCase:
    _, kind = volume_assignment(index, config)
    suffix = MODALITY_SUFFIX[kind]
    subject = f"sub-{index + 1:0{max(3, len(str(config.num_volumes)))}d}"
    datatype = "anat" if kind == "MR" else "ct"
    stem = f"{subject}_{SESSION_ID}_{suffix}"
    folder = out_dir / subject / SESSION_ID / datatype
    return PhantomCase(
        case_id=subject, session_id=SESSION_ID, image=folder / f"{stem}.nii.gz",
        anatomy_mask=folder / f"{stem}_anatmask.nii.gz" if config.anatomy_masks else None,
        # Outside the raw folders so dataset builders never take a label map for an image.
        label_map=out_dir / "derivatives" / "labels" / subject / SESSION_ID / datatype
        / f"{subject}_{SESSION_ID}_dseg.nii.gz",
        class_label=volume_assignment(index, config)[0], modality=suffix)


def _write_case(out_dir: Path, index: int, config: PhantomConfig) -> PhantomCase:
    from nnssl.data.imageio import write_image

    case = _case_files(out_dir, index, config)
    phantom = make_phantom(index, config)
    geometry = {"spacing": phantom.spacing, "origin": phantom.origin, "direction": phantom.direction}
    write_image(case.image, phantom.image, **geometry)
    if case.anatomy_mask is not None:
        write_image(case.anatomy_mask, phantom.anatomy_mask, **geometry)
    write_image(case.label_map, phantom.label_map, **geometry)
    return case


def _clear_previous(out_dir: Path) -> None:
    """Accept an empty folder or one we wrote before; remove the old phantom files in the latter.

    Stale volumes of a previous, larger run would otherwise be picked up as images by
    nnssl_create_dataset. Our dataset_description.json is written before any volume, so a
    crashed run is recognised too; only files named like ours are deleted.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NnsslError(f"{out_dir} exists and is not a folder; choose another output folder.")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    try:
        generated_by = read_json(out_dir / "dataset_description.json")["GeneratedBy"][0]["Name"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        generated_by = None
    if generated_by != GENERATOR_NAME:
        raise NnsslError(f"{out_dir} is not empty and holds no phantom collection written by "
                         f"{GENERATOR_NAME}; choose an empty or new output folder.")
    (out_dir / "cases.json").unlink(missing_ok=True)  # describes the old volumes; rewritten at the end
    labels = out_dir / "derivatives" / "labels"
    for path in [*out_dir.glob("sub-*/*/*/*.nii.gz"), *labels.glob("sub-*/*/*/*.nii.gz")]:
        if _OUR_FILE.match(path.name):
            path.unlink()
    for subject in [*out_dir.glob("sub-*"), *labels.glob("sub-*")]:
        for folder, _, _ in sorted(os.walk(subject), key=lambda entry: -len(entry[0])):
            if not any(Path(folder).iterdir()):
                Path(folder).rmdir()


def _write_tsv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_path(path) as tmp:
        lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_phantom_collection(out_dir: Path, config: PhantomConfig, num_processes: int = 1) -> PhantomManifest:
    """Write `config.num_volumes` phantoms as a BIDS tree under `out_dir` (see module docstring)."""
    if not is_int(num_processes) or num_processes < 1:
        raise NnsslError(f"num_processes must be an integer >= 1, got {num_processes!r}")
    out_dir = Path(out_dir).absolute()
    generated_by = [{"Name": GENERATOR_NAME, "Description": "nnssl synthetic anatomy-like phantoms"}]
    description = {"Name": "nnssl phantoms", "BIDSVersion": "1.9.0", "DatasetType": "raw",
                   "GeneratedBy": generated_by, "nnssl_phantom_config": config.to_dict()}
    _clear_previous(out_dir)
    write_json(out_dir / "dataset_description.json", description)
    indices = range(config.num_volumes)
    if num_processes == 1:
        cases = [_write_case(out_dir, i, config) for i in indices]
    else:
        # fork starts workers instantly; nothing in the parent holds threads or locks yet.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(num_processes, mp_context=get_context(method)) as pool:
            cases = list(pool.map(_write_case, [out_dir] * len(indices), indices, [config] * len(indices),
                                  chunksize=max(1, len(indices) // (4 * num_processes))))

    def rel(path: Path | None) -> str | None:
        return None if path is None else path.relative_to(out_dir).as_posix()

    participants = out_dir / "participants.tsv"
    rows = []
    for case in cases:
        rng = np.random.default_rng([config.seed, 3, int(case.case_id[4:])])
        rows.append([case.case_id, case.class_label, int(rng.integers(20, 81)), ("F", "M")[int(rng.integers(2))]])
    _write_tsv(participants, ["participant_id", "class_label", "age", "sex"], rows)
    labels_dir = out_dir / "derivatives" / "labels"
    write_json(labels_dir / "dataset_description.json",
               {"Name": "nnssl phantom label maps", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                "GeneratedBy": generated_by})
    _write_tsv(labels_dir / "dseg.tsv", ["index", "name"], [[k, v] for k, v in config.labels.items()])
    cases_json = out_dir / "cases.json"
    content: dict[str, Any] = {
        "num_classes": config.num_classes,
        "class_names": list(KEY_ORGAN_SHAPES[: config.num_classes]),
        "labels": {str(k): v for k, v in config.labels.items()},
    }
    if config.paired_organs:  # the labels the dense context probe classifies (documentation/evaluation.md)
        content["context_labels"] = list(CONTEXT_LABELS)
    content["cases"] = [{"case_id": c.case_id, "image": rel(c.image), "anatomy_mask": rel(c.anatomy_mask),
                         "label_map": rel(c.label_map), "class_label": c.class_label, "modality": c.modality}
                        for c in cases]
    if config.paired_organs:  # splits stratified by class and landmark side: no position bias to learn
        for entry in content["cases"]:
            side = landmark_side(int(entry["case_id"][4:]) - 1, config)
            entry["stratum"] = entry["class_label"] + config.num_classes * (side < 0)
    write_json(cases_json, content)
    logger.debug("wrote %d phantoms to %s", len(cases), out_dir)
    return PhantomManifest(out_dir=out_dir, config=config, cases=cases, cases_json=cases_json,
                           participants_tsv=participants, dataset_description=out_dir / "dataset_description.json")
