"""Checks of pretrain_data.json: structure while parsing, semantics on a parsed collection.

Both collect every problem before raising, each with a dotted location such as
`datasets.ds000001.subjects.sub-01.sessions.ses-01.images[2].image_path`, so one run lists all
that needs fixing. The rules follow the reference nnssl's reader: what it requires
(`dataset_index`, `modality`, `name`, `image_path`, ...) we require; what it ignores
(inner `subject_id` / `session_id`, which it takes from the enclosing key) may be absent.
"""

from __future__ import annotations

import math
import os
import stat
from typing import TYPE_CHECKING, Any, NamedTuple

from nnssl.data.entries import (
    AssociatedMasks,
    DatasetEntry,
    ImageEntry,
    Problem,
    Session,
    Subject,
    make_image_id,
    resolve_path,
    split_variable,
)
from nnssl.errors import InvalidInput

if TYPE_CHECKING:
    from nnssl.data.collection import Collection

# An error message listing 100k lines helps nobody; the count of the rest is still given.
MAX_LISTED_PROBLEMS = 200

COLLECTION_KEYS = frozenset({"collection_index", "collection_name", "datasets"})
DATASET_KEYS = frozenset({"dataset_index", "name", "dataset_info", "subjects"})
SUBJECT_KEYS = frozenset({"subject_id", "subject_info", "sessions"})
SESSION_KEYS = frozenset({"session_id", "session_info", "images"})
IMAGE_KEYS = frozenset({"name", "image_path", "modality", "image_info", "associated_masks"})
MASK_KEYS = frozenset({"anatomy_mask", "anonymization_mask"})

_KIND_TEXT = {"string": "a string", "integer": "an integer", "object": "an object {...}", "list": "a list [...]"}
_KIND_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "integer": int, "object": dict, "list": list}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:60]!r}" if len(value) <= 60 else f"the string {value[:57]!r}..."
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _accepts(kind: str, value: Any) -> bool:
    if kind == "integer" and isinstance(value, bool):
        return False  # JSON true/false are not indices, although bool subclasses int in Python
    return isinstance(value, _KIND_TYPES[kind])


