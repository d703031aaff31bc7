"""GPU check: the training step, the loader feeding it and a DDP step on the machine at hand; prints
one JSON object (stdout) and a short table (stderr).

1. `steps`: the trainer's own optimizer step (`training/step.py::optimizer_step` on the method and
   AdamW that `resolve_config` / `build_method` / `build_optimizer` give, bf16 autocast on CUDA)
   for I-JEPA and MAE on Primus-M and ResEnc-L at 160³, batch 8 per GPU, on random volumes
   resident on the GPU: median step time of the timed steps after warm-up, samples/s, peak memory,
   FLOPs of those same steps (`FlopCounterMode`, eager, the same step indices, hence the same mask
   sizes; matmul / conv / attention FLOPs, the MFU convention), achieved TFLOP/s and MFU against
   the device's dense bf16 peak (`PEAK_BF16_TFLOPS`, by device name; an unknown device gets no MFU
   unless `--peak_tflops` is given). Then the largest batch that fits: doubling from 8, then
   bisecting, out-of-memory caught, at most `--max_batch`.
2. `compile`: the same steps with `nnssl_train --compile`'s `compile_method`, in a child process
   given whatever remains of `--budget_s` (a compile that fails or runs out of time is recorded,
   not fatal): compile time (warm-up wall time minus warm-up steps at the compiled speed), graphs
   compiled, recompiles while timed, speed-up over eager.
3. `loader`: `PretrainLoader` with 1, 2, 4, 8 workers on synthetic blosc2 cases (the head-like
   volumes of `benchmarks/dataloading.py`), default augmentation, 160³ crops, batch 8: its
   capacity (batches/s, the consumer copying each batch to the device and nothing else) and the
   `data_wait_fraction` the trainer logs (waiting for the next batch / whole step) while it feeds
   the real step of the fastest configuration; for every configuration the wait the capacity
   predicts, max(0, 1 - capacity x step time), and the workers that configuration needs.
   `--augment_on_device` is passed to `LoaderConfig` when this checkout has that option.
4. `ddp`: two processes (spawn; nccl on CUDA, gloo in the CPU smoke run), the trainer's
   `StepModule` in `DistributedDataParallel`, the first configuration at batch 8 per GPU: global
   samples/s, scaling over one GPU, parameters identical on both ranks. Skipped with fewer than 2
   GPUs.

Steps run first (the loader needs their times), then the loader, DDP, the batch search and the
compiled steps, each only while `--budget_s` lasts (what did not fit says so).

    python benchmarks/gpu_check.py --out gpu_check.json   # one H100: under 8 minutes
    python benchmarks/gpu_check.py --cpu_smoke            # Tiny / ResEncTiny on the CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _nidl_step import count_step_flops  # noqa: E402  (FlopCounterMode + the CPU attention kernel)

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's H100, H200 and A100 datasheets, in
# TFLOP/s, by a substring of `torch.cuda.get_device_name()`; first match wins, so the specific
# names come before the general ones (an H100 SXM reports "NVIDIA H100 80GB HBM3").
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("GH200", 989.4, "GH200 (H100-class GPU), dense bf16"),
    ("H200 NVL", 835.5, "H200 NVL, dense bf16"),
    ("H200", 989.4, "H200 SXM, dense bf16"),
    ("H100 NVL", 835.5, "H100 NVL, dense bf16"),
    ("H100 PCIe", 756.0, "H100 PCIe, dense bf16"),
    ("H100", 989.4, "H100 SXM, dense bf16"),
    ("A100", 312.0, "A100 (SXM or PCIe), dense bf16"),
)


# warm-up steps of a compiled configuration: I-JEPA compiles at its first step (static shapes) and
# its second (context / target lengths symbolic); the third shows whether compiling stopped
COMPILE_WARMUP = 3


@dataclass(frozen=True)
class Plan:
    """What one run measures; `GPU_PLAN` is the check, `SMOKE_PLAN` the same code on tiny shapes."""

    trainers: tuple[str, ...]
    batch: int
    warmup: int
    timed: int
    max_batch: int
    bisect: int  # probes between the last fitting and the first failing batch
    probe_steps: int  # steps per batch-search probe (the first one untimed when > 1)
    volume_shape: tuple[int, int, int]
    num_volumes: int
    loader_patch: int
    workers: tuple[int, ...]
    feed_steps: int  # real steps fed by the loader per worker count, after the queue filled
    search_trainers: tuple[str, ...] | None = None  # configurations whose largest batch is searched (None: all)


GPU_PLAN = Plan(
    trainers=tuple(f"{m}_{b}_P160" for b in ("PrimusM", "ResEncL") for m in ("IJEPATrainer", "MAETrainer")),
    batch=8, warmup=2, timed=5, max_batch=128, bisect=2, probe_steps=2, volume_shape=(200, 240, 200),
    num_volumes=8, loader_patch=160, workers=(1, 2, 4, 8), feed_steps=10)
SMOKE_PLAN = Plan(
    trainers=("IJEPATrainer_Tiny_P32", "MAETrainer_Tiny_P32", "IJEPATrainer_ResEncTiny_P64",
              "MAETrainer_ResEncTiny_P64"),  # the FLOP-counting step is the only warm-up
    batch=2, warmup=0, timed=1, max_batch=4, bisect=1, probe_steps=1, volume_shape=(40, 48, 40), num_volumes=3,
    loader_patch=32, workers=(1, 2), feed_steps=3,
    search_trainers=("IJEPATrainer_Tiny_P32", "MAETrainer_Tiny_P32"))  # ResEncTiny probes cost seconds each


class Budget:
    """Wall-clock budget of the whole check; later parts ask what is left."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> dict:
    """{"tflops": peak or None, "source": where it came from} for MFU."""
    if override is not None:
        return {"tflops": override, "source": "--peak_tflops"}
    if device.type != "cuda":
        return {"tflops": None, "source": "no peak table for the CPU (the smoke run measures an fp32 GEMM instead)"}
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> dict:
    for key, tflops, what in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return {"tflops": tflops, "source": f"{what} (table, device {name!r})"}
    return {"tflops": None, "source": f"unknown device {name!r}: not in PEAK_BF16_TFLOPS; no MFU (pass --peak_tflops)"}


