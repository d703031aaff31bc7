"""Token-level Primus for JEPA (documentation/ijepa_method.md): flatten order M11, full-index
equivalence E6, masked-attention equivalence E7 (RoPE gathered per sample), permutation
equivariance E8, no leakage E9, teacher sees everything E10, presets and weight export."""

from __future__ import annotations

import json

import pytest
import torch
from dynamic_network_architectures.architectures.primus import _PRIMUS_CONFIGS, Primus
from einops import rearrange

from nnssl.errors import InvalidInput, NnsslError
from nnssl.methods.masks import MaskConfig, MultiBlockMaskSampler, unflatten_index
from nnssl.models.predictor import JEPAPredictor
from nnssl.models.primus import (
    PRIMUS_PRESETS,
    InvalidPrimusConfig,
    PrimusTokenEncoder,
    build_primus,
    primus_arch_kwargs,
)

SHAPE = (16, 24, 32)  # non-cubic on purpose: grid (2, 3, 4) catches swapped axes


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: threads only add noise


def _encoder(shape=SHAPE, seed: int = 0, **kwargs) -> PrimusTokenEncoder:
    torch.manual_seed(seed)
    enc = PrimusTokenEncoder(build_primus("Tiny", input_shape=shape, **kwargs)).eval()
    with torch.no_grad():  # non-trivial positions and layer scales, so every path matters
        enc.primus.eva.pos_embed.normal_(0, 0.5)
        for block in enc.primus.eva.blocks:
            block.gamma_1.fill_(1.0)
            block.gamma_2.fill_(1.0)
    return enc


def _masks(grid, batch: int, step: int = 1):
    return MultiBlockMaskSampler(grid, MaskConfig(min_keep=4), seed=3)(batch, step)


def _primus_reference(enc: PrimusTokenEncoder, x: torch.Tensor) -> torch.Tensor:
    """Primus's own encoder path (Primus.forward up to the decoder), register tokens included."""
    p = enc.primus
    t = rearrange(p.down_projection(x), "b c w h d -> b (w h d) c")
    if p.register_tokens is not None:
        t = torch.cat([p.register_tokens.expand(t.shape[0], -1, -1), t], dim=1)
    out, keep = p.eva(t)
    assert keep is None
    return out[:, enc.num_prefix_tokens:]


# ---- presets and construction ------------------------------------------------------------------

def test_presets_match_dynamic_network_architectures_and_satisfy_rope():
    for name, cfg in _PRIMUS_CONFIGS.items():
        assert PRIMUS_PRESETS[name] == {k: cfg[k] for k in ("embed_dim", "eva_depth", "eva_numheads")}
    assert set(PRIMUS_PRESETS) == set(_PRIMUS_CONFIGS) | {"Tiny"}
    for cfg in PRIMUS_PRESETS.values():
        rope_dim = cfg["embed_dim"] / cfg["eva_numheads"] / 1.5
        assert rope_dim == int(rope_dim) and int(rope_dim) % 4 == 0


