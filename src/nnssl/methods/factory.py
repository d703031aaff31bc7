"""Build the pretraining method a resolved training configuration describes.

The registries (`models/registry.py`, `methods/registry.py`) say what exists; this is the one
place that turns a configuration into modules: the backbone entry, then the method's builder for
that backbone's family.
"""

from __future__ import annotations

import torch

from nnssl.errors import InvalidInput
from nnssl.methods.base import MethodInputs, PretrainingMethod
from nnssl.methods.registry import get_builder
from nnssl.models.registry import get_backbone


def build_method(config: MethodInputs, input_channels: int = 1) -> PretrainingMethod:
    """The method module (random init, seeded by `config.seed`) for `config`; its crop
    (`patch_size`) must be resolved (from the plans or the trainer name) before building."""
    if config.patch_size is None:
        raise InvalidInput(f"the training configuration of {config.trainer_name!r} has no patch size yet: it comes "
                           "from the plans at training time; resolve it first (nnssl.training.config.with_geometry) "
                           "or give one (_P<N> in the trainer name, --set patch_size=[X,Y,Z])")
    torch.manual_seed(config.seed)
    backbone = get_backbone(config.backbone)
    return get_builder(config.method, backbone.family)(config, backbone, input_channels)
