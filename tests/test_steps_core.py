"""Preprocessing array steps on volumes of known geometry."""

from __future__ import annotations

import numpy as np
import pytest

from nnssl.preprocessing import steps


def test_transpose_moves_axes_and_spacing_together():
    data = np.zeros((1, 4, 5, 6), np.float32)
    data[0, 1, 2, 3] = 7
    out, spacing = steps.transpose_case(data, (1.0, 2.0, 3.0), (2, 0, 1))
    assert out.shape == (1, 6, 4, 5) and spacing == (3.0, 1.0, 2.0)
    assert out[0, 3, 1, 2] == 7


def test_nonzero_bbox_and_crop():
    data = np.zeros((2, 10, 12, 14), np.float32)
    data[0, 2:5, 3:9, 4] = 1
    data[1, 7, 1, 13] = -2  # any channel counts
    box = steps.nonzero_bbox(data)
    assert box == [(2, 8), (1, 9), (4, 14)]
    cropped = steps.crop_to_bbox(data, box)
    assert cropped.shape == (2, 6, 8, 10) and cropped[1, 5, 0, 9] == -2
    assert steps.nonzero_bbox(np.zeros((1, 3, 3, 3))) is None


def test_zscore_and_ct_normalisation():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (8, 8, 8)).astype(np.float32)
    out, info = steps.zscore_normalize(image)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4 and info["scheme"] == "ZScoreNormalization"
    mask = np.zeros_like(image, dtype=bool)
    mask[:4] = True
    out, info = steps.zscore_normalize(image, mask)
    assert abs(out[mask].mean()) < 1e-5
    stats = steps.IntensityStats(mean=40.0, std=100.0, percentile_00_5=-1000.0, percentile_99_5=500.0)
    ct, info = steps.ct_normalize(np.array([-3000.0, 40.0, 2000.0], np.float32), stats)
    assert np.allclose(ct, [(-1000 - 40) / 100, 0.0, (500 - 40) / 100])


@pytest.mark.parametrize("method", steps.RESAMPLING_METHODS)
def test_new_shape_and_linear_data_reproduced(method):
    assert steps.new_shape_for_spacing((40, 30, 20), (1.0, 1.0, 3.0), (1.0, 1.0, 1.0)) == (40, 30, 60)
    ramp = (np.arange(40, dtype=np.float32)[:, None, None] * np.ones((40, 6, 5), np.float32))[None]
    out = steps.resample_image(ramp, (1.0, 1.0, 1.0), (0.5, 1.0, 1.0), method=method)
    assert out.shape == (1, 80, 6, 5) and out.dtype == np.float32
    # voxel centres stay aligned: new voxel i sits at old coordinate i/2 - 1/4
    interior = np.arange(8, 72)
    assert np.allclose(out[0, interior, 3, 2], interior / 2 - 0.25, atol=1e-3)


def test_default_linear_resampling_never_overshoots():
    data = np.zeros((1, 12, 12, 4), np.float32)
    data[0, :, :, 1] = 1.0
    out = steps.resample_image(data, (1.0, 1.0, 4.0), (1.0, 1.0, 1.0))
    assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6  # cubic would ring across thick slices


def test_anisotropic_axis_uses_nearest_between_slices():
    data = np.zeros((1, 12, 12, 4), np.float32)
    data[0, :, :, 1] = 1.0  # one thick slice
    out = steps.resample_image(data, (1.0, 1.0, 4.0), (1.0, 1.0, 1.0), method="scipy_nnunet")
    assert out.shape == (1, 12, 12, 16)
    # nearest along the thick axis: only the two values, no cubic ringing between slices
    assert set(np.unique(np.round(out, 5))) <= {0.0, 1.0}
    iso = steps.resample_image(data, (2.0, 2.0, 4.0), (1.0, 1.0, 2.0), method="scipy_nnunet")  # ratio 2: cubic
    assert len(np.unique(np.round(iso, 5))) > 2


def test_masks_stay_uint8_with_existing_labels_and_thin_structures_survive():
    mask = np.zeros((1, 16, 16, 6), np.uint8)
    mask[0, 8, :, :] = 3        # one-voxel-thick sheet
    mask[0, 2:5, 2:5, 2] = 1
    out = steps.resample_mask(mask, (1.0, 1.0, 3.0), (1.0, 1.0, 1.0))
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1, 3}
    assert (out[0, 8] == 3).all()
    with pytest.raises(TypeError, match="uint8"):
        steps.resample_mask(mask.astype(np.float32), (1, 1, 1), (1, 1, 1))


@pytest.mark.parametrize("shape_in,shape_out", [((7, 30, 26), (20, 27, 29)), ((31, 12, 40), (15, 36, 13)),
                                                ((1, 9, 9), (4, 9, 3))])
def test_separable_linear_equals_torch_trilinear(shape_in, shape_out):
    """The default is numpy's separable form of the trilinear scheme torch computes in one go."""
    data = np.random.default_rng(1).normal(size=(1, *shape_in)).astype(np.float32)
    ours = steps.resample_image(data, (1, 1, 1), (1, 1, 1), new_shape=shape_out, method="linear")
    torch_ = steps.resample_image(data, (1, 1, 1), (1, 1, 1), new_shape=shape_out, method="torch_linear")
    assert ours.shape == (1, *shape_out) and ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.allclose(ours, torch_, atol=1e-5)


def test_nearest_mask_resampling_equals_scipy_zoom():
    from scipy import ndimage

    mask = np.random.default_rng(2).integers(0, 4, (1, 13, 22, 7)).astype(np.uint8)
    for shape in [(26, 11, 21), (5, 22, 30), (13, 7, 7)]:
        ours = steps.resample_mask(mask, (1, 1, 1), (1, 1, 1), new_shape=shape)
        factors = [n / o for n, o in zip(shape, mask.shape[1:])]
        reference = ndimage.zoom(mask[0], factors, order=0, grid_mode=True, mode="nearest", prefilter=False)
        assert np.array_equal(ours[0], reference)


def test_normalisation_of_a_transposed_view_is_contiguous_and_leaves_the_input_alone():
    image = np.random.default_rng(3).normal(50, 10, (1, 6, 7, 8)).astype(np.float32)
    before = image.copy()
    view, _ = steps.transpose_case(image, (1.0, 2.0, 3.0), (2, 0, 1))
    out, info = steps.zscore_normalize(view)
    assert out.flags.c_contiguous and out.shape == (1, 8, 6, 7) and np.array_equal(image, before)
    expected = (view.astype(np.float64) - view.mean(dtype=np.float64)) / view.astype(np.float64).std()
    assert np.allclose(out, expected, atol=1e-5)
    assert abs(info["std"] / view.astype(np.float64).std() - 1) < 1e-6
