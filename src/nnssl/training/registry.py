"""Trainer names resolved into typed configurations, without one class per variant.

A trainer name is a method followed by suffixes in any order, e.g. `IJEPATrainer_BS8`,
`IJEPATrainer_Tiny_P32_BS2_2ep_5it`. The reference nnssl wrote ~270 subclasses for such
variants (some silently ignoring their batch size); here the name is parsed once, every
suffix is validated, and the result is a `TrainerSpec` whose `config` is the complete set of
hyperparameters that training will use (written as JSON next to the results).

Grammar (case-sensitive, separated by `_`):

| suffix          | meaning                                   | example |
|-----------------|-------------------------------------------|---------|
| backbone tag    | PrimusS, PrimusB, PrimusM (default), PrimusL, Tiny | `_PrimusL` |
| `BS<N>`         | global batch size (split across GPUs)     | `_BS8`  |
| `<N>ep`         | number of epochs                          | `_1000ep` |
| `<N>it`         | iterations (optimizer steps) per epoch    | `_250it` |
| `P<N>`          | cubic patch size in voxels                | `_P160` |
| `lr<X>`         | peak learning rate (a float)              | `_lr1e-3` |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from nnssl.errors import NnsslError
from nnssl.training.config import BACKBONES, METHODS, TrainingConfig

_NUMERIC_SUFFIXES: dict[str, tuple[re.Pattern[str], str]] = {
    "batch_size": (re.compile(r"^BS(\d+)$"), "BS<N>"),
    "num_epochs": (re.compile(r"^(\d+)ep$"), "<N>ep"),
    "iterations_per_epoch": (re.compile(r"^(\d+)it$"), "<N>it"),
    "patch_size": (re.compile(r"^P(\d+)$"), "P<N>"),
}
# a decimal or scientific float: lr0.001, lr1e-3, lr3.5e-4 (no sign: learning rates are positive)
_LR_SUFFIX = re.compile(r"^lr(\d+(?:\.\d+)?(?:e-?\d+)?)$")


class UnknownTrainer(NnsslError):
    """A trainer name that the registry cannot resolve; the message lists what is valid."""


@dataclass(frozen=True)
class TrainerSpec:
    name: str
    method: str
    backbone: str
    config: TrainingConfig


def grammar_help() -> str:
    """Human-readable list of methods and suffixes (for errors and `--list_trainers`)."""
    lines = ["Trainer names: <method>[_<suffix>...], suffixes in any order, each at most once.",
             "Methods:"]
    lines += [f"  {m:<16} {desc}" for m, desc in METHODS.items()]
    lines.append("Backbone tags (default PrimusM):")
    lines += [f"  {b:<16} {desc}" for b, desc in BACKBONES.items()]
    lines += [
        "Numeric suffixes:",
        "  BS<N>            global batch size, split across GPUs (e.g. BS8)",
        "  <N>ep            epochs (e.g. 1000ep)",
        "  <N>it            iterations per epoch (e.g. 250it)",
        "  P<N>             cubic patch size in voxels, a multiple of 8 (e.g. P160)",
        "  lr<X>            peak learning rate (e.g. lr1e-3, lr0.0005)",
        "Examples: IJEPATrainer, IJEPATrainer_BS8, IJEPATrainer_PrimusL_BS16_500ep,",
        "          IJEPATrainer_Tiny_P32_BS2_2ep_5it (trains on a CPU in seconds)",
    ]
    return "\n".join(lines)


def resolve_trainer(name: str) -> TrainerSpec:
    """Parse `name` into a validated `TrainerSpec`, or raise `UnknownTrainer` saying why."""
    parts = name.strip().split("_")
    method = parts[0]
    if method not in METHODS:
        raise UnknownTrainer(f"unknown trainer method {method!r} in {name!r}.\n{grammar_help()}")
    backbone: str | None = None
    numbers: dict[str, int] = {}
    floats: dict[str, float] = {}
    for part in parts[1:]:
        if part in BACKBONES:
            if backbone is not None:
                raise UnknownTrainer(f"{name!r} names two backbones ({backbone}, {part}); pick one")
            backbone = part
            continue
        lr = _LR_SUFFIX.match(part)
        if lr:
            if "peak_lr" in floats:
                raise UnknownTrainer(f"{name!r} gives lr<X> twice")
            floats["peak_lr"] = float(lr.group(1))
            continue
        for field_name, (pattern, label) in _NUMERIC_SUFFIXES.items():
            m = pattern.match(part)
            if m:
                if field_name in numbers:
                    raise UnknownTrainer(f"{name!r} gives {label} twice")
                numbers[field_name] = int(m.group(1))
                break
        else:
            raise UnknownTrainer(f"unknown suffix {part!r} in trainer name {name!r}.\n{grammar_help()}")
    backbone = backbone or "PrimusM"
    config = TrainingConfig.for_backbone(method, backbone)
    if "patch_size" in numbers:
        p = numbers.pop("patch_size")
        numbers_patch = (p, p, p)
        config = replace(config, patch_size=numbers_patch)
    config = replace(config, trainer_name=name, **numbers, **floats)
    problems = config.problems()
    if problems:
        raise UnknownTrainer(f"trainer {name!r} resolves to an invalid configuration:\n"
                             + "\n".join(f"  - {p}" for p in problems))
    return TrainerSpec(name=name, method=method, backbone=backbone, config=config)


def example_trainer_names() -> list[str]:
    """Names shown by `nnssl_train --list_trainers` and exercised by the tests."""
    names = []
    for method in METHODS:
        names.append(method)
        names += [f"{method}_{b}" for b in BACKBONES]
        names += [f"{method}_BS8", f"{method}_BS16", f"{method}_Tiny_P32_BS2_2ep_5it"]
    return names
