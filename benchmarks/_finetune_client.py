"""The nnU-Net half of benchmarks/finetune_nnunet.py; runs inside nnU-Net master's client python.

Not a module users call: finetune_nnunet.py writes the raw dataset and a job file, then starts
this file with the client python (`../shared/tools/nnunet_client`, nnU-Net master on top of the
project's packages), because only that interpreter has nnU-Net's pretrained-weights code. It
needs nothing from nnssl, only nnU-Net, torch and numpy:

    python _finetune_client.py JOB.json RESULTS.json

Everything that decides the numbers is nnU-Net's own code, called the way its commands call it:
fingerprint and default plan (`nnUNetv2_extract_fingerprint`, `nnUNetv2_plan_experiment`),
`preprocess_like_nnssl(..., adaptation_mode)` per pretrained arm (`nnUNetv2_preprocess_like_nnssl`),
the trainer built and flagged exactly as `run_training_from_pretrained.get_trainer_from_args` and
`train_pretrained` do for `nnUNetv2_train_pretrained` (with `--from_scratch`: the plans name gets
`__from_scratch`, the checkpoint path is cleared, `use_pretrained_weights` is False, so the
trainer picks its own from-scratch learning rate), `run_training()`, then nnUNetPredictor's
sliding window on the test images preprocessed by the plan's preprocessor,
`export_prediction_from_logits` and `compute_metrics` on the written label maps.

What this file adds, and why:
- the trainer is a subclass of the export's recommended trainer with a short schedule
  (`short_schedule`): nnU-Net finds trainers by name only inside its own package, so the class is
  instantiated directly, as get_trainer_from_args would after finding it;
- each fine-tuning seed seeds python, numpy and torch before the trainer is built and trains with
  data augmentation in this process (`nnUNet_n_proc_DA=0`), so a seed fixes the decoder's
  initialisation, the batches and the augmentation, and an arm and scratch with the same seed
  see the same ones; its output folder gets a `__seed<N>` plans-name suffix (the mechanism
  `--from_scratch` uses) so seeds do not overwrite each other;
- after `initialize()` the encoder is compared with the checkpoint, so a pretrained arm that did
  not load its weights (or a scratch arm that did) stops the benchmark instead of being reported.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
from pathlib import Path

CONFIGURATION = "3d_fullres"
FOLD = "all"  # every training case trains; the final checkpoint is evaluated on the separate test set
TRAINER_MODULES = {
    "PretrainedTrainer": "nnunetv2.training.nnUNetTrainer.pretraining.pretrainedTrainer",
    "PretrainedTrainer_Primusx": "nnunetv2.training.nnUNetTrainer.pretraining.thrp_primusx_finetuning",
}
# the learning rate each trainer's __init__ picks when no weights are loaded (--from_scratch);
# nnU-Net lowers it for pretrained weights (1e-4 / 1e-3), which it tunes for 1000 epochs
FROM_SCRATCH_LR = {"PretrainedTrainer": 1e-2, "PretrainedTrainer_Primusx": 3e-4}


def log(message: str) -> None:
    print(f"[finetune] {message}", file=sys.stderr, flush=True)


def set_paths(workdir: Path) -> None:
    """nnU-Net reads its folders from the environment when nnunetv2.paths is imported."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(workdir / name)


def short_schedule(base_name: str, schedule: dict):
    """A subclass of nnU-Net's trainer `base_name` that only shortens its schedule: epochs,
    iterations per epoch, validation iterations and the warm-up (the way nnU-Net's own `_30ep`
    variants are written), and with `schedule["learning_rate"] == "from_scratch"` gives every
    arm the trainer's from-scratch learning rate. Optimizer, loss, augmentation and inference
    settings stay nnU-Net's. The rate nnU-Net itself chose is kept in `nnunet_initial_lr`. The
    class name, which names the output folder, says the schedule."""
    import importlib

    import torch

    base = getattr(importlib.import_module(TRAINER_MODULES[base_name]), base_name)
    CPU = torch.device("cpu")

    class ShortSchedule(base):  # type: ignore[misc, valid-type]
        # nnU-Net records __init__'s parameters by name (my_init_kwargs): no *args here
        def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                     device: torch.device = CPU):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = schedule["epochs"]
            self.num_iterations_per_epoch = schedule["iterations_per_epoch"]
            self.num_val_iterations_per_epoch = schedule["val_iterations_per_epoch"]
            self.warmup_duration_whole_net = schedule["warmup_epochs"]
            self.nnunet_initial_lr = self.initial_lr
            if schedule["learning_rate"] == "from_scratch":
                self.initial_lr = FROM_SCRATCH_LR[base_name]

    ShortSchedule.__name__ = ShortSchedule.__qualname__ = (
        f"{base_name}_{schedule['epochs']}ep_{schedule['iterations_per_epoch']}it")
    return ShortSchedule


