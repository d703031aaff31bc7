"""Pretraining on volumes held in memory: the method API's step loop without the data pipeline.

For probe experiments and tests that pretrain many small models on the same toy volumes
(`benchmarks/phantom_probe.py`, the T3 test): no preprocessing, no loader workers, no
checkpoints. It runs the same method, optimizer groups, schedules, gradient clipping and EMA
update as `nnssl.training.loop.Trainer`; batches are random crops of the trainer's patch size
with random mirroring only, drawn from a seeded generator (the trainer's loader also zooms,
rotates and changes intensities: the demo, which uses it, measured the same probe margin).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from nnssl.errors import InvalidInput


def pretrain_in_memory(volumes: np.ndarray, trainer: str, steps: int, batch_size: int = 8, seed: int = 0,
                       threads: int | None = None, overrides: dict[str, Any] | None = None):
    """Train the method of the registry trainer `trainer` (e.g. "IJEPATrainer_Tiny_P32") for
    `steps` steps on `volumes` [n, C, X, Y, Z] (float32, already normalised); returns the method
    (train mode). `threads` sets torch's intra-op threads first (1 is deterministic);
    `overrides` replaces `TrainingConfig` fields (e.g. {"peak_lr": 1e-3})."""
    from nnssl.methods.factory import build_method
    from nnssl.methods.schedules import lr_at, momentum_at, wd_at
    from nnssl.training.registry import resolve_trainer

    if threads is not None:
        torch.set_num_threads(threads)
    config = resolve_trainer(trainer).config
    config = dataclasses.replace(config, batch_size=batch_size, num_epochs=1, iterations_per_epoch=steps, seed=seed,
                                 **(overrides or {}))
    problems = config.problems()
    if problems:
        raise InvalidInput(f"invalid training configuration for {trainer}:", problems)
    patch = tuple(int(p) for p in config.patch_size)
    if volumes.ndim != 5 or any(s < p for s, p in zip(volumes.shape[2:], patch)):
        raise InvalidInput(f"pretrain_in_memory needs volumes [n, C, X, Y, Z] at least as large as the patch "
                           f"{patch} of {trainer}, got {list(volumes.shape)}")
    method = build_method(config)
    method.train()
    schedule = config.schedule_config()
    optimizer = torch.optim.AdamW(method.parameter_groups(wd_at(0, schedule)), lr=lr_at(0, schedule),
                                  betas=config.betas)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    data = torch.from_numpy(volumes)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
            if group.get("apply_wd"):
                group["weight_decay"] = wd_at(step, schedule)
        crops = []
        for i in rng.integers(0, len(data), batch_size):
            x, y, z = (int(rng.integers(0, s - p + 1)) for s, p in zip(volumes.shape[2:], patch))
            crop = data[i, :, x:x + patch[0], y:y + patch[1], z:z + patch[2]]
            flips = [axis + 1 for axis in range(3) if rng.random() < 0.5]
            crops.append(crop.flip(flips) if flips else crop)
        batch = torch.stack(crops)
        out = method.training_output(batch, torch.zeros_like(batch, dtype=torch.bool), step)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        method.after_optimizer_step(step, momentum_at(step, schedule))
    return method
