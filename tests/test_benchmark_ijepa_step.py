"""Smoke test of our side of benchmarks/ijepa_step.py at a tiny size (installs nothing, no nidl)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

TINY = {
    "input": 32, "patch": 8, "width": 96, "depth": 1, "heads": 2,
    "predictor_width": 32, "predictor_depth": 1, "predictor_heads": 2, "num_targets": 2,
    "context_scale": (0.85, 1.0), "target_scale": (0.15, 0.2),
}


def _load_benchmark():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("ijepa_step_bench", BENCH / "ijepa_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("rope", [True, False], ids=["primus_rope", "matched_no_rope"])
def test_ours_side_tiny_reports_consistent_numbers(rope):
    bench = _load_benchmark()
    threads = torch.get_num_threads()
    try:
        result = bench.ours_side([2], warmup=1, timed=2, config={**TINY, "rope": rope})
    finally:
        torch.set_num_threads(threads)
    r = result["2"]
    assert r["batch_size"] == 2 and len(r["step_s_all"]) == 2
    assert r["flops_per_step"] > 0 and math.isclose(r["flops_per_sample"], r["flops_per_step"] / 2)
    assert math.isclose(r["samples_per_s"], 2 / r["step_s_median"])
    assert 10 < r["context_tokens_mean"] < 64  # targets removed from the 4³ grid's context


def test_attention_flop_formula_counts_cpu_sdpa():
    sys.path.insert(0, str(BENCH))
    try:
        from _nidl_step import count_step_flops
    finally:
        sys.path.remove(str(BENCH))
    q = torch.randn(1, 2, 8, 4, requires_grad=True)

    def fwd_bwd() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    # 4·B·H·L·L·d forward + 2× backward, whichever CPU kernel runs (math path counted by torch)
    assert count_step_flops(fwd_bwd) >= 3 * 4 * 1 * 2 * 8 * 8 * 4


def test_cpu_step_roofline_tiny_splits_the_step_consistently():
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        spec = importlib.util.spec_from_file_location("cpu_step_roofline", BENCH / "cpu_step_roofline.py")
        roofline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(roofline)
        r = roofline.step_breakdown(2, warmup=1, timed=2, config={**TINY, "rope": False}, ceiling_size=256)
        kernels = roofline.attention_kernels(1, config=TINY, length=24, repeats=1)
    finally:
        sys.path.remove(str(BENCH))
        torch.set_num_threads(threads)
    assert 0 < r["attention_flops_share"] < 1 and 0 < r["attention_time_share"] < 1
    assert r["attention_gflops_per_s"] > 0 and r["rest_gflops_per_s"] > 0
    assert math.isclose(r["percent_of_ceiling"], 100 * r["gflops_per_s"] / r["fp32_matmul_ceiling_gflops_per_s"])
    # the bound: everything but attention at the ceiling, attention at its profiled time
    total, ceiling = r["flops_per_step"], r["fp32_matmul_ceiling_gflops_per_s"] * 1e9
    bound_s = total * (1 - r["attention_flops_share"]) / ceiling + r["attention_s_profiled_step"]
    assert math.isclose(r["bound_percent_of_ceiling"], 100 * total / bound_s / ceiling, rel_tol=1e-9)
    assert set(kernels) == {"flash", "flash_chunks_of_8", "math"} and min(kernels.values()) > 0
