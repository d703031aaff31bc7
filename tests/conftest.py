"""Shared fixtures: isolated nnssl roots per test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Roots:
    raw: Path
    preprocessed: Path
    results: Path


@pytest.fixture
def nnssl_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Roots:
    """Point nnssl_raw / nnssl_preprocessed / nnssl_results at fresh folders."""
    roots = Roots(tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results")
    for name, path in (("nnssl_raw", roots.raw), ("nnssl_preprocessed", roots.preprocessed),
                       ("nnssl_results", roots.results)):
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    return roots


@pytest.fixture
def no_nnssl_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("nnssl_raw", "nnssl_preprocessed", "nnssl_results"):
        monkeypatch.delenv(name, raising=False)
