"""Runs many checks of exported checkpoints with nnU-Net master's real code, in one process.

Not a test module: tests/test_nnunet_client.py runs it with the client python that
../shared/tools/nnunet_client/setup.sh builds (nnU-Net master on top of the project's packages),
because starting that interpreter and importing nnU-Net once per checkpoint would cost more than
the checks. The checks are check.py's own functions (run_direct, run_full), so a check here is
exactly `check.py CKPT --mode direct|full --trainer ...` of that tool; this file only adds:

- `dynamic_load`: Workflow A's loader (`DynamicPretrainedTrainer.load_pretrained_weights_dynamic`)
  into nnU-Net's ResEncL, every encoder/stem tensor compared (check.py's full dynamic mode skips
  that comparison);
- `citations`: after a full run, the trainer's log must contain every citation of the checkpoint;
- `parse`: nnU-Net's own argument parsers accept the commands of a model card.

and, to fit a 2-core CI machine, reuses work whose result cannot differ: a direct check that calls
the very same build function with the same inputs as an earlier one takes its result, a preset
network nnU-Net already built for the same arguments is deep-copied instead of initialised again,
and the fake dataset's fingerprint (identical for every full check) is computed once.

    python nnunet_client_driver.py CHECK_PY_DIR JOBS.json RESULTS.json WORKDIR
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

DEFAULTS = {"mode": "direct", "trainer": None, "workflow": "like_nnssl", "adaptation_mode": "default_nnunet",
            "patch": [64, 64, 64], "in_channels": 1, "num_classes": 3, "no_forward": False, "dataset_id": 987}


def _set_paths(workdir: Path) -> None:
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
        os.environ[sub] = str(workdir / sub)  # before nnunetv2.paths is imported
    os.environ.pop("nnUNet_n_proc_DA", None)
    # nnU-Net's integrity check, fingerprint and preprocessing each start a pool of this many
    # spawned workers (default 8, each importing torch) for check.py's 2-case dataset
    os.environ["nnUNet_def_n_proc"] = "1"


def _memoize_fingerprint() -> None:
    """check.py writes the same fake raw dataset for every full check (fixed seed), so nnU-Net's
    fingerprint of it is the same too: compute it once per process, write the saved file for the
    later checks (the integrity check and fingerprint pools cost ~25 s a run on 2 busy cores)."""
    import hashlib

    from nnunetv2.experiment_planning import plan_and_preprocess_api as api
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    real, saved = api.extract_fingerprints, {}

    def extract_fingerprints(dataset_ids, *args, **kwargs):
        for dataset_id in dataset_ids:
            name = convert_id_to_dataset_name(dataset_id)
            digest = hashlib.sha256()
            for f in sorted((Path(nnUNet_raw) / name).rglob("*")):
                if f.is_file():
                    digest.update(f.relative_to(nnUNet_raw).as_posix().encode() + f.read_bytes())
            target = Path(nnUNet_preprocessed) / name / "dataset_fingerprint.json"
            if digest.hexdigest() in saved:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(saved[digest.hexdigest()])
                continue
            real([dataset_id], *args, **kwargs)
            saved[digest.hexdigest()] = target.read_text()

    api.extract_fingerprints = extract_fingerprints


def _log_text(workdir: Path, dataset_id: int) -> str:
    logs = sorted((workdir / "nnUNet_results").glob(f"Dataset{dataset_id:03d}_*/**/training_log_*.txt"))
    return "\n".join(p.read_text() for p in logs)


def run_check(check, job: dict, workdir: Path) -> dict:
    a = SimpleNamespace(**{**DEFAULTS, **job})
    rep = check.Report()
    ck, path = check.load_ckpt(a.checkpoint, rep)
    info = check.check_plan(ck, rep) if ck is not None else None
    result: dict = {}
    if info is not None:
        if a.mode == "direct":
            check.run_direct(path, ck, info, a, rep)
        elif a.mode == "full":
            check.run_full(path, ck, info, a, rep)
            if job.get("citations"):
                log = _log_text(workdir, a.dataset_id)
                missing = [c["name"] for c in ck.get("citations", [])
                           if not all(text in log for text in c["apa_citations"])]
                result["citations_in_log"] = not missing and bool(ck.get("citations"))
                if missing or not ck.get("citations"):
                    rep.fail(f"[citations] not in the training log: {missing or 'the checkpoint has none'}")
        elif a.mode == "dynamic_load":
            dynamic_load(ck, info, a, rep)
    result.update(verdict="FAIL" if rep.fails else "PASS", fails=rep.fails, notes=rep.notes)
    return result


def dynamic_load(ck: dict, info: dict, a, rep) -> None:
    """Workflow A's weight loading into nnU-Net's ResEncL (6 stages, 3x3x3: what
    nnUNetPlannerResEncL plans for data of the pretraining size), every tensor compared."""
    import torch
    from nnunetv2.training.nnUNetTrainer.pretraining.dynamicPretrainedTrainer import DynamicPretrainedTrainer
    from nnunetv2.utilities import get_network_via_name

    net = get_network_via_name.get_network_from_name("ResEncL", a.in_channels, a.num_classes, tuple(a.patch),
                                                     allow_init=True, deep_supervision=False)
    try:
        net, _ = DynamicPretrainedTrainer.load_pretrained_weights_dynamic(
            net, a.checkpoint, info["pt_num_in_channels"], a.in_channels, info["pt_used_patchsize"],
            list(a.patch), info["key_to_encoder"], info["key_to_stem"], tuple(info["keys_to_in_proj"]),
            info["key_to_lpe"], target_kernel_sizes=[[3, 3, 3]] * 6, target_n_stages=6)
    except Exception as e:  # noqa: BLE001 - the verdict is what the test checks
        rep.fail(f"[dynamic] DynamicPretrainedTrainer.load_pretrained_weights_dynamic raised {type(e).__name__}: "
                 f"{' '.join(str(e).split())[:300]}")
        return
    state = net.state_dict()
    weights = ck["network_weights"]
    differ = [k for k, v in weights.items() if k not in state or not torch.equal(state[k], v)]
    if differ:
        rep.fail(f"[dynamic] {len(differ)}/{len(weights)} tensors not loaded as in the checkpoint: {differ[:5]}")
    else:
        rep.ok(f"[dynamic] all {len(weights)} encoder/stem tensors loaded bit-identical")


def parse_commands(commands: list[str]) -> list[str]:
    """Each `nnUNetv2_*` command through nnU-Net's own argparse, the work itself stubbed out (a
    local `-pc` still goes through nnU-Net's existence check); returns the problems."""
    import nnunetv2.experiment_planning.like_nnssl as like
    import nnunetv2.run.run_training_from_pretrained as run
    import torch

    real_download = like.maybe_download_pretrained_weights
    stubs = {(like, "preprocess_like_nnssl"): lambda **kwargs: None,
             (like, "plan_like_dynamic"): lambda **kwargs: None,
             (like, "maybe_download_pretrained_weights"):
                 lambda p: p if p.startswith("https://huggingface.co/") else real_download(p),
             (run, "train_pretrained"): lambda *args, **kwargs: None,
             # the entrypoint sets torch's thread counts for -device cuda; the interop count can be
             # set once per process
             (torch, "set_num_threads"): lambda n: None, (torch, "set_num_interop_threads"): lambda n: None}
    entrypoints = {"nnUNetv2_preprocess_like_nnssl": like.preprocess_like_nnssl_entrypoint,
                   "nnUNetv2_plan_like_dynamic": like.plan_like_dynamic_entrypoint,
                   "nnUNetv2_train_pretrained": run.train_pretrained_entrypoint}
    saved = {key: getattr(*key) for key in stubs}
    problems = []
    try:
        for (module, name), stub in stubs.items():
            setattr(module, name, stub)
        for line in commands:
            words = line.split()
            if words[0] not in entrypoints:
                continue
            sys.argv = words
            try:
                entrypoints[words[0]]()
            except SystemExit as e:
                problems.append(f"{line}: argparse exit {e.code}")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{line}: {type(e).__name__}: {e}")
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
    return problems


