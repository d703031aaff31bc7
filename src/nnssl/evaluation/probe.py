"""Frozen-feature probes and collapse statistics: is a pretrained encoder better than random?

The loss of a self-supervised run cannot say whether its features are useful (documentation/evaluation.md),
so evaluation measures the features directly, always next to the same architecture at random
initialisation (random ViT features are strong on easy tasks; only the difference means
something):

- collapse statistics (`nnssl.methods.monitors`): RankMe and feature std of the pooled volume
  embeddings and of a seeded token subsample, and the within/across cosine similarities;
- a volume probe: logistic regression on mean-pooled features predicting `class_label` (the
  final tokens' mean, or with `pooling="layers"` every depth's mean concatenated);
- a token probe: logistic regression on token features predicting the label-map value at each
  token (its cell's centre voxel, or the majority within the cell); scored by balanced accuracy
  as well, because background tokens dominate;
- a context probe: the same on the tokens whose label is one of the labeled set's
  `context_labels` only (structures of one tissue told apart by context, e.g. paired organs),
  scored by balanced accuracy over those labels: the dense measurement that needs more than a
  token's own voxels (the encoder-free baselines of `baselines.py` show how much more);
- a learning curve: the probes trained on nested, class-balanced fractions of the training
  cases, so "pretraining helps with few labels" is visible.

Token features are read out on the probe grid (the encoder's token grid, or cells of
`probe_cell` voxels) either from the last depth (`token_readout="final"`) or from every depth
concatenated (`"layers"`), the per-token counterpart of the volume probe's `pooling="layers"`.

Protocol (fixed before looking at any result, never tuned on the test cases): `num_splits`
seeded train/test splits by case (stratified by each case's `stratum`, else its class, when
every stratum has two cases),
features standardised on the training cases, L2-regularised logistic regression with a fixed
`C`. The numbers are means over the splits; the per-split values are kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from nnssl.errors import InvalidInput
from nnssl.export.features import TOKEN_READOUTS

# what the token and context probes read per token (TOKEN_READOUTS): the last depth, or every
# depth concatenated (`nnssl.export.features.readout_tokens` defines them).
# What the volume probe reads: the final tokens' mean, or every depth's mean concatenated
# (`PretrainedEncoder.layer_pooled`)
POOLINGS = ("mean", "layers")


@dataclass(frozen=True)
class ProbeConfig:
    test_fraction: float = 0.5  # share of cases held out per split
    num_splits: int = 5  # seeded train/test splits; results are their mean
    seed: int = 0  # splits, learning-curve subsets and token subsamples
    C: float = 0.1  # inverse L2 strength of the logistic regression (on standardised features)
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)  # learning curve: share of training cases
    token_label: str = "centre"  # "centre" or "majority"
    pooling: str = "mean"  # volume probe features: "mean" (final tokens) or "layers" (every depth, concatenated)
    max_train_tokens: int = 20000  # token probe: tokens it is fitted on (seeded subsample)
    max_tokens_per_case: int = 512  # tokens kept per case for the token probe (seeded positions)
    max_rankme_tokens: int = 16384  # token RankMe subsample (the SVD grows with rows)
    token_readout: str = "final"  # token/context probe features: "final" (last depth) or "layers" (every depth)
    probe_cell: int = 0  # token/context probe grid: cells of this many voxels per side; 0 = the encoder's tokens
    baselines: bool = True  # also probe the encoder-free features of baselines.py

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.test_fraction < 1.0:
            problems.append(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.num_splits < 1:
            problems.append(f"num_splits must be >= 1, got {self.num_splits}")
        if not self.C > 0:
            problems.append(f"C must be > 0, got {self.C}")
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            problems.append(f"fractions must lie in (0, 1], got {list(self.fractions)}")
        if self.token_label not in ("centre", "majority"):
            problems.append(f"token_label must be 'centre' or 'majority', got {self.token_label!r}")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.token_readout not in TOKEN_READOUTS:
            problems.append(f"token_readout must be one of {', '.join(TOKEN_READOUTS)}, got {self.token_readout!r}")
        if isinstance(self.probe_cell, bool) or not isinstance(self.probe_cell, int) or self.probe_cell < 0:
            problems.append(f"probe_cell must be an integer >= 0 (0: the encoder's token grid), "
                            f"got {self.probe_cell!r}")
        if self.max_train_tokens < 100 or self.max_rankme_tokens < 2 or self.max_tokens_per_case < 1:
            problems.append("max_train_tokens must be >= 100, max_rankme_tokens >= 2 and max_tokens_per_case >= 1")
        if problems:
            raise InvalidInput("invalid probe settings:", problems)
        # the full training set is always the last point of the curve: it is the headline number
        object.__setattr__(self, "fractions", tuple(sorted({float(f) for f in self.fractions} | {1.0})))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fractions": list(self.fractions)}


# ---------------------------------------------------------------------------- collapse

def collapse_statistics(pooled: torch.Tensor, tokens: torch.Tensor, max_tokens: int = 16384,
                        seed: int = 0) -> dict[str, float]:
    """RankMe and std of the pooled features [n, E] and of the token features [n, K, E], plus
    the mean pairwise cosine of the tokens within a volume (spatial collapse -> 1) and of the
    pooled features across volumes (sample collapse -> 1). Pooled RankMe is at most the number
    of cases: compare it only between encoders on the same set."""
    from nnssl.methods import monitors

    within, _ = monitors.cosine_similarity_within_across(tokens)
    _, across = monitors.cosine_similarity_within_across(pooled[:, None, :].expand(-1, 2, -1))
    return {
        "pooled_rankme": monitors.rankme(pooled),
        "token_rankme": monitors.token_rankme(tokens, max_tokens, generator=torch.Generator().manual_seed(seed)),
        "pooled_feature_std": monitors.feature_std(pooled),
        "token_feature_std": monitors.feature_std(tokens),
        "cos_within": within,
        "cos_across": across,
    }


# ---------------------------------------------------------------------------- splits

def case_splits(num_cases: int, labels: np.ndarray | None, config: ProbeConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """`num_splits` (train, test) case-index pairs; stratified by `labels` when every class has
    at least two cases, so each side sees each class."""
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    n_test = max(1, round(config.test_fraction * num_cases))
    if num_cases < 4 or num_cases - n_test < 2:
        raise InvalidInput(f"a probe needs at least 4 cases (2 to train, 1 to test), got {num_cases}; "
                           "add cases to the labeled set")
    stratify = False
    if labels is not None:
        classes, counts = np.unique(labels, return_counts=True)
        stratify = counts.min() >= 2 and min(n_test, num_cases - n_test) >= len(classes)
    if stratify:
        splitter = StratifiedShuffleSplit(config.num_splits, test_size=n_test, random_state=config.seed)
        pairs = splitter.split(np.zeros(num_cases), labels)
    else:
        pairs = ShuffleSplit(config.num_splits, test_size=n_test, random_state=config.seed).split(np.zeros(num_cases))
    return [(np.sort(tr), np.sort(te)) for tr, te in pairs]


def nested_subsets(train: np.ndarray, labels: np.ndarray | None, fractions: tuple[float, ...],
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Nested subsets of the training cases, one per fraction: a seeded order that deals the
    classes round-robin, cut at ceil(f·n) (at least one case per class), so a smaller fraction
    is always a prefix of a larger one and never misses a class it could hold."""
    order = rng.permutation(train)
    min_size = 1
    if labels is not None:
        per_class = [list(order[labels[order] == c]) for c in np.unique(labels[order])]
        order = np.array([idx for group in _round_robin(per_class) for idx in group])
        min_size = len(per_class)
    return [order[: min(len(order), max(min_size, math.ceil(f * len(order))))] for f in fractions]


