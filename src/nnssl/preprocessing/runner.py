"""The per-case preprocessing pipeline, the worker pool, resume, sharding and the failure report.

Each case: read (robust) -> transpose -> crop to the nonzero box (masks follow) -> normalise ->
resample -> write arrays, then the properties JSON last. A case counts as done only when its
JSON exists, carries the current plan hash and its arrays open (`storage.case_is_complete`),
so a re-run skips finished cases, redoes partial ones, and a kill at any moment never leaves a
file that a later step would read as valid. Workers return small dicts; nothing accumulates in
the parent. One bad case never stops the others: failures go to `preprocessing_report*.json`.

Sharding (`-part K -total_parts N`): part K takes every N-th case. Each part writes its own
report; `pretrain_data__<config>.json` is rebuilt atomically from what is complete on disk by
whichever part finishes (and again by any later run), so parts never race on shared state.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blosc2
import numpy as np

from nnssl import paths
from nnssl.data.collection import AssociatedMasks, Collection, FlatImage, portable_path
from nnssl.data.imageio import read_image, read_mask
from nnssl.errors import NnsslError
from nnssl.io_utils import write_json
from nnssl.log import get_logger
from nnssl.planning.fingerprint import FingerprintConfig, extract_fingerprint
from nnssl.planning.planner import plan_experiment
from nnssl.planning.plans import Plans
from nnssl.preprocessing import steps, storage

logger = get_logger(__name__)


@dataclass
class PreprocessOutcome:
    configuration: str
    total: int
    done: int = 0
    skipped: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        return (f"{self.configuration}: {self.done} preprocessed, {self.skipped} already complete, "
                f"{len(self.failures)} failed of {self.total} cases in {self.seconds:.1f} s")


def case_stem(output_root: Path, collection: Collection, img: FlatImage) -> Path:
    from nnssl.data.imageio import image_stem

    return (output_root / collection.collection_name / img.dataset_key / img.subject_id / img.session_id
            / image_stem(img.entry.name))


def _init_worker() -> None:
    """Workers decompress and resample single-threaded: parallelism comes from the processes."""
    import torch

    blosc2.set_nthreads(1)
    torch.set_num_threads(1)


def worker_pool(num_processes: int) -> ProcessPoolExecutor:
    """A pool whose workers start from a clean process ("forkserver"), never from a fork of the
    caller: a parent that already used torch (OpenMP) or blosc2 threads would hang forked
    children on their first parallel region."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=num_processes, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=_init_worker)


