"""Collapse monitors for I-JEPA (IJEPA_SPEC §4): cheap statistics that return Python floats.

The loss alone cannot reveal collapse: a constant teacher gives constant LN₀ targets that the
predictor matches trivially (LN₀ normalises each token over features, not across tokens or
volumes). These statistics look across tokens and volumes instead. Thresholds are the spec's
recommended heuristics; the negative-control test (T5) checks they fire on real collapse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

HARD_TARGET_STD = 0.05
HARD_RANKME_FRACTION = 0.05
HARD_CROSS_COSINE = 0.95
RANKME_DROP = 0.5
LOSS_DROP = 0.3
LOSS_DROP_WINDOW = 0.01


@torch.no_grad()
def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(entropy) of the normalised singular values of [N, D] features (Garrido et al.)."""
    z = features.detach().float().reshape(-1, features.shape[-1])
    if z.shape[0] < 2:
        return float("nan")
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def token_rankme(tokens: torch.Tensor, max_tokens: int = 16384,
                 generator: torch.Generator | None = None) -> float:
    """RankMe of a random subsample of the [B, N, E] tokens."""
    flat = tokens.detach().reshape(-1, tokens.shape[-1])
    if flat.shape[0] > max_tokens:
        pick = torch.randperm(flat.shape[0], generator=generator)[:max_tokens].to(flat.device)
        flat = flat[pick]
    return rankme(flat)


@torch.no_grad()
def pooled_rankme(tokens: torch.Tensor) -> float:
    """RankMe of mean-pooled volume embeddings ([B, N, E] -> [B, E])."""
    return rankme(tokens.detach().float().mean(1))


@torch.no_grad()
def feature_std(x: torch.Tensor) -> float:
    """Mean over feature dims of the std over all other axes (spec: target_std / pred_std)."""
    flat = x.detach().float().reshape(-1, x.shape[-1])
    if flat.shape[0] < 2:
        return float("nan")
    return float(flat.std(0).mean())


@torch.no_grad()
def cosine_similarity_within_across(tokens: torch.Tensor, max_tokens: int = 1024) -> tuple[float, float]:
    """(mean pairwise token cosine within a volume, mean pairwise pooled cosine across volumes)."""
    t = tokens.detach().float()
    if t.shape[1] > max_tokens:
        t = t[:, torch.linspace(0, t.shape[1] - 1, max_tokens, device=t.device).long()]
    n = t.shape[1]
    normed = F.normalize(t, dim=-1)
    sim = normed @ normed.transpose(1, 2)  # [B, n, n]
    within = (sim.sum((1, 2)) - n) / max(n * (n - 1), 1)
    pooled = F.normalize(t.mean(1), dim=-1)
    b = pooled.shape[0]
    across = float("nan")
    if b > 1:
        cross = pooled @ pooled.T
        across = float((cross.sum() - b) / (b * (b - 1)))
    return float(within.mean()), across


def collapse_metrics(teacher_tokens: torch.Tensor, predictions: torch.Tensor | None = None) -> dict[str, float]:
    """The per-step monitors for [B, N, E] teacher tokens (LN₀-normalised) and predictions."""
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
    """Hard-collapse messages (empty when healthy), each naming the statistic and threshold."""
    alarms = []
    if metrics.get("target_std", 1.0) < HARD_TARGET_STD:
        alarms.append(f"hard collapse: target_std {metrics['target_std']:.4f} < {HARD_TARGET_STD}")
    if metrics.get("token_rankme", float("inf")) < HARD_RANKME_FRACTION * embed_dim:
        alarms.append(f"hard collapse: token RankMe {metrics['token_rankme']:.2f} < "
                      f"{HARD_RANKME_FRACTION}·E = {HARD_RANKME_FRACTION * embed_dim:.1f}")
    if metrics.get("cos_across", 0.0) > HARD_CROSS_COSINE:
        alarms.append(f"hard collapse: cross-volume pooled cosine {metrics['cos_across']:.3f} > "
                      f"{HARD_CROSS_COSINE}")
    return alarms


@dataclass
class CollapseTracker:
    """Partial-collapse warnings that need history: RankMe vs its running max, sudden loss drops."""

    total_steps: int
    rankme_max: float = 0.0
    loss_history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, step: int, loss: float, metrics: dict[str, float]) -> list[str]:
        warnings = []
        rank = metrics.get("token_rankme")
        if rank is not None and rank == rank:  # not NaN
            if self.rankme_max and rank < RANKME_DROP * self.rankme_max:
                warnings.append(f"partial collapse: token RankMe {rank:.2f} fell more than "
                                f"{int(RANKME_DROP * 100)}% below its maximum {self.rankme_max:.2f}")
            self.rankme_max = max(self.rankme_max, rank)
        window = max(1, int(LOSS_DROP_WINDOW * self.total_steps))
        self.loss_history = [(s, v) for s, v in self.loss_history if step - s <= window]
        earlier = [v for s, v in self.loss_history if s < step]
        if earlier and max(earlier) > 0 and loss < (1 - LOSS_DROP) * max(earlier):
            warnings.append(f"partial collapse warning: loss fell from {max(earlier):.4f} to {loss:.4f} "
                            f"within {window} steps (<{LOSS_DROP_WINDOW:.0%} of training); check RankMe, "
                            "consider a smaller lr or a higher EMA start")
        self.loss_history.append((step, float(loss)))
        return warnings

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "rankme_max": self.rankme_max,
                "loss_history": [[s, v] for s, v in self.loss_history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps = int(state["total_steps"])
        self.rankme_max = float(state["rankme_max"])
        self.loss_history = [(int(s), float(v)) for s, v in state["loss_history"]]
