"""Patch placement, region-only reads, foreground sampling and augmentation geometry."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

import nnssl.dataloading.patches as patches
from nnssl.dataloading.augment import (
    AugmentConfig,
    PatchWarp,
    SpatialParams,
    augment_intensity,
    rotation_matrix,
    source_region,
)
from nnssl.dataloading.dataset import load_cases
from nnssl.dataloading.patches import foreground_start, foreground_voxels, random_start, read_padded
from nnssl.dataloading.sampling import PatchSampler, SampleSpec, sample_rng
from nnssl.errors import InvalidInput
from nnssl.preprocessing.storage import open_array, save_array
from test_dataloading_dataset import build_dataset

SPATIAL_ONLY = AugmentConfig(zoom_probability=1.0, rotation_probability=1.0, mirror_probability=0.5,
                             brightness_probability=0.0, contrast_probability=0.0, gamma_probability=0.0)


def _smooth(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.standard_normal(shape), 2).astype(np.float32)


def test_read_padded_pads_with_zeros_and_matches_the_volume(tmp_path):
    volume = np.arange(1 * 10 * 12 * 8, dtype=np.float32).reshape(1, 10, 12, 8) + 1
    save_array(tmp_path / "v.b2nd", volume, patch_size=(8, 8, 8))
    array = open_array(tmp_path / "v.b2nd")
    box = read_padded(array, (-3, 4, 5), (7, 16, 13))
    assert box.shape == (1, 10, 12, 8)
    np.testing.assert_array_equal(box[:, 3:, :8, :3], volume[:, :7, 4:12, 5:8])
    assert not box[:, :3].any() and not box[:, :, 8:].any() and not box[:, :, :, 3:].any()
    assert not read_padded(array, (20, 0, 0), (24, 4, 4)).any()  # entirely outside


@pytest.mark.parametrize("shape", [(40, 30, 20), (10, 16, 5)])
def test_patch_starts_stay_in_bounds_or_cover_small_volumes(shape):
    rng = np.random.default_rng(0)
    patch = (16, 16, 16)
    for _ in range(200):
        start = random_start(shape, patch, rng)
        for s, p, a in zip(shape, patch, start):
            if s >= p:
                assert 0 <= a <= s - p
            else:  # whole volume inside the patch, rest is padding
                assert s - p <= a <= 0
    for voxel in ([0, 0, 0], [s - 1 for s in shape], [s // 2 for s in shape]):
        start = foreground_start(shape, patch, np.array(voxel))
        assert all(a <= v < a + p for a, v, p in zip(start, voxel, patch))


def test_small_volume_is_padded_in_batches(nnssl_roots):
    image = np.ones((1, 6, 20, 9), np.float32)
    cases = load_cases(build_dataset(nnssl_roots.preprocessed, [{"subject": "s", "image": image}]))
    sampler = PatchSampler(cases, SampleSpec((16, 16, 16), augment=AugmentConfig.disabled()))
    data, mask = np.empty((1, 16, 16, 16), np.float32), np.empty((1, 16, 16, 16), bool)
    for i in range(10):
        info = sampler.sample_into(sample_rng(0, i, 0), data, mask)
        assert data.sum() == 6 * 16 * 9  # every voxel of the volume once, zeros elsewhere
        assert info.region[1][0] - info.region[0][0] == 16 and not mask.any()


def test_reads_only_the_region_the_augmentation_needs(nnssl_roots, monkeypatch):
    image = _smooth((1, 64, 64, 64))
    cases = load_cases(build_dataset(nnssl_roots.preprocessed, [{"subject": "s", "image": image}]))
    requested = []
    real = patches.crop_and_pad_nd

    def recording(array, box, **kwargs):  # the in-volume voxels that storage is asked for
        spatial = array.shape[-3:]
        requested.append(int(np.prod([max(0, min(b, s) - max(a, 0)) for (a, b), s in zip(box, spatial)])))
        return real(array, box, **kwargs)

    monkeypatch.setattr(patches, "crop_and_pad_nd", recording)
    patch = (24, 24, 24)
    sampler = PatchSampler(cases, SampleSpec(patch, foreground_probability=0.0))  # default augmentation
    data, mask = np.empty((1, *patch), np.float32), np.empty((1, *patch), bool)
    n_crop, volumes = 0, []
    for i in range(60):
        requested.clear()
        info = sampler.sample_into(sample_rng(3, i, 0), data, mask)
        assert len(requested) == 1  # one read for the image, nothing else
        lo, hi = info.region
        if tuple(h - l for l, h in zip(lo, hi)) == patch:
            n_crop += 1
            assert requested[0] == 24 ** 3  # a plain crop decompresses exactly the patch
        volumes.append(requested[0])
        # rotation ±15° and zoom >= 0.85: the box never exceeds 1.8x the patch per axis
        assert all(h - l <= 1.8 * p for l, h, p in zip(lo, hi, patch))
    assert n_crop > 20  # ~64 % of samples are neither zoomed nor rotated
    # The reference reads a 257³ box per 160³ patch, 4.1x the voxels, for every sample.
    assert np.mean(volumes) < 2.0 * 24 ** 3


def _foreground_dataset(nnssl_roots, with_anatomy: bool):
    image = np.ones((1, 64, 64, 64), np.float32)
    anat = np.zeros((1, 64, 64, 64), np.uint8)
    anat[:, 40:46, 8:14, 50:56] = 1
    if not with_anatomy:
        image = image * anat  # foreground = nonzero voxels
    case = {"subject": "s", "image": image, "anat": anat if with_anatomy else None}
    return load_cases(build_dataset(nnssl_roots.preprocessed, [case]))


@pytest.mark.parametrize("with_anatomy", [True, False])
def test_foreground_sampling_rate(nnssl_roots, with_anatomy):
    cases = _foreground_dataset(nnssl_roots, with_anatomy)
    patch = (16, 16, 16)

    def hit_rate(p: float) -> tuple[float, float]:
        spec = SampleSpec(patch, foreground_probability=p, augment=AugmentConfig.disabled())
        sampler = PatchSampler(cases, spec)
        data, mask = np.empty((1, *patch), np.float32), np.empty((1, *patch), bool)
        hits, forced = 0, 0
        for i in range(300):
            info = sampler.sample_into(sample_rng(1, i, 0), data, mask)
            s = info.start
            contains = all(a < hi and lo < a + 16 for a, lo, hi in zip(s, (40, 8, 50), (46, 14, 56)))
            hits += contains
            forced += info.foreground
            if info.foreground:
                assert contains
        return hits / 300, forced / 300

    assert hit_rate(1.0) == (1.0, 1.0)
    random_hits, forced = hit_rate(0.0)
    assert forced == 0 and random_hits < 0.2  # (21/49)^3 ~ 0.08 by chance
    half_hits, forced = hit_rate(0.5)
    assert 0.38 < forced < 0.62 and 0.4 < half_hits < 0.7


def test_foreground_voxels_find_thin_structures_and_stay_bounded():
    thin = np.zeros((9, 9, 9), bool)
    thin[3, 5, 7] = True  # odd coordinates: not on the even lattice searched first
    np.testing.assert_array_equal(foreground_voxels(thin), [[3, 5, 7]])
    block = np.zeros((40, 40, 40), bool)
    block[10:30, 4:36, 1:39] = True
    points = foreground_voxels(block, max_points=500)
    assert len(points) == 500 and block[tuple(points.T)].all()
    assert points[:, 0].min() <= 12 and points[:, 0].max() >= 27  # spread over the structure


@pytest.mark.parametrize("zoom,angles", [(1.2, None), (0.85, (0.2, -0.15, 0.25)), (1.0, (0.0, 0.0, 0.26))])
def test_warp_samples_the_documented_geometry(zoom, angles):
    volume = _smooth((50, 56, 44), seed=2)
    patch, start = (20, 24, 16), (12, 14, 13)
    params = SpatialParams(zoom=zoom, rotation=None if angles is None else rotation_matrix(angles))
    warp = PatchWarp(start, patch, params)
    lo, hi = warp.lo, warp.hi
    assert (lo, hi) == source_region(start, patch, params)
    out = warp.image(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][None])[0]
    u = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in patch], indexing="ij")).reshape(3, -1)
    centre = np.array(start) + (np.array(patch) - 1) / 2
    if angles is None:  # zoom-only path: source extent rounded to whole voxels
        spans = np.array([round((p - 1) / zoom) for p in patch])
        coords = centre[:, None] + u * (spans / (np.array(patch) - 1))[:, None]
        coords += (np.array(lo) + spans / 2 - centre)[:, None]
    else:
        coords = centre[:, None] + (params.rotation / zoom) @ u
    expected = ndi.map_coordinates(volume, coords, order=1).reshape(patch)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_mask_stays_aligned_with_image_after_augmentation(nnssl_roots):
    anon = np.zeros((1, 48, 48, 48), np.uint8)
    anon[:, 10:30, 5:25, 20:44] = 1
    image = 1.0 + 4.0 * anon.astype(np.float32)  # image encodes the mask: 5 inside, 1 outside
    spec = [{"subject": "s", "image": image, "anon": anon}]
    cases = load_cases(build_dataset(nnssl_roots.preprocessed, spec))
    patch = (24, 24, 24)
    mirror_only = AugmentConfig(zoom_probability=0, rotation_probability=0, mirror_probability=1.0,
                                brightness_probability=0, contrast_probability=0, gamma_probability=0)
    for augment, exact in ((SPATIAL_ONLY, False), (mirror_only, True)):
        sampler = PatchSampler(cases, SampleSpec(patch, foreground_probability=0.0, augment=augment))
        data, mask = np.empty((1, *patch), np.float32), np.empty((1, *patch), bool)
        agreement = []
        for i in range(12):
            sampler.sample_into(sample_rng(5, i, 0), data, mask)
            inside = data > 3.0
            if exact:
                np.testing.assert_array_equal(inside, mask)
            # interpolation may disagree only on the one-voxel rim of the mask
            rim = ndi.binary_dilation(inside[0]) & ~ndi.binary_erosion(inside[0])
            assert (inside == mask)[0][~rim].all()
            agreement.append((inside == mask).mean())
        assert np.mean(agreement) > 0.97


def test_intensity_augmentation_is_light_and_switchable():
    patch = _smooth((1, 20, 20, 20)) * 3
    rng = np.random.default_rng(0)
    out = patch.copy()
    augment_intensity(out, rng, AugmentConfig.disabled())
    np.testing.assert_array_equal(out, patch)
    cfg = AugmentConfig(brightness_probability=1.0, contrast_probability=1.0, gamma_probability=1.0)
    for _ in range(5):
        out = patch.copy()
        augment_intensity(out, rng, cfg)
        assert not np.array_equal(out, patch) and np.isfinite(out).all()
        assert np.corrcoef(out.ravel(), patch.ravel())[0, 1] > 0.95  # structure kept


def test_augment_config_reports_all_problems():
    with pytest.raises(InvalidInput) as err:
        AugmentConfig(zoom_probability=1.5, zoom_range=(1.2, 0.9), rotation_degrees=90, mirror_axes=(0, 3))
    assert len(err.value.problems) == 4