def gemm_tflops(device: torch.device, n: int = 1024, repeats: int = 3) -> float:
    """Best fp32 n³ matmul rate on `device` in this process: the smoke run's stand-in peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def rates(flops_per_step: float, step_s: float, batch: int, peak: float | None) -> dict:
    achieved = flops_per_step / step_s / 1e12
    return {"samples_per_s": batch / step_s, "achieved_tflops": achieved,
            "mfu": achieved / peak if peak else None}


class StepBench:
    """One configuration on one device: the method, fused AdamW and the trainer's step function."""

    def __init__(self, trainer: str, device: torch.device, precision: str, compile_backend: str | None = None) -> None:
        from nnssl.methods.factory import build_method
        from nnssl.training.compilation import compile_method
        from nnssl.training.names import resolve_config
        from nnssl.training.setup import build_optimizer

        self.trainer, self.device, self.precision = trainer, device, precision
        self.config = resolve_config(trainer)
        self.method = build_method(self.config).to(device).train()
        if compile_backend is not None:
            compile_method(self.method, compile_backend)
        self.optimizer = build_optimizer(self.method, self.config)
        self.schedule = self.config.schedule_config()

    def autocast(self):  # type: ignore[no-untyped-def]
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def volumes(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, 1, *self.config.patch_size, device=self.device)
        return x, torch.zeros_like(x, dtype=torch.bool)

    def step(self, volumes: torch.Tensor, anon: torch.Tensor, index: int, **kwargs):  # type: ignore[no-untyped-def]
        from nnssl.training.step import optimizer_step

        return optimizer_step(self.method, self.optimizer, volumes, anon, index, self.schedule,
                              self.config.optim.grad_clip, autocast=self.autocast, **kwargs)

    def timed_steps(self, batch: int, first: int, count: int) -> tuple[list[float], list[dict]]:
        """Wall times of steps first .. first + count - 1 (synchronised) and their scalars."""
        x, anon = self.volumes(batch)
        times, scalars = [], []
        for index in range(first, first + count):
            synchronize(self.device)
            start = time.perf_counter()
            result = self.step(x, anon, index)
            synchronize(self.device)
            times.append(time.perf_counter() - start)
            scalars.append(dict(result.output.scalars))
        return times, scalars

    def flops(self, batch: int, first: int, count: int) -> list[int]:
        """FLOPs of steps first .. first + count - 1, one FlopCounterMode pass each (eager only)."""
        x, anon = self.volumes(batch)
        return [count_step_flops(lambda i=index: self.step(x, anon, i)) for index in range(first, first + count)]

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None

    def release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def measure_steps(bench: StepBench, plan: Plan, peak: float | None, batch: int) -> dict:
    """Warm-up, FLOPs of the timed step indices, then the timed steps (see the module docstring)."""
    bench.reset_peak_memory()
    warm_times, _ = bench.timed_steps(batch, 0, plan.warmup)
    flops = bench.flops(batch, plan.warmup, plan.timed)
    times, scalars = bench.timed_steps(batch, plan.warmup, plan.timed)
    step_s = statistics.median(times)
    flops_per_step = statistics.fmean(flops)
    return {"trainer": bench.trainer, "batch": batch, "precision": bench.precision,
            "warmup_s": warm_times, "step_s_median": step_s, "step_s_all": times,
            "flops_per_step": flops_per_step, "flops_per_step_all": flops, "flops_per_sample": flops_per_step / batch,
            **rates(flops_per_step, step_s, batch, peak), "peak_memory_gib": bench.peak_memory_gib(),
            "tokens": scalars}


