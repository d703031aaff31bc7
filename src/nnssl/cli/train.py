"""`nnssl_train`: pretrain an encoder on a preprocessed dataset.

    nnssl_train [DATASET] [CONFIG] -tr IJEPATrainer_BS8 -p nnsslPlans -num_gpus N [--c]

Exit status: 0 finished (or already finished), 3 stopped early with a checkpoint (SIGTERM /
SIGUSR1, e.g. cluster preemption; resume with --c), 2 usage or input error, 1 training diverged
(the last good state is in checkpoint_latest.pth).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from nnssl.cli.common import add_verbose, device, make_parser, reject_flag, run_cli

EXIT_STOPPED = 3


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("nnssl_train", "Pretrain an encoder (I-JEPA, MAE) on a preprocessed dataset.")
    p.add_argument("dataset", nargs="?", default=None,
                   help="dataset id or name (DatasetXXX_Name); optional when exactly one dataset is preprocessed")
    p.add_argument("configuration", nargs="?", default="onemmiso", help="preprocessing configuration")
    p.add_argument("-tr", dest="trainer", default="IJEPATrainer",
                   help="trainer name: method plus suffixes, e.g. IJEPATrainer_BS8 (see --list_trainers)")
    p.add_argument("-p", dest="plans", default="nnsslPlans", help="plans identifier")
    p.add_argument("-num_gpus", type=int, default=1,
                   help="processes (GPUs) on this node, DistributedDataParallel; under torchrun the launcher decides")
    p.add_argument("--c", action="store_true", dest="continue_training",
                   help="continue from checkpoint_latest.pth of this run (exact resume)")
    p.add_argument("-pretrained_weights", type=Path, default=None,
                   help="warm-start the encoder from an nnssl checkpoint (network_weights)")
    p.add_argument("-device", type=device, default=None,
                   help="cuda, cuda:N (one process), cpu or mps (default: cuda when available, else cpu)")
    p.add_argument("-np", type=int, default=None, dest="num_workers",
                   help="data loader worker processes per GPU (default: one per CPU core, at most 12)")
    p.add_argument("--disable_checkpointing", action="store_true",
                   help="no periodic checkpoint_latest.pth (trial runs; an interrupted run cannot resume): only "
                        "checkpoint_final.pth and the checkpoint a stop signal saves are written")
    reject_flag(p, "--npz", "nnssl pretraining makes no segmentation predictions, so there is nothing to save as "
                "npz; --npz belongs to nnUNetv2_train when you fine-tune the export "
                "(documentation/finetuning_nnunet.md)")
    for flag in ("--val", "--val_best"):
        reject_flag(p, flag, "pretraining has no segmentation validation to re-run (its validation loss is in the "
                    "training log); judge a finished checkpoint with nnssl_evaluate CHECKPOINT --labeled FOLDER "
                    "(documentation/evaluation.md)")
    p.add_argument("--checkpoint_minutes", type=float, default=30.0,
                   help="write checkpoint_latest.pth at least this often (also after every epoch)")
    p.add_argument("--log_every", type=int, default=None,
                   help="steps between logged metrics and collapse monitors (default: min(50, iterations/epoch))")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 autocast on GPUs that support it, fp16 with loss scaling on older GPUs "
                        "(V100, T4), fp32 on the CPU")
    p.add_argument("--stop_at_step", type=int, default=None,
                   help="stop with a checkpoint before this optimizer step (time-boxed jobs; resume with --c)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the method's forward (off by default: not yet measured on a GPU; the first "
                        "steps compile, see documentation/training.md)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="PATH=VALUE",
                   help="override any setting, e.g. --set ijepa.ema_start=0.99 mask.num_targets=3 "
                        "optim.peak_lr=1e-3 patch_size=[96,96,96] (values are JSON; see --print_config)")
    p.add_argument("--config", dest="config_file", type=Path, default=None,
                   help="a JSON file of settings (nested by section or dotted keys), applied before --set")
    p.add_argument("--print_config", action="store_true",
                   help="print the resolved configuration (trainer name + --config + --set, geometry from the plans "
                        "when the dataset is preprocessed) as JSON, then exit")
    p.add_argument("--list_trainers", action="store_true",
                   help="print the trainer-name grammar and examples, then exit")
    add_verbose(p)
    return p


def print_config(config, options) -> None:  # type: ignore[no-untyped-def]
    """The resolved configuration as JSON; patch and batch size from the plans when they can be read."""
    import json

    from nnssl.errors import NnsslError
    from nnssl.training.setup import load_plans, resolve_run_config

    note = None
    try:
        config = resolve_run_config(config, load_plans(options), options.configuration)[0]
    except NnsslError as e:
        note = f"patch_size / batch_size: from the plans at training time ({str(e).splitlines()[0]})"
    print(json.dumps(config.to_dict(), indent=2))
    if note and (config.patch_size is None or config.batch_size is None):
        print(note)


def main(argv: Sequence[str] | None = None) -> int:
    def body(a: argparse.Namespace) -> int:
        from nnssl.training.names import example_trainer_names, grammar_help, read_config_file, resolve_config

        if a.list_trainers:
            print(grammar_help())
            print("\nValid names include:\n  " + "\n  ".join(example_trainer_names()))
            return 0
        from nnssl.settings import parse_assignments
        from nnssl.training.loop import TrainingDiverged
        from nnssl.training.options import RunOptions
        from nnssl.training.run import train

        # the name and every override are resolved and validated here, before any data is read
        config = resolve_config(a.trainer, read_config_file(a.config_file) if a.config_file else None,
                                parse_assignments(a.overrides))
        options = RunOptions(
            dataset=a.dataset, configuration=a.configuration, plans=a.plans,
            num_gpus=a.num_gpus, device=a.device, continue_training=a.continue_training,
            pretrained_weights=a.pretrained_weights, num_workers=a.num_workers,
            checkpoint_every_minutes=a.checkpoint_minutes, periodic_checkpoints=not a.disable_checkpointing,
            log_every=a.log_every, precision=a.precision,
            stop_at_step=a.stop_at_step, compile=a.compile)
        if a.print_config:
            print_config(config, options)
            return 0
        try:
            outcome = train(options, config)
        except TrainingDiverged as e:
            print(f"nnssl_train: {e}")
            return 1
        if outcome is None:  # spawned ranks report through their log
            return 0
        if outcome.finished:
            print(f"training finished at step {outcome.step}: {outcome.checkpoint}")
            return 0
        print(f"stopped at step {outcome.step} ({outcome.stopped_by}): {outcome.checkpoint}; resume with --c")
        return EXIT_STOPPED

    return run_cli(build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
