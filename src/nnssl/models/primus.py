"""Token-level access to dynamic-network-architectures' Primus for JEPA-style training.

The JEPA context encoder must run only on selected tokens, with the absolute position
embedding and the RoPE table gathered with the *same* indices. Primus's own `patch_drop_rate`
cannot be used: it draws random indices, and in the released versions its per-sample RoPE has
shape [B, K, d], which does not broadcast against attention's [B, heads, K, d] for batch > 1.
This wrapper does the selection itself and hands RoPE to the Eva blocks as [B, 1, K, d].

Token order is Primus's: `b c w h d -> b (w h d) c` (C-order over the grid), the same
convention as `nnssl.methods.masks`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from dynamic_network_architectures.architectures.primus import Primus
from torch import nn

# width / depth / heads. S/B/M/L equal dynamic-network-architectures' _PRIMUS_CONFIGS; "Tiny"
# is a CPU-sized model valid under Eva's RoPE constraint (head_dim / 1.5 a multiple of 4).
PRIMUS_PRESETS: dict[str, dict[str, int]] = {
    "Tiny": {"embed_dim": 96, "eva_depth": 2, "eva_numheads": 2},
    "S": {"embed_dim": 396, "eva_depth": 12, "eva_numheads": 6},
    "B": {"embed_dim": 792, "eva_depth": 12, "eva_numheads": 12},
    "M": {"embed_dim": 864, "eva_depth": 16, "eva_numheads": 12},
    "L": {"embed_dim": 1056, "eva_depth": 24, "eva_numheads": 16},
}


def primus_arch_kwargs(preset: str, input_channels: int = 1, patch_size: tuple[int, int, int] = (8, 8, 8),
                       input_shape: tuple[int, int, int] = (160, 160, 160), num_classes: int = 1,
                       drop_path_rate: float = 0.0) -> dict[str, Any]:
    """Plain-type Primus kwargs as the nnU-Net PrimusS/B/M/L presets use them (init_values 0.1,
    scale_attn_inner True, RoPE + learned absolute positions, no register tokens)."""
    if preset not in PRIMUS_PRESETS:
        raise ValueError(f"unknown Primus preset {preset!r}; choose one of {sorted(PRIMUS_PRESETS)}")
    if any(s % p for s, p in zip(input_shape, patch_size)):
        raise ValueError(f"input shape {input_shape} must be a multiple of the patch size {patch_size}")
    return {
        "input_channels": int(input_channels), **PRIMUS_PRESETS[preset],
        "patch_embed_size": [int(p) for p in patch_size], "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape], "drop_path_rate": float(drop_path_rate),
        "init_values": 0.1, "scale_attn_inner": True, "use_rot_pos_emb": True,
        "use_abs_pos_embed": True, "num_register_tokens": 0, "patch_drop_rate": 0.0,
    }


def build_primus(preset: str = "M", input_channels: int = 1, patch_size: tuple[int, int, int] = (8, 8, 8),
                 input_shape: tuple[int, int, int] = (160, 160, 160), num_classes: int = 1,
                 drop_path_rate: float = 0.0) -> Primus:
    kwargs = primus_arch_kwargs(preset, input_channels, patch_size, input_shape, num_classes, drop_path_rate)
    kwargs["patch_embed_size"] = tuple(kwargs["patch_embed_size"])
    kwargs["input_shape"] = tuple(kwargs["input_shape"])
    return Primus(**kwargs)


class PrimusTokenEncoder(nn.Module):
    """Patch embedding -> + abs pos -> select tokens -> Eva blocks (RoPE gathered) -> norm."""

    def __init__(self, primus: Primus) -> None:
        super().__init__()
        if primus.register_tokens is not None:
            raise ValueError("register tokens are not supported by the JEPA token encoder")
        if primus.eva.patch_drop is not None:
            raise ValueError("build Primus with patch_drop_rate=0; token selection is done here")
        self.primus = primus
        eva = primus.eva
        self.embed_dim = int(primus.embed_dim)
        self.num_heads = int(eva.blocks[0].attn.num_heads)
        patch = primus.down_projection.proj.kernel_size
        ref = getattr(eva.rope, "feat_shape", None) if eva.rope is not None else None
        n = eva.pos_embed.shape[1] if eva.pos_embed is not None else None
        self.patch_size = tuple(int(p) for p in patch)
        self.grid = tuple(int(g) for g in ref) if ref is not None else None
        self.num_tokens = int(n) if n is not None else (math.prod(self.grid) if self.grid else None)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, X, Y, Z] -> [B, N, E] patch tokens plus absolute positions (Primus order)."""
        t = self.primus.down_projection(x)
        grid = tuple(t.shape[2:])
        if self.grid is not None and grid != self.grid:
            raise ValueError(f"input gives a token grid {grid}, the model was built for {self.grid} "
                             f"(patch {self.patch_size}); resize the input or rebuild the model")
        t = t.flatten(2).transpose(1, 2)  # b c w h d -> b (w h d) c
        if self.primus.eva.pos_embed is not None:
            t = t + self.primus.eva.pos_embed
        return t

    def rope_table(self) -> torch.Tensor | None:
        rope = self.primus.eva.rope
        return rope.get_embed() if rope is not None else None  # [N, d]

    def run_blocks(self, tokens: torch.Tensor, keep: torch.Tensor | None,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Eva blocks + final norm on `tokens` [B, K, E] located at `keep` [B, K] (None: all N)."""
        rope = self.rope_table()
        if rope is not None:
            rope = rope.to(tokens.dtype if tokens.is_floating_point() else rope.dtype)
            rope = rope.unsqueeze(0) if keep is None else rope[keep]  # [1 or B, K, d]
            rope = rope.unsqueeze(1)  # [B, 1, K, d]: broadcasts over heads (the batch>1 fix)
        eva = self.primus.eva
        x = eva.pos_drop(tokens)
        for block in eva.blocks:
            x = block(x, rope=rope, attn_mask=attn_mask)
        return eva.norm(x)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.embed(x)
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.run_blocks(tokens, keep)

    def tokens_to_volume(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, E] -> [B, E, gx, gy, gz] (inverse of Primus's flattening)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)

    def encoder_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters of the encoder proper (`eva.*`, `down_projection.*`); Primus's decoder
        (`up_projection`) is never used by JEPA and stays out of optimizers and EMA."""
        keys = (self.primus.key_to_encoder, self.primus.key_to_stem)
        return [(n, p) for n, p in self.primus.named_parameters() if n.split(".")[0] in keys]

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the downstream Primus's own names: `eva.*` and `down_projection.*` only."""
        keys = (self.primus.key_to_encoder, self.primus.key_to_stem)
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.primus.state_dict().items()
                if k.split(".")[0] in keys}
