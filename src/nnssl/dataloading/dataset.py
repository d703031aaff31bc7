"""The case index of a preprocessed dataset and its train/val split by subject.

A case is one preprocessed image (`.b2nd`) with its optional masks, listed in
`pretrain_data__<config>.json` (a Collection whose paths point at the preprocessed files).
Cases are held in a `CaseIndex` (arrays, not one object per case: see `case_index.py`).
Splits are by subject (`collection__dataset__subject`), so no subject's sessions leak between
training and validation; they are written once to `splits_final.json` and reused afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nnssl.data.collection import Collection, FlatImage
from nnssl.dataloading.case_index import CaseIndex, CaseRecord  # noqa: F401  (CaseRecord: re-exported)
from nnssl.errors import InvalidInput
from nnssl.io_utils import read_json, write_json
from nnssl.log import get_logger

logger = get_logger(__name__)

_MAX_LISTED = 20  # problems listed in one message; the count of the rest follows


def _absolute(path: Path | None, base: Path) -> str | None:
    # Relative paths in a preprocessed collection are relative to the JSON file, so a dataset
    # folder can be moved as a whole.
    if path is None:
        return None
    return str(path if path.is_absolute() else base / path)


def _row(image: FlatImage, base: Path) -> tuple[str, str, str, str | None, str | None]:
    return (image.image_id, image.subject_key, _absolute(image.image_path(), base),  # type: ignore[return-value]
            _absolute(image.anonymization_mask_path(), base), _absolute(image.anatomy_mask_path(), base))


def _listed(problems: list[str]) -> list[str]:
    if len(problems) <= _MAX_LISTED:
        return problems
    return problems[:_MAX_LISTED] + [f"... and {len(problems) - _MAX_LISTED} more"]


def load_cases(preprocessed_collection_path: str | Path, check_files: bool = True) -> CaseIndex:
    """Cases of `pretrain_data__<config>.json`, in file order (the order the sampler indexes).

    With `check_files`, every listed array must exist; all missing ones are reported together
    (a missing file found mid-training would stop a run hours in).
    """
    path = Path(preprocessed_collection_path)
    if not path.is_file():
        raise InvalidInput(
            f"preprocessed collection {path} not found; run nnssl_plan_and_preprocess for this "
            "dataset and configuration first"
        )
    rows = [_row(image, path.parent) for image in Collection.load(path).iter_images()]
    if not rows:
        raise InvalidInput(f"{path} lists no images; nothing to train on")
    problems: list[str] = []
    seen: set[str] = set()
    for image_id, _, *files in rows:
        if image_id in seen:
            problems.append(f"duplicate image id {image_id}")
        seen.add(image_id)
        if check_files:
            for kind, file in zip(("image", "anonymization mask", "anatomy mask"), files):
                if file is not None and not os.path.isfile(file):
                    problems.append(f"{image_id}: {kind} {file} not found")
    if problems:
        raise InvalidInput(
            f"{path} does not describe a usable preprocessed dataset (re-run "
            "nnssl_preprocess to write the missing cases):",
            _listed(problems),
        )
    return CaseIndex.from_rows(rows)


def _validate_split(splits: object, subjects: set[str], path: Path) -> dict[str, list[str]]:
    if not (isinstance(splits, dict) and isinstance(splits.get("train"), list)
            and isinstance(splits.get("val"), list)
            and all(isinstance(s, str) for s in splits["train"] + splits["val"])):
        raise InvalidInput(
            f"{path} must be {{\"train\": [subject keys], \"val\": [subject keys]}}; "
            "delete it to have a new split written"
        )
    train, val = list(splits["train"]), list(splits["val"])
    problems = [f"subject {s} is in both train and val" for s in sorted(set(train) & set(val))]
    listed = set(train) | set(val)
    problems += [f"subject {s} is in the split but not in the dataset" for s in sorted(listed - subjects)]
    problems += [f"subject {s} of the dataset is in neither train nor val"
                 for s in sorted(subjects - listed)]
    if not train:
        problems.append("the train list is empty")
    if problems:
        raise InvalidInput(
            f"{path} does not match the preprocessed dataset (it was written for other data?). "
            "Fix it or delete it to have a new split written:",
            _listed(problems),
        )
    return {"train": train, "val": val}


def num_val_subjects(num_subjects: int, val_fraction: float, min_val_subjects: int) -> int:
    """At least `min_val_subjects`, but never more than half, so training always has data."""
    wanted = max(min_val_subjects, int(round(val_fraction * num_subjects)))
    return min(wanted, num_subjects // 2)


def make_or_load_splits(cases: Iterable[CaseRecord], path: str | Path, seed: int = 12345,
                        val_fraction: float = 0.05, min_val_subjects: int = 3) -> dict[str, list[str]]:
    """Read `splits_final.json` if it exists (and check it covers exactly these subjects),
    else draw a seeded split by subject and write it atomically.

    Tiny datasets still train: with n subjects at most n // 2 go to validation (1 subject: none,
    with a warning), unlike the reference, which put every subject of a <= 5-subject dataset
    into validation.
    """
    path = Path(path)
    subjects = sorted(CaseIndex.of(cases).unique_subjects())
    if not subjects:
        raise InvalidInput("cannot split an empty list of cases")
    if not 0.0 <= val_fraction < 1.0 or min_val_subjects < 0:
        raise InvalidInput("invalid split settings:",
                           [f"val_fraction must be in [0, 1), got {val_fraction}",
                            f"min_val_subjects must be >= 0, got {min_val_subjects}"])
    if path.is_file():
        return _validate_split(read_json(path), set(subjects), path)
    n_val = num_val_subjects(len(subjects), val_fraction, min_val_subjects)
    order = np.random.default_rng(seed).permutation(len(subjects))
    val = sorted(subjects[i] for i in order[:n_val])
    train = sorted(subjects[i] for i in order[n_val:])
    if not val:
        logger.warning("only %d subject(s): no validation subjects in %s", len(subjects), path)
    write_json(path, {"train": train, "val": val})
    logger.info("wrote %s: %d train / %d val subjects", path, len(train), len(val))
    return {"train": train, "val": val}


def split_cases(cases: Iterable[CaseRecord], splits: dict[str, list[str]]) -> tuple[CaseIndex, CaseIndex]:
    """(train cases, val cases) in case order, by each case's subject (sharing `cases`' buffers)."""
    index = CaseIndex.of(cases)
    train = index.subject_mask(splits["train"])
    val = index.subject_mask(splits["val"]) & ~train
    orphans = np.flatnonzero(~(train | val))
    if orphans.size:
        i = int(orphans[0])
        raise InvalidInput(f"subject {index.subject_key(i)} of case {index.image_id(i)} is in no split")
    return index.subset(np.flatnonzero(train)), index.subset(np.flatnonzero(val))
