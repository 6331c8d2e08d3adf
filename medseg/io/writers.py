"""Write masks and images as NIfTI on the input's exact voxel grid, atomically and checked.

Every write goes the same way (``docs/geometry.md`` has the details):

1. Check the target before any work: a ``.nii.gz``/``.nii`` name, an existing
   folder that accepts a new file, no existing file unless ``overwrite=True``,
   never the input itself (not even with ``overwrite=True``).
2. Write into a hidden temporary file in the target folder
   (``.<name>.<random>.tmp``), with sform = the input's affine and the qform set
   from the same affine, the input's qform/sform codes (1/1 for non-NIfTI
   inputs), and nothing else: blank ``descrip``/``aux_file``/``intent_name``, no
   extensions, no DICOM tags.
3. Read the temporary file's header back with nibabel and check shape, data type,
   codes and the field-of-view corners (1e-4 mm, plus the float32 rounding of
   the header for far-away origins).
4. ``fsync``, then rename into place. Any failure removes the temporary file
   (steps 2 and 4 are :func:`medseg.io.atomic.atomic_path`).
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg.errors import ArrayValueError, GeometryError, OutputExistsError, OutputWriteError
from medseg.io.atomic import atomic_path
from medseg.io.compression import gzip_open, gzip_writer
from medseg.io.geometry import Geometry, NiftiCodes
from medseg.io.volume import Volume

__all__ = ["check_free_space", "nifti_size_bound", "write_mask", "write_volume"]

CORNER_TOL_MM = 1e-4  # written header vs intended grid, before float32 rounding is added
SHEAR_TOL = 1e-4  # beyond this a qform cannot hold the affine: written with qform_code 0
FLOAT32_EPS = 2.0**-23
QFORM_LIMIT_MM = 1e-2  # largest corner error accepted from the float32 quaternion of a qform


def write_mask(mask, like: Volume | Geometry, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a label mask as NIfTI on the grid of ``like``.

    Args:
        mask: integer (or bool, or integer-valued float) array of ``like``'s spatial
            shape, or ``(1, *shape)``. Stored as uint8, or uint16 when a label is
            above 255.
        like: the scan the mask belongs to (its geometry and qform/sform codes are
            copied), or its :class:`Geometry`.
        path: output file ending in ``.nii.gz`` or ``.nii``; for a 2D grid also
            ``.png`` or ``.tif``/``.tiff`` (a greyscale image, read back and compared
            before the rename; :mod:`medseg.io.images2d`).
        overwrite: replace an existing file (never the input itself).

    Returns:
        The path written.

    Raises:
        OutputExistsError: the file exists (and ``overwrite`` is False) or is the input.
        OutputWriteError: the folder is missing or not writable, or the write failed.
        GeometryError: the mask's shape does not match, or the written header differs.
        ArrayValueError: negative, fractional, non-finite or too large labels.
    """
    from medseg.io.images2d import MASK_IMAGE_SUFFIXES, write_mask_image

    if Path(path).name.lower().endswith(MASK_IMAGE_SUFFIXES):
        geometry, source = _like(like)
        target = _check_target(Path(path), source, overwrite=overwrite, image=True)
        return write_mask_image(_mask_data(mask, geometry, target), geometry, target, overwrite=overwrite)
    return _write_nifti(_mask_data, mask, like, path, overwrite=overwrite, compresslevel=6)


