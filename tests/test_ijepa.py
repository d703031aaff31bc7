"""I-JEPA method: teacher/EMA (E1-E5), loss (L1, L2), parameter groups (O2), resume (O3) and
bf16 stability (O4) (documentation/ijepa_method.md, "Verified by tests"), plus config validation and export."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnssl.errors import NnsslError
from nnssl.methods.ijepa import IJEPA, IJEPAConfig, InvalidIJEPAConfig, ijepa_loss
from nnssl.methods.masks import MaskConfig, MultiBlockMaskSampler
from nnssl.methods.schedules import ScheduleConfig, lr_at, momentum_at, wd_at
from nnssl.models.primus import PrimusTokenEncoder, build_primus

SHAPE = (32, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: threads only add noise


def _method(seed: int = 0, depth: int = 2, drop_path: float = 0.0, loss: str = "smooth_l1", shape=SHAPE) -> IJEPA:
    torch.manual_seed(seed)
    encoder = PrimusTokenEncoder(build_primus("Tiny", input_shape=shape, drop_path_rate=drop_path))
    return IJEPA(encoder, IJEPAConfig(predictor_width=48, predictor_depth=depth, loss=loss))


def _sampler(method: IJEPA) -> MultiBlockMaskSampler:
    return MultiBlockMaskSampler(method.student.grid, MaskConfig(min_keep=4), seed=1)


@pytest.fixture
def method() -> IJEPA:
    return _method()


@pytest.fixture
def batch(method):
    torch.manual_seed(1)
    return torch.randn(3, 1, *SHAPE), _sampler(method)(3, step=1)


def _perturb_student(method: IJEPA) -> None:
    with torch.no_grad():
        for _, p in method.student.encoder_named_parameters():
            p.add_(torch.randn_like(p) * 0.1)


# ---- E1-E5 ------------------------------------------------------------------------------------------

def test_e1_teacher_gets_no_gradient_and_is_never_optimised(method, batch):
    out = method(*batch)
    assert not out.targets.requires_grad and not out.teacher_tokens.requires_grad  # teacher ran under no_grad
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    grouped = [p for g in method.parameter_groups(0.04) for p in g["params"]]
    assert not {id(p) for p in method.teacher.parameters()} & {id(p) for p in grouped}
    assert len(grouped) == len({id(p) for p in grouped})
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in grouped}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in grouped)


def test_e2_teacher_starts_equal_with_separate_storage(method):
    pairs = list(zip(method.student.parameters(), method.teacher.parameters()))
    assert pairs and all(torch.equal(s, t) and s.data_ptr() != t.data_ptr() for s, t in pairs)
    with torch.no_grad():
        method.student.primus.eva.pos_embed.add_(1.0)
    assert not torch.equal(method.student.primus.eva.pos_embed, method.teacher.primus.eva.pos_embed)


def test_e3_ema_formula_and_its_exact_ends(method):
    _perturb_student(method)
    teacher = dict(method.teacher.encoder_named_parameters())
    student = dict(method.student.encoder_named_parameters())
    old = {n: p.clone() for n, p in teacher.items()}
    decoder_before = [p.clone() for p in method.teacher.primus.up_projection.parameters()]
    method.update_teacher(0.9)
    for name, t in teacher.items():
        assert torch.allclose(t, 0.9 * old[name] + 0.1 * student[name], atol=1e-6, rtol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(decoder_before, method.teacher.primus.up_projection.parameters()))
    kept = {n: p.clone() for n, p in teacher.items()}
    method.update_teacher(1.0)
    assert all(torch.equal(teacher[n], kept[n]) for n in teacher)
    method.update_teacher(0.0)
    assert all(torch.equal(teacher[n], student[n]) for n in teacher)
    assert all(t.dtype == torch.float32 for t in teacher.values())
    with pytest.raises(ValueError, match="momentum"):
        method.update_teacher(1.5)


def test_e4_scheduled_momentum_once_per_optimizer_step(method, batch):
    """Two micro-batches of gradient accumulation, then one optimizer step and one EMA update with
    momentum_at(step): the teacher follows the closed-form recurrence with m_0 = 0.996."""
    schedule = ScheduleConfig(total_steps=4, warmup_steps=1, peak_lr=1e-3)
    assert momentum_at(0, schedule) == pytest.approx(0.996) and momentum_at(4, schedule) == pytest.approx(1.0)
    opt = torch.optim.AdamW(method.parameter_groups(0.0), lr=1e-3)
    name = "eva.blocks.0.attn.q_proj.weight"
    expected = dict(method.teacher.encoder_named_parameters())[name].clone()
    x, masks = batch
    for step in range(4):
        opt.zero_grad()
        for micro in (slice(0, 2), slice(2, 3)):
            sub = type(masks)(masks.context[micro], masks.targets[:, micro], masks.target_shape, masks.context_shape)
            method(x[micro], sub).loss.backward()
        opt.step()
        m = momentum_at(step, schedule)
        method.update_teacher(m)
        expected = m * expected + (1 - m) * dict(method.student.encoder_named_parameters())[name].detach()
        assert torch.allclose(dict(method.teacher.encoder_named_parameters())[name], expected, atol=1e-6)
    assert not torch.equal(expected, dict(method.student.encoder_named_parameters())[name])


def test_e5_teacher_stays_deterministic_in_train_mode_with_drop_path(batch):
    method = _method(drop_path=0.5)
    method.train()
    assert method.training and method.student.training and not method.teacher.training
    x, masks = batch
    assert torch.equal(method.teacher_tokens(x), method.teacher_tokens(x))
    # the drop path is real: the student in train mode is stochastic
    assert not torch.equal(method.student(x, masks.context), method.student(x, masks.context))
    method.eval()
    method.train(True)
    assert not method.teacher.training


# ---- loss ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "l2"])
def test_l1_loss_formula_against_a_loop(batch, kind):
    method = _method(loss=kind)
    _perturb_student(method)  # student != teacher, so a swapped role would show
    x, masks = batch
    out = method(x, masks)
    with torch.no_grad():
        h = method.teacher(x)
        h = F.layer_norm(h, (h.shape[-1],))          # LN0: no affine, last dim
    m, b, kt = masks.targets.shape
    targets = torch.stack([h[j, masks.targets[i, j]] for i in range(m) for j in range(b)])
    assert torch.allclose(out.targets, targets, atol=1e-6)
    assert torch.allclose(out.teacher_tokens, h, atol=1e-6)
    z = method.student(x, masks.context)
    pred = method.predictor(z, masks.context, masks.targets)
    assert torch.allclose(out.predictions, pred, atol=1e-6)
    reference = {"smooth_l1": F.smooth_l1_loss(pred, targets, beta=1.0), "l1": (pred - targets).abs().mean(),
                 "l2": (pred - targets).square().mean()}[kind]
    assert torch.allclose(out.loss, reference, atol=1e-6)
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0


def test_l2_loss_ignores_non_target_teacher_tokens(method, batch, monkeypatch):
    x, masks = batch
    loss = method(x, masks).loss
    original = method.teacher_tokens

    def altered(volumes):
        h = original(volumes).clone()
        outside = torch.ones(h.shape[:2], dtype=torch.bool)
        for b in range(h.shape[0]):
            outside[b, masks.targets[:, b].flatten()] = False
        h[outside] = 123.0
        return h

    monkeypatch.setattr(method, "teacher_tokens", altered)
    assert torch.equal(method(x, masks).loss, loss)
    # and the loss does see the target tokens
    monkeypatch.setattr(method, "teacher_tokens", lambda v: original(v) + 1.0)
    assert not torch.allclose(method(x, masks).loss, loss)


def test_loss_rejects_unknown_kind_and_mismatched_shapes():
    with pytest.raises(NnsslError, match="loss"):
        ijepa_loss(torch.zeros(2, 3), torch.zeros(2, 3), "huber")
    with pytest.raises(NnsslError, match="shape"):
        ijepa_loss(torch.zeros(2, 3), torch.zeros(3, 2))


# ---- optimisation -------------------------------------------------------------------------------------

def test_o2_weight_decay_exclusions(method):
    groups = method.parameter_groups(0.04)
    assert {g["name"] for g in groups} == {"encoder_decay", "encoder_no_decay", "predictor_decay", "predictor_no_decay"}
    names = {id(p): n for n, p in method.named_parameters()}
    for g in groups:
        assert g["apply_wd"] == g["name"].endswith("_decay") and not g["name"].endswith("no_decay") or \
            (not g["apply_wd"] and g["name"].endswith("no_decay"))
        assert g["weight_decay"] == (0.04 if g["apply_wd"] else 0.0)
    exempt = {names[id(p)] for g in groups if not g["apply_wd"] for p in g["params"]}
    decayed = {names[id(p)] for g in groups if g["apply_wd"] for p in g["params"]}
    assert {"predictor.mask_token", "student.primus.eva.pos_embed", "student.primus.down_projection.proj.bias",
            "student.primus.eva.blocks.0.gamma_1", "student.primus.eva.norm.weight",
            "predictor.blocks.0.norm1.weight", "predictor.embed.bias"} <= exempt
    assert {"student.primus.down_projection.proj.weight", "student.primus.eva.blocks.0.attn.q_proj.weight",
            "predictor.blocks.0.qkv.weight", "predictor.head.weight"} <= decayed
    assert all(dict(method.named_parameters())[n].ndim >= 2 and "pos_embed" not in n and "mask_token" not in n
               for n in decayed)
    # the trainer's per-step update touches only apply_wd groups
    opt = torch.optim.AdamW(groups)
    for g in opt.param_groups:
        if g["apply_wd"]:
            g["weight_decay"] = 0.4
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.4]


def _run(method: IJEPA, volumes: torch.Tensor, steps: range, opt=None, autocast: bool = False):
    """A miniature training loop: everything per step is a pure function of the step."""
    schedule = ScheduleConfig(total_steps=200, warmup_steps=10, peak_lr=1e-3)
    sampler = _sampler(method)
    opt = opt or torch.optim.AdamW(method.parameter_groups(wd_at(0, schedule)))
    losses = []
    for step in steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, schedule)
            if g["apply_wd"]:
                g["weight_decay"] = wd_at(step, schedule)
        pick = torch.randint(0, len(volumes), (2,), generator=torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = method(volumes[pick], sampler(2, step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.update_teacher(momentum_at(step, schedule))
        losses.append(out.loss.item())
    return losses, opt, out


def test_o3_resume_from_state_dicts_continues_the_same_run():
    volumes = torch.randn(6, 1, *SHAPE, generator=torch.Generator().manual_seed(0))
    uninterrupted = _method(seed=0)
    expected, _, _ = _run(uninterrupted, volumes, range(6))

    first = _method(seed=0)
    head, opt, _ = _run(first, volumes, range(3))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict(), "step": 3}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = _method(seed=7)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(resumed.parameter_groups(0.04))
    opt2.load_state_dict(state["optimizer"])
    tail, _, _ = _run(resumed, volumes, range(state["step"], 6), opt=opt2)
    assert np.allclose(head + tail, expected, rtol=1e-6, atol=1e-7), (head + tail, expected)
    assert all(torch.equal(a, b) for a, b in zip(resumed.teacher.parameters(), uninterrupted.teacher.parameters()))


def test_o4_bf16_autocast_200_steps_stay_finite_and_ema_stays_fp32():
    # a 4x2x2 token grid: CPU bf16 matmuls are emulated here and 3x slower than fp32
    shape = (32, 16, 16)
    volumes = torch.randn(8, 1, *shape, generator=torch.Generator().manual_seed(0))
    method = _method(depth=1, shape=shape)
    losses, _, out = _run(method, volumes, range(200), autocast=True)
    assert out.predictions.dtype == torch.bfloat16          # autocast was really on
    assert out.targets.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    for module in (method.teacher, method.student, method.predictor):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())


# ---- configuration and export ---------------------------------------------------------------------------

def test_config_reports_every_problem():
    with pytest.raises(InvalidIJEPAConfig) as info:
        IJEPAConfig(predictor_width=0, predictor_depth=-1, predictor_heads=0, loss="mse", predictor_mlp_ratio=0)
    assert isinstance(info.value, NnsslError) and len(info.value.problems) == 5
    with pytest.raises(InvalidIJEPAConfig, match="divide"):
        IJEPAConfig(predictor_width=100, predictor_heads=12)
    assert IJEPAConfig(predictor_width=384).resolved_predictor_heads(12) == 12
    assert IJEPAConfig(predictor_width=64).resolved_predictor_heads(12) == 8   # largest divisor below 12
    assert IJEPAConfig(predictor_width=64, predictor_heads=4).resolved_predictor_heads(12) == 4


def test_masks_for_another_batch_size_are_refused(method, batch):
    x, masks = batch
    with pytest.raises(NnsslError, match="batch size"):
        method(x[:2], masks)


def test_export_is_the_teacher_under_downstream_keys(method):
    _perturb_student(method)
    method.update_teacher(0.5)
    weights = method.export_encoder_state_dict()
    assert set(weights) == set(method.teacher.encoder_state_dict())
    assert all(k.startswith(("eva.", "down_projection.")) and v.device.type == "cpu" for k, v in weights.items())
    assert torch.equal(weights["eva.pos_embed"], method.teacher.primus.eva.pos_embed)
    assert not torch.equal(weights["eva.pos_embed"], method.student.primus.eva.pos_embed)
