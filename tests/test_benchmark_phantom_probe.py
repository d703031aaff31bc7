"""Smoke test of benchmarks/phantom_probe.py at a tiny size: it runs and its JSON is consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "phantom_probe.py"


def test_phantom_probe_benchmark_reports_both_probes_per_seed_and_their_verdicts(tmp_path):
    """On a small paired-organ set (not a protocol set): dense and volume scores of every
    training seed, the random references, margins that are pretrained minus the reference mean."""
    from nnssl.data.phantom_files import write_phantom_collection
    from nnssl.data.phantoms import PhantomConfig

    labeled = tmp_path / "paired"
    write_phantom_collection(labeled, PhantomConfig(num_volumes=8, shape=(48, 48, 48), modality="MR",
                                                    anisotropic=False, random_orientation=False, num_classes=2,
                                                    paired_organs=True, seed=2))
    done = subprocess.run([sys.executable, str(BENCH), "--trainer", "IJEPATrainer_Tiny_P32_BS2", "--seeds", "0", "1",
                           "--random_seeds", "0", "1", "--steps", "3", "--corpus_volumes", "4", "--jobs", "2",
                           "--set", "ijepa.sigreg_weight=0.05", "--labeled", str(labeled),
                           "--export_dir", str(tmp_path / "exports")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["overrides"] == {"ijepa.sigreg_weight": 0.05} and result["labeled_set"] == str(labeled)
    for probe in ("dense", "volume"):
        entry = result[probe]
        assert set(entry["pretrained"]) == {"0", "1"} and len(entry["random_init"]) == 2
        reference = sum(entry["random_init"]) / 2
        assert entry["verdict"]["helps"] is None  # two training seeds: too few for a verdict
        for seed, score in entry["pretrained"].items():
            assert entry["verdict"]["margins"][seed] == pytest.approx(score - reference, abs=1e-3)
    assert {"token_rankme", "cos_across"} <= set(result["collapse"]["0"])
    for seed in (0, 1):  # the nnU-Net-ready folders of both seeds
        assert (tmp_path / "exports" / f"seed_{seed}" / "checkpoint_final.pth").is_file()
    # the non-linear diagnostic reads the same exports and set: linear and tree scores per encoder
    exports = [str(tmp_path / "exports" / f"seed_{seed}" / "checkpoint_final.pth") for seed in (0, 1)]
    done = subprocess.run([sys.executable, str(BENCH.parent / "dense_probe_nonlinear.py"), "--checkpoints", *exports,
                           "--labeled", str(labeled), "--random_seeds", "0", "--max_iter", "5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)["scores"]
    assert set(scores) == {*(f"pretrained:{e}" for e in exports), "random:0"}
    # the linear score is the protocol's, as phantom_probe.py reported it
    assert scores[f"pretrained:{exports[0]}"]["linear"] == pytest.approx(result["dense"]["pretrained"]["0"], abs=1e-3)
    assert all(0 <= s["trees"] <= 1 for s in scores.values())


def test_phantom_probe_benchmark_rejects_a_bad_override_or_a_missing_crop():
    done = subprocess.run([sys.executable, str(BENCH), "--set", "optim.peak_lr=-1", "--labeled", "x"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "peak_lr" in done.stderr
    done = subprocess.run([sys.executable, str(BENCH), "--trainer", "IJEPATrainer_Tiny", "--labeled", "x"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "_P<N>_BS<N>" in done.stderr
