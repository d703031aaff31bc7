"""Build the pretraining method a resolved `TrainingConfig` describes.

One function per (method, backbone family); the trainer registry only produces configurations,
and this is the single place that turns one into modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nnssl.methods.base import PretrainingMethod
from nnssl.training.config import TrainingConfig

if TYPE_CHECKING:
    from nnssl.methods.masks import MaskConfig


def build_ijepa_primus(config: TrainingConfig, input_channels: int = 1) -> PretrainingMethod:
    from nnssl.methods.ijepa import IJEPA, IJEPAConfig
    from nnssl.methods.masks import MultiBlockMaskSampler
    from nnssl.models.primus import PrimusTokenEncoder, build_primus, primus_arch_kwargs, primus_backbone_spec

    kwargs = primus_arch_kwargs(config.primus_preset, input_channels, config.token_patch_size, config.patch_size,
                                drop_path_rate=config.drop_path_rate)
    primus = build_primus(config.primus_preset, input_channels, config.token_patch_size, config.patch_size,
                          drop_path_rate=config.drop_path_rate)
    encoder = PrimusTokenEncoder(primus)
    sampler = MultiBlockMaskSampler(encoder.grid, mask_config(config), seed=config.seed)
    method = IJEPA(encoder, IJEPAConfig(predictor_width=config.predictor_width,
                                        predictor_depth=config.predictor_depth, loss=config.loss),
                   mask_sampler=sampler, backbone=primus_backbone_spec(primus, kwargs))
    return method


def mask_config(config: TrainingConfig) -> "MaskConfig":
    """The I-JEPA multi-block sampler settings of a training configuration."""
    from nnssl.methods.masks import MaskConfig

    return MaskConfig(num_targets=config.num_targets, target_scale=config.target_scale,
                      target_aspect=config.target_aspect, context_scale=config.context_scale,
                      min_keep=config.min_keep)


def build_method(config: TrainingConfig, input_channels: int = 1) -> PretrainingMethod:
    """The method module (random init) for `config`, seeded by `config.seed`."""
    import torch

    torch.manual_seed(config.seed)
    family = config.backbone_family
    if config.method == "IJEPATrainer" and family == "primus":
        return build_ijepa_primus(config, input_channels)
    if config.method == "IJEPATrainer" and family == "resenc":
        from nnssl.methods.ijepa_resenc import build_ijepa_resenc

        return build_ijepa_resenc(config, input_channels)
    if config.method == "MAETrainer":
        from nnssl.methods.mae import build_mae

        return build_mae(config, input_channels)
    raise ValueError(f"no builder for method {config.method!r} on backbone {config.backbone!r}")
