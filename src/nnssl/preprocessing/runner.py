"""Preprocessing runs: the jobs of a collection, the worker pool, resume, sharding, the report.

Each case runs in a worker (`case.run_case`). A case counts as done only when its properties
JSON exists, carries the current plan hash and its arrays open (`storage.case_is_complete`),
so a re-run skips finished cases, redoes partial ones, and a kill at any moment never leaves a
file that a later step would read as valid. One bad case never stops the others: failures go
to `preprocessing_report*.json` with case id, path and reason.

Memory: jobs are generated lazily and at most two per worker are in flight (`pool.imap`);
results are small dicts folded into running totals (counts, seconds per stage, the largest
worker peak RSS), so the parent does not grow with the number of cases.

Sharding (`-part K -total_parts N`): part K takes every N-th case. Each part writes its own
report; `pretrain_data__<config>.json` is rebuilt atomically from what is complete on disk by
whichever part finishes (and again by any later run), so parts never race on shared state.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnssl import paths
from nnssl.data.collection import AssociatedMasks, Collection, FlatImage, portable_path
from nnssl.errors import NnsslError
from nnssl.io_utils import write_json
from nnssl.log import get_logger
from nnssl.planning.fingerprint import FingerprintConfig, extract_fingerprint
from nnssl.planning.planner import plan_experiment
from nnssl.planning.plans import Plans
from nnssl.preprocessing import storage
from nnssl.preprocessing.case import STAGES, CaseJob, peak_rss_mb, run_case
from nnssl.workers import imap

logger = get_logger(__name__)


@dataclass
class PreprocessOutcome:
    configuration: str
    total: int
    done: int = 0
    skipped: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    peak_worker_rss_mb: float = 0.0
    peak_parent_rss_mb: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        return (f"{self.configuration}: {self.done} preprocessed, {self.skipped} already complete, "
                f"{len(self.failures)} failed of {self.total} cases in {self.seconds:.1f} s")

    def to_report(self, part: int, total_parts: int) -> dict[str, Any]:
        return {"configuration": self.configuration, "part": part, "total_parts": total_parts,
                "total": self.total, "done": self.done, "skipped": self.skipped,
                "failed": len(self.failures), "failures": self.failures, "seconds": round(self.seconds, 2),
                "seconds_per_stage": {k: round(v, 2) for k, v in self.stage_seconds.items()},
                "peak_worker_rss_mb": round(self.peak_worker_rss_mb, 1),
                "peak_parent_rss_mb": round(self.peak_parent_rss_mb, 1)}


def case_stem(output_root: Path, collection: Collection, img: FlatImage) -> Path:
    from nnssl.data.imageio import image_stem

    return (output_root / collection.collection_name / img.dataset_key / img.subject_id / img.session_id
            / image_stem(img.entry.name))


def _jobs(collection: Collection, plans: Plans, configuration: str, output_root: Path,
          failures: list[dict[str, str]], part: int = 0, total_parts: int = 1) -> Iterator[CaseJob]:
    """This part's cases, generated lazily; an unresolvable path (unset `$VAR`) is a failure."""
    config = plans.configuration(configuration)
    plan_hash = plans.plan_hash(configuration)
    for index, img in enumerate(collection.iter_images()):
        if index % total_parts != part:
            continue
        try:
            image = str(img.image_path())
            masks = {"anatomy_mask": img.anatomy_mask_path(), "anonymization_mask": img.anonymization_mask_path()}
        except NnsslError as e:
            failures.append({"image_id": img.image_id, "path": img.entry.image_path, "reason": str(e)})
            continue
        modality = img.entry.modality or "unknown"
        yield CaseJob(
            image_id=img.image_id, image=image, stem=str(case_stem(output_root, collection, img)),
            plan_hash=plan_hash, transpose_forward=tuple(plans.transpose_forward),
            spacing=tuple(config.spacing) if config.spacing else None, patch_size=tuple(config.patch_size),
            resampling_method=config.resampling_fn_data_kwargs.get("method", "scipy_nnunet"),
            normalization=plans.normalization_per_modality.get(modality, {"scheme": "ZScoreNormalization"}),
            masks={k: str(v) if v else None for k, v in masks.items()})


