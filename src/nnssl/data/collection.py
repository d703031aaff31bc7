"""The `pretrain_data.json` model: a collection of datasets of subjects of sessions of images.

The format is the reference nnssl's (see documentation/dataset_format.md), so files written by
it, including the OpenMind collection, load unchanged and `to_dict()` gives back the same JSON,
key order included: the reference writes some files with sorted keys and others in dataclass
order, and a diff of a re-saved file should show only real changes. Keys we do not know are
kept in `extra` and written back where they were.

Structural checks (types, required keys) happen in `Collection.from_dict`; semantic checks
(duplicate ids, missing files, unset `$VAR`s) in `Collection.validate`. Both report every
problem at once with its location, because a collection of 100k images fixed one error per run
is unusable. The checks themselves live in `collection_validate.py`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from nnssl.errors import InvalidInput, MissingEnvironmentVariable, NnsslError
from nnssl.io_utils import write_json
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
def _emit(fields: list[tuple[str, Any]], optional: frozenset[str], extra: dict[str, Any],
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
        return _emit([("anatomy_mask", self.anatomy_mask), ("anonymization_mask", self.anonymization_mask)],
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
        return _emit([("name", self.name), ("modality", self.modality), ("image_info", self.image_info),
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
        return _emit([("session_id", self.session_id), ("session_info", self.session_info),
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
        return _emit([("subject_id", self.subject_id), ("subject_info", self.subject_info),
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
        return _emit([("dataset_index", self.dataset_index), ("name", self.name),
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


@dataclass
class Collection:
    """A whole pretrain_data.json. `source` names the file in error messages."""

    collection_index: int
    collection_name: str
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    source: str = field(default="<collection>", repr=False, compare=False)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Collection:
        """Parse JSON data; raise `InvalidInput` listing every structural problem."""
        from nnssl.data.collection_validate import parse_collection

        return parse_collection(data, source)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: exact schema, the loaded file's key order, unknown keys kept.

        Free-form values (`*_info`, extras) are shared with this object, not copied.
        """
        return _emit([("collection_index", self.collection_index), ("collection_name", self.collection_name),
                      ("datasets", {k: d.to_dict() for k, d in self.datasets.items()})],
                     frozenset(), self.extra, self.key_order)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Collection:
        """Read and structurally check a pretrain_data.json."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NnsslError(
                f"{path} does not exist. Create it with nnssl_create_dataset or write it by hand "
                "(see documentation/dataset_format.md)."
            ) from None
        except IsADirectoryError:
            raise NnsslError(f"{path} is a folder; pass the pretrain_data.json file inside it.") from None
        except UnicodeDecodeError as e:
            raise InvalidInput(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                               "save it as UTF-8 JSON.") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInput(
                f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
                f"Fix the syntax there (`python -m json.tool {path}` points at it)."
            ) from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike, portable: bool = True) -> None:
        """Write atomically. With `portable`, absolute paths under `$nnssl_raw` /
        `$nnssl_preprocessed` are written in `$VAR/...` form so the file moves between machines.

        Refuses (InvalidInput) to write anything `load` would reject.
        """
        from nnssl.data.collection_validate import non_finite_locations, parse_collection

        data = self.to_dict()
        parse_collection(data, f"{path} (not written)")
        if portable:
            _make_paths_portable(data)
        try:
            write_json(path, data)
        except ValueError:
            places = non_finite_locations(data)
            if not places:
                raise
            raise InvalidInput(f"{path} not written: JSON has no NaN or Infinity; replace these "
                               "values with null or a number", places) from None

    # ------------------------------------------------------------------------- checking
    def validate(self, check_files: bool = True) -> list[Problem]:
        """Every semantic problem (never raises for data problems).

        With `check_files=False` neither the environment nor the filesystem is looked at.
        """
        from nnssl.data.collection_validate import semantic_problems

        return semantic_problems(self, check_files)

    def check(self, check_files: bool = True) -> None:
        """Raise `InvalidInput` listing all problems found by `validate`, if any."""
        from nnssl.data.collection_validate import raise_problems

        raise_problems(self.validate(check_files), f"{self.source}: {{n}} problem(s) in pretrain_data.json")

    # --------------------------------------------------------------------------- views
    def iter_images(self) -> Iterator[FlatImage]:
        """Every image in file order, with its unique id and the subject key used for splits."""
        for ds_key, dataset in self.datasets.items():
            for sub_key, subject in dataset.subjects.items():
                subject_key = make_image_id(self.collection_name, ds_key, subject.subject_id)
                for ses_key, session in subject.sessions.items():
                    prefix = f"datasets.{ds_key}.subjects.{sub_key}.sessions.{ses_key}.images"
                    for i, entry in enumerate(session.images):
                        yield FlatImage(
                            image_id=make_image_id(subject_key, session.session_id, entry.name),
                            subject_key=subject_key,
                            collection_name=self.collection_name,
                            dataset_key=ds_key,
                            subject_id=subject.subject_id,
                            session_id=session.session_id,
                            entry=entry,
                            location=f"{prefix}[{i}]",
                        )

    def num_subjects(self) -> int:
        return sum(len(d.subjects) for d in self.datasets.values())

    def num_sessions(self) -> int:
        return sum(len(s.sessions) for d in self.datasets.values() for s in d.subjects.values())

    def num_images(self) -> int:
        return sum(len(t.images) for d in self.datasets.values() for s in d.subjects.values()
                   for t in s.sessions.values())

    def modalities(self) -> dict[str, int]:
        """Image count per modality, most frequent first; null modality counts as 'unknown'."""
        counts: dict[str, int] = {}
        for flat in self.iter_images():
            key = flat.entry.modality if flat.entry.modality is not None else NO_MODALITY
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> dict[str, Any]:
        """Counts for printing (plain types, JSON-serialisable)."""
        anatomy = anonymization = 0
        for flat in self.iter_images():
            masks = flat.entry.associated_masks
            if masks is not None:
                anatomy += masks.anatomy_mask is not None
                anonymization += masks.anonymization_mask is not None
        return {
            "collection_name": self.collection_name,
            "collection_index": self.collection_index,
            "datasets": len(self.datasets),
            "subjects": self.num_subjects(),
            "sessions": self.num_sessions(),
            "images": self.num_images(),
            "modalities": self.modalities(),
            "anatomy_masks": anatomy,
            "anonymization_masks": anonymization,
        }


def _make_paths_portable(data: dict[str, Any]) -> None:
    """Rewrite image and mask paths of a `Collection.to_dict()` result in place."""
    for dataset in data["datasets"].values():
        for subject in dataset["subjects"].values():
            for session in subject["sessions"].values():
                for image in session["images"]:
                    image["image_path"] = portable_path(image["image_path"])
                    masks = image.get("associated_masks")
                    if masks:
                        for key in ("anatomy_mask", "anonymization_mask"):
                            if masks.get(key) is not None:
                                masks[key] = portable_path(masks[key])
