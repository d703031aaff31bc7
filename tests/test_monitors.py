"""Collapse monitors: known values on constructed features, alarms fire on collapse only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnssl.methods import monitors as mon


def test_rankme_full_rank_and_rank_one():
    assert mon.rankme(torch.eye(32)) == pytest.approx(32, rel=1e-3)
    rank_one = torch.randn(100, 1) @ torch.randn(1, 32)
    assert mon.rankme(rank_one) == pytest.approx(1.0, abs=0.01)


def test_healthy_random_tokens_raise_no_alarm():
    g = torch.Generator().manual_seed(0)
    tokens = F.layer_norm(torch.randn(4, 64, 48, generator=g), (48,))
    m = mon.collapse_metrics(tokens, predictions=tokens * 0.5)
    assert m["target_std"] > 0.9 and m["pred_std"] == pytest.approx(m["target_std"] / 2, rel=1e-4)
    assert m["token_rankme"] > 30 and abs(m["cos_within"]) < 0.05 and abs(m["cos_across"]) < 0.3
    assert mon.collapse_alarms(m, embed_dim=48) == []


def test_constant_teacher_trips_every_hard_alarm():
    constant = F.layer_norm(torch.randn(1, 1, 48).expand(4, 64, 48).contiguous(), (48,))
    m = mon.collapse_metrics(constant)
    alarms = mon.collapse_alarms(m, embed_dim=48)
    assert m["target_std"] < 1e-5 and m["cos_within"] == pytest.approx(1.0, abs=1e-5)
    assert len(alarms) == 3 and all("hard collapse" in a for a in alarms)


def test_within_and_across_cosine_on_constructed_inputs():
    # every volume constant over tokens, volumes mutually orthogonal
    tokens = torch.eye(3).unsqueeze(1).expand(3, 10, 3)
    within, across = mon.cosine_similarity_within_across(tokens)
    assert within == pytest.approx(1.0) and across == pytest.approx(0.0, abs=1e-6)


def test_tracker_warns_on_rankme_drop_and_sudden_loss_drop():
    tracker = mon.CollapseTracker(total_steps=1000)
    assert tracker.update(0, 1.0, {"token_rankme": 40.0}) == []
    assert tracker.update(5, 0.98, {"token_rankme": 35.0}) == []
    warnings = tracker.update(8, 0.5, {"token_rankme": 15.0})
    assert any("RankMe" in w for w in warnings) and any("loss fell" in w for w in warnings)
    # a slow decrease over many windows is not a warning
    slow = mon.CollapseTracker(total_steps=1000)
    assert all(slow.update(s, 1.0 - s / 2000, {"token_rankme": 40.0}) == [] for s in range(0, 1000, 5))
    restored = mon.CollapseTracker(total_steps=1)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()
