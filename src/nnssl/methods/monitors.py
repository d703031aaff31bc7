"""Collapse monitors for I-JEPA (IJEPA_SPEC §4): cheap statistics returned as Python floats.

The loss cannot reveal collapse: a constant teacher gives constant LN₀ targets that the
predictor matches trivially, because LN₀ normalises each token over its features, not across
tokens or volumes. These statistics look across tokens and volumes instead. They run on CPU or
CUDA tensors of any float dtype, without gradients and with autocast off (bf16 singular values
and cosine sums would be too coarse). The thresholds are the spec's recommended heuristics; the
toy negative control (spec T5) checks that collapse does trip them.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F

HARD_TARGET_STD = 0.05        # target_std below this: the teacher's features no longer vary
HARD_RANKME_FRACTION = 0.05   # token RankMe below this fraction of E: features span few dims
HARD_CROSS_COSINE = 0.95      # pooled cosine across volumes above this: every volume looks alike
RANKME_DROP = 0.5             # partial collapse: RankMe falls this far below its running max
LOSS_DROP = 0.3               # partial collapse: loss falls this much ...
LOSS_DROP_WINDOW = 0.01       # ... within this fraction of training


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> float32 [rows, D], detached."""
    return x.detach().float().reshape(-1, x.shape[-1])


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al.): exp of the entropy of the normalised singular values of [N, D]
    features (leading axes are flattened). Between 1 and min(N, D); NaN for fewer than 2 rows or
    non-finite features."""
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        z = _matrix(features)
        if z.shape[0] < 2 or not bool(torch.isfinite(z).all()):
            return float("nan")
        s = torch.linalg.svdvals(z)
        p = s / s.sum().clamp_min(1e-12) + eps
        return float(torch.exp(-(p * p.log()).sum()))


def token_rankme(tokens: torch.Tensor, max_tokens: int = 16384,
                 generator: torch.Generator | None = None) -> float:
    """RankMe of the [B, N, E] tokens pooled over volumes, on a random subsample of at most
    `max_tokens` tokens (the SVD cost grows with the row count). `generator` (CPU) makes the
    subsample reproducible."""
    flat = tokens.detach().reshape(-1, tokens.shape[-1])
    if flat.shape[0] > max_tokens:
        pick = torch.randperm(flat.shape[0], generator=generator)[:max_tokens]
        flat = flat[pick.to(flat.device)]
    return rankme(flat)


def pooled_rankme(tokens: torch.Tensor) -> float:
    """RankMe of mean-pooled volume embeddings ([B, N, E] -> [B, E]); at most B, so meaningful
    on a probe set of many volumes (the spec suggests >= 256), not on a training batch of 2."""
    return rankme(tokens.detach().float().mean(1))


def feature_std(x: torch.Tensor) -> float:
    """Mean over feature dims (last axis) of the standard deviation over all other axes
    (samples and tokens). On LN₀ targets a healthy value is O(0.3-1); collapse -> 0. Not
    L2-normalised first: the spec's target_std is taken on LN₀ outputs directly."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        flat = _matrix(x)
        if flat.shape[0] < 2:
            return float("nan")
        return float(flat.std(0).mean())


def _mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """[..., n, E] -> [...] mean cosine over all ordered pairs i != j, exactly and in O(n·E):
    sum_{i != j} <u_i, u_j> = |sum_i u_i|² - sum_i |u_i|² for unit vectors u_i."""
    u = F.normalize(x.double(), dim=-1)
    n = u.shape[-2]
    total = u.sum(-2).pow(2).sum(-1) - u.pow(2).sum((-2, -1))
    return total / max(n * (n - 1), 1)


def cosine_similarity_within_across(tokens: torch.Tensor) -> tuple[float, float]:
    """(within, across) for [B, N, E] tokens: `within` is the mean pairwise cosine of the tokens
    of one volume, averaged over volumes (spatial collapse -> 1); `across` is the mean pairwise
    cosine of the mean-pooled volume embeddings (sample collapse -> 1; NaN when B = 1)."""
    with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
        t = tokens.detach()
        within = float(_mean_pairwise_cosine(t).mean()) if t.shape[1] > 1 else float("nan")
        across = float(_mean_pairwise_cosine(t.double().mean(1))) if t.shape[0] > 1 else float("nan")
        return within, across


def collapse_metrics(teacher_tokens: torch.Tensor, predictions: torch.Tensor | None = None) -> dict[str, float]:
    """The monitors of spec §4 for [B, N, E] LN₀-normalised teacher tokens (all tokens of the
    batch) and, when given, the predictions [M*B, Kt, E]. Keys: target_std, token_rankme,
    pooled_rankme, cos_within, cos_across, and pred_std only when predictions are given. The
    token subsample is seeded, so equal inputs give equal metrics."""
    within, across = cosine_similarity_within_across(teacher_tokens)
    metrics = {
        "target_std": feature_std(teacher_tokens),
        "token_rankme": token_rankme(teacher_tokens, generator=torch.Generator().manual_seed(0)),
        "pooled_rankme": pooled_rankme(teacher_tokens),
        "cos_within": within,
        "cos_across": across,
    }
    if predictions is not None:
        metrics["pred_std"] = feature_std(predictions)
    return metrics


