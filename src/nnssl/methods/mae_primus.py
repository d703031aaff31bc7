"""MAE on Primus: encode the visible 25% of the tokens, reconstruct the voxels of the rest.

The recipe of OpenMind's / nnssl's `BaseEvaMAETrainer` (He et al.'s MAE in 3D), with the token
selection done here rather than by Primus's `patch_drop_rate` (broken for batch > 1, see
`models/primus.py`):

1. per sample, a random round(0.75 · N) of the N 8³ tokens are masked (`RandomMaskSampler`);
2. `PrimusTokenEncoder` embeds only the visible tokens (patch embedding + absolute positions)
   and runs the Eva blocks on them, with the RoPE table gathered with the same indices;
3. `MAEDecoder` projects them to the decoder width, puts them back at their positions in a
   sequence of N shared mask tokens, adds fixed 3D sin-cos positions to every token, runs a
   few Eva blocks and predicts the C·8³ voxels of each masked token with one linear layer;
4. loss = MSE over the masked tokens' voxels, excluding defaced voxels.

Differences from the reference `EvaMAE`, and why: the decoder is narrower (384 instead of the
encoder's 864, as in He et al.; the decoder is thrown away, so its cost is pure overhead) and
reads positions from fixed sin-cos instead of a second learned table; the head is linear per
token instead of Primus's `PatchDecode` (the decoder is discarded either way); the loss is
computed on the masked tokens only, so the head runs on 75% of the tokens and nothing else.

Only the encoder is exported, under the downstream Primus's names (`eva.*`,
`down_projection.*`). The decoder lives under `decoder.*` of this module, so no decoder key can
start with `eva` or `down_projection` (nnU-Net selects by prefix without a dot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from timm.models.eva import EvaBlock
from torch import nn

from nnssl.errors import InvalidInput
from nnssl.methods.base import TRAIN_STREAM, MethodOutput, PretrainingMethod, parameter_groups_by_part
from nnssl.methods.mae import RandomMasks, RandomMaskSampler, check_anonymization_mask, masked_mse
from nnssl.methods.registry import register_builder
from nnssl.models.backbone import BackboneSpec
from nnssl.models.predictor import sincos_pos_embed_3d
from nnssl.models.primus import PrimusTokenEncoder

if TYPE_CHECKING:
    from nnssl.methods.base import MethodInputs
    from nnssl.models.registry import BackboneEntry


def decoder_heads(width: int, encoder_heads: int) -> int:
    """The encoder's head count when it divides the width (12 for Primus-M at 384, as the
    reference decoder), else the largest divisor of the width below it."""
    return next(h for h in range(min(encoder_heads, width), 0, -1) if width % h == 0)


def patchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, X, Y, Z] -> [B, N, C, px·py·pz], tokens in Primus's C-order, voxels of a patch in
    the order of the patch-embedding weight; for any channel count (volumes and masks)."""
    expected = tuple(g * p for g, p in zip(grid, patch))
    if x.ndim != 5 or tuple(x.shape[2:]) != expected:
        raise InvalidInput(f"expected a [B, C, {expected[0]}, {expected[1]}, {expected[2]}] tensor (token grid "
                           f"{grid} x patch {patch}), got {list(x.shape)}")
    b, c = x.shape[:2]
    (gx, gy, gz), (px, py, pz) = grid, patch
    x = x.reshape(b, c, gx, px, gy, py, gz, pz).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, gx * gy * gz, c, px * py * pz)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] at index [B, K] -> [B, K, ...]."""
    shape = index.shape + x.shape[2:]
    return torch.gather(x, 1, index.reshape(*index.shape, *([1] * (x.ndim - 2))).expand(shape))


class MAEDecoder(nn.Module):
    """visible tokens [B, K, E] at `keep` [B, K] -> voxels [B, M, out_dim] of the tokens `masked`.

    Eva blocks with the encoder's recipe (SwiGLU, LayerScale 0.1, inner attention norm), as the
    reference decoder reuses the encoder's settings; no RoPE: every token, mask tokens
    included, carries its position in the fixed sin-cos embedding added at the input."""

    def __init__(self, grid: tuple[int, int, int], encoder_dim: int, out_dim: int, width: int = 384,
                 depth: int = 2, num_heads: int = 12) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.num_tokens = math.prod(self.grid)
        self.embed = nn.Linear(encoder_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # fixed, rebuilt from the grid: not persistent, so never stale in a checkpoint
        self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid, width), persistent=False)
        self.blocks = nn.ModuleList(
            EvaBlock(width, num_heads, qkv_bias=True, qkv_fused=True, mlp_ratio=8.0 / 3.0, swiglu_mlp=True,
                     scale_mlp=True, scale_attn_inner=True, num_prefix_tokens=0, init_values=0.1,
                     norm_layer=nn.LayerNorm)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Eva / MAE init: trunc-normal(0.02) linear weights, zero biases, mask token
        trunc-normal(0.02); norms and LayerScale keep their constructor values."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        x = self.embed(visible)                                                    # [B, K, W]
        b, _, width = x.shape
        sequence = self.mask_token.to(x.dtype).expand(b, self.num_tokens, width)
        sequence = sequence.scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), x)
        sequence = sequence + self.pos_embed.to(x.dtype)                           # [B, N, W]
        for block in self.blocks:
            sequence = block(sequence)
        return self.head(gather_tokens(self.norm(sequence), masked))              # [B, M, out]


@dataclass
class PrimusMAEOutput:
    loss: torch.Tensor            # scalar, fp32
    reconstruction: torch.Tensor  # [B, M, C, px·py·pz]: voxels of the masked tokens
    visible_tokens: torch.Tensor  # [B, K, E]: encoder output of the visible tokens


class PrimusMAE(PretrainingMethod):
    """Primus encoder (`encoder.primus.*`) + MAE decoder (`decoder.*`). `state_dict()` holds
    both, so a checkpoint resumes exactly; `export_encoder_state_dict()` only the encoder."""

    def __init__(self, encoder: PrimusTokenEncoder, mask_sampler: RandomMaskSampler | None = None,
                 decoder_width: int = 384, decoder_depth: int = 2, backbone: BackboneSpec | None = None) -> None:
        super().__init__()
        self.mask_sampler = mask_sampler if mask_sampler is not None else RandomMaskSampler()
        self.backbone = backbone
        self.embed_dim = int(encoder.embed_dim)
        self.encoder = encoder
        self.decoder = MAEDecoder(encoder.grid, encoder.embed_dim, encoder.in_channels * math.prod(encoder.patch_size),
                                  decoder_width, decoder_depth, decoder_heads(decoder_width, encoder.num_heads))

    def sample_masks(self, batch_size: int, step: int, first_index: int = 0, stream: int = TRAIN_STREAM
                     ) -> RandomMasks:
        return self.mask_sampler(batch_size, self.encoder.num_tokens, step, first_index=first_index, stream=stream)

    def forward(self, volumes: torch.Tensor, anonymization_mask: torch.Tensor | None,
                masks: RandomMasks) -> PrimusMAEOutput:
        if masks.keep.shape[0] != volumes.shape[0] or masks.num_cells != self.encoder.num_tokens:
            raise InvalidInput(f"masks are for batch {masks.keep.shape[0]} x {masks.num_cells} tokens, the volumes "
                               f"are a batch of {volumes.shape[0]} x {self.encoder.num_tokens} tokens; sample them "
                               "with `sample_masks(batch_size, step)`")
        visible = self.encoder(volumes, masks.keep)                                # [B, K, E]
        prediction = self.decoder(visible, masks.keep, masks.masked)               # [B, M, C·P]
        reconstruction = prediction.reshape(*masks.masked.shape, volumes.shape[1], -1)
        loss = self.reconstruction_loss(reconstruction, volumes, anonymization_mask, masks.masked)
        return PrimusMAEOutput(loss, reconstruction, visible)

    def reconstruction_loss(self, reconstruction: torch.Tensor, volumes: torch.Tensor,
                            anonymization_mask: torch.Tensor | None, masked: torch.Tensor) -> torch.Tensor:
        """MSE between `reconstruction` [B, M, C, P] and the voxels of the tokens `masked` [B, M],
        over the voxels not marked in the anonymization mask."""
        grid, patch = self.encoder.grid, self.encoder.patch_size
        target = gather_tokens(patchify(volumes, grid, patch), masked)             # [B, M, C, P]
        anonymized = check_anonymization_mask(anonymization_mask, volumes)
        if anonymized is None:
            include = torch.ones((), dtype=torch.bool, device=volumes.device)
        else:
            include = ~gather_tokens(patchify(anonymized, grid, patch), masked)    # [B, M, 1, P]
        return masked_mse(reconstruction, target, include)

    # ---- the training loop's interface (methods/base.py) --------------------------------------

    def training_output(self, volumes: torch.Tensor, anonymization_mask: torch.Tensor | None, step: int,
                        rank: int = 0, world_size: int = 1, stream: int = TRAIN_STREAM) -> MethodOutput:
        """Masks of this rank's global samples at (step, stream), then `forward`. Monitor tokens:
        the encoder output of the visible tokens (the only tokens the encoder sees)."""
        b = volumes.shape[0]
        masks = self.sample_masks(b, step, first_index=rank * b, stream=stream).to(volumes.device)
        out = self(volumes, anonymization_mask, masks)
        return MethodOutput(out.loss, monitor_tokens=out.visible_tokens.detach(),
                            scalars={"masked_fraction": masks.masked_fraction,
                                     "visible_tokens": float(masks.keep.shape[1])})

    def after_optimizer_step(self, step: int, momentum: float) -> None:
        """Nothing to do: MAE has no EMA teacher."""

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """`encoder_*` (the Primus encoder; its unused segmentation decoder is frozen) and
        `decoder_*` groups, each split into decayed weights and exempt biases / 1-D parameters /
        position embedding / mask token."""
        return parameter_groups_by_part((("encoder", self.encoder.encoder_named_parameters()),
                                     ("decoder", self.decoder.named_parameters())), weight_decay)

    def export_encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """`eva.*` and `down_projection.*` of the Primus, detached contiguous CPU copies: what
        nnU-Net selects by prefix and loads strictly into a fresh Primus."""
        return self.encoder.encoder_state_dict()


@register_builder("MAETrainer", "primus")
def build_primus_mae(config: MethodInputs, backbone: BackboneEntry, input_channels: int = 1) -> PrimusMAE:
    """The Primus MAE of a training configuration: the backbone at the crop size, the MAE ratio
    and decoder size of `config.mae`, masks seeded by `config.seed`."""
    primus, spec = backbone.build(input_channels, tuple(config.patch_size), config.model, 1)
    return PrimusMAE(PrimusTokenEncoder(primus), RandomMaskSampler(config.mae.mask_ratio, config.seed),
                     config.mae.decoder_width, config.mae.decoder_depth, spec)