def measure_config(trainer: str, device: torch.device, precision: str, plan: Plan, peak: float | None) -> dict:
    """`measure_steps` at the plan's batch, halved after each out-of-memory (recorded) down to 1."""
    bench = StepBench(trainer, device, precision)
    batch, out_of_memory = plan.batch, []
    try:
        while True:
            try:
                return {**measure_steps(bench, plan, peak, batch), "out_of_memory_at": out_of_memory}
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                out_of_memory.append(batch)
                bench.release()
                if batch == 1:
                    return {"trainer": trainer, "batch": plan.batch, "error": "out of memory at batch 1",
                            "out_of_memory_at": out_of_memory}
                batch //= 2
    finally:
        bench.release()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_batch(fits: Callable[[int], dict | None], known: int, cap: int, bisect: int,
                  failed: int | None = None) -> tuple[int, list]:
    """Largest batch b <= cap with `fits(b)` not None, searching from `known` (known to fit;
    `failed`: a batch known not to fit): doubling until a failure or the cap, then `bisect` probes
    between the last fit and the first failure. `fits` returns the probe's measurements or None
    when it ran out of memory. Returns (largest fitting batch, the probes in order)."""
    probes: list[dict] = []

    def probe(b: int) -> bool:
        result = fits(b)
        probes.append({"batch": b, "fits": result is not None, **(result or {})})
        return result is not None

    good, bad = known, failed
    while bad is None and good * 2 <= cap:
        if probe(good * 2):
            good *= 2
        else:
            bad = good * 2
    for _ in range(bisect):
        if bad is None or bad - good <= 1:
            break
        middle = (good + bad) // 2
        if probe(middle):
            good = middle
        else:
            bad = middle
    return good, probes


def search_batch(bench: StepBench, plan: Plan, measured: dict, peak: float | None) -> dict:
    """`largest_batch` with real steps from the measured batch; FLOPs scale with the batch (the
    measured per-sample FLOPs; I-JEPA's context length varies a little with the batch)."""
    first = plan.warmup + plan.timed

    def fits(b: int) -> dict | None:
        bench.release()
        bench.reset_peak_memory()
        try:
            times, _ = bench.timed_steps(b, first, plan.probe_steps)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            bench.release()
            return None
        step_s = times[-1]
        return {"step_s": step_s, **rates(measured["flops_per_sample"] * b, step_s, b, peak),
                "peak_memory_gib": bench.peak_memory_gib()}

    failed = min(measured["out_of_memory_at"], default=None)
    best, probes = largest_batch(fits, measured["batch"], plan.max_batch, plan.bisect, failed)
    bench.release()
    capped = failed is None and best * 2 > plan.max_batch and all(p["fits"] for p in probes)
    return {"largest_batch": best, "capped_by_max_batch": capped, "max_batch": plan.max_batch, "probes": probes}