def _process_case(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a worker: preprocess one case; never raises (failures are returned)."""
    try:
        return _process_case_inner(job)
    except NnsslError as e:
        return {"image_id": job["image_id"], "status": "failed", "path": job["image"], "reason": str(e)}
    except Exception as e:  # a bug or an unexpected library error: report it with the case
        return {"image_id": job["image_id"], "status": "failed", "path": job["image"],
                "reason": f"unexpected error: {type(e).__name__}: {e}"}


def _process_case_inner(job: dict[str, Any]) -> dict[str, Any]:
    files = storage.CaseFiles.for_stem(Path(job["stem"]))
    if storage.case_is_complete(files, job["plan_hash"]):
        return {"image_id": job["image_id"], "status": "skipped"}
    image, header = read_image(job["image"])
    masks = {key: read_mask(path, header)[None] for key, path in job["masks"].items() if path}
    forward = tuple(job["transpose_forward"])
    data, spacing = steps.transpose_case(image[None], header.spacing[-3:], forward)
    masks = {k: steps.transpose_case(m, header.spacing[-3:], forward)[0] for k, m in masks.items()}
    shape_before_crop = list(data.shape[1:])
    bbox = steps.nonzero_bbox(data)
    if bbox is None:
        raise NnsslError(f"{job['image']}: the image is entirely zero; remove it from the dataset")
    data = steps.crop_to_bbox(data, bbox)
    masks = {k: steps.crop_to_bbox(m, bbox) for k, m in masks.items()}
    norm = job["normalization"]
    if norm.get("scheme") == "CTNormalization":
        stats = steps.IntensityStats(norm["mean"], norm["std"], norm["percentile_00_5"], norm["percentile_99_5"])
        data, norm_info = steps.ct_normalize(data, stats)
    else:
        data, norm_info = steps.zscore_normalize(data)
    target = job["spacing"] or list(spacing)
    new_shape = steps.new_shape_for_spacing(data.shape[1:], spacing, target)
    data = steps.resample_image(data, spacing, target, new_shape=new_shape, method=job["resampling_method"])
    masks = {k: steps.resample_mask(m, spacing, target, new_shape=new_shape) for k, m in masks.items()}
    arrays = {"image": {"shape": list(data.shape)}}
    patch = tuple(job["patch_size"])
    storage.save_array(files.image, data, patch_size=patch)
    targets = {"anonymization_mask": files.anonymization_mask, "anatomy_mask": files.anatomy_mask}
    for key, mask in masks.items():
        storage.save_array(targets[key], mask, patch_size=patch)
        arrays[key] = {"shape": list(mask.shape)}
    storage.save_properties(files.properties, {
        "image_id": job["image_id"], "source": job["image"], "plan_hash": job["plan_hash"],
        "original_spacing": list(header.spacing), "original_origin": list(header.origin),
        "original_direction": list(header.direction), "transpose_forward": list(forward),
        "shape_before_cropping": shape_before_crop, "bbox_used_for_cropping": [list(b) for b in bbox],
        "shape_after_cropping": list(steps.crop_to_bbox(np.empty((1, *shape_before_crop), bool), bbox).shape[1:]),
        "spacing_after_transpose": list(spacing), "target_spacing": list(target),
        "shape_after_resampling": list(data.shape[1:]), "normalization": norm_info, "arrays": arrays,
    })
    return {"image_id": job["image_id"], "status": "done"}


def _jobs(collection: Collection, plans: Plans, configuration: str, output_root: Path,
          failures: list[dict[str, str]]) -> list[dict[str, Any]]:
    config = plans.configuration(configuration)
    plan_hash = plans.plan_hash(configuration)
    jobs = []
    for img in collection.iter_images():
        try:
            image = str(img.image_path())
            masks = {"anatomy_mask": img.anatomy_mask_path(), "anonymization_mask": img.anonymization_mask_path()}
        except NnsslError as e:
            failures.append({"image_id": img.image_id, "path": img.entry.image_path, "reason": str(e)})
            continue
        modality = img.entry.modality or "unknown"
        jobs.append({
            "image_id": img.image_id, "image": image,
            "masks": {k: str(v) if v else None for k, v in masks.items()},
            "stem": str(case_stem(output_root, collection, img)), "plan_hash": plan_hash,
            "transpose_forward": plans.transpose_forward, "spacing": config.spacing,
            "patch_size": config.patch_size,
            "resampling_method": config.resampling_fn_data_kwargs.get("method", "scipy_nnunet"),
            "normalization": plans.normalization_per_modality.get(modality, {"scheme": "ZScoreNormalization"}),
        })
    return jobs


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
               part: int = 0, total_parts: int = 1) -> list[PreprocessOutcome]:
    if not 0 <= part < total_parts:
        raise NnsslError(f"-part {part} must be in [0, -total_parts {total_parts})")
    name = paths.resolve_dataset_name(dataset)
    pre = paths.nnssl_preprocessed() / name
    plans = Plans.load(pre / "nnsslPlans.json")
    collection = Collection.load(paths.nnssl_raw() / name / "pretrain_data.json")
    outcomes = []
    for configuration in configurations:
        start = time.perf_counter()
        output_root = pre / plans.configuration(configuration).data_identifier
        failures: list[dict[str, str]] = []
        jobs = _jobs(collection, plans, configuration, output_root, failures)[part::total_parts]
        outcome = PreprocessOutcome(configuration, total=len(jobs) + len(failures))
        if num_processes > 1 and len(jobs) > 1:
            with worker_pool(num_processes) as pool:
                results = pool.map(_process_case, jobs, chunksize=1)
                _collect(results, outcome, failures, len(jobs))
        else:
            _collect(map(_process_case, jobs), outcome, failures, len(jobs))
        outcome.failures = failures
        outcome.seconds = time.perf_counter() - start
        suffix = "" if total_parts == 1 else f"_part{part}of{total_parts}"
        write_json(pre / f"preprocessing_report{suffix}__{configuration}.json",
                   {"configuration": configuration, "part": part, "total_parts": total_parts,
                    "total": outcome.total, "done": outcome.done, "skipped": outcome.skipped,
                    "failed": len(failures), "failures": failures, "seconds": round(outcome.seconds, 2)})
        write_preprocessed_collection(collection, plans, configuration, output_root,
                                      pre / f"pretrain_data__{configuration}.json")
        outcomes.append(outcome)
    return outcomes


def _collect(results, outcome: PreprocessOutcome, failures: list, total: int) -> None:
    from tqdm import tqdm

    for result in tqdm(results, total=total, unit="case", desc=outcome.configuration, leave=False):
        if result["status"] == "failed":
            failures.append({k: result[k] for k in ("image_id", "path", "reason")})
        elif result["status"] == "skipped":
            outcome.skipped += 1
        else:
            outcome.done += 1


def extract_and_save_fingerprint(dataset: str | int, num_processes: int = 4) -> Path:
    name = paths.resolve_dataset_name(dataset)
    collection = Collection.load(paths.nnssl_raw() / name / "pretrain_data.json")
    fp = extract_fingerprint(collection, FingerprintConfig(num_processes=num_processes))
    out = paths.nnssl_preprocessed() / name / "dataset_fingerprint.json"
    write_json(out, fp.to_dict())
    return out


def plan_and_save(dataset: str | int) -> Path:
    from nnssl.io_utils import read_json

    name = paths.resolve_dataset_name(dataset)
    fp_path = paths.nnssl_preprocessed() / name / "dataset_fingerprint.json"
    if not fp_path.is_file():
        raise NnsslError(f"{fp_path} not found; run nnssl_extract_fingerprint -d {dataset} first")
    plans = plan_experiment(name, read_json(fp_path))
    out = paths.nnssl_preprocessed() / name / "nnsslPlans.json"
    plans.save(out)
    return out


def plan_and_preprocess(datasets: list[str | int], configurations: tuple[str, ...] = ("onemmiso",),
                        num_processes: int = 4, num_processes_fingerprint: int = 4,
                        verify: bool = False, no_pp: bool = False, clean: bool = False) -> list[PreprocessOutcome]:
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
        plan_and_save(name)
        if not no_pp:
            outcomes += preprocess(name, configurations, num_processes)
    return outcomes
