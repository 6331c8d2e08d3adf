"""Read scans (NIfTI, DICOM series, MetaImage/NRRD) into a :class:`Volume` with exact geometry.

Rules (the full list, with every refusal, is in ``docs/geometry.md``):

* **Format by content.** The first bytes decide: gzip, raw NIfTI-1/2, or DICOM
  (``DICM`` at byte 128). A DICOM file named ``.nii.gz`` is refused; a raw NIfTI
  named ``.nii.gz`` (or a gzipped one named ``.nii``) is read with a warning.
  NIfTI is read with nibabel, decompressed up to the size its header declares,
  so a truncated or short file raises instead of loading zeros (SimpleITK would
  load zeros), and trailing data (or a decompression bomb) is refused.
* **qform/sform.** The sform when ``sform_code > 0``, else the qform when
  ``qform_code > 0``; both codes 0 is refused (no fallback to nibabel's
  "base affine"). A sheared sform is refused unless ``allow_shear=True`` (then it
  is kept exactly as written). Both coded and more than 1e-3 mm apart at a
  field-of-view corner: warning, the sform wins. The codes are kept in
  ``Geometry.nifti_codes`` so that a mask written for the scan carries them.
* **Dimensions.** ``(X, Y)`` is a 2D scan; ``(X, Y, Z)`` is 3D (also when
  ``Z == 1``); ``(X, Y, Z, C)`` is a 3D scan with ``C`` channels (the 4th NIfTI
  axis, whatever the file calls it); 5 or more axes are refused. The array is
  always channel-first ``(C, *spatial)``.
* **Intensities.** ``scl_slope``/``scl_inter`` (NIfTI) and RescaleSlope/Intercept
  (DICOM) are applied: CT comes back in HU. Integer data with integer scaling
  stays integer. NaN/Inf voxels, RGB/complex/structured voxel types are refused.
* **DICOM folders.** Every file's header is read with pydicom; files are
  grouped by SeriesInstanceUID; several series need ``series_uid=``. The slices
  must share orientation, size and pixel spacing, have distinct, uniformly
  spaced positions along the slice normal and no gantry tilt; only then are the
  pixels read with SimpleITK, and ITK's geometry is checked against the slice
  positions. A one-slice series is a 2D scan.
* **Memory.** The decoded size (voxels x bytes) is compared with the available
  memory before any voxel is read.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import DicomSeriesError, GeometryError, ScanReadError
from medseg.io.compression import GZIP_ERRORS, gzip_open
from medseg.io.formats import IMAGE_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES, suffix_of
from medseg.io.geometry import Geometry, NiftiCodes, affine_from_lps
from medseg.io.images2d import read_image
from medseg.io.volume import Volume

__all__ = ["DicomSeries", "list_dicom_series", "read_volume"]

# tolerances (mm unless said otherwise), documented in docs/geometry.md
SHEAR_TOL = 1e-4  # largest |cos| between two voxel axes of an "orthogonal" sform
QFORM_SFORM_TOL_MM = 1e-3  # sform vs qform at the field-of-view corners
IOP_TOL = 1e-4  # ImageOrientationPatient differences between slices
SPACING_REL_TOL = 1e-2  # slice steps: largest relative deviation from the median step
DUPLICATE_TOL_MM = 1e-3  # two slices closer than this along the normal are duplicates
DICOM_POSITION_TOL_MM = 1e-2  # IPP off the slice normal (tilt) and ITK geometry vs IPP
TILT_POSITION_TOL_MM = 0.1  # resample_tilt: every slice's IPP vs its place on the corrected grid
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
TRAILING_PROBE_BYTES = 1 << 20  # NIfTI: bytes read past the declared end to report trailing data
MAX_HEADER_BYTES = 1 << 20  # MetaImage/NRRD: header text read to find the data file names
MAX_DATA_FILES = 100_000  # MetaImage/NRRD: most data files a LIST or pattern may name


def read_volume(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    allow_shear: bool = False,
    data_root: str | os.PathLike | None = None,
    resample_tilt: bool = False,
) -> Volume:
    """Read a scan file or DICOM series folder with its exact geometry.

    Args:
        path: ``.nii``/``.nii.gz`` (NIfTI-1 or -2), ``.mha``/``.mhd``/``.nrrd``/``.nhdr``,
            a folder holding one DICOM series (files directly in it), or a 2D image
            (``.png``/``.jpg``/``.jpeg``/``.tif``/``.tiff``/``.bmp``; rules in
            :mod:`medseg.io.images2d`).
        series_uid: which series to read when a DICOM folder holds several.
        allow_shear: keep a sheared (non-orthogonal) NIfTI sform as written instead
            of refusing it. Masks written for such a scan carry the same sform
            (and qform_code 0, since a qform cannot hold shear).
        data_root: the folder that the data files of a detached header (``.mhd``
            ``ElementDataFile``, ``.nhdr``/``.nrrd`` ``data file``) must lie inside,
            symlinks resolved; default: the header's own folder. Dataset cases pass
            the dataset root.
        resample_tilt: DICOM series acquired with gantry tilt (a sheared stack) are
            refused unless this is True; then each slice is shifted in its plane
            (linear interpolation) onto a regular grid whose third axis is the slice
            normal, slices staying at their positions along it, and the result is
            float32. A mask is then written on that corrected grid (docs/geometry.md).

    Returns:
        A :class:`Volume`, array channel-first ``(C, *spatial)``.

    Raises:
        ScanReadError: missing, empty, truncated, corrupt or unsupported file, NaN/Inf
            voxels, not enough memory, a detached data file outside ``data_root``.
        DicomSeriesError: the folder does not hold exactly one regular series.
        GeometryError: no usable orientation (both NIfTI codes 0, sheared sform).
    """
    path = Path(path)
    if not path.exists():
        raise ScanReadError(f"{path}: no such file or folder. Check the path.")
    if path.is_dir():
        return _read_dicom_folder(path, series_uid, resample_tilt=resample_tilt)
    if series_uid is not None:
        raise ScanReadError(f"{path}: series_uid applies to DICOM folders only; this is a file.")
    kind = _sniff(path)
    suffix = _suffix(path)
    if kind == "dicom":
        if suffix in NIFTI_SUFFIXES:
            raise ScanReadError(
                f"{path}: the extension says {suffix} but the content is DICOM. Rename it and pass "
                "the folder that holds its series (medseg reads DICOM series folders, not single files)."
            )
        raise ScanReadError(
            f"{path} is a single DICOM file; pass the folder that holds the whole series instead."
        )
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path, kind, suffix, allow_shear=allow_shear)
    if suffix in IMAGE_SUFFIXES and kind == "unknown":
        return read_image(path)
    if suffix in ITK_SUFFIXES:
        _check_data_files(path, suffix, Path(data_root) if data_root is not None else path.parent)
        return _read_itk_file(path)
    if kind in ("nifti1", "nifti2", "gzip"):
        warnings.warn(
            f"{path}: no NIfTI extension, but the content is NIfTI; reading it as NIfTI.", stacklevel=2
        )
        return _read_nifti(path, kind, suffix, allow_shear=allow_shear)
    raise ScanReadError(
        f"{path}: unsupported file type {suffix or '(no extension)'}. medseg reads .nii/.nii.gz, "
        ".mha/.mhd/.nrrd/.nhdr files, DICOM series folders and 2D images (.png, .jpg, .tif, .bmp)."
    )


# --- format sniffing ----------------------------------------------------------
def _suffix(path: Path) -> str:
    return suffix_of(path)


def _nifti_kind(head: bytes) -> str | None:
    """'nifti1' / 'nifti2' when ``head`` starts like a NIfTI header (either byte order)."""
    if len(head) >= 348:
        for order in "<>":
            size = struct.unpack(order + "i", head[:4])[0]
            if size == 348 and head[344:347] in (b"n+1", b"ni1"):
                return "nifti1"
            if size == 540 and head[4:7] in (b"n+2", b"ni2"):
                return "nifti2"
    return None


def _sniff(path: Path) -> str:
    """'gzip', 'nifti1', 'nifti2', 'dicom' or 'unknown', from the first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(540)
    except OSError as err:
        raise ScanReadError(
            f"{path}: cannot be opened ({err.strerror}). Check the path and permissions."
        ) from err
    if not head:
        raise ScanReadError(
            f"{path} is empty (0 bytes): the file is truncated or was never written. Re-export it."
        )
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return _nifti_kind(head) or "unknown"


