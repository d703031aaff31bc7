"""The nnU-Net handshake: `nnssl_adaptation_plan` and the downstream checkpoint keys.

nnU-Net's pretrained fine-tuning (`nnUNetv2_preprocess_like_nnssl`, `nnUNetv2_train_pretrained`)
reads `network_weights` and `nnssl_adaptation_plan` from a checkpoint loaded with
`torch.load(path, weights_only=True)` and no `map_location` (documentation/finetuning_nnunet.md). So
everything here is plain Python (no numpy scalars, no tuples where JSON has lists) and every
tensor is on the CPU.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from nnssl.methods.registry import get_method
from nnssl.models.backbone import BackboneSpec
from nnssl.models.registry import get_backbone, nnunet_architecture_plans
from nnssl.planning.plans import Plans

NNSSL_CITATION = {
    "type": "framework", "name": "nnssl",
    "apa_citations": ["Wald, T., Ulrich, C., et al. (2025). An OpenMind for 3D medical vision self-supervised "
                      "learning. arXiv:2412.17041"],
}


def citations(method: str, backbone: str) -> list[dict[str, Any]]:
    """The papers a user of this checkpoint should cite, as `{type, name, apa_citations}`: the
    registered method's (`method`, e.g. "MAETrainer"), the registered backbone's family's
    (`backbone`, e.g. "PlainConvUNet"), then nnssl's. From the registries, so a new family or
    method is cited without a line here."""
    entries = (get_method(method).citation, get_backbone(backbone).family_entry.citation, NNSSL_CITATION)
    return [copy.deepcopy(dict(c)) for c in entries]


def pruned_plan(plans: Plans, configuration: str, patch_size: tuple[int, int, int]) -> dict[str, Any]:
    """The plans with only the configuration used, its `patch_size` set to the pretraining patch
    (nnU-Net's `preprocess_like_nnssl` reads spacing and patch size from here)."""
    d = plans.to_dict()
    config = dict(d["configurations"][configuration])
    config["patch_size"] = [int(p) for p in patch_size]
    d["configurations"] = {configuration: config}
    return to_plain(d)


def adaptation_plan(backbone: BackboneSpec, plans: Plans, configuration: str, input_channels: int
                    ) -> dict[str, Any]:
    """Every field of the nnssl adaptation plan nnU-Net reads, plain types only."""
    patch = [int(p) for p in backbone.input_shape]
    return to_plain({
        "architecture_plans": nnunet_architecture_plans(backbone),
        "pretrain_plan": pruned_plan(plans, configuration, backbone.input_shape),
        "pretrain_num_input_channels": int(input_channels),
        "recommended_downstream_patchsize": patch,
        **backbone.transfer_keys(),
    })


def to_plain(value: Any) -> Any:
    """Recursively: tuples -> lists, numpy scalars -> Python numbers, tensors -> CPU tensors."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
        return value.item()
    return value


def check_downstream_keys(weights: dict[str, torch.Tensor], backbone: BackboneSpec) -> None:
    """Fail early if nnU-Net's prefix matching would pick up keys that are not the encoder's."""
    prefixes = (backbone.key_to_encoder, backbone.key_to_stem)
    outside = [k for k in weights if not k.startswith(prefixes)]
    if outside:
        raise ValueError(f"network_weights holds keys outside {prefixes}: {outside[:5]}")
    not_cpu = [k for k, v in weights.items() if v.device.type != "cpu"]
    if not_cpu:
        raise ValueError(f"network_weights must be CPU tensors (nnU-Net loads without map_location): {not_cpu[:5]}")
