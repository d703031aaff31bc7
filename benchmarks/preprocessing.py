"""Preprocessing benchmark: one JSON object on stdout (progress and notes on stderr).

On generated phantoms (`nnssl.data.phantoms`, a 220 mm field of view: about 200x240x70 voxels
with one 2-4 mm axis, about 220³ after resampling to 1 mm) it measures, all in the same run:

- the full `nnssl_plan_and_preprocess` work (fingerprint, plan, preprocess) in one process, and
  the **I/O floor**: for every case, read the image and its mask through the same robust read
  path and write the case's outputs (arrays and properties, taken from the full run) with the
  same storage functions, codec and chunking - everything the pipeline must read and write, no
  processing.
  `ratio_to_io_floor` = full / floor (median over rounds; rounds alternate the order);
- a parallel run of the command line (`-np/-npfp --workers`) on a quarter of the cases and on
  all of them: cases/s, peak RSS of the parent, of the largest worker and of the whole process
  tree, to show that memory does not grow with the number of cases;
- `fingerprint_s_per_1000_headers` on a 1000-image collection (the phantoms listed repeatedly);
- resampling implementations on one anisotropic case (speed, error against float64 cubic);
- blosc2 chunk/block shapes (ours vs nnU-Net 2.8's rule, re-derived) for write time, size and
  random 160³ patch reads, on a real output case.

    python benchmarks/preprocessing.py                 # 40 cases, 3 rounds (a few minutes)
    python benchmarks/preprocessing.py --quick         # 8 cases, 1 round, fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

NAME, SMALL_NAME, HEADERS_NAME = "Dataset990_Bench", "Dataset991_BenchQuarter", "Dataset992_BenchHeaders"


def _log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _median(values: list[float], digits: int = 3) -> float:
    return round(statistics.median(values), digits)


# ------------------------------------------------------------------------------ collections
def _derived_collection(collection, index: int, name: str, subjects: list[tuple[str, dict]]) -> None:
    """Save a collection over the same image files with the given (subject key, subject) list."""
    from nnssl import paths
    from nnssl.data.collection import Collection

    d = collection.to_dict()
    d["collection_index"], d["collection_name"] = index, name
    (_, dataset), = d["datasets"].items()
    dataset["subjects"] = dict(subjects)
    Collection.from_dict(d).save(paths.nnssl_raw() / name / "pretrain_data.json")


def _make_collections(work: Path, cases: int, fov: int, workers: int):
    from nnssl.data.builders import create_dataset
    from nnssl.data.phantom_files import write_phantom_collection
    from nnssl.data.phantoms import PhantomConfig

    bids = work / "nnssl_raw" / NAME / "bids"
    start = time.perf_counter()
    write_phantom_collection(bids, PhantomConfig(num_volumes=cases, shape=(fov, fov, fov)), num_processes=workers)
    _log(f"generated {cases} phantoms in {time.perf_counter() - start:.1f} s")
    _, collection = create_dataset(bids, 990, "Bench")
    (_, dataset), = collection.to_dict()["datasets"].items()
    subjects = list(dataset["subjects"].items())
    _derived_collection(collection, 991, SMALL_NAME, subjects[:max(2, cases // 4)])
    repeated = []
    for i in range(math.ceil(1000 / len(subjects))):
        for key, subject in subjects:
            repeated.append((f"{key}r{i}", {**subject, "subject_id": f"{subject['subject_id']}r{i}"}))
    _derived_collection(collection, 992, HEADERS_NAME, repeated[:1000])
    return collection, bids


# ------------------------------------------------------------------------------ full vs floor
def _full_single_process() -> dict:
    """The command's three stages in this process, one core (blosc2 single-threaded by main)."""
    from nnssl.preprocessing.runner import extract_and_save_fingerprint, plan_and_save, preprocess

    t0 = time.perf_counter()
    extract_and_save_fingerprint(NAME, 1, clean=True)  # time the extraction, not the reuse
    t1 = time.perf_counter()
    plan_and_save(NAME)
    t2 = time.perf_counter()
    outcome, = preprocess(NAME, ("onemmiso",), num_processes=1)
    t3 = time.perf_counter()
    assert outcome.ok and outcome.done == outcome.total, outcome.failures
    return {"total_s": t3 - t0, "fingerprint_s": t1 - t0, "plan_s": t2 - t1, "preprocess_s": t3 - t2,
            "stage_s": outcome.stage_seconds}


