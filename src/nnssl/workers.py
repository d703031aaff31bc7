"""Worker processes for fingerprinting and preprocessing, with a bounded number of jobs in flight.

`ProcessPoolExecutor.map` submits every job at once and yields in order: the parent then holds a
future per case (114k for OpenMind) and the progress bar stalls behind one slow case. `imap`
keeps at most a few jobs per worker in flight and yields results as they finish, so the
parent's memory does not grow with the number of cases.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from nnssl.errors import NnsslError

IN_FLIGHT_PER_WORKER = 2  # one running, one queued: a worker never waits for the parent
# Imported once by the fork server, so each worker starts as a fork with them loaded instead of
# importing numpy/blosc2/SimpleITK/nibabel itself (~1 s per pool on two shared cores). Safe: they
# start no threads at import.
PRELOAD = ["__main__", "nnssl.preprocessing.case", "nnssl.planning.fingerprint"]  # __main__: the default


def _init_worker() -> None:
    """Workers compress single-threaded: parallelism comes from the processes. OMP_NUM_THREADS
    covers torch, imported only by the optional `torch_linear` resampling, before its import."""
    import blosc2

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    blosc2.set_nthreads(1)


def worker_pool(num_processes: int) -> ProcessPoolExecutor:
    """A pool whose workers start from a clean process ("forkserver"), never from a fork of the
    caller: a parent that already used torch (OpenMP) or blosc2 threads would hang forked
    children on their first parallel region."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # takes effect when the (per-process) server starts
    return ProcessPoolExecutor(max_workers=num_processes, mp_context=context, initializer=_init_worker)


def imap(fn: Callable[[Any], Any], jobs: Iterable[Any], num_processes: int,
         describe: Callable[[Any], str] = repr) -> Iterator[Any]:
    """`fn(job)` for every job, results in completion order.

    With one process the jobs run here, in the caller, leaving its thread settings alone. A
    worker that dies (killed for memory, crashed in a C library) ends the run with an error
    naming the jobs that were in flight (`describe(job)`), instead of "process pool broken".
    """
    if num_processes <= 1:
        yield from map(fn, jobs)
        return
    jobs = iter(jobs)
    with worker_pool(num_processes) as pool:
        pending: dict[Future, Any] = {}
        limit = IN_FLIGHT_PER_WORKER * num_processes
        while True:
            for job in jobs:
                pending[pool.submit(fn, job)] = job
                if len(pending) >= limit:
                    break
            if not pending:
                return
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    result = future.result()
                except BrokenProcessPool as e:
                    suspects = "; ".join(describe(job) for job in pending.values())
                    raise NnsslError(f"a worker process died (killed by the system, e.g. out of memory, or "
                                     f"crashed) while working on one of: {suspects}. Rerun to resume; if it "
                                     "happens again, check that case or use fewer processes") from e
                del pending[future]
                yield result
