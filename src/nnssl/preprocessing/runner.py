"""Preprocessing runs: the jobs of a collection, the worker pool, resume, sharding, the report.

Each case runs in a worker (`case.run_case`). A case counts as done only when its properties
JSON exists, carries the current plan hash and its arrays open (`storage.case_is_complete`),
so a re-run skips finished cases, redoes partial ones, and a kill at any moment never leaves a
file that a later step would read as valid. One bad case never stops the others: failures go
to `preprocessing_report*.json` with case id, path and reason.

Memory: jobs are generated lazily and at most two per worker are in flight (`pool.imap`);
results are small dicts folded into running totals (counts, seconds per stage, the largest
worker peak RSS), so the parent does not grow with the number of cases.

Earlier work is kept unless a flag says otherwise: an existing fingerprint is reused unless
`--clean` (as in nnU-Net; an outdated one is an error), re-planning keeps a changed plans file
as `<plans>.json.previous`, and only `--delete_preprocessed_data` deletes arrays, naming what
it deleted. Custom plans and `splits_final.json` are never deleted.

Sharding (`-part K -total_parts N`): part K takes every N-th case. Each part writes its own
report; `pretrain_data__<config>.json` is rebuilt atomically from what is complete on disk at the
end of every part (and of any later run), the parts' rebuilds taking turns under a file lock so
the last one lists every case (`merge.py`).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnssl import paths
from nnssl.data.collection import Collection, FlatImage
from nnssl.data.openmind import INVERTED_KEY
from nnssl.errors import NnsslError
from nnssl.io_utils import write_json
from nnssl.log import get_logger, progress
from nnssl.planning.fingerprint import FingerprintConfig, extract_fingerprint
from nnssl.planning.planner import plan_experiment
from nnssl.planning.plans import Plans
from nnssl.preprocessing.case import STAGES, CaseJob, peak_rss_mb, run_case
from nnssl.preprocessing.merge import case_relative_stem, write_preprocessed_collection  # noqa: F401  (re-exported)
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
    mask_warnings: int = 0  # cases whose anatomy mask seems to mark the background
    mask_warning_examples: list[str] = field(default_factory=list)

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
                "peak_parent_rss_mb": round(self.peak_parent_rss_mb, 1),
                "anatomy_masks_marking_background": self.mask_warnings,
                "anatomy_masks_marking_background_examples": self.mask_warning_examples}


def case_stem(output_root: Path, collection: Collection, img: FlatImage) -> Path:
    return output_root / case_relative_stem(collection, img.dataset_key, img.subject_id, img.session_id,
                                            img.entry.name)


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
        declared = img.entry.associated_masks.extra.get(INVERTED_KEY) if img.entry.associated_masks else None
        yield CaseJob(
            image_id=img.image_id, image=image, stem=str(case_stem(output_root, collection, img)),
            plan_hash=plan_hash, transpose_forward=tuple(plans.transpose_forward),
            spacing=tuple(config.spacing) if config.spacing else None, patch_size=tuple(config.patch_size),
            resampling_method=config.resampling_fn_data_kwargs.get("method", "scipy_nnunet"),
            normalization=plans.normalization_per_modality.get(modality, {"scheme": "ZScoreNormalization"}),
            masks={k: str(v) if v else None for k, v in masks.items()}, invert_anatomy_mask=declared is True)


DEFAULT_PLANS = "nnsslPlans"
PLANS_NAME = re.compile(r"[A-Za-z0-9_-]+")


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


def preprocess(dataset: str | int, configurations: tuple[str, ...] = ("onemmiso",),
               num_processes: int | Sequence[int] = 4, part: int = 0, total_parts: int = 1,
               plans_name: str = DEFAULT_PLANS, delete_data: bool = False) -> list[PreprocessOutcome]:
    """Preprocess every case of `dataset` for `configurations` of the plans `plans_name`, with
    `num_processes` workers (one number, or one per configuration as nnU-Net's `-np 8 4`)."""
    if not 0 <= part < total_parts:
        raise NnsslError(f"-part {part} must be in [0, -total_parts {total_parts})")
    workers = [num_processes] * len(configurations) if isinstance(num_processes, int) else list(num_processes)
    if len(workers) != len(configurations) or any(n < 1 for n in workers):
        raise NnsslError(f"num_processes {num_processes}: give one number >= 1, or one per configuration "
                         f"({', '.join(configurations)})")
    name = paths.resolve_dataset_name(dataset)
    pre = paths.nnssl_preprocessed() / name
    plans = load_plans(pre, plans_name)
    collection = Collection.load(paths.nnssl_raw() / name / "pretrain_data.json")
    folders = [pre / plans.configuration(c).data_identifier for c in configurations]  # unknown names fail here
    if delete_data and total_parts > 1:
        raise NnsslError("--delete_preprocessed_data with -part/-total_parts would delete the other parts' work; "
                         f"delete once before starting the parts (rm -r {' '.join(map(str, folders))}), then run "
                         "the parts without it")
    if delete_data:
        delete_preprocessed_data(name, configurations, plans_name)
    outcomes = []
    for configuration, num_workers in zip(configurations, workers):
        start = time.perf_counter()
        output_root = pre / plans.configuration(configuration).data_identifier
        outcome = PreprocessOutcome(configuration, total=len(range(part, collection.num_images(), total_parts)))
        jobs = _jobs(collection, plans, configuration, output_root, outcome.failures, part, total_parts)
        _collect(imap(run_case, jobs, num_workers, describe=lambda job: f"{job.image_id} ({job.image})"),
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
                                      preprocessed_collection_path(pre, plans, configuration), num_workers)
        outcomes.append(outcome)
    return outcomes


MASK_FIX = ("Patches meant to be centred on anatomy would be centred on air. If these masks hold 1 outside the "
            "anatomy (OpenMind's fb_mask files do), mark them with \"anatomy_mask_inverted\": true in their "
            "associated_masks (nnssl_create_dataset --openmind does), then preprocess again with "
            "--delete_preprocessed_data")


def _collect(results: Iterable[dict[str, Any]], outcome: PreprocessOutcome) -> None:
    """Fold results into the outcome as they arrive; the bar shows cases/s and the ETA, and its
    last state (the overall rate) stays on the terminal."""
    for result in progress(results, total=outcome.total, unit="case", desc=outcome.configuration):
        if result["status"] == "failed":
            outcome.failures.append({k: result[k] for k in ("image_id", "path", "reason")})
        elif result["status"] == "skipped":
            outcome.skipped += 1
        else:
            outcome.done += 1
        for stage, seconds in result["seconds"].items():
            outcome.stage_seconds[stage] += seconds
        outcome.peak_worker_rss_mb = max(outcome.peak_worker_rss_mb, result["peak_rss_mb"])
        if "warning" in result:
            outcome.mask_warnings += 1
            if len(outcome.mask_warning_examples) < 20:
                outcome.mask_warning_examples.append(result["warning"])
            if outcome.mask_warnings == 1:
                logger.warning("%s. %s", result["warning"], MASK_FIX)
    if outcome.mask_warnings:
        logger.warning("%s: %d case(s) have an anatomy mask that seems to mark the background (listed in the "
                       "report). %s", outcome.configuration, outcome.mask_warnings, MASK_FIX)


FINGERPRINT = "dataset_fingerprint.json"


def fingerprint_mismatch(fingerprint: dict[str, Any], collection: Collection) -> str | None:
    """Why an existing fingerprint does not describe `collection` (images added or removed since
    it was extracted), or None. Only the image ids are compared: moving the data to another
    machine changes the resolved paths, not what was measured."""
    if not isinstance(fingerprint.get("images"), dict) or not isinstance(fingerprint.get("failures"), list):
        return "it is not an nnssl fingerprint (no 'images' and 'failures')"
    covered = set(fingerprint["images"]) | {f.get("image_id") for f in fingerprint["failures"]}
    listed = {img.image_id for img in collection.iter_images()}
    added, removed = listed - covered, covered - listed
    if not added and not removed:
        return None
    example = sorted(added or removed)[0]
    return (f"pretrain_data.json lists {len(added)} image(s) it does not cover and it covers {len(removed)} "
            f"that pretrain_data.json no longer lists (e.g. {example})")


def extract_and_save_fingerprint(dataset: str | int, num_processes: int = 4, clean: bool = False) -> tuple[Path, bool]:
    """(path, whether it was extracted now). As in nnU-Net and the reference, an existing
    `dataset_fingerprint.json` is reused unless `clean`; unlike them, one that no longer matches
    pretrain_data.json is an error (plans from it would be silently wrong), not reused."""
    from nnssl.io_utils import read_json

    name = paths.resolve_dataset_name(dataset)
    collection = Collection.load(paths.nnssl_raw() / name / "pretrain_data.json")
    out = paths.nnssl_preprocessed() / name / FINGERPRINT
    if out.is_file() and not clean:
        problem = fingerprint_mismatch(read_json(out), collection)
        if problem:
            raise NnsslError(f"{out} is out of date: {problem}; pass --clean to extract it again")
        logger.info("%s exists and matches pretrain_data.json: reused (--clean extracts it again)", out)
        return out, False
    fp = extract_fingerprint(collection, FingerprintConfig(num_processes=num_processes))
    write_json(out, fp.to_dict())
    return out, True


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [f for k in sorted(set(old) | set(new), key=str)
                for f in _changed_fields(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def plan_and_save(dataset: str | int, ct_normalization: str = "ZScoreNormalization",
                  plans_name: str = DEFAULT_PLANS) -> Path:
    """Write `<plans_name>.json` from the fingerprint. Re-planning replaces the file as in nnU-Net,
    but a file that differs (hand-edited, or planned from other data) is kept as
    `<plans_name>.json.previous` and the changed fields are logged, so an edit is never lost
    without a word. Other plans files are never touched."""
    from nnssl.io_utils import read_json

    if not PLANS_NAME.fullmatch(plans_name):
        raise NnsslError(f"plans name {plans_name!r}: use letters, digits, '_' and '-' (it names a file and folders)")
    name = paths.resolve_dataset_name(dataset)
    fp_path = paths.nnssl_preprocessed() / name / FINGERPRINT
    if not fp_path.is_file():
        raise NnsslError(f"{fp_path} not found; run nnssl_extract_fingerprint -d {dataset} first")
    plans = plan_experiment(name, read_json(fp_path), ct_normalization=ct_normalization, plans_name=plans_name)
    out = paths.nnssl_preprocessed() / name / f"{plans_name}.json"
    if out.is_file():
        old = read_json(out)
        changed = _changed_fields(old, plans.to_dict())
        if changed:
            previous = out.with_name(out.name + ".previous")
            write_json(previous, old)
            logger.warning("%s: replaced; its previous version is %s (changed: %s%s)", out, previous.name,
                           ", ".join(changed[:8]), f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    plans.save(out)
    return out


def delete_preprocessed_data(dataset: str | int, configurations: tuple[str, ...],
                             plans_name: str = DEFAULT_PLANS) -> list[str]:
    """Delete what preprocessing wrote for `configurations` of the plans `plans_name`: the folder
    `<data_identifier>/` (arrays and per-case properties), `pretrain_data__<...>.json` and the
    `preprocessing_report*__<config>.json` files. The fingerprint, every plans file and
    `splits_final.json` stay. Returns one line per thing removed."""
    name = paths.resolve_dataset_name(dataset)
    pre = paths.nnssl_preprocessed() / name
    plans = load_plans(pre, plans_name)
    removed = []
    for configuration in configurations:
        folder = pre / plans.configuration(configuration).data_identifier
        if folder.is_dir():
            files = [f for f in folder.rglob("*") if f.is_file()]
            size = sum(f.stat().st_size for f in files)
            shutil.rmtree(folder)
            removed.append(f"{folder}/ ({len(files)} files, {size / 1e9:.2f} GB)")
        for path in [preprocessed_collection_path(pre, plans, configuration),
                     *sorted(pre.glob(f"preprocessing_report*__{configuration}.json"))]:
            if path.is_file():
                path.unlink()
                removed.append(str(path))
    for line in removed:
        logger.info("deleted %s", line)
    return removed


def plan_and_preprocess(datasets: list[str | int], configurations: tuple[str, ...] = ("onemmiso",),
                        num_processes: int | Sequence[int] = 4, num_processes_fingerprint: int = 4,
                        verify: bool = False, no_pp: bool = False, clean: bool = False,
                        ct_normalization: str = "ZScoreNormalization", plans_name: str = DEFAULT_PLANS,
                        delete_data: bool = False) -> list[PreprocessOutcome]:
    """Fingerprint (reused unless `clean`), plan, preprocess (resumed). `delete_data` deletes
    the configurations' earlier preprocessed data first (`delete_preprocessed_data`)."""
    if delete_data and no_pp:
        raise NnsslError("--delete_preprocessed_data with --no_pp would delete data without preprocessing it "
                         "again; drop one of them")
    outcomes: list[PreprocessOutcome] = []
    for dataset in datasets:
        name = paths.resolve_dataset_name(dataset)
        if verify:
            from nnssl.data.integrity import verify_dataset

            report = verify_dataset(name, num_processes=num_processes_fingerprint)
            if not report.ok:
                raise NnsslError(f"{name} failed the integrity check:\n{report.format_table()}")
        extract_and_save_fingerprint(name, num_processes_fingerprint, clean=clean)
        plan_and_save(name, ct_normalization, plans_name)
        if not no_pp:
            outcomes += preprocess(name, configurations, num_processes, plans_name=plans_name,
                                   delete_data=delete_data)
    return outcomes
