"""Is the twins' side in pretrained tokens at all, or only not linearly? A diagnostic of dense-v1.

The dense protocol's headline is a linear probe (`nnssl.evaluation.protocol`). When pretrained
encoders score at random init's level there, two explanations differ in what they mean for
segmentation, where a non-linear decoder reads the features: the information is absent, or it
is there in a form a linear map cannot read. This script scores the same context tokens (the
protocol's read-out, cells and splits) with gradient-boosted trees, the non-linear probe
`benchmarks/dense_probe_baselines.py` uses for the context oracle's ceiling, next to the
protocol's linear probe, for exported encoders and for random inits of their architecture.

A diagnostic, not a verdict: no recipe choice is made on it, and it runs on whichever protocol set
is given (the search set by default).

    .venv/bin/python benchmarks/dense_probe_nonlinear.py --checkpoints A.pth B.pth ... \
        --labeled /tmp/protocol_sets/search --random_seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def tree_probe(features: np.ndarray, labels: np.ndarray, case_of: np.ndarray,
               splits: list[tuple[np.ndarray, np.ndarray]], max_iter: int = 300) -> float:
    """Mean balanced accuracy over the case splits of gradient-boosted trees on context tokens."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import balanced_accuracy_score

    scores = []
    for train, test in splits:
        tr, te = np.isin(case_of, train), np.isin(case_of, test)
        model = HistGradientBoostingClassifier(max_iter=max_iter, random_state=0).fit(features[tr], labels[tr])
        scores.append(balanced_accuracy_score(labels[te], model.predict(features[te])))
    return float(np.mean(scores))


def diagnose(checkpoints: list[Path], labeled_folder: Path, random_seeds: list[int], max_iter: int = 300) -> dict:
    """name -> {"linear": protocol balanced accuracy, "trees": the same tokens through trees}."""
    from dataclasses import replace

    from nnssl.evaluation.extract import extract
    from nnssl.evaluation.labeled import Preparation, load_labeled_set
    from nnssl.evaluation.probe import case_splits, context_probe
    from nnssl.evaluation.protocol import DENSE_PROBE
    from nnssl.export.features import load_pretrained_encoder, random_encoder_like

    encoders = {f"pretrained:{path}": load_pretrained_encoder(path) for path in checkpoints}
    first = next(iter(encoders.values()))
    encoders.update({f"random:{seed}": random_encoder_like(first, seed=seed) for seed in random_seeds})
    labeled = load_labeled_set(labeled_folder)
    probe = replace(DENSE_PROBE, baselines=False)
    ex = extract(encoders, labeled, Preparation.for_encoder(first), probe, batch_size=8)
    splits = case_splits(len(labeled.cases), labeled.split_strata(), probe)
    out = {}
    for name, feats in ex.features.items():
        context = feats.stacked()["context"]
        linear = context_probe(context, ex.context_labels, ex.context_cases, splits, probe)["balanced_accuracy"]
        out[name] = {"linear": round(float(linear), 4),
                     "trees": round(tree_probe(context, ex.context_labels, ex.context_cases, splits, max_iter), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True, help="exported checkpoints")
    parser.add_argument("--labeled", type=Path, required=True, help="a protocol labeled set (search or test)")
    parser.add_argument("--random_seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max_iter", type=int, default=300, help="boosting iterations of the tree probe")
    args = parser.parse_args()
    start = time.perf_counter()
    scores = diagnose(args.checkpoints, args.labeled, args.random_seeds, args.max_iter)

    def mean(kind: str, probe: str) -> float:
        values = [v[probe] for k, v in scores.items() if k.startswith(kind)]
        return round(float(np.mean(values)), 4)

    print(json.dumps({"labeled": str(args.labeled), "scores": scores,
                      "mean": {f"{kind}_{probe}": mean(kind, probe) for kind in ("pretrained", "random")
                               for probe in ("linear", "trees")},
                      "wall_seconds": round(time.perf_counter() - start, 1)}, indent=1))


if __name__ == "__main__":
    main()
