"""GPU check: the training step, the loader feeding it and a DDP step on the machine at hand; prints
one JSON object (stdout, and `--out`) and a short table (stderr). In this order, each part after
the first only while `--budget_s` lasts (what did not fit, or failed, says so in its place):

1. `steps`: the trainer's own optimizer step (`training/step.py::optimizer_step` on the method and
   fused AdamW that `resolve_config` / `build_method` / `build_optimizer` give, bf16 autocast) for
   I-JEPA and MAE on Primus-M and ResEnc-L at 160³, batch 8 per GPU (halved while it runs out of
   memory), on random volumes resident on the GPU: median step time of the timed steps after
   warm-up, samples/s, peak memory, FLOPs of those same step indices (so the same I-JEPA mask
   sizes) from `FlopCounterMode` in eager mode (matmul / conv / attention FLOPs, the MFU
   convention), achieved TFLOP/s and MFU against the device's dense bf16 peak
   (`PEAK_BF16_TFLOPS` by device name; an unknown device gets no MFU unless `--peak_tflops`).
2. `loader`: `PretrainLoader` with 1, 2, 4, 8 workers on synthetic blosc2 cases (the head-like
   volumes of `benchmarks/dataloading.py`), default augmentation, 160³ crops: its capacity (the
   consumer only copies each batch to the device) and the `data_wait_fraction` the trainer logs
   (waiting for the next batch / whole step) while it feeds the real step of the configuration
   with the highest samples/s. `loader_verdicts`: per configuration, the wait each capacity
   predicts, max(0, 1 - capacity / GPU samples/s), and the workers it needs. Augmentation runs
   where the trainer runs it (`--augment_on_device auto`: on the device with CUDA, in the workers
   on the CPU); `on` / `off` force one side, e.g. `off` to measure the worker-side augmentation.
3. `ddp`: two processes (spawn; nccl on CUDA, gloo in the CPU smoke run) running the trainer's
   `StepModule` in `DistributedDataParallel`, the first configuration at batch 8 per GPU: global
   samples/s, scaling over one GPU, parameters identical on both ranks. Skipped below 2 GPUs.
4. `compile`: the same steps through `nnssl_train --compile`'s `compile_method`, in a child
   process given the time that is left but `SEARCH_RESERVE_S` (a failure or a timeout is recorded,
   not fatal): compile time (warm-up wall time minus as many compiled steps), graphs compiled,
   recompiles while timed, speed-up over eager.
5. `largest_batch`: doubling from the measured batch up to `Plan.max_batch`, then bisecting;
   out-of-memory is a failed probe; no probe starts after the budget is spent.

    timeout 480 python benchmarks/gpu_check.py --out gpu_check.json   # one H100: 7 min budget, 8 min at most
    python benchmarks/gpu_check.py --cpu_smoke                         # Tiny / ResEncTiny on the CPU
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
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_steps import (  # noqa: E402  (re-exported: the tests reach the step half through this module)
    PEAK_BF16_TFLOPS,  # noqa: F401
    Budget,
    StepBench,
    StopSearch,  # noqa: F401
    gemm_tflops,
    is_out_of_memory,  # noqa: F401
    largest_batch,  # noqa: F401
    measure_config,
    peak_for_name,  # noqa: F401
    peak_tflops,
    rates,
    search_batch,
    synchronize,
)

# seconds of the budget the compiled steps leave to the largest-batch search (GPU run)
SEARCH_RESERVE_S = 90.0
# warm-up steps of a compiled configuration: I-JEPA compiles at its first step (static shapes) and
# again at the first change of each mask length (context, target; usually both at the second
# step); a recompile after these shows up as `recompiles_while_timed`
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


# ---- the loader -----------------------------------------------------------------------------------

def loader_option_available() -> bool:
    from nnssl.dataloading.loader import LoaderConfig

    return "augment_on_device" in {f.name for f in fields(LoaderConfig)}


def measure_loader(plan: Plan, device: torch.device, feeder: StepBench, batch: int, augment_on_device: str) -> dict:
    """Capacity and fed data_wait_fraction per worker count (see the module docstring);
    `augment_on_device`: "auto" (the trainer's choice for `device`), "on" or "off"."""
    from dataloading import make_volumes
    from nnssl.dataloading.loader import LoaderConfig, PretrainLoader

    on_device = {"on": True, "off": False}.get(augment_on_device, device.type == "cuda")
    extra = {"augment_on_device": on_device} if loader_option_available() else {}
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
                                  "on_device": bool(extra.get("augment_on_device", False))},
            "per_workers": per_workers}


