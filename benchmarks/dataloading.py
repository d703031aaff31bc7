"""Data loading throughput: our loader against the reference approach and the decompression floor,
and what a worker costs when augmentation runs on the training device.

    python benchmarks/dataloading.py [--quick]

Prints ONE JSON object. Generates 8 head-like volumes of 200x240x200 (float32 image, uint8
anonymization mask) once into a temporary folder with the project's blosc2 storage, then measures
batches/s for batch 8 at 160³ and 96³ with one worker and with all CPUs, for:
- `ours_default`: PretrainLoader with the default augmentation (zoom p=0.2, rotation p=0.2,
  mirroring, light intensity), all of it in the workers (the CPU path);
- `ours_device`: the same samples (same seed, same draws) with `augment_on_device=True`: the
  workers only read and decompress each sample's source region; the consumer takes the
  `RawBatch` without augmenting it, so this is the workers' side alone;
- `ours_light`: PretrainLoader without zoom/rotation (crop, mirroring, intensity);
- `reference`: the reference nnssl approach: read the 257³-equivalent region (image and mask,
  zero padded) around a random centre, then batchgenerators' SpatialTransform (rotation ±30° and
  zoom 0.7-1.4 each with p=0.2, cubic interpolation) and MirrorTransform, as in its BaseMAETrainer;
- `floor`: decompress exactly the patch's image and mask bytes, no augmentation.
Files sit in the page cache, so this measures decompression and compute, not the disk. Each
number is the best of two runs (the machine may be shared).
Headline: `speedup_vs_reference` (ours_default / reference, 160³, all workers) and
`fraction_of_floor` (ours_light / floor, 160³, all workers).

`worker_cost_160`: what one worker costs per 160³ sample, for the CPU-augmenting worker
(`ours_default`) and the device path's worker (`ours_device`: read + decompress + region crop, no
interpolation), three ways, with the ratios `cpu_augmenting_over_device_*`:
`cpu_s_*`: `time.process_time()` of building the same 48 samples in this process with one blosc2
and one torch thread, as a worker has (robust on a shared machine); `wall_s_*`: 1 / samples/s
with one worker process above (not robust: the machine may be shared);
`worker_process_cpu_s_*`: the CPU seconds per sample of a real worker process (one worker, from
/proc), which adds moving each batch into shared memory for the training process to the build;
the workers-per-GPU formula uses these (the in-process `cpu_s_*` where /proc is missing).
`cpu_s_moved_to_device`: CPU seconds per sample of `RawBatch.to("cpu")` for the same samples
(one thread), i.e. the work that moves to the GPU, done on this CPU. It exceeds what the
worker saves (float64 copies of the batch for the intensity statistics, batched gathers, flips
as copies: memory traffic a GPU does in milliseconds), one reason CPU runs keep the CPU path.
`workers_per_gpu` (`_gpu_demand.py`): per backbone and method, the workers one GPU needs by the
formula ⌈GPU samples/s / one worker's samples/s⌉, the GPU side an ESTIMATE (40 % of an H100's
dense bf16 peak over the FLOPs per sample), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
import scipy.ndimage as ndi
import torch
from torch.utils.data import DataLoader, IterableDataset

from nnssl.dataloading.augment import AugmentConfig
from nnssl.dataloading.dataset import CaseRecord
from nnssl.dataloading.loader import LoaderConfig, PretrainLoader, available_cpus
from nnssl.preprocessing.storage import open_array, read_region, save_array

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_demand import workers_per_gpu  # noqa: E402

SHAPE = (200, 240, 200)
NUM_VOLUMES = 8
BATCH = 8
REFERENCE_REGION = {160: 257, 96: 154}  # reference's initial patch for ±30° rotation (257/160 ratio)


def make_volumes(folder: Path, seed: int = 0, shape: tuple[int, int, int] = SHAPE, num_volumes: int = NUM_VOLUMES,
                 patch: int = 160) -> list[CaseRecord]:
    """Smooth head-like volumes (zero background, textured ellipsoid, a defaced slab), stored as
    preprocessing stores them for `patch`³ training crops (benchmarks/gpu_check.py also uses
    smaller ones for its CPU smoke run)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    head = (grid[0] ** 2 / 0.8 + grid[1] ** 2 + grid[2] ** 2 / 0.8) < 0.85
    cases = []
    for i in range(num_volumes):
        coarse = rng.standard_normal((13, 16, 13)).astype(np.float32)
        texture = ndi.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)
        image = (texture + 0.05 * rng.standard_normal(shape, dtype=np.float32)) * head
        anon = np.zeros((1, *shape), dtype=np.uint8)
        anon[:, :, : shape[1] // 6, : shape[2] // 2] = 1  # face region
        stem = folder / f"case_{i:02d}"
        save_array(stem.with_suffix(".b2nd"), image[None].astype(np.float32), patch_size=(patch,) * 3)
        save_array(folder / f"case_{i:02d}__anon.b2nd", anon, patch_size=(patch,) * 3)
        cases.append(CaseRecord(f"bench__ds__sub-{i:02d}__ses-1__case_{i:02d}", f"bench__ds__sub-{i:02d}",
                                stem.with_suffix(".b2nd"), folder / f"case_{i:02d}__anon.b2nd", None))
    return cases


def _padded_read(array, lo, size) -> np.ndarray:  # type: ignore[no-untyped-def]
    hi = [l + size for l in lo]
    src = tuple(slice(max(l, 0), min(h, s)) for l, h, s in zip(lo, hi, array.shape[1:]))
    out = np.zeros((array.shape[0], size, size, size), dtype=np.float32)
    dst = tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))
    out[(slice(None),) + dst] = read_region(array, (slice(None),) + src)
    return out


