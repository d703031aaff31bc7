"""Pretraining from Python without the folder layout: fit on batches, get the encoder, export it.

For notebooks and experiments, in the style of nidl's `IJEPA(encoder).fit(loader)` and
scikit-learn: the same typed configuration as `nnssl_train` (a trainer name plus dotted
overrides, `documentation/training.md`), the trainer's own optimizer step, and the same
nnU-Net-ready export folder as `nnssl_export`::

    from nnssl.api import Pretrainer

    pre = Pretrainer("IJEPATrainer_Tiny", patch_size=(32, 32, 32), batch_size=8,
                     overrides={"optim.peak_lr": 1e-3})
    encoder = pre.fit(volumes, steps=200)     # volumes: [n, C, X, Y, Z] array, or an iterable of batches
    features = encoder.tokens(x)              # also .pooled(x), .layer_pooled(x), .layers(x)
    pre.export("my_encoder")                  # checkpoint_final.pth, adaptation_plan.json, config.json, README.md

Volumes must already be normalised the way fine-tuning will feed them (per-image z-score is what
nnU-Net's recommended workflow applies); `spacing` is only recorded in the export.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnssl.errors import InvalidInput, NnsslError
from nnssl.export.features import PretrainedEncoder, load_encoder_weights
from nnssl.methods.base import PretrainingMethod
from nnssl.planning.plans import ConfigurationPlan, Plans
from nnssl.settings import apply_overrides
from nnssl.training.config import TrainingConfig, with_geometry
from nnssl.training.in_memory import pretrain_on_batches, random_crops
from nnssl.training.names import resolve_config

CONFIGURATION = "onemmiso"


def in_memory_plans(patch_size: tuple[int, int, int], batch_size: int, spacing: tuple[float, float, float] | None,
                    name: str = "Dataset000_InMemory") -> Plans:
    """The plans an in-memory run is described by in its export: z-score normalisation (what
    nnU-Net's recommended fine-tuning applies), the given spacing (None: not resampled)."""
    config = ConfigurationPlan(
        data_identifier=f"nnsslPlans_{CONFIGURATION}", preprocessor_name="DefaultPreprocessor",
        spacing_style=CONFIGURATION if spacing is not None else "noresample",
        spacing=None if spacing is None else [float(s) for s in spacing],
        normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False],
        resampling_fn_data="resample_data_or_seg_to_shape", resampling_fn_data_kwargs={"is_seg": False},
        resampling_fn_mask="resample_data_or_seg_to_shape", resampling_fn_mask_kwargs={"is_seg": True},
        patch_size=[int(p) for p in patch_size], batch_size=int(batch_size))
    return Plans(dataset_name=name, plans_name="nnsslPlans", original_median_spacing_after_transp=list(spacing or
                 (1.0, 1.0, 1.0)), image_reader_writer="SimpleITKIO", transpose_forward=[0, 1, 2],
                 transpose_backward=[0, 1, 2], experiment_planner_used="nnssl.api",
                 configurations={CONFIGURATION: config})


