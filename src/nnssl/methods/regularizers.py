"""Optional anti-collapse terms on the student's embeddings: SIGReg (LeJEPA) and VICReg's
variance and covariance terms. Off by default (`IJEPAConfig` weights 0); see
documentation/ijepa_method.md for where they act and how to switch them on.

An EMA teacher and stop-gradient only *slow* collapse down (the toy negative control in
tests/test_ijepa_training_core.py collapses within a hundred steps without them); these terms
act on the batch's embedding distribution directly:

- **SIGReg** (Balestriero & LeCun 2025, LeJEPA, arXiv:2511.08544): project the N embeddings on
  M random unit directions a_m and test each 1-D sample p = Z a_m against N(0, 1) with the
  Epps–Pulley statistic (Epps & Pulley 1983)

      EP(p) = N ∫ w(t) |φ_N(t) − φ(t)|² dt,   φ_N(t) = (1/N) Σ_n exp(i t p_n),
      φ(t) = exp(−t²/2),  w(t) = exp(−t²/2),

  integrated with the trapezoidal rule on [0, t_max] and doubled (the integrand is even), as
  LeJEPA's released code does (t_max = 3, 17 points); SIGReg = mean over the M directions. By
  the Cramér–Wold theorem, matching every 1-D projection matches the distribution, so the
  minimiser is an isotropic standard Gaussian: no dimension can collapse, nor can two
  dimensions duplicate each other. The directions are redrawn every step from a generator
  that is a pure function of (seed, step, stream), so resume and DDP ranks see the same ones.
- **VICReg** (Bardes, Ponce & LeCun, ICLR 2022): with C the unbiased covariance of the N
  embeddings (dimension d),

      variance   v = (1/d) Σ_j max(0, γ − sqrt(C_jj + ε)),   γ = 1, ε = 1e-4
      covariance c = (1/d) Σ_{i≠j} C_ij²

  (JEPA + these terms: VJ-VCR, arXiv:2412.10925; 3D brain MRI, arXiv:2606.13315).

All three are statistics of the *global* batch: under DDP each rank contributes sums of its
own embeddings, the sums are all-reduced (detached), and each rank's backward carries
world_size × the gradient through its own part, so after DDP averages the gradients they are
exactly those of one process holding the whole batch (`global_sum`). Everything runs in fp32
with autocast off (cos/sin sums of thousands of samples and a covariance are too coarse in
bf16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# LeJEPA's released SIGReg integrates on [0, 3] (its Algorithm 1 used [-5, 5]; the weight
# exp(-t²/2) leaves 1.6% of a collapsed sample's statistic beyond |t| = 3)
EPPS_PULLEY_T_MAX = 3.0
VICREG_EPS = 1e-4  # VICReg's ε inside the square root of the variance


@dataclass(frozen=True)
class BatchReduction:
    """How local batch sums become global-batch sums: `all_reduce_sum` sums a tensor over
    ranks in place (None: a single process). Ranks must hold equal numbers of embeddings
    (I-JEPA's masks trim every rank to the global batch's context length)."""

    world_size: int = 1
    all_reduce_sum: Callable[[torch.Tensor], object] | None = None

    @staticmethod
    def from_process_group() -> BatchReduction:
        """The default process group's ranks when torch.distributed is initialised, else one
        process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return BatchReduction(dist.get_world_size(), dist.all_reduce)
        return BatchReduction()


def global_sum(local: torch.Tensor, reduction: BatchReduction) -> torch.Tensor:
    """Σ over ranks of `local` (a sum over this rank's samples). The value is the global sum;
    the gradient flows only into this rank's `local`, scaled by world_size, because DDP then
    divides the summed parameter gradients by world_size. Identity for one process."""
    if reduction.world_size == 1 or reduction.all_reduce_sum is None:
        return local
    total = local.detach().clone()
    reduction.all_reduce_sum(total)
    return total + reduction.world_size * (local - local.detach())


def _as_matrix(z: torch.Tensor) -> torch.Tensor:
    """[..., D] -> fp32 [N, D] (the leading axes are samples)."""
    return z.float().reshape(-1, z.shape[-1])