def _reuse_preset_networks() -> None:
    """nnU-Net builds every preset (PrimusS/B/M/L, ResEncL) with `get_network_from_name`, whose
    weight initialisation dominates a direct check of a big preset (3.5 s for PrimusL on a busy
    core). The trainers' own builders still run and decide the call; an identical call (same
    preset, channels, classes, patch) gets a deep copy of the network the first one returned,
    before any weights were loaded into it."""
    import copy

    from nnunetv2.training.nnUNetTrainer.pretraining import (
        dynamicPretrainedTrainer,
        pretrainedTrainer,
        thrp_primusx_finetuning,
    )
    from nnunetv2.utilities import get_network_via_name

    real, built = get_network_via_name.get_network_from_name, {}

    def get_network_from_name(arch_class_name, input_channels, output_channels, input_patchsize=None,
                              allow_init=True, deep_supervision=None):
        key = (arch_class_name, input_channels, output_channels,
               None if input_patchsize is None else tuple(input_patchsize), allow_init, deep_supervision)
        if key not in built:
            if len(built) > 1:  # jobs come backbone by backbone: keep the memory of two networks at most
                built.pop(next(iter(built)))
            built[key] = real(arch_class_name, input_channels, output_channels, input_patchsize, allow_init,
                              deep_supervision)
        return copy.deepcopy(built[key])

    for module in (get_network_via_name, pretrainedTrainer, thrp_primusx_finetuning, dynamicPretrainedTrainer):
        module.get_network_from_name = get_network_from_name