DEFAULT_PLANS = "nnsslPlans"


def preprocessed_collection_path(preprocessed_dataset: Path, plans: Plans, configuration: str) -> Path:
    """`pretrain_data__<config>.json` for the default plans' data; plans whose preprocessing
    differs (another `data_identifier`) get `pretrain_data__<data_identifier>.json`, so two plans
    never overwrite each other's case list, and plans that only change the patch or batch size
    (same data_identifier, same arrays) share it."""
    identifier = plans.configuration(configuration).data_identifier
    stem = configuration if identifier == f"{DEFAULT_PLANS}_{configuration}" else identifier
    return preprocessed_dataset / f"pretrain_data__{stem}.json"


def load_plans(preprocessed_dataset: Path, plans_name: str = DEFAULT_PLANS) -> Plans:
    path = preprocessed_dataset / f"{plans_name}.json"
    if not path.is_file():
        others = sorted(p.stem for p in preprocessed_dataset.glob("*Plans*.json"))
        raise NnsslError(f"{path} does not exist; run nnssl_plan_and_preprocess -d {preprocessed_dataset.name} "
                         f"or pass the plans name with -p (plans found: {', '.join(others) or 'none'})")
    return Plans.load(path)


def write_preprocessed_collection(collection: Collection, plans: Plans, configuration: str,
                                  output_root: Path, destination: Path) -> int:
    """`pretrain_data__<config>.json` listing the complete cases, paths pointing at the arrays."""
    plan_hash = plans.plan_hash(configuration)
    out = Collection.from_dict(collection.to_dict(), source=str(destination))
    count = 0
    flat = {id(img.entry): img for img in out.iter_images()}
    for dataset in out.datasets.values():
        for subject in dataset.subjects.values():
            for session in subject.sessions.values():
                kept = []
                for entry in session.images:
                    img = flat[id(entry)]
                    files = storage.CaseFiles.for_stem(case_stem(output_root, out, img))
                    if not storage.case_is_complete(files, plan_hash):
                        continue
                    entry.image_path = portable_path(files.image)
                    entry.associated_masks = AssociatedMasks(
                        anatomy_mask=portable_path(files.anatomy_mask) if files.anatomy_mask.exists() else None,
                        anonymization_mask=portable_path(files.anonymization_mask)
                        if files.anonymization_mask.exists() else None)
                    kept.append(entry)
                    count += 1
                session.images = kept
    out.save(destination)
    return count


def preprocess(dataset: str | int, configurations: tuple[str, ...] = ("onemmiso",), num_processes: int = 4,
               part: int = 0, total_parts: int = 1, plans_name: str = DEFAULT_PLANS) -> list[PreprocessOutcome]:
    """Preprocess every case of `dataset` for `configurations` of the plans `plans_name`."""
    if not 0 <= part < total_parts:
        raise NnsslError(f"-part {part} must be in [0, -total_parts {total_parts})")
    name = paths.resolve_dataset_name(dataset)
    pre = paths.nnssl_preprocessed() / name
    plans = load_plans(pre, plans_name)
    collection = Collection.load(paths.nnssl_raw() / name / "pretrain_data.json")
    outcomes = []
    for configuration in configurations:
        start = time.perf_counter()
        output_root = pre / plans.configuration(configuration).data_identifier
        outcome = PreprocessOutcome(configuration, total=len(range(part, collection.num_images(), total_parts)))
        jobs = _jobs(collection, plans, configuration, output_root, outcome.failures, part, total_parts)
        _collect(imap(run_case, jobs, num_processes, describe=lambda job: f"{job.image_id} ({job.image})"),
                 outcome)
        outcome.seconds = time.perf_counter() - start
        outcome.peak_parent_rss_mb = peak_rss_mb()
        logger.debug("%s: seconds per stage (summed over workers) %s; peak RSS of a worker %.0f MB, "
                     "of this process %.0f MB", configuration,
                     {k: round(v, 1) for k, v in outcome.stage_seconds.items()},
                     outcome.peak_worker_rss_mb, outcome.peak_parent_rss_mb)
        suffix = "" if total_parts == 1 else f"_part{part}of{total_parts}"
        write_json(pre / f"preprocessing_report{suffix}__{configuration}.json", outcome.to_report(part, total_parts))
        write_preprocessed_collection(collection, plans, configuration, output_root,
                                      preprocessed_collection_path(pre, plans, configuration))
        outcomes.append(outcome)
    return outcomes


