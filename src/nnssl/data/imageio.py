"""Image IO: header-only reads for planning and checks, robust full reads for preprocessing.

Geometry always comes from SimpleITK (ITK/LPS conventions for every format). For NIfTI the
voxels are read with nibabel instead, because SimpleITK 2.5 silently turns NaN/Inf voxels into
0 and reads a truncated `.nii`/`.nii.gz` without error (the missing part becomes zeros); nibabel
keeps NaN and raises on truncation. nibabel's voxel axes (i, j, k) are SimpleITK's array axes
reversed, so `transpose(2, 1, 0)` gives exactly SimpleITK's array.

Arrays are in numpy order as SimpleITK returns them (z, y, x), and `ImageHeader.spacing` and
`.shape` follow that order (as nnU-Net's SimpleITKIO does). A 4D file holding one volume is
described by its 3 spatial axes (the header keeps `dimension=4`, `num_volumes=1`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnssl.errors import NnsslError
from nnssl.io_utils import atomic_path

SUPPORTED_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_NIFTI = (".nii", ".nii.gz")
_DETACHED = (".mhd", ".nhdr")  # header and voxel data in two files
# Naming the ImageIO skips SimpleITK's probing of every registered reader (~25% of a header read).
_IMAGE_IO = {".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".nrrd": "NrrdImageIO",
             ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}


class ImageReadError(NnsslError):
    """An image or mask cannot be used; the message names the file and the fix."""


class UnreadableImage(ImageReadError):
    """Missing file, unsupported format or unreadable header."""


class CorruptImage(ImageReadError):
    """The header is readable but the voxel data is truncated, corrupt or inconsistent with it."""


class NonFiniteImage(ImageReadError):
    """NaN or infinite voxels."""


class WrongDimensionality(ImageReadError):
    """Not a 3D scalar volume: 2D, a single slice, 4D with several volumes, or vector pixels."""


class InvalidGeometry(ImageReadError):
    """Spacing that is zero, negative or not finite."""


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


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of an image file. Spatial axes only: a 4D file's volume axis is `num_volumes`."""

    path: str
    shape: tuple[int, ...]        # spatial shape in array order (z, y, x)
    spacing: tuple[float, ...]    # array order, like shape
    origin: tuple[float, ...]     # ITK order (x, y, z), physical LPS
    direction: tuple[float, ...]  # ITK flat row-major spatial direction matrix (9 values in 3D)
    num_components: int           # >1: vector/RGB pixels
    pixel_type: str
    dimension: int                # ITK dimension of the file (2, 3, 4, ...)
    num_volumes: int = 1          # product of the sizes beyond the 3 spatial axes


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Geometry from the header only (no voxel decoding): fast enough for 1000s of files."""
    path = Path(path)
    ext = _ext(path.name)
    if ext is None:
        raise UnreadableImage(f"{path}: unsupported image format; convert it to one of "
                              f"{', '.join(SUPPORTED_EXTENSIONS)}")
    if not path.is_file():
        raise UnreadableImage(f"{path}: file not found; fix the path in pretrain_data.json")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_IMAGE_IO[ext])
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise UnreadableImage(f"{path}: header cannot be read ({_itk_reason(e)}); the file is "
                              "corrupt or not an image, re-export or remove it") from e
    size = tuple(int(s) for s in reader.GetSize())
    dim = len(size)
    n = min(dim, 3)
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(dim, dim)[:n, :n]
    return ImageHeader(
        path=str(path), shape=size[:n][::-1],
        spacing=tuple(float(s) for s in reader.GetSpacing()[:n])[::-1],
        origin=tuple(float(o) for o in reader.GetOrigin()[:n]),
        direction=tuple(float(d) for d in direction.ravel()),
        num_components=int(reader.GetNumberOfComponents()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        dimension=dim, num_volumes=math.prod(size[3:]),
    )


def _itk_reason(e: Exception) -> str:
    """The informative line of an ITK exception (they are multi-line with file/line noise)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if ln.startswith(("Description:", "ITK ERROR:", "sitk::ERROR:"))]
    # the innermost cause is last (NRRD); MetaIO ends with a meaningless "Reason: Success"
    if lines and lines[-1] not in keep and lines[-1] != "Reason: Success":
        keep.append(lines[-1])
    text = " ".join(keep) if keep else type(e).__name__
    # drop "ITK ERROR: NiftiImageIO(0x55d...): " / "sitk::ERROR: " prefixes (noise for users)
    text = re.sub(r"(ITK ERROR: \w+\(0x[0-9a-fA-F]+\):|sitk::ERROR:|Description:)\s*", "", text)
    return text.strip()[:300]


