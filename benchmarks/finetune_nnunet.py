"""Does pretraining make nnU-Net's segmentation better? Fine-tuning with nnU-Net master's real trainer.

Each pretrained export (`--arm NAME=PATH`, or `--pretrain NAME=TRAINER` to pretrain one here) and
the same architecture from scratch are fine-tuned by nnU-Net master's own code on a small phantom
segmentation task whose labels need context, once per fine-tuning seed, and scored by Dice on a
separate test set. The protocol (`finetune-v1`: task, sets, schedule, metric) is fixed in
`PROTOCOL` and written down, with its reasons, in documentation/evaluation.md ("The fine-tuning
benchmark"). Prints one JSON object (also written to `-o`/finetune_result.json).

    .venv/bin/python benchmarks/finetune_nnunet.py -o /tmp/finetune \\
        --pretrain ijepa=IJEPATrainer_Tiny_P32_BS8_lr0.001 --pretrain mae=MAETrainer_Tiny_P32_BS8 --pretrain_steps 4500
    .venv/bin/python benchmarks/finetune_nnunet.py --arm ijepa=/data/exports/ijepa --arm mae=/data/exports/mae
    .venv/bin/python benchmarks/finetune_nnunet.py --pretrain ijepa=IJEPATrainer_Tiny_P32_BS8 --pretrain_steps 5 --smoke

The task: paired-organ MR phantoms (`nnssl.data.paired_organs`, the dense probe's anatomy); the
labels are the two twin organs of identical tissue, told apart only by which side the landmark
organ is on. 16 training cases, 128 test cases, generated with seeds no pretraining corpus and
no dense-probe set uses. nnU-Net's Workflow B (`preprocess_like_nnssl -am like_pretrained`), a
short-schedule subclass of the export's recommended trainer (`PretrainedTrainer_Primusx` for
Primus, `PretrainedTrainer` for CNNs), its augmentation, its sliding-window predictor and its
Dice. The nnU-Net half runs in the client python (benchmarks/_finetune_client.py); this file
prepares the data and the exports and summarises.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DRIVER = Path(__file__).with_name("_finetune_client.py")
CLIENT_TOOL = ROOT.parent / "shared" / "tools" / "nnunet_client"
DATASET_ID, DATASET_NAME = 951, "Dataset951_PairedTwins"
LABELS = {0: "background", 1: "twin_landmark_side", 2: "twin_other_side"}
SCRATCH = "scratch"
ARM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*$")  # part of nnU-Net plans and folder names


@dataclass(frozen=True)
class Protocol:
    """Every setting the numbers depend on; `finetune-v1` was fixed before any pretrained export
    was fine-tuned with it (documentation/evaluation.md)."""

    name: str = "finetune-v1"
    train_seed: int = 1800  # pretraining corpora use seeds <= 500, the dense-probe sets 1600 / 1700
    num_train: int = 16
    test_seed: int = 1900
    num_test: int = 128
    field_of_view: int = 48  # mm = voxels at 1 mm, as the dense-probe sets
    patch_size: int = 48  # the whole field of view: a twin and the landmark are always in one patch
    epochs: int = 12
    iterations_per_epoch: int = 100  # 1,200 steps of batch 2: scratch finds the twins (dev set)
    val_iterations_per_epoch: int = 2  # nnU-Net's pseudo Dice on training cases, logged only
    warmup_epochs: int = 2
    # every arm at the trainer's from-scratch rate (3e-4 for Primus): nnU-Net's lower rate for
    # pretrained weights (1e-4) is tuned for 250,000 steps and alone decides a ~1,000-step run
    learning_rate: str = "from_scratch"
    seeds: tuple[int, ...] = (0, 1, 2)
    adaptation_mode: str = "like_pretrained"


PROTOCOL = Protocol()
# seconds on 2 cores: tiny sets, a few iterations; for tests and trying the command
SMOKE = replace(PROTOCOL, name="smoke", num_train=4, num_test=2, epochs=1, iterations_per_epoch=2,
                val_iterations_per_epoch=1, warmup_epochs=1, seeds=(0, 1))
# the corpus `--pretrain` pretrains on: paired-organ MR phantoms like the task's, another seed
PRETRAIN_CORPUS = {"num_volumes": 256, "seed": 300}
SMOKE_CORPUS = {"num_volumes": 8, "seed": 300}


def phantom_config(num_volumes: int, seed: int, side: int):
    """The task's phantoms: the dense-probe protocol's generator settings with other seeds."""
    from nnssl.data.phantoms import PhantomConfig

    return PhantomConfig(num_volumes=num_volumes, shape=(side,) * 3, modality="MR", anisotropic=False,
                         random_orientation=False, num_classes=4, key_organ_scale=1.0, paired_organs=True, seed=seed)


def write_raw_dataset(folder: Path, protocol: Protocol) -> list[str]:
    """The task as an nnU-Net raw dataset: imagesTr/labelsTr (training), imagesTs/labelsTs
    (test); label 1 / 2 are the twins on / away from the landmark's side, everything else is
    background. Returns the test case ids."""
    from nnssl.data.imageio import write_image
    from nnssl.data.paired_organs import TWIN_LANDMARK_SIDE, TWIN_OTHER_SIDE
    from nnssl.data.phantoms import make_phantom

    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    test_cases = []
    for split, seed, count in (("Tr", protocol.train_seed, protocol.num_train),
                               ("Ts", protocol.test_seed, protocol.num_test)):
        config = phantom_config(count, seed, protocol.field_of_view)
        for index in range(count):
            phantom = make_phantom(index, config)
            case = f"{'train' if split == 'Tr' else 'test'}_{index:03d}"
            geometry = {"spacing": phantom.spacing, "origin": phantom.origin, "direction": phantom.direction}
            segmentation = np.zeros_like(phantom.label_map)
            segmentation[phantom.label_map == TWIN_LANDMARK_SIDE] = 1
            segmentation[phantom.label_map == TWIN_OTHER_SIDE] = 2
            write_image(folder / f"images{split}" / f"{case}_0000.nii.gz", phantom.image, **geometry)
            write_image(folder / f"labels{split}" / f"{case}.nii.gz", segmentation, **geometry)
            if split == "Ts":
                test_cases.append(case)
    dataset = {"channel_names": {"0": "T1w"}, "labels": {v: k for k, v in LABELS.items()},
               "numTraining": protocol.num_train, "file_ending": ".nii.gz",
               "description": f"nnssl fine-tuning benchmark {protocol.name}: paired-organ phantoms"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return test_cases


def parse_pairs(items: list[str], option: str) -> dict[str, str]:
    """`["a=x", "b=y"]` -> {"a": "x", "b": "y"}; names must suit nnU-Net's file names."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise SystemExit(f"{option} {item!r}: expected NAME=VALUE")
        if not ARM_NAME.match(name) or name == SCRATCH or name in out:
            raise SystemExit(f"{option} {item!r}: the name must be letters and digits (single underscores between), "
                             f"unique, and not {SCRATCH!r} (the from-scratch arm is always added)")
        out[name] = value
    return out


