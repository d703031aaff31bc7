"""`evaluate_checkpoint`: frozen features of a pretrained encoder vs random init on a labeled set.

One pass over the cases (`extract.extract`): each batch is prepared once and fed to both
encoders, so memory holds only pooled features and seeded subsets of token features per case,
however large the volumes. Then the collapse statistics and probes of `probe.py` run on both,
the encoder-free baselines of `baselines.py` run once (they do not depend on the encoder), and
`report.py` writes `evaluation.json`, `evaluation.png` and the summary table.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnssl.errors import InvalidInput
from nnssl.evaluation.extract import Extracted, check_context_splits, extract
from nnssl.evaluation.labeled import LabeledSet, Preparation, load_labeled_set
from nnssl.evaluation.probe import (
    ProbeConfig,
    case_splits,
    collapse_statistics,
    context_probe,
    token_probe,
    volume_probe,
)
from nnssl.log import get_logger

logger = get_logger(__name__)

ENCODERS = ("pretrained", "random")


def evaluate_encoders(encoders: dict[str, Any], labeled: LabeledSet, probe: ProbeConfig | None = None,
                      batch_size: int = 4) -> dict[str, Any]:
    """Collapse statistics and probes for each encoder (the first one is the subject, the rest
    references) on `labeled`, and the baselines; the `evaluation.json` content without
    file-specific fields."""
    probe = probe or ProbeConfig()
    first = next(iter(encoders.values()))
    prep = Preparation.for_encoder(first)
    start = time.perf_counter()
    ex = extract(encoders, labeled, prep, probe, batch_size)
    logger.info("features of %d cases from %d encoders in %.1f s", len(labeled.cases), len(encoders),
                time.perf_counter() - start)
    class_labels = labeled.class_labels() if labeled.has_class_labels else None
    splits = case_splits(len(labeled.cases), labeled.split_strata(), probe)
    if ex.context_cases is not None:
        check_context_splits(ex, splits, labeled)
    results: dict[str, Any] = {}
    for name, feats in ex.features.items():
        arrays = feats.stacked()
        # pooled features average all tokens; the token statistics use the kept positions
        entry: dict[str, Any] = {"collapse": collapse_statistics(torch.from_numpy(arrays["pooled"]),
                                                                 torch.from_numpy(arrays["tokens"]),
                                                                 probe.max_rankme_tokens, probe.seed)}
        if class_labels is not None:
            entry["volume_probe"] = {**volume_probe(arrays["readout"], class_labels, splits, probe),
                                     "pooling": probe.pooling, "num_features": int(arrays["readout"].shape[1])}
        if ex.token_labels is not None:
            entry["token_probe"] = {**token_probe(arrays["probe_tokens"], ex.token_labels, splits, probe),
                                    "readout": probe.token_readout,
                                    "num_features": int(arrays["probe_tokens"].shape[-1])}
        if ex.context_cases is not None:
            entry["context_probe"] = {**context_probe(arrays["context"], ex.context_labels, ex.context_cases, splits,
                                                      probe), "readout": probe.token_readout}
        results[name] = entry
    out = {
        "data": _data_summary(labeled, class_labels, ex),
        "preparation": {"input_shape": list(prep.input_shape),
                        "spacing": None if prep.spacing is None else list(prep.spacing),
                        "transpose_forward": list(prep.transpose_forward),
                        "resampling_method": prep.resampling_method,
                        "tokens_per_case": len(ex.positions), "num_tokens": int(first.num_tokens),
                        "probe_grid": list(ex.grid), "probe_tokens_per_case": len(ex.probe_positions)},
        "splits": [{"train": [labeled.cases[i].case_id for i in tr], "test": [labeled.cases[i].case_id for i in te]}
                   for tr, te in splits],
        "encoders": results,
    }
    if probe.baselines and ex.token_labels is not None:
        out["baselines"] = probe_baselines(ex, splits, probe)
    return out


def probe_baselines(ex: Extracted, splits: list[tuple[np.ndarray, np.ndarray]], probe: ProbeConfig) -> dict[str, Any]:
    """The encoder-free features probed like the encoders' tokens, on the full training cases only
    (no learning curve: they are a reference line, not a subject)."""
    full = replace(probe, fractions=(1.0,))
    out: dict[str, Any] = {"token_probe": {}}
    for name, parts in ex.token_baselines.items():
        result = token_probe(np.stack(parts), ex.token_labels, splits, full)
        result.pop("learning_curve")
        out["token_probe"][name] = {**result, "num_features": int(parts[0].shape[-1])}
    if ex.context_cases is not None:
        out["context_probe"] = {}
        for name, parts in ex.context_baselines.items():
            result = context_probe(np.concatenate(parts), ex.context_labels, ex.context_cases, splits, full)
            result.pop("learning_curve")
            out["context_probe"][name] = result
    return out


def _data_summary(labeled: LabeledSet, class_labels: np.ndarray | None, ex: Extracted) -> dict[str, Any]:
    tok = ex.token_labels
    out: dict[str, Any] = {"folder": str(labeled.folder), "num_cases": len(labeled.cases),
                           "has_class_labels": class_labels is not None, "has_label_maps": tok is not None}
    if class_labels is not None:
        values, counts = np.unique(class_labels, return_counts=True)
        out["class_counts"] = {_name(labeled.class_names, int(v)): int(c) for v, c in zip(values, counts)}
    if tok is not None:
        values = np.unique(tok)
        out["token_labels"] = {int(v): labeled.label_names.get(int(v), str(int(v))) for v in values}
    if ex.context_labels is not None:
        out["context_labels"] = {int(v): labeled.label_names.get(int(v), str(int(v))) for v in labeled.context_labels}
        out["context_tokens"] = {int(v): int((ex.context_labels == v).sum()) for v in labeled.context_labels}
    return out


def _name(names: list[str], index: int) -> str:
    return names[index] if index < len(names) else str(index)


def evaluate_checkpoint(checkpoint: str | Path, labeled_folder: str | Path, out_folder: str | Path | None = None,
                        probe: ProbeConfig | None = None, random_seed: int = 0, device: str = "cpu",
                        batch_size: int = 4, plot: bool = True, protocol: str | None = None) -> dict[str, Any]:
    """Evaluate the encoder of `checkpoint` against `random_encoder_like` it on the labeled set
    in `labeled_folder`; writes `evaluation.json` (and `evaluation.png` unless `plot=False`) to
    `out_folder` when given, and returns the JSON content (fields: documentation/evaluation.md)."""
    from nnssl.evaluation.report import write_report
    from nnssl.export.features import load_pretrained_encoder, random_encoder_like

    probe = probe or ProbeConfig()
    labeled = load_labeled_set(labeled_folder)  # cheap checks first: a bad folder fails fast
    if protocol is not None and not labeled.context_labels:
        raise InvalidInput(f"{labeled.folder}: -protocol {protocol} probes the context labels, and this labeled set "
                           "lists none; write the protocol's set with nnssl_generate_phantoms --protocol_set search")
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
    if protocol is not None:
        from nnssl.evaluation.protocol import PROTOCOL, identify_labeled_set

        result["protocol"] = {"name": PROTOCOL, "labeled_set": identify_labeled_set(labeled.folder)}
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
    for probe in ("token_probe", "context_probe"):
        if probe in pre:
            out[f"{probe}_balanced_accuracy"] = pre[probe]["balanced_accuracy"] - ref[probe]["balanced_accuracy"]
    return out