def dimensionality_problem(header: ImageHeader) -> str | None:
    """Why this is not a 3D scalar volume (None if it is)."""
    p = header.path
    if header.num_components != 1:
        return (f"{p}: {header.num_components} components per voxel (vector/RGB image); split the "
                "channels into separate 3D images")
    if header.dimension < 3:
        return f"{p}: a 2D image of shape {header.shape}; only 3D volumes are supported, remove it"
    if header.dimension > 4 or header.num_volumes != 1:
        if header.dimension == 4:
            return (f"{p}: 4D image with {header.num_volumes} volumes; split it into 3D images (one "
                    "per volume) or keep the one you need")
        return f"{p}: {header.dimension}D image; only 3D volumes (or 4D with one volume) are supported"
    if 0 in header.shape:
        return f"{p}: the image has no voxels (shape {header.shape}); re-export or remove it"
    if 1 in header.shape:
        # A one-slice volume is a 2D image in a 3D container (the reference padded such images
        # to hundreds of slices); it has no 3D context to learn from.
        return (f"{p}: a 2D image stored as 3D (a single slice, shape {header.shape}); only 3D "
                "volumes are supported, remove it")
    return None


def spacing_problem(header: ImageHeader) -> str | None:
    """Why the spacing is unusable (None if every value is positive and finite)."""
    if all(math.isfinite(s) and s > 0 for s in header.spacing):
        return None
    return (f"{header.path}: spacing {header.spacing} is not positive and finite; fix the header "
            "(pixdim / ElementSpacing / space directions) of this file")


def header_problems(header: ImageHeader) -> list[str]:
    """Every reason the header disqualifies the image (empty if it is a usable 3D volume)."""
    return [m for m in (dimensionality_problem(header), spacing_problem(header)) if m]


def require_3d(header: ImageHeader) -> None:
    """Only 3D scalar images (or 4D with a single volume) with a valid spacing can be used."""
    problem = dimensionality_problem(header)
    if problem:
        raise WrongDimensionality(problem)
    problem = spacing_problem(header)
    if problem:
        raise InvalidGeometry(problem)


def shape_3d(header: ImageHeader) -> tuple[int, int, int]:
    return tuple(header.shape[-3:])  # type: ignore[return-value]


def spacing_3d(header: ImageHeader) -> tuple[float, float, float]:
    return tuple(header.spacing[-3:])  # type: ignore[return-value]


