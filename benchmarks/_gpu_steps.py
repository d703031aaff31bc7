"""The step half of benchmarks/gpu_check.py: one configuration's optimizer steps on a device,
their FLOPs, rates and MFU against the device's peak, and the bounded largest-batch search.

Kept apart so gpu_check.py (loader, DDP, compiled steps, the report) stays readable.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


def gemm_tflops(device: torch.device, n: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    """Best n³ matmul rate on `device` in this process: the ceiling the datasheet peak is not
    (real GEMMs stay below the datasheet figure), and the smoke run's stand-in peak (fp32 on the CPU)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
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


def measure_steps(bench: StepBench, plan: Any, peak: float | None, batch: int) -> dict:
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


def measure_config(trainer: str, device: torch.device, precision: str, plan: Any, peak: float | None) -> dict:
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


class StopSearch(Exception):
    """Raised by a probe that must not run (the time budget is spent): the search ends there."""


def largest_batch(fits: Callable[[int], dict | None], known: int, cap: int, bisect: int,
                  failed: int | None = None) -> tuple[int, list]:
    """Largest batch b <= cap with `fits(b)` not None, searching from `known` (known to fit;
    `failed`: a batch known not to fit): doubling until a failure or the cap, then `bisect` probes
    between the last fit and the first failure. `fits` returns the probe's measurements, None
    when it ran out of memory, or raises `StopSearch`. Returns (largest batch known to fit, the
    probes in order; a stopped search ends with {"batch": b, "stopped": why})."""
    probes: list[dict] = []

    def probe(b: int) -> bool:
        result = fits(b)
        probes.append({"batch": b, "fits": result is not None, **(result or {})})
        return result is not None

    good, bad = known, failed
    try:
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
    except StopSearch as stop:
        probes.append({"batch": stop.args[0], "stopped": stop.args[1]})
    return good, probes


def search_batch(bench: StepBench, plan: Any, measured: dict, peak: float | None, budget: Budget | None = None
                 ) -> dict:
    """`largest_batch` with real steps from the measured batch, each probe only while `budget`
    lasts; FLOPs scale with the batch (the measured per-sample FLOPs; I-JEPA's context length
    varies a little with the batch)."""
    first = plan.warmup + plan.timed

    def fits(b: int) -> dict | None:
        if budget is not None and budget.left() <= 0:
            raise StopSearch(b, "time budget")
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
    stopped = any("stopped" in p for p in probes)
    capped = failed is None and not stopped and best * 2 > plan.max_batch and all(p["fits"] for p in probes)
    return {"largest_batch": best, "capped_by_max_batch": capped, "stopped_by_budget": stopped,
            "max_batch": plan.max_batch, "probes": probes}
