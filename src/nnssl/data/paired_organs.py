"""Paired organs: a phantom layout whose dense labels need context, not a voxel's own intensity.

The default phantoms' label maps (background, body, organs, bone) are almost a function of a
token's own voxels and position: a linear probe on exactly those scores above a random ViT's
tokens (documentation/evaluation.md), so a token probe on them cannot tell whether an encoder
learned anything about anatomy. Segmentation
needs more: structures of the same tissue told apart by where they are relative to other
anatomy (left vs right kidney, the lobe next to the liver, ...).

With `PhantomConfig(paired_organs=True)` every phantom gets two **twin organs** of one tissue,
mirror images of each other across the body's midline (same size, same shape, same depth, same
height), posterior-lateral like kidneys. A **landmark** (organ 3, "organ_a" with its bright
core 4) sits anterior to one of them, on a side that alternates over the collection, and the
second organ (5, smaller, another tissue) anterior to the other. The twins' labels say which one is on the
landmark's side:

- 7 `twin_landmark_side`: the twin on the landmark's side,
- 8 `twin_other_side`: its mirror image.

Why this needs context, by construction:
- both twins have the same tissue value, the same geometry (mirrored) and the same texture and
  noise statistics, so the intensities inside them have one distribution;
- the landmark's side alternates within each class (`phantoms.landmark_side`), independent of
  everything else, and `cases.json` gives each case a split stratum (class x side), so in every
  training half a twin's position (left or right), its shape and its own voxels say nothing
  about its label;
- at least 0.08 units (2 mm at 48³) of body separate the twins from the landmark and the second
  organ in the anterior-posterior direction, so on the centre crop's 8³ grid (cells from
  ±0.5 to ±7.5 mm and ±8.5 to ±15.5 mm around the centre) the cell of a twin token never holds
  landmark voxels;
- the only cue is what lies one or two cells anterior: the landmark's tissue (280 with a 620
  core in MR, 55/110 HU in CT) or the second organ's (450 / 25 HU). An encoder that keeps its
  neighbourhood in a token's features solves it; one that keeps only the token's own voxels
  cannot.

The key organ (the class label of the volume probe) moves to the anterior midline between the
landmark and the second organ, so a labeled set serves both probes. The other structures
(body, fat rim, bone rod) and the texture and noise are drawn exactly as without the option,
from the same random stream, so the same subject keeps its body and noise; the twins' geometry
and tissue come from a stream of their own.

Units are those of `phantoms._make_grid`: one unit is half the smallest field-of-view side
(24 mm at 48³), so the layout scales with the field of view like the rest of the anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TWIN_LANDMARK_SIDE = 7
TWIN_OTHER_SIDE = 8
PAIRED_LABELS = {TWIN_LANDMARK_SIDE: "twin_landmark_side", TWIN_OTHER_SIDE: "twin_other_side"}
# the labels whose tokens the dense probe classifies (written to cases.json as "context_labels")
CONTEXT_LABELS = (TWIN_LANDMARK_SIDE, TWIN_OTHER_SIDE)
# twin tissue: darker than the body in MR (T1w 190 vs 350), enhancing in CT (135 HU, as a
# contrast-enhanced kidney): distinct from every other structure, the same for both twins
TWIN_TISSUE = {"MR": 190.0, "CT": 135.0}


@dataclass(frozen=True)
class PairedLayout:
    """Centres and semi-axes (grid units, physical x/y/z) of the structures the option moves or adds."""

    organ_a_center: np.ndarray  # the landmark, on `side`
    organ_a_axes: np.ndarray
    organ_b_center: np.ndarray  # the second organ, on the other side
    organ_b_axes: np.ndarray
    key_center: np.ndarray  # anterior midline
    twin_landmark_side_center: np.ndarray
    twin_other_side_center: np.ndarray
    twin_axes: np.ndarray
    twin_value: float


def paired_layout(rng: np.random.Generator, side: float, kind: str) -> PairedLayout:
    """The paired-organ layout of one phantom; `side` (±1, the sign of x) is the landmark's side.

    +y is posterior (the bone rod sits at y ≈ +0.47). Ranges are chosen so that the twins
    (y ≥ 0.22 - 0.26·1.1 > -0.07) and the anterior organs (y ≤ -0.34 + 0.17·1.1 < -0.15) keep a
    gap of at least 0.08 units (2 mm at 48³) between them, and a centre crop of two thirds of
    the field of view holds the twins, the landmark and most of the second organ.
    """
    twin_x = rng.uniform(0.42, 0.48)
    twin_yz = np.array([rng.uniform(0.22, 0.3), rng.uniform(-0.1, 0.1)])
    twin_axes = np.array([0.28, 0.26, 0.45]) * rng.uniform(0.9, 1.1, size=3)
    landmark = np.array([side * rng.uniform(0.42, 0.48), -rng.uniform(0.34, 0.4), rng.uniform(-0.1, 0.1)])
    landmark_axes = np.array([0.26, 0.17, 0.4]) * rng.uniform(0.9, 1.1, size=3)
    second = np.array([-side * rng.uniform(0.42, 0.48), -rng.uniform(0.3, 0.36), rng.uniform(-0.1, 0.1)])
    second_axes = np.array([0.16, 0.14, 0.28]) * rng.uniform(0.9, 1.1, size=3)
    key = np.array([rng.uniform(-0.04, 0.04), -rng.uniform(0.3, 0.36), rng.uniform(-0.1, 0.1)])
    base = TWIN_TISSUE[kind]
    value = base * rng.uniform(0.9, 1.1) if kind == "MR" else base + rng.normal(0, 8)
    return PairedLayout(
        organ_a_center=landmark, organ_a_axes=landmark_axes, organ_b_center=second, organ_b_axes=second_axes,
        key_center=key,
        twin_landmark_side_center=np.array([side * twin_x, *twin_yz]),
        twin_other_side_center=np.array([-side * twin_x, *twin_yz]),
        twin_axes=twin_axes, twin_value=float(value))