def random_directions(dim: int, count: int, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """[dim, count] unit columns, Gaussian directions (uniform on the sphere), drawn on the CPU
    from `generator` (so equal on every device and rank) and moved to `device`."""
    a = torch.randn(dim, count, generator=generator)
    return (a / a.norm(dim=0, keepdim=True)).to(device)


def epps_pulley_nodes(num_points: int, t_max: float = EPPS_PULLEY_T_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes t_k on [0, t_max] and weights so that Σ_k weights_k f(t_k) is the trapezoidal rule
    for ∫_{−t_max}^{t_max} w(t) f(t) dt of an even f, with w(t) = exp(−t²/2) folded in."""
    if num_points < 2:
        raise ValueError(f"the Epps-Pulley quadrature needs >= 2 points, got {num_points}")
    t = torch.linspace(0.0, t_max, num_points, dtype=torch.float64)
    dt = t_max / (num_points - 1)
    weights = torch.full((num_points,), 2 * dt, dtype=torch.float64)
    weights[[0, -1]] = dt
    return t.float(), (weights * torch.exp(-0.5 * t.square())).float()


def epps_pulley(samples: torch.Tensor, num_points: int = 17, t_max: float = EPPS_PULLEY_T_MAX,
                reduction: BatchReduction = BatchReduction()) -> torch.Tensor:
    """Epps–Pulley statistic against N(0, 1) of each column of `samples` [N, M] -> [M], over
    the global batch. Its expectation for a standard normal sample is ∫ w (1 − φ²) dt ≈ 1.05
    whatever N; a collapsed (constant 0) sample gives ≈ 0.40·N, so the statistic grows with
    the batch exactly when the sample is not normal."""
    with torch.autocast(samples.device.type, enabled=False):
        x = samples.float()
        t, weights = (v.to(x.device) for v in epps_pulley_nodes(num_points, t_max))
        xt = x.unsqueeze(-1) * t                                              # [N, M, T]
        sums = global_sum(torch.stack([xt.cos().sum(0), xt.sin().sum(0)]), reduction)
        n = x.shape[0] * reduction.world_size
        ecf_real, ecf_imag = sums[0] / n, sums[1] / n
        error = (ecf_real - torch.exp(-0.5 * t.square())).square() + ecf_imag.square()   # |φ_N − φ|²
        return n * (error @ weights)


def sigreg(embeddings: torch.Tensor, num_slices: int, num_points: int, generator: torch.Generator,
           reduction: BatchReduction = BatchReduction()) -> torch.Tensor:
    """LeJEPA's SIGReg of [..., D] embeddings (leading axes are samples): the mean Epps–Pulley
    statistic of `num_slices` random 1-D projections, drawn from `generator`. fp32 scalar."""
    with torch.autocast(embeddings.device.type, enabled=False):
        z = _as_matrix(embeddings)
        directions = random_directions(z.shape[1], num_slices, generator, z.device)
        return epps_pulley(z @ directions, num_points, reduction=reduction).mean()


def vicreg_variance_covariance(embeddings: torch.Tensor, std_target: float = 1.0,
                               reduction: BatchReduction = BatchReduction()) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's (variance, covariance) terms of [..., D] embeddings over the global batch, fp32
    scalars. The mean is all-reduced and detached: that is exact, since the derivative of a
    centred second moment with respect to the mean, Σ_n (z_n − μ), is 0 at the batch mean."""
    with torch.autocast(embeddings.device.type, enabled=False):
        z = _as_matrix(embeddings)
        n, d = z.shape[0] * reduction.world_size, z.shape[1]
        if n < 2:
            raise ValueError("VICReg's variance and covariance need at least 2 embeddings in the batch")
        mean = global_sum(z.detach().sum(0), reduction) / n
        centred = z - mean
        cov = global_sum(centred.T @ centred, reduction) / (n - 1)
        variance = F.relu(std_target - torch.sqrt(torch.diagonal(cov) + VICREG_EPS)).mean()
        off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
        return variance, off_diagonal.square().sum() / d
