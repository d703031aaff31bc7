"""Learning rate, weight decay and EMA momentum as pure functions of the optimizer step.

Pure functions (not stateful scheduler objects replayed on resume, as the released I-JEPA
does) so a resumed run needs only the step number. `step` is the 0-based index of the
optimizer step about to run; the I-JEPA closed forms (IJEPA_SPEC §1.5) use a 1-based k = step+1
for the learning rate and k = step for weight decay and momentum, which is what we implement:

- lr:  linear warm-up start_lr -> peak_lr over `warmup_steps` (k/W), then a half-cosine from
       peak_lr to final_lr over the remaining steps (never below final_lr).
- wd:  final + (start - final) * (1 + cos(pi * step / total)) / 2, i.e. a half-cosine that
       *rises* from start_wd (0.04) to final_wd (0.4), clamped to that range.
- EMA: linear from ema_start (0.996) at step 0 to ema_end (1.0) at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleConfig:
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
        if self.total_steps < 1:
            problems.append(f"total_steps={self.total_steps} must be >= 1")
        if not 0 <= self.warmup_steps < max(self.total_steps, 1):
            problems.append(f"warmup_steps={self.warmup_steps} must be in [0, total_steps)")
        if min(self.start_lr, self.peak_lr, self.final_lr) < 0:
            problems.append("learning rates must be >= 0")
        if not 0 <= self.ema_start <= self.ema_end <= 1:
            problems.append(f"EMA momentum must satisfy 0 <= start <= end <= 1, got "
                            f"{self.ema_start} -> {self.ema_end}")
        if problems:
            raise ValueError("invalid ScheduleConfig: " + "; ".join(problems))


def lr_at(step: int, cfg: ScheduleConfig) -> float:
    k = step + 1
    if k <= cfg.warmup_steps:
        return cfg.start_lr + (k / cfg.warmup_steps) * (cfg.peak_lr - cfg.start_lr)
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = min(max(k - cfg.warmup_steps, 0) / span, 1.0)
    value = cfg.final_lr + (cfg.peak_lr - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return max(cfg.final_lr, value)


def wd_at(step: int, cfg: ScheduleConfig) -> float:
    progress = min(max(step, 0) / cfg.total_steps, 1.0)
    value = cfg.final_wd + (cfg.start_wd - cfg.final_wd) * 0.5 * (1 + math.cos(math.pi * progress))
    lo, hi = sorted((cfg.start_wd, cfg.final_wd))
    return min(max(value, lo), hi)


def momentum_at(step: int, cfg: ScheduleConfig) -> float:
    """Momentum of the EMA update that follows optimizer step `step` (once per optimizer step)."""
    last = max(cfg.total_steps - 1, 1)
    progress = min(max(step, 0) / last, 1.0)
    return cfg.ema_start + progress * (cfg.ema_end - cfg.ema_start)
