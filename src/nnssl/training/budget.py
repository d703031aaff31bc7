"""Turn a wall-clock budget into a step count, by timing the method's own steps.

The schedules (warm-up + cosine lr, EMA momentum) are functions of the step over a known total,
so a time-boxed run (the demo, the method comparison) must know its step count up front: we time
a few real optimizer steps (`training/step.py`, the trainer's own step) on random volumes and
divide.
"""

from __future__ import annotations

import statistics
import time

import torch

from nnssl.errors import InvalidInput
from nnssl.training.config import TrainingConfig


def seconds_per_step(config: TrainingConfig, timed_steps: int = 5, warmup_steps: int = 3, device: str = "cpu"
                     ) -> float:
    """Median seconds of one optimizer step (forward, backward, clipping, AdamW, EMA) of `config`
    at its batch and patch size, after `warmup_steps` (the first steps of a process are up to 20x
    slower while the CPU kernels are set up)."""
    from nnssl.methods.factory import build_method
    from nnssl.training.setup import build_optimizer
    from nnssl.training.step import optimizer_step

    if config.patch_size is None or config.batch_size is None:
        raise InvalidInput(f"seconds_per_step needs a resolved patch and batch size; {config.trainer_name!r} has "
                           f"{config.patch_size} / {config.batch_size} (use _P<N>_BS<N> or with_geometry)")
    method = build_method(config).to(device)
    optimizer = build_optimizer(method, config)
    schedule = config.schedule_config()
    x = torch.randn(config.batch_size, 1, *config.patch_size, device=device)
    anon = torch.zeros_like(x, dtype=torch.bool)
    times = []
    for step in range(warmup_steps + timed_steps):
        start = time.perf_counter()
        optimizer_step(method, optimizer, x, anon, step, schedule, config.optim.grad_clip)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup_steps:])


def steps_for_budget(config: TrainingConfig, seconds: float, overhead_fraction: float = 0.2, minimum: int = 10) -> int:
    """Optimizer steps that fit `seconds`, keeping `overhead_fraction` of it for data loading,
    validation and checkpoints."""
    return max(minimum, int(seconds * (1.0 - overhead_fraction) / seconds_per_step(config)))