def _same_direct_check(check, job: dict, built: dict[tuple, str]) -> str | None:
    """The id of an earlier direct check that called the very same build function (not just an
    equal one) on the same checkpoint and inputs; registers this one otherwise."""
    if job["mode"] != "direct":
        return None
    a = {**DEFAULTS, **job}
    builder = check.trainer_class(a["trainer"]).build_network_architecture
    key = (a["checkpoint"], builder, tuple(a["patch"]), a["in_channels"], a["num_classes"], a["no_forward"])
    if key in built:
        return built[key]
    built[key] = job["id"]
    return None


def main() -> int:
    check_dir, jobs_path, results_path, workdir = sys.argv[1:5]
    _set_paths(Path(workdir))
    sys.path.insert(0, check_dir)
    import torch

    torch.set_num_threads(1)
    import check  # the tool's check.py

    _memoize_fingerprint()
    _reuse_preset_networks()
    results: dict[str, dict] = {}
    built: dict[tuple, str] = {}  # same build function and inputs -> the check that ran them
    for job in json.loads(Path(jobs_path).read_text()):
        start = time.time()
        try:
            same = _same_direct_check(check, job, built)
            if same is not None:  # e.g. PretrainedTrainer_Primus inherits PretrainedTrainer's builder
                result = {**results[same], "notes": [*results[same]["notes"], f"same build function and inputs as "
                                                     f"{same}: its result"]}
            elif job["mode"] == "parse":
                problems = parse_commands(job["commands"])
                result = {"verdict": "FAIL" if problems else "PASS", "fails": problems, "notes": []}
            else:
                result = run_check(check, job, Path(workdir))
        except Exception:  # noqa: BLE001 - reported, the other checks still run
            result = {"verdict": "FAIL", "fails": [traceback.format_exc()[-1500:]], "notes": []}
        result["seconds"] = round(time.time() - start, 1)
        results[job["id"]] = result
        print(f"{result['verdict']} {job['id']} ({result['seconds']} s)", flush=True)
    Path(results_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
