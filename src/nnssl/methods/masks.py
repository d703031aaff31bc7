"""I-JEPA multi-block masks on a 3D (or 2D) token grid (documentation/ijepa_masking.md).

For every volume of a batch the sampler places M target boxes and one context cube, and removes
the target tokens from the context. The predictor learns to predict the teacher's features of
each target box from the context tokens.

Determinism. Block *sizes* come from a generator seeded by (seed, step) only, so every
DataLoader worker and every DDP rank agrees on them and all targets of a batch have one shape
(tests/test_masks.py, M5). *Positions* come from a generator seeded by (seed, step, rank, stream): ranks and
worker streams see different masks, yet a batch is a pure function of its arguments, so an
exact resume needs nothing but the step (M12). Seeds are hashed with blake2b, not Python's
salted `hash()`, so they agree across processes.

Default behaviour fixes four quirks of the released 2D code:
  D1  corners are drawn inclusively and a side may span the whole axis (fixes Q2, Q3: the
      released code never masks the last row/column);
  D2  scale and aspect are independent draws, aspect ratios are log-uniform, two of them in 3D
      (fixes Q1: one uniform drove both, so large blocks were always tall);
  D3  the context never overlaps a target: after `max_tries * num_targets` failed context draws
      the target positions are redrawn (fixes Q4, which dropped the disjointness constraint);
  D4  contexts are cut to the batch minimum by a random subset (fixes Q5: keeping the first Kc
      raster indices always dropped the bottom/right of the context).
`MaskConfig(reference_quirks=True)` reproduces Q1-Q5 so the sampler can be checked against the
paper's context ratio (test M10).

Token index convention: C-order over the grid, n = (i*Gy + j)*Gz + k, which is Primus's
`b c w h d -> b (w h d) c` flattening (tests/test_masks.py, M11).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from nnssl.errors import NnsslError
from nnssl.log import get_logger

logger = get_logger(__name__)

Shape = tuple[int, ...]

# After this many target placements without a valid context, sampling is declared impossible.
_MAX_TARGET_PLACEMENTS = 50


class InvalidMaskConfig(NnsslError, ValueError):
    """A MaskConfig or sampler grid that cannot work; `problems` lists every issue."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid mask sampler settings: " + "; ".join(self.problems))


class MaskSamplingError(NnsslError):
    """No context with more than `min_keep` tokens outside the targets could be placed."""


@dataclass(frozen=True)
class MaskConfig:
    """Multi-block masking settings; defaults are the I-JEPA ImageNet configs (Assran et al. 2023).

    Scales are fractions of the number of tokens of the grid. `max_tries` is the number of
    context draws per constraint level before the released code relaxes a constraint (Q4,
    quirks mode) or, per target, before this sampler redraws the target positions (D3).
    """

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
            value = getattr(self, name)
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                problems.append(f"{name}={value!r} must be a pair of numbers (low, high)")
                continue
            object.__setattr__(self, name, (lo, hi))  # lists from JSON become hashable tuples
            upper = math.inf if name == "target_aspect" else 1.0
            if not (0 < lo <= hi <= upper):
                bound = "" if name == "target_aspect" else " <= 1"
                problems.append(f"{name}={value!r} must satisfy 0 < low <= high{bound}")
        if int(self.num_targets) != self.num_targets or self.num_targets < 1:
            problems.append(f"num_targets={self.num_targets!r} must be an integer >= 1")
        if int(self.min_keep) != self.min_keep or self.min_keep < 0:
            problems.append(f"min_keep={self.min_keep!r} must be an integer >= 0")
        if int(self.max_tries) != self.max_tries or self.max_tries < 1:
            problems.append(f"max_tries={self.max_tries!r} must be an integer >= 1")
        if problems:
            raise InvalidMaskConfig(problems)