def write_volume(array, like: Volume | Geometry, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write an image (e.g. probabilities) as NIfTI on the grid of ``like``.

    Args:
        array: ``like``'s spatial shape, or channel-first ``(C, *shape)``; several
            channels are stored on the 4th NIfTI axis (3D grids only), as
            :func:`~medseg.io.readers.read_volume` reads them back. float32, uint8 and
            int16 are stored as they are; float64 and float16 are stored as float32
            (NIfTI-1 has no float16); bool as uint8.
        like: the scan whose grid and codes to use, or its :class:`Geometry`.
        path: output file ending in ``.nii.gz`` or ``.nii``.
        overwrite: replace an existing file (never the input itself).

    Returns:
        The path written.

    Raises:
        OutputExistsError, OutputWriteError, GeometryError: as :func:`write_mask`.
        ArrayValueError: NaN/Inf values or an unsupported data type.
    """
    return _write_nifti(_volume_data, array, like, path, overwrite=overwrite, compresslevel=1)


# --- free space -------------------------------------------------------------------
NIFTI_HEADER_BYTES = 352  # NIfTI-1 header + the 4-byte extension flag
GZIP_WRAPPER_BYTES = 18  # gzip header (10, no file name) and trailer (8)


def nifti_size_bound(shape, itemsize: int, *, gz: bool = True) -> int:
    """Upper bound in bytes of a NIfTI-1 file of ``shape`` voxels of ``itemsize`` bytes.

    Compression gives no guarantee (noise does not compress, and deflate can even
    grow it a little): the bound is the uncompressed size plus zlib's worst-case
    deflate overhead (``deflateBound``: n/4096 + n/16384 + n/2^25 + 7 bytes) and the
    gzip wrapper, so it holds whatever the voxels are.
    """
    raw = NIFTI_HEADER_BYTES + math.prod(int(s) for s in shape) * int(itemsize)
    if not gz:
        return raw
    return raw + (raw >> 12) + (raw >> 14) + (raw >> 25) + 7 + GZIP_WRAPPER_BYTES


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``300 MiB``, ``12 KiB``: sizes in the messages about free space."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_free_space(folder: str | os.PathLike, needed_bytes: int, *, what: str = "the outputs") -> int:
    """Refuse, before any work, when ``folder``'s file system has less free space than ``needed_bytes``.

    ``folder`` may not exist yet: its nearest existing parent is checked (where it
    will be created). Free space is what an unprivileged user may use
    (``shutil.disk_usage(...).free``).

    Returns:
        The free bytes found.

    Raises:
        OutputWriteError: not enough free space (the message gives needed vs free and the folder).
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return -1  # free space unknown (e.g. a special file system): the atomic write still guards
    if needed_bytes > free:
        raise OutputWriteError(
            f"not enough free space in {folder}: {what} need up to {format_bytes(needed_bytes)} "
            f"(uncompressed size, the upper bound), only {format_bytes(free)} is free. Free up space there "
            "or pass another output folder (-o)."
        )
    return free


# --- array checks -----------------------------------------------------------------
def _mask_data(mask, geometry: Geometry, target: Path) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim == geometry.spatial_dims + 1 and array.shape[0] == 1:
        array = array[0]
    if array.shape != geometry.shape:
        raise GeometryError(
            f"cannot write {target}: mask shape {array.shape} does not match the scan's spatial shape "
            f"{geometry.shape}. Restore the mask to the scan's grid before writing."
        )
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise ArrayValueError(
                f"cannot write {target}: the mask holds NaN/Inf values; expected integer labels."
            )
        fractional = array != np.round(array)
        if np.any(fractional):
            examples = sorted({float(v) for v in array[fractional].ravel()[:1000]})[:5]
            raise ArrayValueError(
                f"cannot write {target}: the mask has {int(np.count_nonzero(fractional))} non-integer value(s), "
                f"e.g. {examples}; expected integer labels. Take the argmax of the probabilities (or threshold "
                "them) first."
            )
    elif array.dtype.kind not in "iu":
        raise ArrayValueError(
            f"cannot write {target}: mask data type {array.dtype} is not an integer label type."
        )
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0:
        raise ArrayValueError(
            f"cannot write {target}: the mask has negative labels (min {low}); labels are >= 0."
        )
    if high > np.iinfo(np.uint16).max:
        raise ArrayValueError(
            f"cannot write {target}: label {high} is above 65535, the largest uint16 label."
        )
    return array.astype(np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16)


def _volume_data(array, geometry: Geometry, target: Path) -> np.ndarray:
    data = np.asarray(array)
    if data.shape != geometry.shape:
        if data.ndim != geometry.spatial_dims + 1 or data.shape[1:] != geometry.shape:
            raise GeometryError(
                f"cannot write {target}: array shape {data.shape} is neither the scan's spatial shape "
                f"{geometry.shape} nor channel-first (C, *{geometry.shape})."
            )
        if data.shape[0] == 1:
            data = data[0]
        elif geometry.spatial_dims == 2:
            raise GeometryError(
                f"cannot write {target}: a 2D image with {data.shape[0]} channels has no unambiguous NIfTI form; "
                "write one file per channel."
            )
        else:
            data = np.moveaxis(data, 0, -1)
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype in (np.float64, np.float16):
        data = data.astype(np.float32)
    if data.dtype not in (np.float32, np.uint8, np.int16):
        raise ArrayValueError(
            f"cannot write {target}: data type {data.dtype} is not supported; use float32, uint8 or int16 "
            "(e.g. array.astype(numpy.float32))."
        )
    if data.dtype == np.float32 and not np.all(np.isfinite(data)):
        count = int(np.count_nonzero(~np.isfinite(data)))
        raise ArrayValueError(f"cannot write {target}: {count} value(s) are NaN/Inf; outputs must be finite.")
    return data


# --- the shared write path ------------------------------------------------------------
def _write_nifti(
    convert: Callable[[object, Geometry, Path], np.ndarray],
    values,
    like: Volume | Geometry,
    path: str | os.PathLike,
    *,
    overwrite: bool,
    compresslevel: int,
) -> Path:
    geometry, source = _like(like)
    target = _check_target(Path(path), source, overwrite=overwrite)
    with atomic_path(target, overwrite=overwrite) as temp:  # proves the folder writable before any work
        data = convert(values, geometry, target)
        image, qcode, scode = _nifti_image(data, geometry)
        with open(temp, "wb") as raw:
            if _is_gz(target):
                with gzip_writer(raw, compresslevel=compresslevel) as gz:
                    image.to_stream(gz)
            else:
                image.to_stream(raw)
        _check_written(temp, target, data, geometry, qcode, scode)
    return target


def _like(like: Volume | Geometry) -> tuple[Geometry, Path | None]:
    if isinstance(like, Volume):
        return like.geometry, like.path
    if isinstance(like, Geometry):
        return like, None
    raise TypeError(f"like must be a Volume or a Geometry, got {type(like).__name__}.")


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".nii.gz")


