"""The case index: every case of a run in a few numpy arrays instead of one Python object per case.

A list of `CaseRecord`s (a dataclass with three `Path`s, 0.8 kB per case) ends up copied into
every loader worker: after a fork the list is shared copy-on-write, but drawing a case writes its
reference counts and a full garbage collection writes every object's header, which copies the
pages that hold them. benchmarks/scale.py measured 1.1 kB per case per worker: 108 MB per worker
after every case was drawn at 100k cases, 160 MB after a collection, 1.3-1.9 GB per GPU with 12
workers. `CaseIndex` keeps the strings of all cases in one byte buffer with offset arrays (0.22 kB
per case). Workers only read the buffers, which hold no reference counts, so their pages stay
shared however long a run is (+0.07 kB per case per worker measured); a spawned worker unpickles
a few arrays instead of 100k objects. A `CaseRecord` is built on access (microseconds, a few per
batch)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

_FIELDS = ("image_id", "image", "anonymization_mask", "anatomy_mask")
_PATH_FIELDS = (1, 2, 3)  # stored without the index's common path prefix
_NONE = -1  # length of a field that is None (a missing mask)


@dataclass(frozen=True)
class CaseRecord:
    """One preprocessed image: where its arrays are and which subject it belongs to."""

    image_id: str  # collection__dataset__subject__session__imagename
    subject_key: str  # collection__dataset__subject, the unit of the split
    image: Path
    anonymization_mask: Path | None = None  # voxels marked 1 were defaced: excluded from losses
    anatomy_mask: Path | None = None  # voxels marked 1 are anatomy: used for foreground sampling


class CaseIndex(Sequence[CaseRecord]):
    """A read-only sequence of `CaseRecord`s stored as arrays (see the module docstring).

    Built with `CaseIndex.from_records` (or `CaseIndex.of`, which returns an index unchanged);
    `subset` and slicing share the buffers of the index they come from.
    """

    def __init__(self, text: np.ndarray, starts: np.ndarray, lengths: np.ndarray, subject_codes: np.ndarray,
                 subject_text: np.ndarray, subject_starts: np.ndarray, prefix: str) -> None:
        self._text, self._starts, self._lengths = text, starts, lengths  # (n, 4) per field
        self._subject_codes = subject_codes  # (n,) index into the subject table
        self._subject_text, self._subject_starts = subject_text, subject_starts  # (s + 1,) offsets
        self._prefix = prefix  # common prefix of every path

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_records(cls, records: Iterable[CaseRecord]) -> CaseIndex:
        return cls.from_rows((r.image_id, r.subject_key, r.image, r.anonymization_mask, r.anatomy_mask)
                             for r in records)

    @classmethod
    def from_rows(cls, items: Iterable[tuple[str, str, str | Path, str | Path | None, str | Path | None]]
                  ) -> CaseIndex:
        """From (image_id, subject_key, image, anonymization_mask, anatomy_mask) tuples."""
        rows: list[tuple[str | None, ...]] = []
        subjects: dict[str, int] = {}
        codes: list[int] = []
        for image_id, subject_key, image, anon, anat in items:
            rows.append((image_id, str(image), None if anon is None else str(anon),
                         None if anat is None else str(anat)))
            codes.append(subjects.setdefault(subject_key, len(subjects)))
        prefix = os.path.commonprefix([row[i] for row in rows for i in _PATH_FIELDS if row[i] is not None])
        cut = len(prefix)
        flat = [value if value is None or i % len(_FIELDS) not in _PATH_FIELDS else value[cut:]
                for i, value in enumerate(v for row in rows for v in row)]
        text, offsets = _pack(flat)
        shape = (len(rows), len(_FIELDS))
        lengths = np.diff(offsets).astype(np.int32).reshape(shape)
        lengths[np.fromiter((v is None for v in flat), dtype=bool, count=len(flat)).reshape(shape)] = _NONE
        subject_text, subject_offsets = _pack(list(subjects))
        return cls(text, offsets[:-1].reshape(shape), lengths, np.asarray(codes, dtype=np.int32),
                   subject_text, subject_offsets, prefix)

    @classmethod
    def of(cls, cases: Iterable[CaseRecord]) -> CaseIndex:
        """`cases` itself when it is an index already, else an index of its records."""
        return cases if isinstance(cases, CaseIndex) else cls.from_records(cases)

    # ------------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._subject_codes)

    @overload
    def __getitem__(self, i: int) -> CaseRecord: ...
    @overload
    def __getitem__(self, i: slice) -> CaseIndex: ...

    def __getitem__(self, i: int | slice) -> CaseRecord | CaseIndex:
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"case {i} of an index of {n}")
        i = int(i) % n
        image_id, image, anon, anat = (self._field(i, f) for f in range(len(_FIELDS)))
        return CaseRecord(image_id, self.subject_key(i), Path(image),
                          None if anon is None else Path(anon), None if anat is None else Path(anat))

    def __iter__(self) -> Iterator[CaseRecord]:
        return (self[i] for i in range(len(self)))

    def _field(self, i: int, field: int) -> str | None:
        length = int(self._lengths[i, field])
        if length == _NONE:
            return None
        start = int(self._starts[i, field])
        text = self._text[start:start + length].tobytes().decode()
        return self._prefix + text if field in _PATH_FIELDS else text

    def image_id(self, i: int) -> str:
        return self._field(i, 0)  # type: ignore[return-value]

    def image_ids(self) -> Iterator[str]:
        return (self.image_id(i) for i in range(len(self)))

    def subject_key(self, i: int) -> str:
        return self._subject_name(int(self._subject_codes[i]))

    def unique_subjects(self) -> list[str]:
        """The subject keys of the cases, each once, in order of first appearance."""
        codes = np.unique(self._subject_codes, return_index=True)
        return [self.subject_key(int(i)) for i in np.sort(codes[1])]

    def subject_mask(self, subjects: Iterable[str]) -> np.ndarray:
        """(n,) bool: which cases belong to one of `subjects` (one lookup per subject, not per case)."""
        wanted = set(subjects)
        table = len(self._subject_starts) - 1
        member = np.fromiter((self._subject_name(c) in wanted for c in range(table)), dtype=bool, count=table)
        return member[self._subject_codes]

    def _subject_name(self, code: int) -> str:
        lo, hi = int(self._subject_starts[code]), int(self._subject_starts[code + 1])
        return self._subject_text[lo:hi].tobytes().decode()

    def subset(self, positions: Sequence[int] | np.ndarray) -> CaseIndex:
        """The cases at `positions`, in that order; the string buffers are shared, not copied."""
        take = np.asarray(positions, dtype=np.int64)
        return CaseIndex(self._text, self._starts[take], self._lengths[take], self._subject_codes[take],
                         self._subject_text, self._subject_starts, self._prefix)

    def __add__(self, other: Iterable[CaseRecord]) -> CaseIndex:
        """Concatenation, as for lists (`train + val`)."""
        return CaseIndex.from_records([*self, *other])

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the buffers of a subset count in full: they are shared)."""
        arrays = (self._text, self._starts, self._lengths, self._subject_codes, self._subject_text,
                  self._subject_starts)
        return sum(a.nbytes for a in arrays) + len(self._prefix)

    def __repr__(self) -> str:
        return f"CaseIndex({len(self)} cases, {self.nbytes / 1e6:.1f} MB)"


def _pack(strings: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 buffer of the UTF-8 strings concatenated, int64 offsets of length n + 1); None
    takes no bytes."""
    encoded = [b"" if s is None else s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets
