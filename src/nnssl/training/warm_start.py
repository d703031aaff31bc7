"""Warm start (`nnssl_train -pretrained_weights`): a fresh run's encoder from an exported or a
reference nnssl checkpoint, selected the way nnU-Net's fine-tuning selects it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nnssl.checkpoints.format import CheckpointError, load_checkpoint
from nnssl.log import get_logger

logger = get_logger(__name__)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def select_encoder_weights(data: dict[str, Any], path: Path, default_keys: tuple[str, str]
                           ) -> tuple[dict[str, torch.Tensor], list[str], tuple[str, str]]:
    """(encoder + stem tensors, names of the ignored rest, the two prefixes used) of a
    checkpoint's `network_weights`,
    selected by its adaptation plan's `key_to_encoder` / `key_to_stem` (`default_keys` for a
    checkpoint without a plan). A reference nnssl checkpoint also holds its decoder
    (`up_projection.*`, `decoder.*`) and `mask_token` there; nnU-Net ignores those, so do we."""
    weights = data.get("network_weights")
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{path} has no network_weights; pass a checkpoint written by nnssl_train or "
                              "nnssl_export, or a reference nnssl checkpoint")
    plan = data.get("nnssl_adaptation_plan") or {}
    prefixes = (plan.get("key_to_encoder") or default_keys[0], plan.get("key_to_stem") or default_keys[1])
    selected = {k: v for k, v in weights.items() if any(_under(k, p) for p in prefixes)}
    if not selected:
        raise CheckpointError(f"{path}: no network_weights under the encoder / stem keys {list(prefixes)} (it "
                              f"holds e.g. {sorted(weights)[:3]}); the checkpoint is for another backbone")
    return selected, sorted(set(weights) - set(selected)), prefixes


def _summary(keys: list[str], limit: int = 6) -> str:
    """'up_projection (4), mask_token (1)': ignored keys grouped by their first component."""
    groups: dict[str, int] = {}
    for k in keys:
        groups[k.split(".", 1)[0]] = groups.get(k.split(".", 1)[0], 0) + 1
    shown = [f"{g} ({n})" for g, n in list(groups.items())[:limit]]
    return ", ".join(shown) + (f", ... ({len(groups) - limit} more groups)" if len(groups) > limit else "")


def load_pretrained_weights(method: Any, path: Path) -> int:
    """Warm-start the student (and teacher) encoder from a checkpoint's `network_weights`.

    Accepts our checkpoints and exports and the reference nnssl's, whose `network_weights` is the
    whole pretraining network: like nnU-Net's loader, only the tensors under the adaptation
    plan's `key_to_encoder` / `key_to_stem` are used, and the rest (decoder, `mask_token`) is
    reported in the log. They are keyed as the downstream network names them (`eva.*`,
    `encoder.stages.*`) and matched to the method's own parameter names by suffix; the encoder
    must be complete (a missing tensor means another backbone). A learned position embedding of
    another grid is interpolated trilinearly. Returns the number of tensors loaded.
    """
    data = load_checkpoint(path)
    backbone = method.backbone
    weights, ignored, prefixes = select_encoder_weights(data, path, (backbone.key_to_encoder, backbone.key_to_stem))
    expected = set(method.export_encoder_state_dict())  # this backbone's encoder, downstream names
    absent = sorted(expected - set(weights))
    if absent:
        raise CheckpointError(f"{path}: {len(absent)} encoder tensors of this trainer's backbone are not in the "
                              f"checkpoint (e.g. {absent[:3]}); it is for another backbone")
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
                value = _resize_lpe(value, own[target].shape, data, method, path)
            if own[target].shape != value.shape:
                raise CheckpointError(f"{path}: {key} has shape {list(value.shape)}, this network's "
                                      f"{target} has {list(own[target].shape)}; use the same backbone")
            mapped[target] = value
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} encoder tensors have no counterpart in this trainer's "
                              f"network (e.g. {missing[:3]}); the checkpoint is for another backbone")
    method.load_state_dict({**own, **mapped})
    logger.info("loaded %d pretrained encoder tensors from %s", len(weights), path)
    if ignored:
        logger.info("ignored %d tensors of %s outside the encoder and stem (%s, %s): %s", len(ignored), path,
                    *prefixes, _summary(ignored))
    return len(weights)


def _source_grid(data: dict[str, Any], value: torch.Tensor) -> tuple[int, ...] | None:
    """The token grid the checkpoint's position embedding was trained on: its plan's pretraining
    patch divided by the patch embedding (the stem convolution's kernel), when both are known."""
    plan = data.get("nnssl_adaptation_plan") or {}
    configs = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    patch = next(iter(configs.values()), {}).get("patch_size") if configs else None
    keys = [k + ".weight" for k in plan.get("keys_to_in_proj") or ()]
    kernel = next((tuple(data["network_weights"][k].shape[2:]) for k in keys if k in data["network_weights"]), None)
    if patch and kernel and len(patch) == len(kernel) == 3:
        grid = tuple(int(p) // int(k) for p, k in zip(patch, kernel))
        if math.prod(grid) == value.shape[1]:
            return grid
    return None


def _resize_lpe(value: torch.Tensor, shape: torch.Size, data: dict[str, Any], method: Any, path: Path) -> torch.Tensor:
    """A learned position embedding of another token grid, resized trilinearly to this network's
    grid (as nnU-Net does downstream); grids from the checkpoint's plan and the method's encoder,
    cubic grids inferred from the token counts otherwise."""
    from nnssl.models.primus import interpolate_position_embedding

    grid_to = tuple(getattr(getattr(method, "student", None), "grid", ()) or ())
    grid_from = _source_grid(data, value)
    if grid_from is None or math.prod(grid_to or (0,)) != shape[1]:
        n_from, n_to = value.shape[1], shape[1]
        side_from, side_to = round(n_from ** (1 / 3)), round(n_to ** (1 / 3))
        if side_from ** 3 != n_from or side_to ** 3 != n_to:
            raise CheckpointError(f"{path}: cannot interpolate a position embedding of {n_from} tokens to {n_to} "
                                  "(its token grid is unknown); train at the pretraining patch size")
        grid_from, grid_to = (side_from,) * 3, (side_to,) * 3
    return interpolate_position_embedding(value, grid_from, grid_to).reshape(shape)