class ReferenceStream(IterableDataset):
    """Reference approach: whole 257³-equivalent region per sample, then batchgenerators."""

    def __init__(self, cases: list[CaseRecord], patch: int) -> None:
        self.cases, self.patch, self.region = cases, patch, REFERENCE_REGION[patch]

    def __iter__(self) -> Iterator[torch.Tensor]:
        from batchgenerators.transforms.abstract_transforms import Compose
        from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

        angle = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
        transform = Compose([
            SpatialTransform((self.patch,) * 3, patch_center_dist_from_border=None, do_elastic_deform=False,
                             do_rotation=True, angle_x=angle, angle_y=angle, angle_z=angle, p_rot_per_axis=1,
                             do_scale=True, scale=(0.7, 1.4), border_mode_data="constant", border_cval_data=0,
                             order_data=3, random_crop=False, p_el_per_sample=0, p_scale_per_sample=0.2,
                             p_rot_per_sample=0.2, independent_scale_for_each_axis=False),
            MirrorTransform((0, 1, 2)),
        ])
        while True:
            data = np.zeros((BATCH, 1, *(self.region,) * 3), dtype=np.float32)
            anon = np.zeros_like(data, dtype=np.uint8)
            for b in range(BATCH):
                case = self.cases[np.random.randint(len(self.cases))]
                image, mask = open_array(case.image), open_array(case.anonymization_mask)
                lo = [np.random.randint(min(0, s - self.region), max(0, s - self.region) + 1) for s in SHAPE]
                data[b] = _padded_read(image, lo, self.region)
                anon[b] = _padded_read(mask, lo, self.region)
            yield torch.from_numpy(transform(data=data)["data"])


class FloorStream(IterableDataset):
    """Lower bound on cost: decompress exactly each patch's image and mask bytes."""

    def __init__(self, cases: list[CaseRecord], patch: int) -> None:
        self.cases, self.patch = cases, patch

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng(torch.initial_seed() % 2**32)
        while True:
            data = torch.empty((BATCH, 1, *(self.patch,) * 3))
            mask = torch.empty((BATCH, 1, *(self.patch,) * 3), dtype=torch.uint8)
            for b in range(BATCH):
                case = self.cases[int(rng.integers(len(self.cases)))]
                lo = [int(rng.integers(0, s - self.patch + 1)) for s in SHAPE]
                box = (slice(None),) + tuple(slice(l, l + self.patch) for l in lo)
                data[b] = torch.from_numpy(read_region(open_array(case.image), box))
                mask[b] = torch.from_numpy(read_region(open_array(case.anonymization_mask), box))
            yield data


def _worker_init(_: int) -> None:
    blosc2.set_nthreads(1)


