"""nidl's I-JEPA training step, timed; also the timing/FLOP helpers both sides share.

This file runs inside nidl's own virtual environment (`benchmarks/.nidl-venv`), where nnssl is
not installed, so it depends on torch only at import time and imports nidl lazily. Our side
(`benchmarks/ijepa_step.py`) imports `measure` and `count_step_flops` from here so both sides are
timed and counted by the same code.

nidl's step is driven piece by piece in a plain loop, mirroring `IJEPA._shared_step` (masker,
target encoder + LN + gather, context encoder, predictor, SmoothL1) followed by the optimizer
step and `on_train_batch_end` (momentum update), without the Lightning Trainer, whose logging
and hooks would only add overhead that is not the algorithm's.

Usage (prints one JSON object): python _nidl_step.py --batch-sizes 4 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

# The tutorial configuration quoted in the issue.
NIDL_CONFIG = {
    "input": 64, "patch": 8, "width": 256, "depth": 6, "heads": 8,
    "predictor_width": 256, "predictor_depth": 6, "num_targets": 4,
    "context_scale": (0.85, 1.0), "target_scale": (0.15, 0.2),
}


def _sdpa_fwd_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """4·B·H·Lq·Lk·d: QKᵀ and PV, two multiply-adds each (the CPU flash kernel is not counted
    by FlopCounterMode, which only knows the CUDA attention kernels)."""
    b, h, lq, d = q_shape
    lk = k_shape[-2]
    return 4 * b * h * lq * lk * d


def _sdpa_bwd_flops(grad_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """Backward counted as 2× the forward (dQ, dK, dV, dP; recomputation not counted)."""
    return 2 * _sdpa_fwd_flops(q_shape, k_shape, v_shape)


def _flop_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_fwd_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_bwd_flops
    return mapping


def count_step_flops(forward_backward: Callable[[], None]) -> int:
    """FLOPs of one forward + backward (optimizer and EMA are elementwise, O(params), and left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        forward_backward()
    return int(counter.get_total_flops())


def measure(step: Callable[[int], dict], batch_size: int, warmup: int, timed: int,
            flops_per_step: int) -> dict:
    """Median wall time of `timed` steps after `warmup` steps; `step(i)` returns per-step stats."""
    for i in range(warmup):
        step(i)
    times, context_tokens = [], []
    for i in range(warmup, warmup + timed):
        start = time.perf_counter()
        stats = step(i)
        times.append(time.perf_counter() - start)
        context_tokens.append(stats["context_tokens"])
    median = statistics.median(times)
    return {
        "batch_size": batch_size,
        "step_s_median": median,
        "step_s_all": times,
        "samples_per_s": batch_size / median,
        "flops_per_step": flops_per_step,
        "flops_per_sample": flops_per_step / batch_size,
        "gflops_per_s": flops_per_step / median / 1e9,
        "context_tokens_mean": statistics.fmean(context_tokens),
    }


def _build_nidl():
    from nidl.estimators.ssl import IJEPA
    from nidl.volume.backbones.vit3d import VisionTransformer3D

    c = NIDL_CONFIG
    encoder = VisionTransformer3D(img_size=c["input"], patch_size=c["patch"], in_chans=1, embed_dim=c["width"],
                                  depth=c["depth"], num_heads=c["heads"])
    model = IJEPA(encoder, dim=3, context_block_scale=c["context_scale"], target_block_scale=c["target_scale"],
                  num_target_blocks=c["num_targets"], predictor_embed_dim=c["predictor_width"],
                  predictor_depth_pred=c["predictor_depth"])
    return model


def nidl_side(batch_sizes: list[int], warmup: int, timed: int, total_steps: int = 1000) -> dict:
    from nidl.estimators.ssl.utils.optimizer import remove_bias_and_norm_from_weight_decay

    torch.manual_seed(0)
    model = _build_nidl()
    model.train()
    groups = remove_bias_and_norm_from_weight_decay([
        {"name": "backbone", "params": list(model.context_encoder.parameters()), "weight_decay": 5e-4},
        {"name": "predictor", "params": list(model.predictor.parameters()), "weight_decay": 5e-4}])
    optimizer = torch.optim.AdamW(groups, lr=3e-4)
    results = {}
    for bs in batch_sizes:
        x = torch.randn(bs, 1, *(NIDL_CONFIG["input"],) * 3)
        last = {}

        def forward_backward() -> None:
            context_block, target_blocks = model.masker(bs)
            h = model.forward_target(x, target_blocks)
            z = model.context_encoder(x, context_block.unsqueeze(0))
            z = model.predictor(z, context_block, target_blocks)
            loss = model.loss(z, h)
            loss.backward()
            last["context_tokens"] = int(context_block.shape[-1])

        def step(i: int) -> dict:
            optimizer.zero_grad(set_to_none=True)
            forward_backward()
            optimizer.step()
            model.momentum_updater.update(model.context_encoder, model.target_encoder)
            model.momentum_updater.update_lambda(cur_step=i, max_steps=total_steps)
            return dict(last)

        flops = count_step_flops(forward_backward)
        optimizer.zero_grad(set_to_none=True)
        results[str(bs)] = measure(step, bs, warmup, timed, flops)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"config": NIDL_CONFIG, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "per_batch": nidl_side(args.batch_sizes, args.warmup, args.timed)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
