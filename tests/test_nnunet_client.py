"""Every checkpoint we export, checked with nnU-Net master's real fine-tuning code.

The client is ../shared/tools/nnunet_client (relative to the repository root; CI has it): its
setup.sh builds nnU-Net master on top of this interpreter's packages once per session, and
tests/nnunet_client_driver.py runs all checks of check.py in one client process (one start and
one nnU-Net import instead of one per checkpoint). Without the folder these tests skip.

What is checked, for every backbone x method we export (I-JEPA and MAE on PrimusS/B/M/L, Tiny,
ResEncL, ResEncTiny), each exported with `nnssl_export`'s own code (`export()`):
- `--mode direct` with every trainer that nnU-Net's guide and our export name for it; the ones our
  export says cannot build it must fail in nnU-Net too, so the export never claims too little or
  too much;
- Workflow A's loader for ResEnc (every tensor compared), and its failure for ResEncTiny;
- `--mode full` (nnU-Net's planner, preprocess_like_nnssl / plan_like_dynamic, the trainer's
  initialize and one train_step) for Primus with PretrainedTrainer_Primusx and `-am
  like_pretrained`, ResEnc with PretrainedTrainer and `-am default_nnunet`, and ResEncL in
  Workflow A; the first also checks that the training log prints our citations;
- the model card's commands through nnU-Net's own argument parsers.

Tiny and ResEncTiny are trained for one step (real weights, real export). The big presets are
built on the meta device and their parameters filled with one constant each before the real
export code runs, so nothing is initialised twice and their checkpoints are a few kB (each
exported tensor is its constant expanded to the shape); what nnU-Net checks, the names, shapes
and the adaptation plan, are our export's, and a tensor loaded into the wrong place shows as a
different constant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from nnssl.checkpoints.format import save_checkpoint
from nnssl.checkpoints.handshake import adaptation_plan, citations
from nnssl.export.share import export
from nnssl.methods.factory import build_method
from nnssl.planning.plans import ConfigurationPlan, Plans
from nnssl.training.names import resolve_config

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT.parent / "shared" / "tools" / "nnunet_client"
DRIVER = Path(__file__).with_name("nnunet_client_driver.py")

METHODS = ("IJEPATrainer", "MAETrainer")
PRIMUS_PRESETS = ("PrimusS", "PrimusB", "PrimusM", "PrimusL")
TRAINED = ("Tiny", "ResEncTiny")  # trained for a step; the rest are built without training
PATCH = {"primus": 32, "resenc": 64}  # pretraining patch; Primus is fine-tuned at 48³ (LPE resized)
PRIMUS_TRAINERS = ("PretrainedTrainer_Primusx", "PretrainedTrainer_Primus", "PretrainedTrainer")


def _direct_jobs() -> list[dict]:
    """(id, backbone, method, mode, trainer, expected verdict) of every direct-mode check."""
    jobs = []
    for method in METHODS:
        for backbone in PRIMUS_PRESETS:
            for trainer in PRIMUS_TRAINERS:
                jobs.append({"backbone": backbone, "method": method, "mode": "direct", "trainer": trainer,
                             "patch": [48] * 3, "no_forward": backbone != "PrimusS", "expect": "PASS"})
        for trainer in PRIMUS_TRAINERS:  # only PrimusX builds custom sizes
            jobs.append({"backbone": "Tiny", "method": method, "mode": "direct", "trainer": trainer, "patch": [48] * 3,
                         "expect": "PASS" if trainer == "PretrainedTrainer_Primusx" else "FAIL"})
        for backbone in ("ResEncL", "ResEncTiny"):
            jobs.append({"backbone": backbone, "method": method, "mode": "direct", "trainer": "PretrainedTrainer",
                         "no_forward": backbone == "ResEncL", "expect": "PASS"})
            jobs.append({"backbone": backbone, "method": method, "mode": "dynamic_load",
                         "trainer": "DynamicPretrainedTrainer", "expect": "PASS" if backbone == "ResEncL" else "FAIL"})
    for job in jobs:
        job["id"] = f"{job['method']}_{job['backbone']}:{job['mode']}:{job['trainer']}"
    # backbone by backbone, so the driver reuses a preset network across trainers and methods
    return sorted(jobs, key=lambda j: (j["backbone"], j["mode"], j["trainer"], j["method"]))


FULL_JOBS = [
    {"id": "IJEPATrainer_Tiny:full:PretrainedTrainer_Primusx:like_pretrained", "backbone": "Tiny",
     "method": "IJEPATrainer", "mode": "full", "trainer": "PretrainedTrainer_Primusx",
     "adaptation_mode": "like_pretrained", "patch": [32] * 3, "citations": True, "expect": "PASS"},
    {"id": "MAETrainer_ResEncTiny:full:PretrainedTrainer:default_nnunet", "backbone": "ResEncTiny",
     "method": "MAETrainer", "mode": "full", "trainer": "PretrainedTrainer", "adaptation_mode": "default_nnunet",
     "expect": "PASS"},
    {"id": "IJEPATrainer_ResEncL:full:DynamicPretrainedTrainer:workflow_a", "backbone": "ResEncL",
     "method": "IJEPATrainer", "mode": "full", "trainer": "DynamicPretrainedTrainer", "workflow": "dynamic",
     "patch": [32] * 3, "expect": "PASS"},  # ResEnc-L's train step at 64³ alone takes 30 s on a busy CPU
]
DIRECT_JOBS = _direct_jobs()
# exports whose model-card commands are parsed by nnU-Net: one per kind of card
CARDS = ("IJEPATrainer_Tiny", "MAETrainer_ResEncTiny", "IJEPATrainer_ResEncL", "MAETrainer_PrimusM")


@pytest.fixture(scope="session")
def client_python() -> str:
    """The client's python, built by its setup.sh on top of this interpreter once; later sessions
    reuse it while it still sits on this interpreter's packages (setup.sh's own check of an
    existing build imports torch and nnU-Net twice, ~20 s on a busy 2-core machine)."""
    if not (CLIENT / "setup.sh").is_file():
        pytest.skip(f"{CLIENT} not found: the real nnU-Net client (../shared/tools/nnunet_client next to the "
                    "repository) is needed for these checks; CI has it")
    built = _built_client()
    if built is not None:
        return built
    proc = subprocess.run(["bash", str(CLIENT / "setup.sh"), sys.executable], capture_output=True, text=True,
                          timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        pytest.fail(f"building the nnU-Net client with {CLIENT / 'setup.sh'} {sys.executable} failed "
                    f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return lines[-1]


def _built_client() -> str | None:
    """The python of a client setup.sh already built for this interpreter, or None."""
    venv = Path(os.environ.get("NNUNET_CLIENT_DIR", "/tmp/nnunet_client")) / "venv"
    python = venv / "bin" / "python"
    ours = sysconfig.get_paths()["purelib"]
    for site in venv.glob("lib/python*/site-packages"):
        link = site / "zz_project_site.pth"
        if (python.is_file() and link.is_file() and repr(ours) in link.read_text()
                and any(site.glob("nnunetv2-*.dist-info"))):
            return str(python)
    return None


def _plans(patch: int) -> Plans:
    config = ConfigurationPlan(data_identifier="nnsslPlans_onemmiso", preprocessor_name="DefaultPreprocessor",
                               spacing_style="onemmiso", spacing=[1.0, 1.0, 1.0],
                               normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False],
                               resampling_fn_data="resample_data_or_seg_to_shape", resampling_fn_data_kwargs={},
                               resampling_fn_mask="resample_data_or_seg_to_shape", resampling_fn_mask_kwargs={},
                               patch_size=[patch] * 3)
    return Plans(dataset_name="Dataset900_Phantoms", plans_name="nnsslPlans",
                 original_median_spacing_after_transp=[1.0, 1.0, 1.0], image_reader_writer="SimpleITKIO",
                 transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2],
                 experiment_planner_used="nnssl.planning.planner.plan_experiment", configurations={"onemmiso": config},
                 normalization_per_modality={"T1w": {"scheme": "ZScoreNormalization"}})


def _trained(config):
    method = build_method(config)
    opt = torch.optim.AdamW(method.parameter_groups(0.04), lr=1e-3)
    x = torch.randn(2, 1, *config.patch_size)
    out = method.training_output(x, torch.zeros_like(x, dtype=torch.bool), 0)
    out.loss.backward()
    opt.step()
    method.after_optimizer_step(0, 0.9)
    return method, method.export_encoder_state_dict()


def _constants(config):
    """The method built without initialisation, every parameter / buffer one constant, then the
    real export; each exported tensor stored as its constant expanded to its shape.

    Such a stride-0 tensor is only sound where nnU-Net copies it into its own parameters
    (load_state_dict, the position-embedding resize). At the pretraining patch size nnU-Net
    instead makes the checkpoint's position embedding the parameter's storage, and an optimizer
    step then writes into one shared element (a heap corruption, measured); so these checkpoints
    are checked in direct mode at another patch size, and the full runs use trained ones (and
    ResEncL, which has no position embedding)."""
    with torch.device("meta"):
        method = build_method(config)
    method.to_empty(device="cpu")
    with torch.no_grad():
        for i, tensor in enumerate([*method.parameters(), *method.buffers()]):
            tensor.fill_(1e-3 * (i + 1))
    weights = method.export_encoder_state_dict()
    for key, value in weights.items():
        first = value.reshape(-1)[0]
        assert torch.equal(value, first.expand_as(value)), key
        weights[key] = first.clone().expand(value.shape)
    return method, weights


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """trainer name -> the folder `nnssl_export`'s `export()` wrote for it."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folders = {}
    try:
        for method_name in METHODS:
            for backbone in (*PRIMUS_PRESETS, "Tiny", "ResEncL", "ResEncTiny"):
                trainer = f"{method_name}_{backbone}"
                family = resolve_config(trainer).backbone_entry.family
                config = resolve_config(trainer, overrides={"patch_size": (PATCH[family],) * 3})
                method, weights = _trained(config) if backbone in TRAINED else _constants(config)
                folder = tmp_path_factory.mktemp(trainer)
                save_checkpoint(folder / "run.pth", {
                    "network_weights": weights,
                    "nnssl_adaptation_plan": adaptation_plan(method.backbone, _plans(config.patch_size[0]),
                                                             "onemmiso", 1),
                    "nnssl_backbone": method.backbone.to_dict(), "trainer_name": trainer,
                    "citations": citations(config.method, config.backbone), "training_config": config.to_dict(),
                    "step": 1, "epoch": 0})
                folders[trainer] = export(folder / "run.pth", folder / "export").folder
                del method, weights
    finally:
        torch.set_num_threads(threads)
    return folders


