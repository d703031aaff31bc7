"""`evaluate_checkpoint`: frozen features of a pretrained encoder vs random init on a labeled set.

One pass over the cases: each batch is prepared once (`labeled.prepare_case`) and fed to both
encoders, so memory holds only pooled features and a seeded subset of token features per case,
however large the volumes. Then the collapse statistics and probes of `probe.py` run on both,
and `report.py` writes `evaluation.json`, `evaluation.png` and the summary table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnssl.evaluation.labeled import (
    LabeledSet,
    Preparation,
    load_labeled_set,
    prepare_case,
    token_labels,
)
from nnssl.evaluation.probe import (
    ProbeConfig,
    case_splits,
    collapse_statistics,
    token_probe,
    volume_probe,
)
from nnssl.log import get_logger

logger = get_logger(__name__)

ENCODERS = ("pretrained", "random")


@dataclass
class Features:
    """Per-encoder features of every case: pooled [n, E] (mean over all final tokens, for the
    collapse statistics), the volume probe's read-out [n, F] (`ProbeConfig.pooling`; the pooled
    features themselves for "mean") and the tokens [n, K, E] at the `positions` kept for the
    token probe and the token statistics."""

    pooled: list[np.ndarray] = field(default_factory=list)
    readout: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pooled = np.concatenate(self.pooled)
        return pooled, np.concatenate(self.readout) if self.readout else pooled, np.concatenate(self.tokens)


def kept_positions(num_tokens: int, limit: int, seed: int) -> np.ndarray:
    """The token positions every case contributes to the token probe: all of them, or a seeded
    sorted subset of `limit` (the same for every case and both encoders)."""
    if num_tokens <= limit:
        return np.arange(num_tokens)
    return np.sort(np.random.default_rng([seed, 3]).choice(num_tokens, limit, replace=False))


def extract_features(encoders: dict[str, Any], labeled: LabeledSet, prep: Preparation, positions: np.ndarray,
                     token_label_mode: str, batch_size: int = 4,
                     pooling: str = "mean") -> tuple[dict[str, Features], np.ndarray | None]:
    """Features of every case for each encoder, and the per-token labels [n, K] (None without
    label maps). Volumes are prepared once per batch and shared by the encoders; one forward
    pass per encoder and batch serves every read-out."""
    from tqdm import tqdm

    from nnssl.export.features import concat_layer_means

    features = {name: Features() for name in encoders}
    labels: list[np.ndarray] = []
    grid = next(iter(encoders.values())).grid
    index = torch.from_numpy(positions)
    cases = labeled.cases
    with tqdm(total=len(cases), unit="case", desc="features", leave=False) as bar:
        for start in range(0, len(cases), batch_size):
            batch = [prepare_case(case, prep) for case in cases[start:start + batch_size]]
            volumes = torch.from_numpy(np.stack([volume for volume, _ in batch]))
            for name, encoder in encoders.items():
                if pooling == "layers":
                    layers = encoder.layers(volumes)
                    tokens = layers[-1]
                    features[name].readout.append(concat_layer_means(layers).cpu().numpy())
                else:
                    tokens = encoder.tokens(volumes)
                features[name].pooled.append(tokens.mean(1).cpu().numpy())
                features[name].tokens.append(tokens[:, index.to(tokens.device)].cpu().numpy())
            if labeled.has_label_maps:
                labels += [token_labels(label, grid, token_label_mode)[positions] for _, label in batch]
            bar.update(len(batch))
    return features, np.stack(labels) if labels else None


def evaluate_encoders(encoders: dict[str, Any], labeled: LabeledSet, probe: ProbeConfig | None = None,
                      batch_size: int = 4) -> dict[str, Any]:
    """Collapse statistics and probes for each encoder (the first one is the subject, the rest
    references) on `labeled`; the `evaluation.json` content without file-specific fields."""
    probe = probe or ProbeConfig()
    first = next(iter(encoders.values()))
    prep = Preparation.for_encoder(first)
    positions = kept_positions(first.num_tokens, probe.max_tokens_per_case, probe.seed)
    start = time.perf_counter()
    features, tok_labels = extract_features(encoders, labeled, prep, positions, probe.token_label, batch_size,
                                            probe.pooling)
    logger.info("features of %d cases from %d encoders in %.1f s", len(labeled.cases), len(encoders),
                time.perf_counter() - start)
    class_labels = labeled.class_labels() if labeled.has_class_labels else None
    splits = case_splits(len(labeled.cases), class_labels, probe)
    results: dict[str, Any] = {}
    for name, feats in features.items():
        pooled, readout, tokens = feats.stacked()
        # pooled features average all tokens; the token statistics use the kept positions
        entry: dict[str, Any] = {"collapse": collapse_statistics(torch.from_numpy(pooled), torch.from_numpy(tokens),
                                                                 probe.max_rankme_tokens, probe.seed)}
        if class_labels is not None:
            entry["volume_probe"] = {**volume_probe(readout, class_labels, splits, probe), "pooling": probe.pooling,
                                     "num_features": int(readout.shape[1])}
        if tok_labels is not None:
            entry["token_probe"] = token_probe(tokens, tok_labels, splits, probe)
        results[name] = entry
    return {
        "data": _data_summary(labeled, class_labels, tok_labels),
        "preparation": {"input_shape": list(prep.input_shape),
                        "spacing": None if prep.spacing is None else list(prep.spacing),
                        "transpose_forward": list(prep.transpose_forward),
                        "resampling_method": prep.resampling_method,
                        "tokens_per_case": len(positions), "num_tokens": int(first.num_tokens)},
        "splits": [{"train": [labeled.cases[i].case_id for i in tr], "test": [labeled.cases[i].case_id for i in te]}
                   for tr, te in splits],
        "encoders": results,
    }


def _data_summary(labeled: LabeledSet, class_labels: np.ndarray | None, tok: np.ndarray | None) -> dict[str, Any]:
    out: dict[str, Any] = {"folder": str(labeled.folder), "num_cases": len(labeled.cases),
                           "has_class_labels": class_labels is not None, "has_label_maps": tok is not None}
    if class_labels is not None:
        values, counts = np.unique(class_labels, return_counts=True)
        out["class_counts"] = {_name(labeled.class_names, int(v)): int(c) for v, c in zip(values, counts)}
    if tok is not None:
        values = np.unique(tok)
        out["token_labels"] = {int(v): labeled.label_names.get(int(v), str(int(v))) for v in values}
    return out


def _name(names: list[str], index: int) -> str:
    return names[index] if index < len(names) else str(index)


def evaluate_checkpoint(checkpoint: str | Path, labeled_folder: str | Path, out_folder: str | Path | None = None,
                        probe: ProbeConfig | None = None, random_seed: int = 0, device: str = "cpu",
                        batch_size: int = 4, plot: bool = True) -> dict[str, Any]:
    """Evaluate the encoder of `checkpoint` against `random_encoder_like` it on the labeled set
    in `labeled_folder`; writes `evaluation.json` (and `evaluation.png` unless `plot=False`) to
    `out_folder` when given, and returns the JSON content (fields: documentation/evaluation.md)."""
    from nnssl.evaluation.report import write_report
    from nnssl.export.features import load_pretrained_encoder, random_encoder_like

    probe = probe or ProbeConfig()
    labeled = load_labeled_set(labeled_folder)  # cheap checks first: a bad folder fails fast
    pretrained = load_pretrained_encoder(checkpoint, device=device)
    reference = random_encoder_like(pretrained, seed=random_seed)
    result = evaluate_encoders({"pretrained": pretrained, "random": reference}, labeled, probe, batch_size)
    result = {
        "checkpoint": str(Path(checkpoint).absolute()),
        "encoder": {"arch_class_name": pretrained.spec.arch_class_name, "family": pretrained.family,
                    "patch_size": list(pretrained.patch_size), "grid": list(pretrained.grid),
                    "embed_dim": pretrained.embed_dim,
                    "spacing": None if pretrained.spacing is None else list(pretrained.spacing)},
        "random_seed": int(random_seed),
        "probe_config": probe.to_dict(),
        **result,
    }
    result["pretrained_minus_random"] = _differences(result["encoders"])
    if out_folder is not None:
        write_report(result, Path(out_folder), plot=plot)
    return result


def _differences(encoders: dict[str, Any]) -> dict[str, float]:
    """Headline numbers: pretrained minus random, in accuracy points (fractions, not %)."""
    pre, ref = encoders["pretrained"], encoders["random"]
    out = {}
    if "volume_probe" in pre:
        out["volume_probe_accuracy"] = pre["volume_probe"]["accuracy"] - ref["volume_probe"]["accuracy"]
    if "token_probe" in pre:
        out["token_probe_balanced_accuracy"] = (pre["token_probe"]["balanced_accuracy"]
                                                - ref["token_probe"]["balanced_accuracy"])
    return out