def _dataloader(stream: IterableDataset, workers: int) -> Iterator[torch.Tensor]:
    blosc2.set_nthreads(1)
    return iter(DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2,
                           worker_init_fn=_worker_init))


def batches_per_second(make: Callable[[], Iterator], warmup: int, timed: int, repeats: int = 2) -> float:
    """Best of `repeats` runs: on a shared machine the fastest run is the least disturbed one."""
    rates = []
    for _ in range(repeats):
        iterator = make()
        for _ in range(warmup):  # fork, first reads, filling the prefetch queue
            next(iterator)
        start = time.perf_counter()
        for _ in range(timed):
            next(iterator)
        rates.append(timed / (time.perf_counter() - start))
        close = getattr(iterator, "close", None) or getattr(iterator, "_shutdown_workers", None)
        if close is not None:
            close()
    return round(max(rates), 3)


def worker_cpu_seconds(cases: list[CaseRecord], batches: int) -> dict[str, float]:
    """CPU seconds per 160³ sample of batches 1 .. `batches` (seed 1, default augmentation) built in
    this process as one worker builds them, with one blosc2 and one torch thread, so process time
    is that work alone whatever else the machine runs: `ours_default` (augmenting on the CPU),
    `ours_device` (regions only, the same draws) and `moved_to_device` (`RawBatch.to("cpu")` of
    those regions: the resampling, mirroring and intensity work a GPU takes over)."""
    def loader(on_device: bool) -> PretrainLoader:
        return PretrainLoader(cases, LoaderConfig((160,) * 3, BATCH, num_workers=0, foreground_probability=0.0,
                                                  pin_memory=False, seed=1, augment_on_device=on_device))

    def cpu_seconds(make: Callable[[int], Any], work: Callable[[Any], object]) -> float:
        """CPU seconds per sample of work(make(step)), steps 1 .. batches; make is not timed."""
        work(make(0))  # first touches: page cache, allocator
        total = 0.0
        for step in range(1, batches + 1):
            item = make(step)
            start = time.process_time()
            work(item)
            total += time.process_time() - start
        return total / (batches * BATCH)

    default, device = loader(False), loader(True)
    threads, blosc2_threads = torch.get_num_threads(), blosc2.set_nthreads(1)
    torch.set_num_threads(1)
    try:
        return {"ours_default": cpu_seconds(int, default.batch_at), "ours_device": cpu_seconds(int, device.batch_at),
                "moved_to_device": cpu_seconds(device.batch_at, lambda raw: raw.to("cpu"))}
    finally:
        torch.set_num_threads(threads)
        blosc2.set_nthreads(blosc2_threads)


def _process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def worker_process_cpu_seconds(cases: list[CaseRecord], on_device: bool, batches: int) -> float | None:
    """CPU seconds per 160³ sample of the one worker process of a PretrainLoader (seed 1, default
    augmentation), from /proc: all it does, including moving each batch into shared memory for
    the training process. The consumer only takes the batches, so the worker is the bottleneck and
    is building the next batch both when the count starts and when it ends. None without /proc."""
    config = LoaderConfig((160,) * 3, BATCH, num_workers=1, foreground_probability=0.0, pin_memory=False, seed=1,
                          augment_on_device=on_device)
    with PretrainLoader(cases, config) as loader:
        stream = iter(loader)
        next(stream)  # worker started, first touches
        workers = getattr(loader._iterator, "_workers", [])  # DataLoader's processes (private, benchmark only)
        if len(workers) != 1 or not Path(f"/proc/{workers[0].pid}/stat").exists():
            return None
        before = _process_cpu_seconds(workers[0].pid)
        for _ in range(batches):
            next(stream)
        return (_process_cpu_seconds(workers[0].pid) - before) / (batches * BATCH)


