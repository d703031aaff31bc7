"""One pass over a labeled set: every feature the probes need, for every encoder and the baselines.

Each batch of cases is prepared once (`labeled.prepare_case`) and fed to every encoder (one
forward pass each, `PretrainedEncoder.layer_maps`), so memory holds only what the probes read:

- pooled features [E] per case (collapse statistics) and the volume probe's read-out;
- the final tokens at a seeded subset of the encoder's token positions (collapse statistics);
- the token read-out (`ProbeConfig.token_readout`) at a seeded subset of the probe grid's
  positions, with their labels (token probe);
- the token read-out of the tokens carrying a context label (context probe), at most
  `max_tokens_per_case` of them per case, flattened over cases with the case each belongs to;
- the encoder-free baseline features of the same tokens (`baselines.py`).

Memory per encoder: cases × tokens kept × F × 4 bytes for the token read-out, F = E ("final") or
the sum of every depth's width ("layers": E × (depth + 2) for Primus); bound it with
`max_tokens_per_case`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nnssl.errors import InvalidInput
from nnssl.evaluation.labeled import LabeledSet, Preparation, prepare_case, token_labels
from nnssl.evaluation.probe import ProbeConfig
from nnssl.log import progress


@dataclass
class Features:
    """One encoder's features of every case (see module docstring)."""

    pooled: list[np.ndarray] = field(default_factory=list)  # [B, E] per batch
    readout: list[np.ndarray] = field(default_factory=list)  # [B, F_volume] per batch ("layers" pooling only)
    tokens: list[np.ndarray] = field(default_factory=list)  # [B, K, E]: final tokens, encoder grid
    probe_tokens: list[np.ndarray] = field(default_factory=list)  # [B, K', F]: token read-out, probe grid
    context: list[np.ndarray] = field(default_factory=list)  # [T_i, F] per case

    def stacked(self) -> dict[str, np.ndarray]:
        pooled = np.concatenate(self.pooled)
        tokens = np.concatenate(self.tokens)
        return {"pooled": pooled, "readout": np.concatenate(self.readout) if self.readout else pooled,
                "tokens": tokens, "probe_tokens": np.concatenate(self.probe_tokens) if self.probe_tokens else tokens,
                "context": np.concatenate(self.context) if self.context else np.zeros((0, 0), np.float32)}


@dataclass
class Extracted:
    """Everything the probes read: per-encoder `features`, the token labels [n, K'] at the probe
    positions, the context tokens' labels [T] and cases [T], and the baselines' features."""

    features: dict[str, Features]
    grid: tuple[int, int, int]  # the probe grid
    positions: np.ndarray  # kept encoder-grid positions (collapse statistics)
    probe_positions: np.ndarray  # kept probe-grid positions (token probe)
    token_labels: np.ndarray | None = None
    context_labels: np.ndarray | None = None
    context_cases: np.ndarray | None = None
    token_baselines: dict[str, list[np.ndarray]] = field(default_factory=dict)
    context_baselines: dict[str, list[np.ndarray]] = field(default_factory=dict)


def kept_positions(num_tokens: int, limit: int, seed: int) -> np.ndarray:
    """The token positions every case contributes to the token probe: all of them, or a seeded
    sorted subset of `limit` (the same for every case and both encoders)."""
    if num_tokens <= limit:
        return np.arange(num_tokens)
    return np.sort(np.random.default_rng([seed, 3]).choice(num_tokens, limit, replace=False))


