"""One source of truth, through the CLI: the plans' geometry is what trains, `-p` picks other plans,
`--set` / `--config` reach any setting and are recorded, `--print_config` shows the result, and
`--c` refuses another configuration with the differing fields listed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nnssl.cli.train import main as train_main

TRAINER = "IJEPATrainer_Tiny_1ep_2it"


@pytest.fixture
def own_preprocessed(prepared, tmp_path, monkeypatch) -> Path:
    """A private copy of the shared preprocessed dataset whose plans the test may edit."""
    pre = tmp_path / "pre"
    shutil.copytree(prepared / "nnssl_preprocessed", pre)
    monkeypatch.setenv("nnssl_raw", str(prepared / "nnssl_raw"))
    monkeypatch.setenv("nnssl_preprocessed", str(pre))
    monkeypatch.setenv("nnssl_results", str(tmp_path / "results"))
    return pre / "Dataset900_Phantoms"


def _edit_plans(dataset: Path, name: str, patch: list[int], batch: int, source: str = "nnsslPlans") -> None:
    plans = json.loads((dataset / f"{source}.json").read_text())
    plans["plans_name"] = name
    plans["configurations"]["onemmiso"].update(patch_size=patch, batch_size=batch)
    (dataset / f"{name}.json").write_text(json.dumps(plans))


def _run_folder(plans: str = "nnsslPlans", trainer: str = TRAINER) -> Path:
    import os

    return Path(os.environ["nnssl_results"]) / "Dataset900_Phantoms" / f"{trainer}__{plans}__onemmiso"


def test_editing_the_plans_patch_size_changes_what_is_trained(own_preprocessed, capsys):
    _edit_plans(own_preprocessed, "nnsslPlans", [40, 32, 24], 2)  # anisotropic, multiples of 8
    args = ["900", "-tr", TRAINER, "-np", "0", "-device", "cpu", "--set", "mask.num_targets=2",
            "ijepa.ema_start=0.99"]
    assert train_main(args + ["--stop_at_step", "1"]) == 3
    run = _run_folder()
    recorded = json.loads((run / "fold_all" / "training_config.json").read_text())["trainer"]
    assert recorded["patch_size"] == [40, 32, 24] and recorded["batch_size"] == 2
    assert recorded["mask"]["num_targets"] == 2 and recorded["ijepa"]["ema_start"] == 0.99
    config_file = json.loads((run / "fold_all" / "training_config.json").read_text())
    assert recorded["loader"]["augment_on_device"] is None and config_file["augment_on_device"] is False  # auto, CPU
    assert json.loads((run / "adaptation_plan.json").read_text())["recommended_downstream_patchsize"] == [40, 32, 24]
    log = next((run / "fold_all").glob("training_log_*.txt")).read_text()
    assert "patch size [40, 32, 24] from nnsslPlans.json (onemmiso)" in log
    checkpoint = torch.load(run / "fold_all" / "checkpoint_latest.pth", weights_only=True)
    assert checkpoint["training_config"] == recorded
    # --c with other settings refuses and lists what differs
    capsys.readouterr()
    assert train_main(args[:-1] + ["ijepa.ema_start=0.98", "--c"]) == 2
    err = capsys.readouterr().err
    assert "ijepa.ema_start: checkpoint 0.99, this run 0.98" in err and "mask.num_targets" not in err
    assert train_main(args + ["--c"]) == 0  # the same settings resume


def test_plans_name_and_trainer_override_and_config_file(own_preprocessed, tmp_path, capsys):
    _edit_plans(own_preprocessed, "bigPatchPlans", [48, 48, 48], 3)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"optim": {"peak_lr": 0.002}, "mask.min_keep": 3}))
    trainer = "IJEPATrainer_Tiny_P32_1ep_1it"
    # augmentation on the training device, here the CPU: the device path inside the real loop
    assert train_main(["900", "-tr", trainer, "-p", "bigPatchPlans", "-np", "0", "-device", "cpu",
                       "--config", str(settings), "--set", "loader.augment_on_device=true"]) == 0
    fold = _run_folder("bigPatchPlans", trainer) / "fold_all"
    config_file = json.loads((fold / "training_config.json").read_text())
    recorded = config_file["trainer"]
    assert recorded["loader"]["augment_on_device"] is True and config_file["augment_on_device"] is True
    assert recorded["patch_size"] == [32, 32, 32] and recorded["batch_size"] == 3  # name wins, plan fills
    assert recorded["optim"]["peak_lr"] == 0.002 and recorded["mask"]["min_keep"] == 3
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "patch size [32, 32, 32] set by the trainer overrides bigPatchPlans.json (onemmiso)'s [48, 48, 48]" in log


def test_print_config_resolves_name_overrides_and_plan_then_exits(own_preprocessed, capsys):
    assert train_main(["900", "-tr", "MAETrainer_Tiny", "--set", "mae.mask_ratio=0.6", "--print_config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mae"]["mask_ratio"] == 0.6 and printed["optim"]["betas"] == [0.9, 0.98]
    planned = json.loads((own_preprocessed / "nnsslPlans.json").read_text())["configurations"]["onemmiso"]
    assert printed["patch_size"] == planned["patch_size"] and printed["batch_size"] == planned["batch_size"]
    assert not _run_folder(trainer="MAETrainer_Tiny").exists()  # nothing trained, nothing written


def test_bad_overrides_are_all_reported_before_any_data_is_read(no_nnssl_roots, capsys):
    assert train_main(["-tr", TRAINER, "--set", "ijepa.ema_strat=0.9", "optim.peak_lr=fast", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "PATH=VALUE" in err
    assert train_main(["-tr", TRAINER, "--set", "ijepa.ema_strat=0.9", "optim.peak_lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "did you mean ijepa.ema_start" in err and "'fast' must be a number" in err
