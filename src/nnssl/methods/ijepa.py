"""I-JEPA for 3D volumes: context encoder (student), EMA target encoder (teacher), predictor, loss.

One forward (Assran et al., CVPR 2023; the 3D choices in documentation/ijepa_method.md):
1. the teacher runs once on all N tokens of the unmasked volume, under `no_grad` and always in
   eval mode (drop-path off, as in the I-JEPA release); its output is normalised by a layer norm without affine
   parameters (LN₀) in fp32, and every target block is gathered from it;
2. the student runs on the context tokens only (positions and RoPE gathered with them);
3. the predictor predicts all M blocks in one batched call (row m·B + b);
4. loss = mean smooth-L1 (β = 1) between predictions and targets (L1 / L2 as options).
After the optimizer step the caller updates the teacher: θ_T ← m·θ_T + (1 − m)·θ_S.

Two levers, both off by default (the defaults are the released I-JEPA, bit for bit):
- `target_layers` K > 1: targets are the average of the teacher's last K blocks, data2vec 2.0
  style (each block LN₀-normalised, averaged, LN₀ again; `teacher_targets`);
- anti-collapse terms on the student's embeddings, added to the loss with their weights:
  SIGReg (LeJEPA) and VICReg's variance / covariance terms (`methods/regularizers.py`).
See documentation/ijepa_method.md.

bf16 autocast is the caller's choice (the trainer enables it on CUDA); LN₀ and the loss run in
fp32 whatever the autocast state, and nothing here is CUDA-only.

Python API without the CLI::

    encoder = PrimusTokenEncoder(build_primus("M", input_shape=(160, 160, 160)))
    method = IJEPA(encoder)
    sampler = MultiBlockMaskSampler(encoder.grid)
    out = method(volumes, sampler(batch_size, step).to(device), step); out.loss.backward()
    optimizer.step(); method.update_teacher(momentum_at(step, schedule))
    weights = method.export_encoder_state_dict()   # eva.* / down_projection.* of the teacher
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from nnssl.errors import InvalidInput, NnsslError
from nnssl.methods.base import TRAIN_STREAM, MethodOutput, PretrainingMethod, parameter_groups_by_part
from nnssl.methods.masks import MaskBatch, MultiBlockMaskSampler, seeded_generator
from nnssl.methods.regularizers import BatchReduction, sigreg, vicreg_variance_covariance
from nnssl.models.backbone import BackboneSpec
from nnssl.models.predictor import JEPAPredictor

LOSSES = ("smooth_l1", "l1", "l2")
REGULARIZED = ("context", "predictions")  # which student embeddings the anti-collapse terms see


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
    """I-JEPA settings (section `ijepa` of the training configuration; defaults: the released I-JEPA).
    `predictor_heads=None` takes the encoder's head count when it divides the width (I-JEPA), else the largest divisor
    of the width below it.

    Levers (documentation/ijepa_method.md; defaults keep the released method exactly):
    - `target_layers`: K, targets from the average of the teacher's last K blocks (1: its output);
    - `regularized_embeddings`: what the anti-collapse terms act on: "context" (the student's
      context tokens, what the exported EMA teacher averages) or "predictions" (the predictor's
      outputs);
    - `sigreg_weight` λ, `sigreg_slices` (random directions per step), `sigreg_points`
      (quadrature nodes on [0, 3]): LeJEPA's SIGReg, added as λ·SIGReg (LeJEPA's
      (1 − λ')·pred + λ'·SIGReg is this with λ = λ'/(1 − λ') and the lr scaled by 1 − λ');
    - `vicreg_variance_weight`, `vicreg_covariance_weight`, `vicreg_std_target` γ: VICReg's
      variance hinge and off-diagonal covariance terms (VICReg used 25 and 1 with γ = 1).
    """

    predictor_width: int = 384
    predictor_depth: int = 6
    predictor_heads: int | None = None
    predictor_mlp_ratio: float = 4.0
    # 0: every predictor token attends to every other (I-JEPA); r > 0: only to tokens within r
    # grid cells on every axis, so a query must find its target in its neighbours' features
    predictor_attention_radius: int = 0
    loss: str = "smooth_l1"
    target_layers: int = 1
    regularized_embeddings: str = "context"
    sigreg_weight: float = 0.0
    sigreg_slices: int = 256
    sigreg_points: int = 17
    vicreg_variance_weight: float = 0.0
    vicreg_covariance_weight: float = 0.0
    vicreg_std_target: float = 1.0
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
        for name, low in (("target_layers", 1), ("sigreg_slices", 1), ("sigreg_points", 2),
                          ("predictor_attention_radius", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < low:
                problems.append(f"{name}={value!r} must be an integer >= {low}")
        if self.regularized_embeddings not in REGULARIZED:
            problems.append(f"regularized_embeddings={self.regularized_embeddings!r} must be one of {REGULARIZED}")
        for name in ("sigreg_weight", "vicreg_variance_weight", "vicreg_covariance_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                problems.append(f"{name}={value!r} must be a finite number >= 0 (0 switches the term off)")
        if not (isinstance(self.vicreg_std_target, (int, float)) and 0 < self.vicreg_std_target < math.inf):
            problems.append(f"vicreg_std_target={self.vicreg_std_target!r} must be a finite number > 0")
        if problems:
            raise InvalidIJEPAConfig(problems)

    def regularizer_weights(self) -> dict[str, float]:
        """The anti-collapse terms that are on, by the name they are logged under."""
        weights = {"sigreg": self.sigreg_weight, "vicreg_variance": self.vicreg_variance_weight,
                   "vicreg_covariance": self.vicreg_covariance_weight}
        return {name: float(w) for name, w in weights.items() if w > 0}

    def resolved_predictor_heads(self, encoder_heads: int) -> int:
        if self.predictor_heads is not None:
            return int(self.predictor_heads)
        width = int(self.predictor_width)
        if width % encoder_heads == 0:
            return int(encoder_heads)
        return next(h for h in range(min(encoder_heads, width), 0, -1) if width % h == 0)


@dataclass
class IJEPAOutput:
    loss: torch.Tensor            # scalar, fp32: prediction_loss + the weighted regularizers
    predictions: torch.Tensor     # [M*B, Kt, E], row m*B + b
    targets: torch.Tensor         # [M*B, Kt, E], fp32, no grad
    teacher_tokens: torch.Tensor  # [B, N, E]: LN₀ of the teacher's output, fp32, detached (monitors)
    prediction_loss: torch.Tensor | None = None  # scalar, fp32: the I-JEPA term alone
    # unweighted anti-collapse terms that are on (scalars, fp32, differentiable), by name
    regularizers: dict[str, torch.Tensor] = field(default_factory=dict)


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
                                       config.predictor_mlp_ratio, int(config.predictor_attention_radius))
        _check_target_layers(encoder, config.target_layers)
        # SIGReg's directions are a pure function of (seed, step, stream), like the masks; the
        # run's seed is the sampler's (a plain IJEPA without a sampler uses 0)
        self.regularizer_seed = int(mask_sampler.seed) if mask_sampler is not None else 0

    def train(self, mode: bool = True) -> IJEPA:
        super().train(mode)
        self.teacher.eval()  # targets never see drop-path / dropout noise
        return self

    @torch.no_grad()
    def teacher_tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """LN₀(teacher(volumes)): [B, N, E] fp32, no affine, over the feature axis."""
        h = self.teacher(volumes).float()
        with torch.autocast(h.device.type, enabled=False):
            return F.layer_norm(h, (h.shape[-1],))

    @torch.no_grad()
    def teacher_targets(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target tokens, monitor tokens), both [B, N, E] fp32 on all N tokens.

        K = `target_layers` = 1: both are `teacher_tokens` (the released I-JEPA, bit for bit).
        K > 1 (data2vec 2.0: Baevski et al. 2022, "average_top_k_layers" with per-layer
        normalisation and "layer_norm_targets"): LN₀(mean_k LN₀(y_k)) over the teacher's last K
        block outputs y_k, the deepest one as the encoder returns it (Primus: after the final
        norm, so that term is exactly today's target; ResEnc: the bottleneck). The per-block LN₀
        puts blocks of different scales on an equal footing (a pre-LN ViT's residual stream
        grows with depth); the final LN₀ gives the average the per-token scale of a K = 1
        target, so the loss and the smooth-L1 β keep their meaning. The monitor tokens stay
        LN₀ of the teacher's output, the representation that is exported."""
        k = int(self.config.target_layers)
        if k == 1:
            h = self.teacher_tokens(volumes)
            return h, h
        layers = self.teacher.last_block_outputs(volumes, k)
        with torch.autocast(volumes.device.type, enabled=False):
            normed = [F.layer_norm(y.float(), (y.shape[-1],)) for y in layers]
            average = torch.stack(normed).mean(0)
            return F.layer_norm(average, (average.shape[-1],)), normed[-1]

    def regularizer_terms(self, context: torch.Tensor, predictions: torch.Tensor, step: int | None,
                          stream: int = TRAIN_STREAM,
                          reduction: BatchReduction | None = None) -> dict[str, torch.Tensor]:
        """The anti-collapse terms that are on (unweighted, fp32, differentiable), on the student's
        context tokens [B, Kc, E] or the predictions [M*B, Kt, E]
        (`config.regularized_embeddings`), every token one sample. `reduction`: how batch sums
        become global-batch sums (None: this process's batch only)."""
        weights = self.config.regularizer_weights()
        if not weights:
            return {}
        reduction = reduction or BatchReduction()
        embeddings = context if self.config.regularized_embeddings == "context" else predictions
        terms = {}
        if "sigreg" in weights:
            if step is None:
                raise InvalidInput("SIGReg draws its random directions from (seed, step): pass the optimizer step, "
                                   "IJEPA.forward(volumes, masks, step)")
            generator = seeded_generator("sigreg", self.regularizer_seed, int(step), int(stream))
            terms["sigreg"] = sigreg(embeddings, int(self.config.sigreg_slices), int(self.config.sigreg_points),
                                     generator, reduction)
        if "vicreg_variance" in weights or "vicreg_covariance" in weights:
            variance, covariance = vicreg_variance_covariance(embeddings, float(self.config.vicreg_std_target),
                                                              reduction)
            terms.update({name: value for name, value in (("vicreg_variance", variance),
                                                          ("vicreg_covariance", covariance)) if name in weights})
        return terms

    def forward(self, volumes: torch.Tensor, masks: MaskBatch, step: int | None = None, stream: int = TRAIN_STREAM,
                reduction: BatchReduction | None = None) -> IJEPAOutput:
        """Loss of one batch. `step` / `stream` seed SIGReg's directions (needed only with
        SIGReg on); `reduction` makes the anti-collapse terms global-batch statistics."""
        m, b, kt = masks.targets.shape
        if masks.context.shape[0] != volumes.shape[0] or b != volumes.shape[0]:
            raise InvalidInput(f"masks are for batch size {masks.context.shape[0]} / {b}, the volumes batch is "
                               f"{volumes.shape[0]}; sample masks with the batch size of the volumes")
        h, monitor = self.teacher_targets(volumes)                                 # [B, N, E] each
        e = h.shape[-1]
        # gather every block from one teacher pass, without materialising M copies of h
        index = masks.targets.unsqueeze(-1).expand(m, b, kt, e)
        targets = torch.gather(h.unsqueeze(0).expand(m, -1, -1, -1), 2, index).reshape(m * b, kt, e)
        z = self.student(volumes, masks.context)                                   # [B, Kc, E]
        pred = self.predictor(z, masks.context, masks.targets)                     # [M*B, Kt, E]
        prediction_loss = ijepa_loss(pred, targets, self.config.loss)
        terms = self.regularizer_terms(z, pred, step, stream, reduction)
        loss = prediction_loss
        for name, weight in self.config.regularizer_weights().items():
            loss = loss + weight * terms[name]
        return IJEPAOutput(loss, pred, targets, monitor, prediction_loss, terms)

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
        run with the same global batch; the anti-collapse terms are statistics of the global
        batch too (all-reduced when torch.distributed runs world_size > 1 ranks). The
        anonymization mask is not used: I-JEPA's loss is on teacher features, not voxels."""
        if self.mask_sampler is None:
            raise InvalidInput("IJEPA.training_output needs a mask_sampler (IJEPA(encoder, config, mask_sampler=...))")
        local = volumes.shape[0]
        masks = self.mask_sampler(local * world_size, step, stream=stream).for_rank(rank, world_size)
        masks = masks.to(volumes.device)
        reduction = BatchReduction.from_process_group() if world_size > 1 else BatchReduction()
        out = self(volumes, masks, step, stream, reduction)
        scalars = {"context_tokens": float(masks.context.shape[1]), "target_tokens": float(masks.targets.shape[2])}
        if out.regularizers:
            scalars["prediction_loss"] = float(out.prediction_loss.detach())
            scalars.update({name: float(value.detach()) for name, value in out.regularizers.items()})
        return MethodOutput(out.loss, monitor_tokens=out.teacher_tokens, predictions=out.predictions.detach(),
                            scalars=scalars)

    def after_optimizer_step(self, step: int, momentum: float) -> None:
        self.update_teacher(momentum)

    def export_encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher (EMA) encoder under downstream Primus names (`eva.*`, `down_projection.*`),
        CPU tensors: the `network_weights` of an nnssl checkpoint (documentation/finetuning_nnunet.md)."""
        return self.teacher.encoder_state_dict()


def _check_target_layers(encoder: TokenEncoder, k: int) -> None:
    """K > 1 needs an encoder that exposes its last blocks on the token grid (`num_target_blocks`,
    `last_block_outputs`): Primus's Eva blocks, ResEnc's bottleneck-stage residual blocks."""
    if k == 1:
        return
    limit = getattr(encoder, "num_target_blocks", None)
    if limit is None or not callable(getattr(encoder, "last_block_outputs", None)):
        raise InvalidIJEPAConfig([f"target_layers={k} needs an encoder with last_block_outputs (PrimusTokenEncoder, "
                                  f"ResEncTokenEncoder); {type(encoder).__name__} has none: use target_layers=1"])
    if k > limit:
        raise InvalidIJEPAConfig([f"target_layers={k} exceeds the {limit} block(s) of {type(encoder).__name__} whose "
                                  "outputs lie on the token grid (Primus: its Eva blocks; ResEnc: the residual blocks "
                                  f"of the bottleneck stage); choose target_layers <= {limit}"])
