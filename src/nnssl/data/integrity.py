"""Header-only integrity check of a dataset: every image and mask, every problem, one report.

Run before preprocessing (`nnssl_verify_dataset -d ID`, or `--verify_dataset_integrity`) so a
broken file is found in seconds rather than hours into preprocessing. Only headers are read:
existence, readability, dimensionality, spacing, and whether each mask lies on its image's
voxel grid. Every problem is reported, not just the first; a crash while checking one image
becomes an issue for that image.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nnssl import paths
from nnssl.data.collection import Collection, FlatImage
from nnssl.data.imageio import ImageReadError, geometry_mismatch, read_header, require_3d
from nnssl.errors import MissingEnvironmentVariable
from nnssl.io_utils import write_json


@dataclass
class IntegrityIssue:
    image_id: str | None
    location: str
    path: str | None
    problem: str


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
        lines = []
        if self.issues:
            w = min(max(len(i.location) for i in self.issues), 90)
            lines.append(f"{'location':<{w}}  problem")
            lines += [f"{i.location:<{w}}  {i.problem}" for i in self.issues]
        images_with_issues = len({i.image_id for i in self.issues if i.image_id})
        lines.append(f"{self.num_checked} of {self.num_images} images checked: "
                     + ("no problems" if self.ok else
                        f"{len(self.issues)} problems in {images_with_issues} images"))
        return "\n".join(lines)


def _check_image(args: tuple[str, str | None, str | None, float]) -> list[tuple[str, str | None, str]]:
    """(location suffix, path, problem) tuples for one image; never raises."""
    image_path, anat, anon, tolerance = args
    issues: list[tuple[str, str | None, str]] = []
    try:
        header = read_header(image_path)
        require_3d(header)
    except ImageReadError as e:
        return [(".image_path", image_path, str(e))]
    except Exception as e:  # a crash on one file must not hide the others: report it
        return [(".image_path", image_path, f"unexpected error while reading: {type(e).__name__}: {e}")]
    for key, mask_path in (("anatomy_mask", anat), ("anonymization_mask", anon)):
        if mask_path is None:
            continue
        try:
            mask_header = read_header(mask_path)
            require_3d(mask_header)
            problem = geometry_mismatch(header, mask_header, tolerance)
            if problem:
                issues.append((f".associated_masks.{key}", mask_path,
                               f"{mask_path}: does not match its image: {problem}; resample the mask "
                               "onto the image grid"))
        except ImageReadError as e:
            issues.append((f".associated_masks.{key}", mask_path, str(e)))
        except Exception as e:
            issues.append((f".associated_masks.{key}", mask_path,
                           f"unexpected error while reading: {type(e).__name__}: {e}"))
    return issues


def _resolved(img: FlatImage, report: IntegrityReport) -> tuple[str | None, str | None, str | None] | None:
    try:
        image = str(img.image_path())
        anat = img.anatomy_mask_path()
        anon = img.anonymization_mask_path()
    except MissingEnvironmentVariable as e:
        report.issues.append(IntegrityIssue(img.image_id, img.location, None, str(e)))
        return None
    return image, str(anat) if anat else None, str(anon) if anon else None


def verify_collection(collection: Collection, num_processes: int = 1,
                      tolerance: float = 1e-3) -> IntegrityReport:
    images = list(collection.iter_images())
    report = IntegrityReport(num_images=len(images), num_checked=0)
    for problem in collection.validate(check_files=False):
        report.issues.append(IntegrityIssue(None, problem.location, None, problem.message))
    jobs, owners = [], []
    for img in images:
        resolved = _resolved(img, report)
        if resolved is None:
            continue
        jobs.append((resolved[0], resolved[1], resolved[2], tolerance))
        owners.append(img)
    if num_processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=num_processes) as pool:
            results = list(pool.map(_check_image, jobs, chunksize=max(1, len(jobs) // (8 * num_processes))))
    else:
        results = [_check_image(j) for j in jobs]
    for img, issues in zip(owners, results):
        report.num_checked += 1
        for suffix, path, problem in issues:
            report.issues.append(IntegrityIssue(img.image_id, img.location + suffix, path, problem))
    return report


def default_report_path(dataset: str | int) -> Path:
    return paths.raw_dataset_dir(dataset) / "integrity_report.json"


def verify_dataset(dataset: str | int, num_processes: int = 1) -> IntegrityReport:
    """Check `$nnssl_raw/DatasetXXX_Name/pretrain_data.json` and every file it names."""
    collection = Collection.load(paths.raw_dataset_dir(dataset) / "pretrain_data.json")
    return verify_collection(collection, num_processes=num_processes)
