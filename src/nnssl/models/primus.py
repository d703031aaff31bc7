"""Token-level access to dynamic-network-architectures' Primus for JEPA-style training.

A JEPA context encoder runs only on selected tokens, and the absolute position embedding and
the RoPE table must be gathered with the *same* indices as the tokens (documentation/ijepa_masking.md:
the tokens keep their own positions). Primus's own `patch_drop_rate` cannot do this: it draws its own random indices,
and in the released versions its per-sample RoPE has shape [B, K, d], which does not broadcast
against attention's [B, heads, K, d] for batch > 1. `PrimusTokenEncoder` does the selection
itself and hands RoPE to the Eva blocks as [B, 1, K, d], which timm's `apply_rot_embed_cat`
broadcasts over heads.

The patch embedding is Primus's own Conv3d (kernel = stride = patch), evaluated as a patchify
reshape followed by one matrix product with the same weights. That is the same function, but
only the selected patches are projected, and its backward is a GEMM instead of a strided-conv
weight gradient (36 ms of a 59 ms CPU step at the toy size, measured). The state-dict keys do
not change: the real Primus is held as `.primus`.

Token order is Primus's: `b c w h d -> b (w h d) c` (C-order over the grid), the convention of
`nnssl.methods.masks` (test M11).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.primus import _PRIMUS_CONFIGS, Primus
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnssl.errors import InvalidInput
from nnssl.models.backbone import BackboneSpec, class_path
from nnssl.models.registry import BackboneEntry, BackboneFamily, ModelSettings, register_backbone, register_family

# embed_dim / eva_depth / eva_numheads. S/B/M/L are dynamic-network-architectures' presets (the
# nnU-Net PrimusS/B/M/L networks). "Tiny" is CPU-sized and satisfies Eva's 3D RoPE constraint
# (rope_dim = head_dim / 1.5 must be an integer multiple of 4): 96 / 2 heads = 48 -> rope 32.
PRIMUS_PRESETS: dict[str, dict[str, int]] = {
    **{name: {"embed_dim": int(c["embed_dim"]), "eva_depth": int(c["eva_depth"]),
              "eva_numheads": int(c["eva_numheads"])} for name, c in _PRIMUS_CONFIGS.items()},
    "Tiny": {"embed_dim": 96, "eva_depth": 2, "eva_numheads": 2},
}

# What nnU-Net's Primus trainers pass besides the preset (nnUNet_Primus_M_Trainer:
# init_values=0.1, scale_attn_inner=True; the rest are Primus's defaults, written out so the
# adaptation plan is explicit). drop_path is 0 here (documentation/ijepa_method.md), 0.2 downstream.
_PRIMUS_FIXED_KWARGS: dict[str, Any] = {
    "init_values": 0.1, "scale_attn_inner": True, "use_rot_pos_emb": True, "use_abs_pos_embed": True,
    "mlp_ratio": 8.0 / 3.0, "num_register_tokens": 0, "patch_drop_rate": 0.0,
}


class InvalidPrimusConfig(InvalidInput, ValueError):
    """A Primus preset, patch size or input shape that cannot build a network."""


def primus_arch_kwargs(preset: str, input_channels: int, patch_size: tuple[int, int, int],
                       input_shape: tuple[int, int, int], drop_path_rate: float = 0.0,
                       num_classes: int = 1) -> dict[str, Any]:
    """Plain-type (JSON-safe) keyword arguments of
    `dynamic_network_architectures.architectures.primus.Primus`, as nnU-Net's PrimusS/B/M/L
    networks use them, for the adaptation plan and for `build_primus`."""
    problems = []
    if preset not in PRIMUS_PRESETS:
        problems.append(f"unknown Primus preset {preset!r}; choose one of {sorted(PRIMUS_PRESETS)}")
    if len(tuple(patch_size)) != 3 or len(tuple(input_shape)) != 3:
        problems.append(f"patch size {tuple(patch_size)} and input shape {tuple(input_shape)} must both be 3D")
    elif any(p < 1 or s < p or s % p for s, p in zip(input_shape, patch_size)):
        problems.append(f"input shape {tuple(input_shape)} must be a positive multiple of the patch size "
                        f"{tuple(patch_size)} on every axis")
    if input_channels < 1:
        problems.append(f"input_channels must be >= 1, got {input_channels}")
    if not 0.0 <= drop_path_rate < 1.0:
        problems.append(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if problems:
        raise InvalidPrimusConfig("cannot build Primus:", problems)
    return {
        "input_channels": int(input_channels), **PRIMUS_PRESETS[preset],
        "patch_embed_size": [int(p) for p in patch_size], "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape], "drop_path_rate": float(drop_path_rate),
        **_PRIMUS_FIXED_KWARGS,
    }


def build_primus(preset: str = "M", input_channels: int = 1, patch_size: tuple[int, int, int] = (8, 8, 8),
                 input_shape: tuple[int, int, int] = (160, 160, 160), num_classes: int = 1,
                 drop_path_rate: float = 0.0) -> Primus:
    """The real Primus network of a preset (the one nnU-Net fine-tunes)."""
    kwargs = primus_arch_kwargs(preset, input_channels, patch_size, input_shape, drop_path_rate, num_classes)
    kwargs["patch_embed_size"] = tuple(kwargs["patch_embed_size"])
    kwargs["input_shape"] = tuple(kwargs["input_shape"])
    return Primus(**kwargs)


class PrimusTokenEncoder(nn.Module):
    """Token-level access to a Primus for JEPA: patch embedding + absolute positions of the
    selected tokens only, Eva blocks with the RoPE table gathered with the same indices, final
    norm. Never uses Primus's `patch_drop_rate` (broken for batch > 1).

    `primus` is the real network: its state-dict keys stay `primus.eva.*` and
    `primus.down_projection.*`. Its segmentation decoder (`up_projection`) is never used by JEPA
    and is frozen (`requires_grad=False`), so it stays out of optimizers, EMA and DDP's
    unused-parameter checks. Register tokens, if the Primus has them, are prepended after the
    selection and stripped from the output (documentation/ijepa_masking.md).
    """

    def __init__(self, primus: Primus, grid: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        eva = primus.eva
        proj = getattr(primus.down_projection, "proj", None)
        if not isinstance(proj, nn.Conv3d) or tuple(proj.kernel_size) != tuple(proj.stride) or any(proj.padding):
            raise InvalidPrimusConfig("PrimusTokenEncoder needs Primus's plain patch embedding "
                                      "(one Conv3d with kernel = stride, no padding)")
        if eva.patch_drop is not None:
            raise InvalidPrimusConfig("build Primus with patch_drop_rate=0: JEPA selects tokens itself, and "
                                      "Primus's own token dropping is broken for batch > 1")
        rope_shape = getattr(eva.rope, "feat_shape", None) if eva.rope is not None else None
        grid = tuple(int(g) for g in (grid if grid is not None else rope_shape or ()))
        if len(grid) != 3:
            raise InvalidPrimusConfig("the token grid is unknown: pass grid=(gx, gy, gz) for a Primus without RoPE")
        self.primus = primus
        self.grid: tuple[int, int, int] = grid  # type: ignore[assignment]
        self.num_tokens = math.prod(grid)
        self.embed_dim = int(primus.embed_dim)
        self.num_heads = int(eva.blocks[0].attn.num_heads) if len(eva.blocks) else 1
        self.patch_size: tuple[int, int, int] = tuple(int(p) for p in proj.kernel_size)  # type: ignore[assignment]
        self.in_channels = int(proj.in_channels)
        self.num_prefix_tokens = int(eva.num_prefix_tokens)
        if eva.pos_embed is not None and eva.pos_embed.shape[1] != self.num_tokens + self.num_prefix_tokens:
            raise InvalidPrimusConfig(f"Primus's position embedding has {eva.pos_embed.shape[1]} entries, the "
                                      f"grid {grid} has {self.num_tokens} tokens")
        for p in primus.up_projection.parameters():
            p.requires_grad_(False)

    # ---- embedding ---------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        expected = tuple(g * p for g, p in zip(self.grid, self.patch_size))
        if x.ndim != 5 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != expected:
            raise InvalidInput(f"PrimusTokenEncoder expects volumes [B, {self.in_channels}, {expected[0]}, "
                               f"{expected[1]}, {expected[2]}] (token grid {self.grid} x patch "
                               f"{self.patch_size}), got {list(x.shape)}; crop or resize the input, or "
                               "build the network for this shape")

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, X, Y, Z] -> [B, N, C·px·py·pz], rows in token order, columns in the order of
        the patch-embedding conv weight's flattening (C, px, py, pz)."""
        self._check_input(x)
        b, c = x.shape[:2]
        (gx, gy, gz), (px, py, pz) = self.grid, self.patch_size
        x = x.reshape(b, c, gx, px, gy, py, gz, pz).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, self.num_tokens, c * px * py * pz)

    def embed(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens plus absolute positions: [B, N, E], or [B, K, E] for the tokens `keep`
        [B, K] (only those patches are projected)."""
        patches = self.patchify(x)
        if keep is not None:
            self._check_keep(keep, x.shape[0])
            patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        proj = self.primus.down_projection.proj
        tokens = F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)
        pos = self.primus.eva.pos_embed
        if pos is not None:
            pos = pos[0, self.num_prefix_tokens:]
            tokens = tokens + (pos if keep is None else F.embedding(keep, pos))
        return tokens

    def _check_keep(self, keep: torch.Tensor, batch: int) -> None:
        # shape and dtype only: a value check would cost a device sync per step
        if keep.dtype != torch.int64 or keep.ndim != 2 or keep.shape[0] != batch:
            raise InvalidInput(f"token indices must be int64 [B={batch}, K], got {keep.dtype} {list(keep.shape)}")

    def rope_for(self, keep: torch.Tensor | None) -> torch.Tensor | None:
        """RoPE table rows of the tokens: [N, R] for all tokens (broadcast over batch and heads),
        or [B, 1, K, R] for `keep` [B, K] (broadcast over heads)."""
        rope = self.primus.eva.rope
        if rope is None:
            return None
        table = rope.get_embed()  # [N, R] in C-order ('ij' grid indexing)
        return table if keep is None else F.embedding(keep, table).unsqueeze(1)

    # ---- transformer -------------------------------------------------------------------------

    def run_blocks(self, tokens: torch.Tensor, keep: torch.Tensor | None,
                   attn_mask: torch.Tensor | None = None, layers: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Eva blocks + final norm on `tokens` [B, K, E] that sit at `keep` [B, K] (None: all N
        in order). `attn_mask` ([B, 1, K, K] bool, True = may attend) is for tests (E7). With a
        list `layers`, every block's output (register tokens stripped) is appended to it, for
        multi-layer read-outs."""
        eva = self.primus.eva
        rope = self.rope_for(keep)
        x = eva.pos_drop(tokens)
        npt = self.num_prefix_tokens
        if npt:
            reg = self.primus.register_tokens + eva.pos_embed[:, :npt] if eva.pos_embed is not None \
                else self.primus.register_tokens
            x = torch.cat([reg.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for block in eva.blocks:
            if eva.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, rope=rope, attn_mask=attn_mask, use_reentrant=False)
            else:
                x = block(x, rope=rope, attn_mask=attn_mask)
            if layers is not None:
                layers.append(x[:, npt:])
        return eva.norm(x[:, npt:])

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, X, Y, Z]; keep int64 [B, K] or None (all N tokens) -> [B, K, E]."""
        return self.run_blocks(self.embed(x, keep), keep)

    @property
    def num_target_blocks(self) -> int:
        """How many blocks can feed I-JEPA's averaged targets (`IJEPAConfig.target_layers`): all
        Eva blocks (every one keeps the token grid)."""
        return len(self.primus.eva.blocks)

    def last_block_outputs(self, x: torch.Tensor, count: int) -> list[torch.Tensor]:
        """The outputs of the last `count` Eva blocks on all N tokens, [B, N, E] each, shallowest
        first, from one forward pass. The deepest is returned after the final norm, i.e. exactly
        `forward(x)` (so one block reproduces the K = 1 target); the others are the residual
        stream as the blocks output it (the final norm is trained only on the last block's
        output, and I-JEPA normalises each block itself)."""
        if not 1 <= count <= self.num_target_blocks:
            raise InvalidInput(f"count={count} must be between 1 and the {self.num_target_blocks} Eva blocks")
        blocks: list[torch.Tensor] = []
        final = self.run_blocks(self.embed(x), None, layers=blocks)
        return blocks[len(blocks) - count:-1] + [final]

    def layer_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All N tokens at every depth: [embedding + positions, block 1, ..., block D, final
        norm], each [B, N, E] - the multi-layer read-out of frozen-feature evaluation."""
        tokens = self.embed(x)
        layers = [tokens]
        layers.append(self.run_blocks(tokens, None, layers=layers))
        return layers

    # ---- layout and weights ------------------------------------------------------------------

    def tokens_to_volume(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, E] -> [B, E, gx, gy, gz] (the inverse of Primus's flattening)."""
        if tokens.ndim != 3 or tokens.shape[1] != self.num_tokens:
            raise InvalidInput(f"expected tokens [B, {self.num_tokens}, E], got {list(tokens.shape)}")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)

    def _is_encoder_key(self, name: str) -> bool:
        return name.split(".", 1)[0] in (self.primus.key_to_encoder, self.primus.key_to_stem)

    def encoder_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters JEPA trains and averages (names relative to the Primus): everything but the
        frozen decoder, i.e. `eva.*`, `down_projection.*` and register tokens if any."""
        return [(n, p) for n, p in self.primus.named_parameters() if not n.startswith("up_projection.")]

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the downstream Primus's own names: `eva.*` and `down_projection.*` only
        (no decoder, no mask token), detached CPU copies, contiguous: what nnU-Net's loader
        selects with `startswith("eva")` / `startswith("down_projection")` and loads strictly."""
        return {k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.primus.state_dict().items() if self._is_encoder_key(k)}


def interpolate_position_embedding(weight: torch.Tensor, grid_from: tuple[int, ...], grid_to: tuple[int, ...]
                                   ) -> torch.Tensor:
    """[1, N, E] learned positions on `grid_from` -> [1, N', E] on `grid_to`, trilinear in
    Primus token order (C-order over the grid): what nnU-Net does to `eva.pos_embed` when the
    downstream patch size differs, and what a warm start at another patch size needs."""
    e = weight.shape[-1]
    volume = weight.reshape(1, *grid_from, e).permute(0, 4, 1, 2, 3)
    resized = F.interpolate(volume, size=tuple(grid_to), mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(1, math.prod(grid_to), e)


# The Primus settings nnU-Net's fine-tuning builders never pass, so the downstream network takes
# Primus's own defaults for them: an encoder trained otherwise would not load (register tokens,
# MLP width, position embeddings) or would compute something else (no RoPE). Read from the
# installed class, not copied, so a dynamic-network-architectures update that changes a default
# shows up here (and in tests/test_nnunet_client.py, against nnU-Net itself).
_NNUNET_LEAVES_AT_DEFAULT = ("num_register_tokens", "use_rot_pos_emb", "use_abs_pos_embed", "mlp_ratio",
                             "rope_kwargs")
# nnU-Net's `PretrainedTrainer_Primusx` builds `Primus(...)` from exactly these kwargs when the
# plan's `arch_kwargs` is not empty (documentation/finetuning_nnunet.md, "What nnU-Net does with it")
PRIMUSX_KWARGS = ("embed_dim", "patch_embed_size", "encoder_eva_depth", "encoder_eva_numheads",
                  "scale_attn_inner", "init_values")
NNUNET_PRESET_PATCH_EMBED = [8, 8, 8]  # nnU-Net's get_network_from_name builds every Primus preset with 8³


def _defaults(cls: type) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def nnunet_primus_architecture(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`architecture_plans` that nnU-Net master builds into exactly the Primus of `kwargs`
    (`primus_arch_kwargs`): a preset name with `arch_kwargs: null` (what the reference nnssl
    writes; every Primus trainer builds it by name) when width, depth, heads, the 8³ patch
    embedding, LayerScale and attention scaling are the preset's, otherwise `PrimusX` with the
    kwargs `PretrainedTrainer_Primusx` reads (only that trainer builds custom sizes)."""
    from dynamic_network_architectures.architectures import primus as dna_primus

    base = _defaults(Primus)
    differs = [f"{k}={kwargs[k]!r} (nnU-Net builds {base[k]!r})" for k in _NNUNET_LEAVES_AT_DEFAULT
               if k in kwargs and kwargs[k] != base[k]]
    if differs:
        raise InvalidPrimusConfig("nnU-Net's Primus fine-tuning builders leave these at Primus's defaults, so this "
                                  "encoder cannot be fine-tuned there; pretrain with the defaults:", differs)
    for name, config in _PRIMUS_CONFIGS.items():
        preset_class = getattr(dna_primus, f"Primus{name}", None)
        if preset_class is None:
            continue
        preset = _defaults(preset_class)
        if (all(kwargs.get(k) == int(v) for k, v in config.items())
                and list(kwargs.get("patch_embed_size", ())) == NNUNET_PRESET_PATCH_EMBED
                and kwargs.get("init_values") == preset["init_values"]
                and kwargs.get("scale_attn_inner") == preset["scale_attn_inner"]):
            return {"arch_class_name": f"Primus{name}", "arch_kwargs": None, "arch_kwargs_requiring_import": []}
    return {"arch_class_name": "PrimusX", "arch_kwargs": {
        "embed_dim": int(kwargs["embed_dim"]), "patch_embed_size": [int(p) for p in kwargs["patch_embed_size"]],
        "encoder_eva_depth": int(kwargs["eva_depth"]), "encoder_eva_numheads": int(kwargs["eva_numheads"]),
        "scale_attn_inner": bool(kwargs.get("scale_attn_inner", base["scale_attn_inner"])),
        "init_values": kwargs.get("init_values", base["init_values"])}, "arch_kwargs_requiring_import": []}


def primus_kwargs_from_primusx(primusx: dict[str, Any], input_channels: int,
                               input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Our complete Primus kwargs for a `PrimusX` plan (ours or the reference nnssl's, which adds
    more keys): what `PretrainedTrainer_Primusx` builds from it, without its downstream drop path."""
    missing = [k for k in PRIMUSX_KWARGS if k not in primusx]
    if missing:
        raise InvalidPrimusConfig(f"a PrimusX architecture plan needs {list(PRIMUSX_KWARGS)}; missing {missing}")
    base = _defaults(Primus)
    init_values = primusx["init_values"]
    return {"input_channels": int(input_channels), "embed_dim": int(primusx["embed_dim"]),
            "eva_depth": int(primusx["encoder_eva_depth"]), "eva_numheads": int(primusx["encoder_eva_numheads"]),
            "patch_embed_size": [int(p) for p in primusx["patch_embed_size"]], "num_classes": 1,
            "input_shape": [int(s) for s in input_shape], "drop_path_rate": 0.0,
            "init_values": init_values[0] if isinstance(init_values, list) else init_values,
            "scale_attn_inner": bool(primusx["scale_attn_inner"]),
            **{k: base[k] for k in _NNUNET_LEAVES_AT_DEFAULT}, "patch_drop_rate": 0.0}


def primus_backbone_spec(primus: Primus, kwargs: dict[str, Any]) -> BackboneSpec:
    """The adaptation-plan description of a Primus built from `kwargs` (`primus_arch_kwargs`):
    `arch_class_name` is what nnU-Net builds (`nnunet_primus_architecture`: a preset name, or
    `PrimusX` for other sizes such as Tiny); `arch_kwargs` keeps the complete constructor
    arguments, so `BackboneSpec.build` rebuilds exactly this network either way."""
    name = nnunet_primus_architecture(kwargs)["arch_class_name"]
    return BackboneSpec.from_network(primus, name, kwargs, tuple(kwargs["input_shape"]), shape_kwarg="input_shape")


# ---- registry entries (models/registry.py) -----------------------------------------------------

PRIMUS_CITATION = {
    "type": "architecture", "name": "Primus",
    "apa_citations": ["Wald, T., Roy, S., Isensee, F., Ulrich, C., Ziegler, S., Trofimova, D., Stock, R., "
                      "Baumgartner, M., Kohler, G., & Maier-Hein, K. H. (2025). Primus: Enforcing Attention "
                      "Usage for 3D Medical Image Segmentation. arXiv:2503.01835"],
}
DEFAULT_PATCH_EMBED = (8, 8, 8)  # nnU-Net's Primus presets embed 8³ voxels per token


def _cell_size(settings: ModelSettings) -> tuple[int, int, int]:
    return settings.patch_embed_size or DEFAULT_PATCH_EMBED


def _problems(settings: ModelSettings, patch_size: tuple[int, int, int]) -> list[str]:
    cell = _cell_size(settings)
    if len(patch_size) != 3 or any(p < c or p % c for p, c in zip(patch_size, cell)):
        return [f"patch size {tuple(patch_size)} must be a positive multiple of Primus's patch embedding {cell} "
                "on every axis (one token per embedded patch)"]
    return []


def _builder(preset: str):
    def build(input_channels: int, input_shape: tuple[int, int, int], settings: ModelSettings,
              num_classes: int = 1) -> tuple[Primus, BackboneSpec]:
        embed = _cell_size(settings)
        kwargs = primus_arch_kwargs(preset, input_channels, embed, input_shape, settings.drop_path_rate, num_classes)
        primus = build_primus(preset, input_channels, embed, input_shape, num_classes, settings.drop_path_rate)
        return primus, primus_backbone_spec(primus, kwargs)
    return build


register_family(BackboneFamily(
    name="primus", display_name="Primus (3D ViT: 8³ patch embedding, Eva blocks with RoPE)",
    citation=PRIMUS_CITATION, token_encoder=lambda network, input_shape: PrimusTokenEncoder(network),
    cell_size=_cell_size, problems=_problems, network_class=class_path(Primus),
    nnunet_architecture=lambda spec: nnunet_primus_architecture(spec.arch_kwargs)))
for _preset in ("S", "B", "M", "L"):
    _c = PRIMUS_PRESETS[_preset]
    register_backbone(BackboneEntry(
        name=f"Primus{_preset}", family="primus", build=_builder(_preset),
        description=f"Primus-{_preset} (3D ViT, width {_c['embed_dim']}, depth {_c['eva_depth']}, "
                    f"{_c['eva_numheads']} heads){' - the default' if _preset == 'M' else ''}"))
register_backbone(BackboneEntry(
    name="Tiny", family="primus", build=_builder("Tiny"), cpu_sized=True,
    description="a tiny Primus for CPU runs (width 96, depth 2, 2 heads; trains in seconds)",
    # a short schedule and a predictor / decoder in proportion to the width
    defaults={"num_epochs": 2, "iterations_per_epoch": 5, "num_val_iterations": 1, "model.drop_path_rate": 0.0,
              "ijepa.predictor_width": 64, "ijepa.predictor_depth": 2, "mask.min_keep": 4,
              "mae.decoder_width": 48, "mae.decoder_depth": 1}))
