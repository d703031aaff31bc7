"""MAE baselines (methods/mae*.py): masks, loss region, what the encoder sees, gradients, AdamW
groups, export into nnU-Net's loader, overfitting one batch, bf16, and building from trainer names.

Small non-cubic shapes on purpose: a Primus token grid of (2, 3, 4) and a ResEnc block grid of
(4, 4, 2) catch swapped axes between the mask, the voxels and the network's token order."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

from downstream_nnunet import load_like_nnunet
from nnssl.errors import InvalidInput
from nnssl.methods.base import PretrainingMethod
from nnssl.methods.factory import build_method
from nnssl.methods.mae import InvalidMAEConfig, RandomMaskSampler, masked_mse
from nnssl.methods.mae_primus import PrimusMAE
from nnssl.methods.mae_unet import UNetMAE
from nnssl.models.registry import nnunet_architecture_plans
from nnssl.models.resenc import build_resenc_l
from nnssl.training.names import UnknownTrainer, resolve_config

PRIMUS_SHAPE = (16, 24, 32)   # 8³ tokens: grid (2, 3, 4), 24 tokens, 18 masked
RESENC_SHAPE = (64, 64, 32)   # 16³ blocks: grid (4, 4, 2), 32 blocks, 24 masked; bottleneck 2 x 2 x 1


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: threads only add noise


def _primus(seed: int = 0) -> PrimusMAE:
    torch.manual_seed(seed)
    return build_method(resolve_config("MAETrainer_Tiny", overrides={"patch_size": PRIMUS_SHAPE}))


def _resenc(seed: int = 0) -> UNetMAE:
    torch.manual_seed(seed)
    return build_method(resolve_config("MAETrainer_ResEncTiny", overrides={"patch_size": RESENC_SHAPE}))


def _volumes(shape, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, *shape, generator=torch.Generator().manual_seed(seed))


def _anonymized(shape, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(seed)) < 0.3


def _token_voxels(masks, grid, patch: int = 8) -> torch.Tensor:
    """bool [B, 1, X, Y, Z]: the voxels of the masked tokens, from the C-order token index."""
    out = torch.zeros(masks.masked.shape[0], 1, *(g * patch for g in grid), dtype=torch.bool)
    for b, tokens in enumerate(masks.masked.tolist()):
        for t in tokens:
            i, j, k = np.unravel_index(t, grid)
            out[b, 0, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch, k * patch:(k + 1) * patch] = True
    return out


# ---- masks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cells, ratio", [(24, 0.75), (32, 0.75), (1000, 0.75), (8000, 0.6), (10, 0.7)])
def test_mask_ratio_is_exact_and_keep_and_masked_partition_every_sample(cells, ratio):
    masks = RandomMaskSampler(ratio, seed=3)(4, cells, step=5)
    expected = int(np.floor(ratio * cells + 0.5))
    assert masks.masked.shape == (4, expected) and masks.keep.shape == (4, cells - expected)
    assert masks.masked.dtype == masks.keep.dtype == torch.int64
    assert masks.masked_fraction == expected / cells
    both = torch.cat([masks.keep, masks.masked], 1).sort(1).values
    assert torch.equal(both, torch.arange(cells).expand(4, -1))                 # disjoint, complete
    assert (masks.keep.diff(dim=1) > 0).all() and (masks.masked.diff(dim=1) > 0).all()  # sorted
    assert masks.masked_cells().sum(1).tolist() == [expected] * 4
    assert len({tuple(row) for row in masks.masked.tolist()}) == 4                # per-sample masks


def test_masks_are_a_pure_function_of_seed_step_stream_and_global_index_and_leave_the_global_rng_alone():
    sampler = RandomMaskSampler(0.75, seed=7)
    rng = torch.get_rng_state()
    reference = sampler(2, 1000, step=10, first_index=2, stream=0)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(sampler(2, 1000, step=10, first_index=2, stream=0).masked, reference.masked)
    assert torch.equal(RandomMaskSampler(0.75, seed=7)(2, 1000, 10, 2, 0).keep, reference.keep)
    for other in (sampler(2, 1000, step=11, first_index=2), sampler(2, 1000, step=10, first_index=0),
                  sampler(2, 1000, step=10, first_index=2, stream=1), RandomMaskSampler(0.75, seed=8)(2, 1000, 10, 2)):
        assert not torch.equal(other.masked, reference.masked)
    # rank 1 of 2 (local batch 2) draws the second half of a single process's batch of 4
    assert torch.equal(sampler(4, 1000, step=10).masked[2:], reference.masked)


def test_sampler_refuses_ratios_that_leave_no_visible_or_no_masked_cell():
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(InvalidMAEConfig, match="mask ratio"):
            RandomMaskSampler(ratio)
    with pytest.raises(InvalidMAEConfig, match="at least one visible") as info:
        RandomMaskSampler(0.95)(1, 8, step=0)
    assert isinstance(info.value, InvalidInput) and "patch size" in str(info.value)


# ---- loss --------------------------------------------------------------------------------------------

def test_masked_mse_is_the_mean_over_included_elements_in_fp32():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)
    include = torch.rand(2, 1, 4, 4, 4, generator=g) < 0.4
    full = include.expand_as(pred)
    expected = ((pred - target) ** 2)[full].mean()
    assert torch.allclose(masked_mse(pred, target, include), expected, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert masked_mse(pred.bfloat16(), target, include).dtype == torch.float32
    pred.requires_grad_(True)
    empty = masked_mse(pred, target, torch.zeros_like(include))  # everything masked was defaced
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))
    with pytest.raises(InvalidInput, match="differ in shape"):
        masked_mse(pred, target[:1], include)


def test_primus_loss_counts_exactly_the_masked_tokens_undefaced_voxels():
    method = _primus().eval()
    x, anon = _volumes(PRIMUS_SHAPE), _anonymized(PRIMUS_SHAPE)
    masks = method.sample_masks(2, step=3)
    out = method(x, anon, masks)
    # reference: loop over masked tokens, cut each 8³ patch out of the volume by its C-order index
    total, count = 0.0, 0
    for b, tokens in enumerate(masks.masked.tolist()):
        for j, t in enumerate(tokens):
            i, jj, k = np.unravel_index(t, method.encoder.grid)
            box = (slice(i * 8, i * 8 + 8), slice(jj * 8, jj * 8 + 8), slice(k * 8, k * 8 + 8))
            keep = ~anon[b, 0][box].reshape(-1)
            diff = (out.reconstruction[b, j].detach() - x[b][(slice(None), *box)].reshape(1, -1)) ** 2
            total += float(diff[:, keep].sum())
            count += int(keep.sum())
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)

    masked_voxels = _token_voxels(masks, method.encoder.grid)
    # end to end: voxels that are defaced inside masked tokens reach neither the encoder nor the loss
    noise = torch.randn_like(x) * 5
    assert torch.equal(method(torch.where(masked_voxels & anon, noise, x), anon, masks).loss, out.loss)
    # the loss alone: the target at visible tokens does not count
    recon = out.reconstruction.detach()
    unchanged = method.reconstruction_loss(recon, torch.where(~masked_voxels, noise, x), anon, masks.masked)
    assert torch.equal(unchanged, out.loss.detach())
    # ... but one undefaced voxel of a masked token does (so the two checks above could fail)
    hit = (masked_voxels & ~anon).nonzero()[0].tolist()
    moved = x.clone()
    moved[tuple(hit)] += 3.0
    assert method.reconstruction_loss(recon, moved, anon, masks.masked) != out.loss.detach()
    assert method(x, None, masks).loss != out.loss  # without defacing every masked voxel counts


def test_resenc_loss_counts_exactly_the_masked_blocks_undefaced_voxels():
    method = _resenc().eval()
    x, anon = _volumes(RESENC_SHAPE), _anonymized(RESENC_SHAPE)
    masks = method.sample_masks(tuple(x.shape), step=3)
    out = method(x, anon, masks)
    include = out.voxel_mask & ~anon
    recon = out.reconstruction.detach()
    assert out.loss.item() == pytest.approx(float(((recon - x) ** 2)[include].mean()), rel=1e-5)
    noise = torch.randn_like(x) * 5
    # end to end: defaced voxels inside masked blocks are zeroed in the input and excluded from the loss
    assert torch.equal(method(torch.where(out.voxel_mask & anon, noise, x), anon, masks).loss, out.loss)
    unchanged = method.reconstruction_loss(recon, torch.where(~out.voxel_mask, noise, x), anon, out.voxel_mask)
    assert torch.equal(unchanged, out.loss.detach())
    hit = include.nonzero()[0].tolist()
    moved = x.clone()
    moved[tuple(hit)] += 3.0
    assert method.reconstruction_loss(recon, moved, anon, out.voxel_mask) != out.loss.detach()


# ---- what the encoders see ------------------------------------------------------------------------------

def test_primus_encoder_sees_only_the_visible_tokens():
    method = _primus().eval()
    x = _volumes(PRIMUS_SHAPE)
    masks = method.sample_masks(2, step=1)
    out = method.training_output(x, None, step=1)
    assert out.monitor_tokens.shape == (2, masks.keep.shape[1], method.embed_dim)
    assert not out.monitor_tokens.requires_grad
    assert torch.equal(out.monitor_tokens, method.encoder(x, masks.keep).detach())
    masked_voxels = _token_voxels(masks, method.encoder.grid)
    perturbed = torch.where(masked_voxels, torch.randn_like(x) * 10, x)
    assert torch.equal(method.training_output(perturbed, None, step=1).monitor_tokens, out.monitor_tokens)
    visible_changed = torch.where(~masked_voxels, torch.randn_like(x), x)
    assert not torch.allclose(method.training_output(visible_changed, None, step=1).monitor_tokens,
                              out.monitor_tokens)


def test_resenc_masks_whole_blocks_and_the_network_sees_them_as_zeros():
    method = _resenc().eval()
    x = _volumes(RESENC_SHAPE)
    masks = method.sample_masks(tuple(x.shape), step=2)
    out = method(x, None, masks)
    grid = method.block_grid(RESENC_SHAPE)
    assert grid == (4, 4, 2) and out.voxel_mask.shape == (2, 1, *RESENC_SHAPE)
    assert out.voxel_mask.float().mean((1, 2, 3, 4)).tolist() == [0.75, 0.75]     # exact per sample
    blocks = out.voxel_mask.reshape(2, 4, 16, 4, 16, 2, 16)
    assert torch.equal(blocks.all(6).all(4).all(2), blocks.any(6).any(4).any(2))  # constant 16³ blocks
    assert torch.equal(blocks.all(6).all(4).all(2), masks.masked_cells().reshape(2, *grid))  # C-order
    assert out.bottleneck.shape == (2, 4, method.embed_dim)                        # 2 x 2 x 1 cells, 64 features
    hidden = method(torch.where(out.voxel_mask, torch.randn_like(x) * 10, x), None, masks)
    assert torch.equal(hidden.reconstruction, out.reconstruction) and torch.equal(hidden.bottleneck, out.bottleneck)
    seen = method(torch.where(~out.voxel_mask, torch.randn_like(x), x), None, masks)
    assert not torch.allclose(seen.bottleneck, out.bottleneck)


# ---- optimisation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["primus", "resenc"])
def test_gradients_reach_every_grouped_parameter_of_encoder_and_decoder(family):
    method, shape = (_primus(), PRIMUS_SHAPE) if family == "primus" else (_resenc(), RESENC_SHAPE)
    method.training_output(_volumes(shape), _anonymized(shape), step=0).loss.backward()
    groups = method.parameter_groups(0.05)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in method.parameters() if p.requires_grad}
    names = {id(p): n for n, p in method.named_parameters()}
    # nnU-Net zero-initialises the last norm of every residual branch (init_last_bn_before_add_to_0),
    # so at step 0 only that norm of the branch gets a gradient; everything else must get one
    dormant = re.compile(r"\.blocks\.\d+\.(conv1\.|conv2\.conv\.)") if family == "resenc" else None
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert p.grad is not None and torch.isfinite(p.grad).all(), name   # in the graph (DDP)
            assert (dormant is not None and dormant.search(name)) or p.grad.abs().sum() > 0, name
    assert {g["name"].split("_")[0] for g in groups} == {"encoder", "decoder"}
    frozen = [n for n, p in method.named_parameters() if not p.requires_grad]
    unused = "up_projection" if family == "primus" else "seg_layers"   # Primus's / deep-supervision heads
    assert frozen and all(unused in n for n in frozen)
    assert all(p.grad is None for p in method.parameters() if not p.requires_grad)


def _group_names(method):
    names = {id(p): n for n, p in method.named_parameters()}
    groups = method.parameter_groups(0.05)
    assert {g["name"] for g in groups} == {"encoder_decay", "encoder_no_decay", "decoder_decay", "decoder_no_decay"}
    for g in groups:
        assert g["apply_wd"] == (not g["name"].endswith("no_decay"))
        assert g["weight_decay"] == (0.05 if g["apply_wd"] else 0.0)
    exempt = {names[id(p)] for g in groups if not g["apply_wd"] for p in g["params"]}
    decayed = {names[id(p)] for g in groups if g["apply_wd"] for p in g["params"]}
    params = dict(method.named_parameters())
    assert all(params[n].ndim >= 2 and "pos_embed" not in n and "mask_token" not in n for n in decayed)
    return exempt, decayed


def test_parameter_groups_exempt_biases_norms_positions_and_the_mask_token():
    exempt, decayed = _group_names(_primus())
    assert {"encoder.primus.eva.pos_embed", "encoder.primus.down_projection.proj.bias",
            "encoder.primus.eva.blocks.0.gamma_1", "encoder.primus.eva.norm.weight", "decoder.mask_token",
            "decoder.embed.bias", "decoder.blocks.0.gamma_1", "decoder.blocks.0.attn.q_bias",
            "decoder.norm.weight"} <= exempt
    assert {"encoder.primus.down_projection.proj.weight", "encoder.primus.eva.blocks.0.attn.q_proj.weight",
            "decoder.embed.weight", "decoder.blocks.0.attn.qkv.weight", "decoder.head.weight"} <= decayed
    exempt, decayed = _group_names(_resenc())
    assert {"network.encoder.stem.convs.0.conv.bias", "network.encoder.stem.convs.0.norm.weight",
            "network.decoder.seg_layers.4.bias"} <= exempt
    assert {"network.encoder.stem.convs.0.conv.weight", "network.decoder.transpconvs.0.weight",
            "network.decoder.seg_layers.4.weight"} <= decayed


@pytest.mark.parametrize("family, steps, lr", [("primus", 40, 2e-3), ("resenc", 14, 5e-3)])
def test_a_few_steps_on_one_fixed_batch_reduce_the_loss(family, steps, lr):
    method, shape = (_primus(), PRIMUS_SHAPE) if family == "primus" else (_resenc(), RESENC_SHAPE)
    # smooth volumes: the masked part is predictable from its surroundings; one ResEnc volume, as
    # CPU conv3d backward costs ~0.4 s per volume here
    batch = 2 if family == "primus" else 1
    x = torch.nn.functional.interpolate(_volumes(tuple(s // 8 for s in shape), batch), size=shape, mode="trilinear")
    x = (x - x.mean()) / x.std()
    opt = torch.optim.AdamW(method.parameter_groups(0.0), lr=lr)
    losses = []
    for _ in range(steps):
        loss = method.training_output(x, None, step=0).loss  # the same masks every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    # measured: primus 1.04 -> 0.37 in 40 steps; resenc 1.24 -> 0.48 in 14, slow for the first ~8
    # while nnU-Net's zero-initialised residual branches wake up
    assert losses[-1] < (0.5 if family == "primus" else 0.6) * losses[0], losses


@pytest.mark.parametrize("family", ["primus", "resenc"])
def test_bf16_autocast_keeps_the_loss_fp32(family):
    # ResEnc at 96 x 64 x 64 (bottleneck 3 x 2 x 2): on RESENC_SHAPE the bottleneck InstanceNorm
    # sees 2 voxels per channel, whose bf16 variance can round to ~0 and give an infinite gradient
    # now and then (a degenerate size; real 160³ patches have 5³ = 125 bottleneck voxels). One
    # volume: on CPUs without native bf16 oneDNN emulates it, ~100x slower than fp32.
    batch = 2 if family == "primus" else 1
    if family == "primus":
        method, shape = _primus(), PRIMUS_SHAPE
    else:
        torch.manual_seed(0)
        shape = (96, 64, 64)
        method = build_method(resolve_config("MAETrainer_ResEncTiny", overrides={"patch_size": shape}))
    x = _volumes(shape, batch)
    masks = method.sample_masks(batch if family == "primus" else tuple(x.shape), step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(x, _anonymized(shape, batch), masks)
    assert out.reconstruction.dtype == torch.bfloat16   # autocast was really on
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    bad = [(n, p.dtype) for n, p in method.named_parameters()
           if p.dtype != torch.float32 or (p.grad is not None and not torch.isfinite(p.grad).all())]
    assert not bad, bad   # fp32 master weights, finite gradients


# ---- export ------------------------------------------------------------------------------------------------

def _load_like_nnunet(network: torch.nn.Module, weights: dict, key_to_encoder: str, key_to_stem: str) -> dict:
    """nnU-Net's pretrained fine-tuning: torch.load(weights_only=True), keys selected with
    `startswith` and no dot, loaded strictly (an extra selected key or a wrong shape fails)."""
    buffer = io.BytesIO()
    torch.save({"network_weights": weights}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["network_weights"]
    selected = {k: v for k, v in loaded.items() if k.startswith((key_to_encoder, key_to_stem))}
    state = network.state_dict()
    state.update(selected)
    network.load_state_dict(state, strict=True)
    return selected


@pytest.mark.parametrize("family", ["primus", "resenc"])
def test_export_loads_strictly_into_a_fresh_downstream_network(family, tmp_path):
    method = _primus() if family == "primus" else _resenc()
    spec = method.backbone
    weights = method.export_encoder_state_dict()
    # the project's nnU-Net test double: per-prefix strict loads into the submodules (a missing
    # key fails too), for a 2-channel, 3-class downstream task (in-projection repeated / 2)
    plan = {"architecture_plans": nnunet_architecture_plans(spec), "pretrain_num_input_channels": 1,
            "pretrain_plan": {"configurations": {"onemmiso": {"patch_size": list(spec.input_shape)}}},
            **spec.transfer_keys()}
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": plan}, tmp_path / "checkpoint_final.pth")
    network, _ = load_like_nnunet(str(tmp_path / "checkpoint_final.pth"), 2, 3, spec.input_shape)
    in_proj = {k + ".weight" for k in spec.keys_to_in_proj}   # ResEnc names its stem conv twice (aliases)
    loaded = network.state_dict()
    assert all(torch.allclose(loaded[k], weights[k].repeat(1, 2, 1, 1, 1) / 2) for k in in_proj)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items() if k not in in_proj)
    assert all(v.device.type == "cpu" and v.is_contiguous() and not v.requires_grad for v in weights.values())
    downstream = spec.build(num_classes=3)   # another task: a different head, the same encoder
    selected = _load_like_nnunet(downstream, weights, spec.key_to_encoder, spec.key_to_stem)
    assert set(selected) == set(weights)     # nothing exported outside the two prefixes
    prefix_keys = {k for k in downstream.state_dict() if k.startswith((spec.key_to_encoder, spec.key_to_stem))}
    assert set(weights) == prefix_keys       # and every downstream encoder / stem weight is covered
    assert all(torch.equal(downstream.state_dict()[k], v) for k, v in weights.items())
    live = method.encoder.primus if family == "primus" else method.network
    key = spec.keys_to_in_proj[0] + ".weight"
    weights[key].add_(1.0)                   # a copy: editing the export leaves the model alone
    assert not torch.equal(live.state_dict()[key], weights[key])
    if family == "primus":
        assert (spec.key_to_encoder, spec.key_to_stem) == ("eva", "down_projection")
        assert "eva.pos_embed" in weights
    else:
        assert (spec.key_to_encoder, spec.key_to_stem) == ("encoder.stages", "encoder.stem")
        assert not any(k.startswith("decoder") for k in weights)


# ---- building from trainer names, and errors ---------------------------------------------------------------

@pytest.mark.parametrize("trainer, tokens", [("MAETrainer_Tiny_P32_BS2", (16, 96)),
                                             ("MAETrainer_ResEncTiny_P64_BS2", (8, 64))])
def test_registered_trainers_build_a_method_the_loop_can_run(trainer, tokens):
    config = resolve_config(trainer)
    method = build_method(config)
    assert isinstance(method, PretrainingMethod) and method.embed_dim == tokens[1]
    x = _volumes(config.patch_size, batch=config.batch_size)
    out = method.training_output(x, torch.zeros_like(x, dtype=torch.bool), step=4, rank=1)
    assert out.monitor_tokens.shape == (config.batch_size, *tokens) and torch.isfinite(out.loss)
    assert out.scalars["masked_fraction"] == config.mae.mask_ratio == 0.75
    again = method.training_output(x, torch.zeros_like(x, dtype=torch.bool), step=4, rank=1)
    assert torch.equal(again.loss, out.loss)                  # masks reproduced from (seed, step, rank)
    assert not torch.equal(method.training_output(x, None, step=5, rank=1).loss, out.loss)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.after_optimizer_step(4, 0.996)                     # no teacher: a no-op
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in before.items())


def test_mae_settings_report_every_problem_at_once():
    with pytest.raises(UnknownTrainer) as info:
        resolve_config("MAETrainer_Tiny", overrides={"mae.mask_ratio": 1.2, "mae.decoder_depth": 0,
                                                     "mae.decoder_width": 4})
    assert all(k in str(info.value) for k in ("mask_ratio", "decoder_depth", "decoder_width"))
    with pytest.raises(InvalidMAEConfig):
        RandomMaskSampler(1.0)
    with pytest.raises(UnknownTrainer, match="mae.block_size 24 must divide"):
        resolve_config("MAETrainer_ResEncTiny_P64", overrides={"mae.block_size": 24})
    with pytest.raises(UnknownTrainer, match="at least one visible and one masked cell"):
        resolve_config("MAETrainer_Tiny_P16", overrides={"mae.mask_ratio": 0.95})


def test_wrong_inputs_are_refused_with_the_fix():
    method = _primus()
    x = _volumes(PRIMUS_SHAPE)
    with pytest.raises(InvalidInput, match="one channel"):
        method.training_output(x, torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool), step=0)
    with pytest.raises(InvalidInput, match="sample_masks"):
        method(x[:1], None, method.sample_masks(2, step=0))
    resenc = _resenc()
    with pytest.raises(InvalidInput, match="multiples of the network's total stride"):
        resenc.training_output(_volumes((64, 64, 48)), None, step=0)
    with pytest.raises(InvalidInput, match="deep_supervision=False"):
        UNetMAE(build_resenc_l(1, 1, deep_supervision=True, preset="Tiny"))
