"""benchmarks/gpu_check.py without a GPU: `--cpu_smoke` runs every part of the check (steps, FLOPs,
MFU, batch search, loader, two-process DDP) on tiny shapes, and its JSON must be complete and
consistent with itself; the pieces that only a GPU reaches (the peak table, out-of-memory during
the batch search, the compiled-steps child) are driven directly. Never timings."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load():
    if "gpu_check_bench" in sys.modules:
        return sys.modules["gpu_check_bench"]
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check_bench", BENCH / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    run = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--cpu_smoke", "--out", str(out),
                          "--augment_on_device"],  # the path a GPU takes by default, here on the CPU
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(run.stdout) == result  # the JSON on stdout is the one written to --out
    return result, run.stderr


def test_smoke_steps_report_consistent_flops_rates_and_mfu(smoke):
    result, table = smoke
    plan, peak = result["plan"], result["peak"]["tflops"]
    assert result["device"]["type"] == "cpu" and result["precision"] == "fp32"
    assert peak > 0 and "measured" in result["peak"]["source"]
    assert [s["trainer"] for s in result["steps"]] == plan["trainers"]
    for s in result["steps"]:
        assert s["batch"] == plan["batch"] and s["out_of_memory_at"] == []
        assert len(s["step_s_all"]) == len(s["flops_per_step_all"]) == plan["timed"]
        assert all(f > 0 for f in s["flops_per_step_all"])
        assert s["step_s_median"] == pytest.approx(sorted(s["step_s_all"])[len(s["step_s_all"]) // 2])
        assert s["flops_per_sample"] * s["batch"] == pytest.approx(s["flops_per_step"])
        assert s["samples_per_s"] == pytest.approx(s["batch"] / s["step_s_median"])
        assert s["achieved_tflops"] == pytest.approx(s["flops_per_step"] / s["step_s_median"] / 1e12)
        assert s["mfu"] == pytest.approx(s["achieved_tflops"] / peak)
        assert s["peak_memory_gib"] is None  # CPU: no allocator statistics
        assert f"| {s['trainer']} | {s['batch']} |" in table
    flops = {s["trainer"]: s["flops_per_sample"] for s in result["steps"]}
    # the teacher on every token plus the predictor cost more than MAE's 25% of the tokens
    assert flops["IJEPATrainer_Tiny_P32"] > 2 * flops["MAETrainer_Tiny_P32"]
    ijepa = result["steps"][0]["tokens"]
    assert all(0 < t["context_tokens"] < 64 for t in ijepa)  # 4³ Tiny grid, targets removed


def test_smoke_loader_ddp_and_batch_search_are_complete(smoke):
    result, _ = smoke
    plan = result["plan"]
    steps = {s["trainer"]: s for s in result["steps"]}
    loader = result["loader"]
    assert loader["fed_by"] == max(steps.values(), key=lambda s: s["samples_per_s"])["trainer"]
    assert loader["augment_on_device"] == {"requested": "on", "available": True, "on_device": True}
    assert list(loader["per_workers"]) == [str(w) for w in plan["workers"]]
    for r in loader["per_workers"].values():
        assert r["capacity_batches_per_s"] > 0 and 0.0 <= r["data_wait_fraction"] < 1.0
        assert r["capacity_samples_per_s"] == pytest.approx(r["capacity_batches_per_s"] * loader["batch"])
        assert r["fed_steps"] == plan["feed_steps"]
    for trainer, verdict in result["loader_verdicts"].items():
        demand = steps[trainer]["samples_per_s"]
        assert verdict["gpu_samples_per_s"] == pytest.approx(demand)
        for w, r in loader["per_workers"].items():
            expected = max(0.0, 1.0 - r["capacity_samples_per_s"] / demand)
            assert verdict["predicted_data_wait_fraction"][w] == pytest.approx(expected)
        assert verdict["workers_by_formula"] == math.ceil(demand / verdict["samples_per_s_per_worker"])

    ddp = result["ddp"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo" and ddp["parameters_equal_across_ranks"]
    assert ddp["global_samples_per_s"] == pytest.approx(2 * ddp["batch_per_process"] / ddp["step_s_median"])
    assert ddp["scaling_vs_one_process"] == pytest.approx(
        ddp["global_samples_per_s"] / (2 * steps[ddp["trainer"]]["samples_per_s"]))

    for trainer, search in result["largest_batch"].items():
        if trainer not in plan["search_trainers"]:
            assert "skipped" in search
            continue
        assert search["largest_batch"] == plan["max_batch"] and search["capped_by_max_batch"]
        assert not search["stopped_by_budget"]
        assert [p["batch"] for p in search["probes"]] == [plan["max_batch"]] and search["probes"][0]["fits"]
    assert "skipped" in result["compile"]
    assert set(result["part_s"]) == {"steps", "loader", "ddp", "largest_batch", "compile"}
    assert not [name for name in result["part_s"] if isinstance(result[name], dict) and "error" in result[name]]


def test_peak_table_names_the_device_and_refuses_unknown_ones():
    bench = _load()
    cases = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.5,
             "NVIDIA H200": 989.4, "NVIDIA H200 NVL": 835.5, "NVIDIA GH200 480GB": 989.4,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0}
    for name, tflops in cases.items():
        peak = bench.peak_for_name(name)
        assert peak["tflops"] == tflops and name in peak["source"], name
    unknown = bench.peak_for_name("Tesla V100-SXM2-16GB")
    assert unknown["tflops"] is None and "unknown device" in unknown["source"]
    assert bench.peak_tflops(torch.device("cpu"), 123.0) == {"tflops": 123.0, "source": "--peak_tflops"}
    assert bench.rates(2e12, 0.5, 4, None)["mfu"] is None


def test_batch_search_doubles_then_bisects_and_counts_out_of_memory_as_a_failure():
    bench = _load()
    calls = []

    def fits(b: int):
        calls.append(b)
        if b > 20:
            return None
        return {"step_s": 1.0}

    best, probes = bench.largest_batch(fits, known=8, cap=128, bisect=2)
    assert best == 20 and calls == [16, 32, 24, 20]
    assert [p["fits"] for p in probes] == [True, False, False, True]
    calls.clear()
    best, _ = bench.largest_batch(fits, known=2, cap=128, bisect=1, failed=32)  # out of memory seen at 32
    assert calls == [17] and best == 17
    calls.clear()
    assert bench.largest_batch(fits, known=8, cap=16, bisect=2)[0] == 16 and calls == [16]
    def stop_at_32(b: int):
        if b == 32:
            raise bench.StopSearch(b, "time budget")
        return fits(b)

    best, probes = bench.largest_batch(stop_at_32, known=8, cap=128, bisect=2)
    assert best == 16 and probes[-1] == {"batch": 32, "stopped": "time budget"}  # what ran is kept
    assert bench.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not bench.is_out_of_memory(RuntimeError("shape mismatch"))


def test_compiled_child_reports_each_trainer_and_merges_with_eager(one_thread, monkeypatch):
    bench = _load()
    plan = replace(bench.SMOKE_PLAN, trainers=("MAETrainer_Tiny_P32",))
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])  # the child imports this checkout's nnssl
    eager = {"MAETrainer_Tiny_P32": bench.measure_config("MAETrainer_Tiny_P32", torch.device("cpu"), "fp32", plan, 1.0)}
    result = bench.measure_compiled(plan, torch.device("cpu"), "fp32", "eager", 300.0, eager, 1.0)
    line, base = result["per_trainer"]["MAETrainer_Tiny_P32"], eager["MAETrainer_Tiny_P32"]
    assert result["note"] is None and "error" not in line, line
    assert line["graphs_compiled_in_warmup"] == 1 and line["recompiles_while_timed"] == 0
    assert line["batch"] == plan.batch and len(line["step_s_all"]) == plan.timed
    assert line["speedup_vs_eager"] == pytest.approx(base["step_s_median"] / line["step_s_median"])
    assert line["achieved_tflops"] == pytest.approx(base["flops_per_step"] / line["step_s_median"] / 1e12)
    assert line["compile_s"] == pytest.approx(line["warmup_wall_s"] - result["warmup_steps"] * line["step_s_median"])
