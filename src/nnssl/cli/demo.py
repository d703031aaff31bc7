"""`nnssl_demo`: the whole pipeline on generated phantoms (no data, no GPU needed).

Phantoms -> pretrain_data.json -> integrity check -> fingerprint, plan, preprocess -> I-JEPA
pretraining on the CPU within a time budget (the recipe fixed on the dense protocol's search set)
-> export -> the dense context probe and the volume probe against random init on the protocol's
test set -> summary. Exit status 0 when every stage ran, 2 on an input error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from nnssl.cli.common import add_shape, add_verbose, make_parser, reject_flag, run_cli
from nnssl.cli.dataset import RENAMED_N


def build_parser() -> argparse.ArgumentParser:
    from nnssl.demo import DemoConfig

    d = DemoConfig()
    p = make_parser("nnssl_demo", __doc__.splitlines()[0])
    p.add_argument("-o", "--folder", type=Path, default=Path("nnssl_demo"),
                   help="folder for the demo's nnssl_raw / nnssl_preprocessed / nnssl_results and labeled phantoms")
    p.add_argument("--minutes", type=float, default=d.train_minutes,
                   help="training time budget in minutes (CPU); training stops earlier at --steps")
    p.add_argument("--steps", type=int, default=d.max_steps,
                   help="training steps when the budget allows that many (the probe margin was measured at "
                        f"{d.max_steps})")
    p.add_argument("--num_volumes", type=int, default=d.num_volumes, help="number of phantom volumes to pretrain on")
    reject_flag(p, "-n", RENAMED_N)
    p.add_argument("--eval_volumes", type=int, default=d.eval_volumes,
                   help="labeled phantoms for the probes (480: the dense protocol's test set)")
    p.add_argument("--random_seeds", type=int, default=d.random_seeds,
                   help="random-init encoders the pretrained one is compared with")
    p.add_argument("--set", nargs="*", default=list(d.overrides), metavar="PATH=VALUE", dest="overrides",
                   help="training-config overrides as in nnssl_train --set (default: the demo's recipe, "
                        f"{' '.join(d.overrides)}; --set with nothing after it trains without them)")
    add_shape(p, d.shape, "phantom field of view in mm (voxels at 1 mm)")
    p.add_argument("--patch", type=int, default=d.patch_size, help="pretraining patch size (cubic, multiple of 8)")
    p.add_argument("--batch", type=int, default=d.batch_size, help="pretraining batch size")
    p.add_argument("-d", "--dataset", default=None,
                   help="use your own dataset (id or DatasetXXX_Name under your $nnssl_raw, with $nnssl_preprocessed "
                        "and $nnssl_results set) instead of phantoms; evaluation then needs --labeled")
    p.add_argument("--labeled", type=Path, default=None, help="labeled folder (cases.json) for the evaluation")
    p.add_argument("-np", type=int, default=2, dest="num_processes", help="worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed for the phantoms")
    p.add_argument("--quick", action="store_true",
                   help="a shortened run (CI, smoke test): 12 volumes of 40³, 48 labeled, 2 random inits, 20 s of "
                        "training; too short and too small a probe to show a margin")
    add_verbose(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        from nnssl.demo import DemoConfig, run_demo

        settings = {"folder": args.folder, "num_volumes": args.num_volumes, "shape": tuple(args.shape),
                    "seed": args.seed, "num_processes": args.num_processes, "train_minutes": args.minutes,
                    "max_steps": args.steps, "patch_size": args.patch, "batch_size": args.batch,
                    "eval_volumes": args.eval_volumes, "dataset": args.dataset, "labeled": args.labeled,
                    "random_seeds": args.random_seeds, "overrides": tuple(args.overrides)}
        if args.quick:
            settings.update(num_volumes=12, shape=(40, 40, 40), train_minutes=1 / 3, eval_volumes=48, random_seeds=2)
        result = run_demo(DemoConfig(**settings))
        print(result.format())
        return 0

    return run_cli(build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
