"""benchmarks/finetune_nnunet.py: the smoke mode through nnU-Net master's real client, and its
refusals. The smoke run's numbers mean nothing (a few iterations); what is checked is that every
arm and seed trained through nnU-Net's trainer, loaded (or, for scratch, did not load) the
encoder, was predicted on every test case and scored, and that the JSON reports it all. No margin
is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "finetune_nnunet.py"
CLIENT = ROOT.parent / "shared" / "tools" / "nnunet_client"
sys.path.insert(0, str(BENCH.parent))
import finetune_nnunet  # noqa: E402


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_smoke_run_fine_tunes_every_arm_and_seed_with_nnunets_trainer(tmp_path):
    if not (CLIENT / "setup.sh").is_file():
        pytest.skip(f"{CLIENT} not found: the benchmark fine-tunes with nnU-Net master's real client "
                    "(../shared/tools/nnunet_client next to the repository); CI has it")
    out = tmp_path / "run"
    done = _run("--pretrain", "ijepa=IJEPATrainer_Tiny_P32_BS8", "--pretrain_steps", "2", "--smoke", "-o", str(out),
                timeout=900)  # building the client once takes about a minute; the run itself well under one
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    smoke = finetune_nnunet.SMOKE
    assert result["protocol"]["name"] == "smoke" and result["protocol"]["seeds"] == list(smoke.seeds)
    assert result["nnunet_trainer"] == f"PretrainedTrainer_Primusx_{smoke.epochs}ep_{smoke.iterations_per_epoch}it"
    assert result["pretraining"]["ijepa"]["steps"] == 2 and result["pretraining"]["ijepa"]["corpus"]["seed"] == 300
    assert set(result["results"]) == {"ijepa", "scratch"}
    for arm, entry in result["results"].items():
        assert set(entry["seeds"]) == {str(s) for s in smoke.seeds}
        for seed, run in entry["seeds"].items():
            assert set(run["dice"]) == {"twin_landmark_side", "twin_other_side"}
            values = [*run["dice"].values(), run["mean_dice"], run["twins_union_dice"]]
            assert all(math.isfinite(v) and 0 <= v <= 1 for v in values), (arm, seed, run)
            assert run["loaded_pretrained_encoder"] == (arm != "scratch")
            assert math.isfinite(run["final_train_loss"]) and run["train_seconds"] > 0
            # one rate for every arm (PretrainedTrainer_Primusx's from-scratch one); nnU-Net's own choice kept
            assert run["initial_lr"] == 3e-4 and run["nnunet_initial_lr"] == (3e-4 if arm == "scratch" else 1e-4)
            folder = out / "nnunet" / "nnUNet_results" / finetune_nnunet.DATASET_NAME
            predictions = list(folder.glob(f"*__seed{seed}__3d_fullres/fold_all/test_predictions/test_*.nii.gz"))
            assert len([p for p in predictions if ("from_scratch" in str(p)) == (arm == "scratch")]) == smoke.num_test
        assert entry["worst_seed_mean_dice"] == min(round(r["mean_dice"], 4) for r in entry["seeds"].values())
    margin = result["results"]["ijepa"]["margin_over_scratch"]
    scratch_mean = result["results"]["scratch"]["mean_dice"]
    for seed, run in result["results"]["ijepa"]["seeds"].items():
        assert margin["per_seed"][seed] == pytest.approx(run["mean_dice"] - scratch_mean, abs=2e-4)
    assert "margin_over_scratch" not in result["results"]["scratch"]
    assert result["wall_seconds"]["total"] > result["wall_seconds"]["fine_tuning_and_test"] > 0
    assert json.loads((out / "finetune_result.json").read_text()) == result


def _export(folder: Path, **overrides) -> Path:
    from nnssl.api import Pretrainer

    torch.manual_seed(0)
    pretrainer = Pretrainer("MAETrainer_Tiny_P32_BS2", overrides=overrides)
    pretrainer.fit(torch.randn(2, 1, 32, 32, 32).numpy(), steps=1)
    return pretrainer.export(folder)


def test_arms_of_different_architectures_are_refused_naming_both(tmp_path):
    small = _export(tmp_path / "small")
    other = tmp_path / "other.pth"
    checkpoint = torch.load(small / "checkpoint_final.pth", weights_only=True)
    checkpoint["nnssl_adaptation_plan"]["architecture_plans"]["arch_kwargs"]["encoder_eva_depth"] = 3
    torch.save(checkpoint, other)
    arms = {name: finetune_nnunet.checkpoint_file(name, str(path)) for name, path in (("a", small), ("b", other))}
    with pytest.raises(SystemExit, match="do not share one architecture") as error:
        finetune_nnunet.check_one_architecture(arms)
    assert str(small / "checkpoint_final.pth") in str(error.value) and str(other) in str(error.value)
    assert finetune_nnunet.check_one_architecture({"a": arms["a"]}) == "PretrainedTrainer_Primusx"


@pytest.mark.parametrize("args, message", [
    ((), "at least one --arm"),
    (("--arm", "scratch=/nowhere"), "not 'scratch'"),
    (("--arm", "a__b=/nowhere"), "single underscores"),
    (("--arm", "ok=/nowhere/at/all"), "does not exist"),
    (("--pretrain", "a=MAETrainer_Tiny", "--set", "b:optim.peak_lr=1"), "--pretrain arms"),
])
def test_bad_arguments_are_refused_before_any_work(args, message, monkeypatch, capsys, tmp_path):
    out = tmp_path / "never"
    monkeypatch.setattr(sys, "argv", ["finetune_nnunet.py", *args, "--client", "/nowhere/python", "-o", str(out)])
    with pytest.raises(SystemExit) as error:
        finetune_nnunet.main()
    assert message in f"{error.value}{capsys.readouterr().err}"
    assert not out.exists()


def _documented_commands() -> list[list[str]]:
    """The arguments of every `benchmarks/finetune_nnunet.py` line in the docs' code blocks and
    the script's docstring (continuation lines joined)."""
    import re
    import shlex

    texts = [p.read_text() for p in (ROOT / "documentation").glob("*.md")] + [finetune_nnunet.__doc__ or ""]
    commands = []
    for text in texts:
        for line in re.sub(r"\\\\?\n\s*", " ", text).splitlines():
            if "benchmarks/finetune_nnunet.py" in line and "python" in line:
                words = shlex.split(line.strip().strip("`"))
                commands.append(words[words.index(next(w for w in words if w.endswith("finetune_nnunet.py"))) + 1:])
    return commands


def test_the_documented_commands_parse():
    commands = _documented_commands()
    assert len(commands) >= 5  # the docstring's three, evaluation.md's two, benchmarks.md's
    for words in commands:
        args = finetune_nnunet.build_parser().parse_args(words)
        finetune_nnunet.parse_pairs(args.arm, "--arm")
        finetune_nnunet.parse_pairs(args.pretrain, "--pretrain")