def _io_floor(collection, reference: Path, floor_dir: Path) -> float:
    """Seconds to read every input (image + masks, robust path) and write every output (arrays with
    `save_array`, the properties JSON with `save_properties`)."""
    from nnssl.data.imageio import read_image, read_mask
    from nnssl.preprocessing import storage
    from nnssl.preprocessing.runner import case_stem

    shutil.rmtree(floor_dir, ignore_errors=True)
    total = 0.0
    for i, img in enumerate(collection.iter_images()):
        case = storage.CaseFiles.for_stem(case_stem(reference, collection, img))
        outputs = {storage.IMAGE_SUFFIX: storage.open_array(case.image)[:]}  # untimed: what the pipeline made
        for suffix, path in ((storage.ANAT_SUFFIX, case.anatomy_mask), (storage.ANON_SUFFIX, case.anonymization_mask)):
            if path.exists():
                outputs[suffix] = storage.open_array(path)[:]
        properties = storage.load_properties(case.properties)
        masks = [m for m in (img.anatomy_mask_path(), img.anonymization_mask_path()) if m]
        start = time.perf_counter()
        _, header = read_image(img.image_path())
        for mask in masks:
            read_mask(mask, header)
        for suffix, array in outputs.items():
            storage.save_array(floor_dir / f"{i}{suffix}", array)
        storage.save_properties(floor_dir / f"{i}{storage.PROPERTIES_SUFFIX}", properties)
        total += time.perf_counter() - start
    return total


def _full_vs_floor(work: Path, collection, rounds: int) -> dict:
    pre = work / "nnssl_preprocessed" / NAME
    reference = work / "reference"
    runs, floors = [], []
    for r in range(rounds):
        floor_first = r % 2 == 1 and reference.exists()
        if floor_first:
            floors.append(_io_floor(collection, reference, work / "floor"))
        shutil.rmtree(pre, ignore_errors=True)
        runs.append(_full_single_process())
        if not reference.exists():
            shutil.copytree(pre / "nnsslPlans_onemmiso", reference)
        if not floor_first:
            floors.append(_io_floor(collection, reference, work / "floor"))
        _log(f"round {r}: full {runs[-1]['total_s']:.1f} s, floor {floors[-1]:.1f} s")
    cases = sum(1 for _ in reference.rglob("*.json"))
    stages = {k: _median([run["stage_s"][k] for run in runs]) for k in runs[0]["stage_s"]}
    return {
        "full_single_process_s": _median([run["total_s"] for run in runs], 2),
        "io_floor_single_process_s": _median(floors, 2),
        "ratio_to_io_floor": _median([run["total_s"] / f for run, f in zip(runs, floors)], 2),
        "ratio_preprocess_stage_to_io_floor": _median([run["preprocess_s"] / f for run, f in zip(runs, floors)], 2),
        "ratios_per_round": [round(run["total_s"] / f, 2) for run, f in zip(runs, floors)],
        "s_per_case_full": round(_median([run["total_s"] for run in runs]) / cases, 3),
        "s_per_case_io_floor": round(_median(floors) / cases, 3),
        "single_process_seconds": {"fingerprint": _median([run["fingerprint_s"] for run in runs], 2),
                                   "plan": _median([run["plan_s"] for run in runs]),
                                   "preprocess": _median([run["preprocess_s"] for run in runs], 2),
                                   "preprocess_per_stage": stages},
    }


# ------------------------------------------------------------------------------ parallel + memory
def _tree_rss_mb(root: int) -> float:
    """Summed RSS of `root` and its descendants (shared library pages count once per process)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def _parallel_cli(work: Path, dataset: str, workers: int) -> dict:
    """`nnssl_plan_and_preprocess --clean` in a subprocess, sampling its process tree's RSS."""
    code = "import sys; from nnssl.cli.preprocess import plan_and_preprocess_main as m; sys.exit(m())"
    cmd = [sys.executable, "-c", code, "-d", dataset, "-np", str(workers), "-npfp", str(workers), "--clean"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ.copy())
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    assert proc.returncode == 0, out.decode()
    report = json.loads((work / "nnssl_preprocessed" / dataset / "preprocessing_report__onemmiso.json").read_text())
    return {"cases": report["total"], "wall_s": round(wall, 2), "cases_per_s": round(report["total"] / wall, 2),
            "preprocess_s": report["seconds"], "peak_rss_parent_mb": report["peak_parent_rss_mb"],
            "peak_rss_largest_worker_mb": report["peak_worker_rss_mb"], "peak_rss_process_tree_mb": round(peak[0], 1)}


