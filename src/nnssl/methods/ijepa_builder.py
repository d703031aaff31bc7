"""I-JEPA in the method registry: one builder for every backbone family with a token encoder.

The method (`methods/ijepa.py`) needs only the token-encoder interface, which each backbone
family provides (`BackboneFamily.token_encoder`: Primus's token access, ResEnc's SparK-style
sparse student), so a new family gets I-JEPA without a line here. The multi-block sampler runs on
the encoder's token grid (crop / token cell).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nnssl.errors import InvalidInput
from nnssl.methods.ijepa import IJEPA
from nnssl.methods.masks import InvalidMaskConfig, MultiBlockMaskSampler
from nnssl.methods.registry import ANY_FAMILY, MethodEntry, register_builder, register_method

if TYPE_CHECKING:
    from nnssl.methods.base import MethodInputs
    from nnssl.models.registry import BackboneEntry

IJEPA_CITATION = {
    "type": "method", "name": "I-JEPA",
    "apa_citations": ["Assran, M., Duval, Q., Misra, I., Bojanowski, P., Vincent, P., Rabbat, M., LeCun, Y., & "
                      "Ballas, N. (2023). Self-Supervised Learning from Images with a Joint-Embedding Predictive "
                      "Architecture. CVPR 2023. arXiv:2301.08243"],
}


def token_grid(config: MethodInputs, backbone: BackboneEntry) -> tuple[int, int, int]:
    cell = backbone.cell_size(config.model)
    return tuple(int(p) // int(c) for p, c in zip(config.patch_size, cell))  # type: ignore[return-value]


def ijepa_problems(config: MethodInputs, backbone: BackboneEntry) -> list[str]:
    """The family must give token-level access, and the mask settings must be able to place a
    context on the token grid of this crop."""
    if backbone.family_entry.token_encoder is None:
        return [f"I-JEPA needs token-level access to the encoder, which the {backbone.family!r} backbone family does "
                "not provide (BackboneFamily.token_encoder); pretrain it with another method"]
    patch, cell = tuple(config.patch_size or ()), backbone.cell_size(config.model)
    if len(patch) != 3 or any(p < c or p % c for p, c in zip(patch, cell)):
        return []  # the backbone's own check reports the patch size
    try:
        MultiBlockMaskSampler(token_grid(config, backbone), config.mask, seed=config.seed)
    except InvalidMaskConfig as e:
        return [f"mask: {p}" for p in e.problems]
    return []


@register_builder("IJEPATrainer", ANY_FAMILY)
def build_ijepa(config: MethodInputs, backbone: BackboneEntry, input_channels: int = 1) -> IJEPA:
    network, spec = backbone.build(input_channels, tuple(config.patch_size), config.model, 1)
    token_encoder = backbone.family_entry.token_encoder
    if token_encoder is None:
        raise InvalidInput(ijepa_problems(config, backbone)[0])
    encoder = token_encoder(network, tuple(config.patch_size))
    sampler = MultiBlockMaskSampler(encoder.grid, config.mask, seed=config.seed)
    return IJEPA(encoder, config.ijepa, mask_sampler=sampler, backbone=spec)


register_method(MethodEntry(
    name="IJEPATrainer", display_name="I-JEPA", citation=IJEPA_CITATION, problems=ijepa_problems,
    description="I-JEPA: predict EMA-teacher features of masked 3D blocks from a context block",
    exports="the EMA target encoder (teacher)", listing_order=0))
