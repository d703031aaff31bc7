"""What every pretraining backbone declares about itself, for export and for rebuilding it.

The downstream handshake (nnU-Net's pretrained fine-tuning) needs, besides the weights, the
architecture (`arch_class_name`, plain `arch_kwargs`, which kwargs are import paths) and the
network's own transfer keys (`key_to_encoder`, `key_to_stem`, `keys_to_in_proj`,
`key_to_lpe`). dynamic-network-architectures' networks carry those keys as attributes, so
`BackboneSpec.from_network` reads them off the real network instead of hard-coding strings.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from nnssl.errors import InvalidInput

if TYPE_CHECKING:
    from nnssl.models.registry import ModelSettings


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise InvalidInput(f"cannot import {path!r} named in an architecture plan: {e}; install the package "
                           "that provides it (dynamic-network-architectures, torch)") from e


def plain_arch_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(JSON-safe kwargs, names of the kwargs that are import paths): classes become dotted
    paths, tuples become lists, as nnU-Net's plans store them."""
    out: dict[str, Any] = {}
    requiring_import = []
    for key, value in kwargs.items():
        if isinstance(value, type):
            out[key] = class_path(value)
            requiring_import.append(key)
        elif isinstance(value, tuple):
            out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        elif isinstance(value, list):
            out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        else:
            out[key] = value
    return out, requiring_import


def importable_arch_kwargs(kwargs: dict[str, Any], requiring_import: list[str]) -> dict[str, Any]:
    """Inverse of `plain_arch_kwargs`: import the named classes back."""
    out = dict(kwargs)
    for key in requiring_import:
        if out.get(key) is not None:
            out[key] = import_class(out[key])
    return out