def checkpoint_file(name: str, path: str) -> Path:
    """An `nnssl_export` folder or its checkpoint_final.pth -> the checkpoint (absolute: nnU-Net
    stores it in its plans and checks isfile() when training starts)."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        p = p / "checkpoint_final.pth"
    if not p.is_file():
        raise SystemExit(f"--arm {name}={path}: {p} does not exist; give an nnssl_export folder or its "
                         "checkpoint_final.pth")
    return p


def arm_architecture(name: str, checkpoint: Path) -> dict[str, Any]:
    """What decides the downstream network and its data: architecture, pretraining spacing,
    input channels, and the trainer nnU-Net's Workflow B recommends for it."""
    import torch

    from nnssl.export.nnunet import finetuning_support

    try:
        plan = torch.load(checkpoint, weights_only=True, map_location="cpu")["nnssl_adaptation_plan"]
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same fix
        raise SystemExit(f"--arm {name}: {checkpoint} is not an nnssl export checkpoint ({type(e).__name__}: {e}); "
                         "export the run with nnssl_export first") from e
    arch = plan["architecture_plans"]
    spacing = next(iter(plan["pretrain_plan"]["configurations"].values())).get("spacing")
    return {"architecture": {"arch_class_name": arch["arch_class_name"], "arch_kwargs": arch["arch_kwargs"]},
            "pretraining_spacing": spacing, "input_channels": plan["pretrain_num_input_channels"],
            "trainer": finetuning_support(plan)["workflow_b"]["recommended_trainer"]}


