"""One optimizer step: the only copy, used by the trainer loop, the in-memory loop and the
step-time calibration (so clipping, weight decay groups and the EMA update cannot drift apart).

set the scheduled lr / wd (weight decay only on the `apply_wd` groups) → forward and backward
(autocast is the caller's choice), over `micro_batches` slices of the batch when gradients are
accumulated → global gradient norm, clipped at `grad_clip` (0: measured, not clipped) → every rank
agrees whether the loss and the gradient are finite (if not, the update is skipped on all of them)
→ AdamW → `method.after_optimizer_step` (I-JEPA's EMA teacher, with this step's momentum).

Gradient accumulation is exact: micro-batch j of rank r is run as rank r·k + j of a world of
size R·k, so every sample keeps its global index and draws exactly the masks (and, through the
loader, the crops) of an unaccumulated run with the same global batch; each micro-loss is
scaled by 1/k, so the summed gradient is the gradient of the batch mean.

fp16 (GPUs without bf16): `scaler` is a `torch.amp.GradScaler`; a step whose gradient overflows
is skipped and the scale lowered (`StepResult.overflow`), which is routine at the start of fp16
training and not a sign of divergence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from nnssl.methods.base import MethodOutput, PretrainingMethod
from nnssl.methods.schedules import ScheduleConfig, lr_at, momentum_at, wd_at

# (volumes, anonymization mask, step, rank, world size) -> the method's output
Forward = Callable[[torch.Tensor, torch.Tensor, int, int, int], MethodOutput]


@dataclass
class StepResult:
    loss: float  # mean over the micro-batches
    output: MethodOutput  # monitor tokens / predictions of all micro-batches, concatenated
    applied: bool  # False: the loss or the gradient was not finite on some rank, nothing changed
    grad_norm: float  # before clipping
    stop: bool = False  # some rank asked to stop (a signal): the caller saves and ends
    overflow: bool = False  # fp16: the gradient overflowed with a finite loss (the scale was lowered)


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, schedule: ScheduleConfig) -> None:
    """Set the scheduled lr on every group and the scheduled weight decay on the decayed ones."""
    lr, wd = lr_at(step, schedule), wd_at(step, schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = wd


def _no_agreement(flags: list[float]) -> list[float]:
    return flags


def _merge(outputs: list[MethodOutput], loss: torch.Tensor) -> MethodOutput:
    if len(outputs) == 1:
        return outputs[0]

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(o, name) for o in outputs]
        return None if any(p is None for p in parts) else torch.cat(parts)

    scalars = {k: sum(o.scalars.get(k, 0.0) for o in outputs) / len(outputs) for k in outputs[0].scalars}
    return MethodOutput(loss, monitor_tokens=cat("monitor_tokens"), predictions=cat("predictions"), scalars=scalars)


def optimizer_step(method: PretrainingMethod, optimizer: torch.optim.Optimizer, volumes: torch.Tensor,
                   anonymization_mask: torch.Tensor, step: int, schedule: ScheduleConfig, grad_clip: float,
                   forward: Forward | None = None, autocast: Callable[[], AbstractContextManager] = nullcontext,
                   agree: Callable[[list[float]], list[float]] = _no_agreement, stop_requested: bool = False,
                   rank: int = 0, world_size: int = 1, micro_batches: int = 1,
                   no_sync: Callable[[], AbstractContextManager] = nullcontext,
                   scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """One step of `method` on `volumes`, this rank's share of the global batch of `step`.

    `forward` runs the method (default `method.training_output`; the trainer passes its
    DistributedDataParallel wrapper so gradients are averaged over ranks, and `no_sync` so only
    the last micro-batch all-reduces). `agree` reduces [not finite here, stop here] over ranks
    with max (default: this process only), so every rank skips or stops together; the backward
    runs even for a non-finite loss because every rank must join DDP's gradient all-reduce.
    """
    local = volumes.shape[0]
    if micro_batches < 1 or local % micro_batches:
        raise ValueError(f"a batch of {local} does not split into {micro_batches} equal micro-batches")
    run = forward or (lambda v, a, s, r, w: method.training_output(v, a, s, rank=r, world_size=w))
    apply_schedule(optimizer, step, schedule)
    optimizer.zero_grad(set_to_none=True)
    size, outputs, losses = local // micro_batches, [], []
    for j in range(micro_batches):
        rows = slice(j * size, (j + 1) * size)
        sync = nullcontext if j == micro_batches - 1 else no_sync
        with sync():
            with autocast():
                out = run(volumes[rows], anonymization_mask[rows], step, rank * micro_batches + j,
                          world_size * micro_batches)
            scaled = out.loss / micro_batches
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        outputs.append(out)
        losses.append(out.loss.detach())
    mean_loss = torch.stack(losses).float().mean()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    loss = float(mean_loss)
    output = _merge(outputs, mean_loss)
    bad, stop = agree([0.0 if math.isfinite(loss) and math.isfinite(grad_norm) else 1.0,
                       1.0 if stop_requested else 0.0])
    if bad > 0:
        if scaler is not None:
            scaler.update()  # lowers the scale after the overflow unscale_ found
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, output, False, grad_norm, stop > 0, overflow=scaler is not None and math.isfinite(loss))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    method.after_optimizer_step(step, momentum_at(step, schedule))
    return StepResult(loss, output, True, grad_norm, stop > 0)
