"""Does CPU I-JEPA pretraining beat random init on the phantom probe? Margins over training seeds.

Pretrains the registry's Tiny I-JEPA (`IJEPATrainer_Tiny_P32`) in memory
(`nnssl.training.in_memory`) on MR phantoms (isotropic 1 mm, fixed orientation, four key-organ
shapes), once per training seed, and probes the exported (EMA teacher) encoder on a separate,
freshly seeded phantom set with `nnssl.evaluation.probe.volume_probe` (5 stratified half/half
splits, standardised features, C = 0.1) on the centre crop, for each read-out:

- `mean`: the final tokens' mean (nnssl_evaluate's default `-pooling mean`);
- `layers`: every depth mean-pooled and concatenated (`-pooling layers`).

The reference is the same architecture at random init, one per `--random_seeds`; the margin of
a training seed is its accuracy minus the mean random-init accuracy with the same read-out.
Prints one JSON object. Training seeds run in `--jobs` processes of one thread each.

`--dense search` (or `test`) also scores every teacher with the dense-probe protocol
(`nnssl.evaluation.protocol.dense_probe` on that protocol labeled set, written to
`--dense_folder` when missing), against `protocol.random_reference`, and adds the protocol's
verdict. `--paired_organs` pretrains on paired-organ phantoms (the dense task's anatomy).

    .venv/bin/python benchmarks/phantom_probe.py --seeds 0 1 2 3 4 --probe_volumes 480
    .venv/bin/python benchmarks/phantom_probe.py --seeds 0 1 2 3 4 --dense search --dense_folder /tmp/dense_sets
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time

import numpy as np

TRAINER = "IJEPATrainer_Tiny_P32"
PATCH = 32
_DATA: dict[str, np.ndarray] = {}  # set before the pool forks; read by the workers


def volumes(num: int, seed: int, side: int, key_organ_scale: float,
            paired_organs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[n, 1, side³] z-scored MR phantoms and their class labels."""
    from nnssl.data.phantoms import PhantomConfig, make_phantom
    from nnssl.evaluation.labeled import centre_crop_or_pad
    from nnssl.preprocessing import steps

    config = PhantomConfig(num_volumes=num, shape=(side,) * 3, modality="MR", anisotropic=False,
                           random_orientation=False, num_classes=4, key_organ_scale=key_organ_scale, seed=seed,
                           paired_organs=paired_organs)
    images, labels = [], []
    for i in range(num):
        phantom = make_phantom(i, config)
        image, _ = steps.zscore_normalize(phantom.image[None])
        images.append(centre_crop_or_pad(image, (side,) * 3))
        labels.append(phantom.class_label)
    return np.stack(images).astype(np.float32), np.array(labels)


def features(encoder, crops) -> dict[str, np.ndarray]:
    """Both read-outs from one pass: the last E columns of `layers` are the final tokens' mean."""
    import torch

    layers = torch.cat([encoder.layer_pooled(crops[i:i + 16]) for i in range(0, len(crops), 16)]).numpy()
    return {"mean": layers[:, -encoder.embed_dim:], "layers": layers}


def _probe_crops():
    import torch

    from nnssl.evaluation.labeled import centre_crop_or_pad

    return torch.from_numpy(np.stack([centre_crop_or_pad(v, (PATCH,) * 3) for v in _DATA["probe"]]))


