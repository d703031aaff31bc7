"""The method x backbone matrix, generated from the registries (as timm tests every registered
model): every pair resolves to a valid configuration or is refused with the reason; every
CPU-sized backbone trains one real step with every method that accepts it and exports
nnU-Net-keyed weights.

The one refusal the registries define: a method registered for "*" (I-JEPA) needs a family with
a token encoder, so a family with `token_encoder=None` is refused up front with that reason,
and its builder refuses it too (no silent fallback)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nnssl.errors import InvalidInput
from nnssl.methods.factory import build_method
from nnssl.methods.registry import ANY_FAMILY, UnknownMethod, get_builder, list_methods
from nnssl.models.registry import get_backbone, list_backbones
from nnssl.training.names import UnknownTrainer, resolve_config
from nnssl.training.step import optimizer_step

PAIRS = [(m.name, b.name) for m in list_methods() for b in list_backbones()]


def _supported(method: str, family: str) -> bool:
    try:
        get_builder(method, family)
    except UnknownMethod:
        return False
    return True


def _refused(method: str, backbone: str) -> bool:
    """Only through the "*" builder, and only for a family without a token encoder."""
    family = get_backbone(backbone).family_entry
    try:
        needs_tokens = get_builder(method, family.name) is get_builder(method, ANY_FAMILY)
    except UnknownMethod:
        needs_tokens = False
    return needs_tokens and family.token_encoder is None


SMALL = [(m, b) for m, b in PAIRS if get_backbone(b).cpu_sized and not _refused(m, b)]


def _patch(name: str) -> tuple[int, int, int]:
    cell = resolve_config(name).cell_size
    return tuple(max(32, 2 * c) for c in cell)  # type: ignore[return-value]  # two token cells per axis at least


@pytest.mark.parametrize("method,backbone", PAIRS)
def test_every_registered_pair_resolves_with_its_citations(method, backbone):
    config = resolve_config(f"{method}_{backbone}")
    entry = config.backbone_entry
    assert (config.method, config.backbone, entry.family) == (method, backbone, entry.family)
    assert entry.family_entry.citation["apa_citations"]
    assert _supported(method, entry.family)  # every built-in pair is implemented
    if _refused(method, backbone):
        reason = "needs token-level access to the encoder, which the"
        with pytest.raises(UnknownTrainer, match=reason):  # refused when the crop is known
            resolve_config(f"{method}_{backbone}", overrides={"patch_size": _patch(f"{method}_{backbone}")})
        if entry.cpu_sized:  # built anyway (an unchecked configuration): the builder refuses too
            unchecked = dataclasses.replace(config, patch_size=_patch(f"{method}_{backbone}"))
            with pytest.raises(InvalidInput, match=reason):
                build_method(unchecked)


@pytest.mark.parametrize("method,backbone", SMALL)
def test_cpu_sized_backbones_train_a_step_with_every_method_and_export(method, backbone, one_thread):
    patch = _patch(f"{method}_{backbone}")
    config = resolve_config(f"{method}_{backbone}_BS2_1ep_2it", overrides={"patch_size": patch})
    method_module = build_method(config)
    optimizer = torch.optim.AdamW(method_module.parameter_groups(0.04), lr=1e-3)
    x = torch.randn(2, 1, *patch)
    before = {k: v.clone() for k, v in method_module.export_encoder_state_dict().items()}
    result = optimizer_step(method_module, optimizer, x, torch.zeros_like(x, dtype=torch.bool), 0,
                            config.schedule_config(), config.optim.grad_clip)
    assert result.applied and torch.isfinite(torch.tensor(result.loss))
    weights = method_module.export_encoder_state_dict()
    spec = method_module.backbone
    assert weights and all(k.startswith((spec.key_to_encoder, spec.key_to_stem)) for k in weights)
    assert all(v.device.type == "cpu" for v in weights.values())
    # the exported network rebuilt from its own description accepts the weights strictly
    network = spec.build()
    missing, unexpected = network.load_state_dict(weights, strict=False)
    assert not unexpected and all(not k.startswith((spec.key_to_encoder, spec.key_to_stem)) for k in missing)
    if method == "MAETrainer":  # MAE's encoder moved; I-JEPA's export is the EMA teacher, which moved less
        assert any(not torch.equal(before[k], v) for k, v in weights.items())
