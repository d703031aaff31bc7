"""The measured stages of `benchmarks/scale.py`, one function per stage and collection size.

Each stage returns plain numbers: seconds, and memory from /proc (psutil is not a dependency):
`rss_start_mb` (this process before the stage, after imports), `peak_rss_mb` (the peak during the
stage: VmHWM, reset at the stage's start through /proc/self/clear_refs where the kernel allows)
and `peak_growth_mb` = peak - start, the stage's own cost. Workers are measured through
/proc/<pid>/smaps_rollup: RSS counts pages shared with the parent after a fork, USS (private
pages) is what a worker really adds, PSS splits the shared ones.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import pickle
import time
import tracemalloc
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------ memory


def _status(pid: int | str = "self") -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def rss_mb(pid: int | str = "self") -> float:
    return _status(pid)["VmRSS"]


def peak_mb(pid: int | str = "self") -> float:
    return _status(pid)["VmHWM"]


def smaps_mb(pid: int | str) -> dict[str, float]:
    """rss, pss and uss (Private_Clean + Private_Dirty) of a process, in MB."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": round(values["Rss"], 1), "pss_mb": round(values["Pss"], 1),
            "uss_mb": round(values["Private_Clean"] + values["Private_Dirty"], 1)}


def child_pids() -> list[int]:
    pids: list[int] = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return sorted(set(pids))


def settle() -> None:
    """Collect garbage and hand freed heap back to the system, so RSS shows what is still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Seconds and peak memory of one stage: `with Meter() as m: ...; m.result(size)`."""

    def __enter__(self) -> Meter:
        settle()
        self.peak_was_reset = reset_peak()
        self.start_mb = rss_mb()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak = peak_mb()

    def result(self, size: int) -> dict[str, Any]:
        growth = self.peak - self.start_mb
        return {"seconds": round(self.seconds, 3), "rss_start_mb": round(self.start_mb, 1),
                "peak_rss_mb": round(self.peak, 1), "peak_growth_mb": round(growth, 1),
                "peak_growth_kb_per_case": round(1024 * growth / size, 3), "peak_was_reset": self.peak_was_reset}


# ------------------------------------------------------------------------------------ stages


def collection_stage(path: Path, size: int) -> dict[str, Any]:
    """`Collection.load` + `validate` (files included: one stat per path) of pretrain_data.json."""
    from nnssl.data.collection import Collection

    with Meter() as m:
        t0 = time.perf_counter()
        collection = Collection.load(path)
        load_s = time.perf_counter() - t0
        problems = collection.validate(check_files=True)
        validate_s = time.perf_counter() - load_s - t0
    settle()
    held = rss_mb() - m.start_mb
    images = collection.num_images()
    assert images == size and not problems, (images, size, problems[:3])
    return {**m.result(size), "load_s": round(load_s, 3), "validate_s": round(validate_s, 3),
            "held_mb": round(held, 1), "held_kb_per_case": round(1024 * held / size, 3),
            "json_mb": round(path.stat().st_size / 1e6, 2)}


def fingerprint_stage(dataset: str, size: int) -> dict[str, Any]:
    """`extract_and_save_fingerprint(--clean)` (headers of every image, voxels of 50 per modality)
    and `plan_and_save`, with one process as on a login node."""
    from nnssl.preprocessing.runner import extract_and_save_fingerprint, plan_and_save

    with Meter() as fp:
        extract_and_save_fingerprint(dataset, num_processes=1, clean=True)
    with Meter() as plan:
        plan_and_save(dataset)
    out = fp.result(size)
    out["s_per_1000_images"] = round(1000 * fp.seconds / size, 3)
    out["plan"] = plan.result(size)
    return out


def preprocess_stage(dataset: str, size: int, part: int, total_parts: int) -> dict[str, Any]:
    """One shard (`preprocess(part, total_parts)`, 1 process) whose cases are all complete: what a
    shard process holds for a collection of `size` images (the collection, the running totals,
    the merge at its end), without the per-case work (measured by the real shards)."""
    from nnssl.preprocessing.runner import preprocess

    with Meter() as m:
        outcome, = preprocess(dataset, ("onemmiso",), 1, part, total_parts)
    return {**m.result(size), "cases_in_shard": outcome.total, "skipped": outcome.skipped,
            "done": outcome.done, "failed": len(outcome.failures)}


def merge_stage(dataset: str, size: int) -> dict[str, Any]:
    """`write_preprocessed_collection`: pretrain_data__onemmiso.json rebuilt from what is complete
    on disk (what every shard runs at its end), timed alone."""
    from nnssl import paths
    from nnssl.data.collection import Collection
    from nnssl.preprocessing.runner import load_plans, preprocessed_collection_path, write_preprocessed_collection

    pre = paths.nnssl_preprocessed() / dataset
    plans = load_plans(pre)
    destination = preprocessed_collection_path(pre, plans, "onemmiso")
    collection = Collection.load(paths.nnssl_raw() / dataset / "pretrain_data.json")
    with Meter() as m:
        complete = write_preprocessed_collection(collection, plans, "onemmiso",
                                                 pre / plans.configuration("onemmiso").data_identifier, destination)
    assert complete == size, f"{dataset}: {complete} of {size} cases complete on disk"
    return {**m.result(size), "complete": complete, "us_per_case": round(1e6 * m.seconds / size, 1)}