def plan_dataset(job: dict) -> dict[str, str]:
    """nnU-Net's fingerprint and default plan, then one ptPlans file per pretrained arm with the
    protocol's patch; returns arm name -> plans identifier."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.like_nnssl import preprocess_like_nnssl
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    from nnunetv2.paths import nnUNet_preprocessed

    dataset_id = job["dataset_id"]
    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner calls torch.set_num_threads(n_proc_DA)
    # nnUNetv2_extract_fingerprint's defaults (no --verify_dataset_integrity: the writer is ours)
    extract_fingerprints([dataset_id], check_dataset_integrity=False, clean=True, verbose=False, num_processes=1)
    plan_experiments([dataset_id])
    folder = Path(nnUNet_preprocessed) / job["dataset_name"]
    plans = {}
    for arm in job["arms"]:
        preprocess_like_nnssl(dataset_id=dataset_id, pretrain_name=arm["name"], pt_ckpt=arm["checkpoint"],
                              adaptation_mode=job["adaptation_mode"], override_spacing=None, num_processes=1,
                              verbose=False)
        # ptPlans__<name>____<data identifier>: exactly one in a fresh work folder
        written = sorted(folder.glob(f"ptPlans__{arm['name']}____Spacing__*.json"))
        if len(written) != 1:
            raise RuntimeError(f"preprocess_like_nnssl for arm {arm['name']!r} left {len(written)} plans files in "
                               f"{folder}, expected one ptPlans__{arm['name']}____Spacing__*.json; start from an "
                               "empty work folder")
        content = load_json(written[0])
        # the protocol's patch (nnU-Net sets the pretraining patch); plans are editable JSON by design
        content["configurations"][CONFIGURATION]["patch_size"] = list(job["patch_size"])
        save_json(content, written[0], sort_keys=False)
        plans[arm["name"]] = written[0].stem
    os.environ["nnUNet_n_proc_DA"] = str(job["n_proc_da"])
    return plans


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_trainer(job: dict, plans_identifier: str, scratch: bool, seed: int):
    """What `nnUNetv2_train_pretrained ID 3d_fullres all -p PLANS -tr TRAINER [--from_scratch]`
    does before training (get_trainer_from_args + train_pretrained), with the short trainer."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    folder = Path(nnUNet_preprocessed) / job["dataset_name"]
    plans = load_json(str(folder / f"{plans_identifier}.json"))
    dataset_json = load_json(str(folder / "dataset.json"))
    if scratch:  # get_trainer_from_args(pretrained_from_scratch=True)
        plans["plans_name"] = plans["plans_name"] + "__from_scratch"
        plans["pretrain_info"]["checkpoint_path"] = None
    plans["plans_name"] = plans["plans_name"] + f"__seed{seed}"
    plans["continue_training"] = False
    trainer_class = short_schedule(job["base_trainer"], job["schedule"])
    trainer = trainer_class(plans=plans, configuration=CONFIGURATION, fold=FOLD, dataset_json=dataset_json,
                            device=torch.device("cpu"))
    trainer.use_pretrained_weights = not scratch  # train_pretrained: False if from_scratch
    if scratch and trainer.nnunet_initial_lr != FROM_SCRATCH_LR[job["base_trainer"]]:
        raise RuntimeError(f"{job['base_trainer']} now trains from scratch with lr {trainer.nnunet_initial_lr}, "
                           f"not {FROM_SCRATCH_LR[job['base_trainer']]}: update FROM_SCRATCH_LR in {__file__}")
    return trainer


def encoder_matches_checkpoint(trainer, checkpoint: str) -> bool:
    """Whether every encoder tensor that nnU-Net loads unchanged (all but a resized position
    embedding) equals the checkpoint's."""
    import torch

    network = trainer.network
    weights = torch.load(checkpoint, weights_only=True, map_location="cpu")
    plan = weights["nnssl_adaptation_plan"]
    ours, theirs = network.key_to_encoder, plan["key_to_encoder"]
    lpe = getattr(network, "key_to_lpe", None)
    state = network.state_dict()
    compared = 0
    for key, value in state.items():
        if not key.startswith(ours + ".") or key == lpe:
            continue
        source = theirs + key[len(ours):]
        if source not in weights["network_weights"] or not torch.equal(value, weights["network_weights"][source]):
            return False
        compared += 1
    return compared > 0


def test_cases(job: dict, trainer) -> list[dict]:
    """The test images through the plan's preprocessor (what nnUNetv2_predict does before
    predicting), once per process: every arm's plan has the same spacing and normalisation."""
    from nnunetv2.paths import nnUNet_raw

    raw = Path(nnUNet_raw) / job["dataset_name"]
    preprocessor = trainer.configuration_manager.preprocessor_class(verbose=False)
    cases = []
    for case in job["test_cases"]:
        data, _, properties = preprocessor.run_case([str(raw / "imagesTs" / f"{case}_0000.nii.gz")], None,
                                                    trainer.plans_manager, trainer.configuration_manager,
                                                    trainer.dataset_json)
        cases.append({"case": case, "data": data, "properties": properties,
                      "reference": str(raw / "labelsTs" / f"{case}.nii.gz")})
    return cases