@dataclass(frozen=True)
class MaskBatch:
    """Token indices of one batch. The predictor and loss use block-major order:
    `targets.reshape(M * B, Kt)` has row m*B + b for block m of sample b."""

    context: torch.Tensor  # int64 [B, Kc], each row sorted ascending, no duplicates
    targets: torch.Tensor  # int64 [M, B, Kt], each row sorted ascending (a full box)
    target_shape: Shape    # the box shape shared by every target of the batch
    context_shape: Shape   # the context cube before the targets were removed

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskBatch:
        return MaskBatch(self.context.to(device, non_blocking=non_blocking),
                         self.targets.to(device, non_blocking=non_blocking),
                         self.target_shape, self.context_shape)

    def rows(self, start: int, stop: int) -> MaskBatch:
        """Samples start .. stop − 1 (one rank's share of a global batch)."""
        return MaskBatch(self.context[start:stop], self.targets[:, start:stop], self.target_shape,
                         self.context_shape)

    def for_rank(self, rank: int, world_size: int) -> MaskBatch:
        """Rank `rank`'s equal share of this global batch."""
        per_rank, rest = divmod(self.context.shape[0], world_size)
        if rest or not 0 <= rank < world_size:
            raise ValueError(f"cannot split a batch of {self.context.shape[0]} into {world_size} equal shares "
                             f"for rank {rank}")
        return self.rows(rank * per_rank, (rank + 1) * per_rank)


class UntrimmedMasks(NamedTuple):
    """A batch before contexts are cut to a common length (for inspection and tests)."""

    contexts: list[torch.Tensor]  # per sample, sorted int64 indices (lengths differ)
    context_mask: torch.Tensor    # bool [B, N], the same contexts as a mask over the grid
    targets: torch.Tensor         # int64 [M, B, Kt]
    target_shape: Shape
    context_shape: Shape


def flatten_coords(coords: torch.Tensor, grid: Shape) -> torch.Tensor:
    """[..., ndim] integer coordinates -> C-order flat index (n = (i*Gy + j)*Gz + k)."""
    index = torch.zeros(coords.shape[:-1], dtype=torch.int64, device=coords.device)
    for axis, size in enumerate(grid):
        index = index * int(size) + coords[..., axis].long()
    return index


def unflatten_index(index: torch.Tensor, grid: Shape) -> torch.Tensor:
    """C-order flat index -> [..., ndim] integer coordinates (inverse of `flatten_coords`)."""
    coords = []
    rest = index.long()
    for size in reversed(grid):
        coords.append(rest % int(size))
        rest = rest // int(size)
    return torch.stack(coords[::-1], dim=-1)


