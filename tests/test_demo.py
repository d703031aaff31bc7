"""`nnssl_demo --quick`: the README's main-job command in its shortened mode, as a new user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_quick_demo_runs_every_stage_and_reports_where_everything_is(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnssl_")}  # a fresh machine: no roots set
    done = subprocess.run([sys.executable, "-m", "nnssl.cli.demo", "-o", str(tmp_path / "demo"), "--quick",
                           "--steps", "60"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for stage in ("generate phantoms", "create dataset", "verify dataset integrity", "plan and preprocess",
                  "calibrate training budget", "pretrain I-JEPA (CPU)", "export", "evaluate against random init"):
        assert f"] {stage}:" in out, stage
    assert "Training loss (step: loss)" in out and "volume probe accuracy (layers)" in out
    trained = re.search(r"pretrain I-JEPA \(CPU\): (\d+) steps", out)
    assert trained and 10 <= int(trained.group(1)) <= 60, out  # --steps caps it (a busy CPU may fit fewer)
    # 48 labeled cases are too few for a verdict (the default demo probes 480)
    assert "Pretraining beats random initialisation on the probe: too few labeled cases to tell" in out
    for name in ("checkpoint", "progress.png", "exported folder", "evaluation.json", "evaluation.png"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert os.path.exists(line.split()[-1]), line
    assert f"export nnssl_results={tmp_path / 'demo' / 'nnssl_results'}" in out