def _feed(batches, feeder: StepBench, device: torch.device, warm: int, steps: int) -> dict:  # type: ignore[no-untyped-def]
    """The trainer's loop timing (`Trainer.run`): wait = next(batches), step = wait + the real step
    on the copied batch; `warm` steps first so the workers' queue is in its steady state."""
    wait = total = 0.0
    for i in range(warm + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        moved = batch.to(device, non_blocking=True)  # a RawBatch is augmented on the device here, as in the trainer
        feeder.step(moved.data, moved.anonymization_mask, batch.step)
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


def measure_compiled(plan: Plan, device: torch.device, precision: str, backend: str, seconds: float,
                     eager: dict[str, dict], peak: float | None) -> dict:
    """Run `compiled_child` for at most `seconds`; merge its lines with the eager results."""
    trainers = [t for t in plan.trainers if "step_s_median" in eager.get(t, {})]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_compiled_child", "--device", str(device),
           "--precision", precision, "--backend", backend, "--warmup", str(COMPILE_WARMUP),
           "--timed", str(plan.timed), "--trainers", *(f"{t}@{eager[t]['batch']}" for t in trainers)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=max(1.0, seconds))
        note = None if child.returncode == 0 else f"child exited {child.returncode}: {err[-2000:]}"
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        note = f"time budget ran out while compiling ({seconds:.0f} s given)"
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