# ---- the loader -----------------------------------------------------------------------------------

def loader_option_available() -> bool:
    from nnssl.dataloading.loader import LoaderConfig

    return "augment_on_device" in {f.name for f in fields(LoaderConfig)}


def measure_loader(plan: Plan, device: torch.device, feeder: StepBench, batch: int, augment_on_device: bool) -> dict:
    """Capacity and fed data_wait_fraction per worker count (see the module docstring)."""
    from dataloading import make_volumes

    from nnssl.dataloading.loader import LoaderConfig, PretrainLoader

    extra = {"augment_on_device": True} if augment_on_device and loader_option_available() else {}
    per_workers = {}
    with tempfile.TemporaryDirectory(prefix="nnssl_gpu_check_") as tmp:
        start = time.perf_counter()
        cases = make_volumes(Path(tmp), shape=plan.volume_shape, num_volumes=plan.num_volumes,
                             patch=plan.loader_patch)
        generate_s = time.perf_counter() - start
        for workers in plan.workers:
            config = LoaderConfig((plan.loader_patch,) * 3, batch, num_workers=workers, seed=1, **extra)
            with PretrainLoader(cases, config) as loader:
                batches = iter(loader)
                fed = _feed(batches, feeder, device, warm=2 * workers, steps=plan.feed_steps)
                for _ in range(config.prefetch * workers):  # drain what was queued while the steps ran
                    next(batches)
                count = max(3, 2 * workers)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(count):
                    moved = next(batches).to(device)
                    synchronize(device)
                capacity = count / (time.perf_counter() - start)
            per_workers[str(workers)] = {"capacity_batches_per_s": capacity,
                                         "capacity_samples_per_s": capacity * batch, **fed}
            del moved
    return {"patch": plan.loader_patch, "batch": batch, "volumes": plan.num_volumes,
            "volume_shape": list(plan.volume_shape), "generate_s": generate_s, "fed_by": feeder.trainer,
            "augment_on_device": {"requested": augment_on_device, "available": loader_option_available(),
                                  "passed": bool(extra)},
            "per_workers": per_workers}


