"""Image IO beyond the basics of test_imageio_core.py: every format's failure modes, geometry
conventions, mask checks and atomic writes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnssl.data import imageio as io

DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _volume(shape=(4, 5, 6), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _truncate(path, fraction=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_header_fields_and_header_only_read(tmp_path):
    path = tmp_path / "ct.nii.gz"
    io.write_image(path, (_volume((20, 30, 40)) * 1000).astype(np.int16), spacing=(2.5, 0.8, 0.7),
                   origin=(-10.0, 20.0, 30.5), direction=DIRECTION)
    header = io.read_header(path)
    assert header == io.ImageHeader(
        path=str(path), shape=(20, 30, 40), spacing=pytest.approx((2.5, 0.8, 0.7)),
        origin=pytest.approx((-10.0, 20.0, 30.5)), direction=pytest.approx(DIRECTION),
        num_components=1, pixel_type="16-bit signed integer", dimension=3, num_volumes=1)
    # Header-only: a file whose voxel data is cut off still has a readable header...
    _truncate(path, 0.5)
    assert io.read_header(path).shape == (20, 30, 40)
    # ...while the full read notices the damage.
    with pytest.raises(io.CorruptImage, match="ct.nii.gz: voxel data is truncated or corrupt"):
        io.read_image(path)


def test_array_order_matches_physical_geometry(tmp_path):
    """Array index [z, y, x] is ITK index (x, y, z); spacing[0] belongs to array axis 0."""
    data = np.zeros((3, 5, 7), np.float32)
    data[2, 1, 4] = 1.0
    path = tmp_path / "aniso.nii.gz"
    io.write_image(path, data, spacing=(4.0, 2.0, 0.5), origin=(10.0, 20.0, 30.0))
    array, header = io.read_image(path)
    assert array.shape == header.shape == (3, 5, 7) and header.spacing == (4.0, 2.0, 0.5)
    assert tuple(np.argwhere(array == 1.0)[0]) == (2, 1, 4)
    point = sitk.ReadImage(str(path)).TransformIndexToPhysicalPoint((4, 1, 2))
    assert point == pytest.approx((10.0 + 4 * 0.5, 20.0 + 1 * 2.0, 30.0 + 2 * 4.0))


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nibabel_voxels_equal_simpleitk_array_with_scaling(tmp_path, ext):
    """The nibabel path (transposed, scl_slope/inter applied) gives exactly SimpleITK's array."""
    raw = np.arange(7 * 5 * 3, dtype=np.int16).reshape(7, 5, 3)  # nibabel order (i, j, k)
    img = nib.Nifti1Image(raw, np.diag([0.7, 1.1, 3.0, 1.0]))
    img.header.set_slope_inter(0.5, -10.0)
    path = tmp_path / f"scaled{ext}"
    nib.save(img, str(path))
    array, header = io.read_image(path, dtype=np.float64)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert array.shape == reference.shape == (3, 5, 7) and array.flags.c_contiguous
    assert np.array_equal(array, reference)
    assert array[2, 4, 6] == raw[6, 4, 2] * 0.5 - 10.0
    assert header.spacing == pytest.approx((3.0, 1.1, 0.7))


@pytest.mark.parametrize("ext", [".nii", ".nrrd", ".mha"])
def test_non_finite_voxels_raise_in_every_format(tmp_path, ext):
    volume = _volume()
    volume[0, 0, 0], volume[1, 2, 3] = np.inf, np.nan
    path = tmp_path / f"bad{ext}"
    io.write_image(path, volume, spacing=(1, 1, 1))
    with pytest.raises(io.NonFiniteImage, match=rf"bad\{ext}: 2 of 120 voxels are NaN or infinite"):
        io.read_image(path)


