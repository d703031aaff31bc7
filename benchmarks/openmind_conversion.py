"""OpenMind conversion benchmark: time and peak memory of `nnssl_create_dataset --openmind` on a
synthetic download folder with OpenMind's layout. One JSON object on stdout.

The folder (`write_openmind_tree`) has what the converter reads and nothing else:
`openneuro_metadata.csv` with OpenMind's columns, and under `OpenMind/` every image and mask the
table names, as empty files (the converter checks that they exist; it reads no voxel). Its
shape follows OpenMind: datasets `ds000001...` of 20 subjects, half with `ses-*` folders;
per session an anat T1w with its `<stem>__Data/deface_mask.nii.gz` and `fb_mask.nii.gz`,
sometimes a T2w and a FLAIR without masks, a DWI with FA and MD maps derived from it in
`<stem>__Data/`; one image-quality score per (dataset, modality, derived_from) group, a few
missing.

    python benchmarks/openmind_conversion.py --rows 3000
    python benchmarks/openmind_conversion.py --rows 114000

The floor measured in the same run is reading the table's rows with the csv module
(`ratio_to_csv_read`); the rest is building the collection, checking that every file exists,
and writing pretrain_data.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

COLUMNS = ("image_path", "modality", "anat_mask_path", "anon_mask_path", "unique_id", "derived_from",
           "image_quality_score", "age", "sex", "handedness", "race", "weight", "bmi", "health_status",
           "manufacturer", "model_name", "magnetic_field_strength", "repetition_time", "echo_time",
           "is_brain_extract", "phase_encoding_direction", "scanner_notes")
SUBJECTS_PER_DATASET = 20


def _rows(num_rows: int, rng: np.random.Generator):
    """(row, files to create) in OpenMind's order: dataset by dataset, subject by subject."""
    made, d = 0, 0
    while made < num_rows:
        d += 1
        ds = f"ds{d:06d}"
        sessions = ["ses-01", "ses-02"] if d % 2 else [None]
        scores = {}
        for s in range(1, SUBJECTS_PER_DATASET + 1):
            subject = f"sub-{s:02d}"
            person = {"age": int(rng.integers(18, 80)), "sex": rng.choice(["M", "F"]), "handedness": "R",
                      "race": "", "weight": "", "bmi": "", "health_status": rng.choice(["healthy", "patient"])}
            for session in sessions:
                base = f"{ds}/{subject}" + (f"/{session}" if session else "")
                prefix = f"{subject}_{session}" if session else subject
                images = [("anat", "T1w", None, True)]
                if s % 3 == 0:
                    images += [("anat", "T2w", None, False), ("anat", "FLAIR", None, False)]
                if s % 4 == 0:
                    images += [("dwi", "DWI", None, False), ("dwi", "FA", "DWI", False), ("dwi", "MD", "DWI", False)]
                for folder, modality, derived_from, with_masks in images:
                    if derived_from:
                        source = f"{prefix}_dwi"
                        path = f"{base}/{folder}/{source}__Data/{modality}.nii.gz"
                    else:
                        suffix = "dwi" if modality == "DWI" else modality
                        path = f"{base}/{folder}/{prefix}_{suffix}.nii.gz"
                    stem = path[: -len(".nii.gz")]
                    masks = ((f"{stem}__Data/fb_mask.nii.gz", f"{stem}__Data/deface_mask.nii.gz") if with_masks
                             else ("", ""))
                    key = (modality, derived_from)
                    if key not in scores:
                        scores[key] = "" if rng.random() < 0.1 else f"{rng.integers(2, 11) / 2:.1f}"
                    row = {"image_path": path, "modality": modality, "anat_mask_path": masks[0],
                           "anon_mask_path": masks[1], "unique_id": f"{ds}__{stem.replace('/', '__')}",
                           "derived_from": derived_from or "", "image_quality_score": scores[key], **person,
                           "manufacturer": "Siemens", "model_name": "Prisma", "magnetic_field_strength": "3.0",
                           "repetition_time": "2.3", "echo_time": "0.00298", "is_brain_extract": "False",
                           "phase_encoding_direction": "j-", "scanner_notes": "ignored"}
                    yield row, [path, *(m for m in masks if m)]
                    made += 1
                    if made == num_rows:
                        return


def write_openmind_tree(root: Path, num_rows: int, seed: int = 0,
                        write_file: Callable[[Path, dict, str], None] | None = None) -> Path:
    """`root/openneuro_metadata.csv` with `num_rows` rows and `root/OpenMind/...` with every file
    they name (empty, or written by `write_file(path, row, kind)`, kind `image`, `anatomy_mask`
    or `anonymization_mask`)."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "OpenMind"
    rng = np.random.default_rng(seed)
    with open(root / "openneuro_metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row, files in _rows(num_rows, rng):
            writer.writerow(row)
            for relative, kind in zip(files, ("image", "anatomy_mask", "anonymization_mask")):
                path = images / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                if write_file is None:
                    path.touch()
                else:
                    write_file(path, row, kind)
    return root


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def _current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000, help="rows of the synthetic metadata table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("nnssl_raw", "nnssl_preprocessed", "nnssl_results"):
            os.environ[name] = str(Path(tmp) / name)
            (Path(tmp) / name).mkdir()
        root = Path(tmp) / "nnssl_raw" / "Dataset745_OpenMind"
        start = time.perf_counter()
        write_openmind_tree(root, args.rows)
        written = time.perf_counter() - start
        import nnssl.data.builders  # noqa: F401  (imports SimpleITK, nibabel: not part of the conversion's memory)
        from nnssl.data.openmind import create_openmind_dataset

        start = time.perf_counter()  # the floor: only reading the table's rows
        with open(root / "openneuro_metadata.csv", newline="", encoding="utf-8") as f:
            rows = sum(1 for _ in csv.DictReader(f))
        floor = time.perf_counter() - start
        assert rows == args.rows
        baseline = _current_rss_mb()
        start = time.perf_counter()
        path, collection, _ = create_openmind_dataset(root, 745, "OpenMind")
        seconds = time.perf_counter() - start
        peak = _peak_rss_mb()
        summary = collection.summary()
        print(json.dumps({"rows": args.rows, "images": summary["images"], "subjects": summary["subjects"],
                          "datasets": summary["datasets"], "tree_written_s": round(written, 1),
                          "conversion_s": round(seconds, 2), "us_per_row": round(1e6 * seconds / args.rows, 1),
                          "csv_read_s": round(floor, 2), "ratio_to_csv_read": round(seconds / floor, 1),
                          "rss_before_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
                          "peak_growth_mb": round(peak - baseline, 1),
                          "json_mb": round(path.stat().st_size / 1e6, 1)}, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