def _feed(batches, feeder: StepBench, device: torch.device, warm: int, steps: int) -> dict:  # type: ignore[no-untyped-def]
    """The trainer's loop timing (`Trainer.run`): wait = next(batches), step = wait + the real step
    on the copied batch; `warm` steps first so the workers' queue is in its steady state."""
    wait = total = 0.0
    for i in range(warm + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        feeder.step(batch.data.to(device, non_blocking=True), batch.anonymization_mask.to(device, non_blocking=True),
                    batch.step)
        synchronize(device)
        if i >= warm:
            wait += t1 - t0
            total += time.perf_counter() - t0
    return {"fed_steps": steps, "fed_step_s": total / steps, "data_wait_fraction": wait / total}


def loader_verdicts(loader: dict, steps: list[dict]) -> dict:
    """Per configuration: the wait each worker count's capacity predicts, max(0, 1 - capacity /
    demand) in samples/s, the fewest measured workers that leave no wait (None: more than the
    largest count measured), and the formula's count: ceil(demand / the best per-worker rate)."""
    out = {}
    for s in steps:
        if "step_s_median" not in s:
            continue
        demand = s["batch"] / s["step_s_median"]  # samples/s the GPU consumes
        predicted = {w: max(0.0, 1.0 - r["capacity_samples_per_s"] / demand) for w, r in loader["per_workers"].items()}
        enough = [int(w) for w, p in predicted.items() if p == 0.0]
        per_worker = max(r["capacity_samples_per_s"] / int(w) for w, r in loader["per_workers"].items())
        out[s["trainer"]] = {"gpu_samples_per_s": demand, "predicted_data_wait_fraction": predicted,
                             "fewest_measured_workers_without_wait": min(enough) if enough else None,
                             "samples_per_s_per_worker": per_worker,
                             "workers_by_formula": math.ceil(demand / per_worker)}
    return out


# ---- DDP ------------------------------------------------------------------------------------------

def _ddp_rank(trainer: str, batch: int, precision: str, warmup: int, timed: int, out: str) -> None:
    """One rank of the two-process step (run by `spawn_local`, which sets RANK / WORLD_SIZE)."""
    from torch.nn.parallel import DistributedDataParallel

    from nnssl.training import distributed
    from nnssl.training.loop import StepModule

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if torch.cuda.is_available() else "cpu")
    distributed.init_process_group(rank, rank, world, str(device))
    try:
        bench = StepBench(trainer, device, precision)
        model = DistributedDataParallel(StepModule(bench.method), device_ids=[rank] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
        x, anon = bench.volumes(batch)
        bench.reset_peak_memory()
        times = []
        for index in range(warmup + timed):
            synchronize(device)
            start = time.perf_counter()
            bench.step(x, anon, index, forward=model, rank=rank, world_size=world,
                       agree=lambda flags: distributed.all_reduce_max_flags(flags, str(device)))
            synchronize(device)
            times.append(time.perf_counter() - start)
        checksum = torch.stack([p.detach().double().sum() for p in bench.method.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        torch.distributed.all_gather(gathered, checksum)
        if rank == 0:
            step_s = statistics.median(times[warmup:])
            Path(out).write_text(json.dumps({
                "world_size": world, "backend": torch.distributed.get_backend(), "batch_per_process": batch,
                "step_s_median": step_s, "step_s_all": times[warmup:], "global_samples_per_s": world * batch / step_s,
                "parameters_equal_across_ranks": len({float(g) for g in gathered}) == 1,
                "peak_memory_gib_rank0": bench.peak_memory_gib()}))
    finally:
        distributed.destroy_process_group()


def measure_ddp(plan: Plan, device: torch.device, precision: str, single: dict) -> dict:
    from nnssl.training.distributed import spawn_local

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} CUDA device(s) visible; the DDP step needs 2"}
    with tempfile.TemporaryDirectory(prefix="nnssl_gpu_check_ddp_") as tmp:
        out = Path(tmp) / "rank0.json"
        spawn_local(_ddp_rank, 2, (plan.trainers[0], plan.batch, precision, plan.warmup, plan.timed, str(out)))
        result = json.loads(out.read_text())
    result["trainer"] = plan.trainers[0]
    result["scaling_vs_one_process"] = result["global_samples_per_s"] / (2 * single["samples_per_s"])
    return result


# ---- compiled steps, in a child process -----------------------------------------------------------

def compiled_child(args: argparse.Namespace) -> int:
    """Print one JSON line per trainer: the compiled steps' times and graph counts, or the error."""
    from nnssl.training.compilation import compiled_graph_count

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    for item in args.trainers:
        trainer, batch = item.rsplit("@", 1)
        batch = int(batch)
        torch._dynamo.reset()
        line: dict = {"trainer": trainer, "batch": batch, "backend": args.backend}
        try:
            bench = StepBench(trainer, device, args.precision, compile_backend=args.backend)
            graphs = compiled_graph_count()
            start = time.perf_counter()
            warm_times, _ = bench.timed_steps(batch, 0, args.warmup)
            line["warmup_wall_s"] = time.perf_counter() - start
            line["graphs_compiled_in_warmup"] = compiled_graph_count() - graphs
            graphs = compiled_graph_count()
            bench.reset_peak_memory()
            times, _ = bench.timed_steps(batch, args.warmup, args.timed)
            line.update({"warmup_step_s": warm_times, "step_s_median": statistics.median(times), "step_s_all": times,
                         "recompiles_while_timed": compiled_graph_count() - graphs,
                         "peak_memory_gib": bench.peak_memory_gib()})
            line["compile_s"] = line["warmup_wall_s"] - args.warmup * line["step_s_median"]
            del bench
        except Exception as e:  # noqa: BLE001 - a compile failure is a result, not the end of the check
            line["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(line), flush=True)
    return 0


def measure_compiled(plan: Plan, device: torch.device, precision: str, backend: str, budget: Budget,
                     eager: dict[str, dict], peak: float | None) -> dict:
    """Run `compiled_child` with the time that is left; merge its lines with the eager results."""
    trainers = [t for t in plan.trainers if "step_s_median" in eager.get(t, {})]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_compiled_child", "--device", str(device),
           "--precision", precision, "--backend", backend, "--warmup", str(COMPILE_WARMUP),
           "--timed", str(plan.timed), "--trainers", *(f"{t}@{eager[t]['batch']}" for t in trainers)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=max(1.0, budget.left()))
        note = None if child.returncode == 0 else f"child exited {child.returncode}: {err[-2000:]}"
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        note = "time budget (--budget_s) ran out while compiling"
    lines = {d["trainer"]: d for d in (json.loads(x) for x in out.splitlines() if x.startswith("{"))}
    results = {}
    for trainer in trainers:
        line = lines.get(trainer)
        if line is None:
            results[trainer] = {"skipped": note or "no result from the compile child"}
            continue
        if "step_s_median" in line:
            base = eager[trainer]
            line.update(rates(base["flops_per_step"], line["step_s_median"], base["batch"], peak))
            line["speedup_vs_eager"] = base["step_s_median"] / line["step_s_median"]
        results[trainer] = line
    return {"backend": backend, "warmup_steps": COMPILE_WARMUP, "note": note, "per_trainer": results}


# ---- the whole check ------------------------------------------------------------------------------

def run_check(args: argparse.Namespace) -> dict:
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if args.cpu_smoke:
        device, precision = torch.device("cpu"), "fp32"  # emulated bf16 on most CPUs is ~100x slower
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device visible; run with --cpu_smoke to check the script on a CPU")
        device, precision = torch.device("cuda:0"), "bf16"
    budget = Budget(args.budget_s)
    peak = peak_tflops(device, args.peak_tflops)
    if args.cpu_smoke and peak["tflops"] is None:
        peak = {"tflops": gemm_tflops(device), "source": "measured fp32 1024³ matmul on this CPU (smoke stand-in)"}
    result: dict = {"plan": asdict(plan), "device": _describe(device), "precision": precision, "peak": peak,
                    "budget_s": args.budget_s}
    parts: dict[str, float] = {}
    started = time.perf_counter()
    steps = [measure_config(trainer, device, precision, plan, peak["tflops"]) for trainer in plan.trainers]
    parts["steps"] = time.perf_counter() - started
    result["steps"] = steps
    eager = {s["trainer"]: s for s in steps}
    measured = [s for s in steps if "step_s_median" in s]

    if not measured:
        result["loader"] = {"skipped": "no configuration fitted in memory, not even at batch 1"}
    elif budget.left() <= 0:
        result["loader"] = {"skipped": "time budget"}
    else:
        started = time.perf_counter()
        fastest = max(measured, key=lambda s: s["samples_per_s"])  # the most demanding consumer
        feeder = StepBench(fastest["trainer"], device, precision)
        result["loader"] = measure_loader(plan, device, feeder, fastest["batch"], args.augment_on_device)
        result["loader_verdicts"] = loader_verdicts(result["loader"], steps)
        feeder.release()
        del feeder
        parts["loader"] = time.perf_counter() - started

    started = time.perf_counter()
    first = eager[plan.trainers[0]]
    result["ddp"] = (measure_ddp(plan, device, precision, first)
                     if first.get("batch") == plan.batch and "step_s_median" in first and budget.left() > 0
                     else {"skipped": f"time budget, or {plan.trainers[0]} did not run at batch {plan.batch}"})
    parts["ddp"] = time.perf_counter() - started

    started = time.perf_counter()
    searches = {}
    for s in measured:
        if plan.search_trainers is not None and s["trainer"] not in plan.search_trainers:
            searches[s["trainer"]] = {"skipped": "not searched in this plan"}
        elif budget.left() < (30 if not args.cpu_smoke else 0):
            searches[s["trainer"]] = {"skipped": "time budget"}
        else:
            bench = StepBench(s["trainer"], device, precision)
            searches[s["trainer"]] = search_batch(bench, plan, s, peak["tflops"])
            bench.release()
            del bench
    result["largest_batch"] = searches
    parts["largest_batch"] = time.perf_counter() - started

    if args.cpu_smoke and not args.compile_smoke:
        result["compile"] = {"skipped": "--cpu_smoke without --compile_smoke"}
    elif budget.left() < 5:
        result["compile"] = {"skipped": "time budget"}
    else:
        started = time.perf_counter()
        result["compile"] = measure_compiled(plan, device, precision, args.compile_backend, budget, eager,
                                             peak["tflops"])
        parts["compile"] = time.perf_counter() - started
    result["part_s"] = parts
    result["wall_s"] = args.budget_s - budget.left()
    return result


def _describe(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "cpus": os.cpu_count()}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), count=torch.cuda.device_count(),
                    memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30,
                    cuda=torch.version.cuda)
    return info


