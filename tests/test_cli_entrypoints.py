"""Every console script declared in pyproject.toml imports and answers --help."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
SCRIPTS = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]


def _entry_point(name: str):
    module_name, func_name = SCRIPTS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        _entry_point(name)(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert name in out and "usage" in out


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_rejects_unknown_flags(name, capsys):
    with pytest.raises(SystemExit) as e:
        _entry_point(name)(["--definitely-not-a-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    # argparse reports either the unknown flag or the missing required arguments; never silence
    assert f"{name}: error:" in err


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_rejects_single_dash_prefixes(name, capsys):
    """`-n` must not silently mean `-np` (argparse expands single-dash prefixes otherwise)."""
    with pytest.raises(SystemExit) as e:
        _entry_point(name)(["-nu", "3", "-dev", "cpu"])
    assert e.value.code == 2
    assert f"{name}: error:" in capsys.readouterr().err
