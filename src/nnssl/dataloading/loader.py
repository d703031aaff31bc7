"""The pretraining loader: batches for steps [start_step, end_step) from N worker processes.

Why torch's DataLoader (over an IterableDataset) and not our own pool: it already handles
forking, shared-memory tensor transfer, the pin-memory thread, prefetching, worker-death
detection (naming the signal) and shutdown when the iterator is dropped. What it lacks we add:
- step-indexed work: worker w of N builds steps start + w, start + w + N, ...; DataLoader hands
  results out round-robin, so batches arrive in step order and batch k is a pure function of
  (seed, rank, k) whatever the number of workers. Resume = construct with start_step=k.
- failures in band: a worker that cannot read a case yields a `_Failure` record (case id, file,
  reason, worker traceback) at that step and stops; the main process re-raises it as the
  original exception type (`CaseReadError` for bad data), never "worker is no longer alive"
  and never a silently substituted case.
- `blosc2.set_nthreads(1)` before the workers fork: a parent that decompressed with blosc2
  threads leaves their locks held in the children, which then deadlock on their first read.
- augmentation on the training device (`augment_on_device`, the default with CUDA): workers
  yield `RawBatch`es (raw regions + drawn parameters) and `batch.to(device)` augments there
  (`device_augment.py`), so workers only read and decompress.
- memory shared with the parent stays shared: the cases are a `CaseIndex` (arrays, no object
  per case) and each worker freezes the garbage collector's view of what it inherited
  (`_worker_init`), so a long run does not copy the parent's objects into every worker.
"""

from __future__ import annotations

import gc
import math
import os
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import blosc2
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nnssl.dataloading.augment import AugmentConfig
from nnssl.dataloading.batch import Batch
from nnssl.dataloading.case_index import CaseIndex
from nnssl.dataloading.dataset import CaseRecord
from nnssl.dataloading.device_augment import RawBatch
from nnssl.dataloading.patches import CaseReadError
from nnssl.dataloading.sampling import FOREGROUND_PROBABILITY, PatchSampler, SampleError, SampleSpec
from nnssl.errors import InvalidInput
from nnssl.log import get_logger

