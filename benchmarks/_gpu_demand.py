"""How many samples/s a GPU would consume, as an ESTIMATE (no GPU is involved), and the loader
workers that takes. Used by benchmarks/dataloading.py, which measures the other side (samples/s
one loader worker delivers) in the same run.

    GPU samples/s  D = utilisation × peak / FLOPs per sample
    workers / GPU    = ⌈D / r⌉, r = samples/s of one worker (measured: 1 / its CPU seconds per sample)

Peak: the dense bf16 tensor-core peak of an H100 SXM (989.4 TFLOP/s, `_gpu_steps.PEAK_BF16_TFLOPS`);
utilisation 40 % (an assumption, not a measurement: `benchmarks/gpu_check.py` measures the real
samples/s and MFU when a GPU is available). FLOPs per sample of one training step (forward +
backward, matmul / convolution / attention as `FlopCounterMode` counts them) from two sources:
- the design estimate for Primus-M at 160³ (Eva block ≈ 24·d² FLOPs per token plus 4·N·d for
  attention, about 3200 context and 1400 target tokens): I-JEPA ≈ 14 TFLOP (teacher forward on
  8000 tokens 5.8, student forward + backward 4.5, predictor 3.5), MAE ≈ 4.6 TFLOP;
- counted here: the real method (`nnssl_train`'s `build_method`) run on fake tensors
  (`FakeTensorMode`: shapes only, no arithmetic, seconds on a CPU), the I-JEPA masks drawn for real.
The count is used: it is the step this code runs, it exists for every configuration, and it
matches the design estimate for I-JEPA (13.99 vs 14 TFLOP); for Primus-M MAE it is lower (3.2 vs
4.6), which raises the demand, the safe side for sizing workers. Both are reported.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_steps import peak_for_name  # noqa: E402
from _nidl_step import count_step_flops  # noqa: E402

UTILISATION = 0.40
DEVICE_NAME = "NVIDIA H100 80GB HBM3"  # what an H100 SXM reports; its peak comes from the table
CONFIGURATIONS = {  # trainer name: (backbone, method, design estimate in TFLOP per sample or None)
    "IJEPATrainer_P160": ("PrimusM", "I-JEPA", 14.0),
    "MAETrainer_P160": ("PrimusM", "MAE", 4.6),
    "IJEPATrainer_ResEncL_P160": ("ResEncL", "I-JEPA", None),
    "MAETrainer_ResEncL_P160": ("ResEncL", "MAE", None),
}


class _RealMasks:
    """Runs a mask sampler outside fake mode: it draws with a torch generator and reads values
    (`.item()`), which fake tensors cannot give."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return self.sampler(*args, **kwargs)


def counted_flops_per_sample(trainer: str, batch: int = 8, steps: int = 4) -> float:
    """FLOPs of one training forward + backward per sample, mean over steps 0 .. steps-1 (the
    I-JEPA mask sizes, and with them the FLOPs, change from step to step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nnssl.methods.factory import build_method
    from nnssl.training.names import resolve_config

    config = resolve_config(trainer)
    method = build_method(config).train()  # real weights: initialisation reads values
    if getattr(method, "mask_sampler", None) is not None:
        method.mask_sampler = _RealMasks(method.mask_sampler)
    counts = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        volumes = torch.empty(batch, 1, *config.patch_size)
        anon = torch.zeros_like(volumes, dtype=torch.bool)
        for step in range(steps):
            counts.append(count_step_flops(
                lambda s=step: method.training_output(volumes, anon, s).loss.backward()))  # type: ignore[misc]
    return statistics.fmean(counts) / batch


def workers_per_gpu(per_worker_samples_per_s: dict[str, float], count_steps: int = 4) -> dict:
    """Per configuration: FLOPs per sample (design estimate, counted), the estimated GPU demand and
    ⌈demand / per-worker rate⌉ for each measured worker variant (e.g. CPU vs device augmentation)."""
    peak = peak_for_name(DEVICE_NAME)["tflops"]
    out: dict = {"assumption": {"peak_tflops": peak, "device": "H100 SXM, dense bf16", "utilisation": UTILISATION,
                                "formula": "workers = ceil(utilisation * peak / flops_per_sample / "
                                           "samples_per_s_of_one_worker)",
                                "note": "the GPU side is an estimate, not a measurement (see gpu_check.py)"},
                 "per_worker_samples_per_s": per_worker_samples_per_s, "configurations": {}}
    rates = per_worker_samples_per_s.items()
    for trainer, (backbone, method, design_tflops) in CONFIGURATIONS.items():
        counted = counted_flops_per_sample(trainer, steps=count_steps)
        used = counted  # see the module docstring
        demand = UTILISATION * peak * 1e12 / used
        out["configurations"][trainer] = {
            "backbone": backbone, "method": method,
            "tflops_per_sample_design_estimate": design_tflops, "tflops_per_sample_counted": counted / 1e12,
            "tflops_per_sample_used": used / 1e12,
            "gpu_samples_per_s_estimate": demand,
            "workers_unrounded": {variant: round(demand / rate, 2) for variant, rate in rates},
            "workers": {variant: math.ceil(demand / rate) for variant, rate in rates},
        }
    return out
