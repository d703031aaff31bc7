"""Collapse monitors (documentation/ijepa_method.md, "Collapse alarms"): known values on
constructed features; alarms fire on collapse only."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from nnssl.methods import monitors as mon


def _healthy(b: int = 4, n: int = 64, e: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.layer_norm(torch.randn(b, n, e, generator=g), (e,))


def test_rankme_of_full_rank_features_is_d_and_of_rank_one_is_one():
    assert mon.rankme(torch.eye(32)) == pytest.approx(32, rel=1e-3)
    assert mon.rankme(torch.randn(2000, 16, generator=torch.Generator().manual_seed(1))) > 14
    rank_one = torch.randn(100, 1) @ torch.randn(1, 32)
    assert mon.rankme(rank_one) == pytest.approx(1.0, abs=0.01)
    rank_four = torch.randn(200, 4) @ torch.linalg.qr(torch.randn(32, 32))[0][:4]  # 4 orthonormal dims
    assert 3.0 < mon.rankme(rank_four) <= 4.0 + 1e-3
    assert math.isnan(mon.rankme(torch.ones(1, 8))) and math.isnan(mon.rankme(torch.full((4, 8), math.nan)))


def test_token_rankme_subsamples_reproducibly_and_pooled_rankme_pools_volumes():
    tokens = _healthy(b=8, n=200, e=24)
    a = mon.token_rankme(tokens, max_tokens=300, generator=torch.Generator().manual_seed(3))
    b = mon.token_rankme(tokens, max_tokens=300, generator=torch.Generator().manual_seed(3))
    assert a == b and a > 20
    # volumes that differ only by a per-volume offset along one direction: pooled rank is about 1
    along_one_direction = (torch.randn(8, 1, 1) * torch.randn(24)).expand(8, 50, 24)
    assert mon.pooled_rankme(along_one_direction) == pytest.approx(1.0, abs=0.01)
    assert mon.pooled_rankme(tokens) > 6


def test_feature_std_is_the_mean_over_dims_of_the_std_over_samples_and_tokens():
    x = torch.zeros(2, 3, 4)
    x[..., 0] = torch.tensor([[0.0, 1, 2], [3, 4, 5]])  # std over 6 values = sqrt(3.5)
    assert mon.feature_std(x) == pytest.approx(math.sqrt(3.5) / 4)
    assert mon.feature_std(_healthy()) > 0.9


def test_within_and_across_cosine_on_constructed_inputs():
    # every volume is one constant direction; the three volumes are mutually orthogonal
    tokens = torch.eye(3).unsqueeze(1).expand(3, 10, 3)
    assert mon.cosine_similarity_within_across(tokens) == pytest.approx((1.0, 0.0), abs=1e-9)
    # tokens alternate between opposite directions inside each volume: within = -1/(n-1)
    alternating = torch.tensor([1.0, -1.0]).repeat(5)[None, :, None] * torch.tensor([1.0, 0.0])
    within, _ = mon.cosine_similarity_within_across(alternating.expand(2, 10, 2))
    assert within == pytest.approx(-1 / 9)  # 20 equal and 25 opposite pairs of 5 + 5 tokens
    # equal to a brute-force mean over all pairs on random tokens
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(2))
    u = F.normalize(x, dim=-1)
    sim = u @ u.transpose(1, 2)
    brute = float(((sim.sum((1, 2)) - 7) / 42).mean())
    pooled = F.normalize(x.mean(1), dim=-1)
    brute_across = float(((pooled @ pooled.T).sum() - 3) / 6)
    assert mon.cosine_similarity_within_across(x) == pytest.approx((brute, brute_across), abs=1e-6)
    assert math.isnan(mon.cosine_similarity_within_across(x[:1])[1])  # one volume: no pairs


def test_healthy_random_tokens_raise_no_alarm():
    tokens = _healthy()
    m = mon.collapse_metrics(tokens, predictions=tokens * 0.5)
    assert set(m) == {"target_std", "pred_std", "token_rankme", "token_rankme_fraction", "pooled_rankme",
                      "cos_within", "cos_across"}
    assert all(isinstance(v, float) for v in m.values())
    assert m["target_std"] > 0.9 and m["pred_std"] == pytest.approx(m["target_std"] / 2, rel=1e-4)
    assert m["token_rankme"] > 30 and abs(m["cos_within"]) < 0.05 and abs(m["cos_across"]) < 0.3
    assert m["token_rankme_fraction"] == pytest.approx(m["token_rankme"] / 48)  # 256 rows, E = 48
    assert mon.collapse_alarms(m, embed_dim=48) == []
    assert "pred_std" not in mon.collapse_metrics(tokens)


def test_constant_teacher_trips_every_hard_alarm():
    constant = F.layer_norm(torch.randn(1, 1, 48).expand(4, 64, 48).contiguous(), (48,))
    m = mon.collapse_metrics(constant)
    alarms = mon.collapse_alarms(m, embed_dim=48)
    assert m["target_std"] < 1e-5 and m["cos_within"] == pytest.approx(1.0, abs=1e-6)
    assert len(alarms) == 3 and all(a.startswith("hard collapse") for a in alarms)
    assert mon.collapse_alarms({"target_std": math.nan}, 48)[0].startswith("teacher features are not finite")


def test_each_alarm_fires_alone_at_its_threshold():
    fine = {"target_std": 0.5, "token_rankme": 40.0, "cos_across": 0.5}
    assert mon.collapse_alarms(fine, embed_dim=64) == []
    assert len(mon.collapse_alarms({**fine, "target_std": 0.049}, 64)) == 1
    assert len(mon.collapse_alarms({**fine, "token_rankme": 12.7}, 64)) == 1  # < 0.2 * 64 = 12.8
    assert mon.collapse_alarms({**fine, "token_rankme": 12.9}, 64) == []
    assert len(mon.collapse_alarms({**fine, "cos_across": 0.951}, 64)) == 1
    # the RankMe bar is a fraction of the ceiling min(E, rows): 8 rows of width 64 can reach 8 at most
    assert mon.collapse_alarms({**fine, "token_rankme": 7.0, "token_rankme_fraction": 7.0 / 8}, 64) == []
    assert len(mon.collapse_alarms({**fine, "token_rankme": 1.5, "token_rankme_fraction": 1.5 / 8}, 64)) == 1


def test_rankme_ceiling_is_the_smaller_of_width_and_rows():
    assert mon.rankme_ceiling(torch.zeros(2, 3, 64)) == 6
    assert mon.rankme_ceiling(torch.zeros(8, 64, 96)) == 96
    assert mon.rankme_ceiling(torch.zeros(4, 8000, 864)) == 864
    assert mon.rankme_ceiling(torch.zeros(4, 8000, 864), max_tokens=500) == 500
    few = _healthy(b=2, n=3, e=64)  # 6 rows of a full-rank random matrix: RankMe near 6
    assert mon.collapse_metrics(few)["token_rankme_fraction"] > 0.8
    assert mon.collapse_alarms(mon.collapse_metrics(few), embed_dim=64) == []


def test_monitors_ignore_autocast_and_gradients():
    tokens = _healthy().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = mon.collapse_metrics(tokens.bfloat16())
    reference = mon.collapse_metrics(tokens.detach().bfloat16().float())
    assert m == pytest.approx(reference, rel=1e-5)
    assert tokens.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_monitors_on_cuda_match_cpu():
    tokens = _healthy()
    assert mon.collapse_metrics(tokens.cuda()) == pytest.approx(mon.collapse_metrics(tokens), rel=1e-4)


def _like_the_trainer(tracker: mon.CollapseTracker, losses: list[float], log_every: int = 50,
                      rankme: float = 40.0) -> list[tuple[int, str]]:
    """Feed per-step losses the way `Trainer._log` does: once per log interval, at the step count
    after the interval, with the interval's mean loss. Returns (step, warning) pairs."""
    warnings = []
    for end in range(log_every, len(losses) + 1, log_every):
        mean = sum(losses[end - log_every:end]) / log_every
        warnings += [(end, w) for w in tracker.update(end, mean, {"token_rankme": rankme})]
    return warnings


