"""`nnssl_plan_and_preprocess` and its split steps: fingerprint, plan, preprocess.

Flags follow nnU-Net and the reference nnssl, so their users' commands run unchanged: `--clean`
re-extracts the fingerprint (which is otherwise reused), `-pl ExperimentPlanner` names our one
planner, `-np 8 4` gives one worker count per configuration, `-overwrite_plans_name` writes
plans under another name. Their flags that have no meaning here are errors that name the
equivalent. Deleting preprocessed data has its own flag, `--delete_preprocessed_data`.

Exit status: 0 every case preprocessed, 1 some cases failed (listed, and in
`preprocessing_report__<config>.json`), 2 usage or input error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from nnssl.cli.common import add_one_of, add_verbose, make_parser, per_configuration, positive_int, reject_flag, run_cli

CONFIGS = ("onemmiso", "median", "noresample")
DEFAULT_PLANS = "nnsslPlans"

# what nnU-Net's planner flags do here instead
_GEOMETRY = ("the plans give the reference's patch 160³ and batch 8 (a smaller patch for small volumes) and the "
             "trainer name changes them per run: on a smaller GPU keep the global batch with gradient accumulation "
             "(-tr IJEPATrainer_BS8_GA4), or use _P128 / _BS4 (documentation/training.md)")
_SPACING = ("the spacing is chosen with -c: onemmiso (1 mm), median (the dataset's median) or noresample; for "
            "another spacing copy nnsslPlans.json to a new plans file, edit a configuration's spacing and "
            "data_identifier, and use it with -p (documentation/preprocessing.md)")


def _datasets(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", nargs="+", required=True, dest="datasets", help="dataset ids or names")


def _configurations(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", nargs="+", default=["onemmiso"], choices=CONFIGS, dest="configurations",
                   help="configurations to preprocess")


def _workers(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("-np", type=positive_int, nargs="+", default=[default], dest="num_processes",
                   help="preprocessing workers: one number, or one per configuration of -c (-c onemmiso median "
                        "-np 8 4); resampling needs memory, lower it if RAM fills up")


def _delete(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delete_preprocessed_data", action="store_true", dest="delete_data",
                   help="before preprocessing, DELETE the -c configurations' preprocessed data of these plans: "
                        "$nnssl_preprocessed/DatasetXXX_Name/<data_identifier>/ (arrays, per-case properties), "
                        "pretrain_data__<config>.json and preprocessing_report*__<config>.json; keeps the "
                        "fingerprint, every plans file and splits_final.json. Not needed after a plan change: "
                        "cases of an outdated plan are redone anyway")


def _planner(p: argparse.ArgumentParser) -> None:
    from nnssl.planning.planner import PLANNER_NAMES

    add_one_of(p, "-pl", PLANNER_NAMES, "experiment planner",
               otherwise=f"nnU-Net's other planners choose the architecture and the patch and batch size; here the "
                         f"trainer name chooses the architecture (_ResEncL, _PrimusM), and {_GEOMETRY}")
    p.add_argument("-overwrite_plans_name", default=DEFAULT_PLANS, dest="plans_name",
                   help="write the plans as <name>.json, their data to <name>_<config>/, so the default plans "
                        "and their arrays stay; then use -p <name> with nnssl_preprocess and nnssl_train")
    add_one_of(p, "-preprocessor_name", ("DefaultPreprocessor",), "preprocessor",
               otherwise=f"choose the CT normalisation with -ct_norm; {_SPACING}")
    reject_flag(p, "-gpu_memory_target", f"nnssl's planner has no GPU memory model; {_GEOMETRY}")
    reject_flag(p, "-overwrite_target_spacing", _SPACING)


def _ct_normalization(p: argparse.ArgumentParser) -> None:
    from nnssl.planning.planner import CT_NORMALIZATIONS

    p.add_argument("-ct_norm", default="ZScoreNormalization", choices=CT_NORMALIZATIONS, dest="ct_normalization",
                   help="how CT is normalised: per-image z-score (default; what nnU-Net's recommended fine-tuning, "
                        "nnUNetv2_preprocess_like_nnssl, applies) or nnU-Net's CTNormalization (clip to the "
                        "dataset's 0.5/99.5 percentiles, dataset z-score)")


def _fingerprint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clean", action="store_true",
                   help="extract the fingerprint again even if dataset_fingerprint.json exists (as in nnU-Net; "
                        "deletes nothing else)")
    add_one_of(p, "-fpe", ("DatasetFingerprintExtractor",), "fingerprint extractor",
               otherwise="it reads the headers and a sample of voxels of every modality; there is nothing to choose")


def _report(outcomes) -> int:
    for o in outcomes:
        print(o)
        for f in o.failures:
            print(f"  FAILED {f['image_id']}: {f['reason']}")
    return 0 if all(o.ok for o in outcomes) else 1


def plan_and_preprocess_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("nnssl_plan_and_preprocess", "Fingerprint, plan and preprocess datasets into blosc2.")
    _datasets(p)
    _configurations(p)
    _workers(p, 4)
    p.add_argument("-npfp", type=positive_int, default=4, dest="num_processes_fingerprint",
                   help="fingerprint workers")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="run the header-only integrity check first and stop on problems")
    p.add_argument("--no_pp", action="store_true", help="only fingerprint and plan")
    _fingerprint_flags(p)
    _delete(p)
    _planner(p)
    _ct_normalization(p)
    add_verbose(p)

    def body(a: argparse.Namespace) -> int:
        from nnssl.preprocessing.runner import plan_and_preprocess

        workers = per_configuration(a.num_processes, a.configurations, "-np")
        return _report(plan_and_preprocess(
            a.datasets, tuple(a.configurations), workers, a.num_processes_fingerprint,
            verify=a.verify_dataset_integrity, no_pp=a.no_pp, clean=a.clean, ct_normalization=a.ct_normalization,
            plans_name=a.plans_name, delete_data=a.delete_data))

    return run_cli(p, body, argv)


def extract_fingerprint_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("nnssl_extract_fingerprint", "Header geometry and sampled intensity statistics "
                                                 "(dataset_fingerprint.json; reused unless --clean).")
    _datasets(p)
    p.add_argument("-np", type=positive_int, default=4, dest="num_processes", help="worker processes")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="run the header-only integrity check first and stop on problems")
    _fingerprint_flags(p)
    add_verbose(p)

    def body(a: argparse.Namespace) -> int:
        from nnssl.errors import NnsslError
        from nnssl.preprocessing.runner import extract_and_save_fingerprint

        for d in a.datasets:
            if a.verify_dataset_integrity:
                from nnssl.data.integrity import verify_dataset

                report = verify_dataset(d, num_processes=a.num_processes)
                if not report.ok:
                    raise NnsslError(f"{d} failed the integrity check:\n{report.format_table()}")
            path, extracted = extract_and_save_fingerprint(d, a.num_processes, clean=a.clean)
            print(f"wrote {path}" if extracted else f"{path} exists and matches the dataset: reused (--clean "
                                                     "extracts it again)")
        return 0

    return run_cli(p, body, argv)


def plan_experiment_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("nnssl_plan_experiment", "Write nnsslPlans.json from the dataset fingerprint.")
    _datasets(p)
    _planner(p)
    _ct_normalization(p)
    add_verbose(p)

    def body(a: argparse.Namespace) -> int:
        from nnssl.preprocessing.runner import plan_and_save

        for d in a.datasets:
            print(f"wrote {plan_and_save(d, a.ct_normalization, a.plans_name)}")
        return 0

    return run_cli(p, body, argv)


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("nnssl_preprocess", "Preprocess planned datasets (resumable, shardable).")
    _datasets(p)
    _configurations(p)
    _workers(p, 4)
    p.add_argument("-part", type=int, default=0, help="this machine's shard (0-based)")
    p.add_argument("-total_parts", type=positive_int, default=1, help="number of shards")
    p.add_argument("-p", "-plans_name", dest="plans", default=DEFAULT_PLANS,
                   help="plans identifier: preprocess with $nnssl_preprocessed/DatasetXXX_Name/<plans>.json")
    _delete(p)
    add_verbose(p)

    def body(a: argparse.Namespace) -> int:
        from nnssl.preprocessing.runner import preprocess

        workers = per_configuration(a.num_processes, a.configurations, "-np")
        outcomes = []
        for d in a.datasets:
            outcomes += preprocess(d, tuple(a.configurations), workers, a.part, a.total_parts, a.plans,
                                   delete_data=a.delete_data)
        return _report(outcomes)

    return run_cli(p, body, argv)
