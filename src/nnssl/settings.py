"""Typed, nested configuration objects: built from plain data, overridden by dotted paths, compared.

Every setting of a run lives in a frozen dataclass that validates itself in `__post_init__`
(a section such as `MaskConfig` or `IJEPAConfig` is declared once, next to the code that uses
it). This module is the generic part: it turns JSON-like data into those dataclasses and back,
applies `section.field=value` overrides (`nnssl_train --set ijepa.ema_start=0.99`), and lists
the differences between two configurations (`--c` with other settings). Problems are collected
over the whole input and raised together, so a user fixes a typo list in one round, not one
error per run.

Values are coerced by the declared field types: JSON lists become tuples, integers are accepted
where floats are declared, `null` only where `None` is allowed; nothing else is converted
silently (`"1e-3"` for a float is an error, `1.5` for an int is an error).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from nnssl.errors import InvalidInput

T = TypeVar("T")


class ConfigError(InvalidInput):
    """Configuration data that cannot be turned into the typed config; lists every problem."""


def is_config(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj)


def to_plain(obj: Any) -> Any:
    """A dataclass (nested) as JSON-safe data: tuples become lists, sections become dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted path of a config class (leaves only), in declaration order."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_section(tp):
            out += field_paths(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """`value` as type `tp`, or the value unchanged with a problem recorded."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            problems.append(f"{path}: null is not allowed (expected {_type_name(tp)})")
            return value
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            coerced = _coerce(value, option, path, trial)
            if not trial:
                return coerced
        problems.append(f"{path}: {value!r} is not a {_type_name(tp)}")
        return value
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        problems.append(f"{path}: {value!r} must be one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: {value!r} must be a list")
            return value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value))
        if len(value) != len(args):
            problems.append(f"{path}: {list(value)!r} must have {len(args)} entries")
            return tuple(value)
        return tuple(_coerce(v, a, f"{path}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: {value!r} must be an object")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: {value!r} must be a list")
            return value
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if _is_section(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            problems.append(f"{path}: {value!r} must be an object with the fields of {tp.__name__}")
            return value
        return _build(tp, value, f"{path}.", problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{path}: {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            problems.append(f"{path}: {value!r} must be an integer")
            return value
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: {value!r} must be a number")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: {value!r} must be a string")
        return value
    return value


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _build(cls: Any, data: Mapping[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    start = len(problems)
    for key, value in data.items():
        if key not in names:
            problems.append(f"{prefix}{key}: unknown setting{_suggest(key, names)}")
            continue
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", problems)
    if len(problems) > start:  # a bad value or unknown key: the constructor would only add noise
        return None
    try:
        return cls(**kwargs)
    except (InvalidInput, TypeError, ValueError) as e:  # sections list their problems in `.problems`
        section = prefix.rstrip(".") or cls.__name__
        problems += [f"{section}: {p}" for p in (getattr(e, "problems", None) or [str(e)])]
    return None


def from_dict(cls: type[T], data: Mapping[str, Any], what: str = "configuration") -> T:
    """Build `cls` from nested plain data; raises `ConfigError` listing every problem."""
    problems: list[str] = []
    result = _build(cls, data, "", problems)
    if problems or result is None:
        raise ConfigError(f"invalid {what}:", problems or [f"cannot build {cls.__name__}"])
    return result


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, lists, true/false/null), else the
    string itself (so `loss=l1` needs no quotes)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`["ijepa.ema_start=0.99", "mask.num_targets=3"]` -> {"ijepa.ema_start": 0.99, ...}."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            problems.append(f"{item!r} is not PATH=VALUE (e.g. ijepa.ema_start=0.99)")
            continue
        out[path.strip()] = parse_value(text.strip())
    if problems:
        raise ConfigError("invalid --set:", problems)
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (lists and leaves kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(config: T, overrides: Mapping[str, Any], what: str = "overrides") -> T:
    """A copy of `config` with dotted-path `overrides` applied (nested dicts are flattened
    first), validated as a whole; raises `ConfigError` listing every unknown path and bad value."""
    if not overrides:
        return config
    flat = flatten(overrides)
    valid = field_paths(type(config))
    sections = {p.rsplit(".", 1)[0] for p in valid if "." in p}
    problems = []
    data = to_plain(config)
    for path, value in flat.items():
        if path not in valid:
            hint = " (a section: set one of its fields, e.g. " + next(p for p in valid if p.startswith(path + ".")) \
                + ")" if path in sections else _suggest(path, valid)
            problems.append(f"{path}: unknown setting{hint}")
            continue
        node = data
        *parents, leaf = path.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    _build(type(config), data, "", problems)  # value problems of the known paths, reported with the unknown ones
    if problems:
        raise ConfigError(f"invalid {what}:", problems)
    return from_dict(type(config), data, what)


def differences(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """(dotted path, old value, new value) for every leaf that differs; a path missing on one
    side shows `None` there."""
    a, b = flatten(to_plain(old) if is_config(old) else old), flatten(to_plain(new) if is_config(new) else new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
