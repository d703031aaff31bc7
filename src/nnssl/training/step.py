"""One optimizer step: the only copy, used by the trainer loop, the in-memory loop and the
step-time calibration (so clipping, weight decay groups and the EMA update cannot drift apart).

set the scheduled lr / wd (weight decay only on the `apply_wd` groups) → forward (autocast is
the caller's choice) → backward → global gradient norm, clipped at `grad_clip` (0: measured, not
clipped) → every rank agrees whether the loss and the gradient are finite (if not, the update is
skipped on all of them) → AdamW → `method.after_optimizer_step` (I-JEPA's EMA teacher, with the
scheduled momentum of this step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from nnssl.methods.base import MethodOutput, PretrainingMethod
from nnssl.methods.schedules import ScheduleConfig, lr_at, momentum_at, wd_at

Forward = Callable[[torch.Tensor, torch.Tensor, int], MethodOutput]


@dataclass
class StepResult:
    loss: float
    output: MethodOutput
    applied: bool  # False: the loss or the gradient was not finite on some rank, nothing changed
    grad_norm: float  # before clipping
    stop: bool = False  # some rank asked to stop (a signal): the caller saves and ends


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, schedule: ScheduleConfig) -> None:
    """Set the scheduled lr on every group and the scheduled weight decay on the decayed ones."""
    lr, wd = lr_at(step, schedule), wd_at(step, schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = wd


def _no_agreement(flags: list[float]) -> list[float]:
    return flags


def optimizer_step(method: PretrainingMethod, optimizer: torch.optim.Optimizer, volumes: torch.Tensor,
                   anonymization_mask: torch.Tensor, step: int, schedule: ScheduleConfig, grad_clip: float,
                   forward: Forward | None = None, autocast: Callable[[], AbstractContextManager] = nullcontext,
                   agree: Callable[[list[float]], list[float]] = _no_agreement,
                   stop_requested: bool = False) -> StepResult:
    """One step of `method` on `volumes` (this rank's share of the global batch of `step`).

    `forward` is what runs the method (default `method.training_output`; the trainer passes its
    DistributedDataParallel wrapper so gradients are averaged over ranks). `agree` reduces
    [not finite here, stop here] over ranks with max (default: this process only), so every
    rank skips or stops together; the backward runs even for a non-finite loss because every
    rank must join DDP's gradient all-reduce.
    """
    apply_schedule(optimizer, step, schedule)
    optimizer.zero_grad(set_to_none=True)
    run = forward or (lambda v, a, s: method.training_output(v, a, s))
    with autocast():
        out = run(volumes, anonymization_mask, step)
    out.loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    loss = float(out.loss.detach())
    bad, stop = agree([0.0 if math.isfinite(loss) and math.isfinite(grad_norm) else 1.0,
                       1.0 if stop_requested else 0.0])
    if bad > 0:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, out, False, grad_norm, stop > 0)
    optimizer.step()
    method.after_optimizer_step(step, momentum_at(step, schedule))
    return StepResult(loss, out, True, grad_norm, stop > 0)