def _check_target(target: Path, source: Path | None, *, overwrite: bool, image: bool = False) -> Path:
    name = target.name.lower()
    if not (name.endswith(".nii.gz") or name.endswith(".nii") or image):
        raise OutputWriteError(
            f"cannot write {target}: medseg writes NIfTI only; use a name ending in .nii.gz (or .nii). "
            "Other formats (.mha, .nrrd, DICOM) may carry patient data."
        )
    folder = target.parent
    if not folder.exists():
        raise OutputWriteError(f"cannot write {target}: the folder {folder} does not exist; create it first.")
    if not folder.is_dir():
        raise OutputWriteError(f"cannot write {target}: {folder} is not a folder.")
    if target.is_dir():
        raise OutputWriteError(f"cannot write {target}: it is a folder; give a file name ending in .nii.gz.")
    if source is not None:
        resolved, source_resolved = target.resolve(), source.resolve()
        same = resolved == source_resolved or (
            target.exists() and source.exists() and os.path.samefile(target, source)
        )
        if same:
            raise OutputExistsError(
                f"refusing to write {target}: it is the input scan itself (inputs are never modified, "
                "even with overwrite). Choose another output name."
            )
        if source.is_dir() and resolved.parent == source_resolved:
            raise OutputExistsError(
                f"refusing to write {target} inside the input DICOM folder {source} (inputs are never "
                "modified). Choose another folder."
            )
    if not overwrite and (target.exists() or target.is_symlink()):
        raise OutputExistsError(
            f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it, or choose another name."
        )
    return target


