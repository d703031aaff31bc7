"""Every runtime dependency in pyproject.toml is imported by src/ (an unused one is an extra, not a
requirement), and every third-party package src/ imports is declared (directly or, for torch's
own siblings, through a declared package)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# pins of transitive dependencies, commented in pyproject.toml: timm needs torchvision, and an
# unpinned one pulls a release built for another torch
TRANSITIVE_PINS = {"torchvision"}
IMPORT_NAMES = {"scikit-learn": "sklearn", "dynamic-network-architectures": "dynamic_network_architectures",
                "acvl-utils": "acvl_utils"}


def _declared() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip() for d in deps]
    return {n: IMPORT_NAMES.get(n.lower(), n.replace("-", "_")) for n in names}


def _imported() -> set[str]:
    found = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_every_runtime_dependency_is_used_by_src():
    imported = {m.lower() for m in _imported()}
    unused = [name for name, module in _declared().items()
              if module.lower() not in imported and name not in TRANSITIVE_PINS]
    assert not unused, f"declared but never imported by src/: {unused} (move them to an extra)"


def test_every_third_party_import_of_src_is_declared():
    declared = {m.lower() for m in _declared().values()}
    third_party = {m for m in _imported() if m != "nnssl" and m not in sys.stdlib_module_names}
    optional = {"wandb", "tensorboard"}  # used only when installed (training/logs.py says how)
    missing = sorted(m for m in third_party if m.lower() not in declared | optional)
    assert not missing, f"src/ imports undeclared packages: {missing}"