class _Volumes:
    """The volumes of an iterable of batches (tensors, (tensor, label) pairs or dicts with "data"),
    re-iterable so a short DataLoader can be cycled."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            yield b["data"] if isinstance(b, Mapping) else (b[0] if isinstance(b, (list, tuple)) else b)


class Pretrainer:
    """One pretraining run in memory: `fit`, then `encoder` / `transform` / `export`."""

    def __init__(self, trainer: str | TrainingConfig = "IJEPATrainer_Tiny",
                 patch_size: tuple[int, int, int] = (32, 32, 32),
                 batch_size: int = 8, overrides: Mapping[str, Any] | None = None,
                 spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0), device: str = "cpu", seed: int = 0
                 ) -> None:
        settings = {**dict(overrides or {}), "seed": seed}
        config = resolve_config(trainer, overrides=settings) if isinstance(trainer, str) else \
            apply_overrides(trainer, settings)
        self.config, _ = with_geometry(config, list(patch_size), batch_size, "Pretrainer(patch_size=, batch_size=)")
        self.spacing = spacing
        self.device = torch.device(device)
        self.method: PretrainingMethod | None = None
        self.steps = 0

    def _batches(self, data: Any) -> Iterable[torch.Tensor]:
        if isinstance(data, np.ndarray):
            assert self.config.patch_size is not None and self.config.batch_size is not None
            return random_crops(data, self.config.patch_size, self.config.batch_size, self.config.seed)
        if isinstance(data, torch.Tensor):
            return self._batches(data.numpy())
        return _Volumes(data)

    def fit(self, data: np.ndarray | torch.Tensor | Iterable[Any], steps: int) -> PretrainedEncoder:
        """Pretrain a fresh method for `steps` optimizer steps and return its encoder.

        `data`: volumes [n, C, X, Y, Z] (array or tensor; random crops of `patch_size` with random
        mirroring are drawn), or any iterable of batches [B, C, *patch_size] (a torch DataLoader
        yielding tensors, (tensor, label) pairs or dicts with "data"; cycled if shorter)."""
        from nnssl.methods.factory import build_method

        method = build_method(self.config).to(self.device)
        self.method = pretrain_on_batches(self.config, self._batches(data), steps, method=method)
        self.steps = int(steps)
        return self.encoder

    @property
    def encoder(self) -> PretrainedEncoder:
        """The exported encoder (I-JEPA: the EMA teacher), rebuilt and loaded exactly as nnU-Net
        loads the exported checkpoint; frozen, eval mode."""
        method = self._fitted()
        spec = method.backbone
        network = spec.build()
        load_encoder_weights(network, method.export_encoder_state_dict(), spec.key_to_encoder, spec.key_to_stem,
                             "Pretrainer")
        return PretrainedEncoder(network, spec, pretrain_plan=self._plan()["pretrain_plan"], source="Pretrainer",
                                 device=self.device)

    def transform(self, volumes: torch.Tensor) -> np.ndarray:
        """Mean-pooled encoder features [B, E] of volumes [B, C, *patch_size] (scikit-learn style)."""
        return self.encoder.pooled(volumes).cpu().numpy()

    def _fitted(self) -> PretrainingMethod:
        if self.method is None:
            raise NnsslError("call Pretrainer.fit(data, steps) first")
        return self.method

    def _plan(self) -> dict[str, Any]:
        from nnssl.checkpoints.handshake import adaptation_plan

        assert self.config.patch_size is not None and self.config.batch_size is not None
        plans = in_memory_plans(self.config.patch_size, self.config.batch_size, self.spacing)
        return adaptation_plan(self._fitted().backbone, plans, CONFIGURATION, 1)

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint `nnssl_train` would write at the end, without resume state."""
        from nnssl.checkpoints.handshake import check_downstream_keys, citations

        method = self._fitted()
        weights = method.export_encoder_state_dict()
        check_downstream_keys(weights, method.backbone)
        return {"network_weights": weights, "nnssl_adaptation_plan": self._plan(),
                "nnssl_backbone": method.backbone.to_dict(), "trainer_name": self.config.trainer_name,
                "citations": citations(self.config.method, self.config.backbone),
                "training_config": self.config.to_dict(),
                "step": self.steps, "epoch": 1,
                "data_summary": {"dataset": "in-memory volumes (nnssl.api.Pretrainer)",
                                 "normalization_per_modality": {"any": {"scheme": "ZScoreNormalization"}}}}

    def export(self, folder: str | Path, safetensors: bool = False) -> Path:
        """The `nnssl_export` folder (nnU-Net-ready checkpoint, adaptation plan, config, model card)."""
        from nnssl.checkpoints.format import save_checkpoint
        from nnssl.export.share import export

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise InvalidInput(f"{folder} exists and is not a folder; choose another export folder")
        with tempfile.TemporaryDirectory() as tmp:
            source = save_checkpoint(Path(tmp) / "checkpoint_final.pth", self.checkpoint())
            export(source, folder, safetensors=safetensors)
        return folder
