"""Preprocessing benchmark: one JSON object on stdout.

On generated phantoms of realistic size (about 200x240x60 voxels at anisotropic spacing) it
measures the full `plan_and_preprocess` run and, in the same run, the I/O floor (read each image
robustly and write one float32 blosc2 array of it, nothing else): `ratio_to_io_floor` = full /
floor. Also: cases/s, peak RSS of the workers and the parent, output size, fingerprint seconds per
1000 headers, and the resampling implementations (scipy.ndimage as nnU-Net, SimpleITK, torch)
compared on one case for speed and error against a float64 reference.

    python benchmarks/preprocessing.py [--cases 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _resampling(case_shape=(60, 240, 200), spacing=(3.0, 0.9, 1.1)) -> dict:
    import SimpleITK as sitk
    import torch
    from scipy import ndimage

    from nnssl.preprocessing import steps

    g = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(g.random(case_shape), 3).astype(np.float32)
    target = (1.0, 1.0, 1.0)
    new_shape = steps.new_shape_for_spacing(case_shape, spacing, target)
    reference = ndimage.zoom(smooth.astype(np.float64), [n / o for n, o in zip(new_shape, case_shape)],
                             order=3, grid_mode=True, mode="nearest")
    out = {}

    def timed(name, fn):
        times = []
        for _ in range(2):
            t = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t)
        err = np.abs(result.astype(np.float64) - reference)
        out[name] = {"seconds": round(min(times), 3), "max_abs_error": float(err.max()),
                     "mean_abs_error": float(err.mean())}

    timed("scipy_nnunet_separate_z", lambda: steps.resample_image(smooth[None], spacing, target)[0])
    timed("scipy_cubic_all_axes", lambda: steps.resample_image(smooth[None], spacing, target,
                                                               anisotropy_threshold=1e9)[0])

    def sitk_bspline():
        img = sitk.GetImageFromArray(smooth)
        img.SetSpacing(spacing[::-1])
        res = sitk.ResampleImageFilter()
        res.SetOutputSpacing(target[::-1])
        res.SetSize([int(s) for s in new_shape[::-1]])
        res.SetOutputOrigin(img.TransformContinuousIndexToPhysicalPoint(
            [(-0.5 + 0.5 * t / s) for s, t in zip(spacing[::-1], target[::-1])]))
        res.SetInterpolator(sitk.sitkBSpline)
        return sitk.GetArrayFromImage(res.Execute(img))

    timed("simpleitk_bspline", sitk_bspline)
    timed("torch_trilinear", lambda: torch.nn.functional.interpolate(
        torch.from_numpy(smooth)[None, None], size=new_shape, mode="trilinear", align_corners=False)[0, 0].numpy())
    base = out["scipy_nnunet_separate_z"]["seconds"]
    for v in out.values():
        v["speed_vs_scipy_nnunet"] = round(base / v["seconds"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nnssl_bench_pp_"))
    for var in ("nnssl_raw", "nnssl_preprocessed", "nnssl_results"):
        (work / var).mkdir()
        os.environ[var] = str(work / var)
    import blosc2

    from nnssl.data.builders import create_dataset
    from nnssl.data.imageio import read_image
    from nnssl.data.phantoms import PhantomConfig, write_phantom_collection
    from nnssl.planning.fingerprint import FingerprintConfig, extract_fingerprint
    from nnssl.preprocessing import storage
    from nnssl.preprocessing.runner import plan_and_preprocess

    try:
        bids = work / "nnssl_raw" / "Dataset990_Bench" / "bids"
        # 220 mm field of view, in-plane ~0.9-1.2 mm, one axis 2-4 mm: about 200x240x70 voxels
        write_phantom_collection(bids, PhantomConfig(num_volumes=args.cases, shape=(220, 220, 220)),
                                 num_processes=args.workers)
        _, collection = create_dataset(bids, 990, "Bench")
        images = [img.image_path() for img in collection.iter_images()]
        voxels = [int(np.prod(read_image(p)[0].shape)) for p in images[:2]]

        blosc2.set_nthreads(1)
        floor_dir = work / "floor"
        t = time.perf_counter()
        for i, path in enumerate(images):  # I/O floor: robust read + one float32 array write
            data, _ = read_image(path)
            storage.save_array(floor_dir / f"{i}.b2nd", data[None])
        floor_s = time.perf_counter() - t

        t = time.perf_counter()
        outcomes = plan_and_preprocess(["Dataset990_Bench"], num_processes=1, num_processes_fingerprint=1)
        full_s = time.perf_counter() - t
        assert all(o.ok for o in outcomes), [o.failures for o in outcomes]

        shutil.rmtree(work / "nnssl_preprocessed" / "Dataset990_Bench")
        t = time.perf_counter()
        plan_and_preprocess(["Dataset990_Bench"], num_processes=args.workers,
                            num_processes_fingerprint=args.workers)
        parallel_s = time.perf_counter() - t

        t = time.perf_counter()
        extract_fingerprint(collection, FingerprintConfig(images_per_modality=0))
        header_s = time.perf_counter() - t

        result = {
            "cases": args.cases, "workers": args.workers, "median_voxels_per_case": int(np.median(voxels)),
            "full_single_process_s": round(full_s, 2), "io_floor_single_process_s": round(floor_s, 2),
            "ratio_to_io_floor": round(full_s / floor_s, 2),
            "full_parallel_s": round(parallel_s, 2), "cases_per_s_parallel": round(args.cases / parallel_s, 2),
            "peak_rss_parent_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_largest_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "output_mb": round(_tree_size(work / "nnssl_preprocessed") / 2**20, 1),
            "input_mb": round(_tree_size(bids) / 2**20, 1),
            "fingerprint_s_per_1000_headers": round(header_s / args.cases * 1000, 2),
            "resampling_one_case": _resampling(),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
