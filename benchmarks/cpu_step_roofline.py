"""Where the CPU I-JEPA step's time goes, against the fp32 GEMM ceiling measured in the same run.

Issue 19 asks the batch-16 step of `benchmarks/ijepa_step.py` (nidl's tutorial configuration,
"matched") to reach 85% of this CPU's fp32 GEMM ceiling. This script says how far it is and
what bounds it, in one process and one run:

- the step itself (the real nnssl code path of `ijepa_step.build_ours`), median of `--timed`
  steps after `--warmup`, and its GFLOP/s as a fraction of the ceiling;
- the ceiling (2048³ fp32 matmul, the same threads), measured before and after the steps, the
  larger kept;
- one profiled step: the time inside ATen's fused CPU attention kernels (forward and backward)
  and their share of the FLOPs, so the attention's rate in the step is measured, not assumed;
- `bound_percent_of_ceiling`: the step's rate if everything except attention ran at 100% of the
  ceiling and attention at the rate it has in the step. No change outside the attention kernel
  can go past it;
- `attention_kernels`: the predictor's attention shape forward + backward through the
  kernels PyTorch offers on the CPU (the fused flash kernel in one call or in chunks of
  sequences, the unfused math path), the best of which the step uses.

    python benchmarks/cpu_step_roofline.py [--batch-sizes 4 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nidl_step import _flop_mapping, measure  # noqa: E402
from ijepa_step import OUR_CONFIG, build_ours, matmul_ceiling, our_step  # noqa: E402

ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention_for_cpu_backward")
TARGET_PERCENT = 85.0


def _flops_by_kind(forward_backward, steps: range) -> dict[str, float]:
    """Mean FLOPs of one forward + backward over the masks of `steps` (the token counts change
    from step to step), split into the attention kernels and everything else."""
    from torch.utils.flop_counter import FlopCounterMode

    attention = total = 0
    for i in steps:
        with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
            forward_backward(i)
        per_op = counter.get_flop_counts()["Global"]
        attention += sum(int(f) for op, f in per_op.items() if any(name in str(op) for name in ATTENTION_OPS))
        total += int(counter.get_total_flops())
    return {"attention": attention / len(steps), "rest": (total - attention) / len(steps)}


def _attention_seconds(step, steps: range) -> float:
    """Mean self time per step of the fused attention kernels (forward and backward), profiled
    over `steps` (the timed steps' masks again)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in steps:
            step(i)
    return sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key.removeprefix("aten::") in ATTENTION_OPS) / 1e6 / len(steps)


def step_breakdown(batch_size: int, warmup: int, timed: int, config: dict = OUR_CONFIG,
                   ceiling_size: int = 2048) -> dict:
    """The step at `batch_size` timed, its FLOPs split, its attention profiled, and the ceiling
    (a `ceiling_size`³ matmul) measured before and after it."""
    torch.manual_seed(0)
    method, sampler, optimizer, schedule = build_ours(config)
    method.train()
    forward_backward, step = our_step(method, sampler, optimizer, schedule, batch_size, config["input"])

    timed_steps = range(warmup, warmup + timed)
    flops = _flops_by_kind(forward_backward, timed_steps)
    optimizer.zero_grad(set_to_none=True)
    ceiling_before = matmul_ceiling(torch.get_num_threads(), ceiling_size)
    timing = measure(step, batch_size, warmup, timed, flops["attention"] + flops["rest"])
    attention_s = _attention_seconds(step, timed_steps)
    ceiling = max(ceiling_before, matmul_ceiling(torch.get_num_threads(), ceiling_size))
    step_s, total = timing["step_s_median"], flops["attention"] + flops["rest"]
    bound_s = flops["rest"] / (ceiling * 1e9) + attention_s
    return {
        **timing, "fp32_matmul_ceiling_gflops_per_s": ceiling,
        "percent_of_ceiling": 100 * timing["gflops_per_s"] / ceiling,
        "attention_flops_share": flops["attention"] / total,
        "attention_s_profiled_step": attention_s,
        "attention_time_share": attention_s / step_s,
        "attention_gflops_per_s": flops["attention"] / attention_s / 1e9,
        "rest_gflops_per_s": flops["rest"] / max(step_s - attention_s, 1e-9) / 1e9,
        "bound_percent_of_ceiling": 100 * total / bound_s / 1e9 / ceiling,
    }


def attention_kernels(batch_size: int, config: dict = OUR_CONFIG, length: int = 338, repeats: int = 3) -> dict:
    """GFLOP/s (counted as in the step: forward 4·B·H·L²·d, backward twice that) of the
    predictor's attention, forward + backward: [targets·batch, heads, `length` tokens (context +
    one block's queries, about 338 at 64³), width / heads]."""
    h = config["predictor_heads"]
    b, d = config["num_targets"] * batch_size, config["predictor_width"] // h

    def flash(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def flash_chunks(q, k, v, chunk=8):
        chunks = zip(q.split(chunk), k.split(chunk), v.split(chunk))
        return torch.cat([F.scaled_dot_product_attention(*c) for c in chunks])

    def math(q, k, v):
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v)[0]

    out = {}
    for name, kernel in (("flash", flash), ("flash_chunks_of_8", flash_chunks), ("math", math)):
        qkv = torch.randn(b, length, 3, h, d, requires_grad=True)
        best = float("inf")
        for _ in range(repeats + 1):
            start = time.perf_counter()
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            kernel(q, k, v).sum().backward()
            best = min(best, time.perf_counter() - start)
        out[name] = 12 * b * h * length * length * d / best / 1e9
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    per_batch = {str(bs): step_breakdown(bs, args.warmup, args.timed) for bs in args.batch_sizes}
    largest = max(args.batch_sizes)
    result = {
        "config": {**OUR_CONFIG, "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "per_batch": per_batch,
        "attention_kernels_gflops_per_s": attention_kernels(largest),
        "target_percent_of_ceiling": TARGET_PERCENT,
        "meets_target": all(r["percent_of_ceiling"] >= TARGET_PERCENT for r in per_batch.values()),
        "target_reachable_without_a_faster_attention_kernel":
            all(r["bound_percent_of_ceiling"] >= TARGET_PERCENT for r in per_batch.values()),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
