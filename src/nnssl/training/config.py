"""The resolved training configuration: every hyperparameter a run uses, in typed sections.

`TrainingConfig` composes sections that are each declared once, next to the code that uses
them: `model` (models/registry.py), `mask` (methods/masks.py), `ijepa` (methods/ijepa.py),
`mae` (methods/mae.py), `augment` (dataloading/augment.py), `loader` (dataloading/loader.py)
and `optim` (here: the optimizer and its schedules). It is resolved once from a trainer name
plus overrides (`training/names.py`), travels between layers as this object, and is written as
JSON to `training_config.json` and into every checkpoint, so a run can be understood and
reproduced from its folder alone.

Geometry comes from the plans, as in nnU-Net: `patch_size` and `batch_size` are None until
`with_geometry` fills them from the plan's configuration; a trainer name (`_P<N>`, `_BS<N>`) or
an override sets them explicitly and then wins over the plan (training logs that). Defaults
follow the reference nnssl (1000 epochs x 250 iterations) and the released I-JEPA (peak lr
3e-4, cosine weight decay 0.04 -> 0.4, EMA 0.996 -> 1.0, gradient clipping at norm 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from nnssl.dataloading.augment import AugmentConfig
from nnssl.dataloading.loader import LoaderSettings
from nnssl.errors import InvalidInput
from nnssl.methods.ijepa import IJEPAConfig
from nnssl.methods.mae import MAEConfig
from nnssl.methods.masks import MaskConfig
from nnssl.methods.registry import UnknownMethod, get_method
from nnssl.methods.schedules import ScheduleConfig
from nnssl.models.registry import BackboneEntry, ModelSettings, UnknownBackbone, get_backbone
from nnssl.settings import from_dict, to_plain

DERIVED_KEYS = ("total_steps", "warmup_steps")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedules (section `optim`): linear warm-up then cosine lr, cosine weight
    decay from start to final, global gradient-norm clipping (`grad_clip` 0: no clipping)."""

    peak_lr: float = 3e-4
    start_lr: float = 1e-5
    final_lr: float = 1e-6
    warmup_fraction: float = 0.05
    start_weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not self.peak_lr > 0:
            problems.append(f"peak_lr must be positive, got {self.peak_lr}")
        for name in ("start_lr", "final_lr", "start_weight_decay", "final_weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if problems:
            raise InvalidInput("invalid optimizer settings:", problems)


@dataclass(frozen=True)
class TrainingConfig:
    trainer_name: str = "IJEPATrainer"
    method: str = "IJEPATrainer"  # a registered method (methods/registry.py)
    backbone: str = "PrimusM"  # a registered backbone (models/registry.py)
    patch_size: tuple[int, int, int] | None = None  # the crop in voxels; None: the plan's
    batch_size: int | None = None  # global (split over GPUs); None: the plan's
    grad_accumulation: int = 1  # micro-batches per optimizer step and GPU (same update, less memory)
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    num_val_iterations: int = 10
    seed: int = 12345
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    ijepa: IJEPAConfig = field(default_factory=IJEPAConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderSettings = field(default_factory=LoaderSettings)

    @property
    def backbone_entry(self) -> BackboneEntry:
        return get_backbone(self.backbone)

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.iterations_per_epoch

    @property
    def warmup_steps(self) -> int:
        return int(round(self.optim.warmup_fraction * self.total_steps))

    @property
    def cell_size(self) -> tuple[int, int, int]:
        """Voxels per token cell of the backbone (Primus: its patch embedding; ResEnc: its stride)."""
        return self.backbone_entry.cell_size(self.model)

    def schedule_config(self) -> ScheduleConfig:
        """The lr / wd / EMA schedules this configuration trains with."""
        o = self.optim
        return ScheduleConfig(total_steps=self.total_steps, warmup_steps=self.warmup_steps, start_lr=o.start_lr,
                              peak_lr=o.peak_lr, final_lr=o.final_lr, start_wd=o.start_weight_decay,
                              final_wd=o.final_weight_decay, ema_start=self.ijepa.ema_start, ema_end=self.ijepa.ema_end)

    def problems(self) -> list[str]:
        """Every inconsistency between the sections at once (each section validated itself when
        it was built); geometry checks wait until the geometry is known."""
        out = []
        try:
            method = get_method(self.method)
        except UnknownMethod as e:
            out.append(str(e))
            method = None
        try:
            backbone = get_backbone(self.backbone)
        except UnknownBackbone as e:
            out.append(str(e))
            backbone = None
        for name in ("num_epochs", "iterations_per_epoch"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_val_iterations < 0:
            out.append(f"num_val_iterations must be >= 0, got {self.num_val_iterations}")
        if self.batch_size is not None and self.batch_size < 1:
            out.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.grad_accumulation < 1:
            out.append(f"grad_accumulation must be at least 1, got {self.grad_accumulation}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            out.append(f"patch_size must be 3 positive sizes, got {self.patch_size}")
        elif backbone is not None:
            family = backbone.family_entry
            out += family.problems(self.model, self.patch_size or family.cell_size(self.model))
            if method is not None and self.patch_size is not None and method.problems is not None:
                out += method.problems(self, backbone)
        return list(dict.fromkeys(out))

    def check(self) -> TrainingConfig:
        problems = self.problems()
        if problems:
            raise InvalidInput(f"trainer {self.trainer_name!r} resolves to an invalid configuration:", problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (sections as objects, tuples as lists), plus the derived step counts."""
        return {**to_plain(self), "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Inverse of `to_dict` (derived keys ignored; unknown keys are an error)."""
        return from_dict(cls, {k: v for k, v in data.items() if k not in DERIVED_KEYS}, "training configuration")


def round_up_to_cells(patch: tuple[int, ...], cell: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(max(c, c * math.ceil(p / c)) for p, c in zip(patch, cell))  # type: ignore[return-value]


def with_geometry(config: TrainingConfig, plan_patch: list[int] | tuple[int, ...] | None,
                  plan_batch: int | None, plan_name: str = "the plan") -> tuple[TrainingConfig, list[str]]:
    """Fill the crop and the global batch from the plan's configuration where the trainer left
    them open, and say where each came from (one line each, for the training log).

    A plan patch that the backbone cannot tile (ResEnc needs multiples of its stride 32, Primus of
    its patch embedding) is rounded up to the next multiple, and the log says so."""
    notes = []
    patch, batch = config.patch_size, config.batch_size
    if patch is None:
        if not plan_patch:
            raise InvalidInput(f"{plan_name} has no patch_size and trainer {config.trainer_name!r} sets none; add "
                               "_P<N> to the trainer name or --set patch_size=[X,Y,Z]")
        planned = tuple(int(p) for p in plan_patch)
        patch = round_up_to_cells(planned, config.cell_size)
        if patch != planned:
            notes.append(f"patch size {list(patch)}: {plan_name}'s {list(planned)} rounded up to multiples of the "
                         f"{config.backbone} token cell {list(config.cell_size)}")
        else:
            notes.append(f"patch size {list(patch)} from {plan_name}")
    elif plan_patch and tuple(plan_patch) != tuple(patch):
        notes.append(f"patch size {list(patch)} set by the trainer overrides {plan_name}'s {list(plan_patch)}")
    if batch is None:
        if not plan_batch:
            raise InvalidInput(f"{plan_name} has no batch_size and trainer {config.trainer_name!r} sets none; add "
                               "_BS<N> to the trainer name or --set batch_size=N")
        batch = int(plan_batch)
        notes.append(f"global batch size {batch} from {plan_name}")
    elif plan_batch and int(plan_batch) != batch:
        notes.append(f"global batch size {batch} set by the trainer overrides {plan_name}'s {plan_batch}")
    x, y, z = (int(p) for p in patch)
    resolved = replace(config, patch_size=(x, y, z), batch_size=int(batch))
    return resolved.check(), notes


def section_names() -> list[str]:
    """The sections of the configuration, in order (for help texts and docs)."""
    return [f.name for f in fields(TrainingConfig) if f.name in
            ("model", "optim", "mask", "ijepa", "mae", "augment", "loader")]
