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
    assert "Training loss (step: loss)" in out and "Collapse warnings during training: " in out
    # the recipe's overrides reach the run, and both protocol probes are reported against random init
    assert "steps with ijepa.sigreg_weight=0.05" in out
    assert re.search(r"dense context probe .*: pretrained 0\.\d+ vs random 0\.\d+ .*points", out), out
    assert re.search(r"volume probe .*: pretrained 0\.\d+ vs random 0\.\d+ .*points", out), out
    trained = re.search(r"pretrain I-JEPA \(CPU\): (\d+) steps", out)
    assert trained and 10 <= int(trained.group(1)) <= 60, out  # --steps caps it (a busy CPU may fit fewer)
    # 48 labeled cases are too few for a verdict (the default demo probes 480)
    assert "Pretraining beats random initialisation: too few labeled cases to tell" in out
    for name in ("checkpoint", "progress.png", "exported folder", "evaluation.json"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert os.path.exists(line.split()[-1]), line
    assert f"export nnssl_results={tmp_path / 'demo' / 'nnssl_results'}" in out


def _evaluation(dense: float, volume: float, cases: int = 480) -> dict:
    score = lambda margin: {"pretrained": 0.5 + margin, "random_init": [0.5, 0.5], "random_mean": 0.5,  # noqa: E731
                            "random_spread": 0.0, "chance": 0.5, "margin": margin}
    return {"protocol": "dense-v1", "labeled_set": "test", "num_cases": cases, "random_seeds": [0, 1],
            "required_margin": 0.05, "dense": score(dense), "volume": score(volume),
            "collapse": {"pretrained": {"token_rankme": 80.0}, "random_mean": {"token_rankme": 50.0}}}


def test_the_demo_says_yes_only_when_both_probes_clear_the_margin_on_enough_cases(tmp_path):
    from nnssl.demo import DemoResult

    def answer(evaluation):
        result = DemoResult(roots={}, dataset="Dataset900_Phantoms", evaluation=evaluation)
        return result.pretraining_beats_random, result.format()

    yes, text = answer(_evaluation(0.06, 0.20))
    assert yes is True and "Pretraining beats random initialisation: yes (dense probe +6.0 points: yes" in text
    no, text = answer(_evaluation(0.01, 0.20))  # the volume probe alone does not carry the verdict
    assert no is False and "dense probe +1.0 points: no, volume probe +20.0 points: yes" in text
    assert answer(_evaluation(0.20, 0.04))[0] is False
    assert answer(_evaluation(0.20, 0.20, cases=48))[0] is None  # too few cases for one seed's margin


def test_collapse_warnings_are_read_from_the_training_log(tmp_path):
    from nnssl.demo import _collapse_warnings

    log = tmp_path / "training_log.txt"
    log.write_text("2026-12-06 16:15:18,096 INFO step 10/50: train_loss 1.0\n"
                   "2026-12-06 16:15:30,096 WARNING partial collapse warning at step 4: token RankMe 20.18 ...\n"
                   "2026-12-06 16:15:31,000 WARNING data_wait_fraction 0.6: the loader is the bottleneck\n")
    assert _collapse_warnings(log) == ["partial collapse warning at step 4: token RankMe 20.18 ..."]
