"""Smoke test of benchmarks/phantom_probe.py at a tiny size: it runs and its JSON is consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "phantom_probe.py"


def test_phantom_probe_benchmark_reports_margins_per_seed_and_readout(tmp_path):
    """Also the dense-probe protocol's scores and verdict (on a small paired-organ set, not a protocol set)."""
    from nnssl.data.phantom_files import write_phantom_collection
    from nnssl.data.phantoms import PhantomConfig

    labeled = tmp_path / "paired"
    write_phantom_collection(labeled, PhantomConfig(num_volumes=8, shape=(32, 32, 32), modality="MR",
                                                    anisotropic=False, random_orientation=False, num_classes=2,
                                                    paired_organs=True, seed=2))
    done = subprocess.run([sys.executable, str(BENCH), "--seeds", "0", "1", "--random_seeds", "0", "--steps", "3",
                           "--pretrain_volumes", "8", "--probe_volumes", "16", "--side", "32", "--jobs", "2",
                           "--set", "optim.peak_lr=0.001", "--paired_organs", "--dense_labeled", str(labeled)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    dense = result["dense"]
    assert dense["labeled_set"] == str(labeled) and len(dense["random_init"]["balanced_accuracy"]) == 10
    assert dense["verdict"]["helps"] is None  # two training seeds: too few for a verdict
    for seed in ("0", "1"):
        assert dense["verdict"]["margins"][seed] == pytest.approx(
            dense["pretrained"][seed] - dense["random_init"]["mean"], abs=2e-4)
    assert result["overrides"] == {"optim.peak_lr": 0.001} and result["probe_volumes"] == 16
    assert set(result["readouts"]) == {"mean", "layers"}
    for readout in result["readouts"].values():
        assert set(readout["pretrained"]) == {"0", "1"} and len(readout["random_init"]) == 1
        for seed, accuracy in readout["pretrained"].items():
            assert readout["margin"][seed] == pytest.approx(accuracy - readout["random_mean"], abs=2e-4)
        assert readout["margin_min"] == min(readout["margin"].values())


def test_phantom_probe_benchmark_rejects_an_unknown_override():
    done = subprocess.run([sys.executable, str(BENCH), "--seeds", "0", "--steps", "1", "--pretrain_volumes", "4",
                           "--probe_volumes", "8", "--side", "32", "--set", "optim.peak_lr=-1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "peak_lr" in done.stderr

