"""The mutable state of a run and its round trip through checkpoints.

`save_training_checkpoint` writes what `resume_state` needs for an exact continuation plus the
downstream handshake keys; `load_pretrained_weights` warm-starts a fresh run's encoder from an
exported checkpoint (`-pretrained_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nnssl.export.adaptation_plan import adaptation_plan, check_downstream_keys, citations
from nnssl.log import get_logger
from nnssl.settings import differences
from nnssl.training.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, require_resume_state,
                                       restore_rng_state, save_checkpoint)
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
    subjects = {c.subject_key for c in data.train_cases} | {c.subject_key for c in data.val_cases}
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


def _interpolate_positions(weight: torch.Tensor, target_shape: torch.Size, grid_from: tuple[int, ...],
                           grid_to: tuple[int, ...]) -> torch.Tensor:
    """[1, N, E] learned positions on `grid_from` -> `grid_to`, trilinear in Primus token order
    (what nnU-Net does when the downstream patch size differs)."""
    e = weight.shape[-1]
    volume = weight.reshape(1, *grid_from, e).permute(0, 4, 1, 2, 3)
    resized = F.interpolate(volume, size=grid_to, mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(target_shape)


def load_pretrained_weights(method: Any, path: Path) -> int:
    """Load an exported checkpoint's `network_weights` into the student (and teacher) encoder.

    The weights are keyed as the downstream network names them (`eva.*`, `encoder.stages.*`);
    they are matched to the method's own parameter names by suffix. A learned position
    embedding of another grid is interpolated trilinearly. Returns the number of tensors loaded.
    """
    data = load_checkpoint(path)
    weights = data.get("network_weights")
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{path} has no network_weights; pass a checkpoint written by nnssl_train or "
                              "nnssl_export")
    own = method.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    missing = []
    for key, value in weights.items():
        targets = [k for k in own if k == key or k.endswith("." + key)]
        if not targets:
            missing.append(key)
            continue
        for target in targets:  # student and teacher copies
            if own[target].shape != value.shape and key.endswith("pos_embed") and value.ndim == 3:
                value = _resize_lpe(value, own[target].shape, path)
            if own[target].shape != value.shape:
                raise CheckpointError(f"{path}: {key} has shape {list(value.shape)}, this network's "
                                      f"{target} has {list(own[target].shape)}; use the same backbone")
            mapped[target] = value
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} encoder tensors have no counterpart in this trainer's "
                              f"network (e.g. {missing[:3]}); the checkpoint is for another backbone")
    method.load_state_dict({**own, **mapped})
    logger.info("loaded %d pretrained encoder tensors from %s", len(weights), path)
    return len(weights)


def _resize_lpe(value: torch.Tensor, shape: torch.Size, path: Path) -> torch.Tensor:
    n_from, n_to = value.shape[1], shape[1]
    side_from, side_to = round(n_from ** (1 / 3)), round(n_to ** (1 / 3))
    if side_from ** 3 != n_from or side_to ** 3 != n_to:
        raise CheckpointError(f"{path}: cannot interpolate a position embedding of {n_from} tokens to {n_to} "
                              "(only cubic grids); train at the pretraining patch size")
    return _interpolate_positions(value, shape, (side_from,) * 3, (side_to,) * 3)
