"""I-JEPA vs MAE on the same data and the same wall-time budget; prints one JSON object.

Both methods train through the real `nnssl_train` code path (`nnssl.training.run.train`) on one
preprocessed phantom collection, each for the same wall-clock budget per run: the step count of a
run is its budget divided by its own calibrated step time (3 timed steps after a warm-up step), so
a cheaper method gets more steps, as it would on a fixed GPU allocation. The schedules (warm-up +
cosine lr, EMA) then run over that many steps. After training, each exported encoder is probed on
a separate labeled phantom set (linear probe on pooled features, `nnssl.evaluation`) against the
same architecture at random init.

Reported per run: steps, samples/s, FLOPs per sample (FlopCounterMode on one forward + backward,
CPU attention added by formula), the loss curve (every logged step), the last collapse monitors,
and the probe accuracies (pretrained, random, difference). A markdown table is written next to the
JSON (--out).

    python benchmarks/method_comparison.py [--budget-seconds 120] [--backbones Tiny PrimusS ResEncTiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _nidl_step import count_step_flops  # noqa: E402

PATCH = {"Tiny": 32, "PrimusS": 32, "ResEncTiny": 64}
BATCH = 4


def _prepare(folder: Path, num_volumes: int, eval_volumes: int, shape: int) -> Path:
    """Phantoms -> dataset -> preprocessed (Dataset900_Phantoms); a labeled set beside it."""
    from nnssl.data.builders import create_dataset
    from nnssl.data.phantom_files import write_phantom_collection
    from nnssl.data.phantoms import PhantomConfig
    from nnssl.preprocessing.runner import plan_and_preprocess

    for name in ("nnssl_raw", "nnssl_preprocessed", "nnssl_results"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder / name)
    bids = folder / "nnssl_raw" / "Dataset900_Phantoms" / "bids"
    write_phantom_collection(bids, PhantomConfig(num_volumes=num_volumes, shape=(shape,) * 3, seed=0), num_processes=2)
    create_dataset(bids, 900, "Phantoms", layout="bids", overwrite=True)
    plan_and_preprocess(["900"], configurations=("onemmiso",), num_processes=2, num_processes_fingerprint=2)
    labeled = folder / "labeled"
    write_phantom_collection(labeled, PhantomConfig(num_volumes=eval_volumes, shape=(shape,) * 3, seed=1),
                             num_processes=2)
    return labeled


def _flops_per_sample(trainer: str) -> int:
    """FLOPs of one forward + backward per sample (FlopCounterMode, CPU attention by formula)."""
    from nnssl.methods.factory import build_method
    from nnssl.training.names import resolve_config

    config = resolve_config(trainer)
    method = build_method(config)
    x = torch.randn(BATCH, 1, *config.patch_size)
    anon = torch.zeros_like(x, dtype=torch.bool)
    return count_step_flops(lambda: method.training_output(x, anon, 0).loss.backward()) // BATCH


def _run(method: str, backbone: str, budget: float, labeled: Path, out: Path) -> dict:
    from nnssl.evaluation.evaluate import evaluate_checkpoint
    from nnssl.training.options import RunOptions
    from nnssl.training.run import train

    patch = PATCH[backbone]
    probe_name = f"{method}_{backbone}_P{patch}_BS{BATCH}"
    from nnssl.training.budget import seconds_per_step
    from nnssl.training.names import resolve_config

    step_s = seconds_per_step(resolve_config(probe_name + "_1ep_1it"))
    flops_per_sample = _flops_per_sample(probe_name + "_1ep_1it")
    steps = max(10, int(budget / step_s))
    trainer = f"{probe_name}_1ep_{steps}it"
    start = time.perf_counter()
    outcome = train(RunOptions(device="cpu", num_workers=1, progress_bar=False, log_every=max(1, steps // 40)),
                    resolve_config(trainer))
    wall = time.perf_counter() - start
    ckpt = torch.load(outcome.checkpoint, weights_only=True)
    history = ckpt["history"]
    evaluation = evaluate_checkpoint(outcome.checkpoint, labeled, out / trainer, plot=True)
    enc = evaluation["encoders"]
    probe = {name: enc[name]["volume_probe"]["accuracy"] for name in ("pretrained", "random")
             if "volume_probe" in enc[name]}
    last = {k: history[k][-1][1] for k in ("train_loss", "val_loss", "token_rankme", "pooled_rankme",
                                           "target_std", "cos_across", "samples_per_s") if k in history}
    logged = sorted(v for _, v in history.get("samples_per_s", [])[1:])  # the first interval holds the warm-up
    return {"trainer": trainer, "method": method, "backbone": backbone, "patch": patch, "batch": BATCH,
            "steps": steps, "calibrated_step_s": step_s, "train_wall_s": wall,
            "samples_per_s": logged[len(logged) // 2] if logged else BATCH * steps / wall,
            "samples_per_s_wall": BATCH * steps / wall, "flops_per_sample": flops_per_sample,
            "loss_curve": history.get("train_loss", []), "val_loss_curve": history.get("val_loss", []),
            "last": last, "probe_accuracy": probe,
            "probe_gain": probe.get("pretrained", float("nan")) - probe.get("random", float("nan"))}


def _markdown(runs: list[dict]) -> str:
    lines = ["| trainer | steps | samples/s | GFLOP/sample | first → last loss | token RankMe | cos_across | "
             "probe pretrained | probe random | gain |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        curve = r["loss_curve"]
        loss = f"{curve[0][1]:.3f} → {curve[-1][1]:.3f}" if curve else "-"
        p = r["probe_accuracy"]
        lines.append(f"| {r['trainer']} | {r['steps']} | {r['samples_per_s']:.2f} | "
                     f"{r['flops_per_sample'] / 1e9:.2f} | "
                     f"{loss} | {r['last'].get('token_rankme', float('nan')):.1f} | "
                     f"{r['last'].get('cos_across', float('nan')):.3f} | {p.get('pretrained', float('nan')):.3f} | "
                     f"{p.get('random', float('nan')):.3f} | {r['probe_gain']:+.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=120.0, help="training wall time per run")
    parser.add_argument("--backbones", nargs="+", default=["Tiny", "PrimusS"], choices=sorted(PATCH))
    parser.add_argument("--methods", nargs="+", default=["IJEPATrainer", "MAETrainer"])
    parser.add_argument("--volumes", type=int, default=32, help="pretraining phantoms")
    parser.add_argument("--eval-volumes", type=int, default=48, help="labeled phantoms for the probe")
    parser.add_argument("--shape", type=int, default=48, help="phantom field of view in mm (1 mm voxels)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("method_comparison_report"),
                        help="folder for the markdown table and the probe reports")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from nnssl.log import setup_logging

    setup_logging(False)
    with tempfile.TemporaryDirectory(prefix="nnssl_compare_") as tmp:
        folder = Path(tmp)
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        labeled = _prepare(folder, args.volumes, args.eval_volumes, args.shape)
        runs = [_run(m, b, args.budget_seconds, labeled, out) for b in args.backbones for m in args.methods]
        table = _markdown(runs)
        (out / "method_comparison.md").write_text(table + "\n", encoding="utf-8")
        result = {"budget": f"same wall time per run: {args.budget_seconds:.0f} s of training (step count from a "
                            "calibrated step time), CPU, fp32", "threads": args.threads, "batch": BATCH,
                  "data": {"pretraining_phantoms": args.volumes, "labeled_phantoms": args.eval_volumes,
                           "shape_mm": args.shape}, "runs": runs, "table_markdown": table}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