def _nifti_voxels(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        # mmap=False: the returned array must not keep the file mapped (it may be overwritten).
        img = nib.load(str(path), mmap=False)
        data = np.asanyarray(img.dataobj)  # applies scl_slope/scl_inter as SimpleITK does
    except (EOFError, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise CorruptImage(f"{path}: voxel data is truncated or corrupt ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); re-download or re-export "
                           "the file") from e
    while data.ndim > 3 and data.shape[-1] == 1:  # 4D/5D NIfTI holding one volume
        data = data[..., 0]
    if data.ndim != 3:
        raise WrongDimensionality(f"{path}: voxel array has shape {data.shape}; expected 3D")
    return data.transpose(2, 1, 0)


def _itk_voxels(path: Path) -> np.ndarray:
    try:
        data = sitk.GetArrayFromImage(sitk.ReadImage(str(path), imageIO=_IMAGE_IO[_ext(path.name)]))
    except RuntimeError as e:
        raise CorruptImage(f"{path}: voxel data cannot be read, it is truncated or corrupt "
                           f"({_itk_reason(e)}); re-download or re-export the file") from e
    while data.ndim > 3 and data.shape[0] == 1:  # 4D holding one volume
        data = data[0]
    return data


def _read_voxels(path: Path) -> tuple[np.ndarray, ImageHeader]:
    """Native-dtype voxels in array order, checked against the header and for finiteness."""
    header = read_header(path)
    require_3d(header)
    data = _nifti_voxels(path) if _ext(path.name) in _NIFTI else _itk_voxels(path)
    if tuple(data.shape) != header.shape:
        raise CorruptImage(f"{path}: voxel data shape {data.shape} does not match the header's "
                           f"{header.shape}; the file is corrupt, re-export it")
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            n = int(data.size - np.count_nonzero(finite))
            raise NonFiniteImage(f"{path}: {n} of {data.size} voxels are NaN or infinite; fix or "
                                 "re-export the image (nnssl does not guess replacement values)")
    return data, header


def read_image(path: str | os.PathLike, dtype: type = np.float32) -> tuple[np.ndarray, ImageHeader]:
    """Full robust read of a 3D image: (C-contiguous array in array order, header).

    Never repairs silently: NaN/Inf, truncation, a header that disagrees with the data, 2D/4D/
    vector images and bad spacing all raise an `ImageReadError` naming the file.
    """
    path = Path(path)
    data, header = _read_voxels(path)
    with np.errstate(over="ignore"):  # overflow to inf is detected just below
        out = np.ascontiguousarray(data, dtype=dtype)
    if (np.issubdtype(out.dtype, np.floating) and np.issubdtype(data.dtype, np.floating)
            and out.dtype.itemsize < data.dtype.itemsize and not np.isfinite(out).all()):
        raise NonFiniteImage(f"{path}: values exceed the range of {out.dtype} (largest magnitude "
                             f"{np.abs(data).max():g}); rescale the image")
    return out, header


def _mask_values_problem(data: np.ndarray) -> str | None:
    if data.size == 0:
        return None
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > 255:
        return f"found range {lo:g}..{hi:g}"
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        return "found non-integer values"
    return None


def read_mask(path: str | os.PathLike, reference: ImageHeader | None = None,
              tolerance: float = 1e-3) -> np.ndarray:
    """A label/mask volume as uint8, checked for integer values in 0..255 and (optionally) the grid.

    Values are checked before the cast so that e.g. -1 can never become 255; the geometry is
    checked on the header first, so a mask on the wrong grid is rejected without decoding it.
    """
    path = Path(path)
    if reference is not None:
        header = read_header(path)
        require_3d(header)
        problem = geometry_mismatch(reference, header, tolerance)
        if problem:
            raise ImageReadError(f"{path}: mask does not match its image {reference.path}: {problem}; "
                                 "resample the mask onto the image grid")
    data, _ = _read_voxels(path)
    problem = _mask_values_problem(data)
    if problem:
        raise ImageReadError(f"{path}: mask values must be integers in 0..255 ({problem}); store it "
                             "as an integer label image")
    return np.ascontiguousarray(data, dtype=np.uint8)


def geometry_mismatch(a: ImageHeader, b: ImageHeader, tolerance: float = 1e-3) -> str | None:
    """None when `b` lies on `a`'s voxel grid, else what differs (phrased for `b` as the mask).

    Tolerances: spacing relative, origin in mm up to `tolerance` times the smallest voxel size
    (a relative origin tolerance would allow half a voxel at 500 mm), direction cosines absolute.
    """
    if a.shape != b.shape:
        return f"shape {b.shape} differs from the image's {a.shape}"
    checks = (
        ("spacing", a.spacing, b.spacing, dict(rtol=tolerance, atol=0.0)),
        ("origin", a.origin, b.origin, dict(rtol=0.0, atol=tolerance * min(a.spacing, default=1.0))),
        ("direction", a.direction, b.direction, dict(rtol=0.0, atol=tolerance)),
    )
    for name, va, vb, tol in checks:
        if len(va) != len(vb) or not np.allclose(va, vb, **tol):
            return (f"{name} {tuple(round(v, 4) for v in vb)} differs from the image's "
                    f"{tuple(round(v, 4) for v in va)}")
    return None


def write_image(path: str | os.PathLike, array: np.ndarray, spacing: tuple[float, ...],
                origin: tuple[float, ...] | None = None,
                direction: tuple[float, ...] | None = None) -> None:
    """Write an array (array order, spacing in array order) atomically in the format of `path`.

    `origin` and `direction` are in ITK order (x, y, z; flat row-major). Readers never see a
    half-written file: single-file formats are renamed into place; for `.mhd`/`.nhdr` the data
    file is moved first and the header last.
    """
    path = Path(path)
    ext = _ext(path.name)
    if ext is None:
        raise NnsslError(f"{path}: unsupported output format; use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)  # ITK has no boolean pixel type
    nd = array.ndim
    if len(spacing) != nd or (origin is not None and len(origin) != nd) or \
            (direction is not None and len(direction) != nd * nd):
        raise ValueError(f"write_image({path}): array is {nd}D but spacing/origin/direction have "
                         f"{len(spacing)}/{len(origin or ())}/{len(direction or ())} values")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    if origin is not None:
        image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in direction))
    compress = ext in (".nii.gz", ".nrrd", ".mha", ".mhd", ".nhdr")
    if ext in _DETACHED:
        _write_detached(image, path, compress)
        return
    with atomic_path(path) as tmp:
        target = tmp.with_name(tmp.name + ext)  # SimpleITK picks the writer from the extension
        try:
            sitk.WriteImage(image, str(target), useCompression=compress)
            os.replace(target, tmp)
        finally:
            if target.exists():
                target.unlink()


def _write_detached(image: sitk.Image, path: Path, compress: bool) -> None:
    """Header + data file: written under the final names in a hidden folder beside `path`
    (the header names its data file), then moved out data first, header last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        sitk.WriteImage(image, str(tmpdir / path.name), useCompression=compress)
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
