"""I-JEPA for 3D volumes: context encoder, EMA target encoder, predictor, loss.

One forward computes the teacher once on all tokens (no grad, eval mode), normalises it with a
layer norm without affine parameters (LN₀), gathers every target block from it, runs the
student only on context tokens and predicts all blocks in one batched predictor call. bf16
autocast is the caller's choice (the trainer enables it on CUDA); nothing here is CUDA-only.

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

import torch
import torch.nn.functional as F
from torch import nn

from nnssl.methods.masks import MaskBatch
from nnssl.models.predictor import JEPAPredictor
from nnssl.models.primus import PrimusTokenEncoder

LOSSES = ("smooth_l1", "l1", "l2")


@dataclass(frozen=True)
class IJEPAConfig:
    predictor_width: int = 384
    predictor_depth: int = 6
    predictor_heads: int | None = None
    loss: str = "smooth_l1"

    def __post_init__(self) -> None:
        problems = []
        if self.loss not in LOSSES:
            problems.append(f"loss {self.loss!r} must be one of {LOSSES}")
        if self.predictor_width < 1 or self.predictor_depth < 0:
            problems.append("predictor width must be >= 1 and depth >= 0")
        if problems:
            raise ValueError("invalid IJEPAConfig: " + "; ".join(problems))


@dataclass
class IJEPAOutput:
    loss: torch.Tensor
    predictions: torch.Tensor     # [M*B, Kt, E]
    targets: torch.Tensor         # [M*B, Kt, E]
    teacher_tokens: torch.Tensor  # [B, N, E], LN₀-normalised, detached


def ijepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1.0)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def _predictor_heads(width: int, encoder_heads: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    if width % encoder_heads == 0:
        return encoder_heads
    return next(h for h in range(min(encoder_heads, width), 0, -1) if width % h == 0)


class IJEPA(nn.Module):
    def __init__(self, encoder: PrimusTokenEncoder, config: IJEPAConfig = IJEPAConfig()) -> None:
        super().__init__()
        self.config = config
        self.student = encoder
        self.teacher = copy.deepcopy(encoder)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.predictor = JEPAPredictor(
            encoder.grid, encoder.embed_dim, config.predictor_width, config.predictor_depth,
            _predictor_heads(config.predictor_width, encoder.num_heads, config.predictor_heads))

    def train(self, mode: bool = True) -> "IJEPA":
        super().train(mode)
        self.teacher.eval()  # targets never see drop-path/dropout noise
        return self

    @torch.no_grad()
    def teacher_tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        h = self.teacher(volumes)
        return F.layer_norm(h.float(), (h.shape[-1],)).to(h.dtype)

    def forward(self, volumes: torch.Tensor, masks: MaskBatch) -> IJEPAOutput:
        m, b, kt = masks.targets.shape
        h = self.teacher_tokens(volumes)                                   # [B, N, E]
        e = h.shape[-1]
        flat_idx = masks.targets.reshape(m * b, kt)
        targets = torch.gather(h.repeat(m, 1, 1), 1, flat_idx.unsqueeze(-1).expand(-1, -1, e))
        z = self.student(volumes, masks.context)                           # [B, Kc, E]
        pred = self.predictor(z, masks.context, masks.targets)             # [M*B, Kt, E]
        loss = ijepa_loss(pred.float(), targets.float(), self.config.loss)
        return IJEPAOutput(loss, pred, targets, h.detach())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_T ← m·θ_T + (1 − m)·θ_S, in place on the (fp32) parameters."""
        t = [p for _, p in self.teacher.encoder_named_parameters()]
        s = [p.detach() for _, p in self.student.encoder_named_parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Student + predictor; no decay on biases, norms (1-D), position embeddings, mask token."""
        decay, no_decay = [], []
        named = self.student.encoder_named_parameters() + list(self.predictor.named_parameters())
        for name, p in named:
            if p.requires_grad:
                exempt = p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "mask_token" in name
                (no_decay if exempt else decay).append(p)
        return [{"name": "decay", "params": decay, "weight_decay": weight_decay, "apply_wd": True},
                {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "apply_wd": False}]

    def export_encoder_state_dict(self) -> dict[str, torch.Tensor]:
        return self.teacher.encoder_state_dict()