def raise_problems(problems: list[Problem], header: str) -> None:
    """Raise InvalidInput with `header` (may contain `{n}`) and the problems, if there are any.

    The exception carries the complete list as `all_problems`; the message lists at most
    MAX_LISTED_PROBLEMS of them.
    """
    if not problems:
        return
    listed = [str(p) for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        listed.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more problems not listed here")
    error = InvalidInput(
        header.format(n=len(problems)) + "; fix them (see documentation/dataset_format.md):", listed
    )
    error.all_problems = list(problems)  # type: ignore[attr-defined]
    raise error


class _Parser:
    """Builds the model from JSON data, recording problems instead of stopping at the first."""

    _MISSING = object()

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self._orders: dict[tuple[str, ...], tuple[str, ...]] = {}

    def add(self, location: str, message: str) -> None:
        self.problems.append(Problem(location, message))

    def order(self, obj: dict[str, Any]) -> tuple[str, ...]:
        # Share one tuple per distinct key order: a 100k-image file has only a handful.
        keys = tuple(obj)
        return self._orders.setdefault(keys, keys)

    def field(self, obj: dict[str, Any], key: str, where: str, kind: str, *, required: bool = True,
              nullable: bool = False, nonempty: bool = False) -> Any:
        """The value of `key`, or None after recording why it is unusable."""
        location = f"{where}.{key}" if where else key
        if key not in obj:
            if required:
                self.add(location, f"required key is missing; add it ({_KIND_TEXT[kind]})")
            return None
        value = obj[key]
        if value is None and nullable:
            return None
        if not _accepts(kind, value):
            expected = _KIND_TEXT[kind] + (" or null" if nullable else "")
            self.add(location, f"must be {expected}, got {_describe(value)}")
            return None
        if nonempty and kind == "string" and value.strip() == "":
            self.add(location, "must not be empty" + ("; use null for none" if nullable else ""))
        return value

    def identifier(self, obj: dict[str, Any], key: str, where: str, dict_key: str, required: bool) -> str:
        """An inner id that must equal the key it is stored under (the reference uses the key)."""
        if key not in obj and not required:
            return dict_key
        value = self.field(obj, key, where, "string", required=required)
        if value is not None and value != dict_key:
            self.add(f"{where}.{key}", f"{key} {value!r} differs from the key {dict_key!r} it is stored "
                                      "under; make them equal (ids and output folders use the key)")
        return dict_key

    def container(self, obj: Any, where: str, what: str) -> bool:
        if isinstance(obj, dict):
            return True
        self.add(where, f"must be an object {{...}} describing {what}, got {_describe(obj)}")
        return False

    # -------------------------------------------------------------------------- levels
    def collection(self, data: dict[str, Any], source: str) -> CollectionParts:
        index = self.field(data, "collection_index", "", "integer")
        name = self.field(data, "collection_name", "", "string", nonempty=True)
        datasets: dict[str, DatasetEntry] = {}
        for key, raw in (self.field(data, "datasets", "", "object") or {}).items():
            if self.container(raw, f"datasets.{key}", "a dataset"):
                datasets[key] = self.dataset(raw, f"datasets.{key}", key)
        extra = {k: v for k, v in data.items() if k not in COLLECTION_KEYS}
        return CollectionParts(index, name, datasets, extra, self.order(data))

    def dataset(self, raw: dict[str, Any], where: str, key: str) -> DatasetEntry:
        index = self.identifier(raw, "dataset_index", where, key, required=True)
        name = self.field(raw, "name", where, "string", required=False, nullable=True)
        info = self.field(raw, "dataset_info", where, "object", required=False, nullable=True)
        subjects: dict[str, Subject] = {}
        for sub_key, sub_raw in (self.field(raw, "subjects", where, "object") or {}).items():
            sub_where = f"{where}.subjects.{sub_key}"
            if self.container(sub_raw, sub_where, "a subject"):
                subjects[sub_key] = self.subject(sub_raw, sub_where, sub_key)
        extra = {k: v for k, v in raw.items() if k not in DATASET_KEYS}
        return DatasetEntry(index, name, info, subjects, extra, key_order=self.order(raw))

    def subject(self, raw: dict[str, Any], where: str, key: str) -> Subject:
        subject_id = self.identifier(raw, "subject_id", where, key, required=False)
        info = self.field(raw, "subject_info", where, "object", required=False, nullable=True)
        sessions: dict[str, Session] = {}
        for ses_key, ses_raw in (self.field(raw, "sessions", where, "object") or {}).items():
            ses_where = f"{where}.sessions.{ses_key}"
            if self.container(ses_raw, ses_where, "a session"):
                sessions[ses_key] = self.session(ses_raw, ses_where, ses_key)
        extra = {k: v for k, v in raw.items() if k not in SUBJECT_KEYS}
        return Subject(subject_id, info, sessions, extra, key_order=self.order(raw))

    def session(self, raw: dict[str, Any], where: str, key: str) -> Session:
        session_id = self.identifier(raw, "session_id", where, key, required=False)
        info = self.field(raw, "session_info", where, "object", required=False, nullable=True)
        images: list[ImageEntry] = []
        for i, img_raw in enumerate(self.field(raw, "images", where, "list") or []):
            img_where = f"{where}.images[{i}]"
            if self.container(img_raw, img_where, "an image"):
                images.append(self.image(img_raw, img_where))
        extra = {k: v for k, v in raw.items() if k not in SESSION_KEYS}
        return Session(session_id, info, images, extra, key_order=self.order(raw))

    def image(self, raw: dict[str, Any], where: str) -> ImageEntry:
        name = self.field(raw, "name", where, "string", nonempty=True)
        if name and ("/" in name or "\\" in name):
            self.add(f"{where}.name", f"name {name!r} must be a file name without '/' or '\\' "
                                      "(it names the preprocessed file); put folders in image_path")
        image_path = self.field(raw, "image_path", where, "string", nonempty=True)
        modality = self.field(raw, "modality", where, "string", nullable=True, nonempty=True)
        info = self.field(raw, "image_info", where, "object", required=False, nullable=True)
        masks_raw = self.field(raw, "associated_masks", where, "object", required=False, nullable=True)
        masks = None if masks_raw is None else self.masks(masks_raw, f"{where}.associated_masks")
        extra = {k: v for k, v in raw.items() if k not in IMAGE_KEYS}
        return ImageEntry(name, image_path, modality, info, masks, extra, key_order=self.order(raw))

    def masks(self, raw: dict[str, Any], where: str) -> AssociatedMasks:
        anatomy = self.field(raw, "anatomy_mask", where, "string", required=False, nullable=True, nonempty=True)
        anonymization = self.field(raw, "anonymization_mask", where, "string", required=False,
                                   nullable=True, nonempty=True)
        extra = {k: v for k, v in raw.items() if k not in MASK_KEYS}
        return AssociatedMasks(anatomy, anonymization, extra, key_order=self.order(raw))


class CollectionParts(NamedTuple):
    """The fields of a `Collection`, parsed (`Collection.from_dict` builds it from them)."""

    collection_index: int
    collection_name: str
    datasets: dict[str, DatasetEntry]
    extra: dict[str, Any]
    key_order: tuple[str, ...]


def parse_collection(data: Any, source: str) -> CollectionParts:
    """The parts of a Collection from JSON data, or InvalidInput listing every structural problem."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: pretrain_data.json must hold a JSON object {{...}} at the top "
                           f"level, got {_describe(data)} (see documentation/dataset_format.md)")
    parser = _Parser()
    collection = parser.collection(data, source)
    raise_problems(parser.problems, f"{source}: {{n}} structural problem(s) in pretrain_data.json")
    return collection


# ------------------------------------------------------------------------------ semantics
class _SemanticChecker:
    def __init__(self, check_files: bool) -> None:
        self.check_files = check_files
        self.problems: list[Problem] = []
        self.first_location_of_id: dict[str, str] = {}
        # variable name -> [index of its problem in self.problems, number of uses, first path]
        self.unset: dict[str, list[Any]] = {}

    def add(self, location: str, message: str) -> None:
        self.problems.append(Problem(location, message))

    def run(self, collection: Collection) -> list[Problem]:
        if not collection.datasets:
            self.add("datasets", "no images: the collection has no datasets; add at least one")
        for ds_key, dataset in collection.datasets.items():
            ds_where = f"datasets.{ds_key}"
            if not dataset.subjects:
                self.add(ds_where, "no images: the dataset has no subjects; add some or remove the dataset")
            for sub_key, subject in dataset.subjects.items():
                sub_where = f"{ds_where}.subjects.{sub_key}"
                if not subject.sessions:
                    self.add(sub_where, "no images: the subject has no sessions; add some or remove the subject")
                subject_key = make_image_id(collection.collection_name, ds_key, subject.subject_id)
                for ses_key, session in subject.sessions.items():
                    ses_where = f"{sub_where}.sessions.{ses_key}"
                    if not session.images:
                        self.add(ses_where, "no images: the session's image list is empty; add images "
                                            "or remove the session")
                    for i, entry in enumerate(session.images):
                        image_id = make_image_id(subject_key, session.session_id, entry.name)
                        self.image(entry, image_id, f"{ses_where}.images[{i}]")
        for name, (index, count, first) in self.unset.items():
            self.problems[index] = Problem(
                self.problems[index].location,
                f"environment variable '{name}' is not set, so the {count} path(s) starting with "
                f"${name} cannot be resolved (first: {first}); set it, e.g. `export {name}=/path/to/folder`",
            )
        return self.problems

    def image(self, entry: ImageEntry, image_id: str, where: str) -> None:
        first = self.first_location_of_id.setdefault(image_id, where)
        if first != where:
            self.add(where, f"duplicate image id {image_id!r} (also at {first}); give every image of a "
                            "session a different name")
        image_key = self.path(entry.image_path, f"{where}.image_path")
        masks = entry.associated_masks
        if masks is None:
            return
        for field_name in ("anatomy_mask", "anonymization_mask"):
            raw = getattr(masks, field_name)
            if raw is None:
                continue
            location = f"{where}.associated_masks.{field_name}"
            mask_key = self.path(raw, location)
            if image_key is not None and mask_key == image_key:
                self.add(location, f"{field_name} is the image itself ({raw}); point it to the mask "
                                   "file or set it to null")

    def path(self, raw: str, location: str) -> str | None:
        """Check one stored path; return a normalised form for equality tests (None if unknown)."""
        variable, _ = split_variable(raw)
        if variable is None and not raw.startswith(("/", "~")):
            self.add(location, f"relative path {raw!r}; write it absolute or as $nnssl_raw/..., because "
                               "a relative path depends on the folder a command is started from")
            return os.path.normpath(raw)
        if not self.check_files:
            return os.path.normpath(raw)
        if variable is not None and not os.environ.get(variable, "").strip():
            if variable in self.unset:
                self.unset[variable][1] += 1
            else:
                self.unset[variable] = [len(self.problems), 1, raw]
                self.add(location, "")  # message filled in once all uses are counted
            return None
        resolved = resolve_path(raw)
        shown = f"{resolved}" if str(resolved) == raw else f"{resolved} (path in file: {raw})"
        try:
            mode = os.stat(resolved).st_mode
        except FileNotFoundError:
            self.add(location, f"file not found: {shown}")
        except OSError as e:
            self.add(location, f"cannot access ({e.strerror}): {shown}")
        else:
            if not stat.S_ISREG(mode):
                self.add(location, f"not a regular file (a folder?): {shown}")
        return os.path.normpath(resolved)


def semantic_problems(collection: Collection, check_files: bool = True) -> list[Problem]:
    """All semantic problems of a structurally valid collection, in file order."""
    return _SemanticChecker(check_files).run(collection)


def non_finite_locations(data: Any, where: str = "") -> list[str]:
    """Locations of NaN / Infinity numbers, which JSON cannot hold (Python's json writes them anyway)."""
    found: list[str] = []
    if isinstance(data, float) and not math.isfinite(data):
        found.append(f"{where or '<top>'}: {data}")
    elif isinstance(data, dict):
        for key, value in data.items():
            found.extend(non_finite_locations(value, f"{where}.{key}" if where else str(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(non_finite_locations(value, f"{where}[{i}]"))
    return found
