"""`nnssl_plan_and_preprocess` and its split steps: fingerprint, plan, preprocess.

Exit status: 0 every case preprocessed, 1 some cases failed (listed, and in
`preprocessing_report__<config>.json`), 2 usage or input error.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from nnssl.cli.common import add_verbose, make_parser, run_cli

CONFIGS = ("onemmiso", "median", "noresample")


def _datasets(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", nargs="+", required=True, dest="datasets", help="dataset ids or names")


def _ct_normalization(p: argparse.ArgumentParser) -> None:
    from nnssl.planning.planner import CT_NORMALIZATIONS

    p.add_argument("-ct_norm", default="ZScoreNormalization", choices=CT_NORMALIZATIONS, dest="ct_normalization",
                   help="how CT is normalised: per-image z-score (default; what nnU-Net's recommended fine-tuning, "
                        "nnUNetv2_preprocess_like_nnssl, applies) or nnU-Net's CTNormalization (clip to the "
                        "dataset's 0.5/99.5 percentiles, dataset z-score)")


def _report(outcomes) -> int:
    for o in outcomes:
        print(o)
        for f in o.failures:
            print(f"  FAILED {f['image_id']}: {f['reason']}")
    return 0 if all(o.ok for o in outcomes) else 1


def plan_and_preprocess_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("nnssl_plan_and_preprocess", "Fingerprint, plan and preprocess datasets into blosc2.")
    _datasets(p)
    p.add_argument("-c", nargs="+", default=["onemmiso"], choices=CONFIGS, dest="configurations",
                   help="configurations to preprocess")
    p.add_argument("-np", type=int, default=4, dest="num_processes", help="preprocessing workers")
    p.add_argument("-npfp", type=int, default=4, dest="num_processes_fingerprint", help="fingerprint workers")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="run the header-only integrity check first and stop on problems")
    p.add_argument("--no_pp", action="store_true", help="only fingerprint and plan")
    p.add_argument("--clean", action="store_true", help="delete earlier preprocessed output and start over")
    _ct_normalization(p)
    add_verbose(p)

    def body(a: argparse.Namespace) -> int:
        from nnssl.preprocessing.runner import plan_and_preprocess

        return _report(plan_and_preprocess(a.datasets, tuple(a.configurations), a.num_processes,
                                           a.num_processes_fingerprint, a.verify_dataset_integrity,
                                           a.no_pp, a.clean, a.ct_normalization))

    return run_cli(p, body, argv)


def extract_fingerprint_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("nnssl_extract_fingerprint", "Header geometry and sampled intensity statistics.")
    _datasets(p)
    p.add_argument("-np", type=int, default=4, dest="num_processes", help="worker processes")
    add_verbose(p)

    def body(a: argparse.Namespace) -> int:
        from nnssl.preprocessing.runner import extract_and_save_fingerprint

        for d in a.datasets:
            print(f"wrote {extract_and_save_fingerprint(d, a.num_processes)}")
        return 0

    return run_cli(p, body, argv)


def plan_experiment_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("nnssl_plan_experiment", "Write nnsslPlans.json from the dataset fingerprint.")
    _datasets(p)
    _ct_normalization(p)
    add_verbose(p)

    def body(a: argparse.Namespace) -> int:
        from nnssl.preprocessing.runner import plan_and_save

        for d in a.datasets:
            print(f"wrote {plan_and_save(d, a.ct_normalization)}")
        return 0

    return run_cli(p, body, argv)


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("nnssl_preprocess", "Preprocess planned datasets (resumable, shardable).")
    _datasets(p)
    p.add_argument("-c", nargs="+", default=["onemmiso"], choices=CONFIGS, dest="configurations",
                   help="configurations to preprocess")
    p.add_argument("-np", type=int, default=4, dest="num_processes", help="worker processes")
    p.add_argument("-part", type=int, default=0, help="this machine's shard (0-based)")
    p.add_argument("-total_parts", type=int, default=1, help="number of shards")
    p.add_argument("-p", "-plans_name", dest="plans", default="nnsslPlans",
                   help="plans identifier: preprocess with $nnssl_preprocessed/DatasetXXX_Name/<plans>.json")
    add_verbose(p)

    def body(a: argparse.Namespace) -> int:
        from nnssl.preprocessing.runner import preprocess

        outcomes = []
        for d in a.datasets:
            outcomes += preprocess(d, tuple(a.configurations), a.num_processes, a.part, a.total_parts, a.plans)
        return _report(outcomes)

    return run_cli(p, body, argv)