def probe_grid(encoder: Any, probe_cell: int) -> tuple[int, int, int]:
    """The grid the token and context probes label: the encoder's token grid, or cells of
    `probe_cell` voxels (so a ResEnc, whose bottleneck has one token per 32³ voxels, can be
    probed on the 8³ cells of a Primus)."""
    if probe_cell == 0:
        return tuple(encoder.grid)
    if any(s % probe_cell for s in encoder.patch_size):
        raise InvalidInput(f"probe cell {probe_cell} does not divide the encoder's input shape {encoder.patch_size}; "
                           "choose a cell size that divides it (e.g. 8), or 0 for the encoder's own token grid")
    return tuple(s // probe_cell for s in encoder.patch_size)  # type: ignore[return-value]


def _context_positions(labels: np.ndarray, context_labels: tuple[int, ...], limit: int, seed: int,
                       case: int) -> np.ndarray:
    """Probe-grid positions of a case's tokens with a context label; a seeded subset of `limit`
    when there are more (the same for every encoder)."""
    found = np.flatnonzero(np.isin(labels, context_labels))
    if len(found) > limit:
        found = np.sort(np.random.default_rng([seed, 5, case]).choice(found, limit, replace=False))
    return found


def extract(encoders: dict[str, Any], labeled: LabeledSet, prep: Preparation, probe: ProbeConfig,
            batch_size: int = 4, token_baselines: tuple[str, ...] | None = None) -> Extracted:
    """The one pass of the module docstring; `token_baselines` names the token probe's baselines
    (default `baselines.TOKEN_BASELINES`)."""
    from nnssl.evaluation.baselines import TOKEN_BASELINES, token_baseline_features
    from nnssl.export.features import concat_layer_means, readout_tokens

    first = next(iter(encoders.values()))
    grid = probe_grid(first, probe.probe_cell)
    out = Extracted({name: Features() for name in encoders}, grid,
                    kept_positions(first.num_tokens, probe.max_tokens_per_case, probe.seed),
                    kept_positions(math.prod(grid), probe.max_tokens_per_case, probe.seed))
    same_tokens = grid == tuple(first.grid) and probe.token_readout == "final"
    tok_labels: list[np.ndarray] = []
    ctx_labels: list[np.ndarray] = []
    ctx_cases: list[np.ndarray] = []
    index = torch.from_numpy(out.positions)
    probe_index = torch.from_numpy(out.probe_positions)
    cases = labeled.cases
    with progress(total=len(cases), unit="case", desc="features", leave=False) as bar:
        for start in range(0, len(cases), batch_size):
            batch = [prepare_case(case, prep) for case in cases[start:start + batch_size]]
            volumes = torch.from_numpy(np.stack([volume for volume, _ in batch]))
            context_at: list[np.ndarray] = []
            if labeled.has_label_maps:
                for i, (volume, label) in enumerate(batch):
                    labels = token_labels(label, grid, probe.token_label)
                    tok_labels.append(labels[out.probe_positions])
                    context = None
                    if labeled.context_labels:
                        context = _context_positions(labels, labeled.context_labels, probe.max_tokens_per_case,
                                                     probe.seed, start + i)
                        context_at.append(context)
                        ctx_labels.append(labels[context])
                        ctx_cases.append(np.full(len(context), start + i))
                    if probe.baselines:
                        kept, ctx = token_baseline_features(volume, grid, out.probe_positions, context,
                                                            token_baselines or TOKEN_BASELINES)
                        for name, value in kept.items():
                            out.token_baselines.setdefault(name, []).append(value)
                        for name, value in ctx.items():
                            out.context_baselines.setdefault(name, []).append(value)
            for name, encoder in encoders.items():
                maps = encoder.layer_maps(volumes)
                layers = [m.flatten(2).transpose(1, 2) for m in maps]  # [B, N_l, E_l] in token order
                final = layers[-1]
                feats = out.features[name]
                feats.pooled.append(final.mean(1).cpu().numpy())
                if probe.pooling == "layers":
                    feats.readout.append(concat_layer_means(layers).cpu().numpy())
                feats.tokens.append(final[:, index.to(final.device)].cpu().numpy())
                if not labeled.has_label_maps:
                    continue
                dense = final if same_tokens else readout_tokens(maps, probe.token_readout, grid)
                if not same_tokens:
                    feats.probe_tokens.append(dense[:, probe_index.to(dense.device)].cpu().numpy())
                for i, at in enumerate(context_at):
                    feats.context.append(dense[i, torch.from_numpy(at).to(dense.device)].cpu().numpy())
            bar.update(len(batch))
    if tok_labels:
        out.token_labels = np.stack(tok_labels)
    if labeled.context_labels:
        out.context_labels = np.concatenate(ctx_labels)
        out.context_cases = np.concatenate(ctx_cases)
    return out


def check_context_splits(ex: Extracted, splits: list[tuple[np.ndarray, np.ndarray]], labeled: LabeledSet) -> None:
    """Every split needs context tokens on both sides, or the context probe has nothing to fit or score."""
    for s, (train, test) in enumerate(splits):
        for side, cases in (("training", train), ("test", test)):
            if not np.isin(ex.context_cases, cases).any():
                raise InvalidInput(f"{labeled.folder}: no {side} case of split {s} has a token labelled "
                                   f"{list(labeled.context_labels)} (the context labels) at the probe grid's "
                                   "cell centres; add cases, or check that the context structures lie inside the "
                                   "encoder's input")