# ------------------------------------------------------------------------------ resampling
def _resampling(case_shape=(60, 240, 200), spacing=(3.0, 0.9, 1.1), repeats: int = 5) -> dict:
    import SimpleITK as sitk
    from scipy import ndimage

    from nnssl.preprocessing import steps

    smooth = ndimage.gaussian_filter(np.random.default_rng(0).random(case_shape), 3).astype(np.float32)
    target = (1.0, 1.0, 1.0)
    new_shape = steps.new_shape_for_spacing(case_shape, spacing, target)
    reference = ndimage.zoom(smooth.astype(np.float64), [n / o for n, o in zip(new_shape, case_shape)],
                             order=3, grid_mode=True, mode="nearest")

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

    def ours(method, **kw):
        return lambda: steps.resample_image(smooth[None], spacing, target, method=method, **kw)[0]

    candidates = {"numpy_separable_linear (default)": ours("linear"), "torch_trilinear": ours("torch_linear"),
                  "scipy_nnunet_separate_z": ours("scipy_nnunet"),
                  "scipy_cubic_all_axes": ours("scipy_nnunet", anisotropy_threshold=1e9),
                  "simpleitk_bspline": sitk_bspline}
    import torch

    torch.set_num_threads(1)  # one core for every candidate, as in a preprocessing worker
    candidates["torch_trilinear"]()  # untimed: the first call pays the torch import (seconds)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    errors = {}
    for r in range(repeats):  # interleaved, so load changes hit every candidate alike
        for name, fn in candidates.items():
            if r and times[name][0] > 1.0:
                continue  # the slow ones are 10-40x off; one timing is enough to rank them
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            err = np.abs(result.astype(np.float64) - reference)
            errors[name] = {"max_abs_error": float(err.max()), "mean_abs_error": float(err.mean())}
    base = statistics.median(times["scipy_nnunet_separate_z"])
    return {"case": {"shape": list(case_shape), "spacing": list(spacing), "threads": 1},
            **{name: {"seconds": _median(t), "speed_vs_scipy_nnunet": round(base / statistics.median(t), 1),
                      **errors[name]} for name, t in times.items()}}


# ------------------------------------------------------------------------------ chunking
def nnunet28_chunks_blocks(shape, patch, itemsize, l1=32768, l3=1441792, safety=0.8):
    """nnU-Net 2.8's rule as described there (comp_blosc2_params), re-derived: power-of-two
    blocks shrunk (largest block/patch ratio first) until 80% of a 32 kB L1 holds one; chunks
    grown block by block along the least-grown axis until 80% of a 1.4 MB per-core L3 share,
    stopping before the chunk exceeds 1.5 patches on average."""
    spatial = list(shape[1:])
    block = [2 ** math.ceil(math.log2(p)) for p in patch]
    while math.prod(block) * itemsize > l1 * safety:
        axis = max((a for a in range(3) if block[a] > 1), key=lambda a: block[a] / patch[a])
        block[axis] = min(2 ** max(0, math.floor(math.log2(block[axis] - 1))), spatial[axis])
    block = [min(b, s) for b, s in zip(block, spatial)]
    chunk = list(block)
    while math.prod(chunk) * itemsize < l3 * safety and chunk != spatial:
        axis = min((a for a in range(3) if chunk[a] < spatial[a]), key=lambda a: chunk[a] / block[a])
        chunk[axis] = min(chunk[axis] + block[axis], spatial[axis])
        if statistics.mean(c / p for c, p in zip(chunk, patch)) > 1.5:
            chunk[axis] -= block[axis]
            break
    return (shape[0], *chunk), (shape[0], *block)


def _random_box(shape, patch, rng) -> tuple[slice, ...]:
    starts = [int(rng.integers(0, max(1, n - p + 1))) for n, p in zip(shape[1:], patch)]
    return (slice(None), *[slice(s, s + p) for s, p in zip(starts, patch)])


