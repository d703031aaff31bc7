"""Process-group setup for one process, `-num_gpus N` on one node, or `torchrun` (multi-node).

- Under `torchrun` (or SLURM + torchrun) the environment carries RANK, LOCAL_RANK, WORLD_SIZE,
  MASTER_ADDR and MASTER_PORT; we join that group.
- `-num_gpus N` without torchrun spawns N local processes itself (free port on localhost).
- Backend: `nccl` when the processes use CUDA devices, `gloo` otherwise (the CPU test runs two
  gloo processes).
Only rank 0 writes files; every rank runs the same code otherwise.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nnssl.errors import NnsslError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_visible_gpus(num_processes: int, device: str | None) -> None:
    """`-num_gpus N` on CUDA needs N visible GPUs: two ranks sharing one GPU is never wanted."""
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise NnsslError(f"-device {device} was requested but no CUDA device is visible; use -device cpu")
    wants_cuda = device in ("cuda", None) and torch.cuda.is_available()
    if num_processes > 1 and wants_cuda and torch.cuda.device_count() < num_processes:
        raise NnsslError(f"-num_gpus {num_processes} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use -num_gpus "
                         f"{torch.cuda.device_count()} or make more GPUs visible")


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_device(requested: str | None, local_rank: int = 0, world_size: int = 1) -> str:
    """"cuda:<local_rank>" / "cuda:<N>" (one process) / "cpu" / "mps"; `None` picks CUDA when
    available."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NnsslError(f"-device {requested} was requested but no CUDA device is visible; use -device cpu")
        if requested == "cuda":
            return f"cuda:{local_rank % count}"
        index = requested.partition(":")[2]
        if not index.isdigit() or int(index) >= count:
            raise NnsslError(f"-device {requested}: {count} CUDA device(s) are visible (cuda:0 .. cuda:{count - 1})")
        if world_size > 1:
            raise NnsslError(f"-device {requested} names one GPU but {world_size} processes train; choose the GPUs "
                             "with CUDA_VISIBLE_DEVICES and pass -device cuda")
        return requested
    if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise NnsslError("-device mps was requested but MPS is not available; use -device cpu")
    if requested not in ("cpu", "mps"):
        raise NnsslError(f"unknown device {requested!r}; use cuda, cuda:N, cpu or mps")
    return requested


def init_process_group(rank: int, local_rank: int, world_size: int, device: str) -> DistInfo:
    """Join (or, for world_size 1, skip) the default process group."""
    info = DistInfo(rank, local_rank, world_size, device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return info


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned_entry(local_rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                       "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size)})
    fn(*args)


def spawn_local(fn: Callable[..., Any], num_processes: int, args: tuple) -> None:
    """Run `fn(*args)` in `num_processes` fresh processes on this node (ranks 0..N-1), as
    torchrun would; an exception in any rank is re-raised here. SIGTERM / SIGUSR1 sent to this
    parent (a scheduler preempting the job) are forwarded to every rank, which then checkpoint."""
    import signal

    import torch.multiprocessing as mp

    context = mp.start_processes(_spawned_entry, args=(num_processes, free_port(), fn, args), nprocs=num_processes,
                                 join=False, start_method="spawn")

    def forward(signum: int, frame: Any) -> None:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while not context.join():
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def all_reduce_max_flags(flags: list[float], device: str) -> list[float]:
    """Element-wise max over ranks of a few per-step flags (one collective per step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor(flags, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(values: list[float], device: str) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
