"""Shared fixtures: isolated nnssl roots per test."""

from __future__ import annotations

import os
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


@pytest.fixture
def one_thread():
    """Run a test's tiny tensor ops on one thread (faster and steadier on a shared 2-core CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ENV_NAMES = ("nnssl_raw", "nnssl_preprocessed", "nnssl_results")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """One preprocessed phantom dataset (Dataset900_Phantoms, 8 subjects of 40³ mm) shared by the
    training, export and evaluation tests: raw data under nnssl_raw/, plans and blosc2 arrays
    under nnssl_preprocessed/."""
    from nnssl.data.builders import create_dataset
    from nnssl.data.phantom_files import write_phantom_collection
    from nnssl.data.phantoms import PhantomConfig
    from nnssl.preprocessing.runner import plan_and_preprocess

    folder = tmp_path_factory.mktemp("prepared")
    saved = {k: os.environ.get(k) for k in ENV_NAMES}
    try:
        for name in ENV_NAMES:
            (folder / name).mkdir()
            os.environ[name] = str(folder / name)
        bids = folder / "nnssl_raw" / "Dataset900_Phantoms" / "bids"
        write_phantom_collection(bids, PhantomConfig(num_volumes=8, shape=(40, 40, 40), seed=0))
        create_dataset(bids, 900, "Phantoms", layout="bids")
        outcomes = plan_and_preprocess(["900"], configurations=("onemmiso",), num_processes=1,
                                       num_processes_fingerprint=1)
        assert all(o.ok for o in outcomes), outcomes
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return folder


@pytest.fixture
def roots(prepared, tmp_path, monkeypatch) -> Path:
    """The shared raw/preprocessed data and a fresh results folder for this test."""
    monkeypatch.setenv("nnssl_raw", str(prepared / "nnssl_raw"))
    monkeypatch.setenv("nnssl_preprocessed", str(prepared / "nnssl_preprocessed"))
    monkeypatch.setenv("nnssl_results", str(tmp_path / "results"))
    return tmp_path / "results"