def _round_robin(groups: list[list[int]]) -> list[list[int]]:
    rounds = []
    for k in range(max(len(g) for g in groups)):
        rounds.append([g[k] for g in groups if k < len(g)])
    return rounds


# ---------------------------------------------------------------------------- probes

def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  C: float) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of standardised L2 logistic regression. A training set
    holding one class predicts that class (the score a constant guess gets)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        predicted = np.full_like(y_test, y_train[0])
    else:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
        predicted = model.fit(x_train, y_train).predict(x_test)
    accuracy = float((predicted == y_test).mean())
    import warnings

    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected on tokens
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y_test, predicted))
    return accuracy, balanced


def _curve(points: list[list[tuple[float, float, int]]], fractions: tuple[float, ...]) -> list[dict[str, Any]]:
    """points[split][fraction] = (accuracy, balanced, n_train_cases) -> curve entries."""
    out = []
    for j, fraction in enumerate(fractions):
        acc = [p[j][0] for p in points]
        bal = [p[j][1] for p in points]
        out.append({"fraction": fraction, "num_train_cases": int(np.mean([p[j][2] for p in points])),
                    "accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
                    "balanced_accuracy": float(np.mean(bal)), "balanced_accuracy_std": float(np.std(bal)),
                    "accuracy_per_split": acc, "balanced_accuracy_per_split": bal})
    return out