@dataclass(frozen=True)
class BackboneSpec:
    """The architecture of a pretrained encoder: how we rebuild it and how nnU-Net builds it.

    `network_class` and `arch_kwargs` (the complete constructor arguments, plain types) rebuild
    the network exactly (`build()`; saved as the checkpoint's `nnssl_backbone`).
    `arch_class_name` is the name nnU-Net builds it by (`PrimusS/B/M/L`, `ResEncL`, `PrimusX`
    for other Primus sizes such as `Tiny`, or a U-Net class path);
    `nnssl.models.registry.nnunet_architecture_plans(spec)` is the adaptation plan's description
    of it, in nnU-Net master's form.
    """

    arch_class_name: str
    network_class: str  # import path of the dynamic-network-architectures class
    arch_kwargs: dict[str, Any]
    arch_kwargs_requiring_import: list[str]
    key_to_encoder: str
    key_to_stem: str
    keys_to_in_proj: tuple[str, ...]
    key_to_lpe: str | None
    input_shape: tuple[int, int, int]  # the pretraining patch size
    # kwarg names of the input channels / classes / patch size in the constructor
    channels_kwarg: str = "input_channels"
    classes_kwarg: str = "num_classes"
    shape_kwarg: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_network(cls, network: nn.Module, arch_class_name: str, kwargs: dict[str, Any],
                     input_shape: tuple[int, int, int], shape_kwarg: str | None = None) -> BackboneSpec:
        plain, requiring = plain_arch_kwargs(kwargs)
        keys = tuple(getattr(network, "keys_to_in_proj", ()))
        return cls(arch_class_name=arch_class_name, network_class=class_path(type(network)), arch_kwargs=plain,
                   arch_kwargs_requiring_import=requiring, key_to_encoder=network.key_to_encoder,
                   key_to_stem=network.key_to_stem, keys_to_in_proj=keys,
                   key_to_lpe=getattr(network, "key_to_lpe", None), input_shape=tuple(int(s) for s in input_shape),
                   shape_kwarg=shape_kwarg)

    def build(self, input_channels: int | None = None, num_classes: int | None = None,
              input_shape: tuple[int, int, int] | None = None) -> nn.Module:
        """The network (full segmentation network, random init), optionally for another number
        of input channels, classes or (Primus) patch size, as nnU-Net would build it."""
        kwargs = importable_arch_kwargs(self.arch_kwargs, self.arch_kwargs_requiring_import)
        if input_channels is not None:
            kwargs[self.channels_kwarg] = int(input_channels)
        if num_classes is not None:
            kwargs[self.classes_kwarg] = int(num_classes)
        if input_shape is not None and self.shape_kwarg is not None:
            kwargs[self.shape_kwarg] = tuple(int(s) for s in input_shape)
        for key in ("patch_embed_size", self.shape_kwarg):
            if key and isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return import_class(self.network_class)(**kwargs)

    def class_path_architecture(self) -> dict[str, Any]:
        """`architecture_plans` in nnU-Net's generic form: the class path and its constructor
        kwargs minus the ones nnU-Net passes itself (`get_network_from_plans` sets the input
        channels, classes and deep supervision). Families nnU-Net builds by name (Primus, ResEnc)
        have their own form: `nnssl.models.registry.nnunet_architecture_plans` chooses."""
        passed_by_nnunet = (self.channels_kwarg, self.classes_kwarg, "deep_supervision")
        return {"arch_class_name": self.network_class,
                "arch_kwargs": {k: v for k, v in self.arch_kwargs.items() if k not in passed_by_nnunet},
                "arch_kwargs_requiring_import": list(self.arch_kwargs_requiring_import)}

    def transfer_keys(self) -> dict[str, Any]:
        return {"key_to_encoder": self.key_to_encoder, "key_to_stem": self.key_to_stem,
                "keys_to_in_proj": list(self.keys_to_in_proj), "key_to_lpe": self.key_to_lpe}

    def to_dict(self) -> dict[str, Any]:
        return {"arch_class_name": self.arch_class_name, "network_class": self.network_class,
                "arch_kwargs": dict(self.arch_kwargs),
                "arch_kwargs_requiring_import": list(self.arch_kwargs_requiring_import),
                **self.transfer_keys(), "input_shape": list(self.input_shape), "channels_kwarg": self.channels_kwarg,
                "classes_kwarg": self.classes_kwarg, "shape_kwarg": self.shape_kwarg, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        return cls(arch_class_name=d["arch_class_name"], network_class=d["network_class"],
                   arch_kwargs=dict(d["arch_kwargs"]),
                   arch_kwargs_requiring_import=list(d["arch_kwargs_requiring_import"]),
                   key_to_encoder=d["key_to_encoder"], key_to_stem=d["key_to_stem"],
                   keys_to_in_proj=tuple(d["keys_to_in_proj"]), key_to_lpe=d.get("key_to_lpe"),
                   input_shape=tuple(d["input_shape"]), channels_kwarg=d.get("channels_kwarg", "input_channels"),
                   classes_kwarg=d.get("classes_kwarg", "num_classes"), shape_kwarg=d.get("shape_kwarg"),
                   extra=dict(d.get("extra") or {}))


def conv_unet_problems(settings: ModelSettings, patch_size: tuple[int, ...], name: str, network_class: str,
                       stride: int) -> list[str]:
    """What a convolutional U-Net family (ResEnc, PlainConvUNet) cannot build: the Primus-only
    settings, and crops that are not whole bottleneck cells. The family's checks (`problems`)."""
    problems = []
    if settings.patch_embed_size is not None:
        problems.append(f"model.patch_embed_size={list(settings.patch_embed_size)} is a Primus setting; a {name} "
                        f"encoder has no patch embedding (its token cell is its total stride {stride}³)")
    if settings.drop_path_rate:
        # dynamic-network-architectures' U-Nets have no stochastic-depth argument, so the rate would
        # be silently ignored; the network that is fine-tuned downstream has none either
        problems.append(f"model.drop_path_rate={settings.drop_path_rate} is not supported by {name} "
                        f"({network_class} has no stochastic depth); set it to 0")
    if len(patch_size) != 3 or any(p < stride or p % stride for p in patch_size):
        problems.append(f"patch size {tuple(patch_size)} must be a positive multiple of {name}'s total stride "
                        f"{stride} on every axis (one token per bottleneck cell)")
    return problems
