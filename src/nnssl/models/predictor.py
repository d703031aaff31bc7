"""The I-JEPA predictor: a narrow transformer that predicts target-block features from context.

As in the released I-JEPA (Assran et al. 2023, documentation/ijepa_method.md): the context tokens
are projected to the predictor width and get fixed sin-cos positions; each target block gets one
query per token (the one shared learnable mask token plus the position); every block is predicted in its own sequence
[context ; block-m queries], so queries of different blocks never attend to each other; the M
sequences are batched block-major (row m·B + b). Positions are 3D sin-cos in V-JEPA's "uniform
power" form (documentation/ijepa_method.md). Attention runs on `F.scaled_dot_product_attention` (fused kernels on
CPU and CUDA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnssl.errors import InvalidInput


class InvalidPredictorConfig(InvalidInput, ValueError):
    """Predictor sizes that cannot build a network."""


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[n] -> [n, dim]: half sin, half cos, frequencies 1 / 10000^(k / (dim/2))."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def grid_coords(grid: tuple[int, ...]) -> torch.Tensor:
    """[N, ndim] integer coordinates of the tokens of `grid` in C-order."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1)
    return coords.reshape(-1, len(grid))


def sincos_pos_embed_3d(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed positions [N, dim] for the tokens of `grid` in C-order (token n = (i·Gy + j)·Gz + k).

    V-JEPA "uniform power": every axis gets its own block of 2·ceil(dim / 6) channels (for 3D),
    blocks concatenated in axis order and the result truncated to `dim` (384 -> 128 per axis).
    Each axis is encoded from its own coordinate, so non-cubic grids stay correct (test P4; nidl's
    version scrambles axes there, spec N2). Also works for 1D and 2D grids."""
    grid = tuple(int(g) for g in grid)
    if not grid or min(grid) < 1 or dim < 2 * len(grid):
        raise InvalidPredictorConfig(f"cannot build sin-cos positions for grid {grid} and width {dim}: "
                                     f"need a non-empty grid and width >= {2 * len(grid)}")
    per_axis = 2 * math.ceil(dim / (2 * len(grid)))
    coords = grid_coords(grid)
    parts = [_sincos_1d(coords[:, axis], per_axis) for axis in range(len(grid))]
    return torch.cat(parts, dim=1)[:, :dim].float().contiguous()


class PredictorBlock(nn.Module):
    """Pre-LN transformer block as in I-JEPA's ViT (qkv bias, GELU MLP, LN eps 1e-6), with
    fused attention."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, outputs_from: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, n, C] -> [B, n - outputs_from, C]: the outputs of tokens outputs_from.. only.

        Every token still serves as a key and value, so the kept outputs are exactly those of the
        full block; the dropped tokens skip their query, attention row, projection and MLP. The
        predictor's last block uses this: only the queries' outputs are read, and the context
        tokens are ~70% of each sequence (about a tenth of the predictor's FLOPs saved). `mask`
        [B, 1, n, n], True where a token may attend, restricts attention (a local predictor)."""
        b, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        h = self.norm1(x)
        if outputs_from == 0:
            q, k, v = self.qkv(h).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, n, d]
        else:
            x = x[:, outputs_from:]
            q = F.linear(h[:, outputs_from:], self.qkv.weight[:c], self.qkv.bias[:c])
            q = q.reshape(b, -1, heads, d).transpose(1, 2)
            kv = F.linear(h, self.qkv.weight[c:], self.qkv.bias[c:])
            k, v = kv.reshape(b, n, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, :, outputs_from:])
        x = x + self.proj(a.transpose(1, 2).reshape(b, -1, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class JEPAPredictor(nn.Module):
    """context [B, Kc, E] at `context_idx` [B, Kc], target indices [M, B, Kt] -> predictions
    [M·B, Kt, E], row m·B + b = block m of sample b (the order of `targets.reshape(M*B, Kt)`).

    Depth 0 is allowed (the spec's T5 negative control): the queries then never see the context.
    """

    def __init__(self, grid: tuple[int, ...], encoder_dim: int, width: int = 384, depth: int = 6,
                 num_heads: int = 12, mlp_ratio: float = 4.0, attention_radius: int = 0) -> None:
        super().__init__()
        problems = []
        if width < 1 or encoder_dim < 1 or depth < 0 or num_heads < 1 or mlp_ratio <= 0 or attention_radius < 0:
            problems.append(f"need width, encoder_dim, num_heads >= 1, depth, attention_radius >= 0 and mlp_ratio "
                            f"> 0; got width {width}, encoder_dim {encoder_dim}, heads {num_heads}, depth {depth}, "
                            f"attention_radius {attention_radius}, mlp_ratio {mlp_ratio}")
        elif width % num_heads:
            problems.append(f"predictor width {width} must be divisible by its {num_heads} heads")
        if problems:
            raise InvalidPredictorConfig("cannot build the JEPA predictor:", problems)
        self.grid = tuple(int(g) for g in grid)
        self.num_tokens = math.prod(self.grid)
        self.attention_radius = int(attention_radius)
        self.register_buffer("coords", grid_coords(self.grid), persistent=False)
        self.embed = nn.Linear(encoder_dim, width)
        # fixed, so not a parameter; not persistent: rebuilt from the grid, never stale in a checkpoint
        self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid, width), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(PredictorBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, encoder_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """I-JEPA's effective init (its helper re-initialises every Linear after the ViT's depth
        rescale, erasing it; as the released I-JEPA does): trunc-normal(0.02) weights, zero biases, LN 1 / 0, mask
        token trunc-normal(0.02)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        if target_idx.ndim != 3 or context.ndim != 3 or context_idx.shape != context.shape[:2] \
                or target_idx.shape[1] != context.shape[0]:
            raise InvalidInput(f"predictor expects context [B, Kc, E], context_idx [B, Kc] and target_idx "
                               f"[M, B, Kt]; got {list(context.shape)}, {list(context_idx.shape)}, "
                               f"{list(target_idx.shape)}")
        m, b, kt = target_idx.shape
        ctx = self.embed(context)
        ctx = ctx + F.embedding(context_idx, self.pos_embed).to(ctx.dtype)            # [B, Kc, W]
        queries = F.embedding(target_idx.reshape(m * b, kt), self.pos_embed)           # [M*B, Kt, W]
        queries = (queries + self.mask_token).to(ctx.dtype)
        x = torch.cat([ctx.repeat(m, 1, 1), queries], dim=1)  # row m*B + b: sample b, block m
        if not self.blocks:
            return self.head(self.norm(queries))
        mask = None
        if self.attention_radius:
            idx = torch.cat([context_idx.repeat(m, 1), target_idx.reshape(m * b, kt)], dim=1)
            pos = self.coords[idx]                                                   # [M*B, n, 3]
            mask = ((pos[:, :, None] - pos[:, None]).abs().amax(-1) <= self.attention_radius)[:, None]
        for block in self.blocks[:-1]:
            x = block(x, mask=mask)
        # only the queries' outputs are read: the last block computes just those (exact)
        return self.head(self.norm(self.blocks[-1](x, outputs_from=x.shape[1] - kt, mask=mask)))
