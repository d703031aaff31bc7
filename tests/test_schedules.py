"""Spec O1, O2, E4 and resume continuity: the schedules against the I-JEPA closed forms.

The reference here re-states the released schedulers' semantics (stateful objects stepped once
before every optimizer step, and a momentum generator consumed once after it) so the mapping
from our 0-based `step` to their counters is checked, not just the formulas.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from nnssl.errors import NnsslError
from nnssl.methods.schedules import InvalidScheduleConfig, ScheduleConfig, lr_at, momentum_at, wd_at

# the ViT-H/14 config shape, shrunk: warm-up from 2e-4 to 1e-3, cosine to 1e-6, T = 1000
CFG = ScheduleConfig(total_steps=1000, warmup_steps=100, start_lr=2e-4, peak_lr=1e-3, final_lr=1e-6)


def _released_run(cfg: ScheduleConfig) -> list[tuple[float, float, float]]:
    """(lr, wd, momentum) used at each optimizer step by the released training loop."""
    t, w = cfg.total_steps, cfg.warmup_steps
    momenta = iter([cfg.ema_start + i * (cfg.ema_end - cfg.ema_start) / t for i in range(t + 1)])
    used, counter = [], 0
    for _ in range(t):
        counter += 1  # scheduler.step() and wd_scheduler.step() run before the optimizer step
        if counter < w:
            lr = cfg.start_lr + counter / w * (cfg.peak_lr - cfg.start_lr)
        else:
            lr = max(cfg.final_lr, cfg.final_lr + (cfg.peak_lr - cfg.final_lr) * 0.5
                     * (1 + math.cos(math.pi * (counter - w) / (t - w))))
        wd = cfg.final_wd + (cfg.start_wd - cfg.final_wd) * 0.5 * (1 + math.cos(math.pi * counter / t))
        used.append((lr, min(wd, cfg.final_wd), next(momenta)))
    return used


def test_o1_lr_matches_the_released_schedule_at_every_step():
    released = _released_run(CFG)
    assert all(lr_at(s, CFG) == pytest.approx(r[0], rel=1e-12) for s, r in enumerate(released))
    assert lr_at(0, CFG) == pytest.approx(2e-4 + 8e-4 / 100)   # k = 1
    assert lr_at(1, CFG) == pytest.approx(2e-4 + 2 * 8e-4 / 100)
    assert lr_at(99, CFG) == 1e-3                               # warm-up end, exactly the peak
    half = 1e-6 + (1e-3 - 1e-6) * 0.5                           # k - W = (T - W)/2: cos = 0
    assert lr_at(549, CFG) == pytest.approx(half)
    assert lr_at(999, CFG) == 1e-6 and lr_at(10_000, CFG) == 1e-6  # end, and never below final
    values = [lr_at(s, CFG) for s in range(1000)]
    assert all(a < b for a, b in zip(values[:99], values[1:100]))   # rising warm-up
    assert all(a > b for a, b in zip(values[99:999], values[100:]))  # falling cosine


def test_o2_wd_is_004_at_step_0_and_rises_along_a_half_cosine_to_04():
    assert wd_at(0, CFG) == 0.04 and wd_at(1000, CFG) == 0.4 and wd_at(5000, CFG) == 0.4
    assert wd_at(500, CFG) == pytest.approx(0.22)
    values = [wd_at(s, CFG) for s in range(1001)]
    assert all(a < b for a, b in zip(values, values[1:]))
    # documented one-step shift: ours uses k = step, the released loop k = step + 1
    released = _released_run(CFG)
    assert all(wd_at(s + 1, CFG) == pytest.approx(r[1], rel=1e-12) for s, r in enumerate(released))
    assert max(abs(wd_at(s, CFG) - r[1]) for s, r in enumerate(released)) <= 0.36 * math.pi / 2000


def test_e4_momentum_is_linear_from_0996_and_matches_the_released_generator():
    released = _released_run(CFG)
    assert all(momentum_at(s, CFG) == pytest.approx(r[2], rel=1e-15) for s, r in enumerate(released))
    assert momentum_at(0, CFG) == 0.996                   # first EMA update
    assert momentum_at(999, CFG) == pytest.approx(1 - 0.004 / 1000)  # last update of the run
    assert momentum_at(1000, CFG) == 1.0 == momentum_at(2000, CFG)   # m_T = 1.0, then clamped
    steps = [momentum_at(s + 1, CFG) - momentum_at(s, CFG) for s in range(999)]
    assert max(steps) - min(steps) < 1e-15 and steps[0] == pytest.approx(4e-6)  # linear


def test_resume_from_a_saved_config_continues_every_schedule_exactly():
    """A resumed run rebuilds the config from its checkpoint JSON and needs only the step."""
    restored = ScheduleConfig(**json.loads(json.dumps(asdict(CFG))))
    k = 437
    uninterrupted = [(lr_at(s, CFG), wd_at(s, CFG), momentum_at(s, CFG)) for s in range(1000)]
    resumed = [(lr_at(s, restored), wd_at(s, restored), momentum_at(s, restored)) for s in range(k, 1000)]
    assert resumed == uninterrupted[k:]


def test_no_warmup_starts_the_cosine_at_step_0():
    cfg = ScheduleConfig(total_steps=10, warmup_steps=0, peak_lr=1.0, final_lr=0.0)
    assert lr_at(0, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))
    assert lr_at(9, cfg) == 0.0


def test_invalid_settings_list_every_problem():
    with pytest.raises(InvalidScheduleConfig) as err:
        ScheduleConfig(total_steps=10, warmup_steps=10, peak_lr=-1.0, ema_start=0.9, ema_end=0.8)
    assert isinstance(err.value, NnsslError) and isinstance(err.value, ValueError)
    assert [p.split("=")[0] for p in err.value.problems] == ["warmup_steps", "peak_lr", "ema_start"]
    with pytest.raises(InvalidScheduleConfig, match="total_steps"):
        ScheduleConfig(total_steps=0, warmup_steps=0)
    with pytest.raises(InvalidScheduleConfig, match="finite"):
        ScheduleConfig(total_steps=10, warmup_steps=1, final_lr=float("nan"))
