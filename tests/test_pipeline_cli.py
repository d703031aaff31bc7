"""The whole pipeline as a user types it, every stage a separate command in a fresh process:
phantoms → dataset → plan_and_preprocess → nnssl_train (killed) → nnssl_train --c → nnssl_export
→ nnssl_evaluate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

TRAINER = "IJEPATrainer_Tiny_P32_BS2_6ep_2it"


def _run(module: str, *args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{module} {' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done


def test_pipeline_through_the_commands(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("nnssl_raw", "nnssl_preprocessed", "nnssl_results"):
        env[name] = str(tmp_path / name)
        (tmp_path / name).mkdir()
    bids, labeled = tmp_path / "bids", tmp_path / "labeled"
    gen = [sys.executable, "-c", "from nnssl.cli.dataset import generate_phantoms_main as m; raise SystemExit(m())"]
    for out, n, seed in ((bids, "8", "0"), (labeled, "16", "1")):
        done = subprocess.run([*gen, "-o", str(out), "--num_volumes", n, "--shape", "40", "40", "40", "--seed", seed],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    create = [sys.executable, "-c", "from nnssl.cli.dataset import create_dataset_main as m; raise SystemExit(m())"]
    done = subprocess.run([*create, "-i", str(bids), "-d", "901", "-n", "Cli"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pre = [sys.executable, "-c",
           "from nnssl.cli.preprocess import plan_and_preprocess_main as m; raise SystemExit(m())"]
    done = subprocess.run([*pre, "-d", "901", "-np", "1", "-npfp", "1"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    fold = tmp_path / "nnssl_results" / "Dataset901_Cli" / f"{TRAINER}__nnsslPlans__onemmiso" / "fold_all"
    train = subprocess.Popen([sys.executable, "-m", "nnssl.cli.train", "901", "onemmiso", "-tr", TRAINER,
                              "-p", "nnsslPlans", "-num_gpus", "1", "-np", "0", "-device", "cpu"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.monotonic()
    while not (fold / "checkpoint_latest.pth").exists():
        assert train.poll() is None, train.communicate()[0]
        assert time.monotonic() - start < 180
        time.sleep(0.02)
    train.send_signal(signal.SIGKILL)
    train.communicate(timeout=60)
    assert not (fold / "checkpoint_final.pth").exists()
    resumed = _run("nnssl.cli.train", "901", "-tr", TRAINER, "-np", "0", "-device", "cpu", "--c", env=env)
    assert "resuming" in resumed.stderr and "training finished at step 12" in resumed.stdout

    shared = tmp_path / "shared"
    _run("nnssl.cli.export", str(fold.parent), "-o", str(shared), env=env)
    assert torch.load(shared / "checkpoint_final.pth", weights_only=True)["step"] == 12
    _run("nnssl.cli.evaluate", str(shared / "checkpoint_final.pth"), "--labeled", str(labeled), "-o",
         str(tmp_path / "evaluation"), env=env)
    report = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert set(report["encoders"]) == {"pretrained", "random"}
    assert Path(tmp_path / "evaluation" / "evaluation.png").is_file()
