"""I-JEPA for 3D volumes: context encoder (student), EMA target encoder (teacher), predictor, loss.

One forward (IJEPA_SPEC §1.4, §2.3-2.6):
1. the teacher runs once on all N tokens of the unmasked volume, under `no_grad` and always in
   eval mode (drop-path off, spec §2.4); its output is normalised by a layer norm without affine
   parameters (LN₀) in fp32, and every target block is gathered from it;
2. the student runs on the context tokens only (positions and RoPE gathered with them);
3. the predictor predicts all M blocks in one batched call (row m·B + b);
4. loss = mean smooth-L1 (β = 1) between predictions and targets (L1 / L2 as options).
After the optimizer step the caller updates the teacher: θ_T ← m·θ_T + (1 − m)·θ_S.

bf16 autocast is the caller's choice (the trainer enables it on CUDA); LN₀ and the loss run in
fp32 whatever the autocast state, and nothing here is CUDA-only.

Python API without the CLI::

    encoder = PrimusTokenEncoder(build_primus("M", input_shape=(160, 160, 160)))
    method = IJEPA(encoder)
    sampler = MultiBlockMaskSampler(encoder.grid)
    out = method(volumes, sampler(batch_size, step).to(device)); out.loss.backward()
    optimizer.step(); method.update_teacher(momentum_at(step, schedule))
    weights = method.export_encoder_state_dict()   # eva.* / down_projection.* of the teacher
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from nnssl.errors import InvalidInput, NnsslError
from nnssl.methods.base import TRAIN_STREAM, MethodOutput, PretrainingMethod, parameter_groups_by_part
from nnssl.methods.masks import MaskBatch, MultiBlockMaskSampler
from nnssl.models.backbone import BackboneSpec
from nnssl.models.predictor import JEPAPredictor

LOSSES = ("smooth_l1", "l1", "l2")


@runtime_checkable
class TokenEncoder(Protocol):
    """What I-JEPA needs from an encoder (implemented by `PrimusTokenEncoder` and the sparse
    `ResEncTokenEncoder`): tokens on a 3D grid in C-order, computed for the kept indices only
    (`keep` [B, K]) or for all of them (`keep=None`, the teacher's dense path)."""

    grid: tuple[int, int, int]
    embed_dim: int
    num_heads: int

    def __call__(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor: ...

    def encoder_named_parameters(self) -> list[tuple[str, nn.Parameter]]: ...

    def encoder_state_dict(self) -> dict[str, torch.Tensor]: ...


class InvalidIJEPAConfig(NnsslError, ValueError):
    """An IJEPAConfig that cannot work; `problems` lists every issue."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid I-JEPA settings: " + "; ".join(self.problems))


@dataclass(frozen=True)
class IJEPAConfig:
    """I-JEPA settings (section `ijepa` of the training configuration; defaults of the released
    I-JEPA, documentation/ijepa_method.md). `predictor_heads=None` takes the encoder's head
    count when it divides the width (I-JEPA), else the largest divisor of the width below it."""

    predictor_width: int = 384
    predictor_depth: int = 6
    predictor_heads: int | None = None
    predictor_mlp_ratio: float = 4.0
    loss: str = "smooth_l1"
    # EMA momentum of the teacher, linear from start to end over the run (methods/schedules.py)
    ema_start: float = 0.996
    ema_end: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.ema_start <= self.ema_end <= 1:
            problems.append(f"EMA momentum must satisfy 0 < ema_start <= ema_end <= 1, got "
                            f"{self.ema_start} -> {self.ema_end}")
        if self.loss not in LOSSES:
            problems.append(f"loss={self.loss!r} must be one of {LOSSES}")
        if int(self.predictor_width) != self.predictor_width or self.predictor_width < 1:
            problems.append(f"predictor_width={self.predictor_width!r} must be an integer >= 1")
        if int(self.predictor_depth) != self.predictor_depth or self.predictor_depth < 0:
            problems.append(f"predictor_depth={self.predictor_depth!r} must be an integer >= 0")
        heads = self.predictor_heads
        if heads is not None:
            if int(heads) != heads or heads < 1:
                problems.append(f"predictor_heads={heads!r} must be None or an integer >= 1")
            elif self.predictor_width >= 1 and self.predictor_width % heads:
                problems.append(f"predictor_heads={heads} must divide predictor_width={self.predictor_width}")
        if not self.predictor_mlp_ratio > 0:
            problems.append(f"predictor_mlp_ratio={self.predictor_mlp_ratio!r} must be > 0")
        if problems:
            raise InvalidIJEPAConfig(problems)

    def resolved_predictor_heads(self, encoder_heads: int) -> int:
        if self.predictor_heads is not None:
            return int(self.predictor_heads)
        width = int(self.predictor_width)
        if width % encoder_heads == 0:
            return int(encoder_heads)
        return next(h for h in range(min(encoder_heads, width), 0, -1) if width % h == 0)


@dataclass
class IJEPAOutput:
    loss: torch.Tensor            # scalar, fp32
    predictions: torch.Tensor     # [M*B, Kt, E], row m*B + b
    targets: torch.Tensor         # [M*B, Kt, E], fp32, no grad
    teacher_tokens: torch.Tensor  # [B, N, E], LN₀-normalised fp32, detached (for the monitors)


def ijepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Mean over all elements, in fp32: smooth-L1 with β = 1 (released I-JEPA code), L1 (V-JEPA,
    `loss_exp=1`) or L2 (the I-JEPA paper's text)."""
    if pred.shape != target.shape:
        raise InvalidInput(f"predictions {list(pred.shape)} and targets {list(target.shape)} differ in shape")
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1.0)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise InvalidIJEPAConfig([f"loss={kind!r} must be one of {LOSSES}"])


class IJEPA(PretrainingMethod):
    """Student (the given encoder), teacher (a deep copy, frozen, always in eval mode) and
    predictor. `state_dict()` holds all three, so a checkpoint resumes exactly."""

    def __init__(self, encoder: TokenEncoder, config: IJEPAConfig = IJEPAConfig(),
                 mask_sampler: MultiBlockMaskSampler | None = None, backbone: BackboneSpec | None = None) -> None:
        super().__init__()
        self.config = config
        # for the training loop's `PretrainingMethod` interface (methods/base.py); the plain
        # forward(volumes, masks) API needs neither
        self.mask_sampler = mask_sampler
        self.backbone = backbone
        self.embed_dim = int(encoder.embed_dim)
        self.student = encoder
        self.teacher = copy.deepcopy(encoder)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.predictor = JEPAPredictor(encoder.grid, encoder.embed_dim, config.predictor_width,
                                       config.predictor_depth, config.resolved_predictor_heads(encoder.num_heads),
                                       config.predictor_mlp_ratio)

    def train(self, mode: bool = True) -> "IJEPA":
        super().train(mode)
        self.teacher.eval()  # targets never see drop-path / dropout noise
        return self

    @torch.no_grad()
    def teacher_tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """LN₀(teacher(volumes)): [B, N, E] fp32, no affine, over the feature axis."""
        h = self.teacher(volumes).float()
        with torch.autocast(h.device.type, enabled=False):
            return F.layer_norm(h, (h.shape[-1],))

    def forward(self, volumes: torch.Tensor, masks: MaskBatch) -> IJEPAOutput:
        m, b, kt = masks.targets.shape
        if masks.context.shape[0] != volumes.shape[0] or b != volumes.shape[0]:
            raise InvalidInput(f"masks are for batch size {masks.context.shape[0]} / {b}, the volumes batch is "
                               f"{volumes.shape[0]}; sample masks with the batch size of the volumes")
        h = self.teacher_tokens(volumes)                                           # [B, N, E]
        e = h.shape[-1]
        # gather every block from one teacher pass, without materialising M copies of h
        index = masks.targets.unsqueeze(-1).expand(m, b, kt, e)
        targets = torch.gather(h.unsqueeze(0).expand(m, -1, -1, -1), 2, index).reshape(m * b, kt, e)
        z = self.student(volumes, masks.context)                                   # [B, Kc, E]
        pred = self.predictor(z, masks.context, masks.targets)                     # [M*B, Kt, E]
        return IJEPAOutput(ijepa_loss(pred, targets, self.config.loss), pred, targets, h)

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        teacher = dict(self.teacher.encoder_named_parameters())
        pairs = [(teacher[n], p) for n, p in self.student.encoder_named_parameters()]
        return [t for t, _ in pairs], [s.detach() for _, s in pairs]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_T ← m·θ_T + (1 − m)·θ_S in place, one fused `lerp` over all encoder parameters (the
        frozen decoder is skipped). Exact at the ends: m = 1 keeps θ_T, m = 0 copies θ_S. The
        parameters stay fp32 (autocast never touches them), so the average is fp32."""
        momentum = float(momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        teacher, student = self._ema_pairs()
        if teacher:
            torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups over the student encoder and the predictor (never the teacher): weights
        with `weight_decay`, and biases / 1-D / position embeddings / mask token / register tokens
        without. Each group has a `name` and `apply_wd`, so the trainer sets the scheduled weight
        decay per step on the `apply_wd` groups only (I-JEPA's 4 groups)."""
        return parameter_groups_by_part((("encoder", self.student.encoder_named_parameters()),
                                         ("predictor", list(self.predictor.named_parameters()))), weight_decay)

    # ---- the training loop's interface (methods/base.py) --------------------------------------

    def training_output(self, volumes: torch.Tensor, anonymization_mask: torch.Tensor, step: int,
                        rank: int = 0, world_size: int = 1, stream: int = TRAIN_STREAM) -> MethodOutput:
        """Masks of this rank's share of the global batch of (step, stream), then `forward`.

        Every rank draws the masks of the whole global batch (a few ms) and keeps its rows, so
        the block sizes, positions and the trimmed context length are those of a single-process
        run with the same global batch. The anonymization mask is not used: I-JEPA's loss is on
        teacher features, not voxels."""
        if self.mask_sampler is None:
            raise InvalidInput("IJEPA.training_output needs a mask_sampler (IJEPA(encoder, config, mask_sampler=...))")
        local = volumes.shape[0]
        masks = self.mask_sampler(local * world_size, step, stream=stream).for_rank(rank, world_size)
        masks = masks.to(volumes.device)
        out = self(volumes, masks)
        return MethodOutput(out.loss, monitor_tokens=out.teacher_tokens, predictions=out.predictions.detach(),
                            scalars={"context_tokens": float(masks.context.shape[1]),
                                     "target_tokens": float(masks.targets.shape[2])})

    def after_optimizer_step(self, step: int, momentum: float) -> None:
        self.update_teacher(momentum)

    def export_encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher (EMA) encoder under downstream Primus names (`eva.*`, `down_projection.*`),
        CPU tensors: the `network_weights` of an nnssl checkpoint (spec §2.12)."""
        return self.teacher.encoder_state_dict()