def run(quick: bool) -> dict:
    cpus = available_cpus()
    worker_counts = sorted({1, cpus})
    with tempfile.TemporaryDirectory(prefix="nnssl_bench_dl_") as tmp:
        t0 = time.perf_counter()
        cases = make_volumes(Path(tmp))
        generate_s = time.perf_counter() - t0
        image = open_array(cases[0].image)
        results: dict = {}
        for patch in (160, 96):
            per_patch: dict = {}
            scale = 1 if patch == 160 else 3  # smaller patches: more batches for a stable rate
            for workers in worker_counts:
                warm = workers
                n_fast = (1 if quick else 4) * scale * workers
                n_slow = 1 * workers

                def ours(aug: AugmentConfig, on_device: bool = False) -> Callable[[], Iterator]:
                    cfg = LoaderConfig((patch,) * 3, BATCH, num_workers=workers, augment=aug,
                                       foreground_probability=0.0, pin_memory=False, seed=1,
                                       augment_on_device=on_device)
                    return lambda: iter(PretrainLoader(cases, cfg))

                light = AugmentConfig(zoom_probability=0.0, rotation_probability=0.0)
                per_patch[str(workers)] = {
                    "ours_default": batches_per_second(ours(AugmentConfig()), warm, n_fast),
                    "ours_device": batches_per_second(ours(AugmentConfig(), on_device=True), warm, n_fast),
                    "ours_light": batches_per_second(ours(light), warm, n_fast),
                    "reference": batches_per_second(
                        lambda: _dataloader(ReferenceStream(cases, patch), workers), warm, n_slow),
                    "floor": batches_per_second(
                        lambda: _dataloader(FloorStream(cases, patch), workers), warm, n_fast),
                }
            results[f"{patch}^3"] = per_patch
        cpu_s = worker_cpu_seconds(cases, batches=2 if quick else 6)
        process_s = {name: worker_process_cpu_seconds(cases, on_device, batches=2 if quick else 6)
                     for name, on_device in (("ours_default", False), ("ours_device", True))}
    all_160 = results["160^3"][str(cpus)]
    one_worker = results["160^3"]["1"]
    worker_cost = {f"cpu_s_{name}": seconds for name, seconds in cpu_s.items()}
    worker_cost.update({f"wall_s_{name}": 1.0 / (rate * BATCH) for name, rate in one_worker.items()
                        if name != "reference"})
    worker_cost.update({f"worker_process_cpu_s_{name}": seconds for name, seconds in process_s.items()})
    worker_cost["cpu_augmenting_over_device_cpu_s"] = cpu_s["ours_default"] / cpu_s["ours_device"]
    if None not in process_s.values():
        worker_cost["cpu_augmenting_over_device_worker_process_cpu_s"] = (process_s["ours_default"]
                                                                           / process_s["ours_device"])
    # a worker's samples/s: 1 / its process's CPU seconds per sample (the build alone where /proc is missing)
    per_sample = {name: process_s[name] or cpu_s[name] for name in ("ours_default", "ours_device")}
    worker_cost["cpu_augmenting_over_device_wall_s"] = one_worker["ours_device"] / one_worker["ours_default"]
    derived = {
        f"{p}^3_{w}_workers": {
            "speedup_vs_reference": round(r["ours_default"] / r["reference"], 2),
            "fraction_of_floor_light": round(r["ours_light"] / r["floor"], 2),
            "fraction_of_floor_default": round(r["ours_default"] / r["floor"], 2),
            "fraction_of_floor_device_workers": round(r["ours_device"] / r["floor"], 2),
            "device_workers_over_default": round(r["ours_device"] / r["ours_default"], 2),
        }
        for p in (160, 96) for w, r in results[f"{p}^3"].items()
    }
    return {
        "speedup_vs_reference": round(all_160["ours_default"] / all_160["reference"], 2),
        "fraction_of_floor": round(all_160["ours_light"] / all_160["floor"], 2),
        "unit": "batches/s, batch 8, one channel",
        "batches_per_second": results,
        "ratios": derived,
        "worker_cost_160": worker_cost,
        "workers_per_gpu": workers_per_gpu(
            {"cpu_augmentation": 1.0 / per_sample["ours_default"],
             "device_augmentation": 1.0 / per_sample["ours_device"]},
            count_steps=1 if quick else 4),
        "setup": {
            "volumes": NUM_VOLUMES, "shape": list(SHAPE),
            "image_compression_ratio": round(float(image.cratio), 2),
            "chunks": list(image.chunks), "blocks": list(image.blocks), "generate_s": round(generate_s, 1),
            "cpus": cpus, "worker_counts": worker_counts, "quick": quick,
            "python": platform.python_version(), "torch": torch.__version__, "blosc2": blosc2.__version__,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (smoke test)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
