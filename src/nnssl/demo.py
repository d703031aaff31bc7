"""The end-to-end demo behind `bash run.sh demo` / `nnssl_demo`.

On a machine with no data and no GPU: generate a phantom collection in a folder it names, build
and check `pretrain_data.json`, fingerprint, plan and preprocess, pretrain a small I-JEPA on the
CPU within a time budget (live progress in the log), export the checkpoint, evaluate it against
random initialisation on a separate labeled phantom set, and print a summary. Each stage calls
the same library function the corresponding command uses, so the demo is the pipeline.

With `dataset=<id>` it skips the phantoms and runs on the user's own dataset under their
`nnssl_raw` / `nnssl_preprocessed` / `nnssl_results` (evaluation then needs a labeled folder).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnssl import paths
from nnssl.errors import InvalidInput, NnsslError
from nnssl.log import get_logger

logger = get_logger(__name__)


# The recipe fixed on the protocol's search set before its test set was looked at
# (benchmarks/phantom_probe.py; documentation/evaluation.md, "The recipe search"): the Tiny ViT at
# 32³ crops, lr 1e-3, 4500 steps, with SIGReg on the student's embeddings, which keeps the features
# from collapsing on 64-token grids (without it token RankMe falls to ~20 and the volume probe
# margin to ~0; with it the margin is +20 points).
RECIPE_STEPS = 4500
RECIPE_OVERRIDES = ("ijepa.sigreg_weight=0.05",)


@dataclass(frozen=True)
class DemoConfig:
    folder: Path = Path("nnssl_demo")
    dataset_id: int = 900
    dataset_name: str = "Phantoms"
    num_volumes: int = 256
    shape: tuple[int, int, int] = (48, 48, 48)
    seed: int = 0
    num_processes: int = 2
    overwrite: bool = True
    train_minutes: float = 6.0  # training wall-time budget (the step count is calibrated to it)
    max_steps: int = RECIPE_STEPS  # the step count when the budget allows more
    patch_size: int = 32
    batch_size: int = 8
    peak_lr: float = 1e-3  # the Tiny ViT learns its early-layer features faster than at the default 3e-4
    overrides: tuple[str, ...] = RECIPE_OVERRIDES  # training-config overrides (nnssl_train --set)
    # labeled phantoms for the probe: the dense protocol's test set (480 cases, its own seed); a
    # different count gives a set of the same kind that is not the protocol's (and no verdict below 240)
    eval_volumes: int = 480
    random_seeds: int = 10  # random-init encoders the pretrained one is compared with (the protocol's ten)
    # the pretraining phantoms: the protocol sets' kind (MR, 1 mm isotropic, fixed orientation,
    # four key-organ shapes at scale 1, the paired twin organs), from the demo's own seed
    modality: str = "MR"
    num_classes: int = 4
    key_organ_scale: float = 1.0
    anisotropic: bool = False
    random_orientation: bool = False
    paired_organs: bool = True
    pooling: str = "layers"  # the volume probe's read-out for a labeled folder without context labels
    dataset: str | None = None  # the user's own dataset id/name instead of phantoms
    labeled: Path | None = None  # labeled folder (cases.json) for the evaluation
    stages: tuple[str, ...] = ("data", "preprocess", "train", "export", "evaluate")

    def __post_init__(self) -> None:
        problems = []
        if self.dataset is None and self.num_volumes < 6:
            problems.append("num_volumes must be at least 6 (train and validation subjects)")
        if any(s < 16 for s in self.shape):
            problems.append(f"shape {self.shape}: every side must be at least 16 voxels")
        if not self.train_minutes > 0:
            problems.append(f"train_minutes must be > 0, got {self.train_minutes}")
        if self.patch_size < 16 or self.patch_size % 8:
            problems.append(f"patch_size must be a multiple of 8 and at least 16, got {self.patch_size}")
        if self.batch_size < 1 or self.eval_volumes < 8:
            problems.append("batch_size must be >= 1 and eval_volumes >= 8")
        if not 0 < self.peak_lr < 1:
            problems.append(f"peak_lr must be in (0, 1), got {self.peak_lr}")
        if self.max_steps < 10:
            problems.append(f"max_steps must be at least 10, got {self.max_steps}")
        if self.random_seeds < 1:
            problems.append(f"random_seeds must be at least 1, got {self.random_seeds}")
        try:
            self.training_overrides()
        except InvalidInput as e:
            problems += [f"overrides: {p}" for p in (e.problems or [str(e)])]
        if self.dataset is None:
            try:
                self.phantom_config(self.num_volumes, self.seed)
            except InvalidInput as e:
                problems += [f"phantoms: {p}" for p in e.problems]
        from nnssl.evaluation.probe import POOLINGS

        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        unknown = set(self.stages) - {"data", "preprocess", "train", "export", "evaluate"}
        if unknown:
            problems.append(f"unknown stages {sorted(unknown)}")
        if problems:
            raise InvalidInput("invalid demo settings:", problems)

    def phantom_config(self, num_volumes: int, seed: int):
        """The phantoms of the demo's task (pretraining set: seed, labeled set: seed + 1)."""
        from nnssl.data.phantoms import PhantomConfig

        return PhantomConfig(num_volumes=num_volumes, seed=seed, shape=self.shape, modality=self.modality,
                             num_classes=self.num_classes, key_organ_scale=self.key_organ_scale,
                             anisotropic=self.anisotropic, random_orientation=self.random_orientation,
                             paired_organs=self.paired_organs)

    def training_overrides(self) -> dict[str, Any]:
        from nnssl.settings import parse_assignments

        return parse_assignments(list(self.overrides))

    def labeled_set_config(self):
        """The protocol's test set, or a set of its kind with `eval_volumes` cases."""
        from dataclasses import replace

        from nnssl.evaluation.protocol import NUM_CASES, protocol_set_config

        config = protocol_set_config("test")
        return config if self.eval_volumes == NUM_CASES else replace(config, num_volumes=self.eval_volumes)


