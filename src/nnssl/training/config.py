"""The resolved training configuration: every hyperparameter a run actually uses.

Written as JSON next to the results (`training_config.json`) and into every checkpoint, so
a run can be understood and reproduced from its folder alone. Defaults follow the
reference nnssl (1000 epochs x 250 iterations, 160³ patches, global batch 8 for `_BS8`) and
the I-JEPA 3D starting points of the spec (peak lr 3e-4, cosine wd 0.04 -> 0.4, EMA
0.996 -> 1.0, grad clip 1.0, predictor 384 x 6).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nnssl.methods.schedules import ScheduleConfig

METHODS: dict[str, str] = {
    "IJEPATrainer": "I-JEPA: predict EMA-teacher features of masked 3D blocks from a context block",
    "MAETrainer": "MAE: reconstruct masked voxels (Primus: 75% of tokens dropped; ResEnc: 16³ blocks)",
}

# Backbone tag -> (description, Primus preset name, default patch size, default batch size)
BACKBONES: dict[str, str] = {
    "PrimusS": "Primus-S (3D ViT, width 396, depth 12)",
    "PrimusB": "Primus-B (3D ViT, width 792, depth 12)",
    "PrimusM": "Primus-M (3D ViT, width 864, depth 16) - the default",
    "PrimusL": "Primus-L (3D ViT, width 1056, depth 24)",
    "Tiny": "a tiny Primus for CPU smoke runs (trains in seconds)",
    "ResEncL": "ResEnc-L (3D residual-encoder U-Net, nnU-Net's ResEncL preset)",
    "ResEncTiny": "a tiny residual-encoder U-Net for CPU smoke runs (ResEnc-L's layout, fewer channels)",
}

_PRESET = {"PrimusS": "S", "PrimusB": "B", "PrimusM": "M", "PrimusL": "L", "Tiny": "Tiny",
           "ResEncL": "L", "ResEncTiny": "Tiny"}
PRIMUS_BACKBONES = ("PrimusS", "PrimusB", "PrimusM", "PrimusL", "Tiny")
RESENC_BACKBONES = ("ResEncL", "ResEncTiny")


@dataclass(frozen=True)
class TrainingConfig:
    trainer_name: str = "IJEPATrainer"
    method: str = "IJEPATrainer"
    backbone: str = "PrimusM"
    primus_preset: str = "M"
    patch_size: tuple[int, int, int] = (160, 160, 160)
    token_patch_size: tuple[int, int, int] = (8, 8, 8)
    batch_size: int = 8
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    num_val_iterations: int = 10
    # optimisation
    peak_lr: float = 3e-4
    start_lr: float = 1e-5
    final_lr: float = 1e-6
    warmup_fraction: float = 0.05
    start_weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_start: float = 0.996
    ema_end: float = 1.0
    drop_path_rate: float = 0.0
    # I-JEPA
    predictor_width: int = 384
    predictor_depth: int = 6
    loss: str = "smooth_l1"
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.20)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 10
    # MAE
    mae_mask_ratio: float = 0.75  # fraction of tokens (Primus) or 16³ blocks (ResEnc) masked
    mae_block_size: int = 16  # ResEnc: side of the cubic input blocks that are masked together
    mae_decoder_width: int = 384  # Primus: width of the small Eva decoder
    mae_decoder_depth: int = 2  # Primus: depth of the small Eva decoder
    # bookkeeping
    seed: int = 12345
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def backbone_family(self) -> str:
        """"primus" (token ViT) or "resenc" (CNN)."""
        return "resenc" if self.backbone in RESENC_BACKBONES else "primus"

    @property
    def token_size(self) -> tuple[int, int, int]:
        """Voxels per mask cell: the Primus patch (8³) or ResEnc's bottleneck stride (32³)."""
        return (32, 32, 32) if self.backbone_family == "resenc" else self.token_patch_size

    @classmethod
    def for_backbone(cls, method: str, backbone: str) -> "TrainingConfig":
        config = cls(method=method, trainer_name=method, backbone=backbone,
                     primus_preset=_PRESET[backbone])
        if backbone in ("Tiny", "ResEncTiny"):
            patch = (32, 32, 32) if backbone == "Tiny" else (64, 64, 64)
            config = replace(config, patch_size=patch, batch_size=2, num_epochs=2,
                             iterations_per_epoch=5, num_val_iterations=1, predictor_width=64,
                             predictor_depth=2, min_keep=4, mae_decoder_width=48, mae_decoder_depth=1)
        if backbone in RESENC_BACKBONES:
            # a 5³ (160³ input) or 2³ (64³) cell grid: boxes of a few cells, small context floor
            config = replace(config, min_keep=min(config.min_keep, 4))
        if method == "MAETrainer":
            # the reference nnssl MAE recipe where our schedule can express it: AdamW betas
            # (0.9, 0.98), constant weight decay 0.05, drop path 0.2 for Primus (ResEnc has none),
            # gradient clipping 1 (Primus) / 12 (ResEnc); warm-up + cosine instead of its poly lr
            primus = backbone in PRIMUS_BACKBONES
            config = replace(config, betas=(0.9, 0.98), start_weight_decay=0.05, final_weight_decay=0.05,
                             drop_path_rate=0.2 if primus and backbone != "Tiny" else 0.0,
                             grad_clip=1.0 if primus else 12.0)
        return config

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.iterations_per_epoch

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * self.total_steps))

    def schedule_config(self) -> "ScheduleConfig":
        """The lr / wd / EMA schedules this configuration trains with."""
        from nnssl.methods.schedules import ScheduleConfig

        return ScheduleConfig(total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                              start_lr=self.start_lr, peak_lr=self.peak_lr, final_lr=self.final_lr,
                              start_wd=self.start_weight_decay, final_wd=self.final_weight_decay,
                              ema_start=self.ema_start, ema_end=self.ema_end)

    def problems(self) -> list[str]:
        """Every inconsistency at once (empty when the configuration is usable)."""
        out = []
        if self.method not in METHODS:
            out.append(f"method {self.method!r} is not one of {sorted(METHODS)}")
        if self.backbone not in BACKBONES:
            out.append(f"backbone {self.backbone!r} is not one of {sorted(BACKBONES)}")
        for name in ("batch_size", "num_epochs", "iterations_per_epoch"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.backbone in BACKBONES:
            for axis, (p, t) in enumerate(zip(self.patch_size, self.token_size)):
                if p < t or p % t:
                    what = "ResEnc's total stride" if self.backbone_family == "resenc" else "the token size"
                    out.append(f"patch size {self.patch_size} must be a multiple of {what} "
                               f"{self.token_size} on every axis (axis {axis}: {p})")
                    break
        if not 0.0 < self.mae_mask_ratio < 1.0:
            out.append(f"mae_mask_ratio must be in (0, 1), got {self.mae_mask_ratio}")
        if self.method == "MAETrainer" and self.backbone_family == "resenc" and (
                self.mae_block_size < 1 or any(p % self.mae_block_size for p in self.patch_size)):
            out.append(f"mae_block_size {self.mae_block_size} must divide the patch size {self.patch_size}")
        if not 0 <= self.warmup_fraction < 1:
            out.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.ema_start <= self.ema_end <= 1:
            out.append(f"EMA momentum must satisfy 0 < start <= end <= 1, got "
                       f"{self.ema_start} -> {self.ema_end}")
        if self.loss not in ("smooth_l1", "l1", "l2"):
            out.append(f"loss {self.loss!r} must be smooth_l1, l1 or l2")
        if self.peak_lr <= 0:
            out.append(f"peak_lr must be positive, got {self.peak_lr}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists), with the derived step counts."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["total_steps"] = self.total_steps
        d["warmup_steps"] = self.warmup_steps
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingConfig":
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for k, v in data.items():
            if k in names:
                kwargs[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)