# --- memory -------------------------------------------------------------------
def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not block


def _check_memory(path: Path, shape, itemsize: int, *, extra_bytes: int = 0) -> None:
    """Refuse before reading when the decoded voxels (plus one working copy) do not fit in memory.

    ``extra_bytes``: bytes read besides the voxels (a NIfTI header's declared data offset).
    """
    needed = 2 * math.prod(int(s) for s in shape) * int(itemsize) + int(extra_bytes)
    available = _available_memory()
    if needed > available:
        raise ScanReadError(
            f"{path}: the header declares {tuple(int(s) for s in shape)} voxels of {itemsize} bytes, which needs "
            f"about {needed / 2**30:.1f} GiB of memory but only {available / 2**30:.1f} GiB is available. "
            "The header may be corrupt (a decompression bomb); otherwise crop or downsample the scan first."
        )


# --- voxel checks -------------------------------------------------------------
def _check_voxels(path: Path, data: np.ndarray) -> None:
    """Refuse non-numeric voxel types and NaN/Inf values."""
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        names = data.dtype.names or ()
        what = (f"RGB voxels ({len(names)} colour values each)" if names and set(names) <= set("RGBA")
                else "complex voxels" if data.dtype.kind == "c" else "structured voxels")
        raise ScanReadError(
            f"{path}: voxel type {data.dtype} is not supported (RGB, complex or structured): found "
            f"{tuple(int(s) for s in data.shape)} with {what}. Expected one grey value per voxel and channel; "
            "convert it to a single-channel (or 4D (X, Y, Z, C) multi-channel) scan."
        )
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        count = int(np.count_nonzero(bad))
        if count:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ScanReadError(
                f"{path}: {count} voxel(s) are NaN or Inf (first at index {first}). "
                "Scans must hold finite intensities; fix or replace those voxels (e.g. numpy.nan_to_num) first."
            )


