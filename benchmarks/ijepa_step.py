"""Our I-JEPA training step vs nidl's (issue 5 "Speed"), side by side; prints one JSON object.

Both sides: CPU, fp32, the same input size and batch sizes, `--threads` threads, warm-up steps
excluded, the median of the timed steps, FLOPs of one forward + backward counted with
FlopCounterMode plus a formula for the CPU flash-attention kernel it does not count (see
`_nidl_step.py`). Each side runs in its own process, sequentially: ours with this interpreter
(nnssl's environment), nidl's with the python of its own venv.

nidl's venv is `benchmarks/.nidl-venv` unless NNSSL_NIDL_VENV points elsewhere; it is created on
first use with `python3 -m venv` + `pip install torch==2.14.1 torchvision==0.29.1 nidl==0.0.2`
(torch/torchvision pinned so nidl's dependencies cannot replace them).

Our configurations (both the real nnssl code path: Primus token encoder, sampler, predictor,
fused AdamW with the schedules, EMA; predictor 256 × 6 with 8 heads, as nidl):
- "matched" (the headline): nidl's encoder architecture, width 256, depth 6, 8 heads, learned
  absolute position embedding and no RoPE (nidl has none). Primus's SwiGLU MLP (ratio 8/3) costs
  what nidl's GELU MLP (ratio 4) costs.
- "primus_rope": Primus's default position scheme, learned absolute + 3D RoPE. Eva's RoPE needs
  head_dim/1.5 to be a multiple of 4, so width 256 with 8 heads cannot be built; width 288
  (head_dim 36, RoPE 24): more compute than nidl's encoder.

    python benchmarks/ijepa_step.py [--batch-sizes 4 16] [--threads 2] [--ours-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nidl_step import NIDL_CONFIG, count_step_flops, measure  # noqa: E402

HERE = Path(__file__).resolve().parent
NIDL_PINS = ["torch==2.14.1", "torchvision==0.29.1", "nidl==0.0.2"]
SPEEDUP_TARGET = 2.5

OUR_CONFIG = {
    "input": 64, "patch": 8, "width": 256, "depth": 6, "heads": 8, "rope": False,
    "predictor_width": 256, "predictor_depth": 6, "predictor_heads": 8, "num_targets": 4,
    "context_scale": (0.85, 1.0), "target_scale": (0.15, 0.2),
    "note": "nidl's encoder architecture: width 256, learned absolute positions, no RoPE",
}
PRIMUS_ROPE_CONFIG = {
    **OUR_CONFIG, "width": 288, "rope": True,
    "note": "Primus default positions (absolute + RoPE); width 288 (not 256): Eva RoPE needs "
            "head_dim/1.5 % 4 == 0; 288/8 = 36 -> rope 24",
}
CONFIGS = {"matched": OUR_CONFIG, "primus_rope": PRIMUS_ROPE_CONFIG}


def build_ours(config: dict = OUR_CONFIG, total_steps: int = 1000):
    """(method, sampler, optimizer, schedule) on the real nnssl code path."""
    from dynamic_network_architectures.architectures.primus import Primus

    from nnssl.methods.ijepa import IJEPA, IJEPAConfig
    from nnssl.methods.masks import MaskConfig, MultiBlockMaskSampler
    from nnssl.methods.schedules import ScheduleConfig, lr_at, wd_at
    from nnssl.models.primus import PrimusTokenEncoder, primus_arch_kwargs

    kwargs = primus_arch_kwargs("Tiny", input_channels=1, patch_size=(config["patch"],) * 3,
                                input_shape=(config["input"],) * 3)
    kwargs.update(embed_dim=config["width"], eva_depth=config["depth"], eva_numheads=config["heads"],
                  use_rot_pos_emb=config.get("rope", True))
    kwargs["patch_embed_size"] = tuple(kwargs["patch_embed_size"])
    kwargs["input_shape"] = tuple(kwargs["input_shape"])
    encoder = PrimusTokenEncoder(Primus(**kwargs), grid=(config["input"] // config["patch"],) * 3)
    method = IJEPA(encoder, IJEPAConfig(predictor_width=config["predictor_width"],
                                        predictor_depth=config["predictor_depth"],
                                        predictor_heads=config["predictor_heads"]))
    sampler = MultiBlockMaskSampler(encoder.grid, MaskConfig(num_targets=config["num_targets"],
                                                             target_scale=config["target_scale"],
                                                             context_scale=config["context_scale"]))
    schedule = ScheduleConfig(total_steps=total_steps, warmup_steps=min(40, total_steps - 1))
    optimizer = torch.optim.AdamW(method.parameter_groups(wd_at(0, schedule)), lr=lr_at(0, schedule), fused=True)
    return method, sampler, optimizer, schedule


def our_step(method, sampler, optimizer, schedule, batch_size: int, input_size: int, precision: str = "fp32"):
    """(forward_backward(i), step(i)) of our full step at `batch_size` on one fixed random batch:
    masks of step i, forward, backward; `step` adds the lr / weight-decay schedules, AdamW and
    the EMA. Both return {"context_tokens": ...}. `precision="bf16"`: bf16 autocast (the
    trainer's `--precision bf16`), fp32 weights and loss. Shared with cpu_step_roofline.py, so
    both time the same step."""
    from nnssl.methods.schedules import lr_at, momentum_at, wd_at

    x = torch.randn(batch_size, 1, *(input_size,) * 3)

    def forward_backward(i: int = 0) -> dict:
        masks = sampler(batch_size, i)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = method(x, masks).loss
        loss.backward()
        return {"context_tokens": int(masks.context.shape[1])}

    def step(i: int) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i, schedule)
            if group["apply_wd"]:
                group["weight_decay"] = wd_at(i, schedule)
        optimizer.zero_grad(set_to_none=True)
        stats = forward_backward(i)
        optimizer.step()
        method.update_teacher(momentum_at(i, schedule))
        return stats

    return forward_backward, step


def ours_side(batch_sizes: list[int], warmup: int, timed: int, config: dict = OUR_CONFIG,
              precision: str = "fp32") -> dict:
    """Time our full step (masks, forward, backward, AdamW with schedules, EMA) per batch size."""
    torch.manual_seed(0)
    method, sampler, optimizer, schedule = build_ours(config)
    method.train()
    results = {}
    for bs in batch_sizes:
        forward_backward, step = our_step(method, sampler, optimizer, schedule, bs, config["input"], precision)
        flops = count_step_flops(forward_backward)
        optimizer.zero_grad(set_to_none=True)
        results[str(bs)] = measure(step, bs, warmup, timed, flops)
    return results


def matmul_ceiling(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """This CPU's fp32 GEMM rate at `threads` threads (best of `repeats` n×n×n products), the
    roof both sides' GFLOP/s are bounded by."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def nidl_python() -> Path:
    """nidl venv's python, creating the venv (pinned torch/torchvision) when it is missing."""
    venv = Path(os.environ.get("NNSSL_NIDL_VENV") or HERE / ".nidl-venv")
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating nidl's environment in {venv} (about 90 s)", file=sys.stderr)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *NIDL_PINS], check=True)
    return python


def nidl_side(batch_sizes: list[int], threads: int, warmup: int, timed: int) -> dict:
    cmd = [str(nidl_python()), str(HERE / "_nidl_step.py"), "--threads", str(threads),
           "--warmup", str(warmup), "--timed", str(timed), "--batch-sizes", *map(str, batch_sizes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ours_subprocess(batch_sizes: list[int], threads: int, warmup: int, timed: int, precision: str,
                     config: str = "matched") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ours-only", "--threads", str(threads),
           "--warmup", str(warmup), "--timed", str(timed), "--precision", precision, "--config", config,
           "--batch-sizes", *map(str, batch_sizes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compare(ours: dict, nidl: dict, batch_sizes: list[int]) -> dict:
    per_batch, speedups, gflops_ok = {}, [], []
    for bs in map(str, batch_sizes):
        o, n = ours[bs], nidl[bs]
        speedup = o["samples_per_s"] / n["samples_per_s"]
        speedups.append(speedup)
        gflops_ok.append(o["gflops_per_s"] >= n["gflops_per_s"])
        per_batch[bs] = {"ours": o, "nidl": n, "speedup_vs_nidl": speedup,
                         "flops_per_sample_ratio": o["flops_per_sample"] / n["flops_per_sample"]}
    return {"per_batch": per_batch, "speedup_vs_nidl": min(speedups),
            "gflops_per_s_ours": min(ours[str(b)]["gflops_per_s"] for b in batch_sizes),
            "meets_targets": {"speedup_ge_2_5": min(speedups) >= SPEEDUP_TARGET, "gflops_ge_nidl": all(gflops_ok)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="with --ours-only")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="matched", help="with --ours-only")
    parser.add_argument("--ours-only", action="store_true", help="time our side in this process only")
    args = parser.parse_args()
    if args.ours_only:
        torch.set_num_threads(args.threads)
        print(json.dumps({"per_batch": ours_side(args.batch_sizes, args.warmup, args.timed,
                                                 config=CONFIGS[args.config], precision=args.precision)}))
        return 0
    # each side in its own fresh process, one after the other: ours matched fp32, nidl (fp32),
    # ours Primus-RoPE fp32, ours matched bf16
    # (bf16 only where oneDNN runs it natively: emulated bf16 is ~100x slower than fp32)
    common = (args.batch_sizes, args.threads, args.warmup, args.timed)

    def side(name: str, run: Callable[[], dict]) -> dict:
        out = run()["per_batch"]
        print(f"{name}: " + json.dumps({bs: round(r["samples_per_s"], 3) for bs, r in out.items()})
              + " samples/s", file=sys.stderr, flush=True)
        return out

    ours = side("ours matched fp32", lambda: _ours_subprocess(*common, "fp32"))
    nidl = side("nidl fp32", lambda: nidl_side(*common))
    ours_rope = side("ours primus_rope fp32", lambda: _ours_subprocess(*common, "fp32", "primus_rope"))
    from nnssl.training.loop import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    ours_bf16 = side("ours matched bf16", lambda: _ours_subprocess(*common, "bf16")) if native_bf16 else None
    fp32 = _compare(ours, nidl, args.batch_sizes)
    result = {
        "config": {"ours": OUR_CONFIG, "ours_primus_rope": PRIMUS_ROPE_CONFIG, "nidl": NIDL_CONFIG,
                   "threads": args.threads, "device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "dtype": "nidl fp32; ours fp32 (headline) and bf16 autocast (`--precision bf16`)",
                   "warmup_steps": args.warmup, "timed_steps": args.timed,
                   "nidl_driver": "plain loop over nidl's pieces (masker, encoders, predictor, loss, "
                                  "AdamW, MomentumUpdater), no Lightning Trainer",
                   "flops": "FlopCounterMode on forward+backward + 4BHLqLkd (fwd) / 2x (bwd) for the "
                            "CPU flash-attention kernel; optimizer and EMA excluded (O(params))"},
        **fp32,
        "gflops_per_s_nidl": max(nidl[str(b)]["gflops_per_s"] for b in args.batch_sizes),
        "primus_rope": _compare(ours_rope, nidl, args.batch_sizes),
        "bf16": (_compare(ours_bf16, nidl, args.batch_sizes) if ours_bf16 is not None else
                 "skipped: this CPU has no native bf16 (AVX-512 BF16 / AMX); emulated bf16 is ~100x slower"),
        "fp32_matmul_ceiling_gflops_per_s": matmul_ceiling(args.threads),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
