"""The registry of backbones: every architecture nnssl can pretrain, in one list.

In the style of timm's `register_model`: a backbone family module (`models/primus.py`,
`models/resenc.py`, `models/plainconv.py`) registers its family once (`register_family`: how to
get JEPA tokens out of its networks, if it can, its citation, its checks) and every size of it
(`register_backbone`: a builder, a description, default settings). Trainer names,
`nnssl_train --list_trainers`, the method x backbone test matrix, citations and the model card
all read this registry; nothing else lists backbones, and an unknown family is an error, never
routed as another one.

Nothing is registered at import time of this module: the first lookup imports the built-in
family modules (`BUILTIN_MODULES`). Adding a family = one new module that registers itself,
plus its name in `BUILTIN_MODULES` (documentation/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from nnssl.errors import InvalidInput, NnsslError
from nnssl.models.backbone import BackboneSpec
from nnssl.registry import Registry

Shape = tuple[int, int, int]

BUILTIN_MODULES: tuple[str, ...] = ("nnssl.models.primus", "nnssl.models.resenc", "nnssl.models.plainconv")


class UnknownBackbone(NnsslError):
    """A backbone or family name that is not registered; the message lists the valid ones."""


@dataclass(frozen=True)
class ModelSettings:
    """Architecture settings a trainer may change (section `model` of the training config).

    `patch_embed_size` is Primus's token embedding (voxels per token, dynamic-network-
    architectures' own name; None: the backbone's default, 8³); backbones without a token
    embedding (ResEnc) reject it. `drop_path_rate` is stochastic depth during pretraining.
    """

    patch_embed_size: tuple[int, int, int] | None = None
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.patch_embed_size is not None:
            size = tuple(self.patch_embed_size)
            if len(size) != 3 or any(int(s) != s or s < 1 for s in size):
                problems.append(f"patch_embed_size must be 3 positive integers, got {self.patch_embed_size!r}")
            else:
                object.__setattr__(self, "patch_embed_size", tuple(int(s) for s in size))
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if problems:
            raise InvalidInput("invalid model settings:", problems)


class TokenEncoder(Protocol):
    """What JEPA methods need from an encoder: tokens on a 3D grid in C-order, for the kept
    indices only (`keep` [B, K]) or all of them (`keep=None`)."""

    grid: Shape
    embed_dim: int
    num_heads: int

    def __call__(self, x: Any, keep: Any = None) -> Any: ...


@dataclass(frozen=True)
class BackboneFamily:
    """What a family of networks provides to every method.

    `token_encoder(network, input_shape)` wraps a built network for token-level access (JEPA);
    `cell_size(settings)` is the voxels per token cell (Primus: the patch embedding; ResEnc: the
    encoder's total stride), so crops must be multiples of it; `problems(settings, patch_size)`
    lists what this family cannot build; `defaults` are dotted training-config overrides for
    every backbone of the family; `nnunet_architecture(spec)` is the adaptation plan's
    `architecture_plans` for a network of the family (`nnunet_architecture_plans`).
    """

    name: str
    display_name: str
    citation: Mapping[str, Any]
    token_encoder: Callable[[nn.Module, Shape], TokenEncoder] | None  # None: no token-level access (no JEPA)
    cell_size: Callable[[ModelSettings], Shape]
    problems: Callable[[ModelSettings, Shape], list[str]]
    defaults: Mapping[str, Any] = field(default_factory=dict)  # dotted overrides for every size
    # the import path of the family's network class, and how nnU-Net master builds such a network
    # (`architecture_plans` of the adaptation plan); None: nnU-Net's generic class-path form
    network_class: str = ""
    nnunet_architecture: Callable[[BackboneSpec], dict[str, Any]] | None = None


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone size.

    `build(input_channels, input_shape, settings, num_classes)` returns the full network nnU-Net
    fine-tunes (random init) and its `BackboneSpec`. `defaults` are dotted training-config overrides applied
    when a trainer names this backbone (e.g. the CPU-sized Tiny's small predictor).
    """

    name: str
    family: str
    description: str
    build: Callable[[int, Shape, ModelSettings, int], tuple[nn.Module, BackboneSpec]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    cpu_sized: bool = False  # small enough for the CPU test matrix and the demo

    @property
    def family_entry(self) -> BackboneFamily:
        return get_family(self.family)

    def cell_size(self, settings: ModelSettings) -> Shape:
        return self.family_entry.cell_size(settings)


_FAMILIES: Registry[BackboneFamily] = Registry("backbone family", BUILTIN_MODULES, UnknownBackbone)
_BACKBONES: Registry[BackboneEntry] = Registry("backbone", BUILTIN_MODULES, UnknownBackbone)


def register_family(family: BackboneFamily) -> BackboneFamily:
    return _FAMILIES.add(family.name, family)


def register_backbone(entry: BackboneEntry) -> BackboneEntry:
    return _BACKBONES.add(entry.name, entry)


def get_family(name: str) -> BackboneFamily:
    _BACKBONES.load()
    return _FAMILIES.get(name)


def get_backbone(name: str) -> BackboneEntry:
    entry = _BACKBONES.get(name)
    get_family(entry.family)  # a backbone of an unregistered family is an error, not a guess
    return entry


def list_backbones() -> list[BackboneEntry]:
    """Every registered backbone: the built-in modules' in `BUILTIN_MODULES` order, then any
    other; within a module in registration order."""
    return _BACKBONES.values(order=lambda b: _BACKBONES.rank(getattr(b.build, "__module__", None)))


def list_families() -> list[BackboneFamily]:
    """Every registered family, in the order of `list_backbones`."""
    _BACKBONES.load()
    return _FAMILIES.values(order=lambda f: _FAMILIES.rank(getattr(f.problems, "__module__", None)))


def nnunet_architecture_plans(spec: BackboneSpec) -> dict[str, Any]:
    """`architecture_plans` of the adaptation plan: what nnU-Net master's fine-tuning builds into
    the network of `spec`. The family whose network class it is decides (a preset name with
    `arch_kwargs: null`, `PrimusX` kwargs, ...); otherwise nnU-Net's generic class-path form.
    Computed from the spec, so re-exporting an older checkpoint gives today's form."""
    family = next((f for f in list_families() if f.network_class == spec.network_class), None)
    if family is not None and family.nnunet_architecture is not None:
        return family.nnunet_architecture(spec)
    return spec.class_path_architecture()