def _touch_every_case(cases, worker_init: bool, conn) -> None:
    """In a forked child: what a loader worker has done to the case list after a long run: every
    case drawn once (the record and its paths read, as `open_case` reads them), then a full
    garbage collection (which a long run triggers: it visits every object the fork inherited
    that is not frozen); the child's memory after each. With `worker_init` the child first runs
    the loader's worker initialisation, as a DataLoader worker does."""
    if worker_init:
        from nnssl.dataloading.loader import _worker_init

        _worker_init(0)
    for i in range(len(cases)):
        record = cases[i]
        str(record.image), record.image_id, record.anonymization_mask, record.anatomy_mask
    drawn = smaps_mb(os.getpid())
    gc.collect()
    conn.send({"every_case_drawn": drawn, "every_case_drawn_and_full_gc": smaps_mb(os.getpid())})
    conn.close()


def _forked_long_run(cases, worker_init: bool) -> dict[str, Any]:
    """`_touch_every_case(cases)` in a child forked from this process, as DataLoader forks a worker."""
    import multiprocessing

    reader, writer = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            _touch_every_case(cases, worker_init, writer)
        finally:
            os._exit(0)
    writer.close()
    result = reader.recv()
    os.waitpid(pid, 0)
    return result


def _allocated_mb(build):
    """(what `build()` returns, the MB of Python memory it allocated and still holds)."""
    tracemalloc.start()
    try:
        built = build()
        return built, tracemalloc.get_traced_memory()[0] / 2**20
    finally:
        tracemalloc.stop()


def _index_mb(*indexes) -> float:
    """MB of the arrays of `indexes`, buffers they share counted once."""
    arrays = {id(a): a for index in indexes for a in vars(index).values() if hasattr(a, "nbytes")}
    return sum(a.nbytes for a in arrays.values()) / 2**20


def _list_control(train) -> dict[str, Any]:
    """The representation the index replaced, measured the same way: the training cases as a
    list of `CaseRecord`s (what the loader and the sampler held before, `list(cases)`), its
    memory here and in a forked worker of that time (no frozen collector) after a long run."""
    records, allocated = _allocated_mb(lambda: list(train))
    out = {"allocated_mb": round(allocated, 1),
           "allocated_kb_per_case": round(1024 * allocated / max(1, len(records)), 3),
           "pickled_mb": round(len(pickle.dumps(records)) / 1e6, 2),
           "worker_after_long_run": _forked_long_run(records, worker_init=False)}
    del records
    settle()
    return out


def loader_stage(collection_path: Path, size: int, num_workers: int, batches: int, patch: int) -> dict[str, Any]:
    """`load_cases`, the split (drawn, then read back), `split_cases`, the loader's start-up (first
    batch) and `batches` more; the memory the case index holds in this process and in each
    worker, right after start-up and after every case was drawn once (forked like a worker); and
    the same for a list of `CaseRecord`s, the representation the index replaced."""
    from nnssl.dataloading.dataset import load_cases, make_or_load_splits, split_cases
    from nnssl.dataloading.loader import LoaderConfig, PretrainLoader

    splits_path = collection_path.parent / "splits_final.json"
    splits_path.unlink(missing_ok=True)
    out: dict[str, Any] = {}
    with Meter() as m:
        t0 = time.perf_counter()
        cases = load_cases(collection_path)
        out["load_cases_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        splits = make_or_load_splits(cases, splits_path)
        out["split_create_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        splits = make_or_load_splits(cases, splits_path)
        out["split_load_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        train, val = split_cases(cases, splits)
        out["split_cases_s"] = round(time.perf_counter() - t0, 3)
        del cases, splits
    assert len(train) + len(val) == size
    out["index"] = m.result(size)
    settle()
    held = rss_mb() - m.start_mb  # what training keeps: the train and val cases
    out["index"].update({"held_mb": round(held, 1), "held_kb_per_case": round(1024 * held / size, 3),
                         "arrays_mb": round(_index_mb(train, val), 2),
                         "arrays_kb_per_case": round(1024 * _index_mb(train, val) / size, 3),
                         "pickled_mb": round(len(pickle.dumps((train, val))) / 1e6, 2)})
    config = LoaderConfig((patch,) * 3, batch_size=2, num_workers=num_workers, pin_memory=False)
    parent_before, others = rss_mb(), set(child_pids())
    t0 = time.perf_counter()
    with PretrainLoader(train, config) as loader:
        batch_iter = iter(loader)
        next(batch_iter)
        out["loader_startup_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(batch_iter)
        out["batches_per_s"] = round(batches / (time.perf_counter() - t0), 2)
        workers = [smaps_mb(pid) for pid in child_pids() if pid not in others]
        out["parent_rss_with_loader_mb"] = round(rss_mb(), 1)
        out["parent_growth_for_loader_mb"] = round(rss_mb() - parent_before, 1)
        # a worker after a long run, forked from the loader's own index as DataLoader forks it;
        # and one that does not freeze the collector (what the freeze saves)
        long_run = _forked_long_run(loader.cases, worker_init=True)
        long_run_unfrozen = _forked_long_run(loader.cases, worker_init=False)
    out["workers_after_startup"] = workers
    out["worker_after_long_run"] = long_run
    out["worker_after_long_run_without_gc_freeze"] = long_run_unfrozen
    out["list_of_records_control"] = _list_control(train)
    return out


STAGES = {"collection": collection_stage, "fingerprint": fingerprint_stage, "preprocess": preprocess_stage,
          "merge": merge_stage, "loader": loader_stage}


def run_stage(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    for key in ("path", "collection_path"):
        if key in kwargs:
            kwargs[key] = Path(kwargs[key])
    return STAGES[name](**kwargs)


def main_child(spec: str) -> None:
    """`scale.py --_stage '{"name": ..., "kwargs": {...}}'`: one stage in a fresh process, its
    result as the last line of stdout."""
    request = json.loads(spec)
    print(json.dumps(run_stage(request["name"], request["kwargs"])), flush=True)