def seeded_generator(*parts: object) -> torch.Generator:
    """A torch.Generator seeded by a stable hash of `parts` (never the global RNG), so masks are a
    pure function of (seed, step, ...) in every process; shared by the I-JEPA and MAE samplers."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + float(torch.rand((), generator=g)) * (hi - lo)


class MultiBlockMaskSampler:
    """Samples (context, targets) token indices for a batch on a fixed token grid.

    Vectorised over the batch: every volume is a boolean mask over the grid (20³ = 8000
    tokens), and rejection sampling redraws only the samples whose context failed.
    """

    def __init__(self, grid: Shape, config: MaskConfig = MaskConfig(), seed: int = 0) -> None:
        grid = tuple(grid)
        if len(grid) not in (2, 3) or any(int(g) != g or g < 1 for g in grid):
            raise InvalidMaskConfig([f"grid {grid} must have 2 or 3 positive integer sides"])
        self.grid: Shape = tuple(int(g) for g in grid)
        self.config = config
        self.seed = int(seed)
        self.num_tokens = math.prod(self.grid)
        # the largest context cube this config can draw must be able to hold min_keep + 1 tokens
        largest = math.prod(self._context_sides(config.context_scale[1]))
        if largest <= config.min_keep:
            raise InvalidMaskConfig([
                f"min_keep={config.min_keep} cannot be met on grid {self.grid}: the largest "
                f"context block has {largest} tokens; lower min_keep or raise context_scale"])
        self._arange = [torch.arange(g) for g in self.grid]

    # ------------------------------------------------------------------ sizes
    def _target_sides(self, g: torch.Generator) -> Shape:
        c, grid, n = self.config, self.grid, self.num_tokens
        if c.reference_quirks:
            # Q1: one uniform drives both scale and aspect; Q2: every side stays below G
            u = float(torch.rand((), generator=g))
            volume = int(n * (c.target_scale[0] + u * (c.target_scale[1] - c.target_scale[0])))
            aspect = c.target_aspect[0] + u * (c.target_aspect[1] - c.target_aspect[0])
            if len(grid) == 2:
                sides = [math.sqrt(volume * aspect), math.sqrt(volume / aspect)]
            else:  # the released code is 2D; keep "axis0/axis1 = aspect" and volume in 3D
                cube = volume ** (1 / 3)
                sides = [cube * math.sqrt(aspect), cube / math.sqrt(aspect), cube]
            return tuple(max(1, min(round(s), gs - 1)) for s, gs in zip(sides, grid))
        # D2: independent scale and log-uniform ratios of every axis to the last one
        volume = math.floor(n * _uniform(g, *c.target_scale))
        log_lo, log_hi = math.log(c.target_aspect[0]), math.log(c.target_aspect[1])
        ratios = [math.exp(_uniform(g, log_lo, log_hi)) for _ in range(len(grid) - 1)]
        last = (volume / math.prod(ratios)) ** (1 / len(grid))
        sides = [r * last for r in ratios] + [last]
        return tuple(max(1, min(round(s), gs)) for s, gs in zip(sides, grid))  # D1: may equal G

    def _context_sides(self, scale: float) -> Shape:
        if self.config.reference_quirks:  # the released code: int(N*s) tokens, sides below G
            side = round(int(self.num_tokens * scale) ** (1 / len(self.grid)))
            return tuple(max(1, min(side, gs - 1)) for gs in self.grid)
        side = round((self.num_tokens * scale) ** (1 / len(self.grid)))
        return tuple(max(1, min(side, gs)) for gs in self.grid)

    def block_shapes(self, step: int) -> tuple[Shape, Shape]:
        """(target shape, context shape) of `step`: a pure function of (seed, step)."""
        g = seeded_generator("sizes", self.seed, int(step))
        target = self._target_sides(g)
        return target, self._context_sides(_uniform(g, *self.config.context_scale))

    # ------------------------------------------------------------------ positions
    def _corners(self, shape: Shape, count: int, g: torch.Generator) -> torch.Tensor:
        """[count, ndim] lowest corners of boxes of `shape`."""
        quirks = self.config.reference_quirks
        # D1: corner in 0..G-s inclusive; Q3: randint(0, G-s) excludes G-s (last slab never used)
        highs = [max(gs - s, 1) if quirks else gs - s + 1 for s, gs in zip(shape, self.grid)]
        return torch.stack([torch.randint(0, h, (count,), generator=g) for h in highs], dim=1)

    def _box_masks(self, corners: torch.Tensor, shape: Shape) -> torch.Tensor:
        """bool [count, N]: one box of `shape` per row of `corners`."""
        count, ndim = corners.shape
        mask = torch.ones((count,) + (1,) * ndim, dtype=torch.bool)
        for axis, (size, ar) in enumerate(zip(shape, self._arange)):
            start = corners[:, axis:axis + 1]
            inside = (ar >= start) & (ar < start + size)  # [count, G_axis]
            view = [count] + [1] * ndim
            view[axis + 1] = ar.numel()
            mask = mask & inside.view(view)
        return mask.reshape(count, self.num_tokens)

    def _box_offsets(self, shape: Shape) -> torch.Tensor:
        """Flat offsets of a box at the origin, ascending (C-order), so corner + offsets is sorted."""
        coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1)
        return flatten_coords(coords.reshape(-1, len(shape)), self.grid)

    def _forbidden_levels(self, corners: torch.Tensor, shape: Shape) -> torch.Tensor:
        """bool [P, L, N]: level l holds the tokens a context may not use after l relaxations.

        Computed once per target placement so each rejection round is one gather; a single
        level unless quirks mode relaxes constraints (Q4: level l keeps the first M - l targets).
        """
        c, count = self.config, corners.shape[0]
        if c.allow_overlap:
            return torch.zeros(count, 1, self.num_tokens, dtype=torch.bool)
        boxes = self._box_masks(corners.reshape(count * c.num_targets, -1), shape).view(count, c.num_targets, -1)
        if not c.reference_quirks:
            return boxes.any(1, keepdim=True)  # D3: never relaxed
        prefix = boxes.cumsum(1, dtype=torch.int16) > 0  # union of the first l+1 targets
        empty = torch.zeros(count, 1, self.num_tokens, dtype=torch.bool)
        return torch.cat([empty, prefix], 1).flip(1)  # level l = union of the first M - l targets

    def _draw(self, batch_size: int, step: int, rank: int, stream: int
              ) -> tuple[torch.Tensor, torch.Tensor, Shape, Shape, torch.Generator]:
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        c, m = self.config, self.config.num_targets
        target_shape, context_shape = self.block_shapes(step)
        g = seeded_generator("positions", self.seed, int(step), int(rank), int(stream))
        corners = self._corners(target_shape, batch_size * m, g).view(batch_size, m, -1)
        levels = self._forbidden_levels(corners, target_shape)
        context = torch.zeros(batch_size, self.num_tokens, dtype=torch.bool)
        failures = torch.zeros(batch_size, dtype=torch.int64)  # context draws rejected so far
        redraw_every = c.max_tries * m
        pending = torch.arange(batch_size)
        draws = 1
        while pending.numel():
            # `draws` candidates per pending sample in one go (doubling each round), so a hard
            # sample costs a few rounds, not hundreds; the first valid candidate is taken
            p = pending.numel()
            tried = failures[pending, None] + torch.arange(draws)  # [P, draws] draw counters
            level = (tried // c.max_tries).clamp_max(levels.shape[1] - 1)  # Q4 level of each draw
            candidate = self._box_masks(self._corners(context_shape, p * draws, g), context_shape)
            candidate = candidate.view(p, draws, -1) & ~levels[pending[:, None], level]
            ok = candidate.sum(2) > c.min_keep  # strictly more than min_keep, as released
            found = ok.any(1)
            first = ok.to(torch.int8).argmax(1)
            context[pending[found]] = candidate[found, first[found]]
            before = failures[pending]
            failures[pending] += torch.where(found, first, draws)
            pending, before = pending[~found], before[~found]
            draws = min(2 * draws, c.max_tries)
            if not pending.numel():
                break
            after = failures[pending]
            if c.reference_quirks:
                relaxed = (after // c.max_tries > before // c.max_tries) & (before // c.max_tries < m)
                if bool(relaxed.any()):
                    logger.warning("mask sampler (reference_quirks): no valid context after %d draws for "
                                   "%d sample(s); dropping a target constraint, contexts may overlap "
                                   "targets (Q4)", c.max_tries, int(relaxed.sum()))
                continue
            redraw = pending[after // redraw_every > before // redraw_every]
            if redraw.numel():  # D3: move the targets instead of relaxing disjointness
                if int(failures[redraw].max()) >= redraw_every * _MAX_TARGET_PLACEMENTS:
                    raise MaskSamplingError(
                        f"mask sampler: on grid {self.grid} (step {step}) no context block of shape "
                        f"{context_shape} kept more than min_keep={c.min_keep} tokens outside {m} target "
                        f"boxes of shape {target_shape}, over {_MAX_TARGET_PLACEMENTS} target placements; "
                        "lower target_scale, num_targets or min_keep, or raise context_scale")
                logger.debug("mask sampler: redrawing the targets of %d sample(s) (D3)", redraw.numel())
                corners[redraw] = self._corners(target_shape, redraw.numel() * m, g).view(redraw.numel(), m, -1)
                levels[redraw] = self._forbidden_levels(corners[redraw], target_shape)
        base = flatten_coords(corners, self.grid)  # [B, M]
        target_index = base[..., None] + self._box_offsets(target_shape)  # [B, M, Kt], rows sorted
        return context, target_index.transpose(0, 1).contiguous(), target_shape, context_shape, g

    def sample_untrimmed(self, batch_size: int, step: int, rank: int = 0, stream: int = 0) -> UntrimmedMasks:
        """The batch `__call__` returns for the same arguments, before contexts are trimmed."""
        context, targets, target_shape, context_shape, _ = self._draw(batch_size, step, rank, stream)
        contexts = [torch.nonzero(row).squeeze(1) for row in context]
        return UntrimmedMasks(contexts, context, targets, target_shape, context_shape)

    def __call__(self, batch_size: int, step: int, rank: int = 0, stream: int = 0) -> MaskBatch:
        """Masks for `batch_size` volumes at optimizer step `step` on DDP rank `rank`;
        `stream` separates independent consumers on one rank (e.g. DataLoader workers)."""
        context, targets, target_shape, context_shape, g = self._draw(batch_size, step, rank, stream)
        keep = int(context.sum(1).min())
        if self.config.reference_quirks:  # Q5: keep the first Kc raster indices
            chosen = context & (context.cumsum(1) <= keep)
        else:  # D4: a uniformly random subset of Kc tokens of every context
            # random integer keys made unique by the token index, so exactly Kc keys are <= the
            # Kc-th smallest; a selection (kthvalue) is about twice as fast as sorting 8000 keys
            n = self.num_tokens
            keys = torch.randint(0, 2**62 // n, context.shape, generator=g) * n + torch.arange(n)
            keys.masked_fill_(~context, 2**62)
            chosen = keys <= keys.kthvalue(keep, dim=1, keepdim=True).values
        index = torch.nonzero(chosen)[:, 1].view(batch_size, keep)  # row-major: each row sorted
        return MaskBatch(index, targets, target_shape, context_shape)
