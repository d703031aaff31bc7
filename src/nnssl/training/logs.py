"""Training curves: the in-memory history, `progress.png`, and optional TensorBoard / W&B.

The history is a dict of plain lists (step-indexed), stored in every checkpoint so a resumed run
continues its curves. Text goes through the one logging path (`nnssl.log`), which the trainer
also sends to `training_log_<timestamp>.txt`. TensorBoard is written when the `tensorboard`
package is installed; Weights & Biases when `NNSSL_WANDB_PROJECT` names a project (and `wandb`
is installed). Only rank 0 owns a `TrainingLog`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from nnssl.io_utils import atomic_path
from nnssl.log import get_logger

logger = get_logger(__name__)

# curves drawn in progress.png, by panel
_PANELS = (
    ("loss", ("train_loss", "val_loss")),
    ("learning rate", ("lr",)),
    ("throughput (samples/s)", ("samples_per_s",)),
    ("collapse: RankMe", ("token_rankme", "pooled_rankme")),
    ("collapse: std / cosine", ("target_std", "pred_std", "cos_across", "cos_within")),
)


class TrainingLog:
    """Records scalars per step; `history[name]` is a list of [step, value]."""

    def __init__(self, folder: Path, history: dict[str, list[list[float]]] | None = None,
                 run_name: str = "nnssl") -> None:
        self.folder = Path(folder)
        self.history: dict[str, list[list[float]]] = {k: [list(p) for p in v] for k, v in (history or {}).items()}
        self._tensorboard = self._open_tensorboard()
        self._wandb = self._open_wandb(run_name)

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: optional
            return None
        return SummaryWriter(log_dir=str(self.folder / "tensorboard"))

    def _open_wandb(self, run_name: str) -> Any:
        project = os.environ.get("NNSSL_WANDB_PROJECT")
        if not project:
            return None
        try:
            import wandb
        except ImportError:
            logger.warning("NNSSL_WANDB_PROJECT is set but wandb is not installed (pip install wandb); "
                           "logging to files only")
            return None
        return wandb.init(project=project, name=run_name, dir=str(self.folder), resume="allow")

    def record(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            value = float(value)
            self.history.setdefault(name, []).append([int(step), value])
            if self._tensorboard is not None and math.isfinite(value):
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in values.items()}, step=int(step))

    def state(self) -> dict[str, list[list[float]]]:
        return {k: [list(p) for p in v] for k, v in self.history.items()}

    def plot(self, path: Path | None = None) -> Path:
        """Write progress.png atomically (a reader never sees half a PNG)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path or self.folder / "progress.png")
        fig, axes = plt.subplots(len(_PANELS), 1, figsize=(10, 3 * len(_PANELS)), sharex=True)
        for ax, (title, names) in zip(axes, _PANELS):
            for name in names:
                points = self.history.get(name)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], label=name,
                            marker="o" if name == "val_loss" else None, markersize=3)
            ax.set_title(title)
            if ax.lines:
                ax.legend(loc="best", fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("optimizer step")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
