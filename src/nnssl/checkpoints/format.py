"""The checkpoint format, shared by training (resume) and export (sharing): one file, one reader.

A checkpoint is one `torch.save`d dict of plain Python types and CPU tensors, so it loads with
`torch.load(path, weights_only=True)` on a machine without a GPU (documentation/finetuning_nnunet.md):

- resume state: `method_state` (student, teacher, predictor / decoder), `optimizer_state`,
  `grad_scaler_state`, `step` (the next optimizer step; masks and batches are pure functions of
  it, so it is also the mask sampler's and the loader's counter), `rng` (python, numpy, torch,
  CUDA), `history` (the logger's curves), `collapse_tracker`, `training_config`;
- the handshake: `network_weights` (the exported encoder: I-JEPA's EMA teacher) and
  `nnssl_adaptation_plan`, `trainer_name`, `citations`; and `nnssl_backbone` (our complete
  architecture description, used by `nnssl_export` and the feature API).

Writes are atomic (temporary name in the same folder, then rename), so a kill mid-write leaves
the previous checkpoint intact. The dataset description is never embedded.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnssl.errors import InvalidInput
from nnssl.io_utils import atomic_path

CHECKPOINT_FORMAT = "nnssl-checkpoint-1"
# what nnU-Net's fine-tuning reads (`network_weights`, `nnssl_adaptation_plan`, `citations`) and
# what describes the run; an exported (slim) checkpoint holds exactly these
HANDSHAKE_KEYS = ("network_weights", "nnssl_adaptation_plan", "nnssl_backbone", "trainer_name", "citations",
                  "training_config", "step", "epoch", "data_summary", "final_metrics")
# what an exact resume needs besides them
RESUME_KEYS = ("method_state", "optimizer_state", "step", "training_config")


class CheckpointError(InvalidInput):
    """A checkpoint that cannot be read, is not an nnssl checkpoint, or does not fit the run."""


def capture_rng_state() -> dict[str, Any]:
    """Plain-type snapshots of every RNG (numpy's state as a list so weights_only accepts it)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((int(version), tuple(int(k) for k in keys), gauss))
    name, keys_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys_np.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(value: Any) -> Any:
    """Recursively move tensors to the CPU (nnU-Net loads checkpoints without map_location)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically write `payload` (made CPU-only) to `path`."""
    path = Path(path)
    data = to_cpu({"format": CHECKPOINT_FORMAT, **payload})
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with `weights_only=True` onto the CPU; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle of a foreign class, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. If the file is "
                              "truncated, delete it and resume from checkpoint_latest.pth (--c)") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not an nnssl checkpoint (a {type(data).__name__}, not a dict)")
    return data


def require_resume_state(data: dict[str, Any], path: Path) -> None:
    missing = [k for k in RESUME_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path} cannot resume training: it lacks {missing} (an exported, slim "
                              "checkpoint?). Use it with -pretrained_weights instead of --c")
