"""Does the dense-probe protocol measure context? Its numbers without any pretrained model.

For each protocol labeled set (`nnssl.evaluation.protocol`; written to `--folder` unless it is
there already) this measures, with the protocol's splits and probe:

- the encoder-free baselines of `nnssl.evaluation.baselines` (a token's own cell: statistics,
  voxels, statistics + position; the context oracle), and a non-linear ceiling: gradient-boosted
  trees on the oracle's features;
- random-init encoders at both token read-outs (`final`, `layers`): Tiny Primus at 32³ (the
  demo's encoder, 8³ patches) over `--random_seeds`, and Tiny ResEnc at 64³ on the same 8³ cells
  (`probe_cell` 8) over the first `--resenc_seeds` of them (a ResEnc forward pass at 64³ costs
  about 0.3 s per volume on one core);
- the spread of random init over seeds at smaller case counts (`--sizes`: the first N cases),
  which is what sets the protocol's number of cases.

`--token_set FOLDER` also measures the plain token probe on any labeled set with label maps
(e.g. the demo's default phantoms): every own-cell baseline, with and without position, next to
random-init Tiny Primus at both read-outs, with `nnssl_evaluate`'s default probe settings.

Prints one JSON object. Runs on one thread:

    .venv/bin/python benchmarks/dense_probe_baselines.py --folder /tmp/dense_sets --sets search test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np


def encoders(family: str, seeds: list[int]) -> dict[str, object]:
    """Random-init encoders of one family, named by seed."""
    from nnssl.export.features import random_encoder_like

    if family == "primus":
        from nnssl.methods.factory import build_method
        from nnssl.training.registry import resolve_trainer

        spec = build_method(resolve_trainer("IJEPATrainer_Tiny_P32").config).backbone
    else:
        from nnssl.models.resenc import (
            build_resenc_l,
            resenc_backbone_spec,
            resenc_l_arch_kwargs,
        )

        kwargs = resenc_l_arch_kwargs(preset="Tiny")
        spec = resenc_backbone_spec(build_resenc_l(preset="Tiny"), kwargs, (64, 64, 64))
    return {str(s): random_encoder_like(spec, seed=s) for s in seeds}


def balanced_subset(strata: np.ndarray, size: int) -> np.ndarray:
    """`size` cases, as many of each split stratum (class x landmark side) as possible, in case
    order: a smaller protocol set of the same composition."""
    groups = [np.flatnonzero(strata == v) for v in np.unique(strata)]
    per = size // len(groups)
    return np.sort(np.concatenate([g[:per] for g in groups]))


def context_scores(contexts: dict[str, np.ndarray], ex, labeled, probe, size: int) -> dict[str, float]:
    """Balanced accuracy of every encoder's context tokens [T, F] on a balanced subset of `size`
    cases (splits drawn for that subset, as the protocol would on a set of that size)."""
    from nnssl.evaluation.probe import case_splits, context_probe

    strata = labeled.split_strata()
    subset = balanced_subset(strata, size)
    keep = np.isin(ex.context_cases, subset)
    splits = [(subset[tr], subset[te]) for tr, te in case_splits(len(subset), strata[subset], probe)]
    return {name: context_probe(x[keep], ex.context_labels[keep], ex.context_cases[keep], splits,
                                probe)["balanced_accuracy"] for name, x in contexts.items()}


def ceiling(ex, labeled, probe) -> float:
    """Gradient-boosted trees on the oracle's features: how far context alone gets, non-linearly."""
    from dense_probe_nonlinear import tree_probe
    from nnssl.evaluation.probe import case_splits

    x = np.concatenate(ex.context_baselines["context_oracle"])
    splits = case_splits(len(labeled.cases), labeled.split_strata(), probe)
    return tree_probe(x, ex.context_labels, ex.context_cases, splits)


def summary(scores: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(scores)), 4), "std": round(float(np.std(scores)), 4),
            "min": round(min(scores), 4), "max": round(max(scores), 4), "spread": round(max(scores) - min(scores), 4)}