def _summary(curve: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    full = curve[-1]
    return {"accuracy": full["accuracy"], "accuracy_std": full["accuracy_std"],
            "balanced_accuracy": full["balanced_accuracy"], "balanced_accuracy_std": full["balanced_accuracy_std"],
            "accuracy_per_split": full["accuracy_per_split"], **extra, "learning_curve": curve}


def volume_probe(pooled: np.ndarray, labels: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                 config: ProbeConfig) -> dict[str, Any]:
    """Logistic regression on pooled features [n, E] -> class labels, over splits and fractions."""
    points = []
    for s, (train, test) in enumerate(splits):
        rng = np.random.default_rng([config.seed, 1, s])
        row = []
        for subset in nested_subsets(train, labels, config.fractions, rng):
            acc, bal = fit_and_score(pooled[subset], labels[subset], pooled[test], labels[test], config.C)
            row.append((acc, bal, len(subset)))
        points.append(row)
    counts = np.bincount(labels)
    return _summary(_curve(points, config.fractions), {"chance_accuracy": float(counts.max() / counts.sum())})


def token_probe(tokens: np.ndarray, token_labels: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                config: ProbeConfig) -> dict[str, Any]:
    """Logistic regression on token features [n, N, E] -> per-token labels [n, N]; fitted on
    at most `max_train_tokens` seeded training tokens, scored on every test token."""
    e = tokens.shape[-1]
    points = []
    for s, (train, test) in enumerate(splits):
        rng = np.random.default_rng([config.seed, 2, s])
        x_test, y_test = tokens[test].reshape(-1, e), token_labels[test].reshape(-1)
        row = []
        for subset in nested_subsets(train, None, config.fractions, rng):
            x, y = tokens[subset].reshape(-1, e), token_labels[subset].reshape(-1)
            if len(y) > config.max_train_tokens:
                keep = rng.choice(len(y), config.max_train_tokens, replace=False)
                x, y = x[keep], y[keep]
            acc, bal = fit_and_score(x, y, x_test, y_test, config.C)
            row.append((acc, bal, len(subset)))
        points.append(row)
    values, counts = np.unique(token_labels, return_counts=True)
    return _summary(_curve(points, config.fractions), {
        "chance_accuracy": float(counts.max() / counts.sum()),
        "token_label_counts": {int(v): int(c) for v, c in zip(values, counts)}})


def context_probe(features: np.ndarray, labels: np.ndarray, case_of: np.ndarray,
                  splits: list[tuple[np.ndarray, np.ndarray]], config: ProbeConfig,
                  fractions: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Logistic regression on the tokens that carry a context label: features [T, F], labels [T]
    and the case each token belongs to [T] (the splits are by case, as for every probe); fitted
    on at most `max_train_tokens` seeded training tokens, scored on every test token. Balanced
    accuracy over the context labels is the headline (chance: 1 / number of labels)."""
    fractions = config.fractions if fractions is None else fractions
    points = []
    for s, (train, test) in enumerate(splits):
        rng = np.random.default_rng([config.seed, 4, s])
        in_test = np.isin(case_of, test)
        row = []
        for subset in nested_subsets(train, None, fractions, rng):
            chosen = np.flatnonzero(np.isin(case_of, subset))
            if len(chosen) > config.max_train_tokens:
                chosen = np.sort(rng.choice(chosen, config.max_train_tokens, replace=False))
            acc, bal = fit_and_score(features[chosen], labels[chosen], features[in_test], labels[in_test], config.C)
            row.append((acc, bal, len(subset)))
        points.append(row)
    values, counts = np.unique(labels, return_counts=True)
    return _summary(_curve(points, fractions), {
        "chance_accuracy": float(counts.max() / counts.sum()), "chance_balanced_accuracy": 1.0 / len(values),
        "token_label_counts": {int(v): int(c) for v, c in zip(values, counts)},
        "num_features": int(features.shape[1])})
