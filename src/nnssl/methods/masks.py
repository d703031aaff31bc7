"""I-JEPA multi-block masks on a 3D (or 2D) token grid.

Per batch, the *sizes* of the target blocks and of the context block are drawn from a
generator seeded by (seed, step), so every worker and every rank agrees on them and a resumed
run draws the same sizes (spec M5, M12). *Positions* are drawn per sample from a generator
seeded by (seed, step, rank, stream): a batch is a pure function of its arguments.

Default behaviour fixes four quirks of the released 2D code (IJEPA_SPEC §2.2):
D1 inclusive corners and sides that may span the whole axis; D2 independent, log-uniform
aspect ratios (two for 3D); D3 the context never overlaps a target (target positions are
redrawn instead of relaxing the constraint); D4 contexts are trimmed to the batch minimum by a
random subset, not by dropping the highest raster indices. `reference_quirks=True` reproduces
the released 2D semantics (Q1-Q5) for comparison with the paper (test M10).

Token index convention: C-order over the grid, n = (i*Gy + j)*Gz + k, which is Primus's
`b c w h d -> b (w h d) c` flattening.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from nnssl.log import get_logger

logger = get_logger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class MaskConfig:
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.20)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False
    reference_quirks: bool = False
    max_tries: int = 20

    def __post_init__(self) -> None:
        problems = []
        for name in ("target_scale", "context_scale", "target_aspect"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi) or (name != "target_aspect" and hi > 1):
                problems.append(f"{name}={getattr(self, name)} must satisfy 0 < low <= high"
                                + ("" if name == "target_aspect" else " <= 1"))
        if self.num_targets < 1:
            problems.append(f"num_targets={self.num_targets} must be at least 1")
        if self.min_keep < 0:
            problems.append(f"min_keep={self.min_keep} must be >= 0")
        if self.max_tries < 1:
            problems.append(f"max_tries={self.max_tries} must be >= 1")
        if problems:
            raise ValueError("invalid MaskConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class MaskBatch:
    context: torch.Tensor  # int64 [B, Kc], rows sorted ascending
    targets: torch.Tensor  # int64 [M, B, Kt], rows sorted ascending (block-major: row m*B+b)
    target_shape: Shape
    context_shape: Shape

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MaskBatch":
        return MaskBatch(self.context.to(device, non_blocking=non_blocking),
                         self.targets.to(device, non_blocking=non_blocking),
                         self.target_shape, self.context_shape)


def flatten_coords(coords: torch.Tensor, grid: Shape) -> torch.Tensor:
    """[..., ndim] integer coordinates -> C-order flat index."""
    index = torch.zeros(coords.shape[:-1], dtype=torch.int64, device=coords.device)
    for axis, size in enumerate(grid):
        index = index * size + coords[..., axis].long()
    return index


def unflatten_index(index: torch.Tensor, grid: Shape) -> torch.Tensor:
    """C-order flat index -> [..., ndim] coordinates."""
    coords = []
    rest = index.long()
    for size in reversed(grid):
        coords.append(rest % size)
        rest = rest // size
    return torch.stack(coords[::-1], dim=-1)


def _seed(*parts: int) -> int:
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed(*parts))
    return g


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + float(torch.rand((), generator=g)) * (hi - lo)


class MultiBlockMaskSampler:
    """Samples (context, targets) index sets for a batch; cheap (boolean grids, vectorised)."""

    def __init__(self, grid: Shape, config: MaskConfig = MaskConfig(), seed: int = 0) -> None:
        if len(grid) not in (2, 3) or any(int(g) < 1 for g in grid):
            raise ValueError(f"grid {grid} must have 2 or 3 positive sides")
        self.grid = tuple(int(g) for g in grid)
        self.config = config
        self.seed = int(seed)
        self.num_tokens = math.prod(self.grid)

    # ------------------------------------------------------------------ sizes
    def _target_shape(self, g: torch.Generator) -> Shape:
        c, grid, n = self.config, self.grid, self.num_tokens
        if c.reference_quirks:  # Q1: one uniform drives scale and aspect; Q2: side < G
            u = float(torch.rand((), generator=g))
            scale = c.target_scale[0] + u * (c.target_scale[1] - c.target_scale[0])
            aspect = c.target_aspect[0] + u * (c.target_aspect[1] - c.target_aspect[0])
            volume = int(n * scale)
            sides = [round(math.sqrt(volume * aspect)), round(math.sqrt(volume / aspect))]
            if len(grid) == 3:  # generalise to 3D as cube-root sides with the aspect on axis 0/1
                side = volume ** (1 / 3)
                sides = [round(side * aspect ** 0.5), round(side / aspect ** 0.5), round(side)]
            return tuple(max(1, min(s, gs - 1 if gs > 1 else 1)) for s, gs in zip(sides, grid))
        scale = _uniform(g, *c.target_scale)
        volume = n * scale
        log_lo, log_hi = math.log(c.target_aspect[0]), math.log(c.target_aspect[1])
        ratios = [math.exp(_uniform(g, log_lo, log_hi)) for _ in range(len(grid) - 1)]
        # last axis is the reference; the others are ratio * reference (D2)
        base = (volume / math.prod(ratios)) ** (1 / len(grid))
        sides = [r * base for r in ratios] + [base]
        return tuple(max(1, min(round(s), gs)) for s, gs in zip(sides, grid))  # D1: may equal G

    def _context_shape(self, g: torch.Generator) -> Shape:
        c = self.config
        scale = _uniform(g, *c.context_scale)
        side = (self.num_tokens * scale) ** (1 / len(self.grid))
        if c.reference_quirks:
            return tuple(max(1, min(round(side), gs - 1 if gs > 1 else 1)) for gs in self.grid)
        return tuple(max(1, min(round(side), gs)) for gs in self.grid)

    def block_shapes(self, step: int) -> tuple[Shape, Shape]:
        """(target shape, context shape) for `step`: identical on every worker and rank."""
        g = _generator(self.seed, step, 0x5175)
        return self._target_shape(g), self._context_shape(g)

    # ------------------------------------------------------------------ positions
    def _boxes(self, shape: Shape, count: int, g: torch.Generator) -> torch.Tensor:
        """`count` boolean grids, each with one box of `shape` at a random corner."""
        starts = []
        for size, gs in zip(shape, self.grid):
            # D1: inclusive upper corner; Q3 (quirks): exclusive, never touching the last slab
            high = gs - size + (0 if self.config.reference_quirks else 1)
            starts.append(torch.randint(0, max(high, 1), (count,), generator=g))
        masks = torch.ones((count, *self.grid), dtype=torch.bool)
        for axis, (size, gs) in enumerate(zip(shape, self.grid)):
            ar = torch.arange(gs)
            inside = (ar[None, :] >= starts[axis][:, None]) & (ar[None, :] < starts[axis][:, None] + size)
            view = [count] + [1] * len(self.grid)
            view[axis + 1] = gs
            masks &= inside.view(view)
        return masks

    def _sample_one(self, target_shape: Shape, context_shape: Shape,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        m = c.num_targets
        tries = 0
        targets = self._boxes(target_shape, m, g)
        while True:
            forbidden = targets.any(0) if not c.allow_overlap else torch.zeros(self.grid, dtype=torch.bool)
            if c.reference_quirks and tries >= c.max_tries:
                # Q4: the released code drops constraints from the last targets after 20 failures
                relax = min(m, tries // c.max_tries)
                forbidden = targets[: m - relax].any(0) if m - relax > 0 else torch.zeros_like(forbidden)
                if tries % c.max_tries == 0:
                    logger.warning("mask sampler: relaxing the context constraint of %d targets", relax)
            context = self._boxes(context_shape, 1, g)[0] & ~forbidden
            if int(context.sum()) > c.min_keep:
                return context, targets
            tries += 1
            if not c.reference_quirks and tries % c.max_tries == 0:
                targets = self._boxes(target_shape, m, g)  # D3: redraw targets, never relax
            if tries > 1000 * c.max_tries:
                raise RuntimeError(f"mask sampler: no context with more than {c.min_keep} tokens after "
                                   f"{tries} tries on grid {self.grid}; lower target_scale or min_keep")

    def sample_untrimmed(self, batch_size: int, step: int, rank: int = 0, stream: int = 0
                         ) -> tuple[list[torch.Tensor], torch.Tensor, Shape, Shape, torch.Generator]:
        """Per-sample contexts before trimming, targets [M, B, Kt], shapes, and the generator."""
        target_shape, context_shape = self.block_shapes(step)
        g = _generator(self.seed, step, rank, stream, 0x9051)
        contexts, targets = [], []
        for _ in range(batch_size):
            ctx, tgt = self._sample_one(target_shape, context_shape, g)
            contexts.append(torch.nonzero(ctx.flatten()).squeeze(1))
            targets.append(torch.nonzero(tgt.flatten(1), as_tuple=False))
        kt = math.prod(target_shape)
        target = torch.stack([t[:, 1].view(self.config.num_targets, kt) for t in targets], dim=1)
        return contexts, target.long(), target_shape, context_shape, g

    def __call__(self, batch_size: int, step: int, rank: int = 0, stream: int = 0) -> MaskBatch:
        contexts, target, target_shape, context_shape, g = self.sample_untrimmed(
            batch_size, step, rank, stream)
        keep = min(len(x) for x in contexts)
        if self.config.reference_quirks:
            context = torch.stack([x[:keep] for x in contexts])  # Q5: raster trim
        else:  # D4: random subset, then sorted
            context = torch.stack([torch.sort(x[torch.randperm(len(x), generator=g)[:keep]]).values
                                   for x in contexts])
        return MaskBatch(context.long(), target, target_shape, context_shape)