def test_simpleitk_alone_hides_both_nifti_traps(tmp_path):
    """The library facts the NIfTI path exists for (if SimpleITK is fixed, this test says so)."""
    volume = _volume((30, 30, 30))
    volume[5, 5, 5] = np.nan
    nan_path = tmp_path / "nan.nii"
    io.write_image(nan_path, volume, spacing=(1, 1, 1))
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(nan_path)))).any()
    assert np.isnan(np.asanyarray(nib.load(str(nan_path)).dataobj)).sum() == 1
    short = tmp_path / "short.nii"
    io.write_image(short, _volume((30, 30, 30)), spacing=(1, 1, 1))
    _truncate(short)
    zeros = sitk.GetArrayFromImage(sitk.ReadImage(str(short)))  # no error, zero-filled
    assert (zeros == 0).mean() > 0.3
    with pytest.raises(io.CorruptImage, match="short.nii: voxel data is truncated or corrupt"):
        io.read_image(short)


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nhdr", ".mhd"])
def test_truncated_itk_formats_raise(tmp_path, ext):
    path = tmp_path / f"t{ext}"
    io.write_image(path, _volume((20, 20, 20)), spacing=(1, 1, 1))
    data_files = [p for p in tmp_path.iterdir() if p != path]
    _truncate(data_files[0] if data_files else path, 0.7)
    with pytest.raises(io.CorruptImage, match=rf"t\{ext}: voxel data cannot be read"):
        io.read_image(path)


def test_single_slice_volume_is_a_2d_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    io.write_image(path, np.ones((1, 8, 9), np.float32), spacing=(1, 1, 1))
    with pytest.raises(io.WrongDimensionality, match=r"2D image stored as 3D .*\(1, 8, 9\)"):
        io.read_image(path)


def test_4d_single_volume_in_mha_is_3d_with_3d_geometry(tmp_path):
    one = sitk.JoinSeries([sitk.GetImageFromArray(_volume())])
    one.SetSpacing((0.5, 1.0, 2.0, 3.0))
    one.SetOrigin((1.0, 2.0, 3.0, 9.0))
    sitk.WriteImage(one, str(tmp_path / "t1.mha"))
    header = io.read_header(tmp_path / "t1.mha")
    assert (header.dimension, header.num_volumes) == (4, 1)
    assert header.shape == (4, 5, 6) and header.spacing == (2.0, 1.0, 0.5)
    assert header.origin == (1.0, 2.0, 3.0) and len(header.direction) == 9
    data, _ = io.read_image(tmp_path / "t1.mha")
    assert np.allclose(data, _volume())
    # a 4D single volume and its 3D twin are on the same grid
    io.write_image(tmp_path / "t3.mha", _volume(), spacing=(2.0, 1.0, 0.5), origin=(1.0, 2.0, 3.0))
    assert io.geometry_mismatch(io.read_header(tmp_path / "t3.mha"), header) is None


