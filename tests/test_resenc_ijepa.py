"""I-JEPA on ResEnc-L (documentation/ijepa_resenc.md, option A): the sparse student's zeros C1, masked
InstanceNorm C2, no leakage C3/E9 (and E10), mask upsampling C4, dense teacher C5, the nnU-Net
weight handshake for the real ResEnc-L, the frozen decoder, and a full training step (E1, E3).

Tiny preset (ResEnc-L's 6-stage, stride-32 layout with few channels): 64³ input -> 2³ cells,
96³ -> 3³ cells."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import _AvgPoolNd

from nnssl.errors import InvalidInput
from nnssl.methods.factory import build_method
from nnssl.methods.ijepa import IJEPA
from nnssl.methods.masks import unflatten_index
from nnssl.models.resenc import build_resenc_l, resenc_l_arch_kwargs
from nnssl.models.sparse_resenc import (
    InvalidResEncEncoder,
    ResEncTokenEncoder,
    cell_mask,
    masked_instance_norm,
    upsample_cell_mask,
)
from nnssl.training.names import UnknownTrainer, resolve_config

PATCH = (64, 64, 64)  # 2³ cells
KEEP = torch.tensor([[0, 2, 3], [1, 4, 6]])  # different per sample; no axis swap maps a row onto itself


pytestmark = pytest.mark.usefixtures("one_thread")


def _config():
    # small CPU ops: threads only add noise
    return resolve_config("IJEPATrainer_ResEncTiny_BS2", overrides={"patch_size": PATCH})


def _randomise_norms(network: nn.Module) -> None:
    """InstanceNorm starts at weight 1 / bias 0; non-trivial affines make every check bite."""
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, _InstanceNorm) and m.affine:
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


def _encoder(patch=PATCH, seed: int = 0) -> ResEncTokenEncoder:
    torch.manual_seed(seed)
    network = build_resenc_l(preset="Tiny")
    _randomise_norms(network)
    return ResEncTokenEncoder(network, patch)


def _volumes(batch: int = 2, patch=PATCH, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 1, *patch)


def _expected_active(keep: torch.Tensor, grid, shape) -> torch.Tensor:
    """Bool [B, 1, *shape]: the cubes of the kept cells, written out with plain slicing (an
    implementation independent of `upsample_cell_mask`)."""
    _, gy, gz = grid
    f = [s // g for s, g in zip(shape, grid)]
    out = torch.zeros(keep.shape[0], 1, *shape, dtype=torch.bool)
    for b, row in enumerate(keep.tolist()):
        for n in row:
            i, j, k = n // (gy * gz), (n // gz) % gy, n % gz
            out[b, 0, i * f[0]:(i + 1) * f[0], j * f[1]:(j + 1) * f[1], k * f[2]:(k + 1) * f[2]] = True
    return out


def _sparse_state(module: nn.Module) -> int:
    """Hooks and replaced forwards left on any submodule (0 when nothing is left behind)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in vars(m)) for m in module.modules())


def _record_outputs(encoder: ResEncTokenEncoder, types) -> tuple[list, list]:
    records, handles = [], []
    for name, module in encoder.network.encoder.named_modules():
        if isinstance(module, types):
            handles.append(module.register_forward_hook(
                # clone: the in-place LeakyReLU after a norm overwrites its output
                lambda mod, inp, out, name=name: records.append((name, inp[0].detach().clone(), out.detach().clone()))))
    return records, handles


# ---- C4: the cell grid and its masks ---------------------------------------------------------------