def table(result: dict) -> str:
    """The short human-readable summary (stderr)."""
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    compiled = result.get("compile", {}).get("per_trainer", {})
    search = result.get("largest_batch", {})
    lines = [f"device: {result['device'].get('name', result['device']['type'])}, {result['precision']}, "
             f"peak {fmt(result['peak']['tflops'], '.1f')} TFLOP/s ({result['peak']['source']})",
             "| trainer | batch | samples/s | TFLOP/s | MFU | peak GiB | compiled samples/s | compile s | largest batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result["steps"]:
        c, b = compiled.get(s["trainer"], {}), search.get(s["trainer"], {})
        if "error" in s:
            lines.append(f"| {s['trainer']} | {s['batch']} | {s['error']} | | | | | | |")
            continue
        lines.append(f"| {s['trainer']} | {s['batch']} | {s['samples_per_s']:.2f} | {s['achieved_tflops']:.3g} | "
                     f"{fmt(s['mfu'], '.3f')} | {fmt(s['peak_memory_gib'], '.1f')} | "
                     f"{fmt(c.get('samples_per_s'), '.2f') if 'error' not in c else 'failed'} | "
                     f"{fmt(c.get('compile_s'), '.0f')} | {b.get('largest_batch', b.get('skipped', '-'))} |")
    loader = result.get("loader", {})
    if "per_workers" in loader:
        lines.append(f"loader (fed by {loader['fed_by']}): " + ", ".join(
            f"{w} workers {r['capacity_samples_per_s']:.1f} samples/s wait {r['data_wait_fraction']:.2f}"
            for w, r in loader["per_workers"].items()))
    ddp = result.get("ddp", {})
    lines.append("ddp: " + (ddp["skipped"] if "skipped" in ddp else
                            f"{ddp['global_samples_per_s']:.2f} samples/s, scaling {ddp['scaling_vs_one_process']:.2f}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu_smoke", action="store_true", help="tiny shapes on the CPU (the test suite runs this)")
    parser.add_argument("--compile_smoke", action="store_true", help="with --cpu_smoke: also the compiled steps")
    parser.add_argument("--compile_backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="backend of the compiled steps (inductor is what nnssl_train --compile uses)")
    parser.add_argument("--augment_on_device", action="store_true",
                        help="pass augment_on_device=True to LoaderConfig when this checkout has that option")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak for MFU (overrides the table)")
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="wall-clock budget; parts that no longer fit are recorded as skipped")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    # the compiled steps' child process (internal)
    parser.add_argument("--_compiled_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trainers", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._compiled_child:
        return compiled_child(args)
    from nnssl.log import setup_logging

    setup_logging(False)
    result = run_check(args)
    print(table(result), file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
