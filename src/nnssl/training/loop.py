"""The training loop: one readable step, with checkpointing, validation and logging around it.

A step (`training/step.py`, shared with the in-memory loop and the step-time calibration): set
the scheduled lr / wd → forward the method on this rank's share of the global batch (bf16
autocast on CUDA) → backward (DDP averages the gradients) → clip → skip the update if the loss or
the gradient is not finite on any rank → AdamW step → `method.after_optimizer_step` (I-JEPA's EMA
teacher). Everything the step depends on (batches, masks, schedules) is a pure
function of the step number, so a checkpoint with the step, weights, optimizer and RNG state
resumes exactly.

`--compile` (`training/compilation.py`): the method's forward runs through torch.compile; the
rest of the step (masks, optimizer, EMA) is unchanged.

Stops: the end of the schedule (`checkpoint_final.pth`), SIGTERM / SIGUSR1 (cluster preemption:
`checkpoint_latest.pth`, then `TrainOutcome.stopped_by`), `stop_at_step`, or too many non-finite
losses in a row (`TrainingDiverged`, after saving the last good state).
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from nnssl.dataloading.loader import PretrainLoader
from nnssl.errors import NnsslError
from nnssl.log import get_logger, progress_bars_enabled
from nnssl.methods.base import VALIDATION_STREAM, MethodOutput, PretrainingMethod
from nnssl.methods.monitors import CollapseTracker, collapse_alarms, collapse_metrics
from nnssl.methods.schedules import lr_at, momentum_at, wd_at
from nnssl.training import distributed
from nnssl.training.compilation import compile_method, compiled_graph_count
from nnssl.training.setup import RunContext, loader_config
from nnssl.training.step import StepResult, optimizer_step

if TYPE_CHECKING:
    from nnssl.training.logs import TrainingLog
    from nnssl.training.state import TrainState

logger = get_logger(__name__)


class TrainingDiverged(NnsslError):
    """The loss stayed non-finite for too many consecutive steps."""


@dataclass
class TrainOutcome:
    step: int  # the next step that would run
    finished: bool  # the whole schedule ran (checkpoint_final.pth written)
    stopped_by: str | None = None  # "SIGTERM", "SIGUSR1", "stop_at_step"
    checkpoint: str | None = None
    val_loss: float | None = None


class StepModule(torch.nn.Module):
    """Routes DDP's forward to `method.training_output` (DDP syncs gradients of what its own
    forward ran). Public so the GPU check's DDP step wraps exactly what the trainer wraps."""

    def __init__(self, method: PretrainingMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, volumes: torch.Tensor, anon: torch.Tensor, step: int, rank: int, world_size: int
                ) -> MethodOutput:
        return self.method.training_output(volumes, anon, step, rank=rank, world_size=world_size)


class _StopSignals:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@dataclass
class _Interval:
    """Sums over the steps since the last log line."""

    losses: list[float] = field(default_factory=list)
    step_time: float = 0.0
    wait_time: float = 0.0
    steps: int = 0

    def add(self, loss: float, step_time: float, wait_time: float) -> None:
        if math.isfinite(loss):
            self.losses.append(loss)
        self.step_time += step_time
        self.wait_time += wait_time
        self.steps += 1