def _collect(results: Iterable[dict[str, Any]], outcome: PreprocessOutcome) -> None:
    """Fold results into the outcome as they arrive; the bar shows cases/s and the ETA, and its
    last state (the overall rate) stays on the terminal."""
    from tqdm import tqdm

    for result in tqdm(results, total=outcome.total, unit="case", desc=outcome.configuration):
        if result["status"] == "failed":
            outcome.failures.append({k: result[k] for k in ("image_id", "path", "reason")})
        elif result["status"] == "skipped":
            outcome.skipped += 1
        else:
            outcome.done += 1
        for stage, seconds in result["seconds"].items():
            outcome.stage_seconds[stage] += seconds
        outcome.peak_worker_rss_mb = max(outcome.peak_worker_rss_mb, result["peak_rss_mb"])


def extract_and_save_fingerprint(dataset: str | int, num_processes: int = 4) -> Path:
    name = paths.resolve_dataset_name(dataset)
    collection = Collection.load(paths.nnssl_raw() / name / "pretrain_data.json")
    fp = extract_fingerprint(collection, FingerprintConfig(num_processes=num_processes))
    out = paths.nnssl_preprocessed() / name / "dataset_fingerprint.json"
    write_json(out, fp.to_dict())
    return out


def plan_and_save(dataset: str | int, ct_normalization: str = "ZScoreNormalization") -> Path:
    from nnssl.io_utils import read_json

    name = paths.resolve_dataset_name(dataset)
    fp_path = paths.nnssl_preprocessed() / name / "dataset_fingerprint.json"
    if not fp_path.is_file():
        raise NnsslError(f"{fp_path} not found; run nnssl_extract_fingerprint -d {dataset} first")
    plans = plan_experiment(name, read_json(fp_path), ct_normalization=ct_normalization)
    out = paths.nnssl_preprocessed() / name / "nnsslPlans.json"
    plans.save(out)
    return out


def plan_and_preprocess(datasets: list[str | int], configurations: tuple[str, ...] = ("onemmiso",),
                        num_processes: int = 4, num_processes_fingerprint: int = 4,
                        verify: bool = False, no_pp: bool = False, clean: bool = False,
                        ct_normalization: str = "ZScoreNormalization") -> list[PreprocessOutcome]:
    outcomes: list[PreprocessOutcome] = []
    for dataset in datasets:
        name = paths.resolve_dataset_name(dataset)
        pre = paths.nnssl_preprocessed() / name
        if clean and pre.exists():
            shutil.rmtree(pre)
        if verify:
            from nnssl.data.integrity import verify_dataset

            report = verify_dataset(name, num_processes=num_processes_fingerprint)
            if not report.ok:
                raise NnsslError(f"{name} failed the integrity check:\n{report.format_table()}")
        extract_and_save_fingerprint(name, num_processes_fingerprint)
        plan_and_save(name, ct_normalization)
        if not no_pp:
            outcomes += preprocess(name, configurations, num_processes)
    return outcomes