logger = get_logger(__name__)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container / taskset limits
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers(world_size: int = 1) -> int:
    """One worker per CPU this rank may use, minus one for the training process, at most 12
    (beyond that, prefetched batches cost more memory than they save time)."""
    return max(1, min(12, available_cpus() // max(world_size, 1) - 1))


@dataclass(frozen=True)
class LoaderSettings:
    """Sampling settings of a training run (section `loader` of the training configuration); the
    rest of `LoaderConfig` is geometry (from the plans) or run options (workers)."""

    foreground_probability: float = FOREGROUND_PROBABILITY
    # train only on images whose image-quality score is at most this (OpenMind's score, lower is
    # better; the reference's _IQS<X> trainers); images without a score are left out. None: all
    max_iqs: float | None = None
    # zoom / rotation / intensity on the training device instead of in the workers; None: on when
    # training on CUDA, off on the CPU (see resolve_augment_on_device)
    augment_on_device: bool | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.foreground_probability <= 1.0:
            problems.append(f"foreground_probability must be in [0, 1], got {self.foreground_probability}")
        if self.max_iqs is not None and not math.isfinite(self.max_iqs):
            problems.append(f"max_iqs must be a finite number or null, got {self.max_iqs}")
        if problems:
            raise InvalidInput("invalid loader settings:", problems)


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that decides the batches; `batch_size` is per rank."""

    patch_size: tuple[int, int, int]
    batch_size: int
    num_workers: int | None = None  # None: default_num_workers(world_size); 0: in-process
    foreground_probability: float = FOREGROUND_PROBABILITY  # share of patches centred on anatomy
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    prefetch: int = 2  # batches queued per worker
    pin_memory: bool | None = None  # None: pin when CUDA is available
    num_channels: int = 1
    # workers send raw regions, `batch.to(device)` augments (device_augment.py); None: when CUDA
    # is available (the trainer resolves it with its own device, resolve_augment_on_device)
    augment_on_device: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        problems = []
        if len(self.patch_size) != 3 or any(p < 2 for p in self.patch_size):
            problems.append(f"patch_size must be 3 sizes >= 2, got {self.patch_size}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            problems.append(f"num_workers must be >= 0 or None, got {self.num_workers}")
        if not 0.0 <= self.foreground_probability <= 1.0:
            problems.append(f"foreground_probability must be in [0, 1], got {self.foreground_probability}")
        if self.prefetch < 1:
            problems.append(f"prefetch must be >= 1, got {self.prefetch}")
        if self.num_channels < 1:
            problems.append(f"num_channels must be >= 1, got {self.num_channels}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if problems:
            raise InvalidInput("invalid data loader configuration:", problems)

    @property
    def sample_spec(self) -> SampleSpec:
        return SampleSpec(self.patch_size, self.num_channels, self.foreground_probability, self.augment)


def resolve_augment_on_device(setting: bool | None, device: torch.device | str | None = None) -> bool:
    """`augment_on_device` as set, or (None) on when the training device is CUDA; without a
    device, when CUDA is available. A CPU run augments in its workers: there the training
    process has no spare compute to give."""
    if setting is not None:
        return bool(setting)
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def build_batch(sampler: PatchSampler, config: LoaderConfig, rank: int, step: int, on_device: bool = False
                ) -> Batch | RawBatch:
    """Batch `step` of `rank`: the global samples rank·B .. rank·B + B − 1 of that step (a pure
    function of the configuration, the cases and the step, independent of the world size);
    with `on_device`, the same samples as a `RawBatch` to be augmented by `.to(device)`.

    Tensors are ordinary; torch moves them to shared memory when a worker sends them. Allocating
    them in shared memory up front measured no faster (160³, batch 8).
    """
    if on_device:
        return sampler.raw_batch(config.seed, step, config.batch_size, first_index=rank * config.batch_size)
    data = torch.empty((config.batch_size, config.num_channels, *config.patch_size), dtype=torch.float32)
    mask = torch.empty((config.batch_size, 1, *config.patch_size), dtype=torch.bool)
    infos = sampler.fill_batch(config.seed, step, data.numpy(), mask.numpy(), first_index=rank * config.batch_size)
    return Batch(data, mask, [info.image_id for info in infos], step)


@dataclass
class _Failure:
    """A worker's exception travelling in band, so it arrives at its step with its cause."""

    step: int
    kind: str  # "case" (CaseReadError), "sample" (SampleError) or "other"
    args: tuple[Any, ...]
    worker_traceback: str

    @classmethod
    def capture(cls, step: int, error: BaseException) -> _Failure:
        tb = "".join(traceback.format_exception(error))
        if isinstance(error, (CaseReadError, SampleError)):
            kind = "case" if isinstance(error, CaseReadError) else "sample"
            return cls(step, kind, (error.image_id, error.path, error.reason), tb)
        return cls(step, "other", (f"{type(error).__name__}: {error}",), tb)

    def exception(self) -> BaseException:
        if self.kind == "case":
            error: BaseException = CaseReadError(*self.args)
        elif self.kind == "sample":
            error = SampleError(*self.args)
        else:
            error = RuntimeError(f"data loading failed at step {self.step}: {self.args[0]}")
        error.add_note(f"raised while building the batch of step {self.step}:\n{self.worker_traceback}")
        return error


class _StepStream(IterableDataset):
    """Batches of steps start + w, start + w + N, ... in worker w of N."""

    def __init__(self, cases: Sequence[CaseRecord], config: LoaderConfig, rank: int,
                 start_step: int, end_step: int | None, on_device: bool) -> None:
        self.cases, self.config, self.rank = CaseIndex.of(cases), config, rank
        self.start_step, self.end_step, self.on_device = start_step, end_step, on_device

    def __iter__(self) -> Iterator[Batch | RawBatch | _Failure]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        sampler = PatchSampler(self.cases, self.config.sample_spec)
        step = self.start_step + worker
        while self.end_step is None or step < self.end_step:
            try:
                batch = build_batch(sampler, self.config, self.rank, step, self.on_device)
            except Exception as e:
                yield _Failure.capture(step, e)
                return
            yield batch
            step += num_workers


def _worker_init(worker_id: int) -> None:
    blosc2.set_nthreads(1)  # also right under "spawn", where the parent's setting is not inherited
    torch.set_num_threads(1)
    # A full garbage collection writes to the header of every object it visits, so the first one
    # in a forked worker copies every page of the parent's Python objects (about 50 MB per worker
    # with torch imported and no model, more with one; benchmarks/scale.py). Freezing moves what
    # the fork inherited out of the collector's reach (an O(1) list splice); the worker's own
    # objects are still collected.
    gc.freeze()


class PretrainLoader:
    """Iterable over `Batch` for steps [start_step, end_step) (endless when end_step is None);
    with `augment_on_device`, over `RawBatch` (`batch.to(device)` augments it into a `Batch`).

    Use as a context manager (or call `close()`) so worker processes end with the loop.
    `next_step` is the step of the next batch to be returned: store it in the checkpoint and pass
    it back as `start_step` to resume the exact stream.
    """

    def __init__(self, cases: Sequence[CaseRecord], config: LoaderConfig, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, end_step: int | None = None) -> None:
        problems = []
        if not cases:
            problems.append("no cases to load (empty train split?)")
        if not 0 <= rank < world_size:
            problems.append(f"rank must be in [0, world_size={world_size}), got {rank}")
        if start_step < 0 or (end_step is not None and end_step < start_step):
            problems.append(f"need 0 <= start_step <= end_step, got {start_step}, {end_step}")
        if problems:
            raise InvalidInput("cannot build the data loader:", problems)
        self.cases, self.config, self.rank, self.world_size = CaseIndex.of(cases), config, rank, world_size
        self.end_step = end_step
        self.next_step = start_step
        self.num_workers = (default_num_workers(world_size) if config.num_workers is None
                            else config.num_workers)
        self.pin_memory = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
        self.augment_on_device = resolve_augment_on_device(config.augment_on_device)
        self._iterator: Any = None

    def batch_at(self, step: int) -> Batch | RawBatch:
        """Batch `step` built in this process (inspection, tests); same content as the stream's."""
        return build_batch(PatchSampler(self.cases, self.config.sample_spec), self.config, self.rank, step,
                           self.augment_on_device)

    def __iter__(self) -> Iterator[Batch | RawBatch]:
        self.close()
        if self.num_workers > 0:
            blosc2.set_nthreads(1)  # before the fork, see the module docstring
        stream = _StepStream(self.cases, self.config, self.rank, self.next_step, self.end_step,
                             self.augment_on_device)
        extra = {"prefetch_factor": self.config.prefetch, "worker_init_fn": _worker_init} \
            if self.num_workers > 0 else {}
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, **extra)
        logger.debug("data loader: %d workers from step %d (rank %d), augmentation %s", self.num_workers,
                     self.next_step, self.rank, "on the device" if self.augment_on_device else "in the workers")
        self._iterator = iter(loader)
        return self._batches(self._iterator)

    def _batches(self, iterator: Iterator[Batch | RawBatch | _Failure]) -> Iterator[Batch | RawBatch]:
        try:
            for item in iterator:
                if isinstance(item, _Failure):
                    raise item.exception()
                assert item.step == self.next_step, (item.step, self.next_step)  # stream order
                self.next_step = item.step + 1
                yield item
        finally:  # error, end of range, or the consumer dropped/closed this generator
            if self._iterator is iterator:  # not a newer iteration started since
                self.close()

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __enter__(self) -> PretrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_iterator", None) is not None:
            self.close()
