from __future__ import annotations

import subprocess
import sys

import pytest

from nnssl import paths
from nnssl.errors import AmbiguousDataset, DatasetNotFound, MissingEnvironmentVariable


def test_missing_root_names_variable_and_fix(no_nnssl_roots):
    with pytest.raises(MissingEnvironmentVariable) as e:
        paths.nnssl_raw()
    assert "nnssl_raw" in str(e.value) and "export nnssl_raw=" in str(e.value)


def test_empty_root_counts_as_missing(monkeypatch):
    monkeypatch.setenv("nnssl_results", "  ")
    with pytest.raises(MissingEnvironmentVariable, match="nnssl_results"):
        paths.nnssl_results()


def test_roots_are_read_lazily(nnssl_roots, monkeypatch, tmp_path):
    assert paths.nnssl_raw() == nnssl_roots.raw
    monkeypatch.setenv("nnssl_raw", str(tmp_path / "elsewhere"))
    assert paths.nnssl_raw() == tmp_path / "elsewhere"


def test_import_has_no_side_effects(tmp_path):
    # A fresh interpreter without the variables imports every top-level module silently.
    code = (
        "import importlib, pkgutil, nnssl\n"
        "for m in pkgutil.walk_packages(nnssl.__path__, 'nnssl.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_resolve_by_id_and_name(nnssl_roots):
    (nnssl_roots.raw / "Dataset745_OpenNeuro").mkdir()
    assert paths.resolve_dataset_name(745) == "Dataset745_OpenNeuro"
    assert paths.resolve_dataset_name("745") == "Dataset745_OpenNeuro"
    assert paths.resolve_dataset_name("Dataset745_OpenNeuro") == "Dataset745_OpenNeuro"
    assert paths.raw_dataset_dir(745) == nnssl_roots.raw / "Dataset745_OpenNeuro"


def test_resolve_finds_dataset_in_any_root(nnssl_roots):
    (nnssl_roots.preprocessed / "Dataset002_Brains").mkdir()
    assert paths.resolve_dataset_name(2) == "Dataset002_Brains"
    # the same name in two roots is one dataset, not an ambiguity
    (nnssl_roots.results / "Dataset002_Brains").mkdir()
    assert paths.resolve_dataset_name("2") == "Dataset002_Brains"


def test_resolve_ambiguous_lists_both(nnssl_roots):
    (nnssl_roots.raw / "Dataset001_A").mkdir()
    (nnssl_roots.preprocessed / "Dataset001_B").mkdir()
    with pytest.raises(AmbiguousDataset) as e:
        paths.resolve_dataset_name(1)
    assert "Dataset001_A" in str(e.value) and "Dataset001_B" in str(e.value)


def test_resolve_no_match(nnssl_roots):
    with pytest.raises(DatasetNotFound, match="Dataset003_"):
        paths.resolve_dataset_name(3)
    with pytest.raises(DatasetNotFound, match="neither a dataset id"):
        paths.resolve_dataset_name("abc")


def test_resolve_without_any_root(no_nnssl_roots):
    with pytest.raises(MissingEnvironmentVariable, match="nnssl_raw"):
        paths.resolve_dataset_name(5)


def test_dataset_folder_name_validation():
    assert paths.dataset_folder_name(7, "Phantoms") == "Dataset007_Phantoms"
    with pytest.raises(Exception, match="between 0 and 999"):
        paths.dataset_folder_name(1000, "X")
    with pytest.raises(Exception, match="letters, digits"):
        paths.dataset_folder_name(1, "bad name")
