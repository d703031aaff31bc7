"""The mutable state of a run and its round trip through checkpoints.

`save_training_checkpoint` writes what `resume_state` needs for an exact continuation plus the
downstream handshake keys. The warm start from another checkpoint (`-pretrained_weights`) is
`training/warm_start.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnssl.checkpoints.format import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    require_resume_state,
    restore_rng_state,
    save_checkpoint,
)
from nnssl.checkpoints.handshake import adaptation_plan, check_downstream_keys, citations
from nnssl.log import get_logger
from nnssl.settings import differences
from nnssl.training.logs import TrainingLog  # noqa: F401  (TrainState.log)

logger = get_logger(__name__)


@dataclass
class TrainState:
    step: int = 0
    log: TrainingLog | None = None
    val_loss: float | None = None
    tracker_state: dict[str, Any] = field(default_factory=dict)
    grad_scaler_state: dict[str, Any] = field(default_factory=dict)
    log_file_handler: Any = None  # the training_log_<timestamp>.txt handler (removed at the end)


def checkpoint_payload(trainer: Any, slim: bool = False) -> dict[str, Any]:
    """Everything `save_training_checkpoint` writes (`slim`: the handshake keys only)."""
    ctx, method = trainer.ctx, trainer.method
    weights = method.export_encoder_state_dict()
    check_downstream_keys(weights, method.backbone)
    payload: dict[str, Any] = {
        "network_weights": weights,
        "nnssl_adaptation_plan": adaptation_plan(method.backbone, ctx.data.plans, ctx.options.configuration, 1),
        "nnssl_backbone": method.backbone.to_dict(),
        "trainer_name": ctx.config.trainer_name,
        "citations": citations(ctx.config.method, ctx.config.backbone),
        "training_config": ctx.config.to_dict(),
        "step": int(trainer.state.step),
        "epoch": int(trainer.state.step // ctx.config.iterations_per_epoch),
        "data_summary": data_summary(ctx),
        "final_metrics": final_metrics(trainer),
    }
    if slim:
        return payload
    payload.update({
        "method_state": method.state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        # fp16's loss scale (empty for bf16 / fp32, which need no scaling)
        "grad_scaler_state": trainer.scaler.state_dict() if trainer.scaler is not None else {},
        "rng": capture_rng_state(),
        "history": trainer.state.log.state() if trainer.state.log is not None else {},
        "collapse_tracker": trainer.tracker.state_dict(),
        "val_loss": trainer.state.val_loss,
        "world_size": int(ctx.dist.world_size),
    })
    return payload


def data_summary(ctx: Any) -> dict[str, Any]:
    """A few numbers about the pretraining data for the model card (never the case list)."""
    data = ctx.data
    subjects = {*data.train_cases.unique_subjects(), *data.val_cases.unique_subjects()}
    plan = data.plans.configuration(ctx.options.configuration)
    return {"dataset": data.dataset, "configuration": ctx.options.configuration,
            "num_train_images": len(data.train_cases), "num_val_images": len(data.val_cases),
            "num_subjects": len(subjects), "spacing": plan.spacing,
            "modalities": sorted(data.plans.normalization_per_modality),
            "normalization_per_modality": data.plans.normalization_per_modality}


def final_metrics(trainer: Any) -> dict[str, float]:
    """The last logged value of every curve (loss, lr, collapse monitors) for the model card."""
    log = trainer.state.log
    if log is None:
        return {}
    return {name: float(points[-1][1]) for name, points in log.history.items() if points}


def save_training_checkpoint(trainer: Any, name: str) -> Path:
    """Rank 0 writes `fold_all/<name>` atomically; other ranks only return the path."""
    path = trainer.ctx.output_folder / name
    if trainer.dist.is_main:
        save_checkpoint(path, checkpoint_payload(trainer))
        logger.info("saved %s (step %d)", path, trainer.state.step)
    return path


def resume_state(trainer_ctx: Any, path: Path) -> tuple[TrainState, dict[str, list[list[float]]]]:
    """Load `path` into the context's method and optimizer and restore the RNGs; returns the
    state to continue from and the logged history."""
    data = load_checkpoint(path)
    require_resume_state(data, path)
    if data.get("trainer_name") != trainer_ctx.config.trainer_name:
        raise CheckpointError(f"{path} was written by trainer {data.get('trainer_name')!r}, this run is "
                              f"{trainer_ctx.config.trainer_name!r}; resume with the same -tr")
    changed = differences(data["training_config"], trainer_ctx.config.to_dict())
    if changed:
        listed = "\n".join(f"  - {key}: checkpoint {old!r}, this run {new!r}" for key, old, new in changed)
        raise CheckpointError(f"{path} was trained with other settings; an exact resume needs the same "
                              f"configuration (the same -tr, --config and --set):\n{listed}")
    trainer_ctx.method.load_state_dict(data["method_state"])
    trainer_ctx.optimizer.load_state_dict(data["optimizer_state"])
    restore_rng_state(data["rng"])
    state = TrainState(step=int(data["step"]), val_loss=data.get("val_loss"),
                       tracker_state=data.get("collapse_tracker") or {},
                       grad_scaler_state=data.get("grad_scaler_state") or {})
    return state, data.get("history") or {}
