"""`train(options)`: the library function behind `nnssl_train`.

One process, `-num_gpus N` on one node (N spawned processes), or one rank of a `torchrun`
launch. Rank 0 writes the output folder:

    $nnssl_results/DatasetXXX_Name/<Trainer>__<plans>__<config>/
        plans.json, adaptation_plan.json
        fold_all/training_config.json, training_log_<timestamp>.txt, progress.png,
                 checkpoint_latest.pth, checkpoint_final.pth
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from nnssl.dataloading.loader import resolve_augment_on_device
from nnssl.errors import NnsslError
from nnssl.io_utils import write_json
from nnssl.log import add_log_file, get_logger, setup_logging
from nnssl.training import distributed
from nnssl.training.cluster import RunLock, slurm_environment
from nnssl.training.config import TrainingConfig
from nnssl.training.loop import Trainer, TrainOutcome
from nnssl.training.options import RunOptions
from nnssl.training.setup import RunContext, build_context
from nnssl.training.state import TrainState, resume_state
from nnssl.training.warm_start import load_pretrained_weights

logger = get_logger(__name__)


def train(options: RunOptions, config: TrainingConfig) -> TrainOutcome | None:
    """Run (or resume) a training of `config` (a trainer name resolved with its overrides,
    `training/names.py`); returns rank 0's outcome (None on other ranks / spawned runs)."""
    slurm = slurm_environment()
    if slurm is not None:  # plain `srun` with several tasks: one process group, as torchrun would make
        if options.num_gpus > 1:
            raise NnsslError(f"srun already started {slurm['WORLD_SIZE']} processes; pass -num_gpus 1 (each srun task "
                             "is one rank) or launch one task with -num_gpus N")
        os.environ.update(slurm)
    if distributed.launched_by_torchrun():
        return _train_rank(options, config)
    distributed.check_visible_gpus(options.num_gpus, options.device)
    if options.num_gpus > 1:
        # validate the configuration and the data once, in this process, before spawning N of them
        from nnssl.training.setup import check_batch_split, load_data, resolve_run_config

        data = load_data(options, config.seed, config.loader.max_iqs)
        check_batch_split(resolve_run_config(config, data, options.configuration)[0], options.num_gpus)
        distributed.spawn_local(_spawned_rank, options.num_gpus, (options, config))
        return None
    return _train_rank(options, config)


def _spawned_rank(options: RunOptions, config: TrainingConfig) -> None:
    setup_logging(False)
    _train_rank(options, config)


def _train_rank(options: RunOptions, config: TrainingConfig) -> TrainOutcome:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = distributed.resolve_device(options.device, local_rank, world_size)
    info = distributed.init_process_group(rank, local_rank, world_size, device)
    state = None
    lock = None
    try:
        ctx = build_context(options, config, info)
        if info.is_main:  # before anything is written: two runs must never share an output folder
            lock = RunLock(ctx.output_folder)
            lock.acquire()
        state = _initial_state(ctx)
        if state is None:  # already finished
            return TrainOutcome(ctx.config.total_steps, True, None, str(ctx.output_folder / "checkpoint_final.pth"))
        return Trainer(ctx, state).run()
    finally:
        if state is not None and state.log_file_handler is not None:
            logging.getLogger("nnssl").removeHandler(state.log_file_handler)
            state.log_file_handler.close()
        if state is not None and state.log is not None:
            state.log.close()
        if lock is not None:
            lock.release()
        distributed.destroy_process_group()


def _initial_state(ctx: RunContext) -> TrainState | None:
    """Fresh, warm-started or resumed state; writes the run's JSON files on rank 0."""
    from nnssl.checkpoints.handshake import adaptation_plan
    from nnssl.training.logs import TrainingLog

    out = ctx.output_folder
    history: dict = {}
    state = TrainState()
    latest, final = out / "checkpoint_latest.pth", out / "checkpoint_final.pth"
    if ctx.options.continue_training:
        if final.is_file() and not (latest.is_file() and latest.stat().st_mtime > final.stat().st_mtime):
            logger.info("%s exists: training already finished, nothing to continue", final)
            return None
        if latest.is_file():
            state, history = resume_state(ctx, latest)
            logger.info("resuming %s from step %d", latest, state.step)
        else:
            logger.warning("--c: no checkpoint in %s, starting from scratch", out)
    elif ctx.options.pretrained_weights is not None:
        load_pretrained_weights(ctx.method, Path(ctx.options.pretrained_weights))
    if ctx.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        state.log_file_handler = add_log_file(out / f"training_log_{time.strftime('%Y_%m_%d_%H_%M_%S')}.txt")
        for note in ctx.geometry_notes:
            logger.info(note)
        write_json(out / "training_config.json", {
            "trainer": ctx.config.to_dict(), "run": _options_dict(ctx.options), "world_size": ctx.dist.world_size,
            "device": ctx.dist.device,
            # loader.augment_on_device as resolved for this device (null in "trainer" means auto)
            "augment_on_device": resolve_augment_on_device(ctx.config.loader.augment_on_device, ctx.dist.device)})
        write_json(ctx.run_folder / "plans.json", ctx.data.plans.to_dict())
        write_json(ctx.run_folder / "adaptation_plan.json",
                   adaptation_plan(ctx.method.backbone, ctx.data.plans, ctx.options.configuration, 1))
        state.log = TrainingLog(out, history, run_name=f"{ctx.data.dataset}/{ctx.config.trainer_name}")
        logger.info("%s on %s: %d train / %d val cases, %d steps (%d epochs x %d), global batch %d on %d "
                    "process(es), device %s -> %s", ctx.config.trainer_name, ctx.data.dataset,
                    len(ctx.data.train_cases), len(ctx.data.val_cases), ctx.config.total_steps,
                    ctx.config.num_epochs, ctx.config.iterations_per_epoch, ctx.batch_size,
                    ctx.dist.world_size, ctx.dist.device, out)
    distributed.barrier()
    return state


def _options_dict(options: RunOptions) -> dict:
    d = dict(vars(options))
    d["pretrained_weights"] = None if options.pretrained_weights is None else str(options.pretrained_weights)
    return d
