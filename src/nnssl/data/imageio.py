"""Image IO: header-only reads for planning and checks, robust full reads for preprocessing.

Geometry always comes from SimpleITK (ITK/LPS conventions for every format). For NIfTI the
voxels are read with nibabel instead, because SimpleITK 2.5 silently turns NaN/Inf voxels into
0 and reads a truncated `.nii.gz` without error (the missing part becomes zeros); nibabel keeps
NaN and raises on truncation. nibabel's voxel axes (i, j, k) are SimpleITK's array axes
reversed, so `transpose(2, 1, 0)` gives exactly SimpleITK's array.

Arrays are in numpy order as SimpleITK returns them (z, y, x), and `ImageHeader.spacing` and
`.shape` follow that order (as nnU-Net's SimpleITKIO does).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnssl.errors import NnsslError
from nnssl.io_utils import atomic_path

SUPPORTED_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class ImageReadError(NnsslError):
    """An image or mask cannot be used; the message names the file and the fix."""


class UnreadableImage(ImageReadError):
    pass


class CorruptImage(ImageReadError):
    pass


class NonFiniteImage(ImageReadError):
    pass


class WrongDimensionality(ImageReadError):
    pass


def _ext(name: str) -> str | None:
    lower = name.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if lower.endswith(ext):
            return ext
    return None


def has_supported_extension(name: str) -> bool:
    return _ext(Path(name).name) is not None


def image_stem(name: str) -> str:
    """File name without its image extension: `sub-01_T1w.nii.gz` -> `sub-01_T1w`."""
    base = Path(name).name
    ext = _ext(base)
    if ext is None:
        raise UnreadableImage(f"{name}: unsupported image format; use one of "
                              f"{', '.join(SUPPORTED_EXTENSIONS)}")
    return base[: -len(ext)]


def _is_nifti(path: Path) -> bool:
    return _ext(path.name) in (".nii", ".nii.gz")


@dataclass(frozen=True)
class ImageHeader:
    path: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    num_components: int
    pixel_type: str
    dimension: int


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Geometry from the header only (no voxel decoding): fast enough for 1000s of files."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(f"{path}: file not found; fix the path in pretrain_data.json")
    if _ext(path.name) is None:
        raise UnreadableImage(f"{path}: unsupported image format; convert it to one of "
                              f"{', '.join(SUPPORTED_EXTENSIONS)}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise UnreadableImage(f"{path}: header cannot be read ({first}); the file is corrupt or "
                              "not an image, re-export or remove it") from e
    size = tuple(int(s) for s in reader.GetSize())
    spacing = tuple(float(s) for s in reader.GetSpacing())
    return ImageHeader(
        path=str(path), shape=size[::-1], spacing=spacing[::-1],
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
        num_components=int(reader.GetNumberOfComponents()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        dimension=int(reader.GetDimension()),
    )


def require_3d(header: ImageHeader) -> None:
    """Only 3D scalar images (or 4D with a single volume) can be pretrained on."""
    if header.num_components != 1:
        raise WrongDimensionality(f"{header.path}: {header.num_components} components per voxel "
                                  "(vector/RGB image); split the channels into separate 3D images")
    if header.dimension == 2 or len(header.shape) < 3:
        raise WrongDimensionality(f"{header.path}: a 2D image of shape {header.shape}; only 3D "
                                  "volumes are supported, remove it from the dataset")
    if header.dimension == 4:
        if header.shape[0] != 1:
            raise WrongDimensionality(f"{header.path}: 4D image with {header.shape[0]} volumes; split "
                                      "it into 3D images (one per volume) or keep the one you need")
    elif header.dimension != 3:
        raise WrongDimensionality(f"{header.path}: {header.dimension}D image; only 3D is supported")
    bad = [s for s in spacing_3d(header) if not (np.isfinite(s) and s > 0)]
    if bad:
        raise ImageReadError(f"{header.path}: spacing {spacing_3d(header)} is not positive and "
                             "finite; fix the header (pixdim) of this file")


def shape_3d(header: ImageHeader) -> tuple[int, int, int]:
    return tuple(header.shape[-3:])  # type: ignore[return-value]


def spacing_3d(header: ImageHeader) -> tuple[float, float, float]:
    return tuple(header.spacing[-3:])  # type: ignore[return-value]


def _nifti_voxels(path: Path, header: ImageHeader) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise CorruptImage(f"{path}: voxel data is truncated or corrupt ({type(e).__name__}: {e}); "
                           "re-download or re-export the file") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise WrongDimensionality(f"{path}: voxel array has shape {data.shape}; expected 3D")
    return data.transpose(2, 1, 0)


def read_image(path: str | os.PathLike, dtype: type = np.float32) -> tuple[np.ndarray, ImageHeader]:
    """Full robust read of a 3D image: (array in array order, header); never silently repairs."""
    path = Path(path)
    header = read_header(path)
    require_3d(header)
    if _is_nifti(path):
        data = _nifti_voxels(path, header)
    else:
        try:
            data = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except RuntimeError as e:
            raise CorruptImage(f"{path}: voxel data cannot be read ({str(e).strip()[-200:]}); "
                               "re-export the file") from e
        if data.ndim == 4 and data.shape[0] == 1:
            data = data[0]
    if tuple(data.shape) != shape_3d(header):
        raise CorruptImage(f"{path}: voxel data shape {data.shape} does not match the header "
                           f"{shape_3d(header)}; the file is corrupt")
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            n = int(data.size - finite.sum())
            raise NonFiniteImage(f"{path}: {n} of {data.size} voxels are NaN or infinite; fix or "
                                 "re-export the image (nnssl does not guess replacement values)")
    return np.asarray(data, dtype=dtype), header


def geometry_mismatch(a: ImageHeader, b: ImageHeader, tolerance: float = 1e-3) -> str | None:
    """None when `a` and `b` share a voxel grid (within `tolerance`), else what differs."""
    if shape_3d(a) != shape_3d(b):
        return f"shape {shape_3d(b)} differs from the image's {shape_3d(a)}"
    for name, va, vb in (("spacing", spacing_3d(a), spacing_3d(b)), ("origin", a.origin, b.origin),
                         ("direction", a.direction, b.direction)):
        if len(va) != len(vb) or not np.allclose(va, vb, rtol=tolerance, atol=tolerance):
            return f"{name} {tuple(round(v, 4) for v in vb)} differs from the image's " \
                   f"{tuple(round(v, 4) for v in va)}"
    return None


def read_mask(path: str | os.PathLike, reference: ImageHeader | None = None,
              tolerance: float = 1e-3) -> np.ndarray:
    """A label/mask volume as uint8, checked for integer values in 0..255 and (optionally) the grid."""
    data, header = read_image(path, dtype=np.float64)
    if reference is not None:
        problem = geometry_mismatch(reference, header, tolerance)
        if problem:
            raise ImageReadError(f"{path}: mask does not match its image {reference.path}: {problem}; "
                                 "resample the mask onto the image grid")
    if data.size and (data.min() < 0 or data.max() > 255 or not np.array_equal(data, np.round(data))):
        raise ImageReadError(f"{path}: mask values must be integers in 0..255 (found range "
                             f"{data.min():g}..{data.max():g}); store it as an integer label image")
    return data.astype(np.uint8)


def write_image(path: str | os.PathLike, array: np.ndarray, spacing: tuple[float, ...],
                origin: tuple[float, ...] | None = None,
                direction: tuple[float, ...] | None = None) -> None:
    """Write a 3D array (array order, spacing in array order) atomically in the format of `path`."""
    path = Path(path)
    ext = _ext(path.name)
    if ext is None:
        raise NnsslError(f"{path}: unsupported output format; use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    if origin is not None:
        image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in direction))
    with atomic_path(path) as tmp:
        target = tmp.with_name(tmp.name + ext)  # SimpleITK picks the writer from the extension
        try:
            sitk.WriteImage(image, str(target), useCompression=ext in (".nii.gz", ".nrrd", ".mha"))
            os.replace(target, tmp)
        finally:
            if target.exists():
                target.unlink()
