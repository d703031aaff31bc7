"""OpenMind (114k 3D head-and-neck MRI volumes from 800 OpenNeuro datasets) into pretrain_data.json.

The download folder holds `openneuro_metadata.csv`, one row per image, and the images under
`OpenMind/`: `ds001417/sub-study016/ses-after/anat/sub-study016_ses-after_T1w.nii.gz`, its masks
in the `<stem>__Data/` folder next to it (`deface_mask.nii.gz`, the anonymization mask;
`fb_mask.nii.gz`, the anatomy mask), derived maps (e.g. FA of a DWI) in such a folder too. The
CSV's paths are relative to `OpenMind/`.

What is kept, as the reference nnssl's OpenMind converter keeps it so image ids and files match:
dataset and subject are the first two path parts, the session the third when it starts with
`ses-` (else `ses-DEFAULT`); a derived image is named `<stem>_<file>` after its `<stem>__Data`
folder (two maps of one image must not share a name); the subject fields of the subject's
first row; the image fields, and per dataset the image-quality score of each (modality,
derived_from) group in `dataset_info["image_quality_score"]`, where the reference's IQS filter
reads it. Beyond the reference, each image's own score and `unique_id` are in its `image_info`,
and its anatomy mask is marked `anatomy_mask_inverted` (see `INVERTED_KEY`).

The CSV is read row by row with the csv module; the collection (not the CSV) is what stays in
memory, about 3 kB per image (documentation/openmind.md has the measured time and memory).
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from nnssl.data.collection import AssociatedMasks, Collection, DatasetEntry, ImageEntry, Session, Subject, portable_path
from nnssl.errors import InvalidInput, NnsslError
from nnssl.log import get_logger, progress

logger = get_logger(__name__)

METADATA_FILE = "openneuro_metadata.csv"
IMAGES_FOLDER = "OpenMind"
IQS = "image_quality_score"
REQUIRED_COLUMNS = ("image_path", "modality")
SUBJECT_FIELDS = ("age", "sex", "handedness", "race", "weight", "bmi", "health_status")
IMAGE_FIELDS = ("derived_from", "is_brain_extract", "manufacturer", "model_name", "phase_encoding_direction",
                "magnetic_field_strength", "repetition_time", "echo_time")
# the columns the conversion reads; any other is listed once in the log, not kept
KNOWN_COLUMNS = frozenset({*REQUIRED_COLUMNS, "anat_mask_path", "anon_mask_path", "unique_id", IQS,
                           *SUBJECT_FIELDS, *IMAGE_FIELDS})
DEFAULT_SESSION = "ses-DEFAULT"
# OpenMind's anatomy masks (`fb_mask`, foreground/background) hold 1 outside the anatomy: the
# reference's loader samples anatomy where the mask is 0 (`1 - anat`). Every one is marked with
# this key; preprocessing turns a marked mask into the 1-is-anatomy convention of this format.
INVERTED_KEY = "anatomy_mask_inverted"
# cells pandas reads as missing (the reference converter used pandas)
_MISSING = frozenset({"", "n/a", "N/A", "NA", "nan", "NaN", "-nan", "-NaN", "null", "NULL", "None", "<NA>", "#N/A"})
_INT = re.compile(r"[+-]?\d+")


def parse_cell(text: str | None) -> Any:
    """A CSV cell as pandas would type it: missing -> None, integers, finite floats, booleans,
    else the string."""
    if text is None or text.strip() in _MISSING:
        return None
    text = text.strip()
    if _INT.fullmatch(text):
        return int(text)
    if text in ("True", "TRUE", "true", "False", "FALSE", "false"):
        return text.lower() == "true"
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else None


def _image_name(parts: tuple[str, ...], derived: bool) -> str:
    # `<stem>__Data` loses its last five characters, `Data` and one `_`: sub-01_dwi__Data/FA.nii.gz
    # becomes sub-01_dwi_FA.nii.gz, the reference converter's name for it
    return parts[-2][:-5] + parts[-1] if derived else parts[-1]


def _iqs_groups(scores: dict[tuple[str, str | None], Any]) -> list[dict[str, Any]]:
    return [{"modality": modality, "derived_from": derived_from, IQS: score}
            for (modality, derived_from), score in scores.items()]


def collection_from_openmind(root: Path, collection_index: int, collection_name: str,
                             max_iqs: float | None = None) -> tuple[Collection, int]:
    """(collection, images left out by `max_iqs`) from an OpenMind download folder `root`.

    Every problem in the CSV (missing columns, a path without dataset/subject/file, an image
    listed twice) is collected and reported together with its line number. With `max_iqs`,
    images whose score is above it, or that have none, are left out (OpenMind's score: lower is
    better)."""
    root = Path(root)
    csv_path, images_root = root / METADATA_FILE, root / IMAGES_FOLDER
    if not csv_path.is_file():
        raise NnsslError(f"{csv_path} not found: pass the OpenMind download folder (the one holding "
                         f"{METADATA_FILE} and {IMAGES_FOLDER}/) to --openmind")
    if not images_root.is_dir():
        raise NnsslError(f"{images_root} not found: the images of {csv_path} are expected under {IMAGES_FOLDER}/ "
                         "next to it; finish the download or pass the folder that holds both")
    images_root = Path(os.path.normpath(os.path.abspath(images_root)))
    collection = Collection(collection_index=collection_index, collection_name=collection_name, datasets={})
    problems: list[str] = []
    scores: dict[str, dict[tuple[str, str | None], Any]] = {}
    seen: dict[tuple[str, str, str, str], int] = {}
    left_out = 0

    prefix = portable_path(images_root)  # once: resolving the roots for each of 200k paths took half the time

    def stored(relative: str) -> str:
        parts = PurePosixPath(relative).parts
        if ".." in parts or relative.startswith("/"):
            return portable_path(Path(os.path.normpath(images_root / relative)))
        return "/".join((prefix, *parts))

    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise InvalidInput(f"{csv_path}: not OpenMind's metadata table: the columns {', '.join(missing)} are "
                               f"missing (found: {', '.join(columns) or 'none'})")
        unknown = sorted(set(columns) - KNOWN_COLUMNS)
        if unknown:
            logger.info("%s: columns not kept: %s", csv_path.name, ", ".join(unknown))
        for line, row in enumerate(progress(reader, desc="OpenMind rows", unit="row"), start=2):
            relative = (row.get("image_path") or "").strip()
            parts = PurePosixPath(relative).parts
            if len(parts) < 3 or relative.startswith("/"):
                problems.append(f"line {line}: image_path {relative!r} must be relative to {IMAGES_FOLDER}/ and "
                                "hold at least <dataset>/<subject>/<file>")
                continue
            modality = parse_cell(row.get("modality"))
            if not isinstance(modality, str):
                problems.append(f"line {line}: {relative}: the modality is missing")
                continue
            image_info = {k: v for k in IMAGE_FIELDS if (v := parse_cell(row.get(k))) is not None}
            score = parse_cell(row.get(IQS))
            score = score if isinstance(score, (int, float)) and not isinstance(score, bool) else None
            dataset_key, subject_id = parts[0], parts[1]
            session_id = parts[2] if parts[2].startswith("ses-") and len(parts) > 3 else DEFAULT_SESSION
            derived_from = image_info.get("derived_from")
            group = scores.setdefault(dataset_key, {})
            if group.get((modality, derived_from)) is None:  # the group's first score, as pandas' first()
                group[(modality, derived_from)] = score
            name = _image_name(parts, derived_from is not None)
            key = (dataset_key, subject_id, session_id, name)
            if key in seen:
                problems.append(f"line {line}: {relative} is image {name} of {dataset_key}/{subject_id}/{session_id} "
                                f"again (first on line {seen[key]}); remove one of the rows")
                continue
            seen[key] = line
            if max_iqs is not None and (score is None or score > max_iqs):
                left_out += 1
                continue
            if score is not None:
                image_info[IQS] = score
            if row.get("unique_id"):
                image_info["unique_id"] = row["unique_id"].strip()
            anat, anon = (parse_cell(row.get(c)) for c in ("anat_mask_path", "anon_mask_path"))
            masks = AssociatedMasks(anatomy_mask=stored(anat) if isinstance(anat, str) else None,
                                    anonymization_mask=stored(anon) if isinstance(anon, str) else None)
            if masks.anatomy_mask is not None:
                masks.extra[INVERTED_KEY] = True
            dataset = collection.datasets.get(dataset_key)
            if dataset is None:
                dataset = collection.datasets[dataset_key] = DatasetEntry(dataset_index=dataset_key, dataset_info={})
            subject = dataset.subjects.get(subject_id)
            if subject is None:
                subject_info = {k: v for k in SUBJECT_FIELDS if (v := parse_cell(row.get(k))) is not None}
                subject = dataset.subjects[subject_id] = Subject(subject_id=subject_id, subject_info=subject_info)
            session = subject.sessions.get(session_id)
            if session is None:
                session = subject.sessions[session_id] = Session(session_id=session_id, images=[])
            session.images.append(ImageEntry(name=name, image_path=stored(relative), modality=modality,
                                             image_info=image_info, associated_masks=masks))
    if problems:
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise InvalidInput(f"{csv_path}: {len(problems)} problem(s):", shown)
    for dataset_key, dataset in collection.datasets.items():
        dataset.dataset_info = {IQS: _iqs_groups(scores[dataset_key])}
    return collection, left_out


def create_openmind_dataset(root: Path, dataset_id: int, name: str, overwrite: bool = False,
                            max_iqs: float | None = None) -> tuple[Path, Collection, int]:
    """Write $nnssl_raw/DatasetXXX_Name/pretrain_data.json for the OpenMind download in `root`
    (images are not copied); returns (path, collection, images left out by `max_iqs`)."""
    from nnssl.data.builders import dataset_target, save_checked

    if max_iqs is not None and not math.isfinite(max_iqs):
        raise NnsslError(f"--max_iqs must be a finite number, got {max_iqs}")
    folder_name, target = dataset_target(dataset_id, name, overwrite)
    collection, left_out = collection_from_openmind(root, int(dataset_id), folder_name, max_iqs)
    if collection.num_images() == 0:
        raise NnsslError(f"{Path(root) / METADATA_FILE} lists no image" + (
            f" with an image_quality_score of at most {max_iqs} ({left_out} left out)" if max_iqs is not None else ""))
    save_checked(collection, target, Path(root))
    return target, collection, left_out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def image_quality_score(dataset: DatasetEntry, image: ImageEntry) -> float | None:
    """The image's own `image_info["image_quality_score"]`, else its (modality, derived_from)
    group's score in `dataset_info["image_quality_score"]` (what the reference's converter
    writes, so its OpenMind files filter the same), else None."""
    info = image.image_info or {}
    own = _number(info.get(IQS))
    if own is not None:
        return own
    groups = (dataset.dataset_info or {}).get(IQS)
    if isinstance(groups, list):
        for group in groups:
            if (isinstance(group, dict) and group.get("modality") == image.modality
                    and group.get("derived_from") == info.get("derived_from")):
                return _number(group.get(IQS))
    return None


def select_by_iqs(collection: Collection, max_iqs: float) -> tuple[set[str], int, int]:
    """(ids of the images scored at most `max_iqs`, how many scored above it, how many have no
    score), as the reference's IQS filter keeps `score <= threshold`."""
    kept: set[str] = set()
    above = unscored = 0
    for img in collection.iter_images():
        score = image_quality_score(collection.datasets[img.dataset_key], img.entry)
        if score is None:
            unscored += 1
        elif score > max_iqs:
            above += 1
        else:
            kept.add(img.image_id)
    return kept, above, unscored