def _chunking(reference: Path, repeats: int, patches: int, patch=(160, 160, 160)) -> dict:
    from nnssl.preprocessing import storage

    cases = sorted(reference.rglob("*.json"), key=lambda p: p.stat().st_size)
    case = storage.CaseFiles.for_stem(cases[len(cases) // 2].with_suffix(""))
    arrays = {"image_float32": storage.open_array(case.image)[:],
              "mask_uint8": storage.open_array(case.anatomy_mask)[:]}
    rng = np.random.default_rng(0)
    out: dict = {"patch": list(patch),
                 "codec": f"{storage.CODEC.name} clevel {storage.CLEVEL}; SHUFFLE (float), no filter (uint8)",
                 "threads": 1, "volume_shape": list(arrays["image_float32"].shape)}
    folder = reference.parent / "chunking"
    folder.mkdir(exist_ok=True)
    for kind, array in arrays.items():
        layouts = {"ours": storage.blosc2_chunks_and_blocks(array.shape, array.itemsize, patch),
                   "nnunet_2.8": nnunet28_chunks_blocks(array.shape, patch, array.itemsize)}
        write: dict[str, list[float]] = {k: [] for k in layouts}
        read: dict[str, list[float]] = {k: [] for k in layouts}
        sizes = {}
        for _ in range(repeats):
            boxes = [_random_box(array.shape, patch, rng) for _ in range(patches)]
            for name, (chunks, blocks) in layouts.items():  # interleaved under the same load
                path = folder / f"{kind}_{name}.b2nd"
                path.unlink(missing_ok=True)
                start = time.perf_counter()
                storage.save_array(path, array, patch, layout=(chunks, blocks))
                write[name].append(time.perf_counter() - start)
                sizes[name] = path.stat().st_size
                stored = storage.open_array(path)
                start = time.perf_counter()
                for box in boxes:
                    storage.read_region(stored, box)
                read[name].append((time.perf_counter() - start) / len(boxes))
        out[kind] = {name: {"chunks": list(layouts[name][0]), "blocks": list(layouts[name][1]),
                            "write_s": _median(write[name]), "size_mb": round(sizes[name] / 2**20, 1),
                            "patch_read_ms": round(statistics.median(read[name]) * 1e3, 1)} for name in layouts}
        out[kind]["ours_vs_nnunet_patch_read_ratio"] = round(
            statistics.median(a / b for a, b in zip(read["ours"], read["nnunet_2.8"])), 2)
        out[kind]["ours_vs_nnunet_write_ratio"] = round(
            statistics.median(a / b for a, b in zip(write["ours"], write["nnunet_2.8"])), 2)
    return out


# ------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=40, help="phantoms to generate")
    p.add_argument("--workers", type=int, default=2, help="processes for the parallel run")
    p.add_argument("--rounds", type=int, default=3, help="full/floor rounds (median reported)")
    p.add_argument("--fov", type=int, default=220, help="phantom field of view in mm per axis")
    p.add_argument("--quick", action="store_true", help="8 cases, 1 round, fewer repetitions")
    args = p.parse_args()
    if args.quick:
        args.cases, args.rounds = min(args.cases, 8), 1

    work = Path(tempfile.mkdtemp(prefix="nnssl_bench_pp_"))
    for var in ("nnssl_raw", "nnssl_preprocessed", "nnssl_results"):
        (work / var).mkdir()
        os.environ[var] = str(work / var)
    import blosc2

    from nnssl.data.collection import Collection
    from nnssl.planning.fingerprint import FingerprintConfig, extract_fingerprint

    blosc2.set_nthreads(1)  # the single-process runs and the floor use one core each
    try:
        collection, bids = _make_collections(work, args.cases, args.fov, args.workers)
        result: dict = {"machine": f"{os.cpu_count()} CPU cores (shared)", "cases": args.cases,
                        "workers": args.workers, "phantom_fov_mm": args.fov,
                        "input_mb": round(_tree_size(bids) / 2**20, 1)}
        result.update(_full_vs_floor(work, collection, args.rounds))
        props = [json.loads(p.read_text()) for p in (work / "reference").rglob("*.json")]
        result["median_input_voxels"] = int(np.median([np.prod(p["shape_before_cropping"]) for p in props]))
        result["median_output_voxels"] = int(np.median([np.prod(p["shape_after_resampling"]) for p in props]))
        result["output_mb"] = round(_tree_size(work / "reference") / 2**20, 1)

        _log("parallel runs (quarter, then all cases)")
        quarter = _parallel_cli(work, SMALL_NAME, args.workers)
        full = _parallel_cli(work, NAME, args.workers)
        result.update({"parallel_wall_s": full["wall_s"], "cases_per_s_parallel": full["cases_per_s"],
                       "peak_rss_parent_mb": full["peak_rss_parent_mb"],
                       "peak_rss_largest_worker_mb": full["peak_rss_largest_worker_mb"],
                       "peak_rss_process_tree_mb": full["peak_rss_process_tree_mb"],
                       "memory_scaling": {"quarter_of_cases": quarter, "all_cases": full}})

        headers = Collection.load(work / "nnssl_raw" / HEADERS_NAME / "pretrain_data.json")
        for processes, key in ((1, "fingerprint_s_per_1000_headers"),
                               (args.workers, f"fingerprint_s_per_1000_headers_{args.workers}_processes")):
            start = time.perf_counter()
            fp = extract_fingerprint(headers, FingerprintConfig(images_per_modality=0, num_processes=processes))
            result[key] = round((time.perf_counter() - start) / len(fp.images) * 1000, 2)

        _log("resampling and chunking comparisons")
        result["resampling_one_case"] = _resampling(repeats=3 if args.quick else 5)
        result["chunking_160_patches"] = _chunking(work / "reference", repeats=2 if args.quick else 5,
                                                   patches=4 if args.quick else 8)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
