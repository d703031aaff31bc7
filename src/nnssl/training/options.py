"""Run options of `nnssl_train`: what to train on and how to run it (not hyperparameters).

Hyperparameters live in the `TrainingConfig` (trainer name plus overrides); these are the knobs
of one run: the dataset, devices, resume, workers, checkpoint cadence, torch.compile. Validated once, all
problems reported together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nnssl.errors import InvalidInput

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# torch.compile backends by cost: inductor generates kernels (what --compile means); aot_eager
# traces forward and backward without code generation; eager only captures graphs (dynamo)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class RunOptions:
    dataset: str | int | None = None  # None: the only preprocessed dataset
    configuration: str = "onemmiso"
    plans: str = "nnsslPlans"
    num_gpus: int = 1
    device: str | None = None  # None: cuda when available, else cpu
    continue_training: bool = False
    pretrained_weights: Path | None = None
    num_workers: int | None = None  # loader worker processes per rank; None: one per CPU
    checkpoint_every_minutes: float = 30.0  # checkpoint_latest.pth at least this often (and every epoch)
    # False (`--disable_checkpointing`, the reference's flag for trial runs): no periodic
    # checkpoint_latest.pth; the final checkpoint, and the one a stop signal or divergence saves, stay
    periodic_checkpoints: bool = True
    log_every: int | None = None  # steps between logged metrics; None: min(50, iterations per epoch)
    max_nonfinite_steps: int = 10  # consecutive non-finite losses that stop the run
    precision: str = "auto"  # auto: bf16 on GPUs with bf16, fp16 + loss scaling on older GPUs, fp32 elsewhere
    stop_at_step: int | None = None  # stop with a checkpoint before this step (tests, time-boxed jobs)
    progress_bar: bool | None = None  # None: when stderr is a terminal
    # torch.compile of the method's forward (off until measured on a GPU; loop.compile_method);
    # compile_backend "aot_eager" / "eager" isolate a compile problem from inductor's code generation
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        problems = []
        if self.num_gpus < 1:
            problems.append(f"-num_gpus must be >= 1, got {self.num_gpus}")
        if self.num_workers is not None and self.num_workers < 0:
            problems.append(f"-np (loader workers) must be >= 0, got {self.num_workers}")
        if not self.checkpoint_every_minutes > 0:
            problems.append(f"--checkpoint_minutes must be > 0, got {self.checkpoint_every_minutes}")
        if self.log_every is not None and self.log_every < 1:
            problems.append(f"--log_every must be >= 1, got {self.log_every}")
        if self.max_nonfinite_steps < 1:
            problems.append(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.stop_at_step is not None and self.stop_at_step < 0:
            problems.append(f"stop_at_step must be >= 0, got {self.stop_at_step}")
        if self.compile and self.compile_backend not in COMPILE_BACKENDS:
            problems.append(f"compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}")
        if self.continue_training and self.pretrained_weights is not None:
            problems.append("--c and -pretrained_weights exclude each other: a resumed run already has its weights")
        if self.pretrained_weights is not None and not Path(self.pretrained_weights).is_file():
            problems.append(f"-pretrained_weights {self.pretrained_weights} is not a file")
        if problems:
            raise InvalidInput("invalid nnssl_train options:", problems)
