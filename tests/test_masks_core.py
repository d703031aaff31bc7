"""Spec tests M1-M12 for the 3D multi-block mask sampler (tiny grids, bounded runtime)."""

from __future__ import annotations

import math

import pytest
import torch

from nnssl.methods.masks import MaskConfig, MultiBlockMaskSampler, flatten_coords, unflatten_index

GRID = (8, 8, 8)


def _is_box(indices: torch.Tensor, shape, grid) -> bool:
    coords = unflatten_index(indices, grid)
    lo, hi = coords.min(0).values, coords.max(0).values
    return tuple((hi - lo + 1).tolist()) == tuple(shape) and len(indices) == math.prod(shape)


def test_m1_m2_shapes_types_sorted_unique():
    batch = MultiBlockMaskSampler(GRID)(batch_size=5, step=3)
    n = math.prod(GRID)
    assert batch.context.dtype == torch.int64 and batch.targets.dtype == torch.int64
    assert batch.context.shape[0] == 5 and batch.targets.shape[:2] == (4, 5)
    for row in [*batch.context, *batch.targets.reshape(-1, batch.targets.shape[-1])]:
        assert torch.all(row[1:] > row[:-1])  # sorted, no duplicates
        assert 0 <= int(row.min()) and int(row.max()) < n


@pytest.mark.parametrize("config", [
    MaskConfig(),
    MaskConfig(num_targets=6, target_scale=(0.3, 0.4), min_keep=4),  # stress: exercises redraws
])
def test_m3_context_never_overlaps_targets(config):
    sampler = MultiBlockMaskSampler(GRID, config, seed=1)
    for step in range(150):
        batch = sampler(batch_size=4, step=step)
        for b in range(4):
            ctx = batch.context[b]
            for m in range(config.num_targets):
                assert not torch.isin(ctx, batch.targets[m, b]).any()


def test_m4_m5_targets_are_boxes_of_one_shared_shape():
    sampler = MultiBlockMaskSampler((6, 8, 10), seed=2)
    shapes = set()
    for step in range(30):
        batch = sampler(batch_size=3, step=step)
        shapes.add(batch.target_shape)
        for m in range(4):
            for b in range(3):
                assert _is_box(batch.targets[m, b], batch.target_shape, (6, 8, 10))
    assert len(shapes) > 3  # sizes vary across steps


def test_m5_sizes_agree_across_ranks_and_workers_positions_differ():
    sampler = MultiBlockMaskSampler(GRID, seed=3)
    a, b = sampler(4, step=7, rank=0), sampler(4, step=7, rank=1, stream=2)
    assert a.target_shape == b.target_shape and a.context_shape == b.context_shape
    assert not torch.equal(a.targets, b.targets)
    again = MultiBlockMaskSampler(GRID, seed=3)(4, step=7, rank=0)
    assert torch.equal(a.context, again.context) and torch.equal(a.targets, again.targets)


def test_m6_statistics_on_20_cubed():
    sampler = MultiBlockMaskSampler((20, 20, 20), seed=4)
    fractions, ratios = [], []
    for step in range(400):
        shape, _ = sampler.block_shapes(step)
        fractions.append(math.prod(shape) / 8000)
        ratios += [shape[0] / shape[2], shape[1] / shape[2]]
    mean = sum(fractions) / len(fractions)
    assert 0.15 - 0.01 <= mean <= 0.20 + 0.01, mean
    # every side ratio inside [0.75, 1.5] up to one-voxel rounding (sides ~11 here)
    assert min(ratios) >= 0.75 * 10 / 11 - 1e-9 and max(ratios) <= 1.5 * 11 / 10 + 1e-9


def test_m7_every_token_is_sometimes_target_and_context():
    grid = (5, 6, 7)
    sampler = MultiBlockMaskSampler(grid, MaskConfig(min_keep=4), seed=5)
    seen_t = torch.zeros(math.prod(grid), dtype=torch.bool)
    seen_c = torch.zeros_like(seen_t)
    for step in range(400):
        batch = sampler(8, step)
        seen_t[batch.targets.flatten()] = True
        seen_c[batch.context.flatten()] = True
    assert seen_t.all() and seen_c.all()  # incl. the last slab on every axis (fixes Q2/Q3)


def test_m8_min_keep():
    config = MaskConfig(min_keep=30)
    sampler = MultiBlockMaskSampler(GRID, config, seed=6)
    for step in range(50):
        assert sampler(4, step).context.shape[1] >= config.min_keep + 1


def test_m9_random_trim_is_subset_and_unbiased():
    grid = (10, 10, 10)
    sampler = MultiBlockMaskSampler(grid, seed=7)
    drift = []
    for step in range(40):
        untrimmed, *_ = sampler.sample_untrimmed(8, step)
        batch = sampler(8, step)
        for b in range(8):
            assert torch.isin(batch.context[b], untrimmed[b]).all()
            kept = unflatten_index(batch.context[b], grid).float().mean(0)
            full = unflatten_index(untrimmed[b], grid).float().mean(0)
            drift.append(kept - full)
    bias = torch.stack(drift).mean(0).abs()
    assert float(bias.max()) < 0.15, bias  # raster trimming (Q5) shifts axis 0 by whole slabs
    quirky = MultiBlockMaskSampler(grid, MaskConfig(reference_quirks=True), seed=7)
    untrimmed, *_ = quirky.sample_untrimmed(8, 0)
    raster = quirky(8, 0)
    assert all(torch.equal(raster.context[b], untrimmed[b][: raster.context.shape[1]]) for b in range(8))


def test_m10_reference_quirks_reproduce_the_paper_context_ratio():
    sampler = MultiBlockMaskSampler((14, 14), MaskConfig(reference_quirks=True), seed=8)
    ratio = sum(sampler(128, step).context.shape[1] / 196 for step in range(15)) / 15
    assert abs(ratio - 0.25) <= 0.03, ratio


def test_m11_flatten_order_is_c_order():
    grid = (3, 4, 5)
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    flat = flatten_coords(coords, grid)
    assert torch.equal(flat, torch.arange(60))  # (i*Gy + j)*Gz + k, Primus's (w h d)
    assert torch.equal(unflatten_index(flat, grid), coords)


def test_m12_resume_reproduces_sizes_and_positions():
    a = MultiBlockMaskSampler(GRID, seed=9)
    uninterrupted = [a(4, step) for step in range(10)]
    resumed = MultiBlockMaskSampler(GRID, seed=9)  # a fresh process resuming at step 6
    for step in range(6, 10):
        x, y = uninterrupted[step], resumed(4, step)
        assert x.target_shape == y.target_shape
        assert torch.equal(x.context, y.context) and torch.equal(x.targets, y.targets)


def test_invalid_configuration_lists_problems():
    with pytest.raises(ValueError, match="target_scale.*num_targets"):
        MaskConfig(target_scale=(0.5, 0.1), num_targets=0)
