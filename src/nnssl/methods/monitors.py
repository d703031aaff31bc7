"""Collapse monitors for I-JEPA: cheap statistics returned as Python floats.

Thresholds and their evidence: documentation/ijepa_method.md, "Collapse alarms"; RankMe: Garrido
et al., ICML 2023.

The loss cannot reveal collapse: a constant teacher gives constant LN₀ targets that the
predictor matches trivially, because LN₀ normalises each token over its features, not across
tokens or volumes. These statistics look across tokens and volumes instead. They run on CPU or
CUDA tensors of any float dtype, without gradients and with autocast off (bf16 singular values
and cosine sums would be too coarse).

The alarm thresholds started as the spec's heuristics and were recalibrated on the toy runs of
tests/test_ijepa_training_core.py (Tiny Primus, E = 96, 64 tokens per volume, batch 8 = 512
token rows, judged as the trainer judges them: on the teacher tokens of the batch at each 50-step
log step; init seeds 0-2):

| run | token RankMe | RankMe / min(E, rows) | cross-volume cosine | target_std |
|---|---|---|---|---|
| healthy (EMA 0.996 → 1, lr 1e-3), steps 50-200 | 53-58 | 0.56-0.61 | 0.49-0.80 | 0.93-0.96 |
| healthy, a 600-step run, steps 25-600 | 49-57 | 0.51-0.60 | 0.58-0.84 | 0.90-0.95 |
| partial collapse (healthy, then teacher = student, lr 3e-3) | 24-28 | 0.25-0.29 | 0.41-0.78 | 0.84-0.90 |
| negative control (teacher = student, lr 1e-2), steps 50-120 | 11-16 | 0.12-0.16 | 0.43-0.93 | 0.86-0.92 |

Only the token RankMe separates collapse from health: LN₀ keeps target_std near 1 even for the
control, and the control's pooled volumes are not reliably more alike than the healthy run's.
So the hard RankMe alarm moved from the spec's 0.05·E (4.8 at E = 96: the control never tripped
it) to 0.2 of the largest RankMe the features can have, min(E, number of token rows): a
fraction, so one bar serves every width and batch (ResEnc-L's 125 cells × batch 2 = 250 rows
< E = 320 cap its RankMe at 250). 0.2 sits above every control value and below healthy runs
(the earlier default CPU recipe kept 35-41 of 96, documentation/evaluation.md; random init
48.8) and below the toy's partial collapse, which is the `CollapseTracker`'s job (RankMe halving
from its peak). The demo's recipe run in memory for its full 4500 steps collapses the way the
CPU demo did (held-out token RankMe 48 → 17.6, pooled RankMe 2.1); on its training batches the
RankMe sits at 19-23 of 96 (random crops vary more than centre crops), right at the hard bar:
the tracker's partial-collapse warning fires from step ~1000 and the hard alarm in some runs
(with `target_layers=2`, equally collapsed, from step 1500), not in others. Calibrated at toy
scale only: check the bar on the first long run at full width. The cosine and std alarms keep
the spec's values: they catch only outright collapse, and a lower cosine bar would flag healthy
runs on homogeneous anatomy, where pooled volumes are alike by nature. Even 0.95 is crossed on
the demo's phantoms: a random-init network gives 0.995 on their centre crops, and training
batches crossed 0.95 at some log step in 10 of 12 short runs of the demo's recipe with and
without anti-collapse terms, so there the cosine alarm reports similar volumes, not collapse.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F

HARD_TARGET_STD = 0.05        # target_std below this: the teacher's features no longer vary
# token RankMe below this fraction of its ceiling min(E, token rows): features span few dims.
# Toy calibration (module docstring): healthy 0.51-0.61, negative control 0.12-0.16.
HARD_RANKME_FRACTION = 0.2
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


def rankme_ceiling(tokens: torch.Tensor, max_tokens: int = 16384) -> int:
    """The largest token RankMe [B, N, E] tokens can have: min(E, rows used by `token_rankme`)."""
    return min(int(tokens.shape[-1]), min(math.prod(tokens.shape[:-1]), max_tokens))


def collapse_metrics(teacher_tokens: torch.Tensor, predictions: torch.Tensor | None = None) -> dict[str, float]:
    """The collapse monitors (documentation/ijepa_method.md) for [B, N, E] LN₀-normalised teacher
    tokens (all tokens of the
    batch) and, when given, the predictions [M*B, Kt, E]. Keys: target_std, token_rankme,
    token_rankme_fraction (RankMe / min(E, token rows): comparable across widths and batch
    sizes), pooled_rankme, cos_within, cos_across, and pred_std only when predictions are given.
    The token subsample is seeded, so equal inputs give equal metrics."""
    within, across = cosine_similarity_within_across(teacher_tokens)
    rank = token_rankme(teacher_tokens, generator=torch.Generator().manual_seed(0))
    metrics = {
        "target_std": feature_std(teacher_tokens),
        "token_rankme": rank,
        "token_rankme_fraction": rank / rankme_ceiling(teacher_tokens),
        "pooled_rankme": pooled_rankme(teacher_tokens),
        "cos_within": within,
        "cos_across": across,
    }
    if predictions is not None:
        metrics["pred_std"] = feature_std(predictions)
    return metrics


def collapse_alarms(metrics: dict[str, float], embed_dim: int) -> list[str]:
    """Hard-collapse messages (empty list: healthy); thresholds and their calibration in the
    module docstring. The RankMe alarm judges `token_rankme_fraction` when present, else
    token_rankme / embed_dim. Missing keys are not judged; a NaN target_std means the teacher
    features are not finite, which is reported."""
    alarms = []
    std = metrics.get("target_std")
    if std is not None and math.isnan(std):
        alarms.append("teacher features are not finite (target_std is NaN): training diverged; "
                      "lower the learning rate")
    elif std is not None and std < HARD_TARGET_STD:
        alarms.append(f"hard collapse: target_std {std:.4f} < {HARD_TARGET_STD} (teacher features no "
                      "longer vary); lower the learning rate or raise the EMA start")
    rank = metrics.get("token_rankme")
    if rank is not None:
        fraction = metrics.get("token_rankme_fraction", rank / embed_dim)
        if fraction < HARD_RANKME_FRACTION:
            ceiling = rank / fraction if fraction > 0 else float(embed_dim)
            alarms.append(f"hard collapse: token RankMe {rank:.2f} < {HARD_RANKME_FRACTION} x its ceiling "
                          f"{ceiling:.0f} (= min(E, token rows)): the features span few dimensions; lower the "
                          "learning rate or raise the EMA start")
    across = metrics.get("cos_across")
    if across is not None and across > HARD_CROSS_COSINE:
        alarms.append(f"hard collapse: cross-volume pooled cosine {across:.3f} > {HARD_CROSS_COSINE} "
                      "(all volumes look alike); lower the learning rate or raise the EMA start")
    return alarms


class CollapseTracker:
    """Partial-collapse warnings that need history (documentation/ijepa_method.md, "Collapse alarms"):

    - the token RankMe falls more than 50% below its running maximum;
    - the loss falls more than 30% within less than 1% of training ("sudden loss drops are
      usually a sign of partial collapse", vjepa2 #74).

    Everything is measured in optimizer steps, not calls: the trainer calls `update` once per
    log interval (50 steps by default) with the interval's mean loss, tests and users may call
    it every step. The loss is smoothed by an exponential moving average with a time constant
    of a tenth of the window, α = 1 − exp(−Δ/τ) for Δ steps since the last call (per-step
    calls of a long run: α ≈ 1/τ; 50-step calls of a 4500-step run: α ≈ 1, the interval mean is
    smoothing enough). A drop is judged against the highest smoothed loss recorded within the
    window. When the calls are sparser than the window (the demo: a 45-step window, calls every
    50 steps), the drop since the previous call is converted to the window's length at a
    constant rate, (L / L_prev)^(window / Δ), so "30% within 1% of training" keeps its meaning;
    a drop straddling two intervals shows in at least one of them. One warning per drop: the
    reference restarts and the next call does not warn on the loss. Before `warmup_steps`
    neither check warns and the RankMe maximum is not recorded: the loss of a fresh network
    falls fast by design, and a random network's rank is no healthy reference.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0) -> None:
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"CollapseTracker needs total_steps >= 1 and warmup_steps >= 0, got "
                             f"{total_steps} and {warmup_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.rankme_max = 0.0
        self.smoothed_loss: float | None = None
        self.previous: tuple[int, float] | None = None  # (step, smoothed loss) of the last call
        self.rearm = False  # a loss drop was just reported: the next call only records
        # (step, smoothed loss) within the window, values strictly decreasing: the front is the
        # window's maximum (a monotonic queue, O(1) per call however long the window)
        self.loss_history: deque[tuple[int, float]] = deque()

    @property
    def window(self) -> float:
        """The loss-drop window in steps (1% of training, at least one step)."""
        return max(1.0, LOSS_DROP_WINDOW * self.total_steps)

    def update(self, step: int, loss: float, metrics: dict[str, float]) -> list[str]:
        """Record the state at optimizer step `step` (`loss`: the mean since the last call);
        returns warning messages (empty: nothing suspicious)."""
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
        step = int(step)
        if self.smoothed_loss is None or self.previous is None:
            self.smoothed_loss = loss
        else:
            alpha = 1.0 - math.exp(-max(1, step - self.previous[0]) / (self.window / 10))
            self.smoothed_loss = alpha * loss + (1 - alpha) * self.smoothed_loss
        current, history = self.smoothed_loss, self.loss_history
        while history and step - history[0][0] > self.window:
            history.popleft()
        drops = []  # (drop as a fraction within one window, reference loss, steps)
        if history and history[0][1] > 0:
            drops.append((1 - current / history[0][1], history[0][1], step - history[0][0]))
        if self.previous is not None and self.previous[1] > 0 and step - self.previous[0] > self.window:
            span = step - self.previous[0]
            drops.append((1 - (current / self.previous[1]) ** (self.window / span), self.previous[1], span))
        worst = max(drops, default=None)
        if active and not self.rearm and worst is not None and worst[0] > LOSS_DROP:
            warnings.append(f"partial collapse warning at step {step}: loss fell from {worst[1]:.4f} to "
                            f"{current:.4f} within {worst[2]} steps ({worst[0]:.0%} per {self.window:g} steps, "
                            f"{LOSS_DROP_WINDOW:.0%} of training; the bar is {LOSS_DROP:.0%}); check RankMe, "
                            "consider a smaller lr or a higher EMA start")
            history.clear()
            self.rearm = True
        else:
            self.rearm = False
        while history and history[-1][1] <= current:
            history.pop()
        history.append((step, current))
        self.previous = (step, current)
        return warnings

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (JSON- and weights_only-safe)."""
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "rankme_max": self.rankme_max, "smoothed_loss": self.smoothed_loss,
                "previous": None if self.previous is None else list(self.previous), "rearm": self.rearm,
                "loss_history": [[s, v] for s, v in self.loss_history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also reads checkpoints written before `previous` / `rearm` existed (they start empty)."""
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.rankme_max = float(state["rankme_max"])
        smoothed = state["smoothed_loss"]
        self.smoothed_loss = None if smoothed is None else float(smoothed)
        previous = state.get("previous")
        self.previous = None if previous is None else (int(previous[0]), float(previous[1]))
        self.rearm = bool(state.get("rearm", False))
        self.loss_history = deque((int(s), float(v)) for s, v in state["loss_history"])