def _apply_scaling(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """Apply NIfTI scl_slope/scl_inter; integers stay integers when the scaling is integral."""
    if not np.isfinite(slope) or slope == 0:
        slope = 1.0
    if not np.isfinite(inter):
        inter = 0.0
    if slope == 1.0 and inter == 0.0:
        return raw
    if raw.dtype.kind in "iu" and float(slope).is_integer() and float(inter).is_integer():
        lo, hi = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
        ends = [lo * slope + inter, hi * slope + inter]
        for dtype in (np.int16, np.int32, np.int64):
            info = np.iinfo(dtype)
            if info.min <= min(ends) and max(ends) <= info.max:
                return raw.astype(dtype) * dtype(slope) + dtype(inter)
    float_type = np.float32 if raw.dtype.itemsize <= 2 or raw.dtype == np.float32 else np.float64
    return raw.astype(float_type) * float_type(slope) + float_type(inter)


# --- NIfTI ----------------------------------------------------------------------
def _read_nifti(path: Path, kind: str, suffix: str, *, allow_shear: bool) -> Volume:
    import nibabel as nib

    if kind == "unknown":
        raise ScanReadError(
            f"{path}: not a NIfTI file (no gzip or NIfTI header magic). The file is corrupt or has the wrong "
            "extension."
        )
    compressed = kind == "gzip"
    if compressed != (suffix == ".nii.gz") and suffix in NIFTI_SUFFIXES:
        content = "gzip-compressed" if compressed else "uncompressed"
        warnings.warn(
            f"{path}: the name ends in {suffix} but the content is {content} NIfTI; reading it by content. "
            "Rename the file to match.",
            stacklevel=3,
        )
    try:
        with gzip_open(path, "rb") if compressed else open(path, "rb") as f:
            head = f.read(540)
            inner = _nifti_kind(head)
            if inner is None:
                raise ScanReadError(f"{path}: a gzip file, but what it holds is not a NIfTI header.")
            image_class = nib.Nifti2Image if inner == "nifti2" else nib.Nifti1Image
            # the fixed-size part only: its extensions come with the full read below
            size = 540 if inner == "nifti2" else 348
            header = image_class.header_class.from_fileobj(io.BytesIO(head[:size]))
            shape = tuple(int(s) for s in header.get_data_shape())
            if len(shape) not in (2, 3, 4) or any(s < 1 for s in shape):
                raise ScanReadError(
                    f"{path}: {len(shape)}D image of shape {shape} is not supported. Expected (X, Y), (X, Y, Z) "
                    "or (X, Y, Z, C) with C channels on the 4th axis."
                )
            itemsize = header.get_data_dtype().itemsize
            data_start = max(int(header.get_data_offset()), size + 4)
            declared = data_start + math.prod(shape) * itemsize
            _check_memory(path, shape, max(itemsize, 4), extra_bytes=data_start)
            # no more than the header declares: a decompression bomb stops here, not after 300 MB
            f.seek(0)
            content = f.read(declared)
            if len(content) == declared:
                _refuse_trailing_data(path, f, declared, compressed)
        img = image_class.from_bytes(content)
        raw = np.asanyarray(img.dataobj.get_unscaled())
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    except ScanReadError:
        raise
    except (
        OSError,
        EOFError,
        *GZIP_ERRORS,
        ValueError,
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
    ) as err:
        raise ScanReadError(
            f"{path}: truncated or corrupt NIfTI file ({type(err).__name__}: {err}). Re-export or re-copy it."
        ) from err
    del content
    _check_voxels(path, raw)
    data = _apply_scaling(raw, slope, inter)
    _check_voxels(path, data)

    geometry = _nifti_geometry(path, header, shape[:3], allow_shear=allow_shear)
    array = np.moveaxis(data, -1, 0) if data.ndim == 4 else data[np.newaxis]
    return Volume(array=array, geometry=geometry, path=path, meta={"format": "nifti"})


def _refuse_trailing_data(path: Path, f, declared: int, compressed: bool) -> None:
    """Refuse bytes after the declared end; reading to the end also checks the gzip CRC.

    At most ``TRAILING_PROBE_BYTES`` more are decompressed, in small chunks, so that a
    bomb (a tiny header followed by gigabytes of zeros) never reaches memory.
    """
    found = declared
    while found - declared < TRAILING_PROBE_BYTES:
        chunk = f.read(min(1 << 16, declared + TRAILING_PROBE_BYTES - found))
        if not chunk:
            break
        found += len(chunk)
    if found == declared:
        return
    if not compressed:
        found = os.fstat(f.fileno()).st_size
    amount = f"{found} bytes" if found - declared < TRAILING_PROBE_BYTES else f"more than {found} bytes"
    content = "decompressed " if compressed else ""
    raise ScanReadError(
        f"{path}: the header declares {declared} bytes (header, extensions and voxels) but the {content}file holds "
        f"{amount}: trailing data after the image (a corrupt file, two files glued together, or a decompression "
        "bomb). medseg reads no more than the header declares; re-export the scan."
    )


def _nifti_geometry(path: Path, header, shape: tuple[int, ...], *, allow_shear: bool) -> Geometry:
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    scode, qcode = int(scode or 0), int(qcode or 0)
    if scode > 0:
        affine = np.asarray(sform, dtype=np.float64)
    elif qcode > 0:
        affine = np.asarray(qform, dtype=np.float64)
    else:
        raise GeometryError(
            f"{path}: the NIfTI header has no orientation (qform_code and sform_code are both 0), so where "
            "the voxels lie in the patient is unknown. Set the correct orientation, e.g. with nibabel "
            "(img.set_sform(affine, code=1)) or fslorient, then retry."
        )
    unit_scale = {"meter": 1000.0, "micron": 1e-3}.get(header.get_xyzt_units()[0])
    if unit_scale is not None:
        warnings.warn(
            f"{path}: spatial units are {header.get_xyzt_units()[0]}s; converting the geometry to mm.",
            stacklevel=4,
        )
        affine = np.diag([unit_scale] * 3 + [1.0]) @ affine
    try:
        geometry = Geometry(shape=shape, affine=affine, nifti_codes=NiftiCodes(qcode, scode), source="nifti")
    except GeometryError as err:
        raise GeometryError(f"{path}: {err} Fix the header's sform/qform.") from err
    if scode > 0 and geometry.shear > SHEAR_TOL and not allow_shear:
        raise GeometryError(
            f"{path}: the sform is sheared (voxel axes not orthogonal, largest |cos| {geometry.shear:.3g} > "
            f"{SHEAR_TOL}); ITK-based tools would place it differently. Resample the scan onto an orthogonal grid, "
            "or, if the qform is the intended geometry, copy it into the sform (nibabel: "
            "img.set_sform(img.get_qform(), code=1)); or pass allow_shear=True to keep the sheared sform."
        )
    if scode > 0 and qcode > 0:
        q_affine = qform if unit_scale is None else np.diag([unit_scale] * 3 + [1.0]) @ qform
        q_geometry = Geometry(shape=shape, affine=q_affine)
        distance = geometry.max_corner_distance(q_geometry)
        if distance > QFORM_SFORM_TOL_MM:
            warnings.warn(
                f"{path}: the sform (code {scode}) and the qform (code {qcode}) disagree by up to {distance:.3g} mm "
                "at the field-of-view corners; using the sform (as nibabel does). Viewers that prefer the qform "
                "will show the scan elsewhere.",
                stacklevel=4,
            )
    return geometry


# --- MetaImage / NRRD -------------------------------------------------------------
def _check_data_files(path: Path, suffix: str, root: Path) -> None:
    """Refuse a MetaImage/NRRD header whose data file(s) lie outside ``root``, before SimpleITK opens them.

    The header is untrusted: ``ElementDataFile = ../../secret.raw`` (MetaImage) or
    ``data file: /etc/x`` (NRRD) would make SimpleITK read any file the user can read.
    Every form is checked: one name, ``LIST`` (names on the following lines) and
    the ``format min max step`` pattern (each generated name).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_HEADER_BYTES)
    except OSError as err:
        raise ScanReadError(f"{path}: cannot be opened ({err.strerror}). Check the path and permissions.") from err
    lines = head.decode("latin-1").splitlines()
    if suffix in (".mha", ".mhd"):
        names = _metaimage_data_files(path, lines)
    else:
        names = _nrrd_data_files(path, lines)
    root_real = os.path.realpath(root)
    for name in names:
        if "\x00" in name:
            raise ScanReadError(f"{path}: the data file name {name!r} in the header contains a NUL byte.")
        real = os.path.realpath(os.path.join(path.parent, name))
        if os.path.commonpath([real, root_real]) != root_real:
            raise ScanReadError(
                f"{path}: the header's data file {name!r} resolves to {real}, outside {root_real}; detached data "
                "files must stay beside their header (inside the dataset root for dataset cases). Move the data "
                "file next to the header and name it without '..' or an absolute path."
            )


def _expand_data_file_pattern(path: Path, value: str) -> list[str] | None:
    """``'slice%03d.raw 1 10 1'`` -> each name, or ``None`` when ``value`` is not a pattern."""
    parts = value.split()
    if len(parts) < 4 or "%" not in parts[0]:
        return None
    try:
        start, stop, step = (int(v) for v in parts[1:4])
    except ValueError:
        return None
    count = 0 if step == 0 else len(range(start, stop + (1 if step > 0 else -1), step))
    if step == 0 or count > MAX_DATA_FILES:
        raise ScanReadError(
            f"{path}: the data file pattern {value!r} names {'endless' if step == 0 else count} files; "
            f"at most {MAX_DATA_FILES} are read."
        )
    try:
        return [parts[0] % i for i in range(start, stop + (1 if step > 0 else -1), step)]
    except (TypeError, ValueError) as err:
        raise ScanReadError(f"{path}: the data file pattern {parts[0]!r} is not a valid format ({err}).") from err


def _metaimage_data_files(path: Path, lines: list[str]) -> list[str]:
    """The data file names of a MetaImage header (none for ``LOCAL``: the data follow the header)."""
    for n, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if not sep or key.strip().lower() != "elementdatafile":
            continue
        value = value.strip()
        if value.upper() == "LOCAL":
            return []
        if value and value.split()[0].upper() == "LIST":
            return [name.strip() for name in lines[n + 1 :] if name.strip()]
        return _expand_data_file_pattern(path, value) or [value]
    return []


def _nrrd_data_files(path: Path, lines: list[str]) -> list[str]:
    """The data file names of a NRRD header (none when the data follow it in the same file)."""
    for n, line in enumerate(lines[1:], start=1):
        if not line.strip():
            break  # the end of the header: attached data follow
        if line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(":")
        if not sep or key.strip().lower() not in ("data file", "datafile"):
            continue
        value = value.strip()
        if value and value.split()[0].upper() == "LIST":
            return [name.strip() for name in lines[n + 1 :] if name.strip()]
        return _expand_data_file_pattern(path, value) or [value]
    return []


def _read_itk_file(path: Path) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size = reader.GetSize()
        components = reader.GetNumberOfComponents()
        if len(size) not in (2, 3):
            raise ScanReadError(f"{path}: {len(size)}D image {size} is not supported; expected 2D or 3D.")
        if components != 1:
            raise ScanReadError(
                f"{path}: {components} values per voxel (vector/RGB pixels) are not supported; expected one grey "
                "value per voxel."
            )
        _check_memory(path, size, 8)
        image = reader.Execute()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise ScanReadError(
            f"{path}: cannot be read by SimpleITK, the file is corrupt or truncated ({first})."
        ) from err
    ndim = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    if np.max(np.abs(direction.T @ direction - np.eye(ndim))) > SHEAR_TOL:
        raise GeometryError(
            f"{path}: the direction matrix is not orthonormal ({direction.tolist()}); resample the scan onto an "
            "orthogonal grid first."
        )
    full_direction = np.eye(3)
    full_direction[:ndim, :ndim] = direction
    affine = affine_from_lps(full_direction, [*image.GetSpacing(), 1.0][:3], [*image.GetOrigin(), 0.0][:3])
    data = sitk.GetArrayFromImage(image).T  # ITK array is (z, y, x): back to (x, y, z)
    _check_voxels(path, data)
    geometry = Geometry(shape=data.shape, affine=affine, source=_suffix(path).lstrip("."))
    return Volume(
        array=data[np.newaxis], geometry=geometry, path=path, meta={"format": _suffix(path).lstrip(".")}
    )


# --- DICOM --------------------------------------------------------------------------
@dataclass(frozen=True)
class DicomSeries:
    """One series found in a DICOM folder (no patient data).

    Args:
        uid: SeriesInstanceUID ("" when the files leave it empty).
        modality: e.g. "CT", "MR".
        description: SeriesDescription.
        files: the series' files, in folder order.
    """

    uid: str
    modality: str
    description: str
    files: tuple[Path, ...] = field(repr=False)

    @property
    def num_slices(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        """One line: uid, modality, slice count, description."""
        return (
            f"uid {self.uid or '(empty)'}  modality {self.modality or '?'}  {self.num_slices} slice(s)  "
            f"description {self.description!r}"
        )


def _scan_dicom_folder(folder: Path) -> tuple[dict[str, list], int]:
    """Headers of the DICOM image files directly in ``folder``, grouped by SeriesInstanceUID."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list] = {}
    skipped = 0
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        if file.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, struct.error):
            skipped += 1
            continue
        sop_class = str(getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", ""))
        if sop_class == DICOMDIR_SOP_CLASS or "Rows" not in ds:
            skipped += 1  # DICOMDIR, structured reports, RT structures...: not image slices
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((file, ds))
    return groups, skipped


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The image series in a DICOM folder (files directly in it; subfolders are not searched).

    Args:
        folder: a folder of DICOM files (Part 10 files with the ``DICM`` marker).

    Returns:
        One :class:`DicomSeries` per SeriesInstanceUID, sorted by uid.
    """
    folder = Path(folder)
    groups, _ = _scan_dicom_folder(folder)
    return [_series_info(uid, items) for uid, items in sorted(groups.items())]


def _series_info(uid: str, items: list) -> DicomSeries:
    ds = items[0][1]
    return DicomSeries(
        uid=uid,
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        files=tuple(file for file, _ in items),
    )


def _read_dicom_folder(folder: Path, series_uid: str | None, *, resample_tilt: bool = False) -> Volume:
    groups, skipped = _scan_dicom_folder(folder)
    if not groups:
        raise DicomSeriesError(
            f"{folder}: no DICOM image files found ({skipped} file(s) skipped as not DICOM images). "
            "Expected a folder holding the DICOM files of one series (subfolders are not searched)."
        )
    # one line: the CLI prints an error's first line only, and the UIDs are what the user needs
    listing = "; ".join(f"[{_series_info(uid, items).summary()}]" for uid, items in sorted(groups.items()))
    if series_uid is not None:
        if series_uid not in groups:
            raise DicomSeriesError(f"{folder}: no series with uid {series_uid!r}. Series found: {listing}")
        uid = series_uid
    elif len(groups) > 1:
        raise DicomSeriesError(
            f"{folder} holds {len(groups)} DICOM series; choose one with series_uid= (CLI: --series-uid UID): "
            f"{listing}"
        )
    else:
        uid = next(iter(groups))
    items = groups[uid]
    files, positions, normal, tilt = _validate_series(folder, items, resample_tilt=resample_tilt)
    datasets = [ds for _, ds in items]
    meta = {"format": "dicom", "modality": str(datasets[0].get("Modality", ""))}
    if series_uid is not None:
        meta["series_uid"] = series_uid
    array, geometry = _read_dicom_pixels(folder, files, positions, normal, datasets, tilted=tilt is not None)
    if tilt is not None:
        meta["tilt_resampled_deg"] = round(tilt, 3)
    return Volume(array=array, geometry=geometry, path=folder, meta=meta)


def _validate_series(folder: Path, items: list, *, resample_tilt: bool = False):
    """Check the series is one regular stack; return its files and IPPs sorted along the normal, and the tilt.

    The tilt (degrees) is ``None`` for an untilted stack; a tilted (sheared) one is
    refused unless ``resample_tilt``.
    """
    names = [file.name for file, _ in items]
    orientations, positions = [], []
    for file, ds in items:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DicomSeriesError(
                f"{folder}: {file.name} is a multi-frame (enhanced) DICOM file, which medseg does not read. "
                "Convert the series to NIfTI first (e.g. dcm2niix)."
            )
        iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
        if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
            raise DicomSeriesError(
                f"{folder}: slice {file.name} has no valid ImageOrientationPatient/ImagePositionPatient; "
                "slices without a position cannot be placed in a volume."
            )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise DicomSeriesError(f"{folder}: {file.name} has colour (RGB) pixels; expected grey values.")
        orientations.append(np.array([float(v) for v in iop]))
        positions.append(np.array([float(v) for v in ipp]))
    orientations = np.array(orientations)
    iop_diff = np.max(np.abs(orientations - orientations[0]), axis=1)
    if np.max(iop_diff) > IOP_TOL:
        other = int(np.argmax(iop_diff))
        raise DicomSeriesError(
            f"{folder}: the slices have different orientations (ImageOrientationPatient), e.g. {names[0]} "
            f"{np.round(orientations[0], 6).tolist()} vs {names[other]} {np.round(orientations[other], 6).tolist()}. "
            "This is a localizer or a set of separate planes, not one volume; pick a series with a single "
            "orientation."
        )
    for key in ("Rows", "Columns", "PixelSpacing"):
        missing = [file.name for file, ds in items if ds.get(key) is None]
        if missing:
            raise DicomSeriesError(
                f"{folder}: slice {missing[0]} has no {key}; the voxel size of the series is unknown."
            )
        values = {str(np.round(np.asarray(ds.get(key), dtype=np.float64), 6).tolist()) for _, ds in items}
        if len(values) > 1:
            raise DicomSeriesError(
                f"{folder}: the slices have different {key} ({', '.join(sorted(values))}); expected one value "
                "for the whole series."
            )
    gantry = {float(ds.get("GantryDetectorTilt", 0) or 0) for _, ds in items}
    tilt = max(abs(g) for g in gantry)
    if tilt > 1e-3 and not resample_tilt:
        raise DicomSeriesError(
            f"{folder}: the series was acquired with gantry tilt {tilt:g} deg (GantryDetectorTilt, 0018,1120), "
            "so its slices form a sheared grid that medseg does not resample by default. Pass resample_tilt=True "
            "(CLI: --resample-tilt) to resample it onto a regular grid, or convert it with a tool that corrects "
            "gantry tilt (e.g. dcm2niix) and segment the corrected NIfTI."
        )
    row, col = orientations[0][:3], orientations[0][3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    positions = np.array(positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    files = [items[i][0] for i in order]
    positions, along = positions[order], along[order]
    if len(files) == 1:
        return files, positions, normal, None
    steps = np.diff(along)
    duplicates = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if duplicates.size:
        i = int(duplicates[0])
        raise DicomSeriesError(
            f"{folder}: {duplicates.size} duplicate slice position(s), e.g. {files[i].name} and "
            f"{files[i + 1].name} both at {along[i]:.3f} mm along the slice normal. The folder mixes "
            "acquisitions (echoes, phases or a repeated slice); keep one file per position."
        )
    step = float(np.median(steps))
    deviation = np.abs(steps - step) / step
    if np.max(deviation) > SPACING_REL_TOL:
        gaps = ", ".join(
            f"{along[i]:.3f} -> {along[i + 1]:.3f} mm (step {steps[i]:.3f})"
            for i in np.flatnonzero(deviation > SPACING_REL_TOL)[:5]
        )
        raise DicomSeriesError(
            f"{folder}: slice spacing is not uniform (expected {step:.3f} mm between slices along the normal; "
            f"gaps at {gaps}). Slices are missing or the series mixes stacks; restore the missing files or "
            "choose a complete series."
        )
    off_normal = positions - positions[0] - np.outer(along - along[0], normal)
    worst = float(np.max(np.linalg.norm(off_normal, axis=1)))
    if worst > DICOM_POSITION_TOL_MM:
        angle = math.degrees(math.atan2(np.linalg.norm(off_normal[-1]), along[-1] - along[0]))
        if resample_tilt:
            return files, positions, normal, angle
        raise DicomSeriesError(
            f"{folder}: slice positions drift off the slice normal by up to {worst:.3g} mm (about {angle:.2f} deg): "
            "gantry tilt (0018,1120) or a sheared stack, which medseg does not resample by default. Pass "
            "resample_tilt=True (CLI: --resample-tilt) to resample it onto a regular grid, or convert it with a "
            "tool that corrects gantry tilt (e.g. dcm2niix)."
        )
    return files, positions, normal, None


def _read_dicom_pixels(
    folder: Path, files: list[Path], positions: np.ndarray, normal: np.ndarray, datasets: list, *, tilted: bool = False
):
    import SimpleITK as sitk

    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    _check_memory(folder, (cols, rows, len(files)), 8)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    rescale = {(str(ds.get("RescaleSlope", "1")), str(ds.get("RescaleIntercept", "0"))) for ds in datasets}
    if len(rescale) > 1:
        reader.SetOutputPixelType(sitk.sitkFloat32)  # per-slice scaling: keep every slice's values
    try:
        image = reader.Execute()
    except RuntimeError as err:
        last = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise DicomSeriesError(f"{folder}: the pixel data cannot be decoded by SimpleITK ({last}).") from err
    if image.GetNumberOfComponentsPerPixel() != 1 or tuple(image.GetSize()) != (cols, rows, len(files)):
        raise DicomSeriesError(
            f"{folder}: SimpleITK read an image of size {image.GetSize()} x {image.GetNumberOfComponentsPerPixel()} "
            f"component(s); the headers say {cols} x {rows} x {len(files)} grey slices."
        )
    data = sitk.GetArrayFromImage(image).T  # (z, y, x) -> (x, y, z)
    _check_voxels(folder, data)
    if tilted:
        return _resample_tilted(folder, files, data, positions, normal, datasets[0], np.array(image.GetSpacing()[:2]))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    if len(files) == 1:
        direction[:, 2] = normal
        affine = affine_from_lps(direction, [spacing[0], spacing[1], 1.0], origin)
        geometry = Geometry(shape=data.shape[:2], affine=affine, source="dicom")
        array = data[np.newaxis, :, :, 0]
    else:
        affine = affine_from_lps(direction, spacing, origin)
        geometry = Geometry(shape=data.shape, affine=affine, source="dicom")
        array = data[np.newaxis]
    # ITK's geometry must put the first and last slices where their IPPs say
    last_index = [0, 0] if len(files) == 1 else [0, 0, len(files) - 1]
    built = geometry.voxel_to_world(np.array([[0, 0, 0][: geometry.spatial_dims], last_index]))
    expected = positions[[0, -1]] * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
    error = float(np.max(np.linalg.norm(built - expected, axis=1)))
    if error > DICOM_POSITION_TOL_MM:
        raise DicomSeriesError(
            f"{folder}: SimpleITK's geometry places the first/last slice {error:.3g} mm away from their "
            "ImagePositionPatient; the series headers are inconsistent. Convert it with dcm2niix and check it."
        )
    return array, geometry


def _resample_tilted(
    folder: Path,
    files: list[Path],
    data: np.ndarray,
    positions: np.ndarray,
    normal: np.ndarray,
    first,
    pixel_spacing: np.ndarray,
) -> tuple[np.ndarray, Geometry]:
    """Remove the in-plane shifts of a gantry-tilted (sheared) stack, as dcm2niix does.

    Slice ``k`` keeps its plane and its position along the slice normal; it is shifted
    within its plane (linear interpolation) by the in-plane offset of its
    ImagePositionPatient from the first slice's, so that the stack becomes a regular
    grid with axes (row, column, normal). Voxels shifted in from outside the original
    field of view get the series' minimum value (air in CT). Every slice's IPP must
    then lie on the corrected grid at its integer slice index within
    ``TILT_POSITION_TOL_MM``, else the series is refused.
    """
    from scipy import ndimage

    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    offsets = positions - positions[0]
    shifts = np.column_stack([offsets @ row / pixel_spacing[0], offsets @ col / pixel_spacing[1]])
    along = offsets @ normal
    step = float(along[-1] / (len(along) - 1))
    fill = float(data.min())
    corrected = np.empty(data.shape, dtype=np.float32)
    for k in range(data.shape[2]):
        # output[i, j] = input[i - shift_i, j - shift_j]: slice k's pixel (i', j') lands at (i' + shift_i, j' + shift_j)
        corrected[:, :, k] = ndimage.shift(
            data[:, :, k].astype(np.float32), shifts[k], order=1, mode="constant", cval=fill, prefilter=False
        )
    affine = affine_from_lps(np.column_stack([row, col, normal]), [*pixel_spacing, step], positions[0])
    geometry = Geometry(shape=corrected.shape, affine=affine, source="dicom")
    # each original slice's IPP, at its in-plane shift and integer slice index, must come back from the new affine
    index = np.column_stack([shifts, np.arange(len(positions))])
    error = np.linalg.norm(geometry.voxel_to_world(index) - positions * np.array([-1.0, -1.0, 1.0]), axis=1)
    worst = int(np.argmax(error))
    if error[worst] > TILT_POSITION_TOL_MM:
        raise DicomSeriesError(
            f"{folder}: after resampling the gantry tilt, the ImagePositionPatient of slice {worst} ({files[worst].name}) "
            f"is {error[worst]:.3g} mm from its place on the corrected grid (tolerance {TILT_POSITION_TOL_MM} mm): the slices are not evenly "
            "spaced along the slice normal. Convert the series with dcm2niix and check it."
        )
    return corrected[np.newaxis], geometry
