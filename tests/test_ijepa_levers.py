"""I-JEPA's levers (IJEPAConfig): targets averaged over the teacher's last K blocks, and the
anti-collapse terms (SIGReg, VICReg) on the student's embeddings. The defaults must be the
released method bit for bit; each lever must do exactly what documentation/ijepa_method.md says."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from nnssl.methods.ijepa import IJEPA, IJEPAConfig, InvalidIJEPAConfig
from nnssl.methods.masks import MaskConfig, MultiBlockMaskSampler
from nnssl.models.primus import PrimusTokenEncoder, build_primus
from nnssl.models.resenc import RESENC_PRESETS, build_resenc_l, resenc_l_arch_kwargs
from nnssl.models.sparse_resenc import ResEncTokenEncoder

SHAPE = (32, 32, 32)
LEVERS = dict(target_layers=2, sigreg_weight=0.05, sigreg_slices=16, vicreg_variance_weight=1.0,
              vicreg_covariance_weight=0.04)

pytestmark = pytest.mark.usefixtures("one_thread")


def _method(seed: int = 0, sampler_seed: int = 1, **config) -> IJEPA:
    torch.manual_seed(seed)
    encoder = PrimusTokenEncoder(build_primus("Tiny", input_shape=SHAPE))
    sampler = MultiBlockMaskSampler(encoder.grid, MaskConfig(min_keep=4), seed=sampler_seed)
    return IJEPA(encoder, IJEPAConfig(predictor_width=48, predictor_depth=1, **config), mask_sampler=sampler)


def _perturb(module: torch.nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture
def batch():
    x = torch.randn(3, 1, *SHAPE, generator=torch.Generator().manual_seed(1))
    return x, MultiBlockMaskSampler((4, 4, 4), MaskConfig(min_keep=4), seed=1)(3, step=1)


def test_config_lists_every_problem_of_the_levers():
    with pytest.raises(InvalidIJEPAConfig) as info:
        IJEPAConfig(target_layers=0, regularized_embeddings="teacher", sigreg_weight=-1.0, sigreg_slices=0,
                    sigreg_points=1, vicreg_variance_weight=math.nan, vicreg_covariance_weight=math.inf,
                    vicreg_std_target=0.0)
    assert len(info.value.problems) == 8
    assert IJEPAConfig().regularizer_weights() == {}
    assert IJEPAConfig(sigreg_weight=0.1, vicreg_covariance_weight=1).regularizer_weights() == \
        {"sigreg": 0.1, "vicreg_covariance": 1.0}


def test_defaults_are_the_released_method_bit_for_bit(batch):
    method = _method()
    _perturb(method.student)
    x, masks = batch
    out = method(x, masks)
    with torch.no_grad():
        h = F.layer_norm(method.teacher(x), (method.embed_dim,))
    m, b, kt = masks.targets.shape
    targets = torch.gather(h.unsqueeze(0).expand(m, -1, -1, -1), 2,
                           masks.targets.unsqueeze(-1).expand(m, b, kt, h.shape[-1])).reshape(m * b, kt, -1)
    pred = method.predictor(method.student(x, masks.context), masks.context, masks.targets)
    assert torch.equal(out.targets, targets) and torch.equal(out.teacher_tokens, h)
    assert torch.equal(out.loss, F.smooth_l1_loss(pred, targets, beta=1.0))
    assert out.loss is out.prediction_loss and out.regularizers == {}
    scalars = method.training_output(x, torch.zeros_like(x, dtype=torch.bool), step=1).scalars
    assert set(scalars) == {"context_tokens", "target_tokens"}


def test_primus_targets_average_the_last_k_blocks_and_keep_the_final_norm_on_the_deepest(batch):
    method = _method(target_layers=2)
    _perturb(method.teacher)                          # non-trivial final-norm affine and blocks
    x, _ = batch
    target, monitor = method.teacher_targets(x)
    with torch.no_grad():
        embed, block1, block2, final = method.teacher.layer_outputs(x)   # Tiny has 2 Eva blocks
    ln = lambda y: F.layer_norm(y, (y.shape[-1],))    # noqa: E731 - LN₀, no affine
    assert torch.allclose(target, ln((ln(block1) + ln(final)) / 2), atol=1e-6)
    assert torch.equal(monitor, method.teacher_tokens(x)) and torch.allclose(monitor, ln(final))
    # the final norm acts on the deepest term only: the last block's raw output is not a target
    assert not torch.allclose(target, ln((ln(block1) + ln(block2)) / 2), atol=1e-3)
    # one block of last_block_outputs is the encoder's output itself (K = 1's target source)
    assert torch.equal(method.teacher.last_block_outputs(x, 1)[0], method.teacher(x))
    with pytest.raises(InvalidIJEPAConfig, match="target_layers <= 2"):
        _method(target_layers=3)


def test_resenc_targets_are_the_last_residual_blocks_of_the_bottleneck_stage():
    kwargs = resenc_l_arch_kwargs(preset="Tiny")
    kwargs["n_blocks_per_stage"] = [1, 1, 1, 1, 1, 3]
    torch.manual_seed(0)
    encoder = ResEncTokenEncoder(ResidualEncoderUNet(**kwargs), (64, 64, 64))
    assert encoder.num_target_blocks == 3
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.flatten(2).transpose(1, 2).clone()))
             for b in encoder.network.encoder.stages[-1].blocks]
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = encoder(x)              # the stock encoder; the hooks record its 3 bottleneck blocks
        for h in hooks:
            h.remove()
        outputs = encoder.last_block_outputs(x, 2)
    assert len(seen) == 3 and len(outputs) == 2
    assert all(torch.equal(a, b) for a, b in zip(outputs, seen[1:])) and torch.equal(outputs[-1], dense)
    method = IJEPA(encoder, IJEPAConfig(predictor_width=32, predictor_depth=1, target_layers=3))
    target, monitor = method.teacher_targets(x)   # the teacher is a copy of `encoder`: same outputs
    ln = lambda y: F.layer_norm(y, (y.shape[-1],))  # noqa: E731 - LN₀, no affine
    assert torch.equal(monitor, ln(dense))
    assert torch.allclose(target, ln((ln(seen[0]) + ln(seen[1]) + ln(seen[2])) / 3), atol=1e-6)
    # ResEnc-L's layout (blocks 1-3-4-6-6-6, here at Tiny widths) has 6 blocks in its bottleneck
    # stage; the CPU preset has 1, so K > 1 is refused there
    kwargs["n_blocks_per_stage"] = RESENC_PRESETS["L"]["n_blocks_per_stage"]
    assert ResEncTokenEncoder(ResidualEncoderUNet(**kwargs), (64, 64, 64)).num_target_blocks == 6
    with pytest.raises(InvalidIJEPAConfig, match="bottleneck stage"):
        IJEPA(ResEncTokenEncoder(build_resenc_l(preset="Tiny"), (64, 64, 64)), IJEPAConfig(target_layers=2))


@pytest.mark.parametrize("regularized", ["context", "predictions"])
def test_regularizers_reach_only_the_networks_that_produce_their_embeddings(batch, regularized):
    method = _method(sigreg_weight=1.0, sigreg_slices=16, vicreg_variance_weight=1.0,
                     vicreg_covariance_weight=1.0, regularized_embeddings=regularized)
    x, masks = batch
    out = method(x, masks, step=4)
    assert set(out.regularizers) == {"sigreg", "vicreg_variance", "vicreg_covariance"}
    total = out.prediction_loss + 1.0 * out.regularizers["sigreg"] + out.regularizers["vicreg_variance"] + \
        out.regularizers["vicreg_covariance"]
    assert torch.allclose(out.loss, total)
    for name, term in out.regularizers.items():
        method.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        student = [p.grad for _, p in method.student.encoder_named_parameters()]
        predictor = [p.grad for p in method.predictor.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in student), name
        if regularized == "context":
            assert all(g is None for g in predictor), name
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in predictor), name
        assert all(p.grad is None for p in method.teacher.parameters())


def test_training_output_logs_each_term_and_sigreg_directions_follow_the_step():
    method = _method(**LEVERS)
    x = torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(4))
    anon = torch.zeros_like(x, dtype=torch.bool)
    a = method.training_output(x, anon, step=7)
    b = method.training_output(x, anon, step=7)
    c = method.training_output(x, anon, step=8)
    assert set(a.scalars) == {"context_tokens", "target_tokens", "prediction_loss", "sigreg", "vicreg_variance",
                              "vicreg_covariance"}
    assert a.scalars == b.scalars and torch.equal(a.loss, b.loss)
    assert a.scalars["sigreg"] != c.scalars["sigreg"]
    weighted = a.scalars["prediction_loss"] + 0.05 * a.scalars["sigreg"] + a.scalars["vicreg_variance"] + \
        0.04 * a.scalars["vicreg_covariance"]
    assert float(a.loss.detach()) == pytest.approx(weighted, rel=1e-5)
    # the directions depend on the run's seed (the sampler's), so two seeds differ
    assert _method(sampler_seed=2, **LEVERS).training_output(x, anon, step=7).scalars["sigreg"] != a.scalars["sigreg"]
    with pytest.raises(Exception, match="pass the optimizer step"):
        method(x, method.mask_sampler(2, 0))


def test_resume_with_every_lever_on_continues_the_same_run():
    volumes = torch.randn(4, 1, *SHAPE, generator=torch.Generator().manual_seed(5))
    anon = torch.zeros(2, 1, *SHAPE, dtype=torch.bool)

    def run(method, steps, opt=None):
        opt = opt or torch.optim.AdamW(method.parameter_groups(0.04), lr=1e-3)
        losses = []
        for step in steps:
            pick = torch.randint(0, 4, (2,), generator=torch.Generator().manual_seed(step))
            out = method.training_output(volumes[pick], anon, step)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            method.after_optimizer_step(step, 0.99)
            losses.append(out.loss.item())
        return losses, opt

    expected, _ = run(_method(**LEVERS), range(4))
    first = _method(**LEVERS)
    head, opt = run(first, range(2))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = _method(seed=9, **LEVERS)
    resumed.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(resumed.parameter_groups(0.04), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    tail, _ = run(resumed, range(2, 4), opt2)
    assert head + tail == pytest.approx(expected, rel=1e-6, abs=1e-7)
