"""The registry of pretraining methods: I-JEPA, MAE, and whatever is added next, in one list.

A method module registers a `MethodEntry` (name as used in trainer names, display name,
citation, default settings per backbone family) and one builder per backbone family it supports
(`register_builder`; "*" = any family with a token encoder, as I-JEPA is). Building a method for
a family without a builder is an error that lists the families it supports, never a fallback.

Like the backbone registry, nothing is registered at import time of this module: the first
lookup imports `BUILTIN_MODULES` (documentation/extending.md says how to add one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nnssl.errors import NnsslError
from nnssl.registry import Registry

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

_METHODS: Registry[MethodEntry] = Registry("method", BUILTIN_MODULES, UnknownMethod)
_BUILDERS: dict[tuple[str, str], Builder] = {}


def register_method(entry: MethodEntry) -> MethodEntry:
    return _METHODS.add(entry.name, entry)


def register_builder(method: str, family: str) -> Callable[[Builder], Builder]:
    """Decorator: `fn` builds `method` on backbones of `family` ("*": any family)."""
    def wrap(fn: Builder) -> Builder:
        _BUILDERS[(method, family)] = fn
        return fn
    return wrap


def get_method(name: str) -> MethodEntry:
    return _METHODS.get(name)


def list_methods() -> list[MethodEntry]:
    """Every registered method, headline first (then in registration order)."""
    return _METHODS.values(order=lambda m: m.listing_order)


def supported_families(method: str) -> list[str]:
    """The families `method` has builders for ("*" first), in the backbone registry's order (not
    in import order, which depends on which module a program imported first)."""
    from nnssl.models.registry import list_families

    _METHODS.load()
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
