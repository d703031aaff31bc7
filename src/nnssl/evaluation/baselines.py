"""Encoder-free token features: what a token's own voxels can do, and what context can.

A probe score means little without knowing what the task needs. These features are computed
from the prepared volume alone (the encoder's input, on the probe grid) and probed exactly like
the encoders' tokens (same splits, same logistic regression):

- `raw_cell_statistics`: mean, std, min, max and the 5/25/50/75/95% quantiles of the token's own
  cell (8³ voxels for Primus): "a voxel's own intensity", summarised;
- `raw_cell_voxels`: every voxel of the cell, unsummarised: what a linear patch embedding (a
  random-init ViT's first layer) can see;
- `raw_cell_statistics_and_position`, `raw_cell_voxels_and_position`: the same plus the token's
  grid position (one-hot per axis; a ViT adds a position embedding to every token), so a label
  tied to where a token sits is visible too;
- `context_oracle`: the statistics of every cell within `ORACLE_RADIUS` cells (a 5×5×5-cell
  neighbourhood, zeros beyond the input) plus the position: a hand-made feature with context.

On the default phantom labels (background / body / organs / bone) a token's own voxels and
position already score high, above a random-init ViT: those labels are nearly a function of
intensity and place. On a context task (paired organs, `nnssl.data.paired_organs`) the own-cell
features stay at chance and the oracle does not: the gap is what an encoder's context has to
fill. (The token probe gets the statistics only by default, `TOKEN_BASELINES`; the context
probe, with few tokens, gets them all, `CONTEXT_BASELINES`.)
"""

from __future__ import annotations

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
STATISTICS = ("mean", "std", "min", "max", *(f"q{round(100 * q):02d}" for q in QUANTILES))
ORACLE_RADIUS = 2  # cells on each side: 5×5×5 cells = 40 mm at 8 mm cells
OWN_CELL_BASELINES = ("raw_cell_statistics", "raw_cell_voxels", "raw_cell_statistics_and_position",
                      "raw_cell_voxels_and_position")
# the token probe fits up to 20,000 tokens: its voxel baselines (512+ features, 6-7 labels) would
# cost more than the evaluation itself (about 35 s against 16-21 s on 480 phantoms), so by
# default it gets the statistics only; the context probe's few tokens get every baseline
TOKEN_BASELINES = ("raw_cell_statistics", "raw_cell_statistics_and_position")
CONTEXT_BASELINES = (*OWN_CELL_BASELINES, "context_oracle")


def cell_voxels(volume: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """[X, Y, Z] (or [1, X, Y, Z]) on a shape that is a multiple of `grid` -> [N, V]: the voxels of
    each cell, cells in C order over `grid` (the token order), voxels in C order within the cell."""
    volume = np.asarray(volume)
    if volume.ndim == 4:
        volume = volume[0]
    cell = tuple(s // g for s, g in zip(volume.shape, grid))
    if any(s != g * c for s, g, c in zip(volume.shape, grid, cell)):
        raise ValueError(f"volume {volume.shape} is not a multiple of the probe grid {grid}")
    (gx, gy, gz), (cx, cy, cz) = grid, cell
    blocks = volume.reshape(gx, cx, gy, cy, gz, cz).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(blocks.reshape(gx * gy * gz, cx * cy * cz), dtype=np.float32)


def cell_statistics(cells: np.ndarray) -> np.ndarray:
    """[N, V] -> [N, len(STATISTICS)] in the order of `STATISTICS`."""
    quantiles = np.quantile(cells, QUANTILES, axis=1).T
    return np.concatenate([cells.mean(1, keepdims=True), cells.std(1, keepdims=True), cells.min(1, keepdims=True),
                           cells.max(1, keepdims=True), quantiles], axis=1).astype(np.float32)


def position_features(grid: tuple[int, int, int]) -> np.ndarray:
    """[N, gx + gy + gz]: a one-hot of each token's index along each axis (any additive function
    of the position is linear in these; a full one-hot would grow with the cube of the grid)."""
    index = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=1)
    return np.concatenate([np.eye(g, dtype=np.float32)[index[:, a]] for a, g in enumerate(grid)], axis=1)


def neighbourhood_statistics(stats: np.ndarray, grid: tuple[int, int, int], radius: int = ORACLE_RADIUS) -> np.ndarray:
    """[N, S] per-cell statistics -> [N, (2r+1)³ · S]: each token gets the statistics of every cell
    at offsets -r..r on each axis (in a fixed offset order, zeros beyond the grid), so a linear
    probe can weigh "what lies one cell anterior" differently from "one cell to the left"."""
    k = 2 * radius + 1
    padded = np.pad(stats.reshape(*grid, -1), [(radius, radius)] * 3 + [(0, 0)])
    gx, gy, gz = grid
    shifted = [padded[dx:dx + gx, dy:dy + gy, dz:dz + gz] for dx in range(k) for dy in range(k) for dz in range(k)]
    return np.concatenate(shifted, axis=-1).reshape(gx * gy * gz, -1)


def token_baseline_features(volume: np.ndarray, grid: tuple[int, int, int], positions: np.ndarray,
                            context: np.ndarray | None = None,
                            token_baselines: tuple[str, ...] = TOKEN_BASELINES,
                            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Baseline features of one prepared volume: (for the kept `positions` [K]: name -> [K, F] for
    `token_baselines` (any of `OWN_CELL_BASELINES`); for the positions `context` [T] (tokens with
    a context label; None: none) name -> [T, F] for `CONTEXT_BASELINES`)."""
    cells = cell_voxels(volume, grid)
    stats = cell_statistics(cells)
    position = position_features(grid)
    own = {"raw_cell_statistics": stats, "raw_cell_voxels": cells,
           "raw_cell_statistics_and_position": np.concatenate([stats, position], axis=1),
           "raw_cell_voxels_and_position": np.concatenate([cells, position], axis=1)}
    kept = {name: own[name][positions] for name in token_baselines}
    if context is None:
        return kept, {}
    own["context_oracle"] = np.concatenate([neighbourhood_statistics(stats, grid), position], axis=1)
    return kept, {name: value[context] for name, value in own.items()}