def _card_commands(markdown: Path) -> list[str]:
    """The nnUNetv2_* lines of a page's bash blocks, with a dataset id and fold filled in."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown.read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines() if line.startswith("nnUNetv2_")]
    return [line.replace("DATASET_ID", "987").replace(" FOLD ", " 0 ") for line in lines]


DOCS = (ROOT / "README.md", ROOT / "documentation" / "finetuning_nnunet.md")


def _docs_commands(checkpoint: Path) -> list[str]:
    """The README's and the fine-tuning page's commands, their example -pc paths pointing at a
    real export."""
    commands = [c for page in DOCS for c in _card_commands(page)]
    return [re.sub(r"-pc /data/\S+", f"-pc {checkpoint}", c) for c in commands]


@pytest.fixture(scope="module")
def results(client_python, exports, tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("nnunet_client")
    jobs = []
    for job in [*DIRECT_JOBS, *FULL_JOBS]:
        job = dict(job)
        job["checkpoint"] = str(exports[f"{job.pop('method')}_{job.pop('backbone')}"] / "checkpoint_final.pth")
        job.pop("expect")
        jobs.append(job)
    jobs += [{"id": f"{t}:parse", "mode": "parse", "commands": _card_commands(exports[t] / "README.md")}
             for t in CARDS]
    jobs.append({"id": "docs:parse", "mode": "parse",
                 "commands": _docs_commands(exports["IJEPATrainer_Tiny"] / "checkpoint_final.pth")})
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run([client_python, str(DRIVER), str(CLIENT), str(work / "jobs.json"), str(work / "results.json"),
                           str(work / "nnunet")], capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0 or not (work / "results.json").is_file():
        pytest.fail(f"the nnU-Net client driver failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return json.loads((work / "results.json").read_text())


def _explain(result: dict) -> str:
    return "\n".join(["nnU-Net's verdict:", *result["fails"], *result["notes"]])


@pytest.mark.parametrize("job", DIRECT_JOBS, ids=[j["id"] for j in DIRECT_JOBS])
def test_direct_build_and_load_in_nnunet(job, results, exports):
    """nnU-Net's trainer builds the network from our plan and its loader loads every encoder
    tensor, exactly when our export says that trainer works for this checkpoint."""
    result = results[job["id"]]
    assert result["verdict"] == job["expect"], _explain(result)
    support = json.loads((exports[f"{job['method']}_{job['backbone']}"] / "config.json").read_text())["finetuning"]
    if job["mode"] == "dynamic_load":
        claimed = support["workflow_a"]["supported"]
    else:
        claimed = job["trainer"] in support["workflow_b"]["trainers"] or (
            job["trainer"] == "PretrainedTrainer" and job["backbone"] in PRIMUS_PRESETS)  # builds it, CNN recipe
    assert claimed == (job["expect"] == "PASS"), support
    if job["expect"] == "FAIL":  # fails for the reason the export states
        assert (job["trainer"] in support["unsupported_trainers"]), support
        reason = "NotImplementedError" if job["mode"] == "direct" else "size mismatch"
        assert any(reason in f for f in result["fails"]), _explain(result)


@pytest.mark.parametrize("job", FULL_JOBS, ids=[j["id"] for j in FULL_JOBS])
def test_full_nnunet_workflow_plans_initialises_and_trains_a_step(job, results, exports):
    result = results[job["id"]]
    assert result["verdict"] == "PASS", _explain(result)
    if job.get("citations"):
        assert result["citations_in_log"], _explain(result)
    config = json.loads((exports[f"{job['method']}_{job['backbone']}"] / "config.json").read_text())
    commands = config["finetuning"]["commands"]
    workflow = "workflow_a" if job.get("workflow") == "dynamic" else "workflow_b"
    assert any(f"-tr {job['trainer']}" in line for line in commands[workflow]), commands  # the card's trainer


def test_the_docs_fine_tuning_commands_parse_in_nnunet(results):
    commands = [c for page in DOCS for c in _card_commands(page)]
    for needed in ("nnUNetv2_preprocess_like_nnssl", "nnUNetv2_plan_like_dynamic", "--from_scratch",
                   "-tr PretrainedTrainer_Primusx", "-tr DynamicPretrainedTrainer", "-am like_pretrained",
                   "-pc https://huggingface.co/"):
        assert any(needed in c for c in commands), needed
    assert results["docs:parse"]["verdict"] == "PASS", _explain(results["docs:parse"])


@pytest.mark.parametrize("trainer", CARDS)
def test_model_card_commands_parse_in_nnunet(trainer, results, exports):
    result = results[f"{trainer}:parse"]
    assert result["verdict"] == "PASS", _explain(result)
    commands = _card_commands(exports[trainer] / "README.md")
    assert any(c.startswith("nnUNetv2_train_pretrained") and "--from_scratch" in c for c in commands)
    assert all(Path(c.split(" -pc ")[1].split()[0]).is_absolute() for c in commands
               if " -pc " in c and "https://" not in c)
