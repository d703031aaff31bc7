"""Build a pretrain_data.json from a BIDS tree or a flat folder of images (`nnssl_create_dataset`).

Images stay where they are; the collection only points at them (in `$nnssl_raw/...` form when
they live under nnssl_raw, so the file moves between machines).

Mask convention: next to an image `<stem>.<ext>`, the files `<stem>_anatmask.<ext>` (anatomy
mask: where the anatomy is, for foreground-aware sampling) and `<stem>_anonmask.<ext>`
(anonymization mask: defaced voxels, excluded from losses) are its masks and never images of
their own. Files whose BIDS suffix (last `_` token of the stem) is one of `NON_IMAGE_SUFFIXES`
are never images either, and `derivatives/`, `sourcedata/` and hidden files are not searched,
so label maps and processed copies are never taken for raw images.

Every problem found while scanning (a mask without its image, two files with one stem, a
broken participants.tsv, ...) is collected and reported together; files that are neither
images nor known sidecars are listed in a warning, never skipped silently.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnssl import paths
from nnssl.data.collection import AssociatedMasks, Collection, DatasetEntry, ImageEntry, Session, Subject, portable_path
from nnssl.data.imageio import SUPPORTED_EXTENSIONS, has_supported_extension, image_stem
from nnssl.errors import InvalidInput, NnsslError
from nnssl.io_utils import read_json
from nnssl.log import get_logger

logger = get_logger(__name__)

LAYOUTS = ("auto", "bids", "flat")
MASK_SUFFIXES = {"anatmask": "anatomy_mask", "anonmask": "anonymization_mask"}
NON_IMAGE_SUFFIXES = frozenset({"dseg", "probseg", "mask", "defacemask", *MASK_SUFFIXES})
SKIPPED_FOLDERS = frozenset({"derivatives", "sourcedata"})
DEFAULT_SESSION = "ses-DEFAULT"  # the reference's session id for BIDS subjects without ses-* folders
UNKNOWN_MODALITY = "unknown"
# Suffixes that name an imaging modality in a flat folder's file names (`case7_T2w.nii.gz`).
KNOWN_MODALITIES = frozenset({
    "T1w", "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1", "inplaneT2", "PDT2", "angio", "T1map", "T2map",
    "T2starmap", "R1map", "R2map", "PDmap", "MTRmap", "UNIT1", "MP2RAGE", "MEGRE", "MESE", "TB1map", "dwi",
    "bold", "asl", "ct", "CT", "pet", "PET", "SWI", "swi",
})
# Files that accompany images in BIDS (metadata, gradients, events); not worth a warning.
SIDECAR_EXTENSIONS = frozenset({".json", ".tsv", ".bval", ".bvec", ".txt", ".md", ".csv"})
_BIDS_LABEL = re.compile(r"[^A-Za-z0-9]")


@dataclass
class _Scan:
    """What a walk found: problems make the build fail, ignored files only warn."""

    problems: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_subjects(folder: Path) -> bool:
    return any(p.name.startswith("sub-") for p in _visible_dirs(folder))


def detect_layout(folder: Path) -> str:
    """"bids" if `sub-*` folders exist in `folder` or one level down, else "flat"."""
    folder = Path(folder)
    if _has_subjects(folder):
        return "bids"
    children = [p for p in _visible_dirs(folder) if p.name not in SKIPPED_FOLDERS]
    return "bids" if any(_has_subjects(child) for child in children) else "flat"


def _scan_images(folder: Path, scan: _Scan) -> list[tuple[Path, AssociatedMasks]]:
    """Images of one folder (sorted by name) with their `_anatmask` / `_anonmask` files."""
    images: dict[str, Path] = {}
    masks: dict[tuple[str, str], Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if not has_supported_extension(path.name):
            if not any(path.name.endswith(ext) for ext in SIDECAR_EXTENSIONS):
                scan.ignored.append(path)
            continue
        stem = image_stem(path.name)
        suffix = stem.rsplit("_", 1)[-1] if "_" in stem else ""
        if suffix in MASK_SUFFIXES:
            key = (stem[: -len(suffix) - 1], MASK_SUFFIXES[suffix])
            if key in masks:
                scan.problems.append(f"{folder}: two {suffix} files for one image: {masks[key].name} and "
                                     f"{path.name}; keep one")
            masks[key] = path
        elif suffix in NON_IMAGE_SUFFIXES:
            continue  # segmentations and BIDS masks are never pretraining images
        elif stem in images:
            scan.problems.append(f"{folder}: two images with the stem {stem!r}: {images[stem].name} and "
                                 f"{path.name}; keep one (their masks would be ambiguous)")
        else:
            images[stem] = path
    for (base, kind), path in masks.items():
        if base not in images:
            scan.problems.append(f"{path}: {kind.replace('_', ' ')} without an image {base}.<ext> next to it; "
                                 "rename it after its image or remove it")
    found = []
    for stem, path in images.items():
        anatomy, anonymization = masks.get((stem, "anatomy_mask")), masks.get((stem, "anonymization_mask"))
        found.append((path, AssociatedMasks(
            anatomy_mask=None if anatomy is None else _stored(anatomy),
            anonymization_mask=None if anonymization is None else _stored(anonymization))))
    return found


def _stored(path: Path) -> str:
    """Absolute, normalised path in `$nnssl_raw/...` form when under a set root."""
    return portable_path(Path(os.path.normpath(os.path.abspath(path))))


def _image_entry(path: Path, masks: AssociatedMasks, modality: str) -> ImageEntry:
    return ImageEntry(name=path.name, image_path=_stored(path), modality=modality, image_info=None,
                      associated_masks=masks)


def _bids_suffix(path: Path) -> str:
    stem = image_stem(path.name)
    return stem.rsplit("_", 1)[-1] if "_" in stem else UNKNOWN_MODALITY


def _parse_value(text: str | None) -> Any:
    """participants.tsv cell: "n/a"/empty -> None, integers and finite floats parsed, else the string."""
    if text is None or text.strip() in ("", "n/a", "N/A"):
        return None
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _read_participants(path: Path, scan: _Scan) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or "participant_id" not in rows[0]:
        scan.problems.append(f"{path}: the first line must be a tab-separated header with a "
                             "'participant_id' column")
        return {}
    header, table = rows[0], {}
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            scan.problems.append(f"{path}, line {line_number}: {len(row)} columns, the header has "
                                 f"{len(header)}; separate columns with tabs")
            continue
        info = {column: _parse_value(cell) for column, cell in zip(header, row)}
        subject = str(row[header.index("participant_id")]).strip()
        subject = subject if subject.startswith("sub-") else f"sub-{subject}"
        if subject in table:
            scan.problems.append(f"{path}, line {line_number}: participant {subject} listed twice")
        table[subject] = info
    return table


def _read_description(path: Path, scan: _Scan) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        scan.problems.append(f"{path}: not valid JSON ({e}); fix or remove it")
        return None
    if not isinstance(data, dict):
        scan.problems.append(f"{path}: must hold a JSON object {{...}}")
        return None
    return data


def _bids_dataset(root: Path, key: str, scan: _Scan) -> DatasetEntry | None:
    description = _read_description(root / "dataset_description.json", scan)
    participants = _read_participants(root / "participants.tsv", scan)
    name = description.get("Name") if description else None
    dataset = DatasetEntry(dataset_index=key, name=name if isinstance(name, str) else None,
                           dataset_info=description, subjects={})
    for subject_dir in (d for d in _visible_dirs(root) if d.name.startswith("sub-")):
        subject = Subject(subject_id=subject_dir.name, subject_info=participants.get(subject_dir.name), sessions={})
        # sub-*/ses-*/<datatype>/ and, for datasets without sessions, sub-*/<datatype>/.
        children = _visible_dirs(subject_dir)
        session_folders = [(d.name, d, _visible_dirs(d)) for d in children if d.name.startswith("ses-")]
        plain = [d for d in children if not d.name.startswith("ses-")]
        if plain:
            session_folders.append((DEFAULT_SESSION, subject_dir, plain))
        for folder in [subject_dir] + [d for _, d, _ in session_folders if d != subject_dir]:
            scan.ignored += [p for p in sorted(folder.iterdir()) if p.is_file() and has_supported_extension(p.name)]
        for session_id, _session_dir, datatype_dirs in session_folders:
            images = [_image_entry(path, masks, _bids_suffix(path))
                      for datatype_dir in datatype_dirs for path, masks in _scan_images(datatype_dir, scan)]
            if images:
                if session_id in subject.sessions:  # ses-DEFAULT folder next to plain datatype folders
                    scan.problems.append(f"{subject_dir}: a folder {DEFAULT_SESSION} and datatype folders "
                                         "without a session both exist; move the latter into a ses-* folder")
                subject.sessions[session_id] = Session(session_id=session_id, session_info=None, images=images)
        if subject.sessions:
            dataset.subjects[subject.subject_id] = subject
        else:
            logger.warning("%s: no images found, subject left out", subject_dir)
    return dataset if dataset.subjects else None


def collection_from_bids(root: Path, collection_index: int, collection_name: str) -> Collection:
    """One BIDS dataset (root holds sub-*) or several (root's children hold sub-*)."""
    root = Path(root)
    scan = _Scan()
    collection = Collection(collection_index=collection_index, collection_name=collection_name, datasets={})
    if _has_subjects(root):
        candidates = [(Path(os.path.abspath(root)).name, root)]
    else:
        candidates = []
        for child in _visible_dirs(root):
            if child.name in SKIPPED_FOLDERS:
                continue
            if _has_subjects(child):
                candidates.append((child.name, child))
            else:
                logger.warning("%s: no sub-* folders, not a BIDS dataset; left out", child)
    for key, folder in candidates:
        dataset = _bids_dataset(folder, key, scan)
        if dataset is not None:
            collection.datasets[key] = dataset
    _finish(scan, root)
    return collection


def _subject_label(stem: str) -> str:
    return "sub-" + _BIDS_LABEL.sub("", stem)


def collection_from_flat_folder(folder: Path, collection_index: int, collection_name: str,
                                modality: str | None = None) -> Collection:
    """One subject per image file directly in `folder`, session ses-DEFAULT, dataset key = folder name.

    The modality is `modality` if given, else the file name's BIDS-like suffix when it is a known
    one (`T1w`, `FLAIR`, `ct`, ...), else "unknown".
    """
    folder = Path(folder)
    scan = _Scan()
    key = Path(os.path.abspath(folder)).name
    dataset = DatasetEntry(dataset_index=key, name=None, dataset_info=None, subjects={})
    origin: dict[str, str] = {}
    for path, masks in _scan_images(folder, scan):
        stem = image_stem(path.name)
        subject_id = _subject_label(stem)
        if subject_id in origin:
            scan.problems.append(f"{folder}: {origin[subject_id]} and {path.name} both become subject "
                                 f"{subject_id} (only letters and digits are kept); rename one")
            continue
        origin[subject_id] = path.name
        suffix = stem.rsplit("_", 1)[-1] if "_" in stem else ""
        image_modality = modality or (suffix if suffix in KNOWN_MODALITIES else UNKNOWN_MODALITY)
        session = Session(session_id=DEFAULT_SESSION, session_info=None,
                          images=[_image_entry(path, masks, image_modality)])
        dataset.subjects[subject_id] = Subject(subject_id=subject_id, subject_info=None,
                                               sessions={DEFAULT_SESSION: session})
    subfolders = [d.name for d in _visible_dirs(folder)]
    if subfolders:
        logger.warning("%s: sub-folders are not searched in a flat layout: %s", folder, ", ".join(subfolders[:10]))
    dataset.subjects = dict(sorted(dataset.subjects.items()))
    datasets = {key: dataset} if dataset.subjects else {}
    _finish(scan, folder)
    return Collection(collection_index=collection_index, collection_name=collection_name, datasets=datasets)


def _finish(scan: _Scan, source: Path) -> None:
    if scan.ignored:
        shown = ", ".join(str(p) for p in scan.ignored[:10])
        more = f" and {len(scan.ignored) - 10} more" if len(scan.ignored) > 10 else ""
        logger.warning("%d file(s) under %s are not images in a supported place and were left out: %s%s",
                       len(scan.ignored), source, shown, more)
    if scan.problems:
        raise InvalidInput(f"{source}: {len(scan.problems)} problem(s) while collecting images:", scan.problems)


def _check_dataset_id(dataset_id: int, folder_name: str) -> None:
    """Refuse a second DatasetXXX_ with the same id: `-d XXX` would become ambiguous."""
    clashes = set()
    for variable in paths.ROOT_VARIABLES:
        if os.environ.get(variable, "").strip():
            clashes |= {name for name in paths.list_datasets(variable)
                        if paths.parse_dataset_folder_name(name)[0] == dataset_id and name != folder_name}
    if clashes:
        raise NnsslError(f"dataset id {dataset_id} is already used by {', '.join(sorted(clashes))}; "
                         f"choose another id or reuse that name")


def dataset_target(dataset_id: int, name: str, overwrite: bool) -> tuple[str, Path]:
    """(DatasetXXX_Name, its pretrain_data.json path), refusing to replace the file without
    `overwrite` and to reuse an id another dataset has."""
    folder_name = paths.dataset_folder_name(dataset_id, name)
    target = paths.nnssl_raw() / folder_name / "pretrain_data.json"
    if target.exists() and not overwrite:
        raise NnsslError(f"{target} already exists; pass --overwrite to replace it")
    _check_dataset_id(int(dataset_id), folder_name)
    return folder_name, target


def save_checked(collection: Collection, target: Path, source: Path) -> None:
    """Validate `collection` (files included) and write it to `target`."""
    problems = collection.validate(check_files=True)
    if problems:
        raise InvalidInput(f"{collection.collection_name}: the collection built from {source} has problems:",
                           [str(p) for p in problems])
    collection.source = str(target)
    collection.save(target)
    logger.debug("wrote %s", target)


def create_dataset(source: Path, dataset_id: int, name: str, layout: str = "auto", modality: str | None = None,
                   overwrite: bool = False) -> tuple[Path, Collection]:
    """Write $nnssl_raw/DatasetXXX_Name/pretrain_data.json describing the images under `source`."""
    source = Path(source)
    if layout not in LAYOUTS:
        raise NnsslError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not source.is_dir():
        raise NnsslError(f"{source} is not a folder; pass the folder holding the images (-i)")
    folder_name, target = dataset_target(dataset_id, name, overwrite)
    chosen = detect_layout(source) if layout == "auto" else layout
    if chosen == "bids":
        if modality is not None:
            raise NnsslError("--modality applies to flat folders only; BIDS file names carry the modality "
                             "(their last _suffix, e.g. T1w)")
        collection = collection_from_bids(source, int(dataset_id), folder_name)
    else:
        collection = collection_from_flat_folder(source, int(dataset_id), folder_name, modality)
    if collection.num_images() == 0:
        hint = ("sub-*/[ses-*/]<datatype>/ folders" if chosen == "bids"
                else "image files directly in the folder")
        raise NnsslError(f"no images found in {source} (layout {chosen}: expected {hint} with one of the "
                         f"extensions {', '.join(SUPPORTED_EXTENSIONS)})")
    save_checked(collection, target, source)
    return target, collection
