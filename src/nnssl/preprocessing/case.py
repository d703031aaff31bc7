"""One case through the pipeline, in a worker: read -> transpose -> crop -> normalise -> resample
-> write arrays -> write the properties JSON last.

The JSON is what marks a case complete (`storage.case_is_complete`), so it is written only after
every array has been renamed into place. Each stage is timed and the worker's peak RSS is
reported with the result, so a run can say where its time went and that its memory stayed
bounded without a profiler. Results are small dicts: the parent keeps nothing per case.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnssl.data.imageio import read_image, read_mask
from nnssl.errors import NnsslError
from nnssl.preprocessing import steps, storage

STAGES = ("read", "crop", "normalize", "resample", "write")


@dataclass(frozen=True)
class CaseJob:
    """Everything a worker needs for one case; plain values, cheap to send to a process."""
    image_id: str
    image: str
    stem: str
    plan_hash: str
    transpose_forward: tuple[int, int, int]
    spacing: tuple[float, float, float] | None  # None: keep the image's own spacing
    patch_size: tuple[int, int, int]
    resampling_method: str
    normalization: dict[str, Any]
    masks: dict[str, str | None] = field(default_factory=dict)  # anatomy_mask / anonymization_mask
    invert_anatomy_mask: bool = False  # the file marks background with 1 (OpenMind's fb_mask)


class _Stopwatch:
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident memory of this program so far, in MB.

    Linux's VmHWM belongs to the running program; `ru_maxrss` also keeps the peak of whatever
    the process was before `exec` (a launcher's fork), so it is only the fallback.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_case(job: CaseJob) -> dict[str, Any]:
    """Preprocess one case; never raises: a failure comes back with the case id, path and reason."""
    watch = _Stopwatch()
    try:
        notes: dict[str, Any] = {}
        status = _run(job, watch, notes)
        result: dict[str, Any] = {"image_id": job.image_id, "status": status, **notes}
    except NnsslError as e:
        result = {"image_id": job.image_id, "status": "failed", "path": job.image, "reason": str(e)}
    except Exception as e:  # a bug or an unexpected library error: report it with the case
        result = {"image_id": job.image_id, "status": "failed", "path": job.image,
                  "reason": f"unexpected error: {type(e).__name__}: {e}"}
    result["seconds"] = watch.seconds
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def anatomy_mask_looks_inverted(image: np.ndarray, anatomy: np.ndarray) -> bool:
    """True when the voxels an anatomy mask marks are darker on average than the rest: anatomy is
    brighter than air in MRI and CT, so such a mask most likely marks the background (then
    patches meant to be centred on anatomy would be centred on air)."""
    inside = anatomy != 0
    count = int(np.count_nonzero(inside))
    if count in (0, inside.size):
        return False
    total = float(image.sum(dtype=np.float64))
    in_sum = float(np.sum(image, where=inside, dtype=np.float64))
    return in_sum / count < (total - in_sum) / (inside.size - count)


def _run(job: CaseJob, watch: _Stopwatch, notes: dict[str, Any]) -> str:
    files = storage.CaseFiles.for_stem(Path(job.stem))
    if storage.case_is_complete(files, job.plan_hash):
        return "skipped"
    with watch.stage("read"):
        image, header = read_image(job.image)
        masks = {key: read_mask(path, header)[None] for key, path in job.masks.items() if path}
        if "anatomy_mask" in masks:
            if job.invert_anatomy_mask:
                masks["anatomy_mask"] = (masks["anatomy_mask"] == 0).astype(np.uint8)
            if anatomy_mask_looks_inverted(image, masks["anatomy_mask"][0]):
                notes["warning"] = (f"{job.masks['anatomy_mask']}: the anatomy mask marks voxels darker than the rest "
                                    "of the image: it seems to mark the background")
    with watch.stage("crop"):
        spacing_in = header.spacing[-3:]
        data, spacing = steps.transpose_case(image[None], spacing_in, job.transpose_forward)
        masks = {k: steps.transpose_case(m, spacing_in, job.transpose_forward)[0] for k, m in masks.items()}
        shape_before_crop = list(data.shape[1:])
        bbox = steps.nonzero_bbox(data)
        if bbox is None:
            raise NnsslError(f"{job.image}: the image is entirely zero; remove it from the dataset")
        data = steps.crop_to_bbox(data, bbox)
        masks = {k: steps.crop_to_bbox(m, bbox) for k, m in masks.items()}
        shape_after_crop = list(data.shape[1:])
    with watch.stage("normalize"):
        data, norm_info = _normalize(data, job.normalization)
        del image  # the cropped view kept it alive until the normalised copy existed
    with watch.stage("resample"):
        target = list(job.spacing) if job.spacing else list(spacing)
        new_shape = steps.new_shape_for_spacing(data.shape[1:], spacing, target)
        data = steps.resample_image(data, spacing, target, new_shape=new_shape, method=job.resampling_method)
        masks = {k: steps.resample_mask(m, spacing, target, new_shape=new_shape) for k, m in masks.items()}
    with watch.stage("write"):
        arrays = {"image": {"shape": list(data.shape)}}
        storage.save_array(files.image, data, patch_size=job.patch_size)
        targets = {"anonymization_mask": files.anonymization_mask, "anatomy_mask": files.anatomy_mask}
        for key, mask in masks.items():
            storage.save_array(targets[key], mask, patch_size=job.patch_size)
            arrays[key] = {"shape": list(mask.shape)}
        storage.save_properties(files.properties, {
            "image_id": job.image_id, "source": job.image, "plan_hash": job.plan_hash,
            "original_spacing": list(header.spacing), "original_origin": list(header.origin),
            "original_direction": list(header.direction), "transpose_forward": list(job.transpose_forward),
            "shape_before_cropping": shape_before_crop, "bbox_used_for_cropping": [list(b) for b in bbox],
            "shape_after_cropping": shape_after_crop, "spacing_after_transpose": list(spacing),
            "target_spacing": target, "shape_after_resampling": list(data.shape[1:]),
            "normalization": norm_info, "arrays": arrays, "anatomy_mask_inverted": job.invert_anatomy_mask,
        })
    return "done"


def _normalize(data: np.ndarray, normalization: dict[str, Any]) -> tuple[np.ndarray, dict]:
    if normalization.get("scheme") == "CTNormalization":
        stats = steps.IntensityStats(normalization["mean"], normalization["std"],
                                     normalization["percentile_00_5"], normalization["percentile_99_5"])
        return steps.ct_normalize(data, stats)
    return steps.zscore_normalize(data)
