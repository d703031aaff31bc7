"""The `pretrain_data.json` model: a collection of datasets of subjects of sessions of images.

The format is the reference nnssl's (see documentation/dataset_format.md), so files written by
it, including the OpenMind collection, load unchanged and `to_dict()` gives back the same JSON,
key order included: the reference writes some files with sorted keys and others in dataclass
order, and a diff of a re-saved file should show only real changes. Keys we do not know are
kept in `extra` and written back where they were.

Structural checks (types, required keys) happen in `Collection.from_dict`; semantic checks
(duplicate ids, missing files, unset `$VAR`s) in `Collection.validate`. Both report every
problem at once with its location, because a collection of 100k images fixed one error per run
is unusable. The checks live in `collection_validate.py`, the entries in `entries.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnssl.data.collection_validate import non_finite_locations, parse_collection, raise_problems, semantic_problems
from nnssl.data.entries import (  # noqa: F401
    IMAGE_ID_SEPARATOR,
    NO_MODALITY,
    AssociatedMasks,
    DatasetEntry,
    FlatImage,
    ImageEntry,
    Problem,
    Session,
    Subject,
    emit_fields,
    make_image_id,
    portable_path,
    resolve_path,
    split_variable,
)
from nnssl.errors import InvalidInput, NnsslError
from nnssl.io_utils import write_json


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
        index, name, datasets, extra, key_order = parse_collection(data, source)
        return cls(index, name, datasets, extra, key_order=key_order, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: exact schema, the loaded file's key order, unknown keys kept.

        Free-form values (`*_info`, extras) are shared with this object, not copied.
        """
        return emit_fields([("collection_index", self.collection_index), ("collection_name", self.collection_name),
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
        data = self.to_dict()
        parse_collection(data, f"{path} (not written)")
        write_collection_dict(data, path, portable)

    # ------------------------------------------------------------------------- checking
    def validate(self, check_files: bool = True) -> list[Problem]:
        """Every semantic problem (never raises for data problems).

        With `check_files=False` neither the environment nor the filesystem is looked at.
        """
        return semantic_problems(self, check_files)

    def check(self, check_files: bool = True) -> None:
        """Raise `InvalidInput` listing all problems found by `validate`, if any."""
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


def write_collection_dict(data: dict[str, Any], path: str | os.PathLike, portable: bool = True) -> None:
    """Write the JSON of a collection (`Collection.to_dict()`, possibly edited) atomically, naming
    any NaN / Infinity. Unlike `Collection.save` it does not parse the data again: for callers
    that only replaced paths in a `to_dict()` result, where a second parse of a 100k-image
    collection would cost a copy of it for nothing."""
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
