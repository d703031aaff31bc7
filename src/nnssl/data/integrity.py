"""Header-only integrity check of a dataset: every image and mask, every problem, one report.

Run before preprocessing (`nnssl_verify_dataset -d ID`, or `--verify_dataset_integrity`) so a
broken file is found in seconds rather than hours into preprocessing. Only headers are read:
existence, readability, dimensionality, spacing, and whether each mask lies on its image's
voxel grid. Every problem is reported, not just the first: an image's masks are checked even
when the image itself is broken, and a crash while checking one file (an exception, or even a
worker process dying inside the image library) becomes an issue for that image.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nnssl import paths
from nnssl.data.collection import Collection, FlatImage
from nnssl.data.imageio import ImageHeader, ImageReadError, geometry_mismatch, header_problems, read_header
from nnssl.errors import InvalidInput, MissingEnvironmentVariable
from nnssl.io_utils import write_json
from nnssl.log import get_logger, progress

logger = get_logger(__name__)

_MASK_FIELDS = ("anatomy_mask", "anonymization_mask")


@dataclass
class IntegrityIssue:
    image_id: str | None  # None for problems of the collection's structure
    location: str         # where in pretrain_data.json, e.g. "datasets.X.subjects.s.sessions.t.images[0].image_path"
    path: str | None      # the file concerned, when known
    problem: str          # names the file and says the fix


@dataclass
class IntegrityReport:
    num_images: int
    num_checked: int
    issues: list[IntegrityIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "num_images": self.num_images, "num_checked": self.num_checked,
                "num_issues": len(self.issues), "issues": [asdict(i) for i in self.issues]}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def format_table(self) -> str:
        """One row per issue (location, problem), then a one-line summary."""
        lines = []
        if self.issues:
            w = min(max(len(i.location) for i in self.issues), 90)
            lines.append(f"{'location':<{w}}  problem")
            lines += [f"{i.location:<{w}}  {i.problem}" for i in self.issues]
        summary = f"{self.num_checked} of {self.num_images} images checked: "
        if self.ok:
            summary += "no problems"
        else:
            in_images = [i for i in self.issues if i.image_id is not None]
            summary += f"{len(self.issues)} problems"
            if in_images:
                summary += f" in {len({i.image_id for i in in_images})} images"
            if len(in_images) < len(self.issues):
                summary += f" ({len(self.issues) - len(in_images)} in the collection's structure)"
        lines.append(summary)
        return "\n".join(lines)


# A job is (image path, {mask field: mask path}, tolerance); paths are None when unresolvable.
_Job = tuple[str | None, dict[str, str], float]
# A finding is (location suffix, path, problem).
_Finding = tuple[str, str | None, str]


def _header_or_findings(suffix: str, path: str, findings: list[_Finding]) -> ImageHeader | None:
    """The header if the file is a usable 3D volume; otherwise append why and return None."""
    try:
        header = read_header(path)
    except ImageReadError as e:
        findings.append((suffix, path, str(e)))
        return None
    problems = header_problems(header)
    findings += [(suffix, path, p) for p in problems]
    return None if problems else header


def _check_image(job: _Job) -> list[_Finding]:
    """All findings for one image and its masks; never raises (runs in worker processes)."""
    image_path, masks, tolerance = job
    findings: list[_Finding] = []
    try:
        header = None
        if image_path is not None:
            header = _header_or_findings(".image_path", image_path, findings)
        for key, mask_path in masks.items():
            suffix = f".associated_masks.{key}"
            mask_header = _header_or_findings(suffix, mask_path, findings)
            if header is not None and mask_header is not None:
                problem = geometry_mismatch(header, mask_header, tolerance)
                if problem:
                    findings.append((suffix, mask_path, f"{mask_path}: does not match its image "
                                     f"{image_path}: {problem}; resample the mask onto the image grid"))
    except Exception as e:  # a bug or library surprise on one file must not hide the others
        files = ", ".join(p for p in (image_path, *masks.values()) if p is not None)
        findings.append((".image_path", image_path,
                         f"{files}: unexpected error while checking: {type(e).__name__}: {e}; "
                         "please report it with these files"))
    return findings


def _check_chunk(jobs: list[_Job]) -> list[list[_Finding]]:
    return [_check_image(j) for j in jobs]


def _crash_finding(job: _Job) -> list[_Finding]:
    files = [p for p in (job[0], *job[1].values()) if p is not None]
    return [(".image_path", job[0], f"{', '.join(files)}: checking this image or its masks crashed the "
             "worker process (the image library aborted on a malformed file); open the files with "
             "another tool, re-export or remove them")]


def _counted(items: list, bar) -> Any:  # type: ignore[no-untyped-def]
    """`items`, advancing `bar` after each (the single-process path of `_run_jobs`)."""
    for item in items:
        yield item
        bar.update(1)


def _run_jobs(jobs: list[_Job], num_processes: int) -> list[list[_Finding]]:
    """Findings per job, in order, using `num_processes` worker processes.

    "fork" is explicit (and safe here: workers only parse headers, no torch/OpenMP/blosc2 that a
    forked child could deadlock in) so a future Python default cannot silently change it. If a
    worker dies, the unfinished jobs are re-run one at a time in a fresh single-worker pool, so
    the crash is pinned on the one image that causes it and all others are still checked.
    """
    with progress(total=len(jobs), desc="integrity check", unit="img") as bar:
        if num_processes <= 1 or len(jobs) <= 1:
            return [_check_image(job) for job in _counted(jobs, bar)]
        context = multiprocessing.get_context("fork")
        results: list[list[_Finding] | None] = [None] * len(jobs)
        size = max(1, min(64, len(jobs) // (4 * num_processes)))
        try:
            with ProcessPoolExecutor(max_workers=num_processes, mp_context=context) as pool:
                futures = {pool.submit(_check_chunk, jobs[s:s + size]): s for s in range(0, len(jobs), size)}
                for future in as_completed(futures):
                    start = futures[future]
                    try:
                        results[start:start + size] = future.result()
                    except Exception:  # BrokenProcessPool: left as None, isolated below
                        pass
                    bar.update(len(jobs[start:start + size]))
        except Exception:  # shutting down a broken pool can raise too; the Nones say what is left
            pass
    left = [i for i, r in enumerate(results) if r is None]
    if left:
        logger.warning("a worker process died; re-checking %d images one at a time", len(left))
    pool = None
    try:
        for i in left:
            pool = pool or ProcessPoolExecutor(max_workers=1, mp_context=context)
            try:
                results[i] = pool.submit(_check_image, jobs[i]).result()
            except Exception:
                results[i] = _crash_finding(jobs[i])
                pool.shutdown(wait=True, cancel_futures=True)
                pool = None
    finally:
        if pool is not None:
            pool.shutdown()
    return results  # type: ignore[return-value]


def _resolve(img: FlatImage, unset: dict[str, list[Any]], tolerance: float) -> _Job | None:
    """Resolved paths for one image; unset `$VAR`s are collected (one issue per variable)."""
    getters = {"image_path": img.image_path, "anatomy_mask": img.anatomy_mask_path,
               "anonymization_mask": img.anonymization_mask_path}
    resolved: dict[str, str | None] = {}
    for key, get in getters.items():
        try:
            p = get()
            resolved[key] = None if p is None else str(p)
        except MissingEnvironmentVariable as e:
            resolved[key] = None
            entry = unset.setdefault(e.name, [img, key, str(e), 0])
            entry[3] += 1
    masks = {k: resolved[k] for k in _MASK_FIELDS if resolved[k] is not None}
    if resolved["image_path"] is None and not masks:
        return None
    return resolved["image_path"], masks, tolerance


def verify_collection(collection: Collection, num_processes: int = 1,
                      tolerance: float = 1e-3) -> IntegrityReport:
    """Check the collection's structure and the header of every image and mask it names."""
    if num_processes < 1:
        raise InvalidInput(f"num_processes must be at least 1, got {num_processes}")
    if not tolerance >= 0:
        raise InvalidInput(f"tolerance must be >= 0, got {tolerance}")
    images = list(collection.iter_images())
    report = IntegrityReport(num_images=len(images), num_checked=0)
    for problem in collection.validate(check_files=False):
        report.issues.append(IntegrityIssue(None, problem.location, None, problem.message))
    unset: dict[str, list[Any]] = {}
    jobs: list[_Job] = []
    owners: list[FlatImage] = []
    for img in images:
        job = _resolve(img, unset, tolerance)
        if job is not None:
            jobs.append(job)
            owners.append(img)
    # An unset variable is one mistake, however many paths use it: one issue, at its first use.
    for img, key, message, count in unset.values():
        where = img.location if key == "image_path" else f"{img.location}.associated_masks.{key}"
        report.issues.append(IntegrityIssue(
            img.image_id, where, None,
            f"{message} It is used by {count} path(s); the files named with it are not checked."))
    for img, job, findings in zip(owners, jobs, _run_jobs(jobs, num_processes)):
        if job[0] is not None:
            report.num_checked += 1
        for suffix, path, problem in findings:
            report.issues.append(IntegrityIssue(img.image_id, img.location + suffix, path, problem))
    return report


def default_report_path(dataset: str | int) -> Path:
    return paths.raw_dataset_dir(dataset) / "integrity_report.json"


def verify_dataset(dataset: str | int, num_processes: int = 1) -> IntegrityReport:
    """Check `$nnssl_raw/DatasetXXX_Name/pretrain_data.json` and every file it names."""
    collection = Collection.load(paths.raw_dataset_dir(dataset) / "pretrain_data.json")
    return verify_collection(collection, num_processes=num_processes)
