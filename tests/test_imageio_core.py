"""Header-only reads, robust full reads and the library traps they guard against."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nnssl.data import imageio as io


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    return rng.random((5, 6, 7)).astype(np.float32)


def test_array_order_and_spacing_order(tmp_path, volume):
    path = tmp_path / "a.nii.gz"
    io.write_image(path, volume, spacing=(3.0, 1.0, 0.5), origin=(1.0, 2.0, 3.0),
                   direction=(0, 1, 0, 1, 0, 0, 0, 0, -1))
    header = io.read_header(path)
    assert header.shape == (5, 6, 7) and header.spacing == (3.0, 1.0, 0.5)
    assert header.origin == (1.0, 2.0, 3.0) and header.direction == (0, 1, 0, 1, 0, 0, 0, 0, -1)
    data, _ = io.read_image(path)
    # nibabel-read voxels, transposed, equal SimpleITK's own array exactly
    assert np.array_equal(data, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    assert np.allclose(data, volume)


@pytest.mark.parametrize("ext", [".nii", ".nrrd", ".mha"])
def test_round_trip_formats(tmp_path, volume, ext):
    path = tmp_path / f"a{ext}"
    io.write_image(path, volume, spacing=(2.0, 1.0, 1.5))
    data, header = io.read_image(path)
    assert np.allclose(data, volume) and header.spacing == (2.0, 1.0, 1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a{ext}"]  # no temp files left


def test_nan_nifti_is_detected_where_simpleitk_hides_it(tmp_path, volume):
    volume[1, 2, 3] = np.nan
    path = tmp_path / "nan.nii.gz"
    io.write_image(path, volume, spacing=(1, 1, 1))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # the trap
    with pytest.raises(io.NonFiniteImage, match=r"nan.nii.gz: 1 of 210 voxels are NaN"):
        io.read_image(path)


def test_truncated_gzip_is_detected_where_simpleitk_reads_zeros(tmp_path):
    big = np.random.default_rng(1).random((40, 40, 40)).astype(np.float32)
    good = tmp_path / "good.nii.gz"
    io.write_image(good, big, spacing=(1, 1, 1))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(io.CorruptImage, match="bad.nii.gz: voxel data is truncated or corrupt"):
        io.read_image(bad)


def test_2d_image_rejected(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(path))
    with pytest.raises(io.WrongDimensionality, match="2D image"):
        io.read_image(path)


def test_4d_images(tmp_path):
    many = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))] * 3)
    sitk.WriteImage(many, str(tmp_path / "t3.nii.gz"))
    with pytest.raises(io.WrongDimensionality, match="4D image with 3 volumes"):
        io.read_image(tmp_path / "t3.nii.gz")
    one = sitk.JoinSeries([sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32))])
    sitk.WriteImage(one, str(tmp_path / "t1.nii.gz"))
    data, header = io.read_image(tmp_path / "t1.nii.gz")
    assert data.shape == (3, 4, 5) and io.shape_3d(header) == (3, 4, 5)


def test_vector_image_rejected(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True)
    sitk.WriteImage(img, str(tmp_path / "rgb.mha"))
    with pytest.raises(io.WrongDimensionality, match="3 components per voxel"):
        io.read_image(tmp_path / "rgb.mha")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(io.UnreadableImage, match="file not found"):
        io.read_header(tmp_path / "nope.nii.gz")
    (tmp_path / "x.png").write_bytes(b"123")
    with pytest.raises(io.UnreadableImage, match="unsupported image format"):
        io.read_header(tmp_path / "x.png")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(io.UnreadableImage, match="header cannot be read"):
        io.read_header(tmp_path / "junk.nii.gz")


def test_masks(tmp_path, volume):
    io.write_image(tmp_path / "img.nii.gz", volume, spacing=(1, 1, 1))
    ref = io.read_header(tmp_path / "img.nii.gz")
    io.write_image(tmp_path / "m.nii.gz", (volume > 0.5).astype(np.uint8), spacing=(1, 1, 1))
    mask = io.read_mask(tmp_path / "m.nii.gz", ref)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    io.write_image(tmp_path / "shifted.nii.gz", mask, spacing=(1, 1, 2))
    with pytest.raises(io.ImageReadError, match="does not match its image .* spacing"):
        io.read_mask(tmp_path / "shifted.nii.gz", ref)
    io.write_image(tmp_path / "neg.nii.gz", -np.ones_like(mask, dtype=np.int16), spacing=(1, 1, 1))
    with pytest.raises(io.ImageReadError, match="integers in 0..255"):  # -1 must not become 255
        io.read_mask(tmp_path / "neg.nii.gz")


def test_image_stem():
    assert io.image_stem("sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert io.image_stem("/x/y/case.mha") == "case"
    assert io.has_supported_extension("A.NII.GZ")
    with pytest.raises(io.UnreadableImage, match="unsupported"):
        io.image_stem("a.png")