def check_one_architecture(arms: dict[str, Path]) -> str:
    """All arms must build the same network on the same data (scratch is that network): returns
    the recommended trainer, or stops naming every arm that differs from the first."""
    described = {name: arm_architecture(name, path) for name, path in arms.items()}
    first = next(iter(described))
    differ = [f"{name} ({arms[name]}): {json.dumps(d)}" for name, d in described.items() if d != described[first]]
    if differ:
        raise SystemExit(f"the arms do not share one architecture; {first} ({arms[first]}) has "
                         f"{json.dumps(described[first])}, but\n  " + "\n  ".join(differ) +
                         "\nfine-tune exports of one architecture together (run the benchmark once per architecture)")
    return str(described[first]["trainer"])


def pretrain(name: str, trainer: str, overrides: dict[str, Any], steps: int, corpus: dict[str, int],
             protocol: Protocol, seed: int, out: Path) -> tuple[Path, float]:
    """`nnssl.api.Pretrainer` on per-image z-scored paired-organ phantoms (what nnU-Net's Workflow
    B feeds the encoder), exported as an nnssl_export folder."""
    from nnssl.api import Pretrainer
    from nnssl.data.phantoms import make_phantom

    config = phantom_config(corpus["num_volumes"], corpus["seed"], protocol.field_of_view)
    volumes = []
    for index in range(config.num_volumes):
        image = make_phantom(index, config).image
        volumes.append(((image - image.mean()) / max(float(image.std()), 1e-8))[None])
    start = time.perf_counter()
    pretrainer = Pretrainer(trainer, overrides=overrides, seed=seed)
    pretrainer.fit(np.stack(volumes).astype(np.float32), steps=steps)
    seconds = time.perf_counter() - start
    return pretrainer.export(out / name), seconds