def test_vector_nifti_rejected(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True)
    sitk.WriteImage(img, str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(io.WrongDimensionality, match="3 components per voxel"):
        io.read_image(tmp_path / "rgb.nii.gz")


def test_bad_spacing_rejected(tmp_path):
    io.write_image(tmp_path / "a.mha", _volume(), spacing=(1, 1, 1))
    text = (tmp_path / "a.mha").read_bytes().replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 0 1 1")
    (tmp_path / "zero.mha").write_bytes(text)
    header = io.read_header(tmp_path / "zero.mha")
    assert header.spacing == (1.0, 1.0, 0.0)
    with pytest.raises(io.InvalidGeometry, match=r"zero.mha: spacing \(1.0, 1.0, 0.0\) is not positive"):
        io.require_3d(header)
    with pytest.raises(io.InvalidGeometry):
        io.read_image(tmp_path / "zero.mha")
    # several problems of one header are all listed
    flat = io.ImageHeader("f.mha", (4, 5), (0.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), 1, "float", 2)
    problems = io.header_problems(flat)
    assert len(problems) == 2 and "2D image" in problems[0] and "spacing" in problems[1]


def test_unsupported_and_detached_round_trips(tmp_path):
    volume = _volume()
    for ext in (".nhdr", ".mhd"):
        path = tmp_path / ext[1:] / f"case{ext}"
        io.write_image(path, volume, spacing=(2.0, 1.0, 0.5), origin=(1, 2, 3), direction=DIRECTION)
        data, header = io.read_image(path)
        assert np.array_equal(data, volume) and header.direction == pytest.approx(DIRECTION)
        names = sorted(p.name for p in path.parent.iterdir())
        assert names[0].startswith("case") and not any(n.startswith(".") for n in names), names
    with pytest.raises(io.NnsslError, match="unsupported output format"):
        io.write_image(tmp_path / "a.png", volume, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing/origin/direction"):
        io.write_image(tmp_path / "a.nii.gz", volume, spacing=(1, 1))
    io.write_image(tmp_path / "bool.nii.gz", volume > 0.5, spacing=(1, 1, 1))
    assert np.array_equal(io.read_mask(tmp_path / "bool.nii.gz"), volume > 0.5)


def test_float64_overflow_to_float32_is_not_silent(tmp_path):
    volume = _volume().astype(np.float64)
    volume[0, 0, 0] = 1e300
    io.write_image(tmp_path / "big.nrrd", volume, spacing=(1, 1, 1))
    assert io.read_image(tmp_path / "big.nrrd", dtype=np.float64)[0][0, 0, 0] == 1e300
    with pytest.raises(io.NonFiniteImage, match="exceed the range of float32"):
        io.read_image(tmp_path / "big.nrrd")


def test_mask_geometry_and_values(tmp_path):
    grid = dict(spacing=(3.0, 1.0, 1.0), origin=(500.0, -200.0, 100.0), direction=DIRECTION)
    io.write_image(tmp_path / "img.nii.gz", _volume(), **grid)
    ref = io.read_header(tmp_path / "img.nii.gz")
    labels = np.random.default_rng(1).integers(0, 256, (4, 5, 6)).astype(np.uint8)
    labels[0, 0, :2] = (0, 255)

    io.write_image(tmp_path / "ok.nrrd", labels, spacing=(3.0, 1.0, 1.0), origin=(500.0004, -200.0, 100.0),
                   direction=DIRECTION)  # 0.4 um off: float rounding between writers is tolerated
    assert np.array_equal(io.read_mask(tmp_path / "ok.nrrd", ref), labels)

    # 0.4 mm at 500 mm: a relative tolerance would pass this; it is 40% of a voxel
    io.write_image(tmp_path / "shifted.nii.gz", labels, **{**grid, "origin": (500.4, -200.0, 100.0)})
    with pytest.raises(io.ImageReadError, match=r"mask does not match its image .*img.nii.gz: origin"):
        io.read_mask(tmp_path / "shifted.nii.gz", ref)
    io.write_image(tmp_path / "flipped.nii.gz", labels, **{**grid, "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)})
    with pytest.raises(io.ImageReadError, match="direction"):
        io.read_mask(tmp_path / "flipped.nii.gz", ref)
    io.write_image(tmp_path / "small.nii.gz", labels[:, :4], **grid)
    assert "shape (4, 4, 6) differs from the image's (4, 5, 6)" in io.geometry_mismatch(
        ref, io.read_header(tmp_path / "small.nii.gz"))

    # values are checked before the uint8 cast
    for name, bad, found in (("half", labels // 2 + np.float32(0.5), "non-integer"),
                             ("big", labels.astype(np.int16) + 1, "range 1..256")):
        io.write_image(tmp_path / f"{name}.nii.gz", bad, **grid)
        with pytest.raises(io.ImageReadError, match=f"integers in 0..255 \\(found {found}"):
            io.read_mask(tmp_path / f"{name}.nii.gz", ref)


def test_wrong_grid_mask_is_rejected_before_decoding(tmp_path):
    io.write_image(tmp_path / "img.nii.gz", _volume(), spacing=(1, 1, 1))
    mask = np.random.default_rng(2).integers(0, 2, (30, 30, 30)).astype(np.uint8)  # not compressible to nothing
    io.write_image(tmp_path / "m.nii.gz", mask, spacing=(1, 1, 1))
    _truncate(tmp_path / "m.nii.gz", 0.5)
    with pytest.raises(io.ImageReadError, match="does not match its image") as caught:
        io.read_mask(tmp_path / "m.nii.gz", io.read_header(tmp_path / "img.nii.gz"))
    assert not isinstance(caught.value, io.CorruptImage)