def collapse_alarms(metrics: dict[str, float], embed_dim: int) -> list[str]:
    """Hard-collapse messages per the spec's thresholds (empty list: healthy). Missing keys are
    not judged; a NaN target_std means the teacher features are not finite, which is reported."""
    alarms = []
    std = metrics.get("target_std")
    if std is not None and math.isnan(std):
        alarms.append("teacher features are not finite (target_std is NaN): training diverged; "
                      "lower the learning rate")
    elif std is not None and std < HARD_TARGET_STD:
        alarms.append(f"hard collapse: target_std {std:.4f} < {HARD_TARGET_STD} (teacher features no "
                      "longer vary); lower the learning rate or raise the EMA start")
    rank = metrics.get("token_rankme")
    if rank is not None and rank < HARD_RANKME_FRACTION * embed_dim:
        alarms.append(f"hard collapse: token RankMe {rank:.2f} < {HARD_RANKME_FRACTION}·E = "
                      f"{HARD_RANKME_FRACTION * embed_dim:.1f}; lower the learning rate or raise the EMA start")
    across = metrics.get("cos_across")
    if across is not None and across > HARD_CROSS_COSINE:
        alarms.append(f"hard collapse: cross-volume pooled cosine {across:.3f} > {HARD_CROSS_COSINE} "
                      "(all volumes look alike); lower the learning rate or raise the EMA start")
    return alarms


class CollapseTracker:
    """Partial-collapse warnings that need history (spec §4):

    - the token RankMe falls more than 50% below its running maximum;
    - the loss falls more than 30% within less than 1% of training ("sudden loss drops are
      usually a sign of partial collapse", vjepa2 #74).

    Per-step losses of small 3D batches are noisy, so the loss is first smoothed by an
    exponential moving average spanning a tenth of the window (no smoothing for runs shorter
    than 1000 steps); a drop is reported once, then the window restarts. Before `warmup_steps`
    neither check warns and the RankMe maximum is not recorded: the loss of a fresh network falls
    fast by design, and a random network's rank is no healthy reference.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0) -> None:
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"CollapseTracker needs total_steps >= 1 and warmup_steps >= 0, got "
                             f"{total_steps} and {warmup_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.rankme_max = 0.0
        self.smoothed_loss: float | None = None
        # (step, smoothed loss) within the window, values strictly decreasing: the front is the
        # window's maximum (a monotonic queue, O(1) per step however long the window)
        self.loss_history: deque[tuple[int, float]] = deque()

    @property
    def window(self) -> int:
        return max(1, int(LOSS_DROP_WINDOW * self.total_steps))

    def update(self, step: int, loss: float, metrics: dict[str, float]) -> list[str]:
        """Record one optimizer step; returns warning messages (empty: nothing suspicious)."""
        warnings: list[str] = []
        active = step >= self.warmup_steps
        rank = metrics.get("token_rankme")
        if active and rank is not None and math.isfinite(rank):
            if self.rankme_max > 0 and rank < (1 - RANKME_DROP) * self.rankme_max:
                warnings.append(f"partial collapse warning at step {step}: token RankMe {rank:.2f} is more "
                                f"than {RANKME_DROP:.0%} below its maximum {self.rankme_max:.2f}; consider a "
                                "smaller lr or a higher EMA start")
            self.rankme_max = max(self.rankme_max, float(rank))
        loss = float(loss)
        if not math.isfinite(loss):
            return warnings + [f"loss is not finite at step {step} ({loss}); collapse checks skipped this step"]
        alpha = 1.0 / max(1, self.window // 10)
        self.smoothed_loss = loss if self.smoothed_loss is None else (
            alpha * loss + (1 - alpha) * self.smoothed_loss)
        history = self.loss_history
        while history and step - history[0][0] > self.window:
            history.popleft()
        earlier = history[0][1] if history else None
        if active and earlier is not None and earlier > 0 and self.smoothed_loss < (1 - LOSS_DROP) * earlier:
            warnings.append(f"partial collapse warning at step {step}: loss fell from {earlier:.4f} to "
                            f"{self.smoothed_loss:.4f} within {self.window} steps (< {LOSS_DROP_WINDOW:.0%} of "
                            "training); check RankMe, consider a smaller lr or a higher EMA start")
            history.clear()
        while history and history[-1][1] <= self.smoothed_loss:
            history.pop()
        history.append((int(step), self.smoothed_loss))
        return warnings

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (JSON- and weights_only-safe)."""
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "rankme_max": self.rankme_max, "smoothed_loss": self.smoothed_loss,
                "loss_history": [[s, v] for s, v in self.loss_history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.rankme_max = float(state["rankme_max"])
        smoothed = state["smoothed_loss"]
        self.smoothed_loss = None if smoothed is None else float(smoothed)
        self.loss_history = deque((int(s), float(v)) for s, v in state["loss_history"])