def find_client(explicit: str | None) -> str:
    """The python of nnU-Net master's client: --client, else a build of
    ../shared/tools/nnunet_client/setup.sh for this interpreter, else build one with it."""
    if explicit:
        if not Path(explicit).is_file():
            raise SystemExit(f"--client {explicit}: no such file; give the python that "
                             f"{CLIENT_TOOL / 'setup.sh'} prints")
        return explicit
    venv = Path(os.environ.get("NNUNET_CLIENT_DIR", "/tmp/nnunet_client")) / "venv"
    ours = sysconfig.get_paths()["purelib"]
    for site in venv.glob("lib/python*/site-packages"):
        link = site / "zz_project_site.pth"
        if ((venv / "bin" / "python").is_file() and link.is_file() and repr(ours) in link.read_text()
                and any(site.glob("nnunetv2-*.dist-info"))):
            return str(venv / "bin" / "python")
    if not (CLIENT_TOOL / "setup.sh").is_file():
        raise SystemExit(f"nnU-Net master's client is needed and {CLIENT_TOOL} does not exist: build it with that "
                         "tool's setup.sh (bash setup.sh .venv/bin/python) and pass --client PYTHON")
    proc = subprocess.run(["bash", str(CLIENT_TOOL / "setup.sh"), sys.executable], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise SystemExit(f"building nnU-Net's client with {CLIENT_TOOL / 'setup.sh'} failed (exit {proc.returncode}):"
                         f"\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return lines[-1]


def run_client(client: str, job: dict, out: Path) -> dict:
    """The nnU-Net half, in the client python; its console output goes to nnunet_client.log."""
    (out / "finetune_job.json").write_text(json.dumps(job, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "nnUNet_def_n_proc": "1", "nnUNet_compile": "false"}
    log_file = out / "nnunet_client.log"
    with log_file.open("w") as log:
        # stderr passes through: the driver's progress lines and any traceback
        proc = subprocess.run([client, str(CLIENT_DRIVER), str(out / "finetune_job.json"),
                               str(out / "finetune_runs.json")], stdout=log, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"nnU-Net's fine-tuning failed (exit {proc.returncode}; the traceback is above); nnU-Net's "
                         f"console output is in {log_file}, ending:\n{log_file.read_text()[-3000:]}")
    return json.loads((out / "finetune_runs.json").read_text())


def _rounded(value: Any) -> Any:
    """Dice values and losses to 4 decimals (the JSON is read by people); other values as they are."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def summarize(runs: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Per arm: every seed's Dice, the mean and the worst seed; for pretrained arms the margin of
    each seed over scratch's mean (the headline, as the dense-probe verdict) and over scratch with
    the same seed (paired: same decoder initialisation, batches and augmentation)."""
    def mean_dice(arm: str) -> dict[str, float]:
        return {seed: run["mean_dice"] for seed, run in runs[arm].items()}

    scratch = mean_dice(SCRATCH)
    scratch_mean = float(np.mean(list(scratch.values())))
    out: dict[str, Any] = {}
    for arm, seeds in runs.items():
        values = mean_dice(arm)
        entry: dict[str, Any] = {
            "seeds": {seed: {k: _rounded(run[k]) for k in (
                "dice", "mean_dice", "twins_union_dice", "train_seconds", "test_seconds", "initial_lr",
                "nnunet_initial_lr", "final_train_loss", "loaded_pretrained_encoder")} for seed, run in seeds.items()},
            "mean_dice": round(float(np.mean(list(values.values()))), 4),
            "worst_seed_mean_dice": round(min(values.values()), 4),
            "twins_union_dice": round(float(np.mean([r["twins_union_dice"] for r in seeds.values()])), 4)}
        if arm != SCRATCH:
            margins = {s: v - scratch_mean for s, v in values.items()}
            paired = {s: v - scratch[s] for s, v in values.items()}
            entry["margin_over_scratch"] = {
                "per_seed": {s: round(m, 4) for s, m in margins.items()},
                "mean": round(float(np.mean(list(margins.values()))), 4), "worst": round(min(margins.values()), 4),
                "paired_per_seed": {s: round(m, 4) for s, m in paired.items()},
                "paired_worst": round(min(paired.values()), 4),
                "above_scratch_on_every_seed": min(margins.values()) > 0}
        out[arm] = entry
    return out


def _commit() -> str | None:
    """The checkout's commit, so a result names the code that produced it."""
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def prepare_output(out: Path) -> None:
    """An empty folder, or one this benchmark wrote before (its nnU-Net folders are replaced)."""
    if out.exists() and any(out.iterdir()):
        if not (out / "finetune_job.json").is_file():
            raise SystemExit(f"-o {out} is not empty and was not written by this benchmark; choose a new folder")
        shutil.rmtree(out / "nnunet", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--arm", action="append", default=[], metavar="NAME=PATH",
                   help="an exported checkpoint to fine-tune (nnssl_export folder or its checkpoint_final.pth)")
    p.add_argument("--pretrain", action="append", default=[], metavar="NAME=TRAINER",
                   help="pretrain TRAINER in memory on the benchmark's phantom corpus and export it as arm NAME")
    p.add_argument("--set", action="append", default=[], metavar="NAME:PATH=VALUE",
                   help="a training-config override for --pretrain arm NAME, e.g. ijepa:optim.peak_lr=1e-3")
    p.add_argument("--pretrain_steps", type=int, default=4500)
    p.add_argument("--pretrain_seed", type=int, default=0)
    p.add_argument("-o", "--output", default=None, help="work folder (kept); default: a temporary one, removed")
    p.add_argument("--smoke", "--quick", action="store_true",
                   help="seconds-long run on tiny sets (checks the pipeline; its numbers mean nothing)")
    p.add_argument("--client", default=None, help="nnU-Net master's client python (default: found or built)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for pretraining and fine-tuning")
    p.add_argument("--nnunet_learning_rates", action="store_true",
                   help="train pretrained arms at nnU-Net's own lower rate (1e-4 for Primus) instead of the "
                        "protocol's one rate for all arms; a variant of the protocol, reported as such")
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()

    from nnssl.settings import parse_assignments

    protocol, corpus = (SMOKE, SMOKE_CORPUS) if args.smoke else (PROTOCOL, PRETRAIN_CORPUS)
    if args.nnunet_learning_rates:
        protocol = replace(protocol, name=f"{protocol.name}+nnunet_learning_rates", learning_rate="nnunet")
    exports = {name: checkpoint_file(name, path) for name, path in parse_pairs(args.arm, "--arm").items()}
    trainers = parse_pairs(args.pretrain, "--pretrain")
    if not exports and not trainers:
        p.error("give at least one --arm NAME=PATH or --pretrain NAME=TRAINER (scratch is added to them)")
    if set(exports) & set(trainers):
        p.error(f"names used by both --arm and --pretrain: {sorted(set(exports) & set(trainers))}")
    overrides: dict[str, list[str]] = {}
    for item in args.set:
        name, sep, assignment = item.partition(":")
        if not sep or name not in trainers:
            p.error(f"--set {item!r}: expected NAME:PATH=VALUE with NAME one of the --pretrain arms {sorted(trainers)}")
        overrides.setdefault(name, []).append(assignment)
    client = find_client(args.client)
    start = time.perf_counter()
    temporary = args.output is None
    out = Path(tempfile.mkdtemp(prefix="finetune_nnunet_") if temporary else args.output).resolve()
    prepare_output(out)
    try:
        import torch

        torch.set_num_threads(args.threads)
        pretrain_seconds = {}
        for name, trainer in trainers.items():
            folder, seconds = pretrain(name, trainer, parse_assignments(overrides.get(name, [])), args.pretrain_steps,
                                       corpus, protocol, args.pretrain_seed, out / "exports")
            exports[name], pretrain_seconds[name] = folder / "checkpoint_final.pth", round(seconds, 1)
            print(f"[finetune] pretrained {name} ({trainer}, {args.pretrain_steps} steps) in {seconds:.0f} s",
                  file=sys.stderr, flush=True)
        base_trainer = check_one_architecture(exports)
        raw = out / "nnunet" / "nnUNet_raw" / DATASET_NAME
        test_cases = write_raw_dataset(raw, protocol)
        job = {"workdir": str(out / "nnunet"), "dataset_id": DATASET_ID, "dataset_name": DATASET_NAME,
               "arms": [{"name": n, "checkpoint": str(c)} for n, c in exports.items()], "base_trainer": base_trainer,
               "schedule": {"epochs": protocol.epochs, "iterations_per_epoch": protocol.iterations_per_epoch,
                            "val_iterations_per_epoch": protocol.val_iterations_per_epoch,
                            "warmup_epochs": protocol.warmup_epochs, "learning_rate": protocol.learning_rate},
               "patch_size": [protocol.patch_size] * 3, "seeds": list(protocol.seeds),
               "adaptation_mode": protocol.adaptation_mode, "labels": {str(k): v for k, v in LABELS.items() if k},
               "test_cases": test_cases, "file_ending": ".nii.gz", "threads": args.threads,
               "n_proc_da": 0}  # augmentation in the training process: the seed fixes it
        runs = run_client(client, job, out)
        result = {
            "protocol": asdict(protocol), "arms": {n: str(c) for n, c in exports.items()},
            "pretraining": {n: {"trainer": t, "steps": args.pretrain_steps, "seed": args.pretrain_seed,
                                "overrides": parse_assignments(overrides.get(n, [])), "corpus": corpus,
                                "seconds": pretrain_seconds[n]} for n, t in trainers.items()},
            "nnunet_trainer": runs["runs"][SCRATCH][str(protocol.seeds[0])]["trainer"],
            "results": summarize(runs["runs"]),
            "wall_seconds": {"total": round(time.perf_counter() - start, 1),
                             "pretraining": round(sum(pretrain_seconds.values()), 1),
                             "nnunet_planning": runs["planning_seconds"],
                             "fine_tuning_and_test": round(sum(r["train_seconds"] + r["test_seconds"]
                                                               for arm in runs["runs"].values()
                                                               for r in arm.values()), 1)},
            "nnunet_client": client, "commit": _commit(), "output": None if temporary else str(out)}
        scratch = result["results"][SCRATCH]
        if scratch["twins_union_dice"] < 0.1:
            result["warning"] = (f"scratch found almost none of the twins (union Dice {scratch['twins_union_dice']}): "
                                 "at this schedule the comparison means nothing")
        if not temporary:
            (out / "finetune_result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        if temporary:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