def _demo_losses(drop_at: int | None = None, keep: float = 1.0, steps: int = 4500, seed: int = 0) -> list[float]:
    """A demo-length loss curve (4500 steps): fast early fall, slow decline, 20% per-step noise
    (the toy's batch-of-8 losses scatter by 6-10%); from `drop_at` on, the loss is `keep` times
    as large (a collapse makes the targets easy to predict)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(steps, dtype=torch.float64)
    curve = (0.08 + 0.25 * torch.exp(-s / 300)) * (1 + 0.2 * torch.randn(steps, generator=g, dtype=torch.float64))
    if drop_at is not None:
        curve[drop_at:] *= keep
    return curve.clamp_min(1e-3).tolist()


def test_tracker_called_every_50_steps_catches_sudden_drops_in_a_demo_length_run():
    """The demo's run: 4500 steps, 5% warm-up, the trainer's default 50-step log interval, so the
    1%-of-training window (45 steps) is shorter than the interval between calls."""
    healthy = _like_the_trainer(mon.CollapseTracker(4500, warmup_steps=225), _demo_losses())
    assert healthy == []
    for keep, drop_at in ((0.4, 2576), (0.05, 2576), (0.4, 3000), (0.05, 3020)):  # mid-interval and on a boundary
        warnings = _like_the_trainer(mon.CollapseTracker(4500, warmup_steps=225), _demo_losses(drop_at, keep))
        assert len(warnings) == 1 and "loss fell" in warnings[0][1], (keep, drop_at, warnings)
        assert drop_at < warnings[0][0] <= drop_at + 100  # reported within two log intervals
    # a 60% fall spread over 10% of training is not sudden, however the tracker is called
    slow = [0.3 * (1 - 0.6 * min(max(s - 2000, 0) / 450, 1.0)) for s in range(4500)]
    assert _like_the_trainer(mon.CollapseTracker(4500, warmup_steps=225), slow) == []
    every_step = mon.CollapseTracker(4500, warmup_steps=225)
    assert [w for s, v in enumerate(slow) for w in every_step.update(s, v, {})] == []


def test_sparse_calls_judge_the_drop_per_window_at_a_constant_rate():
    """Calls every 500 steps of a 4500-step run (window 45): a 60% fall between two calls is a
    fall of 1 − 0.4^(45/500) = 8% per window, not sudden; a 99.9% fall is 46% per window."""
    tracker = mon.CollapseTracker(4500)
    assert tracker.update(500, 1.0, {}) == []
    assert tracker.update(1000, 0.4, {}) == []
    assert "loss fell" in tracker.update(1500, 0.4e-3, {})[0]


def test_tracker_warns_on_a_constructed_rankme_drop_and_sudden_loss_drop():
    tracker = mon.CollapseTracker(total_steps=1000)  # window: 10 steps
    assert tracker.update(0, 1.0, {"token_rankme": 40.0}) == []
    assert tracker.update(5, 0.98, {"token_rankme": 35.0}) == []
    warnings = tracker.update(8, 0.5, {"token_rankme": 15.0})
    assert any("RankMe" in w for w in warnings) and any("loss fell" in w for w in warnings)
    assert tracker.update(9, 0.49, {}) == []  # one drop, one warning
    # the same drop spread over more than 1% of training is not sudden
    slow = mon.CollapseTracker(total_steps=1000)
    assert all(slow.update(s, 1.0 - s / 1500, {"token_rankme": 40.0}) == [] for s in range(0, 1000, 5))


def test_tracker_smooths_noisy_losses_of_long_runs_but_catches_a_real_drop():
    g = torch.Generator().manual_seed(0)
    noisy = (1.0 + 0.3 * torch.randn(3000, generator=g)).clamp_min(0.05).tolist()  # batch-of-2 noise
    tracker = mon.CollapseTracker(total_steps=100_000)  # window 1000, smoothing over 100 steps
    assert [w for s, v in enumerate(noisy) for w in tracker.update(s, v, {})] == []
    dropped = [w for s in range(3000, 3400) for w in tracker.update(s, 0.5 * noisy[s - 3000], {})]
    assert len(dropped) == 1 and "loss fell" in dropped[0]
    # the same run logged every 50 steps (interval means) warns once as well
    losses = noisy + [0.5 * v for v in noisy[:400]]
    assert len(_like_the_trainer(mon.CollapseTracker(total_steps=100_000), losses)) == 1


def test_tracker_is_quiet_during_warmup_and_round_trips_through_json():
    tracker = mon.CollapseTracker(total_steps=1000, warmup_steps=50)
    assert tracker.update(0, 5.0, {"token_rankme": 60.0}) == []
    assert tracker.update(3, 1.0, {"token_rankme": 10.0}) == []  # fast early fall is expected
    assert tracker.rankme_max == 0.0
    assert tracker.update(60, 1.0, {"token_rankme": 20.0}) == []
    assert tracker.update(61, float("nan"), {})[0].startswith("loss is not finite")
    restored = mon.CollapseTracker(total_steps=1)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.state_dict() == tracker.state_dict()
    assert restored.update(62, 0.5, {"token_rankme": 9.0}) == tracker.update(62, 0.5, {"token_rankme": 9.0})
    assert len(restored.update(63, 0.5, {"token_rankme": 9.0})) == 1  # RankMe fell below 50% of 20
    # a tracker state written before `previous` / `rearm` existed still loads
    old = {k: v for k, v in tracker.state_dict().items() if k not in ("previous", "rearm")}
    legacy = mon.CollapseTracker(total_steps=1)
    legacy.load_state_dict(old)
    assert legacy.previous is None and legacy.update(70, 0.5, {}) == []
