"""Trainer names and overrides resolved into one typed configuration, without one class per variant.

A trainer name is a registered method followed by suffixes in any order, e.g.
`IJEPATrainer_BS8`, `IJEPATrainer_Tiny_P32_BS2_2ep_5it`. The reference nnssl wrote ~270
subclasses for such variants (some silently ignoring their batch size); here the name is parsed
once and every suffix validated. Everything else is reachable without editing code:
`--config overrides.json` and `--set section.field=value` (`resolve_config`).

Precedence, later wins: `TrainingConfig` defaults < the method's defaults for the backbone's
family < the backbone family's defaults < the backbone's < the name's suffixes < `--config` <
`--set`. Patch and batch size that nothing sets come from the plans at training time.

| suffix          | meaning                                   | example |
|-----------------|-------------------------------------------|---------|
| backbone tag    | a registered backbone (default PrimusM)   | `_PrimusL`, `_ResEncL` |
| `BS<N>`         | global batch size (split across GPUs)     | `_BS8`  |
| `<N>ep`         | number of epochs                          | `_1000ep` |
| `<N>it`         | iterations (optimizer steps) per epoch    | `_250it` |
| `P<N>`          | cubic crop in voxels (overrides the plan) | `_P160` |
| `GA<N>`         | micro-batches per step and GPU            | `_GA4` |
| `lr<X>`         | peak learning rate (a float)              | `_lr1e-3` |
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnssl.errors import NnsslError
from nnssl.log import get_logger
from nnssl.methods.registry import get_method, list_methods
from nnssl.models.registry import get_backbone, list_backbones
from nnssl.settings import ConfigError, apply_overrides, flatten
from nnssl.training.config import TrainingConfig

logger = get_logger(__name__)
DEFAULT_BACKBONE = "PrimusM"

# Trainer names of the reference nnssl that users type, as our equivalents. The run folder keeps
# the name as typed, so a reference user's folders look as they expect; the log says what it is.
# (The reference's BaseMAETrainer fixes the patch at 160³; its default `nnsslTrainer` does not
# exist there, here it is the default method.)
REFERENCE_ALIASES: dict[str, str] = {
    "nnsslTrainer": "IJEPATrainer",
    "BaseMAETrainer": "MAETrainer_ResEncL_P160",
    "BaseMAETrainer_BS8": "MAETrainer_ResEncL_P160_BS8",
    "BaseEvaMAETrainer": "MAETrainer_PrimusM_P160",
    "BaseEvaMAETrainer_BS8": "MAETrainer_PrimusM_P160_BS8",
}

_NUMERIC_SUFFIXES: dict[str, tuple[re.Pattern[str], str]] = {
    "batch_size": (re.compile(r"^BS(\d+)$"), "BS<N>"),
    "num_epochs": (re.compile(r"^(\d+)ep$"), "<N>ep"),
    "iterations_per_epoch": (re.compile(r"^(\d+)it$"), "<N>it"),
    "patch_size": (re.compile(r"^P(\d+)$"), "P<N>"),
    "grad_accumulation": (re.compile(r"^GA(\d+)$"), "GA<N>"),
}
# the reference's image-quality subsets, e.g. BaseMAETrainer_BS8_IQS2_5 (score <= 2.5)
_REFERENCE_IQS = re.compile(r"_IQS(\d+)_(\d+)(?=_|$)")
# a decimal or scientific float: lr0.001, lr1e-3, lr3.5e-4 (no sign: learning rates are positive)
_LR_SUFFIX = re.compile(r"^lr(\d+(?:\.\d+)?(?:e-?\d+)?)$")


class UnknownTrainer(NnsslError):
    """A trainer name that cannot be resolved; the message lists what is valid."""


@dataclass(frozen=True)
class TrainerName:
    """A parsed trainer name: method, backbone and the settings its suffixes give."""

    name: str
    method: str
    backbone: str
    suffix_overrides: dict[str, Any]


def grammar_help() -> str:
    """Human-readable list of methods, backbones and suffixes (errors and `--list_trainers`)."""
    lines = ["Trainer names: <method>[_<suffix>...], suffixes in any order, each at most once.", "Methods:"]
    lines += [f"  {m.name:<16} {m.description}" for m in list_methods()]
    lines.append(f"Backbone tags (default {DEFAULT_BACKBONE}):")
    lines += [f"  {b.name:<16} {b.description}" for b in list_backbones()]
    lines += [
        "Numeric suffixes:",
        "  BS<N>            global batch size, split across GPUs (default: the plan's)",
        "  <N>ep            epochs (e.g. 1000ep)",
        "  <N>it            iterations per epoch (e.g. 250it)",
        "  P<N>             cubic crop in voxels (default: the plan's patch size)",
        "  GA<N>            gradient accumulation: N micro-batches per step and GPU (same update, less memory)",
        "  lr<X>            peak learning rate (e.g. lr1e-3, lr0.0005)",
        "Every other setting: --set SECTION.FIELD=VALUE or --config FILE.json (see --print_config).",
        "Examples: IJEPATrainer, IJEPATrainer_BS8, IJEPATrainer_PrimusL_BS16_500ep,",
        "          IJEPATrainer_Tiny_P32_BS2_2ep_5it (trains on a CPU in seconds)",
        "Reference nnssl names, accepted as their equivalents:",
    ]
    lines += [f"  {alias:<22} = {ours}" for alias, ours in REFERENCE_ALIASES.items()]
    return "\n".join(lines)


def _suggestions(name: str) -> str:
    iqs = _REFERENCE_IQS.search(name)
    if iqs:  # a setting here, not a name: say which
        threshold = f"{iqs.group(1)}.{iqs.group(2)}"
        return (f" The reference's _IQS{iqs.group(1)}_{iqs.group(2)} trainers keep the images whose image-quality "
                f"score is at most {threshold}; here that is a setting: -tr {name[:iqs.start()] + name[iqs.end():]} "
                f"--set loader.max_iqs={threshold} (documentation/openmind.md).")
    known = example_trainer_names() + list(REFERENCE_ALIASES)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def parse_trainer_name(name: str) -> TrainerName:
    """Split `name` into method, backbone and suffix settings, or raise `UnknownTrainer` saying why.
    A reference nnssl name (`REFERENCE_ALIASES`) is parsed as its equivalent."""
    name = name.strip()
    if name in REFERENCE_ALIASES:
        parsed = parse_trainer_name(REFERENCE_ALIASES[name])
        return TrainerName(name, parsed.method, parsed.backbone, parsed.suffix_overrides)
    parts = name.split("_")
    methods = {m.name for m in list_methods()}
    backbones = {b.name for b in list_backbones()}
    if parts[0] not in methods:
        raise UnknownTrainer(f"unknown trainer method {parts[0]!r} in {name!r}.{_suggestions(name)}\n"
                             f"{grammar_help()}")
    backbone: str | None = None
    settings: dict[str, Any] = {}
    for part in parts[1:]:
        if part in backbones:
            if backbone is not None:
                raise UnknownTrainer(f"{name!r} names two backbones ({backbone}, {part}); pick one")
            backbone = part
            continue
        lr = _LR_SUFFIX.match(part)
        if lr:
            if "optim.peak_lr" in settings:
                raise UnknownTrainer(f"{name!r} gives lr<X> twice")
            settings["optim.peak_lr"] = float(lr.group(1))
            continue
        for field_name, (pattern, label) in _NUMERIC_SUFFIXES.items():
            m = pattern.match(part)
            if m:
                if field_name in settings:
                    raise UnknownTrainer(f"{name!r} gives {label} twice")
                value = int(m.group(1))
                settings[field_name] = (value,) * 3 if field_name == "patch_size" else value
                break
        else:
            raise UnknownTrainer(f"unknown suffix {part!r} in trainer name {name!r}.{_suggestions(name)}\n"
                                 f"{grammar_help()}")
    return TrainerName(name, parts[0], backbone or DEFAULT_BACKBONE, settings)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A `--config` file: a JSON object of settings, nested by section or with dotted keys."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a JSON object of settings, got a {type(data).__name__}")
    return data


def resolve_config(name: str, config_file: Mapping[str, Any] | None = None,
                   overrides: Mapping[str, Any] | None = None) -> TrainingConfig:
    """The complete configuration of trainer `name` with a `--config` file's settings and then
    the `--set` overrides applied; validated as a whole (every problem listed). Patch and batch
    size stay None unless set: the plans fill them at training time (`with_geometry`)."""
    parsed = parse_trainer_name(name)
    if name.strip() in REFERENCE_ALIASES:
        logger.info("trainer %s (reference nnssl name) runs as %s", name, REFERENCE_ALIASES[name.strip()])
    method, backbone = get_method(parsed.method), get_backbone(parsed.backbone)
    for key in ("trainer_name", "method", "backbone"):
        for source, data in (("--config", config_file), ("--set", overrides)):
            if data and key in flatten(data):
                raise UnknownTrainer(f"{source} cannot change {key!r}: choose the method and backbone with the trainer "
                                     f"name (-tr), e.g. IJEPATrainer_ResEncL")
    config = TrainingConfig(trainer_name=name, method=parsed.method, backbone=parsed.backbone)
    user = {**flatten(config_file or {}), **flatten(overrides or {})}  # --set wins over --config
    layers = (("the method's defaults", method.defaults_for(backbone.family)),
              ("the backbone family's defaults", dict(backbone.family_entry.defaults)),
              ("the backbone's defaults", dict(backbone.defaults)),
              (f"trainer name {name!r}", parsed.suffix_overrides),
              ("settings (--config, --set)", user))
    try:
        for what, layer in layers:
            config = apply_overrides(config, layer, what)
    except ConfigError as e:
        raise UnknownTrainer(str(e)) from None
    problems = config.problems()
    if problems:
        raise UnknownTrainer(f"trainer {name!r} resolves to an invalid configuration:\n"
                             + "\n".join(f"  - {p}" for p in problems))
    return config


def example_trainer_names() -> list[str]:
    """Names shown by `nnssl_train --list_trainers` and exercised by the tests."""
    names = []
    for method in list_methods():
        names.append(method.name)
        names += [f"{method.name}_{b.name}" for b in list_backbones()]
        names += [f"{method.name}_BS8", f"{method.name}_BS16", f"{method.name}_Tiny_P32_BS2_2ep_5it"]
    return names


def registry_tables() -> dict[str, str]:
    """The markdown tables of registered methods and backbones (documentation/training.md embeds
    them; a test keeps the page equal to this output, so the docs cannot drift from the code)."""
    from nnssl.methods.registry import supported_families
    from nnssl.models.registry import list_families

    methods = ["| method | what it learns | backbone families | exported weights |", "|---|---|---|---|"]
    for m in list_methods():
        families = supported_families(m.name)
        shown = "any with a token encoder" if "*" in families else ", ".join(families)
        methods.append(f"| `{m.name}` ({m.display_name}) | {m.description.split(': ', 1)[-1]} | {shown} | "
                       f"{m.exports} |")
    backbones = ["| tag | family | description |", "|---|---|---|"]
    backbones += [f"| `{b.name}` | {b.family} | {b.description} |" for b in list_backbones()]
    families = ["| family | networks | token cell | token encoder (I-JEPA) |", "|---|---|---|---|"]
    from nnssl.models.registry import ModelSettings

    families += [f"| {f.name} | {f.display_name} | {'x'.join(map(str, f.cell_size(ModelSettings())))} voxels | "
                 f"{'yes' if f.token_encoder is not None else 'no: I-JEPA refuses it'} |" for f in list_families()]
    return {"methods": "\n".join(methods), "backbones": "\n".join(backbones), "families": "\n".join(families)}
