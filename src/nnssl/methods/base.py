"""The contract between a pretraining method (I-JEPA, MAE) and the training loop.

The loop (`nnssl.training.loop`) knows nothing method-specific: it asks the method for a loss
on a batch, steps the optimizer over the method's parameter groups, tells the method the step
is done (I-JEPA updates its EMA teacher there), logs the method's monitor features, and exports
the method's encoder. Every method is an `nn.Module` whose `state_dict()` is everything needed
to resume it.

Masks are a pure function of (seed, step, global sample index, stream), never of a global RNG,
so a resumed or distributed run draws exactly the masks an uninterrupted single-process one
would. Validation uses stream 1
with the validation index as the step, so its masks are fixed across the whole run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from nnssl.models.backbone import BackboneSpec

if TYPE_CHECKING:
    from nnssl.methods.ijepa import IJEPAConfig
    from nnssl.methods.mae import MAEConfig
    from nnssl.methods.masks import MaskConfig
    from nnssl.models.registry import ModelSettings

TRAIN_STREAM = 0
VALIDATION_STREAM = 1


def exempt_from_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norm scales, LayerScale gammas and q/v biases are 1-D; position embeddings, mask
    tokens and register tokens are not, but decaying them pulls positions / queries to 0 (Eva's
    `no_weight_decay` lists pos_embed; documentation/ijepa_method.md, hyperparameters)."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim <= 1 or leaf in ("pos_embed", "mask_token", "register_tokens")


def parameter_groups_by_part(parts: Iterable[tuple[str, Iterable[tuple[str, nn.Parameter]]]],
                             weight_decay: float) -> list[dict]:
    """AdamW groups `<part>_decay` / `<part>_no_decay` over (part, named parameters) pairs, with
    one exemption rule for every method (so I-JEPA and MAE are optimised alike). Frozen
    parameters are left out. `apply_wd` tells the trainer which groups get the scheduled decay."""
    groups = []
    for part, named in parts:
        named = [(n, p) for n, p in named if p.requires_grad]
        decay = [p for n, p in named if not exempt_from_weight_decay(n, p)]
        exempt = [p for n, p in named if exempt_from_weight_decay(n, p)]
        if decay:
            groups.append({"name": f"{part}_decay", "params": decay, "weight_decay": float(weight_decay),
                           "apply_wd": True})
        if exempt:
            groups.append({"name": f"{part}_no_decay", "params": exempt, "weight_decay": 0.0, "apply_wd": False})
    return groups


class MethodInputs(Protocol):
    """The settings method builders read (the training configuration provides them, so methods
    never import the training layer): the crop, the seed and the sections of each method."""

    @property
    def trainer_name(self) -> str: ...
    @property
    def method(self) -> str: ...  # a registered method (methods/registry.py)
    @property
    def backbone(self) -> str: ...  # a registered backbone (models/registry.py)
    @property
    def patch_size(self) -> tuple[int, int, int] | None: ...
    @property
    def seed(self) -> int: ...
    @property
    def model(self) -> ModelSettings: ...
    @property
    def mask(self) -> MaskConfig: ...
    @property
    def ijepa(self) -> IJEPAConfig: ...
    @property
    def mae(self) -> MAEConfig: ...


@dataclass
class MethodOutput:
    """What one forward of a method returns to the loop."""

    loss: torch.Tensor  # scalar, fp32, differentiable
    # [B, N, E] features for the collapse monitors (I-JEPA: LN₀ teacher tokens of the whole
    # volume; MAE: the encoder tokens it computed, i.e. Primus's visible tokens or ResEnc's
    # bottleneck of the masked input), detached; None if the method has none this step
    monitor_tokens: torch.Tensor | None = None
    predictions: torch.Tensor | None = None  # [.., E] predictions, detached (pred_std)
    scalars: dict[str, float] = field(default_factory=dict)  # extra cheap numbers to log


class PretrainingMethod(nn.Module):
    """The base class of every method module (I-JEPA, MAE, ...): an `nn.Module` whose
    `state_dict()` is everything needed to resume, with the four hooks the loop calls."""

    backbone: BackboneSpec  # what export writes into the adaptation plan (set by every registered builder)
    embed_dim: int  # width of the monitor features (collapse thresholds scale with it)

    def training_output(self, volumes: torch.Tensor, anonymization_mask: torch.Tensor | None, step: int,
                        rank: int = 0, world_size: int = 1, stream: int = TRAIN_STREAM) -> MethodOutput:
        """Loss (and monitor features) for this rank's share [B, C, X, Y, Z] of the global batch
        (samples rank·B .. rank·B + B − 1); `anonymization_mask` [B, 1, X, Y, Z] bool marks
        defaced voxels to exclude from any voxel loss. Random masks are drawn per *global*
        sample index, so R ranks see exactly the masks of one process with batch R·B."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int, momentum: float) -> None:
        """Called once per optimizer step, after `optimizer.step()` (EMA teachers update here;
        `momentum` is the scheduled EMA momentum of this step)."""
        raise NotImplementedError

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups over the trainable parameters; each has `name` and `apply_wd` (whether
        the scheduled weight decay applies to it)."""
        raise NotImplementedError

    def export_encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """`network_weights`: CPU tensors keyed as the downstream network names them."""
        raise NotImplementedError