def _nifti_image(data: np.ndarray, geometry: Geometry):
    """A fresh NIfTI-1 image: only geometry, codes and voxels (no descrip, extensions, patient data)."""
    import nibabel as nib

    codes = geometry.nifti_codes
    if codes is None or (codes.qform_code == 0 and codes.sform_code == 0):
        codes = NiftiCodes(qform_code=1, sform_code=1)  # scanner anatomical: a placed grid needs a code
    scode = codes.sform_code
    qcode = 0 if geometry.shear > SHEAR_TOL else codes.qform_code  # a qform cannot hold shear
    if qcode > 0 and scode > 0:
        error = geometry.max_corner_distance(_quantised_qform(geometry))
        if error > QFORM_LIMIT_MM:
            warnings.warn(
                f"the NIfTI qform (a float32 quaternion) would be off by {error:.3g} mm for this oblique grid; "
                "the mask is written with qform_code 0 so that viewers use its exact sform.",
                stacklevel=4,
            )
            qcode = 0
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    image = nib.Nifti1Image(data, None, header=header)
    image.set_sform(geometry.affine, code=scode)
    image.set_qform(geometry.affine, code=qcode)
    image.header.set_xyzt_units(xyz="mm")
    image.header.set_slope_inter(1.0, 0.0)
    for key in ("descrip", "aux_file", "intent_name"):
        image.header[key] = b""
    image.header.extensions.clear()
    return image, qcode, scode


def _corner_tolerance(geometry: Geometry) -> float:
    """1e-4 mm plus what float32 storage of the header can move a corner (large origins)."""
    affine = geometry.affine
    extent = np.array([s + 0.5 for s in geometry.shape] + [0.0] * (3 - geometry.spatial_dims))
    largest = np.max(np.abs(affine[:3, 3]) + np.abs(affine[:3, :3]) @ extent)
    return CORNER_TOL_MM + 8 * FLOAT32_EPS * float(largest)


def _quantised_qform(geometry: Geometry) -> Geometry:
    """The grid as a NIfTI qform stores it (float32 quaternion, offsets and pixdim)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_qform(geometry.affine, code=1)
    return Geometry(shape=geometry.shape, affine=header.get_qform())


def _check_written(
    temp: Path, target: Path, data: np.ndarray, geometry: Geometry, qcode: int, scode: int
) -> None:
    """Re-read the temporary file's header and check it against what was meant to be written."""
    import nibabel as nib

    with gzip_open(temp, "rb") if _is_gz(target) else open(temp, "rb") as f:
        header = nib.Nifti1Header.from_fileobj(f)
    problems = []
    shape = tuple(int(s) for s in header.get_data_shape())
    if shape != data.shape:
        problems.append(f"shape {shape} instead of {data.shape}")
    if header.get_data_dtype() != data.dtype:
        problems.append(f"data type {header.get_data_dtype()} instead of {data.dtype}")
    written_codes = (int(header["qform_code"]), int(header["sform_code"]))
    if written_codes != (qcode, scode):
        problems.append(f"qform/sform codes {written_codes} instead of {(qcode, scode)}")
    tolerance = _corner_tolerance(geometry)
    checks = [("sform", header.get_sform(), geometry)]
    if qcode > 0 or scode == 0:
        # The qform is a float32 quaternion: for rotations near 180 degrees its first component is
        # tiny and the stored rotation is off by up to ~1e-3 mm at the corners (a limit of the NIfTI
        # format, which the sform does not have). Check the written qform against nibabel's own
        # quantisation of the grid, and that quantisation against the grid with QFORM_LIMIT_MM.
        expected = _quantised_qform(geometry)
        representable = geometry.max_corner_distance(expected)
        if representable > max(QFORM_LIMIT_MM, tolerance):
            problems.append(
                f"the qform (a float32 quaternion) cannot hold this grid within {QFORM_LIMIT_MM} mm "
                f"({representable:.3g} mm)"
            )
        checks.append(("qform", header.get_qform(), expected))
    for name, affine, reference in checks:
        try:
            distance = reference.max_corner_distance(Geometry(shape=geometry.shape, affine=affine))
        except GeometryError as err:
            distance, name = float("inf"), f"{name} ({err})"
        if distance > tolerance:
            problems.append(
                f"{name} corners up to {distance:.3g} mm from the scan's (tolerance {tolerance:.2g} mm)"
            )
    if problems:
        raise GeometryError(
            f"refusing to write {target}: the written header does not reproduce the scan's grid: "
            + "; ".join(problems)
            + ". Nothing was written; please report this as a medseg bug."
        )