def resolve_precision(precision: str, device: torch.device) -> str:
    """`--precision auto`: bf16 autocast on a GPU that supports it (Ampere and later), fp16 with
    loss scaling on older GPUs (V100, T4: bf16 is not supported or emulated there), fp32 on the
    CPU and MPS. An explicit choice is kept."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 BF16 or AMX); without it
    bf16 autocast on the CPU is emulated and far slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Trainer:
    def __init__(self, ctx: RunContext, state: TrainState) -> None:
        self.ctx, self.config, self.dist = ctx, ctx.config, ctx.dist
        self.method, self.optimizer = ctx.method, ctx.optimizer
        self.state: TrainState = state
        self.schedule = self.config.schedule_config()
        self.device = torch.device(self.dist.device)
        if ctx.options.compile:
            compile_method(self.method, ctx.options.compile_backend)
        self.model = self._wrap(self.method)
        self.tracker = CollapseTracker(self.config.total_steps, self.config.warmup_steps)
        self.precision = resolve_precision(ctx.options.precision, self.device)
        if self.precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning("--precision bf16 on a CPU without native bf16 (AVX-512 BF16 / AMX): oneDNN "
                           "emulates it, measured ~100x slower than fp32 on such a CPU (0.8 vs 88 GFLOP/s "
                           "for a 1024^3 matmul). Use --precision fp32 (the CPU default) here.")
        # fp16 needs loss scaling (its range is too small for small gradients); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        if self.scaler is not None and state.grad_scaler_state:
            self.scaler.load_state_dict(state.grad_scaler_state)
        if self.dist.is_main:
            logger.info("precision %s (--precision %s on %s)%s", self.precision, ctx.options.precision,
                        self.device.type, f"; {self.config.grad_accumulation} micro-batches per step"
                        if self.config.grad_accumulation > 1 else "")
            if ctx.options.compile:
                logger.info("torch.compile (%s) of the method's forward: the first steps compile (minutes on a "
                            "GPU); compiled_graphs in the log counts compiles and recompiles",
                            ctx.options.compile_backend)
        if state.tracker_state:
            self.tracker.load_state_dict(state.tracker_state)
        self.log_every = ctx.options.log_every or max(1, min(50, self.config.iterations_per_epoch))
        self._last_checkpoint_time = time.monotonic()

    def _wrap(self, method: PretrainingMethod) -> torch.nn.Module:
        step_module = StepModule(method)
        if not self.dist.distributed:
            return step_module
        ids = [self.device.index] if self.device.type == "cuda" else None
        # the teacher and the frozen decoder have no gradients; every trainable parameter is
        # used in every step, so no unused-parameter search is needed
        return DistributedDataParallel(step_module, device_ids=ids, broadcast_buffers=False)

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _no_sync(self) -> Any:
        """DDP: skip the gradient all-reduce of all but the last accumulated micro-batch."""
        return self.model.no_sync() if isinstance(self.model, DistributedDataParallel) else nullcontext()

    @property
    def log(self) -> TrainingLog:
        """The training log (rank 0 only: other ranks never record)."""
        if self.state.log is None:
            raise RuntimeError("the training log exists on rank 0 only")
        return self.state.log

    # ---- one step ------------------------------------------------------------------------------

    def train_step(self, batch: Any, step: int) -> StepResult:
        """One optimizer step on `batch` (training/step.py), agreed over ranks."""
        rank, world = self.dist.rank, self.dist.world_size
        result = optimizer_step(
            self.method, self.optimizer, batch.data.to(self.device, non_blocking=True),
            batch.anonymization_mask.to(self.device, non_blocking=True), step, self.schedule,
            self.config.optim.grad_clip, forward=self.model, autocast=self._autocast,
            agree=lambda flags: distributed.all_reduce_max_flags(flags, self.dist.device),
            stop_requested=self._stop_requested(), rank=rank, world_size=world,
            micro_batches=self.config.grad_accumulation, no_sync=self._no_sync, scaler=self.scaler)
        self._stop_flag = result.stop
        if result.applied:
            self._last_grad_norm = result.grad_norm
        return result

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainOutcome:
        from nnssl.training.state import save_training_checkpoint

        cfg, state = self.config, self.state
        end = cfg.total_steps if self.ctx.options.stop_at_step is None else min(cfg.total_steps,
                                                                                self.ctx.options.stop_at_step)
        self.method.train()
        loader = PretrainLoader(self.ctx.data.train_cases,
                                loader_config(cfg, self.ctx.options, self.ctx.local_batch_size, device=self.device),
                                rank=self.dist.rank, world_size=self.dist.world_size, start_step=state.step,
                                end_step=end)
        if self.dist.is_main:
            logger.info("augmentation %s (loader.augment_on_device %s)", f"on {self.device}" if loader.augment_on_device
                        else "in the loader workers", cfg.loader.augment_on_device)
        interval, nonfinite, self._stop_flag = _Interval(), 0, False
        bar = self._progress_bar(end)
        with _StopSignals() as signals, loader:
            self._signals = signals
            batches = iter(loader)
            while state.step < end:
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                # to the device; a RawBatch (loader.augment_on_device) is augmented there, in the step's time
                batch = batch.to(self.device, non_blocking=True)
                result = self.train_step(batch, state.step)
                loss, out = result.loss, result.output
                interval.add(loss, time.perf_counter() - t0, t1 - t0)
                nonfinite = 0 if result.applied or result.overflow else nonfinite + 1
                if result.overflow:
                    logger.info("step %d skipped: fp16 gradient overflow, loss scale lowered to %g", state.step,
                                self.scaler.get_scale() if self.scaler is not None else float("nan"))
                elif not result.applied:
                    logger.warning("step %d skipped: loss %s or gradient not finite (cases: %s)", state.step, loss,
                                   ", ".join(batch.image_ids))
                state.step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if nonfinite >= self.ctx.options.max_nonfinite_steps:
                    path = save_training_checkpoint(self, "checkpoint_latest.pth")
                    raise TrainingDiverged(
                        f"the loss was not finite for {nonfinite} consecutive steps (last cases: "
                        f"{', '.join(batch.image_ids)}); training stopped at step {state.step}. The last good "
                        f"state is in {path}. Lower the learning rate (optim.peak_lr {cfg.optim.peak_lr}) "
                        "or check those cases for extreme intensities, then resume with --c")
                if state.step % self.log_every == 0 or state.step == end:
                    self._log(state.step, interval, out)
                    interval = _Interval()
                epoch_done = state.step % cfg.iterations_per_epoch == 0
                if epoch_done:
                    state.val_loss = self.validate(state.step)
                if self._stop_flag:
                    stopped = signals.received or "a signal on another rank"
                    path = save_training_checkpoint(self, "checkpoint_latest.pth")
                    logger.info("%s received: saved %s at step %d; resume with --c", stopped, path, state.step)
                    return TrainOutcome(state.step, False, stopped, str(path), state.val_loss)
                if (self.ctx.options.periodic_checkpoints and (epoch_done or self._checkpoint_due())
                        and state.step < cfg.total_steps):
                    save_training_checkpoint(self, "checkpoint_latest.pth")
                    self._plot()
        if bar is not None:
            bar.close()
        if state.step >= cfg.total_steps:
            path = save_training_checkpoint(self, "checkpoint_final.pth")
            self._plot()
            return TrainOutcome(state.step, True, None, str(path), state.val_loss)
        path = save_training_checkpoint(self, "checkpoint_latest.pth")
        logger.info("stopped at step %d (stop_at_step); resume with --c", state.step)
        return TrainOutcome(state.step, False, "stop_at_step", str(path), state.val_loss)

    def _stop_requested(self) -> bool:
        signals = getattr(self, "_signals", None)
        return signals is not None and signals.received is not None

    def _checkpoint_due(self) -> bool:
        due = time.monotonic() - self._last_checkpoint_time >= 60.0 * self.ctx.options.checkpoint_every_minutes
        if due:
            self._last_checkpoint_time = time.monotonic()
        return due

    def _progress_bar(self, end: int) -> Any:
        """A bar on a terminal only (the one rule of `nnssl.log`); elsewhere the logged step lines
        are the progress."""
        show = self.ctx.options.progress_bar
        if show is None:
            show = progress_bars_enabled()
        if not (show and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=end, initial=self.state.step, unit="step", dynamic_ncols=True, desc=self.config.trainer_name)

    # ---- validation, logging -------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, step: int) -> float | None:
        """Mean loss over `num_val_iterations` fixed batches of held-out subjects, with fixed
        masks (validation stream), averaged over ranks."""
        cases = self.ctx.data.val_cases
        if not cases or self.config.num_val_iterations < 1:
            return None
        loader = PretrainLoader(cases, loader_config(self.config, self.ctx.options, self.ctx.local_batch_size,
                                                     validation=True),
                                rank=self.dist.rank, world_size=self.dist.world_size)
        self.method.eval()
        losses = []
        for i in range(self.config.num_val_iterations):
            batch = loader.batch_at(i).to(self.device, non_blocking=False)  # plain crops: a Batch
            with self._autocast():
                out = self.method.training_output(batch.data, batch.anonymization_mask, i, rank=self.dist.rank,
                                                  world_size=self.dist.world_size, stream=VALIDATION_STREAM)
            losses.append(float(out.loss))
        self.method.train()
        val = distributed.all_reduce_mean([sum(losses) / len(losses)], self.dist.device)[0]
        if self.dist.is_main:
            self.log.record(step, {"val_loss": val})
            logger.info("epoch %d/%d done: val_loss %.5f", step // self.config.iterations_per_epoch,
                        self.config.num_epochs, val)
        return val

    def _log(self, step: int, interval: _Interval, out: Any) -> None:
        if not self.dist.is_main:
            return
        cfg = self.config
        values: dict[str, float] = {
            "train_loss": sum(interval.losses) / len(interval.losses) if interval.losses else float("nan"),
            "lr": lr_at(step - 1, self.schedule), "weight_decay": wd_at(step - 1, self.schedule),
            "ema_momentum": momentum_at(step - 1, self.schedule),
            "samples_per_s": self.ctx.batch_size * interval.steps / max(interval.step_time, 1e-9),
            "data_wait_fraction": interval.wait_time / max(interval.step_time, 1e-9),
            "grad_norm": getattr(self, "_last_grad_norm", float("nan")),
        }
        if self.scaler is not None:
            values["loss_scale"] = float(self.scaler.get_scale())
        if self.ctx.options.compile:
            values["compiled_graphs"] = float(compiled_graph_count())
        if self.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        values.update(out.scalars)
        if out.monitor_tokens is not None:
            values.update(collapse_metrics(out.monitor_tokens.float(), out.predictions))
            # a network at random init looks "collapsed" (volumes alike): judge after warm-up
            report = logger.warning if step > cfg.warmup_steps else logger.debug
            for alarm in collapse_alarms(values, self.method.embed_dim):
                report("step %d: %s", step, alarm)
            for warning in self.tracker.update(step, values["train_loss"], values):
                logger.warning(warning)
        self.log.record(step, values)
        shown = ("train_loss", "lr", "samples_per_s", "data_wait_fraction", "token_rankme", "target_std", "cos_across")
        logger.info("step %d/%d (epoch %d/%d): %s", step, cfg.total_steps, (step - 1) // cfg.iterations_per_epoch + 1,
                    cfg.num_epochs,
                    ", ".join(f"{k} {values[k]:.4g}" for k in shown if k in values))

    def _plot(self) -> None:
        if self.dist.is_main:
            self.log.plot(self.ctx.output_folder / "progress.png")
