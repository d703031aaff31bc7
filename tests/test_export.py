"""nnssl_export: the shared folder of a real (tiny) training run, and its handshake."""

from __future__ import annotations

import json

import pytest
import torch

from downstream_nnunet import load_like_nnunet
from nnssl.cli.export import main as export_main
from nnssl.training.names import resolve_config
from nnssl.training.options import RunOptions
from nnssl.training.run import train

TRAINER = "IJEPATrainer_Tiny_P32_BS2_1ep_3it"


@pytest.fixture
def run_folder(roots):
    train(RunOptions(device="cpu", num_workers=0, progress_bar=False), resolve_config(TRAINER))
    return roots / "Dataset900_Phantoms" / f"{TRAINER}__nnsslPlans__onemmiso"


def test_export_writes_a_complete_shareable_folder(run_folder, tmp_path, capsys):
    out = tmp_path / "shared"
    assert export_main([str(run_folder), "-o", str(out), "--safetensors"]) == 0
    assert "checkpoint_final.pth" in capsys.readouterr().out
    for name in ("checkpoint_final.pth", "adaptation_plan.json", "config.json", "README.md", "model.safetensors"):
        assert (out / name).is_file(), name
    slim = torch.load(out / "checkpoint_final.pth", weights_only=True)
    full = torch.load(run_folder / "fold_all" / "checkpoint_final.pth", weights_only=True)
    assert "optimizer_state" not in slim and "method_state" not in slim and "rng" not in slim
    assert slim["trainer_name"] == TRAINER and slim["citations"]
    assert all(torch.equal(v, full["network_weights"][k]) for k, v in slim["network_weights"].items())
    written = json.loads((out / "adaptation_plan.json").read_text())
    assert written == json.loads(json.dumps(full["nnssl_adaptation_plan"]))
    config = json.loads((out / "config.json").read_text())
    assert config["training_config"]["trainer_name"] == TRAINER and config["step"] == 3
    assert config["data_summary"]["dataset"] == "Dataset900_Phantoms"
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    for field in ("license: cc-by-4.0", "library_name: nnssl", "pipeline_tag: image-feature-extraction",
                  "base_architecture: PrimusX", "- medical", "- ijepa", "- primus"):
        assert field in front, field
    for section in ("## Model", "## Pretraining data", "## Method and hyperparameters", "## Training curve",
                    "## Fine-tune with nnU-Net", "### Normalisation", "## Publish", "## Citations",
                    "nnUNetv2_train_pretrained", "token_rankme", "--from_scratch", "hf upload ORG/REPO"):
        assert section in card, section
    # what nnU-Net can do with it, and only commands that work for this (Tiny = PrimusX) checkpoint
    support = config["finetuning"]
    assert support["workflow_b"]["trainers"] == ["PretrainedTrainer_Primusx"]
    assert not support["workflow_a"]["supported"] and "DynamicPretrainedTrainer" in support["unsupported_trainers"]
    assert set(support["unsupported_trainers"]) == {"PretrainedTrainer", "PretrainedTrainer_Primus",
                                                    "DynamicPretrainedTrainer"}
    assert support["normalization"]["matches"] == "workflow_b"
    assert set(support["normalization"]["pretraining"].values()) == {"ZScoreNormalization"}
    commands = [line for block in card.split("```bash")[1:] for line in block.split("```")[0].splitlines()
                if line.startswith("nnUNetv2_")]
    assert commands and all(c in card for c in support["commands"]["workflow_b"])
    assert all("-tr PretrainedTrainer_Primusx" in c for c in commands if c.startswith("nnUNetv2_train_pretrained"))
    assert not any("plan_like_dynamic" in c or "DynamicPretrainedTrainer" in c for c in commands)
    absolute = str(out.resolve() / "checkpoint_final.pth")
    assert f"-pc {absolute} " in card and f"-pc {absolute} " in " ".join(support["commands"]["workflow_b"])
    assert all(c["apa_citations"][0] in card for c in slim["citations"])
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == slim["network_weights"].keys()
    network, _ = load_like_nnunet(str(out / "checkpoint_final.pth"), 1, 2, (32, 32, 32))
    assert network(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_export_can_keep_the_whole_method_and_refuses_folders_without_checkpoints(run_folder, tmp_path, capsys):
    out = tmp_path / "full"
    assert export_main([str(run_folder / "fold_all" / "checkpoint_final.pth"), "-o", str(out),
                        "--include_method_state"]) == 0
    kept = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert any(k.startswith("predictor.") for k in kept["method_state"])
    assert export_main([str(tmp_path), "-o", str(tmp_path / "x")]) == 2
    assert "no checkpoint_final.pth or checkpoint_latest.pth" in capsys.readouterr().err


def test_export_rewrites_the_architecture_of_an_older_checkpoint_in_nnunet_masters_form(run_folder, tmp_path):
    """Checkpoints written before the plan took nnU-Net master's form named the Tiny Primus by its
    class path with the full constructor kwargs, which nnU-Net's trainers cannot build; exporting
    them again rebuilds the plan from `nnssl_backbone`."""
    old = torch.load(run_folder / "fold_all" / "checkpoint_final.pth", weights_only=True)
    described = old["nnssl_backbone"]
    old["nnssl_adaptation_plan"]["architecture_plans"] = {
        "arch_class_name": "dynamic_network_architectures.architectures.primus.Primus",
        "arch_kwargs": described["arch_kwargs"], "arch_kwargs_requiring_import": []}
    torch.save(old, tmp_path / "old.pth")
    assert export_main([str(tmp_path / "old.pth"), "-o", str(tmp_path / "out")]) == 0
    plan = json.loads((tmp_path / "out" / "adaptation_plan.json").read_text())
    assert plan["architecture_plans"]["arch_class_name"] == "PrimusX"
    assert plan["architecture_plans"]["arch_kwargs"]["encoder_eva_depth"] == described["arch_kwargs"]["eva_depth"]
    slim = torch.load(tmp_path / "out" / "checkpoint_final.pth", weights_only=True)
    assert slim["nnssl_adaptation_plan"] == plan and slim["nnssl_backbone"] == described
