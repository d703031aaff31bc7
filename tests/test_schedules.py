"""Spec O1, O2, E4: schedules match the I-JEPA closed forms and resume from the step alone."""

from __future__ import annotations

import math

import pytest

from nnssl.methods.schedules import ScheduleConfig, lr_at, momentum_at, wd_at

CFG = ScheduleConfig(total_steps=1000, warmup_steps=100, start_lr=2e-4, peak_lr=1e-3, final_lr=1e-6)


def test_o1_learning_rate_closed_forms():
    assert lr_at(0, CFG) == pytest.approx(2e-4 + (1 / 100) * (1e-3 - 2e-4))  # k = 1
    assert lr_at(99, CFG) == pytest.approx(1e-3)  # end of warm-up
    mid = 100 + 450
    expected = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (mid + 1 - 100) / 900))
    assert lr_at(mid, CFG) == pytest.approx(expected)
    assert lr_at(999, CFG) == pytest.approx(1e-6)
    assert lr_at(5000, CFG) == pytest.approx(1e-6)  # never below final
    values = [lr_at(s, CFG) for s in range(1000)]
    assert values.index(max(values)) == 99 and all(b <= a for a, b in zip(values[100:], values[101:]))


def test_o2_weight_decay_rises_from_004_to_04():
    assert wd_at(0, CFG) == pytest.approx(0.04)
    assert wd_at(500, CFG) == pytest.approx(0.22)
    assert wd_at(1000, CFG) == pytest.approx(0.4)
    values = [wd_at(s, CFG) for s in range(1001)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_e4_ema_momentum_is_linear_from_0996_to_1():
    assert momentum_at(0, CFG) == pytest.approx(0.996)
    assert momentum_at(999, CFG) == pytest.approx(1.0)
    diffs = {round(momentum_at(s + 1, CFG) - momentum_at(s, CFG), 12) for s in range(998)}
    assert len(diffs) == 1  # linear


def test_resume_needs_only_the_step():
    # pure functions: values at step k do not depend on what was computed before
    fresh = [lr_at(k, CFG) for k in range(400, 410)]
    _ = [lr_at(k, CFG) for k in range(400)]
    assert fresh == [lr_at(k, CFG) for k in range(400, 410)]


def test_no_warmup_and_validation():
    cfg = ScheduleConfig(total_steps=10, warmup_steps=0, peak_lr=1.0, final_lr=0.0)
    assert lr_at(0, cfg) < 1.0 and lr_at(9, cfg) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        ScheduleConfig(total_steps=10, warmup_steps=10)
