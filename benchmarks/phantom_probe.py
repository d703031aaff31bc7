"""Does a pretraining recipe help? The dense-v1 protocol and a volume probe, over training seeds.

A recipe is a trainer name (any registered method and backbone, e.g. `IJEPATrainer_Tiny_P32_BS8`),
`--set` overrides and a step count. For every training seed it pretrains in memory with the
trainer's own step (`nnssl.api.Pretrainer`) on a phantom corpus (MR, 1 mm isotropic, fixed
orientation, 48 mm field of view, four key-organ shapes; `--corpus paired` adds the paired twin
organs of the dense task), then probes the exported encoder (I-JEPA: the EMA teacher) on a
protocol labeled set (`nnssl.evaluation.protocol`; documentation/evaluation.md):

- **dense**: balanced accuracy over the two twin labels that only context tells apart, read out
  from every depth on 8³ cells (the protocol's headline);
- **volume**: accuracy of the key-organ shape from every depth mean-pooled, on the same cases and
  splits.

Each against the same architecture at random init (the protocol's ten seeds), so a margin is
pretrained minus the random mean; the verdict is the protocol's: at least five training seeds
and the worst one at +5 points. `--set_name search` is where recipe choices are made; `test`
only confirms a recipe fixed before looking at it. Prints ONE JSON object. Training seeds run
in `--jobs` processes of `--threads` threads each.

    python benchmarks/phantom_probe.py --trainer IJEPATrainer_Tiny_P32_BS8_lr0.001 --steps 4500 \\
        --set ijepa.sigreg_weight=0.05 --set_name search --sets_folder /tmp/protocol_sets
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SIDE = 48  # the protocol sets' field of view (voxels at 1 mm)
_DATA: dict[str, Any] = {}  # set before the pool forks; read by the workers


def corpus(num: int, seed: int, paired_organs: bool, key_organ_scale: float) -> np.ndarray:
    """[n, 1, 48³] z-scored MR phantoms: the pretraining volumes (their seed never a protocol set's)."""
    from nnssl.data.phantoms import PhantomConfig, make_phantom
    from nnssl.preprocessing import steps

    config = PhantomConfig(num_volumes=num, shape=(SIDE,) * 3, modality="MR", anisotropic=False,
                           random_orientation=False, num_classes=4, key_organ_scale=key_organ_scale, seed=seed,
                           paired_organs=paired_organs)
    return np.stack([steps.zscore_normalize(make_phantom(i, config).image[None])[0] for i in range(num)]
                    ).astype(np.float32)


def train_one(seed: int) -> tuple[int, dict[str, Any], float]:
    """Pretrain one seed of the recipe and probe its encoder (in a worker process)."""
    import torch

    from nnssl.api import Pretrainer
    from nnssl.evaluation.protocol import dense_probe

    torch.set_num_threads(_DATA["threads"])
    config = _DATA["config"]
    start = time.perf_counter()
    pre = Pretrainer(config, config.patch_size, config.batch_size, seed=seed)
    encoder = pre.fit(_DATA["corpus"], _DATA["steps"])
    seconds = time.perf_counter() - start
    print(f"seed {seed}: {_DATA['steps']} steps in {seconds:.0f} s", file=sys.stderr, flush=True)
    if _DATA["export_dir"]:  # the nnU-Net-ready folder of this seed (e.g. for benchmarks/finetune_nnunet.py)
        pre.export(Path(_DATA["export_dir"]) / f"seed_{seed}")
    return seed, dense_probe(encoder, _DATA["labeled"]), seconds


def _scores(trained: list[tuple[int, dict[str, Any], float]], key: str) -> dict[int, float]:
    return {s: float(r[key]) for s, r, _ in trained}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", default="IJEPATrainer_Tiny_P32_BS8_lr0.001",
                   help="trainer name with its crop and batch (_P<N>_BS<N>), e.g. MAETrainer_Tiny_P32_BS8")
    p.add_argument("--set", nargs="*", default=[], metavar="PATH=VALUE",
                   help="training-config overrides, e.g. ijepa.sigreg_weight=0.05 optim.peak_lr=1e-3")
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    p.add_argument("--corpus", choices=("paired", "plain"), default="paired",
                   help="pretraining phantoms with (paired) or without the paired twin organs")
    p.add_argument("--corpus_volumes", type=int, default=256)
    p.add_argument("--corpus_seed", type=int, default=100)
    p.add_argument("--key_organ_scale", type=float, default=1.0, help="of the corpus (the protocol sets use 1)")
    p.add_argument("--set_name", choices=("search", "test"), default="search",
                   help="the protocol labeled set (test: only to confirm a recipe fixed on search)")
    p.add_argument("--sets_folder", default=None, help="where the protocol's labeled sets are (or are written)")
    p.add_argument("--labeled", default=None,
                   help="instead of a protocol set: this labeled folder (cases.json with context_labels; e.g. a "
                        "small one for a smoke run; no verdict is a protocol verdict then)")
    p.add_argument("--random_seeds", type=int, nargs="+", default=None, help="default: the protocol's ten")
    p.add_argument("--export_dir", default=None,
                   help="also write each seed's nnssl_export folder here (<dir>/seed_<k>): nnU-Net-ready checkpoints")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per training job")
    args = p.parse_args()

    from nnssl.evaluation.protocol import (
        RANDOM_SEEDS,
        identify_labeled_set,
        random_reference,
        verdict,
        write_protocol_set,
    )
    from nnssl.export.features import random_encoder_like
    from nnssl.methods.factory import build_method
    from nnssl.settings import parse_assignments
    from nnssl.training.names import resolve_config

    overrides = parse_assignments(args.set)
    config = resolve_config(args.trainer, overrides=overrides)
    if config.patch_size is None or config.batch_size is None:
        p.error(f"{args.trainer} needs a crop and a batch size in its name (_P<N>_BS<N>) or in --set")
    start = time.perf_counter()
    if args.labeled:
        labeled = args.labeled
    else:
        if args.sets_folder is None:
            p.error("--sets_folder is needed (where the protocol's labeled set is or is written), or --labeled")
        labeled = str(Path(args.sets_folder) / args.set_name)
        if identify_labeled_set(labeled) != args.set_name:
            write_protocol_set(args.set_name, labeled, num_processes=args.jobs)
    _DATA.update(config=config, steps=args.steps, threads=args.threads, labeled=labeled, export_dir=args.export_dir,
                 corpus=corpus(args.corpus_volumes, args.corpus_seed, args.corpus == "paired", args.key_organ_scale))
    print(f"corpus and labeled set in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        trained = pool.map(train_one, args.seeds, chunksize=1)

    import torch

    torch.set_num_threads(max(1, args.jobs * args.threads))
    spec = build_method(config).backbone
    seeds = tuple(args.random_seeds) if args.random_seeds else RANDOM_SEEDS
    reference = random_reference(random_encoder_like(spec, seed=0), labeled, seeds=seeds)
    dense = _scores(trained, "balanced_accuracy")
    result: dict[str, Any] = {
        "trainer": args.trainer, "overrides": overrides, "steps": args.steps, "seeds": args.seeds,
        "corpus": {"kind": args.corpus, "volumes": args.corpus_volumes, "seed": args.corpus_seed,
                   "key_organ_scale": args.key_organ_scale},
        "labeled_set": identify_labeled_set(labeled) or labeled,
        "train_seconds": {s: round(t, 1) for s, _, t in trained},
        "dense": {"pretrained": {s: round(v, 4) for s, v in dense.items()},
                  "random_init": [round(v, 4) for v in reference["balanced_accuracy"]],
                  "verdict": verdict(dense, reference["mean"])},
        "collapse": {s: {k: round(v, 4) for k, v in r["collapse"].items()} for s, r, _ in trained},
    }
    if "volume" in reference:
        volume = _scores(trained, "volume_accuracy")
        result["volume"] = {"pretrained": {s: round(v, 4) for s, v in volume.items()},
                            "random_init": [round(v, 4) for v in reference["volume"]["accuracy"]],
                            "chance": round(trained[0][1]["volume_chance_accuracy"], 4),
                            "verdict": verdict(volume, reference["volume"]["mean"])}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
