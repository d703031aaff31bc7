"""The I-JEPA predictor: a narrow transformer that predicts target-block features from context.

Each target block is predicted in its own sequence [context ; block queries] (queries of
different blocks never attend to each other), all blocks batched block-major (row m*B + b),
with fixed 3D sin-cos positions and one shared learnable mask token. Attention uses
`F.scaled_dot_product_attention` (fused kernels where available).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_3d(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """[N, dim] fixed positions, C-order over `grid`; each axis gets its own channel block
    (V-JEPA "uniform power": 2*ceil(dim/6) channels per axis, concatenated, truncated), so a
    non-cubic grid is encoded per axis without mixing them up."""
    per_axis = 2 * math.ceil(dim / (2 * len(grid)))
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1)
    coords = coords.reshape(-1, len(grid))
    parts = [_sincos_1d(coords[:, a], per_axis) for a in range(len(grid))]
    return torch.cat(parts, dim=1)[:, :dim].float()


class _Block(nn.Module):
    """Pre-LN transformer block (qkv bias, MLP ratio 4, LN eps 1e-6) on SDPA."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, int(width * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(width * mlp_ratio), width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class JEPAPredictor(nn.Module):
    def __init__(self, grid: tuple[int, ...], encoder_dim: int, width: int = 384, depth: int = 6,
                 num_heads: int = 12, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"predictor width {width} must be divisible by its {num_heads} heads")
        self.grid = tuple(grid)
        self.embed = nn.Linear(encoder_dim, width)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid, width), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(_Block(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, encoder_dim)
        # I-JEPA's effective init (its helper re-initialises every Linear): trunc-normal 0.02, zero bias
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """context [B, Kc, E] at context_idx [B, Kc]; target_idx [M, B, Kt] -> [M*B, Kt, E]."""
        m, b, kt = target_idx.shape
        pos = self.pos_embed.to(context.dtype)
        ctx = self.embed(context) + pos[context_idx]                      # [B, Kc, W]
        queries = self.mask_token.to(ctx.dtype) + pos[target_idx.reshape(m * b, kt)]  # [M*B, Kt, W]
        x = torch.cat([ctx.repeat(m, 1, 1), queries], dim=1)              # block-major rows m*B + b
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -kt:]))
