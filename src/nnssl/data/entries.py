"""The entries of `pretrain_data.json` below the collection: datasets, subjects, sessions, images,
their masks, and the path and id conventions they share (`$VAR` paths, unique image ids).

Separate from `collection.py` so the parser (`collection_validate.py`) and the collection both
build on it without importing each other.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnssl.errors import MissingEnvironmentVariable
from nnssl.paths import PREPROCESSED, RAW

IMAGE_ID_SEPARATOR = "__"
NO_MODALITY = "unknown"  # key used by `Collection.modalities()` for images whose modality is null

# A `$NAME` or `${NAME}` first path component; anything else (e.g. `$5`) is a literal folder name.
_VARIABLE_RE = re.compile(r"^\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))$")


# ----------------------------------------------------------------------------------- paths
def split_variable(path: str) -> tuple[str | None, str]:
    """(variable name, rest) for `$NAME/rest` or `${NAME}/rest`; (None, path) otherwise."""
    first, _, rest = path.partition("/")
    m = _VARIABLE_RE.match(first)
    if m is None:
        return None, path
    return m.group(1) or m.group(2), rest.lstrip("/")


def resolve_path(path: str) -> Path:
    """Turn a path as stored in pretrain_data.json into a real path.

    `$NAME/rest` becomes `$NAME`'s value / rest, so one file works on every machine that sets
    the variable. An unset variable raises `MissingEnvironmentVariable` naming it. Relative
    paths stay relative: only the caller knows what they are relative to.
    """
    name, rest = split_variable(path)
    if name is None:
        return Path(path).expanduser()
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        raise MissingEnvironmentVariable(name, f"used by the path {path!r} in pretrain_data.json")
    root = Path(value).expanduser()
    return root / rest if rest else root


def portable_path(path: str | Path, variables: tuple[str, ...] = (RAW, PREPROCESSED)) -> str:
    """The `$VAR/...` form of an absolute path under one of `variables`' folders, else `str(path)`.

    Unset variables are skipped (never an error): writing a file must not need every root. When
    roots are nested, the deepest one wins, so the shortest portable form is written.
    """
    text = str(path)
    if split_variable(text)[0] is not None:
        return text
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        return text
    candidate = Path(os.path.normpath(candidate))
    best: tuple[str, Path] | None = None
    for name in variables:
        value = os.environ.get(name)
        if value is None or value.strip() == "":
            continue
        root = Path(os.path.normpath(os.path.abspath(Path(value).expanduser())))
        if candidate.is_relative_to(root) and (best is None or len(root.parts) > len(best[1].parts)):
            best = (name, root)
    if best is None:
        return text
    rel = candidate.relative_to(best[1]).as_posix()
    return f"${best[0]}" if rel == "." else f"${best[0]}/{rel}"


def make_image_id(*parts: str) -> str:
    """Join id parts with `__`, as the reference does for image ids and subject keys."""
    return IMAGE_ID_SEPARATOR.join(str(p) for p in parts)


# ----------------------------------------------------------------------------------- model
def emit_fields(fields: list[tuple[str, Any]], optional: frozenset[str], extra: dict[str, Any],
          key_order: tuple[str, ...] | None) -> dict[str, Any]:
    """Build one JSON object: the file's key order when known, the schema order otherwise.

    Optional keys that were absent from the file and are still None stay absent, so loading
    and saving a file does not add lines to it.
    """
    if key_order is None:
        out = dict(fields)
        out.update(extra)
        return out
    known = dict(fields)
    out = {}
    for key in key_order:
        if key in known:
            out[key] = known[key]
        elif key in extra:
            out[key] = extra[key]
    for key, value in fields:
        if key not in out and (key not in optional or value is not None):
            out[key] = value
    for key, value in extra.items():
        out.setdefault(key, value)
    return out


@dataclass(frozen=True)
class Problem:
    """One problem in a collection, located by a dotted path into the JSON."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


@dataclass
class AssociatedMasks:
    """Optional masks of an image; paths exactly as stored (may start with `$VAR`)."""

    anatomy_mask: str | None = None
    anonymization_mask: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return emit_fields([("anatomy_mask", self.anatomy_mask), ("anonymization_mask", self.anonymization_mask)],
                     frozenset({"anatomy_mask", "anonymization_mask"}), self.extra, self.key_order)


@dataclass
class ImageEntry:
    name: str
    image_path: str
    modality: str | None = None
    image_info: dict[str, Any] | None = None
    associated_masks: AssociatedMasks | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        masks = None if self.associated_masks is None else self.associated_masks.to_dict()
        return emit_fields([("name", self.name), ("modality", self.modality), ("image_info", self.image_info),
                      ("image_path", self.image_path), ("associated_masks", masks)],
                     frozenset({"image_info", "associated_masks"}), self.extra, self.key_order)


@dataclass
class Session:
    session_id: str
    session_info: dict[str, Any] | None = None
    images: list[ImageEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return emit_fields([("session_id", self.session_id), ("session_info", self.session_info),
                      ("images", [image.to_dict() for image in self.images])],
                     frozenset({"session_info"}), self.extra, self.key_order)


@dataclass
class Subject:
    subject_id: str
    subject_info: dict[str, Any] | None = None
    sessions: dict[str, Session] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return emit_fields([("subject_id", self.subject_id), ("subject_info", self.subject_info),
                      ("sessions", {k: s.to_dict() for k, s in self.sessions.items()})],
                     frozenset({"subject_info"}), self.extra, self.key_order)


@dataclass
class DatasetEntry:
    dataset_index: str
    name: str | None = None
    dataset_info: dict[str, Any] | None = None
    subjects: dict[str, Subject] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return emit_fields([("dataset_index", self.dataset_index), ("name", self.name),
                      ("dataset_info", self.dataset_info),
                      ("subjects", {k: s.to_dict() for k, s in self.subjects.items()})],
                     frozenset({"name", "dataset_info"}), self.extra, self.key_order)


@dataclass(frozen=True)
class FlatImage:
    """One image with everything needed to identify it, in file order (see `iter_images`)."""

    image_id: str
    subject_key: str
    collection_name: str
    dataset_key: str
    subject_id: str
    session_id: str
    entry: ImageEntry
    location: str

    def image_path(self) -> Path:
        return resolve_path(self.entry.image_path)

    def anatomy_mask_path(self) -> Path | None:
        masks = self.entry.associated_masks
        return None if masks is None or masks.anatomy_mask is None else resolve_path(masks.anatomy_mask)

    def anonymization_mask_path(self) -> Path | None:
        masks = self.entry.associated_masks
        if masks is None or masks.anonymization_mask is None:
            return None
        return resolve_path(masks.anonymization_mask)