@dataclass
class DemoResult:
    roots: dict[str, Path]
    dataset: str
    stages: list[tuple[str, float, str]] = field(default_factory=list)  # (stage, seconds, summary)
    files: dict[str, Path] = field(default_factory=dict)
    loss_curve: list[list[float]] = field(default_factory=list)
    val_curve: list[list[float]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None

    collapse_warnings: list[str] = field(default_factory=list)  # the training log's collapse warnings

    def verdicts(self) -> dict[str, bool | None]:
        """Per score ("dense", "volume"): does pretraining beat random init by the protocol's margin
        (None: no such score, or too few labeled cases to tell)."""
        from nnssl.evaluation.against_random import margin_verdict

        if not self.evaluation or "dense" not in self.evaluation:
            return {}
        return {score: margin_verdict(self.evaluation, score) for score in ("dense", "volume")}

    @property
    def pretraining_beats_random(self) -> bool | None:
        """The demo's answer: yes only when the dense probe and the volume probe both clear the
        margin; None when there is nothing to judge or too few labeled cases."""
        verdicts = list(self.verdicts().values())
        if not verdicts or any(v is None for v in verdicts):
            return None
        return all(verdicts)

    def format(self) -> str:
        lines = [f"nnssl demo: dataset {self.dataset}"]
        for name, seconds, summary in self.stages:
            lines.append(f"  [{seconds:6.1f} s] {name}: {summary}")
        if self.loss_curve:
            lines.append("Training loss (step: loss): " + ", ".join(f"{int(s)}: {v:.4f}" for s, v in
                                                                   _thin(self.loss_curve, 8)))
        if self.val_curve:
            lines.append("Validation loss: " + ", ".join(f"{int(s)}: {v:.4f}" for s, v in _thin(self.val_curve, 8)))
        if self.loss_curve:
            lines.append(f"Collapse warnings during training: {len(self.collapse_warnings)}"
                         + (f" (first: {self.collapse_warnings[0]})" if self.collapse_warnings else ""))
        if self.evaluation and "dense" in self.evaluation:
            lines += self._format_comparison()
        elif self.evaluation:  # a labeled folder without context labels: the volume probe only
            from nnssl.evaluation.report import format_summary

            lines += ["Linear probe on held-out labeled volumes (pretrained vs random init):",
                      *("  " + line for line in format_summary(self.evaluation).splitlines())]
        if self.files:
            lines.append("Where everything is:")
            lines += [f"  {k:<22} {v}" for k, v in self.files.items()]
        lines.append("Folders (export these to keep working with the demo data):")
        lines += [f"  export {k}={v}" for k, v in self.roots.items()]
        return "\n".join(lines)


    def _format_comparison(self) -> list[str]:
        from nnssl.evaluation.against_random import MIN_VERDICT_CASES, format_comparison

        ev = self.evaluation or {}
        margin = 100 * ev["required_margin"]
        answer = {True: "yes", False: "no", None: "too few labeled cases to tell"}
        verdicts = self.verdicts()
        per_score = ", ".join(f"{k} probe {100 * ev[k]['margin']:+.1f} points" + ("" if v is None else f": {answer[v]}")
                              for k, v in verdicts.items() if k in ev)
        return ["Frozen-feature probes on the held-out labeled phantoms (pretrained vs random init):",
                *("  " + line for line in format_comparison(ev).splitlines()),
                f"Pretraining beats random initialisation: {answer[self.pretraining_beats_random]} ({per_score}; "
                f"a win needs >= {margin:.0f} points on both probes, on >= {MIN_VERDICT_CASES} cases; one training "
                "seed, the protocol's verdict takes five: benchmarks/phantom_probe.py; documentation/evaluation.md)"]


def _thin(points: list[list[float]], n: int) -> list[list[float]]:
    if len(points) <= n:
        return points
    picks = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [points[i] for i in picks]


def _use_demo_roots(folder: Path) -> dict[str, Path]:
    """Point the three nnssl roots at sub-folders of the demo folder (this process only)."""
    roots = {}
    for var in paths.ROOT_VARIABLES:
        root = (folder / var).resolve()
        root.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(root)
        roots[var] = root
    return roots


def _timed(result: DemoResult, name: str, fn: Callable[[], str]) -> None:
    logger.info("demo: %s ...", name)
    start = time.perf_counter()
    summary = fn()
    result.stages.append((name, time.perf_counter() - start, summary))
    logger.info("demo: %s done: %s", name, summary)


def _data_stages(config: DemoConfig, result: DemoResult) -> Path:
    """Phantoms -> pretrain_data.json -> integrity check; returns the labeled phantom folder."""
    from nnssl.data.builders import create_dataset
    from nnssl.data.integrity import verify_collection
    from nnssl.data.phantom_files import write_phantom_collection

    raw = result.roots[paths.RAW] / result.dataset
    phantom_dir, labeled_dir = raw / "bids", config.folder.resolve() / "labeled_phantoms"

    def phantoms() -> str:
        write_phantom_collection(phantom_dir, config.phantom_config(config.num_volumes, config.seed),
                                 num_processes=config.num_processes)
        write_phantom_collection(labeled_dir, config.labeled_set_config(), num_processes=config.num_processes)
        return (f"{config.num_volumes} unlabeled volumes in {phantom_dir}, {config.eval_volumes} labeled volumes "
                f"for the probe in {labeled_dir}")

    holder: dict[str, Any] = {}

    def build() -> str:
        path, collection = create_dataset(phantom_dir, config.dataset_id, config.dataset_name, layout="bids",
                                          overwrite=config.overwrite)
        holder["collection"] = collection
        s = collection.summary()
        modalities = ", ".join(f"{k}: {v}" for k, v in s["modalities"].items())
        return f"{path} ({s['subjects']} subjects, {s['images']} images; {modalities})"

    def verify() -> str:
        report = verify_collection(holder["collection"], num_processes=config.num_processes)
        if not report.ok:
            raise NnsslError("demo data failed the integrity check:\n" + report.format_table())
        return f"{report.num_checked} images checked, no problems"

    _timed(result, "generate phantoms", phantoms)
    _timed(result, "create dataset", build)
    _timed(result, "verify dataset integrity", verify)
    return labeled_dir


def run_demo(config: DemoConfig) -> DemoResult:
    """Run the selected stages; returns what was made and measured."""
    own = config.dataset is not None
    # the user's own dataset lives under their nnssl_* roots; phantoms under the demo folder
    roots = {var: paths.env_root(var) for var in paths.ROOT_VARIABLES} if own else _use_demo_roots(config.folder)
    dataset = (paths.resolve_dataset_name(config.dataset) if own
               else paths.dataset_folder_name(config.dataset_id, config.dataset_name))
    result = DemoResult(roots=roots, dataset=dataset)
    labeled = config.labeled
    if "data" in config.stages and not own:
        labeled = labeled or _data_stages(config, result)
    elif not own and labeled is None and (config.folder / "labeled_phantoms" / "cases.json").is_file():
        labeled = config.folder.resolve() / "labeled_phantoms"
    if "preprocess" in config.stages:
        _timed(result, "plan and preprocess", lambda: _preprocess(config, dataset, roots))
    trainer = None
    if "train" in config.stages:
        trainer = _train(config, dataset, result)
    if "export" in config.stages and trainer is not None:
        _timed(result, "export", lambda: _export(dataset, trainer, result))
    if "evaluate" in config.stages and "checkpoint" in result.files:
        if labeled is None:
            logger.warning("demo: no labeled folder (--labeled) for dataset %s: evaluation skipped", dataset)
        else:
            _timed(result, "evaluate against random init", lambda: _evaluate(labeled, result, config))
    return result


def _preprocess(config: DemoConfig, dataset: str, roots: dict[str, Path]) -> str:
    from nnssl.preprocessing.runner import plan_and_preprocess

    outcomes = plan_and_preprocess([dataset], configurations=("onemmiso",), num_processes=config.num_processes,
                                   num_processes_fingerprint=config.num_processes, clean=True)  # phantoms are new
    failed = [f for o in outcomes for f in o.failures]
    if failed:
        raise NnsslError(f"demo preprocessing failed for {len(failed)} cases: {failed[:3]}")
    return "; ".join(str(o) for o in outcomes) + f" -> {roots[paths.PREPROCESSED] / dataset}"


def _train(config: DemoConfig, dataset: str, result: DemoResult) -> str:
    import torch

    from nnssl.training.budget import steps_for_budget
    from nnssl.training.names import resolve_config
    from nnssl.training.options import RunOptions
    from nnssl.training.run import train

    base = f"IJEPATrainer_Tiny_P{config.patch_size}_BS{config.batch_size}_lr{config.peak_lr:g}"
    overrides = config.training_overrides()
    holder: dict[str, Any] = {}

    def calibrate() -> str:
        # the loop adds loading, validation, monitors and checkpoints to the pure step time (~35%
        # measured on the default demo)
        fit = steps_for_budget(resolve_config(base + "_1ep_1it", overrides=overrides), 60.0 * config.train_minutes,
                               overhead_fraction=0.35)
        steps = min(fit, config.max_steps)
        epochs = min(10, steps)
        holder["trainer"] = f"{base}_{epochs}ep_{max(1, steps // epochs)}it"
        steps = epochs * max(1, steps // epochs)
        if fit < config.max_steps:
            logger.warning("demo: only %d of the %d training steps fit %g min on this machine: the probe margin was "
                           "measured at %d steps and may not show (raise --minutes)", fit, config.max_steps,
                           config.train_minutes, RECIPE_STEPS)
            return f"{holder['trainer']}: {steps} steps fit {config.train_minutes:g} min"
        return f"{holder['trainer']}: {steps} steps (about {fit} would fit {config.train_minutes:g} min)"

    _timed(result, "calibrate training budget", calibrate)
    trainer = holder["trainer"]

    def run() -> str:
        run_config = resolve_config(trainer, overrides=overrides)
        outcome = train(RunOptions(dataset=dataset, device="cpu", num_workers=1,
                                   log_every=max(10, run_config.total_steps // 40)), run_config)
        ckpt = torch.load(outcome.checkpoint, weights_only=True)
        result.loss_curve = ckpt["history"].get("train_loss", [])
        result.val_curve = ckpt["history"].get("val_loss", [])
        result.files["checkpoint"] = Path(outcome.checkpoint)
        result.files["progress.png"] = Path(outcome.checkpoint).parent / "progress.png"
        result.files["training log"] = next(Path(outcome.checkpoint).parent.glob("training_log_*.txt"))
        result.collapse_warnings = _collapse_warnings(result.files["training log"])
        first, last = result.loss_curve[0][1], result.loss_curve[-1][1]
        recipe = f" with {' '.join(config.overrides)}" if config.overrides else ""
        return f"{outcome.step} steps{recipe}, train loss {first:.4f} -> {last:.4f} ({outcome.checkpoint})"

    _timed(result, "pretrain I-JEPA (CPU)", run)
    return trainer


def _collapse_warnings(log: Path) -> list[str]:
    """The training log's collapse alarms and partial-collapse warnings (WARNING lines)."""
    return [line.split("WARNING", 1)[-1].strip(" :-") for line in log.read_text().splitlines()
            if "WARNING" in line and "collapse" in line.lower()]


def _export(dataset: str, trainer: str, result: DemoResult) -> str:
    from nnssl.export.share import export

    run_folder = result.files["checkpoint"].parent.parent
    out = result.roots[paths.RESULTS] / dataset / "exported" / trainer
    shared = export(run_folder, out)
    result.files["exported folder"] = shared.folder
    return f"{shared.folder} ({', '.join(f.name for f in shared.files)})"


def _evaluate(labeled: Path, result: DemoResult, config: DemoConfig) -> str:
    """With context labels (the demo's phantoms, the protocol sets): both protocol probes against
    `config.random_seeds` random inits; otherwise the volume probe of `nnssl_evaluate`."""
    from nnssl.evaluation.labeled import load_labeled_set

    out = result.files["checkpoint"].parent / "evaluation"
    labeled_set = load_labeled_set(labeled)
    result.files["evaluation.json"] = out / "evaluation.json"
    if labeled_set.context_labels:
        from nnssl.evaluation.against_random import compare_checkpoint

        ev = result.evaluation = compare_checkpoint(result.files["checkpoint"], labeled_set, out,
                                                    random_seeds=tuple(range(config.random_seeds)))
        return ", ".join(f"{k} probe: pretrained {ev[k]['pretrained']:.3f} vs random {ev[k]['random_mean']:.3f}"
                         for k in ("dense", "volume") if k in ev) + f" ({out})"
    from nnssl.evaluation.evaluate import evaluate_checkpoint
    from nnssl.evaluation.probe import ProbeConfig

    result.evaluation = evaluate_checkpoint(result.files["checkpoint"], labeled, out,
                                            probe=ProbeConfig(pooling=config.pooling))
    result.files["evaluation.png"] = out / "evaluation.png"
    enc = result.evaluation["encoders"]
    if "volume_probe" not in enc["pretrained"]:
        return f"collapse statistics in {out} (no class labels for a volume probe)"
    pre, ref = enc["pretrained"]["volume_probe"]["accuracy"], enc["random"]["volume_probe"]["accuracy"]
    return f"volume probe accuracy: pretrained {pre:.3f} vs random {ref:.3f} ({out})"