class _Parts:
    """Runs the parts of the check in order: each one's wall time is recorded, an exception becomes
    its result (a later part still runs: one failure must not lose a GPU session's other numbers),
    and the JSON so far is rewritten to `--out` after each part (a killed run leaves them)."""

    def __init__(self, result: dict, out: Path | None) -> None:
        self.result, self.out = result, out
        self.seconds: dict[str, float] = result.setdefault("part_s", {})

    def run(self, name: str, measure: Callable[[], dict]) -> dict:
        started = time.perf_counter()
        try:
            self.result[name] = measure()
        except Exception as e:  # noqa: BLE001 - recorded with its traceback, see the class docstring
            self.result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        self.seconds[name] = time.perf_counter() - started
        if self.out is not None:
            self.out.write_text(json.dumps(self.result, indent=1) + "\n", encoding="utf-8")
        return self.result[name]


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
    if device.type == "cuda":  # the GEMM ceiling of this device in this run, next to the datasheet's peak
        result["gemm_bf16_8192_tflops"] = gemm_tflops(device, 8192, torch.bfloat16, repeats=5)
    parts = _Parts(result, args.out)

    # 1. steps (always: everything else is measured against them)
    parts.run("steps", lambda: [measure_config(t, device, precision, plan, peak["tflops"]) for t in plan.trainers])
    steps = result["steps"] if isinstance(result["steps"], list) else []
    eager = {s["trainer"]: s for s in steps}
    measured = [s for s in steps if "step_s_median" in s]

    # 2. the loader, feeding the most demanding consumer (the highest samples/s)
    def loader() -> dict:
        if not measured:
            return {"skipped": "no configuration ran, not even at batch 1"}
        fastest = max(measured, key=lambda s: s["samples_per_s"])
        feeder = StepBench(fastest["trainer"], device, precision)
        try:
            return measure_loader(plan, device, feeder, fastest["batch"], args.augment_on_device)
        finally:
            feeder.release()

    if parts.run("loader", loader if budget.left() > 0 else lambda: {"skipped": "time budget"}).get("per_workers"):
        result["loader_verdicts"] = loader_verdicts(result["loader"], steps)

    # 3. DDP
    first = eager.get(plan.trainers[0], {})
    parts.run("ddp", lambda: measure_ddp(plan, device, precision, first)
              if first.get("batch") == plan.batch and "step_s_median" in first and budget.left() > 0
              else {"skipped": f"time budget, or {plan.trainers[0]} did not run at batch {plan.batch}"})

    # 4. the compiled steps, leaving SEARCH_RESERVE_S for the search
    def compiled() -> dict:
        if args.cpu_smoke and not args.compile_smoke:
            return {"skipped": "--cpu_smoke without --compile_smoke"}
        reserve = 0.0 if args.cpu_smoke else SEARCH_RESERVE_S
        if budget.left() - reserve < 5:
            return {"skipped": "time budget"}
        return measure_compiled(plan, device, precision, args.compile_backend, budget.left() - reserve, eager,
                                peak["tflops"])

    parts.run("compile", compiled)
    # 5. the largest batch, with what is left
    def searches() -> dict:
        found = {}
        for s in measured:
            if plan.search_trainers is not None and s["trainer"] not in plan.search_trainers:
                found[s["trainer"]] = {"skipped": "not searched in this plan"}
            elif budget.left() <= 0:
                found[s["trainer"]] = {"skipped": "time budget"}
            else:
                bench = StepBench(s["trainer"], device, precision)
                try:
                    found[s["trainer"]] = search_batch(bench, plan, s, peak["tflops"], budget)
                finally:
                    bench.release()
        return found

    parts.run("largest_batch", searches)

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
    """The short human-readable summary (stderr); parts that failed or were skipped show as such."""
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    compiled = result.get("compile", {}).get("per_trainer", {})
    search = result.get("largest_batch", {})
    lines = [f"device: {result['device'].get('name', result['device']['type'])}, {result['precision']}, "
             f"peak {fmt(result['peak']['tflops'], '.1f')} TFLOP/s ({result['peak']['source']})",
             "| trainer | batch | samples/s | TFLOP/s | MFU | peak GiB | compiled samples/s | compile s "
             "| largest batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    steps = result.get("steps")
    for s in steps if isinstance(steps, list) else []:
        c, b = compiled.get(s["trainer"], {}), search.get(s["trainer"], {})
        if "error" in s:
            lines.append(f"| {s['trainer']} | {s['batch']} | {s['error']} | | | | | | |")
            continue
        lines.append(f"| {s['trainer']} | {s['batch']} | {s['samples_per_s']:.2f} | {s['achieved_tflops']:.3g} | "
                     f"{fmt(s['mfu'], '.3f')} | {fmt(s['peak_memory_gib'], '.1f')} | "
                     f"{fmt(c.get('samples_per_s'), '.2f') if 'error' not in c else 'failed'} | "
                     f"{fmt(c.get('compile_s'), '.0f')} | {b.get('largest_batch', b.get('skipped', '-'))} |")
    for name in ("steps", "loader", "ddp", "largest_batch", "compile"):
        part = result.get(name)
        if isinstance(part, dict) and ("error" in part or "skipped" in part):
            lines.append(f"{name}: {part.get('error') or part.get('skipped')}")
    loader = result.get("loader", {})
    if "per_workers" in loader:
        lines.append(f"loader (fed by {loader['fed_by']}): " + ", ".join(
            f"{w} workers {r['capacity_samples_per_s']:.1f} samples/s wait {r['data_wait_fraction']:.2f}"
            for w, r in loader["per_workers"].items()))
    ddp = result.get("ddp", {})
    if "global_samples_per_s" in ddp:
        lines.append(f"ddp: {ddp['global_samples_per_s']:.2f} samples/s, scaling {ddp['scaling_vs_one_process']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu_smoke", action="store_true", help="tiny shapes on the CPU (the test suite runs this)")
    parser.add_argument("--compile_smoke", action="store_true", help="with --cpu_smoke: also the compiled steps")
    parser.add_argument("--compile_backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="backend of the compiled steps (inductor is what nnssl_train --compile uses)")
    parser.add_argument("--augment_on_device", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                        help="where the loader part augments: auto (the trainer's default: on the device with "
                             "CUDA), on (also the flag alone), off (in the workers)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak for MFU (overrides the table)")
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