def evaluate(job: dict, trainer, cases: list[dict]) -> dict:
    """nnU-Net's predictor on the final network, label maps written by its export, Dice by its
    evaluation code: per label, and for the union of the twin labels (a region)."""
    import numpy as np
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    out = Path(trainer.output_folder) / "test_predictions"
    out.mkdir(parents=True, exist_ok=True)
    reader = trainer.plans_manager.image_reader_writer_class()
    labels = {int(k): v for k, v in job["labels"].items()}
    regions = [*labels, tuple(labels)]
    per_case = []
    for case in cases:
        with torch.no_grad():
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(case["data"])).cpu()
        export_prediction_from_logits(logits, case["properties"], trainer.configuration_manager,
                                      trainer.plans_manager, trainer.dataset_json, str(out / case["case"]), False,
                                      num_threads_torch=1)
        metrics = compute_metrics(case["reference"], str(out / f"{case['case']}{job['file_ending']}"), reader,
                                  regions)["metrics"]
        per_case.append({"case": case["case"], **{labels[r] if r in labels else "twins_union":
                                                  float(metrics[r]["Dice"]) for r in regions}})
    names = [*labels.values(), "twins_union"]
    dice = {name: float(np.nanmean([c[name] for c in per_case])) for name in names}
    (out / "per_case_dice.json").write_text(json.dumps(per_case, indent=1))
    return {"dice": {n: dice[n] for n in labels.values()},
            "mean_dice": float(np.mean([dice[n] for n in labels.values()])),
            "twins_union_dice": dice["twins_union"], "num_test_cases": len(per_case),
            "predictions": str(out)}


def finetune(job: dict, arm: dict, plans_identifier: str, seed: int, cases: list[dict] | None):
    scratch = arm["checkpoint"] is None
    seed_everything(seed)
    trainer = build_trainer(job, plans_identifier, scratch, seed)
    start = time.perf_counter()
    trainer.initialize()  # run_training() would do it first thing; here the weights are checked before training
    reference = job["arms"][0]["checkpoint"] if scratch else arm["checkpoint"]
    loaded = encoder_matches_checkpoint(trainer, reference)
    if loaded == scratch:
        problem = "a from-scratch run loaded weights" if scratch else "the pretrained weights were not loaded"
        raise RuntimeError(f"arm {arm['name']!r}, seed {seed}: the encoder {'equals' if scratch else 'differs from'} "
                           f"{reference} after nnU-Net's initialize(): {problem}")
    trainer.run_training()
    train_seconds = time.perf_counter() - start
    if cases is None:
        cases = test_cases(job, trainer)
    start = time.perf_counter()
    result = evaluate(job, trainer, cases)
    logger = trainer.logger
    result.update(
        seed=seed, loaded_pretrained_encoder=loaded, trainer=type(trainer).__name__,
        initial_lr=trainer.initial_lr, nnunet_initial_lr=trainer.nnunet_initial_lr,
        train_seconds=round(train_seconds, 1), test_seconds=round(time.perf_counter() - start, 1),
        output_folder=str(trainer.output_folder),
        final_train_loss=float(logger.get_value("train_losses", step=-1)),
        final_pseudo_dice_on_training_cases=[float(d) for d in logger.get_value("dice_per_class_or_region", step=-1)])
    del trainer, logger
    gc.collect()
    return result, cases


def main() -> int:
    job_path, results_path = Path(sys.argv[1]), Path(sys.argv[2])
    job = json.loads(job_path.read_text())
    set_paths(Path(job["workdir"]))
    import torch

    torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    plans = plan_dataset(job)
    log(f"nnU-Net fingerprint, plan and preprocess_like_nnssl: {time.perf_counter() - start:.0f} s")
    arms = [*job["arms"], {"name": "scratch", "checkpoint": None}]
    plans["scratch"] = plans[job["arms"][0]["name"]]  # the same plan and trainer, --from_scratch
    results: dict = {"planning_seconds": round(time.perf_counter() - start, 1), "plans": plans, "runs": {}}
    cases = None
    for seed in job["seeds"]:  # seed by seed, so the arms share the machine's load alike
        for arm in arms:
            result, cases = finetune(job, arm, plans[arm["name"]], seed, cases)
            results["runs"].setdefault(arm["name"], {})[str(seed)] = result
            log(f"{arm['name']} seed {seed}: mean Dice {result['mean_dice']:.3f} "
                f"(twins union {result['twins_union_dice']:.3f}), {result['train_seconds']:.0f} s training, "
                f"{result['test_seconds']:.0f} s test")
            results_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":  # spawned nnU-Net workers import this file: nothing may run at import
    sys.exit(main())
