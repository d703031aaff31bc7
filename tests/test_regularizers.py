"""Anti-collapse terms (methods/regularizers.py) against independent computations: the
Epps–Pulley statistic against its closed form and its null / collapsed values, SIGReg's
directions, VICReg's terms and gradients against torch.var / torch.cov, fp32 under autocast,
and the global-batch reduction against one process holding the whole batch."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from nnssl.methods import regularizers as reg
from nnssl.methods.masks import seeded_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def _closed_form_epps_pulley(x: torch.Tensor) -> float:
    """N ∫_R |φ_N(t) − e^{−t²/2}|² e^{−t²/2} dt, expanded with ∫ cos(at) e^{−bt²} dt =
    sqrt(π/b) e^{−a²/4b}:
    (1/N) Σ_jk √(2π) e^{−(x_j−x_k)²/2} − 2 Σ_j √π e^{−x_j²/4} + N √(2π/3)."""
    x = x.double()
    n = x.numel()
    pair = math.sqrt(2 * math.pi) * torch.exp(-0.5 * (x[:, None] - x[None, :]).square()).sum() / n
    cross = 2 * math.sqrt(math.pi) * torch.exp(-0.25 * x.square()).sum()
    return float(pair - cross + n * math.sqrt(2 * math.pi / 3))


def _expected_null_statistic(t_max: float) -> float:
    """E[EP] for a standard normal sample of any size: E|φ_N − φ|² = (1 − e^{−t²})/N, so
    E[EP] = ∫_{−t_max}^{t_max} e^{−t²/2} − e^{−3t²/2} dt."""
    return math.sqrt(2 * math.pi) * math.erf(t_max / math.sqrt(2)) - \
        math.sqrt(2 * math.pi / 3) * math.erf(t_max * math.sqrt(1.5))


def test_epps_pulley_matches_its_closed_form():
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([torch.randn(300, generator=g), 0.5 * torch.randn(300, generator=g) + 0.7,
                           torch.rand(300, generator=g) * 4 - 2], dim=1)   # normal, shifted+narrow, uniform
    fine = reg.epps_pulley(samples, num_points=4001, t_max=12.0)  # ∫ over R to double precision
    for column, value in zip(samples.T, fine.tolist()):
        assert value == pytest.approx(_closed_form_epps_pulley(column), rel=2e-4)
    # the default quadrature (17 nodes on [0, 3]) stays close where it matters
    default = reg.epps_pulley(samples)
    assert torch.allclose(default, fine, rtol=0.1, atol=0.2)


def test_epps_pulley_is_small_for_a_standard_normal_and_large_for_collapsed_or_shifted_samples():
    g = torch.Generator().manual_seed(1)
    normal = reg.epps_pulley(torch.randn(2000, 64, generator=g))
    assert float(normal.mean()) == pytest.approx(_expected_null_statistic(3.0), rel=0.15)  # 1.05
    assert float(normal.max()) < 5
    n = 2000
    collapsed = reg.epps_pulley(torch.zeros(n, 1))
    # N ∫_{−3}^{3} (1 − e^{−t²/2})² e^{−t²/2} dt, in closed form with erf
    per_sample = math.sqrt(2 * math.pi) * math.erf(3 / math.sqrt(2)) - 2 * math.sqrt(math.pi) * math.erf(3.0) + \
        math.sqrt(2 * math.pi / 3) * math.erf(3 * math.sqrt(1.5))
    assert float(collapsed) == pytest.approx(n * per_sample, rel=2e-3)   # ≈ 0.40 N = 804
    shifted = reg.epps_pulley(torch.randn(n, 1, generator=g) + 2.0)
    narrow = reg.epps_pulley(0.2 * torch.randn(n, 1, generator=g))
    assert float(shifted) > 100 * float(normal.mean()) and float(narrow) > 100 * float(normal.mean())


def test_sigreg_directions_are_unit_and_a_pure_function_of_the_generator_seed():
    a = reg.random_directions(48, 16, seeded_generator("sigreg", 0, 5, 0))
    b = reg.random_directions(48, 16, seeded_generator("sigreg", 0, 5, 0))
    c = reg.random_directions(48, 16, seeded_generator("sigreg", 0, 6, 0))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.allclose(a.norm(dim=0), torch.ones(16))
    z = torch.randn(4, 100, 48, generator=torch.Generator().manual_seed(2))   # leading axes are samples
    value = reg.sigreg(z, 16, 17, seeded_generator("sigreg", 0, 5, 0))
    assert value.ndim == 0 and float(value) == pytest.approx(float(reg.epps_pulley(z.reshape(-1, 48) @ a).mean()))


def test_sigreg_separates_isotropic_from_collapsed_embeddings_and_its_gradient_spreads_them():
    g = torch.Generator().manual_seed(3)
    iso = reg.sigreg(torch.randn(1000, 32, generator=g), 64, 17, seeded_generator(0))
    rank_two = torch.randn(1000, 2, generator=g) @ torch.randn(2, 32, generator=g) / math.sqrt(32)
    low = reg.sigreg(rank_two, 64, 17, seeded_generator(0))
    assert float(iso) < 2 and float(low) > 20 * float(iso)
    # a gradient step on SIGReg alone raises the std of a shrunken sample towards 1
    z = (0.1 * torch.randn(500, 8, generator=g)).requires_grad_()
    reg.sigreg(z, 32, 17, seeded_generator(1)).backward()
    with torch.no_grad():
        stepped = z - 1e-4 * z.grad
    assert float(stepped.std()) > float(z.detach().std())


def test_vicreg_terms_match_torch_var_and_cov_with_their_gradients():
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(50, 6, generator=g) @ torch.randn(6, 6, generator=g) * 0.4).requires_grad_()
    variance, covariance = reg.vicreg_variance_covariance(z)
    ref_var = torch.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean()   # VICReg: unbiased variance
    cov = torch.cov(z.T)
    ref_cov = (cov - torch.diag(torch.diag(cov))).square().sum() / 6
    assert torch.allclose(variance, ref_var, atol=1e-6) and torch.allclose(covariance, ref_cov, atol=1e-6)
    grads = torch.autograd.grad(variance + 0.3 * covariance, z)[0]
    ref_grads = torch.autograd.grad(ref_var + 0.3 * ref_cov, z)[0]
    assert torch.allclose(grads, ref_grads, atol=1e-6)
    # features with std >= 1 on every dimension: the variance hinge is exactly 0; decorrelated
    # features have a covariance term near 0
    wide = 3 * torch.randn(4000, 6, generator=g)
    v, c = reg.vicreg_variance_covariance(wide)
    assert float(v) == 0.0 and float(c) < 0.05 * 9
    assert float(reg.vicreg_variance_covariance(torch.zeros(10, 6))[0]) == pytest.approx(1 - 1e-2)


def test_terms_run_in_fp32_under_bf16_autocast():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = reg.sigreg(z, 8, 17, seeded_generator(0))
        v, c = reg.vicreg_variance_covariance(z)
    assert s.dtype == v.dtype == c.dtype == torch.float32
    assert torch.allclose(s, reg.sigreg(z.float(), 8, 17, seeded_generator(0)))
    assert torch.allclose(c, reg.vicreg_variance_covariance(z.float())[1])


def _two_rank_run(fn, shards):
    """Run fn(shard, reduction) in two threads whose all-reduce sums over both (a stand-in for
    DDP's process group); returns each rank's (value, gradient on its shard)."""
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def run(rank):
        def all_reduce_sum(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            tensor.copy_(slots[0] + slots[1])
            barrier.wait()
        x = shards[rank].clone().requires_grad_()
        value = fn(x, reg.BatchReduction(2, all_reduce_sum))
        value.backward()
        results[rank] = (value.detach(), x.grad)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("term", ["sigreg", "variance", "covariance"])
def test_two_ranks_equal_one_process_with_the_whole_batch(term):
    """DDP averages the ranks' parameter gradients; with global sums and world_size x the local
    gradient, that average is exactly the gradient of one process holding the whole batch."""
    def fn(x, reduction=None):
        reduction = reduction if reduction is not None else reg.BatchReduction()
        if term == "sigreg":
            return reg.sigreg(x, 16, 17, seeded_generator("sigreg", 0, 3, 0), reduction)
        variance, covariance = reg.vicreg_variance_covariance(0.5 * x + 0.2, 1.0, reduction)
        return variance if term == "variance" else covariance

    whole = torch.randn(40, 12, generator=torch.Generator().manual_seed(6))
    x = whole.clone().requires_grad_()
    value = fn(x)
    value.backward()
    ranks = _two_rank_run(fn, [whole[:20], whole[20:]])
    assert all(torch.allclose(v, value.detach(), rtol=1e-5) for v, _ in ranks)
    # DDP's average of the ranks' gradients; the rows of each rank are its own samples
    averaged = torch.cat([g for _, g in ranks]) / 2
    assert torch.allclose(averaged, x.grad, rtol=1e-4, atol=1e-7)
    # a single process is untouched by the reduction machinery
    assert reg.global_sum(x, reg.BatchReduction()) is x
