"""The dense-probe protocol: one fixed way to ask "do these features help segmentation?".

Fixed before any pretrained encoder was probed with it (documentation/evaluation.md, "The
dense-probe protocol"), so a recipe search cannot bend it:

- the task: paired-organ phantoms (`nnssl.data.paired_organs`), whose twin labels need context;
  the headline is the balanced accuracy of a linear probe over the two twin labels
  (`probe.context_probe`, chance 0.5);
- two labeled sets from fixed generator settings: `search` (recipe choices may look at it) and
  `test` (no recipe choice may ever be made on it; it only confirms);
- the probe settings `DENSE_PROBE`: multi-layer token read-out on 8³-voxel cells for every
  encoder family, 5 seeded half/half splits by case, standardised L2 logistic regression C = 0.1;
- the reference: the same architecture at random init, seeds `RANDOM_SEEDS`, averaged;
- the verdict (`verdict`): at least `MIN_TRAINING_SEEDS` training seeds, each seed's margin over
  the random-init mean; a win needs every seed (the worst one) at `REQUIRED_MARGIN` or more.

`dense_probe(encoder, labeled)` is the one function benchmarks, the demo and users call.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from nnssl.data.phantoms import PhantomConfig
from nnssl.errors import InvalidInput
from nnssl.evaluation.probe import ProbeConfig

PROTOCOL = "dense-v1"
NUM_CASES = 480
# the generator settings of both labeled sets; only the seed differs (never reuse these seeds
# for pretraining phantoms)
SET_SEEDS = {"search": 1600, "test": 1700}
DENSE_PROBE = ProbeConfig(test_fraction=0.5, num_splits=5, seed=0, C=0.1, fractions=(1.0,), token_label="centre",
                          pooling="layers", token_readout="layers", probe_cell=8, max_tokens_per_case=512)
RANDOM_SEEDS = tuple(range(10))  # random init varies more for a CNN (Tiny ResEnc: 13 points over 5 seeds)
MIN_TRAINING_SEEDS = 5
REQUIRED_MARGIN = 0.05  # balanced-accuracy points as a fraction, on every training seed


def protocol_set_config(which: str) -> PhantomConfig:
    """The generator settings of labeled set `which` ("search" or "test"): 480 MR phantoms, 1 mm
    isotropic, fixed orientation, a 48 mm field of view (the Tiny P32 encoders see its centre
    32³), four key-organ shapes at scale 1 (a larger key organ would cover the landmark)."""
    if which not in SET_SEEDS:
        raise InvalidInput(f"protocol labeled set {which!r} must be one of {', '.join(SET_SEEDS)}")
    return PhantomConfig(num_volumes=NUM_CASES, shape=(48, 48, 48), modality="MR", anisotropic=False,
                         random_orientation=False, num_classes=4, key_organ_scale=1.0, paired_organs=True,
                         seed=SET_SEEDS[which])


def write_protocol_set(which: str, folder: str | Path, num_processes: int = 1):
    """Write labeled set `which` to `folder` (`nnssl_generate_phantoms --protocol_set`)."""
    from nnssl.data.phantom_files import write_phantom_collection

    return write_phantom_collection(Path(folder), protocol_set_config(which), num_processes=num_processes)


def identify_labeled_set(folder: str | Path) -> str | None:
    """"search" or "test" when `folder` holds that protocol set (by the generator settings its
    dataset_description.json records), else None."""
    from nnssl.io_utils import read_json

    try:
        recorded = read_json(Path(folder) / "dataset_description.json")["nnssl_phantom_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for which in SET_SEEDS:
        expected = protocol_set_config(which).to_dict()
        if all(recorded.get(k) == v for k, v in expected.items() if k != "anatomy_masks"):
            return which
    return None


def dense_probe_many(encoders: dict[str, Any], labeled: Any, probe: ProbeConfig = DENSE_PROBE,
                     batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """`dense_probe` for several encoders of one input shape in one pass over the cases (each
    volume is prepared once): name -> result."""
    import torch

    from nnssl.evaluation.extract import check_context_splits, extract
    from nnssl.evaluation.labeled import LabeledSet, Preparation, load_labeled_set
    from nnssl.evaluation.probe import case_splits, collapse_statistics, context_probe, volume_probe

    if not isinstance(labeled, LabeledSet):
        labeled = load_labeled_set(labeled)
    if not labeled.context_labels:
        raise InvalidInput(f"{labeled.folder}: the labeled set has no context_labels, so the dense probe has nothing "
                           "to classify; write one with nnssl_generate_phantoms --protocol_set search (or test)")
    probe = replace(probe, baselines=False)
    ex = extract(encoders, labeled, Preparation.for_encoder(next(iter(encoders.values()))), probe, batch_size)
    splits = case_splits(len(labeled.cases), labeled.split_strata(), probe)
    check_context_splits(ex, splits, labeled)
    which = identify_labeled_set(labeled.folder)
    out = {}
    for name, feats in ex.features.items():
        arrays = feats.stacked()
        result = context_probe(arrays["context"], ex.context_labels, ex.context_cases, splits, probe)
        out[name] = {"protocol": PROTOCOL, "labeled_set": which or str(labeled.folder),
                     "balanced_accuracy": result["balanced_accuracy"],
                     "balanced_accuracy_std": result["balanced_accuracy_std"],
                     "balanced_accuracy_per_split": result["learning_curve"][-1]["balanced_accuracy_per_split"],
                     "chance_balanced_accuracy": result["chance_balanced_accuracy"],
                     "token_label_counts": result["token_label_counts"], "num_cases": len(labeled.cases),
                     "readout": probe.token_readout, "num_features": result["num_features"],
                     "collapse": collapse_statistics(torch.from_numpy(arrays["pooled"]),
                                                     torch.from_numpy(arrays["tokens"]), probe.max_rankme_tokens,
                                                     probe.seed)}
        if labeled.has_class_labels:  # the volume probe on the same cases and splits (read-out `probe.pooling`)
            volume = volume_probe(arrays["readout"], labeled.class_labels(), splits, probe)
            out[name]["volume_accuracy"] = volume["accuracy"]
            out[name]["volume_chance_accuracy"] = volume["chance_accuracy"]
    return out


def dense_probe(encoder: Any, labeled: Any, probe: ProbeConfig = DENSE_PROBE, batch_size: int = 8) -> dict[str, Any]:
    """The protocol's score of one frozen encoder (`nnssl.export.features.PretrainedEncoder`) on a
    labeled set (a folder or a `LabeledSet` with context labels): balanced accuracy over the
    context labels, mean over the fixed splits, with the per-split values and token counts."""
    return dense_probe_many({"encoder": encoder}, labeled, probe, batch_size)["encoder"]


def random_reference(encoder: Any, labeled: Any, seeds: tuple[int, ...] = RANDOM_SEEDS,
                     probe: ProbeConfig = DENSE_PROBE, batch_size: int = 8) -> dict[str, Any]:
    """The protocol's reference: `encoder`'s architecture at random init, one per seed, probed in
    one pass: the scores, their mean (what margins are measured against), std and spread."""
    from nnssl.export.features import random_encoder_like

    results = dense_probe_many({str(s): random_encoder_like(encoder, seed=s) for s in seeds}, labeled, probe,
                               batch_size)
    scores = [results[str(s)]["balanced_accuracy"] for s in seeds]
    out = {"seeds": list(seeds), "balanced_accuracy": scores, "mean": float(np.mean(scores)),
           "std": float(np.std(scores)), "spread": float(max(scores) - min(scores))}
    if "volume_accuracy" in results[str(seeds[0])]:
        volume = [results[str(s)]["volume_accuracy"] for s in seeds]
        out["volume"] = {"accuracy": volume, "mean": float(np.mean(volume)), "std": float(np.std(volume)),
                         "spread": float(max(volume) - min(volume))}
    return out


def verdict(pretrained: dict[int, float], reference: float, required_margin: float = REQUIRED_MARGIN,
            min_seeds: int = MIN_TRAINING_SEEDS) -> dict[str, Any]:
    """Pretraining "helps" on the dense probe when every training seed's score beats the random
    reference (`random_reference(...)["mean"]`) by `required_margin`: the worst seed decides, so
    one lucky seed cannot carry a recipe. Fewer than `min_seeds` seeds give no verdict (None)."""
    if not pretrained or any(not math.isfinite(v) for v in [*pretrained.values(), reference]):
        raise InvalidInput("verdict needs finite balanced accuracies of at least one training seed and of the "
                           "random reference")
    margins = {int(s): float(v - reference) for s, v in sorted(pretrained.items())}
    worst = min(margins.values())
    enough = len(margins) >= min_seeds
    return {"protocol": PROTOCOL, "random_mean": float(reference), "margins": margins,
            "mean_margin": float(np.mean(list(margins.values()))), "worst_margin": worst,
            "seeds_at_or_above": sum(m >= required_margin for m in margins.values()), "num_seeds": len(margins),
            "required_margin": required_margin,
            "helps": (worst >= required_margin) if enough else None}