def test_arch_kwargs_are_plain_and_match_nnunet_primus_m():
    kwargs = primus_arch_kwargs("M", 1, (8, 8, 8), (160, 160, 160))
    assert json.loads(json.dumps(kwargs)) == kwargs  # plain types only (adaptation plan)
    # nnUNet_Primus_M_Trainer: Primus(C, 864, (8,8,8), K, 16, 12, patch, scale_attn_inner=True, init_values=0.1)
    expected = {"embed_dim": 864, "eva_depth": 16, "eva_numheads": 12, "init_values": 0.1, "scale_attn_inner": True,
                "use_rot_pos_emb": True, "use_abs_pos_embed": True, "num_register_tokens": 0, "patch_drop_rate": 0.0,
                "patch_embed_size": [8, 8, 8], "input_shape": [160, 160, 160], "input_channels": 1}
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["mlp_ratio"] == 4 * 2 / 3
    net = build_primus("Tiny", 2, (8, 8, 8), (32, 32, 32), num_classes=3, drop_path_rate=0.1)
    assert isinstance(net, Primus) and net.down_projection.proj.in_channels == 2
    assert net(torch.zeros(1, 2, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_arch_kwargs_report_every_problem_at_once():
    with pytest.raises(InvalidPrimusConfig) as info:
        primus_arch_kwargs("XL", 0, (8, 8, 8), (20, 32, 32), drop_path_rate=1.5)
    assert isinstance(info.value, NnsslError)
    text = str(info.value)
    assert "'XL'" in text and "(20, 32, 32)" in text and "input_channels" in text and "drop_path_rate" in text
    assert len(info.value.problems) == 4


def test_encoder_refuses_patch_drop_and_wrong_input():
    dropping = build_primus("Tiny", input_shape=SHAPE)
    dropping.eva.patch_drop = torch.nn.Identity()  # stands in for PatchDropout (this timm cannot build it)
    with pytest.raises(InvalidPrimusConfig, match="patch_drop_rate"):
        PrimusTokenEncoder(dropping)
    enc = _encoder()
    with pytest.raises(InvalidInput, match=r"\[B, 1, 16, 24, 32\]"):
        enc(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(InvalidInput, match="int64"):
        enc(torch.zeros(1, 1, *SHAPE), torch.zeros(1, 4, dtype=torch.int32))


# ---- M11: one index convention everywhere --------------------------------------------------------

def test_m11_token_order_matches_primus_flattening_and_the_sampler():
    enc = _encoder(input_channels=3)
    proj = enc.primus.down_projection.proj
    with torch.no_grad():  # "identity" conv: output channel c = mean of input channel c over the patch
        proj.weight.zero_()
        proj.bias.zero_()
        for c in range(3):
            proj.weight[c, c] = 1.0 / 512
        enc.primus.eva.pos_embed.zero_()
    grid = enc.grid
    assert grid == (2, 3, 4)
    x = torch.zeros(2, 3, *SHAPE)
    for axis in range(3):  # voxel values encode their patch's (i, j, k), one coordinate per channel
        coord = torch.arange(SHAPE[axis]) // 8
        x[:, axis] = coord.view([-1 if a == axis else 1 for a in range(3)]).float()
    conv_tokens = rearrange(enc.primus.down_projection(x), "b c w h d -> b (w h d) c")
    our_tokens = enc.embed(x)
    masks = _masks(grid, 2)
    for tokens in (conv_tokens, our_tokens):
        for idx in (masks.context, masks.targets[0], masks.targets[-1]):
            got = torch.gather(tokens[..., :3], 1, idx.unsqueeze(-1).expand(-1, -1, 3))
            assert torch.allclose(got, unflatten_index(idx, grid).float(), atol=1e-5)
    selected = enc.embed(x, masks.context)[..., :3]
    assert torch.allclose(selected, unflatten_index(masks.context, grid).float(), atol=1e-5)
    volume = enc.tokens_to_volume(our_tokens)
    assert torch.allclose(volume, enc.primus.down_projection(x), atol=1e-5)


def test_m11_rope_table_is_in_the_same_c_order():
    enc = _encoder()
    table = enc.primus.eva.rope.get_embed()           # [N, sin | cos], each 3 axes x (2 * bands)
    coords = unflatten_index(torch.arange(enc.num_tokens), enc.grid)
    per_axis = table.shape[1] // 6
    for axis in range(3):
        sin_axis = table[:, axis * per_axis:(axis + 1) * per_axis]
        for value in coords[:, axis].unique():
            rows = sin_axis[coords[:, axis] == value]
            assert torch.equal(rows, rows[:1].expand_as(rows))     # depends on its own coordinate only
        assert len({tuple(r.tolist()) for r in sin_axis}) == enc.grid[axis]


# ---- E6-E8 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("registers", [0, 2])
def test_e6_all_indices_equal_primus_own_forward(registers):
    torch.manual_seed(0)
    primus = Primus(1, 96, (8, 8, 8), 1, 2, 2, SHAPE, init_values=0.1, scale_attn_inner=True,
                    num_register_tokens=registers)
    enc = PrimusTokenEncoder(primus).eval()
    with torch.no_grad():
        enc.primus.eva.pos_embed.normal_(0, 0.5)
        if registers:
            enc.primus.register_tokens.normal_(0, 1.0)
    x = torch.randn(3, 1, *SHAPE)
    reference = _primus_reference(enc, x)
    all_idx = torch.arange(enc.num_tokens).expand(3, -1).contiguous()
    assert torch.allclose(enc(x), reference, atol=1e-5)
    assert torch.allclose(enc(x, all_idx), reference, atol=1e-5)


def test_e7_gathered_rope_equals_masked_full_attention():
    enc = _encoder()
    x = torch.randn(3, 1, *SHAPE)
    ctx = _masks(enc.grid, 3).context                         # different tokens per sample
    n = enc.num_tokens
    attn_mask = torch.zeros(3, 1, n, n, dtype=torch.bool)
    for b in range(3):
        attn_mask[b, :, :, ctx[b]] = True                     # every query sees only context keys
    full = enc.run_blocks(enc.embed(x), None, attn_mask=attn_mask)
    expected = torch.gather(full, 1, ctx.unsqueeze(-1).expand(-1, -1, enc.embed_dim))
    got = enc(x, ctx)
    assert torch.allclose(got, expected, atol=1e-5)
    # the check has teeth: one RoPE table shared by the batch (the released bug) disagrees
    wrong_rope = enc.primus.eva.rope.get_embed()[ctx[0]]
    tokens = enc.embed(x, ctx)
    for block in enc.primus.eva.blocks:
        tokens = block(tokens, rope=wrong_rope)
    wrong = enc.primus.eva.norm(tokens)
    assert torch.allclose(wrong[0], expected[0], atol=1e-5)
    assert not torch.allclose(wrong[1:], expected[1:], atol=1e-3)


def test_e8_permuting_the_context_permutes_the_outputs():
    enc = _encoder()
    x = torch.randn(3, 1, *SHAPE)
    ctx = _masks(enc.grid, 3).context
    perm = torch.stack([torch.randperm(ctx.shape[1], generator=torch.Generator().manual_seed(b)) for b in range(3)])
    out = enc(x, ctx)
    permuted = enc(x, torch.gather(ctx, 1, perm))
    assert torch.allclose(permuted, torch.gather(out, 1, perm.unsqueeze(-1).expand_as(out)), atol=1e-5)


# ---- E9, E10 ---------------------------------------------------------------------------------------

def _voxel_mask(token_mask: torch.Tensor, grid, patch=8) -> torch.Tensor:
    m = token_mask.view(grid)
    for axis in range(3):
        m = m.repeat_interleave(patch, axis)
    return m


def test_e9_voxels_outside_the_context_cannot_leak():
    enc = _encoder()
    predictor = JEPAPredictor(enc.grid, enc.embed_dim, width=48, depth=2, num_heads=2).eval()
    x = torch.randn(3, 1, *SHAPE)
    masks = _masks(enc.grid, 3)
    y = x.clone()
    for b in range(3):  # rewrite every voxel of every non-context token (targets included)
        keep = torch.zeros(enc.num_tokens, dtype=torch.bool)
        keep[masks.context[b]] = True
        outside = ~_voxel_mask(keep, enc.grid)
        y[b, 0][outside] = torch.randn(int(outside.sum())) * 10
    z, z2 = enc(x, masks.context), enc(y, masks.context)
    assert torch.equal(z, z2)
    assert torch.equal(predictor(z, masks.context, masks.targets), predictor(z2, masks.context, masks.targets))
    # while a change inside the context does reach the outputs
    y[:, 0][_voxel_mask(torch.zeros(enc.num_tokens, dtype=torch.bool).index_fill(0, masks.context[0][:1], True),
                        enc.grid).expand(3, -1, -1, -1)] += 5.0
    assert not torch.equal(enc(y, masks.context)[0], z[0])


def test_e10_teacher_sees_context_voxels_at_target_tokens():
    enc = _encoder()
    x = torch.randn(2, 1, *SHAPE)
    masks = _masks(enc.grid, 2)
    one_context_token = torch.zeros(enc.num_tokens, dtype=torch.bool)
    one_context_token[masks.context[0, 0]] = True
    y = x.clone()
    y[0, 0][_voxel_mask(one_context_token, enc.grid)] += 3.0
    with torch.no_grad():
        before, after = enc(x), enc(y)                     # the teacher's view: all tokens
    targets = masks.targets[:, 0].flatten()
    assert (after[0, targets] - before[0, targets]).abs().amax() > 1e-3
    assert torch.equal(after[1], before[1])               # and only in that volume


# ---- layout, training plumbing, export ------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_values_and_gradients():
    enc = _encoder()
    x = torch.randn(2, 1, *SHAPE)
    ctx = _masks(enc.grid, 2).context
    enc.train()
    enc(x, ctx).square().mean().backward()
    plain = [p.grad.clone() for p in enc.parameters() if p.grad is not None]
    enc.zero_grad()
    enc.primus.eva.set_grad_checkpointing(True)
    enc(x, ctx).square().mean().backward()
    checkpointed = [p.grad for p in enc.parameters() if p.grad is not None]
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_decoder_is_frozen_and_outside_the_encoder_parameters():
    enc = _encoder()
    names = [n for n, _ in enc.encoder_named_parameters()]
    assert names and all(n.startswith(("eva.", "down_projection.")) for n in names)
    assert all(not p.requires_grad for p in enc.primus.up_projection.parameters())
    assert all(p.requires_grad for _, p in enc.encoder_named_parameters())


def test_encoder_state_dict_loads_into_a_fresh_primus_like_nnunet_does():
    enc = _encoder()
    weights = enc.encoder_state_dict()
    assert weights and all(k.startswith(("eva.", "down_projection.")) for k in weights)
    assert not any("up_projection" in k or "mask_token" in k for k in weights)
    assert all(v.device.type == "cpu" and v.is_contiguous() and not v.requires_grad for v in weights.values())
    weights["eva.pos_embed"].add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(weights["eva.pos_embed"], enc.primus.eva.pos_embed)
    weights = enc.encoder_state_dict()
    fresh = build_primus("Tiny", input_shape=SHAPE)
    # nnU-Net: select by prefix without a dot, strip it, load strictly
    for key in (fresh.key_to_encoder, fresh.key_to_stem):
        part = {k[len(key) + 1:]: v for k, v in weights.items() if k.startswith(key)}
        getattr(fresh, key).load_state_dict(part, strict=True)
    x = torch.randn(1, 1, *SHAPE)
    assert torch.allclose(PrimusTokenEncoder(fresh).eval()(x), enc(x), atol=1e-6)