def train_one(args: tuple[int, int, bool, dict, str | None]) -> tuple[int, dict[str, np.ndarray], float, dict | None]:
    from nnssl.export.features import PretrainedEncoder
    from nnssl.training.in_memory import pretrain_in_memory

    seed, steps, student, overrides, dense_folder = args
    start = time.perf_counter()
    method = pretrain_in_memory(_DATA["pretrain"], TRAINER, steps, batch_size=8, seed=seed, threads=1,
                                overrides=overrides)
    seconds = time.perf_counter() - start
    teacher = PretrainedEncoder(method.teacher.primus, method.backbone)
    print(f"seed {seed}: {steps} steps in {seconds:.0f} s", file=sys.stderr, flush=True)
    feats = features(teacher, _probe_crops())
    if student:  # the context encoder, which is not exported: for comparison only
        feats.update({f"student_{k}": v for k, v in
                      features(PretrainedEncoder(method.student.primus, method.backbone), _probe_crops()).items()})
    dense = None
    if dense_folder is not None:
        from nnssl.evaluation.protocol import dense_probe

        dense = dense_probe(teacher, dense_folder)
    return seed, feats, seconds, dense


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    p.add_argument("--random_seeds", type=int, nargs="+", default=[0, 1, 2], help="random-init references")
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--pretrain_volumes", type=int, default=256)
    p.add_argument("--pretrain_seed", type=int, default=100)
    p.add_argument("--probe_volumes", type=int, default=480)
    p.add_argument("--probe_seed", type=int, default=600, help="a seed no earlier search has looked at")
    p.add_argument("--side", type=int, default=48, help="phantom field of view (voxels at 1 mm)")
    p.add_argument("--key_organ_scale", type=float, default=1.5)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--student", action="store_true", help="also probe the (not exported) student encoder")
    p.add_argument("--paired_organs", action="store_true", help="pretrain on paired-organ phantoms")
    p.add_argument("--dense", choices=("search", "test"), default=None,
                   help="also score the teachers with the dense-probe protocol on this labeled set (test: only to "
                        "confirm a recipe fixed on search)")
    p.add_argument("--dense_folder", default=None, help="where the protocol's labeled sets are (or are written)")
    p.add_argument("--dense_labeled", default=None,
                   help="instead of --dense: score the teachers on this labeled folder (cases.json with "
                        "context_labels; not a protocol set, e.g. a small one for a smoke run)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="training-config overrides, e.g. optim.peak_lr=1e-3 ijepa.ema_start=0.998 (values parsed as JSON)")
    args = p.parse_args()

    import torch

    from nnssl.evaluation.probe import ProbeConfig, case_splits, volume_probe
    from nnssl.export.features import random_encoder_like
    from nnssl.settings import parse_assignments
    from nnssl.training.names import resolve_config

    overrides = parse_assignments(args.set)
    start = time.perf_counter()
    dense_folder = args.dense_labeled
    if args.dense and args.dense_labeled:
        p.error("--dense and --dense_labeled exclude each other")
    if args.dense:
        from pathlib import Path

        from nnssl.evaluation.protocol import identify_labeled_set, write_protocol_set

        if args.dense_folder is None:
            p.error("--dense needs --dense_folder (where the protocol's labeled set is or is written)")
        dense_folder = str(Path(args.dense_folder) / args.dense)
        if identify_labeled_set(dense_folder) != args.dense:
            write_protocol_set(args.dense, dense_folder, num_processes=args.jobs)
    _DATA["pretrain"], _ = volumes(args.pretrain_volumes, args.pretrain_seed, args.side, args.key_organ_scale,
                                   args.paired_organs)
    _DATA["probe"], labels = volumes(args.probe_volumes, args.probe_seed, args.side, args.key_organ_scale)
    print(f"phantoms in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        trained = pool.map(train_one, [(s, args.steps, args.student, overrides, dense_folder) for s in args.seeds],
                           chunksize=1)

    torch.set_num_threads(2)
    from nnssl.methods.factory import build_method

    spec = build_method(resolve_config(TRAINER)).backbone
    crops = _probe_crops()
    random = {s: features(random_encoder_like(spec, seed=s), crops) for s in args.random_seeds}
    config = ProbeConfig(fractions=(1.0,))
    splits = case_splits(len(labels), labels, config)

    def accuracy(feats: np.ndarray) -> float:
        return float(volume_probe(feats, labels, splits, config)["accuracy"])

    result = {"trainer": TRAINER, "steps": args.steps, "batch_size": 8, "pretrain_volumes": args.pretrain_volumes,
              "probe_volumes": args.probe_volumes, "probe_seed": args.probe_seed, "side": args.side,
              "key_organ_scale": args.key_organ_scale, "overrides": overrides, "classes": 4, "chance": 0.25,
              "paired_organs": args.paired_organs,
              "train_seconds": {s: round(t, 1) for s, _, t, _ in trained}, "readouts": {}}
    for readout in next(iter(trained))[1]:
        ref = [accuracy(random[s][readout.removeprefix("student_")]) for s in args.random_seeds]
        pre = {s: accuracy(f[readout]) for s, f, _, _ in trained}
        margins = {s: a - float(np.mean(ref)) for s, a in pre.items()}
        result["readouts"][readout] = {
            "random_init": [round(a, 4) for a in ref], "random_mean": round(float(np.mean(ref)), 4),
            "pretrained": {s: round(a, 4) for s, a in pre.items()},
            "margin": {s: round(m, 4) for s, m in margins.items()},
            "margin_mean": round(float(np.mean(list(margins.values()))), 4),
            "margin_min": round(min(margins.values()), 4),
            "seeds_at_or_above_5_points": sum(m >= 0.05 for m in margins.values()),
        }
    if dense_folder is not None:
        from nnssl.evaluation.protocol import random_reference, verdict
        from nnssl.export.features import random_encoder_like

        reference = random_reference(random_encoder_like(spec, seed=0), dense_folder)
        scores = {s: d["balanced_accuracy"] for s, _, _, d in trained}
        result["dense"] = {"labeled_set": args.dense or dense_folder, "random_init": reference,
                           "pretrained": {s: round(v, 4) for s, v in scores.items()},
                           "verdict": verdict(scores, reference["mean"])}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
