"""Pretraining on volumes held in memory: the trainer's step without the data pipeline.

For probe experiments, tests and the notebook API, which pretrain small models on volumes that
are already arrays (`benchmarks/phantom_probe.py`, the T3 test, `nnssl.api`): no preprocessing, no
loader workers, no checkpoints. It runs the trainer's own step (`training/step.py`: schedules,
weight-decay groups, clipping, non-finite skip, EMA update). Batches are random crops of the
configuration's patch size with random mirroring only, drawn from a seeded generator (the
trainer's loader also zooms, rotates and changes intensities).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from nnssl.errors import InvalidInput, NnsslError
from nnssl.log import get_logger
from nnssl.methods.base import PretrainingMethod
from nnssl.settings import apply_overrides
from nnssl.training.config import TrainingConfig

logger = get_logger(__name__)
MAX_NONFINITE_STEPS = 10


def random_crops(volumes: np.ndarray, patch: tuple[int, int, int], batch_size: int,
                 seed: int) -> Iterator[torch.Tensor]:
    """Endless batches [batch, C, *patch] of random crops of `volumes` [n, C, X, Y, Z], each mirrored
    on every axis with probability 1/2, from one seeded generator."""
    if volumes.ndim != 5 or any(s < p for s, p in zip(volumes.shape[2:], patch)):
        raise InvalidInput(f"in-memory pretraining needs volumes [n, C, X, Y, Z] at least as large as the patch "
                           f"{patch}, got {list(volumes.shape)}")
    data = torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))
    rng = np.random.default_rng(seed)
    while True:
        crops = []
        for i in rng.integers(0, len(data), batch_size):
            x, y, z = (int(rng.integers(0, s - p + 1)) for s, p in zip(volumes.shape[2:], patch))
            crop = data[i, :, x:x + patch[0], y:y + patch[1], z:z + patch[2]]
            flips = [axis + 1 for axis in range(3) if rng.random() < 0.5]
            crops.append(crop.flip(flips) if flips else crop)
        yield torch.stack(crops)


def pretrain_on_batches(config: TrainingConfig, batches: Iterable[torch.Tensor], steps: int,
                        method: PretrainingMethod | None = None) -> PretrainingMethod:
    """Train `config`'s method (a fresh one unless given) for `steps` optimizer steps on the
    batches [B, C, X, Y, Z] the iterable yields (cycled if it runs out); returns the method in
    train mode. The schedules span exactly `steps`."""
    from nnssl.methods.factory import build_method
    from nnssl.training.setup import build_optimizer
    from nnssl.training.step import optimizer_step

    if steps < 1:
        raise InvalidInput(f"steps must be >= 1, got {steps}")
    config = replace(config, num_epochs=1, iterations_per_epoch=int(steps)).check()
    method = method if method is not None else build_method(config)
    method.train()
    device = next(iter(method.parameters())).device
    optimizer = build_optimizer(method, config)
    schedule = config.schedule_config()
    source = iter(batches)
    nonfinite = 0
    for step in range(steps):
        item = next(source, None)
        if item is None:  # cycle the iterable
            source = iter(batches)
            item = next(source, None)
            if item is None:
                raise InvalidInput("the batches to pretrain on are empty")
        batch = torch.as_tensor(item, dtype=torch.float32).to(device)
        if batch.ndim != 5:
            raise InvalidInput(f"batches must be [B, C, X, Y, Z] volumes, got {list(batch.shape)}")
        result = optimizer_step(method, optimizer, batch, torch.zeros_like(batch, dtype=torch.bool), step, schedule,
                                config.optim.grad_clip)
        nonfinite = 0 if result.applied else nonfinite + 1
        if not result.applied:
            logger.warning("step %d skipped: loss %s or gradient not finite", step, result.loss)
        if nonfinite >= MAX_NONFINITE_STEPS:
            raise NnsslError(f"the loss was not finite for {nonfinite} consecutive steps (step {step}); lower "
                             f"optim.peak_lr ({config.optim.peak_lr}) or check the volumes for extreme values")
    return method


def pretrain_in_memory(volumes: np.ndarray, trainer: str | TrainingConfig, steps: int, batch_size: int | None = None,
                       seed: int = 0, threads: int | None = None, overrides: dict[str, Any] | None = None
                       ) -> PretrainingMethod:
    """Train `trainer` (a configuration, or a trainer name resolved here with the dotted
    `overrides`, e.g. {"optim.peak_lr": 1e-3}) for `steps` steps on random crops of `volumes`
    [n, C, X, Y, Z] (float32, already normalised). `batch_size` overrides the configuration's;
    `seed` seeds the configuration (initialisation, masks) and the crops. `threads` sets torch's
    intra-op threads first (1 is deterministic)."""
    from nnssl.training.names import resolve_config

    if threads is not None:
        torch.set_num_threads(threads)
    config = resolve_config(trainer, overrides=overrides) if isinstance(trainer, str) else trainer
    if overrides and not isinstance(trainer, str):
        config = apply_overrides(config, overrides)
    config = replace(config, seed=seed, batch_size=batch_size or config.batch_size)
    if config.patch_size is None or config.batch_size is None:
        raise InvalidInput(f"{config.trainer_name!r} has no patch or batch size for in-memory pretraining; give them "
                           "in the name (_P<N>_BS<N>), as overrides or as batch_size=")
    crops = random_crops(volumes, config.patch_size, config.batch_size, seed)
    return pretrain_on_batches(config, crops, steps)
