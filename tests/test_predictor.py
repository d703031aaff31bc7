"""JEPA predictor and its 3D sin-cos positions (documentation/ijepa_method.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnssl.errors import NnsslError
from nnssl.methods.ijepa import ijepa_loss
from nnssl.methods.masks import MaskConfig, MultiBlockMaskSampler, unflatten_index
from nnssl.models.predictor import InvalidPredictorConfig, JEPAPredictor, sincos_pos_embed_3d

GRID = (4, 5, 6)
E = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: threads only add noise


def _predictor(depth: int = 2, seed: int = 0) -> JEPAPredictor:
    torch.manual_seed(seed)
    return JEPAPredictor(GRID, E, width=48, depth=depth, num_heads=4).eval()


def _masks(batch: int, step: int = 0, grid=GRID):
    return MultiBlockMaskSampler(grid, MaskConfig(min_keep=4), seed=5)(batch, step)


def test_p1_output_rows_are_block_major_and_match_single_sequence_runs():
    pred = _predictor()
    masks = _masks(3)
    m, b, kt = masks.targets.shape
    context = torch.randn(b, masks.context.shape[1], E)
    out = pred(context, masks.context, masks.targets)
    assert out.shape == (m * b, kt, E)
    for block in range(m):
        for sample in range(b):  # one sequence [context of b ; queries of block m of b], alone
            alone = pred(context[sample:sample + 1], masks.context[sample:sample + 1],
                         masks.targets[block:block + 1, sample:sample + 1])
            assert torch.allclose(out[block * b + sample], alone[0], atol=1e-5)


def test_p2_changing_one_block_leaves_the_other_blocks_unchanged():
    pred = _predictor()
    masks = _masks(2)
    m, b, _ = masks.targets.shape
    assert m >= 3
    context = torch.randn(b, masks.context.shape[1], E)
    out = pred(context, masks.context, masks.targets)
    changed = masks.targets.clone()
    changed[1] = masks.targets[2]
    out2 = pred(context, masks.context, changed)
    for block in range(m):
        rows = slice(block * b, (block + 1) * b)
        if block == 1:
            assert torch.allclose(out2[rows], out[2 * b:3 * b], atol=1e-5)
            assert not torch.allclose(out2[rows], out[rows], atol=1e-4)
        else:
            assert torch.equal(out2[rows], out[rows])


def test_p3_predictor_learns_a_fixed_function_of_target_position():
    """A teacher stand-in whose target at token n is a random projection of a (different) sin-cos
    code of n: only correctly aligned query positions can fit it. Contexts are noise."""
    torch.manual_seed(0)
    code = sincos_pos_embed_3d(GRID, 24) @ (torch.randn(24, E) / math.sqrt(24))
    target_of = F.layer_norm(code, (E,))
    pred = JEPAPredictor(GRID, E, width=64, depth=2, num_heads=4)
    sampler = MultiBlockMaskSampler(GRID, MaskConfig(min_keep=4), seed=0)
    opt = torch.optim.AdamW(pred.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(150):  # measured: 0.42 at step 0, 3.6e-4 at step 100
        masks = sampler(4, step)
        out = pred(torch.randn(4, masks.context.shape[1], E), masks.context, masks.targets)
        loss = ijepa_loss(out, target_of[masks.targets.reshape(-1, masks.targets.shape[-1])])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.1
    assert max(losses[-10:]) < 1e-3, losses[-10:]


def test_p4_position_axes_are_consistent_on_a_non_cubic_grid():
    grid, dim = (4, 6, 10), 48
    pe = sincos_pos_embed_3d(grid, dim)
    assert pe.shape == (240, 48) and pe.dtype == torch.float32
    coords = unflatten_index(torch.arange(240), grid)
    per_axis = 16  # 2 * ceil(48 / 6)
    for axis in range(3):
        block = pe[:, axis * per_axis:(axis + 1) * per_axis]
        for value in range(grid[axis]):
            rows = block[coords[:, axis] == value]
            assert torch.equal(rows, rows[:1].expand_as(rows))
        assert len({tuple(r.tolist()) for r in block}) == grid[axis]


def test_p4_sincos_follows_vjepa_uniform_power_formula():
    grid, dim = (3, 4, 5), 64          # 2 * ceil(64 / 6) = 22 per axis, 66 truncated to 64
    pe = sincos_pos_embed_3d(grid, dim).double()
    coords = unflatten_index(torch.arange(60), grid).double()
    d = 22
    omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
    expected = torch.cat([torch.cat([(coords[:, a:a + 1] * omega).sin(), (coords[:, a:a + 1] * omega).cos()], 1)
                          for a in range(3)], 1)[:, :dim]
    assert torch.allclose(pe, expected, atol=1e-6)
    assert sincos_pos_embed_3d((20, 20, 20), 384).shape == (8000, 384)


def test_p5_one_shared_mask_token_receives_gradient():
    pred = _predictor()
    masks = _masks(2)
    out = pred(torch.randn(2, masks.context.shape[1], E), masks.context, masks.targets)
    out.square().mean().backward()
    tokens = [(n, p) for n, p in pred.named_parameters() if "mask" in n]
    assert [n for n, _ in tokens] == ["mask_token"] and tokens[0][1].shape == (1, 1, 48)
    assert pred.mask_token.grad is not None and pred.mask_token.grad.abs().sum() > 0
    assert "pos_embed" not in dict(pred.named_parameters()) and "pos_embed" not in pred.state_dict()


def test_last_block_computing_only_the_queries_equals_the_full_block():
    """The last block skips the context tokens' outputs (never read): same values and gradients
    as running the full block and slicing the queries."""
    pred = _predictor(depth=2).train()
    masks = _masks(3)
    m, b, kt = masks.targets.shape
    context = torch.randn(b, masks.context.shape[1], E, requires_grad=True)

    def full(ctx):  # the unpruned reference: every block on every token, then slice
        x = pred.embed(ctx) + F.embedding(masks.context, pred.pos_embed)
        q = F.embedding(masks.targets.reshape(m * b, kt), pred.pos_embed) + pred.mask_token
        x = torch.cat([x.repeat(m, 1, 1), q], dim=1)
        for block in pred.blocks:
            x = block(x)
        return pred.head(pred.norm(x[:, -kt:]))

    fast = pred(context, masks.context, masks.targets)
    slow = full(context)
    assert torch.allclose(fast, slow, atol=1e-5)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), [context, *pred.parameters()])
    grads_slow = torch.autograd.grad((slow * weights).sum(), [context, *pred.parameters()])
    for g_fast, g_slow in zip(grads_fast, grads_slow):
        assert torch.allclose(g_fast, g_slow, atol=1e-5)


def test_init_is_ijepa_effective_init():
    torch.manual_seed(0)
    pred = JEPAPredictor((8, 8, 8), 256, width=384, depth=2, num_heads=12)
    linears = [m for m in pred.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 + 2 * 4
    for lin in linears:
        # trunc_normal_(std=0.02) cuts at +-2 absolute (I-JEPA / timm semantics): in effect N(0, 0.02)
        assert abs(lin.weight.std().item() - 0.02) < 0.0015 and abs(lin.weight.mean().item()) < 0.002
        assert torch.count_nonzero(lin.bias) == 0
    norms = [m for m in pred.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.all(n.weight == 1) and torch.all(n.bias == 0) and n.eps == 1e-6 for n in norms)
    assert 0.015 < pred.mask_token.std().item() < 0.025


def test_depth_zero_ignores_the_context():
    pred = _predictor(depth=0)
    masks = _masks(2)
    a = pred(torch.randn(2, masks.context.shape[1], E), masks.context, masks.targets)
    b = pred(torch.randn(2, masks.context.shape[1], E), masks.context, masks.targets)
    assert torch.equal(a, b)


def test_bad_sizes_and_shapes_are_reported():
    with pytest.raises(InvalidPredictorConfig, match="divisible"):
        JEPAPredictor(GRID, E, width=50, num_heads=4)
    with pytest.raises(NnsslError, match="depth"):
        JEPAPredictor(GRID, E, width=48, depth=-1, num_heads=4)
    pred = _predictor()
    masks = _masks(2)
    with pytest.raises(NnsslError, match=r"\[M, B, Kt\]"):
        pred(torch.randn(2, masks.context.shape[1], E), masks.context, masks.targets[0])


def test_attention_radius_covering_the_grid_is_full_attention_and_radius_one_is_local():
    """`predictor_attention_radius`: a radius spanning the grid changes nothing; radius 1 with one
    block makes a query's prediction independent of context tokens more than one cell away."""
    masks = _masks(2)
    context = torch.randn(2, masks.context.shape[1], E)
    full = _predictor(depth=1)
    wide = JEPAPredictor(GRID, E, width=48, depth=1, num_heads=4, attention_radius=max(GRID)).eval()
    local = JEPAPredictor(GRID, E, width=48, depth=1, num_heads=4, attention_radius=1).eval()
    wide.load_state_dict(full.state_dict())
    local.load_state_dict(full.state_dict())
    assert torch.equal(wide(context, masks.context, masks.targets), full(context, masks.context, masks.targets))
    # perturb the context tokens far (> 1 cell on some axis) from every query of block 0, sample 0
    coords = unflatten_index(masks.context[0], GRID)
    queries = unflatten_index(masks.targets[0, 0], GRID)
    far = ((coords[:, None] - queries[None]).abs().amax(-1) > 1).all(1)
    assert far.any()
    moved = context.clone()
    moved[0, far] += 10 * torch.randn_like(moved[0, far])
    before, after = local(context, masks.context, masks.targets), local(moved, masks.context, masks.targets)
    assert torch.allclose(before[0], after[0], atol=1e-6)          # row 0 = block 0 of sample 0
    assert not torch.allclose(full(context, masks.context, masks.targets)[0],
                              full(moved, masks.context, masks.targets)[0], atol=1e-3)
