"""Learning rate, weight decay and EMA momentum as pure functions of the optimizer step.

The released I-JEPA keeps stateful scheduler objects and replays them on resume; pure functions
of the step make a resumed run need nothing but the step number.

`step` is the 0-based index of the optimizer step about to run (lr, wd) or just run (EMA). With
T = total_steps and W = warmup_steps, the I-JEPA closed forms (documentation/ijepa_method.md; the released
schedulers are stepped once *before* every optimizer step, so its first step uses k = 1) map as:

- lr:  k = step + 1, exactly I-JEPA's `WarmupCosineSchedule`:
       k < W:   start + (k/W)·(peak − start)                      (linear warm-up)
       k >= W:  max(final, final + (peak − final)·½(1 + cos(π·(k − W)/(T − W))))
       so step W−1 runs at peak_lr and step T−1 at final_lr; later steps stay at final_lr.
- wd:  k = step (one step earlier than I-JEPA, whose first step uses k = 1), so that the first
       step runs at exactly start_wd, the value the optimizer is built with:
       final + (start − final)·½(1 + cos(π·k/T)), clamped to [start, final]: a half-cosine that
       rises from 0.04 to 0.4. The shift changes no value by more than (final − start)·π/(2T).
- EMA: i = step, exactly I-JEPA's momentum generator (one value consumed per optimizer step):
       m_i = ema_start + i·(ema_end − ema_start)/T, so the first update uses 0.996 and m reaches
       ema_end = 1.0 at i = T, one past the last update (which uses 1 − 0.004/T); clamped after.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from nnssl.errors import NnsslError


class InvalidScheduleConfig(NnsslError, ValueError):
    """A ScheduleConfig that cannot work; `problems` lists every issue."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid schedule settings: " + "; ".join(self.problems))


@dataclass(frozen=True)
class ScheduleConfig:
    """Schedule horizons in optimizer steps (not epochs) and their end points."""

    total_steps: int
    warmup_steps: int
    start_lr: float = 1e-5
    peak_lr: float = 3e-4
    final_lr: float = 1e-6
    start_wd: float = 0.04
    final_wd: float = 0.4
    ema_start: float = 0.996
    ema_end: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                problems.append(f"{f.name}={value!r} must be a finite number")
        if problems:
            raise InvalidScheduleConfig(problems)
        if int(self.total_steps) != self.total_steps or self.total_steps < 1:
            problems.append(f"total_steps={self.total_steps} must be an integer >= 1")
        if int(self.warmup_steps) != self.warmup_steps or not 0 <= self.warmup_steps < self.total_steps:
            problems.append(f"warmup_steps={self.warmup_steps} must be an integer in [0, total_steps="
                            f"{self.total_steps}); use 0 for no warm-up")
        for name in ("start_lr", "peak_lr", "final_lr", "start_wd", "final_wd"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.ema_start <= self.ema_end <= 1:
            problems.append(f"ema_start={self.ema_start}, ema_end={self.ema_end} must satisfy "
                            "0 <= ema_start <= ema_end <= 1")
        if problems:
            raise InvalidScheduleConfig(problems)


def lr_at(step: int, cfg: ScheduleConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): warm-up, then cosine to final_lr."""
    k, warmup = step + 1, cfg.warmup_steps
    if k < warmup:
        frac = k / warmup
        return cfg.start_lr * (1 - frac) + cfg.peak_lr * frac
    progress = min(max(k - warmup, 0) / (cfg.total_steps - warmup), 1.0)
    weight = 0.5 * (1 + math.cos(math.pi * progress))  # convex form: exact peak_lr and final_lr
    return max(cfg.final_lr, cfg.peak_lr * weight + cfg.final_lr * (1 - weight))


def wd_at(step: int, cfg: ScheduleConfig) -> float:
    """Weight decay of optimizer step `step` (0-based) for the decayed parameter groups."""
    progress = min(max(step, 0) / cfg.total_steps, 1.0)
    weight = 0.5 * (1 + math.cos(math.pi * progress))  # convex form: exact start_wd at step 0
    value = cfg.start_wd * weight + cfg.final_wd * (1 - weight)
    lo, hi = sorted((cfg.start_wd, cfg.final_wd))
    return min(max(value, lo), hi)


def momentum_at(step: int, cfg: ScheduleConfig) -> float:
    """EMA momentum of the teacher update that follows optimizer step `step` (once per optimizer
    step, not per micro-batch under gradient accumulation)."""
    progress = min(max(step, 0) / cfg.total_steps, 1.0)
    return cfg.ema_start * (1 - progress) + cfg.ema_end * progress