def measure(which: str, folder, args) -> dict:
    from nnssl.evaluation.evaluate import probe_baselines
    from nnssl.evaluation.extract import extract
    from nnssl.evaluation.labeled import Preparation, load_labeled_set
    from nnssl.evaluation.probe import case_splits
    from nnssl.evaluation.protocol import (
        DENSE_PROBE,
        identify_labeled_set,
        write_protocol_set,
    )

    path = folder / which
    if identify_labeled_set(path) != which or not (path / "cases.json").is_file():
        start = time.perf_counter()
        write_protocol_set(which, path, num_processes=args.jobs)
        print(f"{which}: wrote the set in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    labeled = load_labeled_set(path)
    out: dict = {"cases": len(labeled.cases)}
    for family in args.families:
        seeds = args.random_seeds if family == "primus" else args.random_seeds[:args.resenc_seeds]
        family_encoders = encoders(family, seeds)
        prep = Preparation.for_encoder(next(iter(family_encoders.values())))
        # one pass: the "final" read-out is the last depth's columns of the "layers" read-out
        probe = replace(DENSE_PROBE, token_readout="layers", baselines=family == "primus")
        start = time.perf_counter()
        ex = extract(family_encoders, labeled, prep, probe, batch_size=8)
        seconds = time.perf_counter() - start
        if probe.baselines:
            splits = case_splits(len(labeled.cases), labeled.split_strata(), probe)
            out["baselines"] = {name: round(entry["balanced_accuracy"], 4) for name, entry in
                                probe_baselines(ex, splits, probe)["context_probe"].items()}
            out["baselines"]["context_oracle_boosted_trees"] = round(ceiling(ex, labeled, probe), 4)
            out["context_tokens"] = {int(v): int((ex.context_labels == v).sum()) for v in labeled.context_labels}
        last_width = int(next(iter(family_encoders.values())).embed_dim)
        for readout in ("final", "layers"):
            columns = slice(-last_width, None) if readout == "final" else slice(None)
            contexts = {name: f.stacked()["context"][:, columns] for name, f in ex.features.items()}
            entry = {"extract_seconds_both_readouts": round(seconds, 1),
                     "num_features": int(next(iter(contexts.values())).shape[1])}
            for size in sorted(set(args.sizes) | {len(labeled.cases)}):
                if size <= len(labeled.cases):
                    scores = context_scores(contexts, ex, labeled, probe, size)
                    entry[f"{size}_cases"] = {"per_seed": {s: round(v, 4) for s, v in scores.items()},
                                              **summary(list(scores.values()))}
            out[f"{family}_{readout}"] = entry
            print(f"{which} {family} {readout}: {entry[f'{len(labeled.cases)}_cases']}", file=sys.stderr, flush=True)
    return out


def token_set(folder, seeds: list[int]) -> dict:
    """The token probe on `folder` (all its label values): own-cell baselines vs random init."""
    from nnssl.evaluation.baselines import OWN_CELL_BASELINES
    from nnssl.evaluation.evaluate import probe_baselines
    from nnssl.evaluation.extract import extract
    from nnssl.evaluation.labeled import Preparation, load_labeled_set
    from nnssl.evaluation.probe import ProbeConfig, case_splits, token_probe

    labeled = load_labeled_set(folder)
    family_encoders = encoders("primus", seeds)
    probe = ProbeConfig(fractions=(1.0,), token_readout="layers")
    ex = extract(family_encoders, labeled, Preparation.for_encoder(next(iter(family_encoders.values()))), probe,
                 batch_size=8, token_baselines=OWN_CELL_BASELINES)
    splits = case_splits(len(labeled.cases), labeled.split_strata(), probe)
    out = {"cases": len(labeled.cases), "token_labels": int(len(np.unique(ex.token_labels))),
           "baselines": {name: round(entry["balanced_accuracy"], 4)
                         for name, entry in probe_baselines(ex, splits, probe)["token_probe"].items()}}
    width = int(next(iter(family_encoders.values())).embed_dim)
    for readout, columns in (("final", slice(-width, None)), ("layers", slice(None))):
        out[f"primus_{readout}"] = {name: round(token_probe(f.stacked()["probe_tokens"][..., columns], ex.token_labels,
                                                            splits, probe)["balanced_accuracy"], 4)
                                    for name, f in ex.features.items()}
    return out


def main() -> None:
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, required=True, help="where the protocol's labeled sets are (or go)")
    p.add_argument("--sets", nargs="*", default=["search"], choices=["search", "test"])
    p.add_argument("--families", nargs="+", default=["primus", "resenc"], choices=["primus", "resenc"])
    p.add_argument("--random_seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--resenc_seeds", type=int, default=5, help="the first N random seeds for ResEnc (slower)")
    p.add_argument("--sizes", type=int, nargs="+", default=[120, 240])
    p.add_argument("--jobs", type=int, default=1, help="processes writing the phantoms")
    p.add_argument("--token_set", type=Path, default=None, help="also: the token probe on this labeled folder")
    p.add_argument("--token_seeds", type=int, nargs="+", default=[0, 1, 2], help="random inits for --token_set")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    result = {"random_seeds": args.random_seeds, "sets": {w: measure(w, args.folder, args) for w in args.sets}}
    if args.token_set is not None:
        result["token_set"] = {"folder": str(args.token_set), **token_set(args.token_set, args.token_seeds)}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
