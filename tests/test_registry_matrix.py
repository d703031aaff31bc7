"""The method x backbone matrix, generated from the registries (as timm tests every registered
model): every pair resolves to a valid configuration or is refused with the reason; every
CPU-sized backbone trains one real step with every method and exports nnU-Net-keyed weights."""

from __future__ import annotations

import pytest
import torch

from nnssl.methods.factory import build_method
from nnssl.methods.registry import UnknownMethod, get_builder, list_methods
from nnssl.models.registry import list_backbones
from nnssl.training.names import resolve_config
from nnssl.training.step import optimizer_step

PAIRS = [(m.name, b.name) for m in list_methods() for b in list_backbones()]
SMALL = [(m, b) for m, b in PAIRS if next(x for x in list_backbones() if x.name == b).cpu_sized]


def _supported(method: str, family: str) -> bool:
    try:
        get_builder(method, family)
    except UnknownMethod:
        return False
    return True


@pytest.mark.parametrize("method,backbone", PAIRS)
def test_every_registered_pair_resolves_with_its_citations(method, backbone):
    config = resolve_config(f"{method}_{backbone}")
    entry = config.backbone_entry
    assert (config.method, config.backbone, entry.family) == (method, backbone, entry.family)
    assert entry.family_entry.citation["apa_citations"]
    assert _supported(method, entry.family)  # every built-in pair is implemented


@pytest.mark.parametrize("method,backbone", SMALL)
def test_cpu_sized_backbones_train_a_step_with_every_method_and_export(method, backbone, one_thread):
    cell = resolve_config(f"{method}_{backbone}").cell_size
    patch = tuple(max(32, 2 * c) for c in cell)  # two token cells per axis at least
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
