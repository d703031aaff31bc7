"""CaseIndex: the case list as arrays, equal to the records it was built from, and shared (not
copied) by forked loader workers however many cases they draw (benchmarks/scale.py measured
1.1 kB per case per worker for a list of CaseRecords, 0.07 kB for the index)."""

from __future__ import annotations

import gc
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from nnssl.dataloading.case_index import CaseIndex, CaseRecord
from nnssl.dataloading.dataset import make_or_load_splits, split_cases
from nnssl.dataloading.loader import LoaderConfig, PretrainLoader
from nnssl.dataloading.sampling import PatchSampler, SampleSpec


def _records(n: int, root: str = "/data/pre/nnsslPlans_onemmiso/C") -> list[CaseRecord]:
    out = []
    for i in range(n):
        subject = f"C__ds{i % 7}__sub-{i // 3:05d}"
        stem = f"{root}/ds{i % 7}/sub-{i // 3:05d}/ses-{i % 3}/img{i}"
        out.append(CaseRecord(f"{subject}__ses-{i % 3}__img{i}.nii.gz", subject, Path(f"{stem}.b2nd"),
                              Path(f"{stem}__anon.b2nd") if i % 2 else None,
                              Path(f"{stem}__anat.b2nd") if i % 3 else None))
    return out


def test_index_gives_back_the_records_it_was_built_from():
    records = _records(50) + [CaseRecord("ü__d__s__t__ä.nii.gz", "ü__d__s", Path("relative/ä.b2nd"))]
    index = CaseIndex.from_records(records)
    assert len(index) == 51 and list(index) == records
    assert index[-1] == records[-1] and index[7] == records[7]
    with pytest.raises(IndexError):
        index[51]
    single = CaseIndex.from_records(records[:1])  # the common prefix is the whole path
    assert list(single) == records[:1]
    assert list(CaseIndex.from_records([])) == []


def test_subsets_slices_and_concatenation_share_or_rebuild_correctly():
    records = _records(30)
    index = CaseIndex.from_records(records)
    part = index.subset([5, 2, 29])
    assert list(part) == [records[5], records[2], records[29]]
    assert part._text is index._text  # the strings are shared, not copied
    assert list(index[3:9:2]) == records[3:9:2]
    assert list(index[:10] + index[20:]) == records[:10] + records[20:]
    assert CaseIndex.of(index) is index
    assert list(index.image_ids()) == [r.image_id for r in records]


def test_subjects_and_the_split_by_subject(tmp_path):
    records = _records(60)
    index = CaseIndex.from_records(records)
    assert index.unique_subjects() == list(dict.fromkeys(r.subject_key for r in records))
    wanted = {records[0].subject_key, records[40].subject_key}
    assert list(index.subject_mask(wanted)) == [r.subject_key in wanted for r in records]
    splits = make_or_load_splits(index, tmp_path / "splits_final.json", seed=3)
    train, val = split_cases(index, splits)
    assert isinstance(train, CaseIndex) and len(train) + len(val) == 60
    assert list(train) == [r for r in records if r.subject_key in set(splits["train"])]
    assert list(val) == [r for r in records if r.subject_key in set(splits["val"])]
    # a plain list is accepted as before and gives the same split
    assert [list(x) for x in split_cases(records, splits)] == [list(train), list(val)]


def _unpickled_bytes(data: bytes) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        obj = pickle.loads(data)
        size = tracemalloc.get_traced_memory()[0] - before
        del obj
        return size
    finally:
        tracemalloc.stop()


def test_a_spawned_worker_rebuilds_a_fraction_of_the_memory_of_a_list():
    records = _records(1000)
    index = CaseIndex.from_records(records)
    assert list(pickle.loads(pickle.dumps(index))) == records
    # what each spawned worker allocates for the case list it receives
    assert _unpickled_bytes(pickle.dumps(index)) < _unpickled_bytes(pickle.dumps(records)) / 5


def test_the_sampler_and_the_loader_keep_the_index_instead_of_copying_it():
    index = CaseIndex.from_records(_records(10))
    assert PatchSampler(index, SampleSpec((8, 8, 8))).cases is index
    loader = PretrainLoader(index, LoaderConfig((8, 8, 8), batch_size=1, num_workers=0))
    assert loader.cases is index
    assert isinstance(PatchSampler(_records(3), SampleSpec((8, 8, 8))).cases, CaseIndex)


def _new_tracked_objects(build) -> tuple[object, int]:
    """(what `build()` returns, how many garbage-collected objects it added)."""
    gc.collect()
    before = len(gc.get_objects())
    built = build()
    gc.collect()
    return built, len(gc.get_objects()) - before


def test_the_index_holds_no_python_object_per_case():
    # The root of the copy-on-write trap: a forked worker writes to every object it touches
    # (reference counts) and a full collection visits every tracked one, so per-case objects
    # get copied into every worker, while numpy buffers are only read and stay shared
    # (benchmarks/scale.py measures the workers' memory).
    records, per_list = _new_tracked_objects(lambda: _records(5_000))
    index, per_index = _new_tracked_objects(lambda: CaseIndex.from_records(records))
    assert per_list > 5_000  # the control: one record (and its paths) per case
    assert per_index < 50
    train, val = split_cases(index, {"train": index.unique_subjects()[::2], "val": index.unique_subjects()[1::2]})
    assert train._text is index._text and val._text is index._text  # subsets share the strings


def test_nbytes_is_hundreds_of_bytes_per_case():
    index = CaseIndex.from_records(_records(10_000))
    assert index.nbytes / len(index) < 250
    assert np.asarray(index._lengths).dtype == np.int32


def _freeze_count_after_worker_init(conn) -> None:
    from nnssl.dataloading.loader import _worker_init

    _worker_init(0)
    cycle: list = []
    cycle.append(cycle)
    del cycle
    conn.send((gc.get_freeze_count(), gc.collect()))  # the worker's own garbage is still collected
    conn.close()


def test_a_loader_worker_keeps_the_collector_off_what_it_inherited():
    # A full collection in a forked worker would write to every inherited object (about 50 MB
    # per worker of a process with torch imported, measured by benchmarks/scale.py); the worker
    # freezes them.
    import multiprocessing

    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_freeze_count_after_worker_init, args=(writer,))
    child.start()
    frozen, collected = reader.recv()
    child.join()
    assert frozen > 1000 and collected >= 1
