"""The registry of pretraining methods: I-JEPA, MAE, and whatever is added next, in one list.

A method module registers a `MethodEntry` (name as used in trainer names, display name,
citation, default settings per backbone family) and one builder per backbone family it supports
(`register_builder`; "*" = any family with a token encoder, as I-JEPA is). Building a method for
a family without a builder is an error that lists the families it supports, never a fallback.

Like the backbone registry, nothing is registered at import time of this module: the first
lookup imports `BUILTIN_MODULES` (documentation/extending.md says how to add one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nnssl.errors import NnsslError

BUILTIN_MODULES: tuple[str, ...] = ("nnssl.methods.ijepa_builder", "nnssl.methods.mae", "nnssl.methods.mae_primus",
                                    "nnssl.methods.mae_unet")
ANY_FAMILY = "*"


class UnknownMethod(NnsslError):
    """A method name that is not registered, or a method/backbone pair without a builder."""


@dataclass(frozen=True)
class MethodEntry:
    """One pretraining method.

    `defaults` maps a backbone family (or "*" for all) to dotted training-config overrides, e.g.
    MAE's reference recipe (AdamW betas, constant weight decay). `exports` says what the exported
    `network_weights` are, for the model card.
    """

    name: str
    display_name: str
    description: str
    citation: Mapping[str, Any]
    exports: str
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # (config, backbone entry) -> what this method cannot do with them (checked before building)
    problems: Callable[[Any, Any], list[str]] | None = None
    listing_order: int = 100  # position in listings and docs (the headline method first)

    def defaults_for(self, family: str) -> dict[str, Any]:
        return {**self.defaults.get(ANY_FAMILY, {}), **self.defaults.get(family, {})}


# A builder: (config, backbone entry, input channels) -> the method module (random init).
Builder = Callable[[Any, Any, int], Any]

_METHODS: dict[str, MethodEntry] = {}
_BUILDERS: dict[tuple[str, str], Builder] = {}
_loaded = False


def register_method(entry: MethodEntry) -> MethodEntry:
    if entry.name in _METHODS and _METHODS[entry.name] != entry:
        raise ValueError(f"method {entry.name!r} is registered twice")
    if "_" in entry.name:
        raise ValueError(f"method name {entry.name!r} must not contain '_' (trainer names split on it)")
    _METHODS[entry.name] = entry
    return entry


def register_builder(method: str, family: str) -> Callable[[Builder], Builder]:
    """Decorator: `fn` builds `method` on backbones of `family` ("*": any family)."""
    def wrap(fn: Builder) -> Builder:
        _BUILDERS[(method, family)] = fn
        return fn
    return wrap


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def get_method(name: str) -> MethodEntry:
    _load_builtins()
    if name not in _METHODS:
        raise UnknownMethod(f"unknown method {name!r}; registered: {', '.join(_METHODS)}")
    return _METHODS[name]


def list_methods() -> list[MethodEntry]:
    """Every registered method, headline first (then in registration order)."""
    _load_builtins()
    return sorted(_METHODS.values(), key=lambda m: m.listing_order)


def supported_families(method: str) -> list[str]:
    """The families `method` has builders for ("*" first), in the backbone registry's order (not
    in import order, which depends on which module a program imported first)."""
    from nnssl.models.registry import list_families

    _load_builtins()
    registered = {family for (m, family) in _BUILDERS if m == method}
    known = [ANY_FAMILY] + [f.name for f in list_families()]
    return [f for f in known if f in registered] + sorted(registered - set(known))


def get_builder(method: str, family: str) -> Builder:
    """The builder of `method` for backbones of `family`."""
    get_method(method)
    builder = _BUILDERS.get((method, family)) or _BUILDERS.get((method, ANY_FAMILY))
    if builder is None:
        raise UnknownMethod(f"method {method!r} has no implementation for the {family!r} backbone family "
                            f"(it supports: {', '.join(supported_families(method)) or 'none'})")
    return builder