@pytest.mark.parametrize("patch", [(64, 64, 64), (96, 96, 96), (64, 96, 32)])
def test_c4_each_cell_is_its_exact_cube_at_the_input_and_every_stage(patch):
    grid = tuple(p // 32 for p in patch)
    n_cells = math.prod(grid)
    coords = unflatten_index(torch.arange(n_cells), grid)  # the mask sampler's convention
    for n in range(n_cells):
        cells = cell_mask(torch.tensor([[n]]), grid)
        assert cells.sum() == 1 and cells[(0, 0, *coords[n].tolist())] == 1
        for k in range(6):  # the input / stem (k = 0) and the stride 2^k stages
            side = 32 // 2 ** k
            shape = tuple(p // 2 ** k for p in patch)
            up = upsample_cell_mask(cells, shape)
            assert up.shape == (1, 1, *shape)
            lo = [int(c) * side for c in coords[n]]
            cube = up[0, 0, lo[0]:lo[0] + side, lo[1]:lo[1] + side, lo[2]:lo[2] + side]
            assert bool((cube == 1).all()) and up.sum() == side ** 3, (n, k)
    keep = torch.tensor([[0, n_cells - 1], [n_cells // 2, 1]])
    shape = tuple(p // 4 for p in patch)
    assert torch.equal(upsample_cell_mask(cell_mask(keep, grid), shape).bool(), _expected_active(keep, grid, shape))


def test_cell_grid_is_the_bottleneck_grid():
    net = build_resenc_l(preset="Tiny")
    assert ResEncTokenEncoder(net, (160, 160, 160)).grid == (5, 5, 5)  # nnssl's default crop
    assert ResEncTokenEncoder(net, (192, 192, 192)).num_tokens == 216
    enc = ResEncTokenEncoder(net, (64, 96, 32))
    assert enc.grid == (2, 3, 1) and enc.embed_dim == 64 and enc.num_heads == 8
    # the grid is the stock encoder's bottleneck map, flattened in C-order
    with torch.no_grad():
        assert tuple(enc.bottleneck(torch.zeros(1, 1, 64, 96, 32)).shape[2:]) == (2, 3, 1)
    with pytest.raises(InvalidInput, match="multiple of the encoder's total stride"):
        upsample_cell_mask(cell_mask(torch.tensor([[0]]), (2, 2, 2)), (5, 8, 8))


# ---- C1: exact zeros --------------------------------------------------------------------------------

def test_c1_exact_zeros_at_inactive_voxels_after_every_conv_norm_pool_and_block():
    enc = _encoder()
    x = _volumes()
    types = (_ConvNd, _InstanceNorm, _AvgPoolNd, BasicBlockD, StackedResidualBlocks)
    expected_count = sum(isinstance(m, types) for m in enc.network.encoder.modules())
    records, handles = _record_outputs(enc, types)
    with torch.no_grad():
        tokens = enc(x, KEEP)
        sparse = list(records)
        records.clear()
        enc(x)
        dense = list(records)
    for h in handles:
        h.remove()
    assert tokens.shape == (2, 3, 64)
    assert len(sparse) == expected_count > 20  # every module was seen, once
    for name, _, out in sparse:
        active = _expected_active(KEEP, enc.grid, tuple(out.shape[2:]))
        assert torch.count_nonzero(out.masked_fill(active, 0)) == 0, f"{name}: non-zero at an inactive voxel"
        inside = out.masked_select(active.expand_as(out))
        assert torch.count_nonzero(inside) > 0.9 * inside.numel(), f"{name}: the active region is (mostly) zero"
    # the dense teacher path is untouched: its convs do fill the same voxels
    leaks = [name for name, _, out in dense
             if torch.count_nonzero(out.masked_fill(_expected_active(KEEP, enc.grid, tuple(out.shape[2:])), 0))]
    assert len(leaks) == len(dense)


# ---- C2: masked InstanceNorm ------------------------------------------------------------------------

def _manual_masked_norm(x: torch.Tensor, active: torch.Tensor, norm: _InstanceNorm) -> torch.Tensor:
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        sel = active[b, 0].bool()
        for c in range(x.shape[1]):
            v = x[b, c][sel]
            mean, var = v.mean(), v.var(unbiased=False)
            y = (v - mean) / torch.sqrt(var + norm.eps)
            if norm.affine:
                y = y * norm.weight[c] + norm.bias[c]
            out[b, c][sel] = y
    return out


@pytest.mark.parametrize("affine", [True, False])
def test_c2_masked_instance_norm_matches_a_manual_computation(affine):
    torch.manual_seed(0)
    norm = nn.InstanceNorm3d(4, affine=affine).double()
    _randomise_norms(norm)
    x = (torch.randn(2, 4, 6, 5, 4, dtype=torch.float64) * 3 + 2).requires_grad_()  # arbitrary, not a cube
    active = (torch.rand(2, 1, 6, 5, 4) > 0.6).double()
    y = masked_instance_norm(x, active, norm)
    assert torch.allclose(y, _manual_masked_norm(x.detach(), active, norm), atol=1e-12)
    assert torch.count_nonzero(y.detach() * (1 - active)) == 0
    # autograd through the in-place steps agrees with the straightforward formula
    g = torch.randn_like(y)
    ref = _manual_masked_norm(x, active, norm)
    assert torch.allclose(torch.autograd.grad((y * g).sum(), x)[0], torch.autograd.grad((ref * g).sum(), x)[0],
                          atol=1e-10)
    # with everything active it is the stock InstanceNorm
    full = torch.ones(2, 1, 6, 5, 4, dtype=torch.float64)
    assert torch.allclose(masked_instance_norm(x, full, norm), norm(x), atol=1e-12)


def test_c2_the_networks_norms_use_active_voxel_statistics():
    enc = _encoder()
    records, handles = _record_outputs(enc, (_InstanceNorm,))
    with torch.no_grad():
        enc(_volumes(), KEEP)
    for h in handles:
        h.remove()
    assert len(records) == sum(isinstance(m, _InstanceNorm) for m in enc.network.encoder.modules())
    norms = dict(enc.network.encoder.named_modules())
    for name, inp, out in (records[0], records[len(records) // 2], records[-1]):  # stem, middle, bottleneck
        norm = norms[name]
        active = _expected_active(KEEP, enc.grid, tuple(inp.shape[2:]))
        manual = _manual_masked_norm(inp, active, norm)
        assert torch.allclose(out, manual, atol=1e-5, rtol=1e-5), name
        # and that is not what the stock norm computes over the zero-filled map
        active_vals = active.expand_as(out)
        assert (norm(inp) - manual)[active_vals].abs().max() > 1e-2, name


# ---- C3 / E9 / E10: no leakage ----------------------------------------------------------------------

def test_c3_voxels_outside_the_context_cells_never_reach_the_student():
    enc = _encoder(patch=(96, 96, 96))  # 3³ cells: a kept cell can have masked cells on every side
    keep = torch.tensor([[4, 13, 14, 22]])  # the centre cell (13) and some of its neighbours
    x = _volumes(batch=1, patch=(96, 96, 96))
    active = _expected_active(keep, enc.grid, (96, 96, 96))
    torch.manual_seed(5)
    with torch.no_grad():
        z = enc(x, keep)
        z_outside = enc(torch.where(active, x, x + 10 * torch.randn_like(x)), keep)
        x_inside = x.clone()
        x_inside[0, 0, 32:36, 32:36, 32:36] += 1.0  # a corner of the centre cell
        z_inside = enc(x_inside, keep)
    assert torch.equal(z, z_outside)  # exact: nothing of the masked input survives
    assert (z_inside - z).abs().max() > 1e-4  # control: the kept cells are really read


def test_e9_e10_through_the_method_predictions_ignore_the_targets_the_teacher_sees_them():
    torch.manual_seed(0)
    method = build_method(_config()).eval()
    _randomise_norms(method.student.network)
    masks = method.mask_sampler(2, step=3)
    x = _volumes()
    torch.manual_seed(5)
    targets_only = torch.zeros_like(x, dtype=torch.bool)
    for block in masks.targets:  # perturb the voxels of every target box (all outside the context)
        targets_only |= _expected_active(block, method.student.grid, PATCH)
    assert not (targets_only & _expected_active(masks.context, method.student.grid, PATCH)).any()
    with torch.no_grad():
        a = method(x, masks)
        b = method(torch.where(targets_only, x + 10 * torch.randn_like(x), x), masks)
    assert torch.equal(a.predictions, b.predictions)
    assert (a.targets - b.targets).abs().max() > 1e-3  # E10: the teacher sees the whole volume


# ---- C5: the dense teacher --------------------------------------------------------------------------

def test_c5_dense_teacher_is_the_stock_encoder_and_no_sparse_state_is_left_behind():
    torch.manual_seed(0)
    method = build_method(_config())
    with torch.no_grad():
        for _, p in method.teacher.encoder_named_parameters():  # the teacher must differ from the student
            p.add_(torch.randn_like(p) * 0.05)
    x = _volumes(batch=1)
    method.student(x, KEEP[:1]).sum().backward()  # a sparse call first: it must leave nothing behind
    assert _sparse_state(method) == 0
    stock = build_resenc_l(preset="Tiny")
    stock.load_state_dict(method.teacher.network.state_dict())
    with torch.no_grad():
        expected = stock.encoder(x)[-1].flatten(2).transpose(1, 2)
        assert torch.equal(method.teacher(x), expected)
        assert torch.equal(method.teacher_tokens(x), F.layer_norm(expected, (expected.shape[-1],)))
        # a deep copy of the student made after sparse calls is stock as well
        student_copy = copy.deepcopy(method.student)
        stock.load_state_dict(method.student.network.state_dict())
        assert torch.equal(student_copy(x), stock.encoder(x)[-1].flatten(2).transpose(1, 2))


def test_sparse_state_is_removed_after_an_error_inside_the_forward():
    enc = _encoder()

    def fail(module, inputs, output):
        raise RuntimeError("boom")

    handle = enc.network.encoder.stages[3].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        enc(_volumes(), KEEP)
    handle.remove()
    assert _sparse_state(enc) == 0


def test_sparse_with_every_cell_kept_matches_the_dense_encoder():
    enc = _encoder()
    x = _volumes()
    every = torch.arange(enc.num_tokens).repeat(2, 1)
    with torch.no_grad():
        dense, sparse = enc(x), enc(x, every)
    assert dense.shape == (2, 8, 64)
    assert torch.allclose(sparse, dense, atol=1e-4 * dense.abs().max().item())
    with torch.no_grad():  # and the kept tokens come back in the order of `keep`
        assert torch.equal(enc(x, every.flip(1)), sparse.flip(1))


# ---- export, decoder, training step ------------------------------------------------------------------

def _load_like_nnunet(network: ResidualEncoderUNet, weights: dict) -> None:
    """nnU-Net's pretrained-weight loader: select by prefix (no dot), strip it, strict load."""
    for prefix in (network.key_to_encoder, network.key_to_stem):
        selected = {k[len(prefix):].lstrip("."): v for k, v in weights.items() if k.startswith(prefix)}
        network.get_submodule(prefix).load_state_dict(selected, strict=True)


def test_resenc_l_export_loads_strictly_into_nnunets_network():
    torch.manual_seed(0)
    source = build_resenc_l(preset="L")
    enc = ResEncTokenEncoder(source, (160, 160, 160))
    weights = enc.encoder_state_dict()
    prefixes = (source.key_to_encoder, source.key_to_stem)
    assert all(k.startswith(tuple(p + "." for p in prefixes)) for k in weights)
    assert set(weights) == {k for k in source.state_dict() if k.startswith(prefixes)}
    assert not any(k.startswith("decoder") for k in weights)
    assert all(v.device.type == "cpu" and v.is_contiguous() for v in weights.values())
    target = build_resenc_l(preset="L")
    _load_like_nnunet(target, weights)
    loaded = target.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.encoder.state_dict().items())
    # copies, not views of the live parameters
    with torch.no_grad():
        source.encoder.stem.convs[0].conv.weight.add_(1.0)
    assert not torch.equal(weights["encoder.stem.convs.0.conv.weight"], source.encoder.stem.convs[0].conv.weight)


def test_decoder_is_frozen_and_not_an_encoder_parameter():
    enc = _encoder()
    named = enc.encoder_named_parameters()
    assert named and all(n.startswith(("encoder.stem.", "encoder.stages.")) for n, _ in named)
    assert {id(p) for _, p in named} == {id(p) for p in enc.network.encoder.parameters()}
    assert all(p.requires_grad for _, p in named)
    encoder_ids = {id(p) for _, p in named}
    decoder_only = [p for p in enc.network.parameters() if id(p) not in encoder_ids]
    assert decoder_only and not any(p.requires_grad for p in decoder_only)


def test_training_step_on_resenc_tiny_end_to_end():
    method = build_method(_config())
    assert isinstance(method, IJEPA) and method.mask_sampler.grid == (2, 2, 2)
    method.train()
    x = _volumes()
    out = method.training_output(x, torch.zeros_like(x, dtype=torch.bool), step=0)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert out.monitor_tokens.shape == (2, 8, 64) and not out.monitor_tokens.requires_grad
    out.loss.backward()
    # E1: no gradient reaches the teacher; it is frozen and in no optimiser group
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    groups = method.parameter_groups(0.04)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not in_groups & {id(p) for p in method.teacher.parameters()}
    # the student encoder and the predictor get gradients, the frozen decoder does not
    student = method.student.encoder_named_parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in student)
    assert all(p.grad.abs().sum() > 0 for n, p in student if n.endswith("conv.weight"))
    assert all(p.grad is not None for p in method.predictor.parameters())
    assert in_groups == {id(p) for _, p in student} | {id(p) for p in method.predictor.parameters()}
    encoder_ids = {id(p) for _, p in student}
    assert all(p.grad is None for p in method.student.network.parameters() if id(p) not in encoder_ids)
    # one optimiser step, then the EMA (E3)
    old_teacher = {n: p.detach().clone() for n, p in method.teacher.encoder_named_parameters()}
    torch.optim.AdamW(groups, lr=1e-3).step()
    method.after_optimizer_step(step=0, momentum=0.9)
    new_student = dict(method.student.encoder_named_parameters())
    for n, p in method.teacher.encoder_named_parameters():
        assert torch.allclose(p, 0.9 * old_teacher[n] + 0.1 * new_student[n], atol=1e-6), n
    assert any(not torch.equal(p, old_teacher[n]) for n, p in method.teacher.encoder_named_parameters())
    # export = the teacher under downstream names; it loads into the network the plan describes
    # and computes the teacher's features there (X1)
    buffer = io.BytesIO()
    torch.save({"network_weights": method.export_encoder_state_dict()}, buffer)
    buffer.seek(0)
    weights = torch.load(buffer, weights_only=True)["network_weights"]  # as nnU-Net reads it
    downstream = method.backbone.build()
    assert isinstance(downstream, ResidualEncoderUNet)
    _load_like_nnunet(downstream, weights)
    with torch.no_grad():
        assert torch.equal(downstream.encoder(x)[-1].flatten(2).transpose(1, 2), method.teacher(x))


# ---- errors -----------------------------------------------------------------------------------------

def test_errors_name_the_problem_and_the_fix():
    net = build_resenc_l(preset="Tiny")
    with pytest.raises(InvalidInput, match="multiple of the encoder's total stride"):
        ResEncTokenEncoder(net, (48, 64, 64))
    enc = ResEncTokenEncoder(net, PATCH)
    with pytest.raises(InvalidInput, match=r"expects volumes \[B, 1, 64, 64, 64\]"):
        enc(torch.zeros(1, 1, 32, 64, 64))
    with pytest.raises(InvalidInput, match="int64"):
        enc(torch.zeros(1, 1, *PATCH), torch.tensor([[0, 1]], dtype=torch.int32))
    with pytest.raises(InvalidInput, match="ResidualEncoderUNet"):
        ResEncTokenEncoder(nn.Conv3d(1, 1, 3), PATCH)
    kwargs = resenc_l_arch_kwargs(preset="Tiny")
    with pytest.raises(InvalidResEncEncoder, match="track_running_stats=False"):
        ResEncTokenEncoder(ResidualEncoderUNet(**{**kwargs, "norm_op_kwargs": {"affine": True,
                                                                               "track_running_stats": True}}), PATCH)
    with pytest.raises(InvalidResEncEncoder, match="BatchNorm3d has no sparse"):
        ResEncTokenEncoder(ResidualEncoderUNet(**{**kwargs, "norm_op": nn.BatchNorm3d}), PATCH)
    with pytest.raises(UnknownTrainer, match="set it to 0"):
        resolve_config("IJEPATrainer_ResEncTiny", overrides={"model.drop_path_rate": 0.1})
