"""DICOM outputs for DICOM inputs: a Segmentation object (DICOM-SEG) and an RT Structure Set.

``medseg infer SERIES_DIR --format dicom-seg,rtstruct`` writes, next to the
NIfTI mask, ``<case>_seg.dcm`` and ``<case>_rtstruct.dcm``. Both reference the
source series (study, series and every slice by UID, and its Frame of
Reference), name each structure after the model's label and colour it with
:func:`structure_colour`.

* **DICOM-SEG** is written with highdicom: ``binary`` (default: one 1-bit frame
  per structure and slice, read by every SEG reader) or ``labelmap`` (one 8/16-bit
  frame per slice, pixel value = segment number; DICOM 2024 Supplement 243, read
  by recent readers only). Segment ``n`` is the ``n``-th non-zero label value in
  ascending order.
* **RTSTRUCT** is written with pydicom: per structure and slice, closed planar
  contours from ``skimage.measure.find_contours`` at level 0.5 (every contour
  passes between foreground and background pixel centres; holes are separate
  contours, read with the even-odd rule), in patient coordinates from the
  scan's affine.

**Verified before the rename.** Each object is written to a temporary file,
read back with pydicom and compared with the mask before it is renamed into
place (:mod:`medseg.io.atomic`); a mismatch removes it and raises
:class:`~medseg.errors.OutputWriteError`. The checks:

1. references: study, series, Frame of Reference and every slice's SOP Instance
   UID are the source series'; structure names and colours are the labels';
2. voxels: the SEG's frames placed by their own Image Position (Patient), or the
   RTSTRUCT's contours rasterised (``skimage.draw.polygon``: a pixel is inside
   when its centre is, even-odd rule) on the referenced slice, equal the mask
   voxel for voxel (no tolerance: no pixel centre lies on a contour);
3. orientation: each structure's centroid in patient coordinates, computed from
   the read-back pixels with the DICOM geometry (IPP + IOP x PixelSpacing), lies
   within :data:`CENTROID_TOL_MM` of its centroid from the mask and the scan's
   affine (a mirrored or rotated object fails this).

**Patient data.** Only what the standard requires of a derived object in the
source's study is copied from the source: the Patient module's type 2
attributes (name, ID, birth date, sex) and the General Study module's
(Study Instance UID, date, time, referring physician, Study ID, accession
number), plus the character set. Nothing else (no private tags, no institution,
no input path) reaches the writers: they see :data:`SOURCE_KEYWORDS` only.
``--anonymize`` is refused with these formats (a DICOM object must carry its
patient's identifiers): de-identify the series first.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import ConfigError, DicomSeriesError, GeometryError, OutputWriteError
from medseg.io.atomic import atomic_path
from medseg.io.geometry import Geometry

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from medseg.inference.segmenter import Prediction
    from medseg.io.volume import Volume

__all__ = [
    "CENTROID_TOL_MM",
    "DEFAULT_SEG_TYPE",
    "DICOM_OUTPUT_KINDS",
    "FORMATS",
    "PALETTE",
    "SEG_TYPES",
    "SOURCE_KEYWORDS",
    "SourceSeries",
    "check_output_formats",
    "fill_even_odd",
    "load_source_series",
    "output_size_bound",
    "parse_formats",
    "read_dicom_seg",
    "read_rtstruct",
    "structure_colour",
    "write_dicom_outputs",
    "write_dicom_seg",
    "write_rtstruct",
]

#: Output formats of ``medseg infer --format`` (comma-separated; the NIfTI mask is always written).
FORMATS = ("nifti", "dicom-seg", "rtstruct")
#: DICOM format -> output kind (key of ``OutputSpec.paths``, :mod:`medseg.inference.outputs`; files ``<case>_seg.dcm``, ``<case>_rtstruct.dcm``).
DICOM_OUTPUT_KINDS = {"dicom-seg": "dicom_seg", "rtstruct": "rtstruct"}
SEG_TYPES = ("binary", "labelmap")
#: BINARY: read by every DICOM-SEG reader; LABELMAP (Supplement 243, 2024) only by recent ones.
DEFAULT_SEG_TYPE = "binary"

#: matplotlib's tab20 colours; :func:`structure_colour` picks a label's (as the preview PNG does).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
    (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
    (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (127, 127, 127),
    (199, 199, 199), (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
)

#: The only source attributes the writers see: the type 1/2 Patient and General Study attributes the
#: standard requires in a derived object of the same study, the character set, and the references and
#: geometry of each slice.
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
SOURCE_KEYWORDS = (
    "SpecificCharacterSet", *PATIENT_STUDY_KEYWORDS,
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation",
)
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")

#: Largest distance between a structure's centroid from the read-back object (DICOM geometry) and from
#: the mask (the scan's affine). Both use the same voxels, so only a geometry error moves it.
CENTROID_TOL_MM = 0.05
#: A slice's Image Position (Patient) must lie on the scan's grid within this (the reader's tolerance).
POSITION_TOL_MM = 1e-2
SEG_SERIES_NUMBER = 9901
RTSTRUCT_SERIES_NUMBER = 9902
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_DETACHED_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
_SEG_SOP_CLASSES = {"binary": "1.2.840.10008.5.1.4.1.1.66.4", "labelmap": "1.2.840.10008.5.1.4.1.1.66.7"}
_LO_MAX = 64  # characters of a LO value (segment label, ROI name)


# --------------------------------------------------------------------------- options


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"nifti,dicom-seg"`` (or a sequence) -> ``("nifti", "dicom-seg")``; NIfTI is always included.

    Raises:
        ConfigError: an unknown format.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [item.strip().lower() for item in items if item.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown output format {unknown[0]!r}; choose from {', '.join(FORMATS)} (comma-separated).")
    return tuple(f for f in FORMATS if f == "nifti" or f in names)


def structure_colour(value: int) -> tuple[int, int, int]:
    """RGB colour of label value ``value``: tab20's ten strong hues for 1-10, their light pairs for 11-20, again from 21.

    Labels 1-10 get ten distinct hues (tab10), so the few structures of most
    models never share a hue family; the preview PNG uses the same colours.
    """
    step = (int(value) - 1) % 20
    return PALETTE[2 * (step % 10) + step // 10]


def check_output_formats(cases: Sequence[tuple[Path, str]], formats: Sequence[str], *, anonymize: bool = False) -> None:
    """Refuse DICOM output formats for inputs that are not DICOM series folders, or with ``anonymize``.

    Run before any model is loaded. (A folder case is a DICOM series folder; its headers are checked
    when the objects are written.)

    Raises:
        ConfigError: which input, why, and how to fix it.
    """
    wanted = [f for f in formats if f in DICOM_OUTPUT_KINDS]
    if not wanted:
        return
    if anonymize:
        raise ConfigError(
            f"--format {','.join(wanted)} cannot be combined with --anonymize: a DICOM object must carry the "
            "patient and study identifiers of its source series. De-identify the series first, or drop --anonymize."
        )
    for path, _name in cases:
        if not Path(path).is_dir():
            raise ConfigError(
                f"--format {','.join(wanted)} needs a DICOM series folder as input, but {path} is a file; "
                "the DICOM objects must reference the source slices. Pass the series folder, or use --format nifti."
            )


def output_size_bound(kind: str, shape: Sequence[int], num_structures: int) -> int:
    """Bytes a DICOM output of a scan of ``shape`` may take (for the free-space check).

    SEG: one byte per voxel (labelmap; binary: a bit per voxel and structure), plus headers.
    RTSTRUCT: an estimate, a quarter byte per voxel plus headers (contours follow structure surfaces).
    """
    voxels = int(np.prod(shape))
    headers = (1 << 20) + 4096 * int(shape[-1] if len(shape) == 3 else 1)
    if kind == "dicom_seg":
        return headers + max(voxels, voxels * num_structures // 8)
    return headers + voxels // 4


# --------------------------------------------------------------------------- the source series


@dataclass(frozen=True, eq=False)
class SourceSeries:
    """The source slices of a DICOM series, in the scan's slice order (index k of the mask).

    Attributes:
        slices: per slice k, a dataset holding only :data:`SOURCE_KEYWORDS` of that slice's header.
        positions: ``(K, 3)`` Image Position (Patient) of each slice, LPS mm.
        row, col: unit direction cosines (IOP) of increasing column and row index, LPS.
        spacing: PixelSpacing ``(between rows, between columns)`` in mm.
        folder_name: the folder's name, for messages.
    """

    slices: list[Dataset]
    positions: np.ndarray
    row: np.ndarray
    col: np.ndarray
    spacing: tuple[float, float]
    folder_name: str

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row, self.col)
        return n / np.linalg.norm(n)

    def pixel_to_lps(self, k: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Patient (LPS, mm) position of pixel ``(row, col)`` of slice ``k`` by the DICOM rule."""
        rows, cols = np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
        return (
            self.positions[k]
            + np.multiply.outer(cols * self.spacing[1], self.row)
            + np.multiply.outer(rows * self.spacing[0], self.col)
        )


def _lps(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """LPS mm of voxel indices ``(..., 3)`` under a RAS affine."""
    ras = np.asarray(index, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def _mask3d(mask: np.ndarray) -> np.ndarray:
    """A 2D mask (one slice) as ``(i, j, 1)``."""
    return mask[..., np.newaxis] if mask.ndim == 2 else mask


def load_source_series(volume: Volume, *, series_uid: str | None = None) -> SourceSeries:
    """The source slices of a scan read from a DICOM folder, matched to the scan's slice indices.

    Each slice's Image Position (Patient) must lie on the scan's grid at an integer slice index, and the
    grid's in-plane axes must be the slices' IOP x PixelSpacing (columns along axis 0, rows along axis 1).

    Raises:
        ConfigError: the scan was not read from a DICOM folder, or was resampled (gantry tilt).
        DicomSeriesError: slices lack the UIDs a reference needs.
        GeometryError: the slices do not lie on the scan's grid.
    """
    import pydicom
    from pydicom.dataset import Dataset

    from medseg.io.readers import list_dicom_series

    folder = volume.path
    if folder is None or volume.meta.get("format") != "dicom" or not Path(folder).is_dir():
        where = str(folder) if folder is not None else "an in-memory scan"
        raise ConfigError(
            f"DICOM-SEG/RTSTRUCT outputs need a scan read from a DICOM series folder; {where} is not one. "
            "Segment the DICOM folder, or write NIfTI only."
        )
    if "tilt_resampled_deg" in volume.meta:
        raise ConfigError(
            f"{folder}: the series was resampled to remove gantry tilt (--resample-tilt), so the mask is not on "
            "its slices; DICOM-SEG/RTSTRUCT must lie on the source slices. Write NIfTI only for tilted series."
        )
    uid = series_uid if series_uid is not None else volume.meta.get("series_uid")
    found = list_dicom_series(folder)
    chosen = [s for s in found if uid is None or s.uid == uid]
    if len(chosen) != 1:
        raise DicomSeriesError(f"{folder}: cannot tell which series the mask belongs to; pass --series-uid.")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in chosen[0].files]
    for keyword in _REQUIRED_UIDS:
        missing = [f.name for f, ds in zip(chosen[0].files, headers) if not str(ds.get(keyword, "") or "").strip()]
        if missing:
            raise DicomSeriesError(
                f"{folder}: slice {missing[0]} (and {len(missing) - 1} more) has no {keyword}; a DICOM-SEG or "
                "RTSTRUCT must reference the study, series and each slice by UID. Use the series with its UIDs "
                "(de-identification tools that blank UIDs break references), or write NIfTI only."
            )
    first = headers[0]
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    spacing = (float(first.PixelSpacing[0]), float(first.PixelSpacing[1]))
    affine = np.asarray(volume.geometry.affine, dtype=np.float64)
    shape = volume.geometry.shape
    depth = shape[2] if len(shape) == 3 else 1
    # the grid's in-plane axes must be the slices': axis 0 along the rows' direction (columns), axis 1 along col
    axes = (affine[:3, :3] * np.array([[-1.0], [-1.0], [1.0]]))[:, :2]
    expected = np.column_stack([row * spacing[1], col * spacing[0]])
    if tuple(shape[:2]) != (int(first.Columns), int(first.Rows)) or np.max(np.abs(axes - expected)) > 1e-4:
        raise GeometryError(
            f"{folder}: the scan's grid {tuple(shape)} does not have the slices' in-plane axes (IOP "
            f"{np.round(iop, 6).tolist()}, PixelSpacing {list(spacing)}); DICOM outputs would be misplaced."
        )
    slices: list[Any] = [None] * depth
    positions = np.zeros((depth, 3))
    inverse = np.linalg.inv(affine)
    for file, ds in zip(chosen[0].files, headers):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        index = inverse[:3, :3] @ (ipp * np.array([-1.0, -1.0, 1.0])) + inverse[:3, 3]
        k = round(float(index[2]))
        placed = _lps(affine, np.array([0.0, 0.0, k]))
        if not 0 <= k < depth or slices[k] is not None or np.linalg.norm(placed - ipp) > POSITION_TOL_MM:
            raise GeometryError(
                f"{folder}: slice {file.name} (Image Position {np.round(ipp, 3).tolist()}) is not on the scan's "
                f"slice {k}; the series changed since it was read, or its headers are inconsistent."
            )
        minimal = Dataset()
        for keyword in SOURCE_KEYWORDS:
            if keyword in ds:
                minimal[keyword] = ds[keyword]
        slices[k], positions[k] = minimal, ipp
    if any(s is None for s in slices):
        raise GeometryError(f"{folder}: {slices.count(None)} slice(s) of the scan have no DICOM file.")
    return SourceSeries(slices=slices, positions=positions, row=row, col=col, spacing=spacing, folder_name=Path(folder).name)


# --------------------------------------------------------------------------- writing


def _structures(labels: dict[int, str]) -> list[tuple[int, str]]:
    """(label value, name) of every non-zero label, ascending; names cut to a DICOM LO value."""
    return [(int(v), str(n)[:_LO_MAX]) for v, n in sorted(labels.items()) if int(v) != 0]


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _build_seg(mask: np.ndarray, labels: dict[int, str], source: SourceSeries, seg_type: str) -> Dataset:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from medseg.version import __version__

    structures = _structures(labels)
    lut = np.zeros(int(max([0, *labels])) + 1, dtype=np.uint16 if len(structures) > 255 else np.uint8)
    for number, (value, _name) in enumerate(structures, start=1):
        lut[value] = number
    # frame k (rows, columns) = mask[:, :, k].T: array axis 0 runs along the columns (see load_source_series)
    frames = np.ascontiguousarray(np.transpose(lut[_mask3d(mask)], (2, 1, 0)))
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medseg", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*structure_colour(value)),
        )
        for number, (value, name) in enumerate(structures, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=source.slices,
        pixel_array=frames,
        segmentation_type=seg_type.upper(),
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name="medseg",
        software_versions=__version__,
        device_serial_number="0",
        content_label="MEDSEG",
        content_description="medseg automatic segmentation",
        series_description="medseg segmentation",
    )


def write_dicom_seg(
    mask: np.ndarray,
    geometry: Geometry,
    labels: dict[int, str],
    source: SourceSeries,
    path: str | os.PathLike,
    *,
    seg_type: str = DEFAULT_SEG_TYPE,
    overwrite: bool = False,
) -> Path:
    """Write ``mask`` (label values on the scan's grid) as a DICOM-SEG, verified before the rename.

    Raises:
        ConfigError: an unknown ``seg_type``.
        OutputWriteError: the read-back object differs from the mask (nothing is left behind).
    """
    if seg_type not in SEG_TYPES:
        raise ConfigError(f"unknown DICOM-SEG type {seg_type!r}; choose from {', '.join(SEG_TYPES)}.")
    dataset = _build_seg(mask, labels, source, seg_type)
    target = Path(path)
    with atomic_path(target, overwrite=overwrite) as temp:
        dataset.save_as(temp)
        read = read_dicom_seg(temp, source, geometry)
        _verify(target, "DICOM-SEG", read, mask, labels, source, geometry, seg_type=seg_type)
    return target


def _contours(binary: np.ndarray) -> list[np.ndarray]:
    """Closed contours (``(n, 2)`` array-index coordinates, not repeating the first point) of a 2D mask."""
    from skimage.measure import find_contours

    padded = np.pad(binary.astype(np.uint8), 1)
    out = []
    for contour in find_contours(padded, 0.5):
        contour = contour[:-1] if np.array_equal(contour[0], contour[-1]) else contour
        out.append(_drop_collinear(contour) - 1.0)
    return out


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """A closed polygon without the vertices that lie on the straight segment between their neighbours.

    The shape is unchanged (find_contours' vertices are exact half-pixel values, so the test is exact);
    straight runs of a pixel outline shrink to their end points.
    """
    before, after = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    keep = (cross != 0) | (np.sum(before * after, axis=1) <= 0)
    return points[keep] if np.count_nonzero(keep) >= 3 else points


def _contour_data(points: np.ndarray) -> Any:
    """ContourData (3006,0050) as encoded bytes: a DS value per coordinate, 10 significant digits.

    Built as raw bytes (pydicom validates each DS value it is given, ~10 us apiece: seconds for an
    organ set), in the Implicit VR Little Endian encoding the structure set is written with.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    data = "\\".join(f"{v:.10g}" for v in points.ravel().tolist()).encode("ascii")
    if len(data) % 2:
        data += b" "
    return RawDataElement(Tag(0x30060050), "DS", len(data), data, 0, True, True)


def _contour_points(item: Any) -> np.ndarray:
    """ContourData of a contour item as ``(n, 3)`` floats, decoded from the bytes when still raw."""
    value = item.get_item(0x30060050).value
    if isinstance(value, bytes):
        return np.array(value.strip(b" \0").split(b"\\"), dtype=np.float64).reshape(-1, 3)
    return np.array([float(v) for v in value], dtype=np.float64).reshape(-1, 3)


def _build_rtstruct(mask: np.ndarray, geometry: Geometry, labels: dict[int, str], source: SourceSeries) -> Dataset:
    from pydicom.charset import default_encoding
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, generate_uid
    from scipy import ndimage

    from medseg.version import __version__

    first = source.slices[0]
    date, time_ = _now()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian  # 4-byte lengths: a body outline exceeds 64 kB
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    for keyword in ("SpecificCharacterSet", *PATIENT_STUDY_KEYWORDS):
        if keyword in first:
            ds[keyword] = first[keyword]
        elif keyword != "SpecificCharacterSet":
            setattr(ds, keyword, "")  # type 2: present, empty
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time_
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription = "medseg structures"
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "medseg", "medseg", __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel, ds.StructureSetName = "MEDSEG", "medseg"
    ds.StructureSetDate, ds.StructureSetTime = date, time_

    def image_ref(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = source.slices[k].SOPClassUID
        item.ReferencedSOPInstanceUID = source.slices[k].SOPInstanceUID
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence([image_ref(k) for k in range(len(source.slices))])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _DETACHED_STUDY_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    volume = _mask3d(mask)
    affine = np.asarray(geometry.affine, dtype=np.float64)
    structures = _structures(labels)
    boxes = ndimage.find_objects(volume) if volume.any() else []
    rois, contours_seq, observations = [], [], []
    for value, name in structures:
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = value, first.FrameOfReferenceUID
        roi.ROIName, roi.ROIGenerationAlgorithm = name, "AUTOMATIC"
        rois.append(roi)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(structure_colour(value))
        roi_contour.ReferencedROINumber = value
        items = []
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is not None:
            i0, j0 = box[0].start, box[1].start
            for k in range(box[2].start, box[2].stop):
                binary = volume[box[0], box[1], k] == value
                for contour in _contours(binary):
                    index = np.column_stack([contour[:, 0] + i0, contour[:, 1] + j0, np.full(len(contour), k)])
                    item = Dataset()
                    item.ContourImageSequence = DicomSequence([image_ref(k)])
                    item.ContourGeometricType = "CLOSED_PLANAR"
                    item.NumberOfContourPoints = len(contour)
                    item[0x30060050] = _contour_data(_lps(affine, index))
                    # pydicom writes raw bytes as they are when the item's encoding is the file's (a new
                    # item's character set is pydicom's default; ContourData is ASCII in any character set)
                    item.set_original_encoding(True, True, default_encoding)
                    items.append(item)
        if items:
            roi_contour.ContourSequence = DicomSequence(items)
        contours_seq.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = value, value
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours_seq)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def write_rtstruct(
    mask: np.ndarray,
    geometry: Geometry,
    labels: dict[int, str],
    source: SourceSeries,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``mask`` as an RT Structure Set (closed planar contours), verified before the rename.

    Raises:
        OutputWriteError: the rasterised read-back contours differ from the mask (nothing is left behind).
    """
    dataset = _build_rtstruct(mask, geometry, labels, source)
    target = Path(path)
    with atomic_path(target, overwrite=overwrite) as temp:
        dataset.save_as(temp, enforce_file_format=True)
        read = read_rtstruct(temp, source, geometry)
        _verify(target, "RTSTRUCT", read, mask, labels, source, geometry)
    return target


# --------------------------------------------------------------------------- reading back


@dataclass
class _ReadBack:
    """What a written object says, decoded independently of how it was built."""

    volume: np.ndarray  # label values on the scan's grid (i, j, k)
    names: dict[int, str]  # label value -> structure name
    colours: dict[int, tuple[int, int, int]]
    study_uid: str
    frame_of_reference_uid: str
    series_uids: set[str]
    instance_uids: set[str]
    centroids_lps: dict[int, np.ndarray]  # from the object's own pixel positions (DICOM geometry)


def _slice_of(source: SourceSeries, uid: str, what: str, path: Path) -> int:
    for k, s in enumerate(source.slices):
        if s.SOPInstanceUID == uid:
            return k
    raise OutputWriteError(f"{path.name}: {what} references SOP Instance UID {uid}, which is not a slice of the series.")


def _centroid_add(acc: dict[int, list], value: int, source: SourceSeries, k: int, plane: np.ndarray) -> None:
    """Add the pixels of ``plane`` (rows, columns; True inside) of slice ``k`` to a running LPS centroid.

    The DICOM pixel position ``IPP + row * column_index * dc + col * row_index * dr`` is linear in
    the indices, so sums of indices suffice.
    """
    rows, cols = np.nonzero(plane)
    total = acc.setdefault(value, [np.zeros(3), 0])
    total[0] += source.pixel_to_lps(k, rows.sum(), cols.sum()) + (len(rows) - 1) * source.positions[k]
    total[1] += len(rows)


def read_dicom_seg(path: str | os.PathLike, source: SourceSeries, geometry: Geometry) -> _ReadBack:
    """Decode a DICOM-SEG with pydicom onto the scan's grid; each frame placed by its own plane position."""
    import pydicom

    path = Path(path)
    ds = pydicom.dcmread(path)
    shape = _mask3d(np.zeros(geometry.shape, dtype=np.uint8)).shape
    from highdicom.color import CIELabColor

    # keyed by segment number here; _verify maps segment n to the n-th structure's label value
    names, colours = {}, {}
    for seg in ds.SegmentSequence:
        number = int(seg.SegmentNumber)
        if number == 0:
            continue  # LABELMAP's background segment (pixel value 0), added by highdicom
        names[number] = str(seg.SegmentLabel)
        lab = [int(v) for v in seg.RecommendedDisplayCIELabValue]
        colours[number] = tuple(int(c) for c in CIELabColor.from_dicom_value(lab).to_rgb())
    pixels = ds.pixel_array
    pixels = pixels.reshape(-1, int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    source_iop = np.concatenate([source.row, source.col])
    if np.max(np.abs(iop - source_iop)) > 1e-5 or np.max(np.abs(np.subtract(spacing, source.spacing))) > 1e-6:
        raise OutputWriteError(f"{path.name}: the object's IOP {iop.tolist()} / PixelSpacing {spacing} are not the series'.")
    labelmap = str(ds.SegmentationType) == "LABELMAP"
    volume = np.zeros(shape, dtype=np.int64)
    acc: dict[int, list] = {}
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        ipp = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        distances = np.linalg.norm(source.positions - ipp, axis=1)
        k = int(np.argmin(distances))
        if distances[k] > POSITION_TOL_MM or _slice_of(source, uid, f"frame {f + 1}", path) != k:
            raise OutputWriteError(
                f"{path.name}: frame {f + 1} at {ipp.tolist()} does not lie on the slice it references ({uid})."
            )
        plane = pixels[f].astype(np.int64)
        if not labelmap:  # the segment is per frame, or shared when there is only one
            identification = frame.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
            plane = plane * int(identification[0].ReferencedSegmentNumber)
        written = plane != 0
        if np.any(volume[:, :, k].T[written] != 0):
            raise OutputWriteError(f"{path.name}: two frames set the same voxel of slice {k}.")
        volume[:, :, k] += plane.T
        for number in np.unique(plane[written]):
            _centroid_add(acc, int(number), source, k, plane == number)
    centroids = {n: total / count for n, (total, count) in acc.items()}
    refs = ds.ReferencedSeriesSequence
    return _ReadBack(
        volume=volume,
        names=names,
        colours=colours,
        study_uid=str(ds.StudyInstanceUID),
        frame_of_reference_uid=str(ds.FrameOfReferenceUID),
        series_uids={str(r.SeriesInstanceUID) for r in refs},
        instance_uids={str(i.ReferencedSOPInstanceUID) for r in refs for i in r.ReferencedInstanceSequence},
        centroids_lps=centroids,
    )


def fill_even_odd(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels of ``shape`` whose centres lie inside closed polygons (``(n, 2)`` row/column vertices).

    Even-odd rule over all polygons (a hole's contour removes its pixels). A scan line through each
    row of pixel centres counts edge crossings left of each centre (half-open in the row direction);
    linear in edges and pixels, unlike a point-in-polygon test per pixel.
    """
    rows_n, cols_n = shape
    counts = np.zeros((rows_n, cols_n + 1), dtype=np.int32)
    for poly in polygons:
        y0, x0 = poly[:, 0], poly[:, 1]
        y1, x1 = np.roll(y0, -1), np.roll(x0, -1)
        first = np.ceil(np.minimum(y0, y1)).astype(np.int64)  # rows r with min(y) <= r < max(y)
        n = np.ceil(np.maximum(y0, y1)).astype(np.int64) - first
        edges = np.repeat(np.arange(len(y0)), np.maximum(n, 0))
        if not edges.size:
            continue
        starts = np.cumsum(np.maximum(n, 0)) - np.maximum(n, 0)
        r = first[edges] + np.arange(edges.size) - starts[edges]
        x = x0[edges] + (r - y0[edges]) * (x1[edges] - x0[edges]) / (y1[edges] - y0[edges])
        inside = (r >= 0) & (r < rows_n)
        np.add.at(counts, (r[inside], np.clip(np.ceil(x[inside]), 0, cols_n).astype(np.int64)), 1)
    return (np.cumsum(counts, axis=1)[:, :cols_n] % 2).astype(bool)


def read_rtstruct(path: str | os.PathLike, source: SourceSeries, geometry: Geometry) -> _ReadBack:
    """Rasterise an RT Structure Set's contours onto the scan's grid (pixel centres inside, even-odd rule)."""
    import pydicom

    path = Path(path)
    ds = pydicom.dcmread(path)
    shape = _mask3d(np.zeros(geometry.shape, dtype=np.uint8)).shape
    rows_n, cols_n = shape[1], shape[0]
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    frames_of_reference = {str(r.ReferencedFrameOfReferenceUID) for r in ds.StructureSetROISequence}
    colours, acc = {}, {}
    volume = np.zeros(shape, dtype=np.int64)
    for roi in ds.ROIContourSequence:
        value = int(roi.ReferencedROINumber)
        colours[value] = tuple(int(c) for c in roi.ROIDisplayColor)
        polygons: dict[int, list[np.ndarray]] = {}
        for c, contour in enumerate(roi.get("ContourSequence", [])):
            uid = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            k = _slice_of(source, uid, f"contour {c + 1} of ROI {value}", path)
            points = _contour_points(contour) - source.positions[k]
            if len(points) != int(contour.NumberOfContourPoints) or np.max(np.abs(points @ source.normal)) > POSITION_TOL_MM:
                raise OutputWriteError(f"{path.name}: contour {c + 1} of ROI {value} does not lie on slice {k}.")
            pixels = np.column_stack([points @ source.col / source.spacing[0], points @ source.row / source.spacing[1]])
            polygons.setdefault(k, []).append(pixels)
        for k, outlines in polygons.items():
            inside = fill_even_odd(outlines, (rows_n, cols_n))
            if np.any(volume[:, :, k].T[inside] != 0):
                raise OutputWriteError(f"{path.name}: ROI {value} overlaps another ROI on slice {k}.")
            volume[:, :, k][inside.T] = value
            _centroid_add(acc, value, source, k, inside)
    refs = [
        (series, study)
        for frame in ds.ReferencedFrameOfReferenceSequence
        for study in frame.RTReferencedStudySequence
        for series in study.RTReferencedSeriesSequence
    ]
    studies = {str(study.ReferencedSOPInstanceUID) for _, study in refs}
    if len(frames_of_reference) > 1 or len(studies) != 1 or str(ds.StudyInstanceUID) not in studies:
        raise OutputWriteError(f"{path.name}: the structure set references several studies or frames of reference.")
    return _ReadBack(
        volume=volume,
        names=names,
        colours=colours,
        study_uid=str(ds.StudyInstanceUID),
        frame_of_reference_uid=str(ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID),
        series_uids={str(series.SeriesInstanceUID) for series, _ in refs},
        instance_uids={str(i.ReferencedSOPInstanceUID) for series, _ in refs for i in series.ContourImageSequence},
        centroids_lps={v: total / count for v, (total, count) in acc.items()},
    )


def _mean_indices(volume: np.ndarray, values: Sequence[int]) -> dict[int, np.ndarray]:
    """Mean voxel index ``(i, j, k)`` of each value present in ``volume``, one slice at a time (little memory)."""
    ii, jj = (a.ravel() for a in np.indices(volume.shape[:2], dtype=np.float64))
    size = int(max(values, default=0)) + 1
    sums = np.zeros((size, 4))
    for k in range(volume.shape[2]):
        plane = volume[:, :, k].ravel()
        if plane.min() < 0 or plane.max() >= size:
            plane = np.where((plane >= 0) & (plane < size), plane, 0)
        counts = np.bincount(plane, minlength=size)
        sums += np.column_stack([
            np.bincount(plane, ii, size), np.bincount(plane, jj, size), counts * float(k), counts
        ])
    return {v: sums[v, :3] / sums[v, 3] for v in values if sums[v, 3] > 0}


def _verify(
    target: Path,
    kind: str,
    read: _ReadBack,
    mask: np.ndarray,
    labels: dict[int, str],
    source: SourceSeries,
    geometry: Geometry,
    *,
    seg_type: str | None = None,
) -> None:
    """Refuse a written object whose references, names, colours, voxels or placement differ from the mask."""
    structures = _structures(labels)
    first = source.slices[0]

    def fail(what: str) -> None:
        raise OutputWriteError(
            f"{target.name}: the {kind} read back from the temporary file differs from the mask ({what}); "
            "nothing was written. This is a medseg bug: please report it with the series' geometry."
        )

    if seg_type is not None:  # SEG: segment n is the n-th structure; map numbers back to label values
        number_to_value = {n: v for n, (v, _name) in enumerate(structures, start=1)}
        if set(read.names) != set(number_to_value):
            fail(f"segments {sorted(read.names)} for {len(structures)} structures")
        lut = np.zeros(max(number_to_value, default=0) + 1, dtype=np.int64)
        for n, v in number_to_value.items():
            lut[n] = v
        read.volume = lut[read.volume]
        read.names = {number_to_value[n]: name for n, name in read.names.items()}
        read.colours = {number_to_value[n]: c for n, c in read.colours.items()}
        read.centroids_lps = {number_to_value[n]: c for n, c in read.centroids_lps.items()}
    if read.study_uid != first.StudyInstanceUID or read.frame_of_reference_uid != first.FrameOfReferenceUID:
        fail("study or frame of reference UID")
    if read.series_uids != {str(first.SeriesInstanceUID)}:
        fail(f"referenced series {sorted(read.series_uids)}")
    if read.instance_uids != {str(s.SOPInstanceUID) for s in source.slices}:
        fail(f"{len(read.instance_uids)} referenced slices for {len(source.slices)}")
    if read.names != dict(structures):
        fail(f"structure names {read.names} for {dict(structures)}")
    for value, colour in read.colours.items():
        if max(abs(a - b) for a, b in zip(colour, structure_colour(value))) > 1:
            fail(f"colour {colour} of structure {value}")
    expected = _mask3d(mask).astype(np.int64)
    if read.volume.shape != expected.shape:
        fail(f"shape {read.volume.shape} for {expected.shape}")
    wrong = int(np.count_nonzero(read.volume != expected))
    if wrong:
        fail(f"{wrong} voxels differ")
    affine = np.asarray(geometry.affine, dtype=np.float64)
    for value, index in _mean_indices(expected, [v for v, _name in structures]).items():
        from_mask = _lps(affine, index)  # the affine is linear: the centroid of the positions
        from_object = read.centroids_lps.get(value)
        if from_object is None or not np.linalg.norm(from_object - from_mask) <= CENTROID_TOL_MM:
            fail(
                f"structure {value} centred at {np.round(from_object, 2).tolist() if from_object is not None else None} "
                f"mm (LPS) in the object but at {np.round(from_mask, 2).tolist()} mm in the mask: mirrored or rotated"
            )


# --------------------------------------------------------------------------- the hook for OutputSpec.write


def write_dicom_outputs(
    prediction: Prediction,
    paths: dict[str, Path],
    *,
    volume: Volume | None = None,
    seg_type: str | None = None,
    overwrite: bool = False,
    anonymize: bool = False,
) -> dict[str, Path]:
    """Write the DICOM outputs named in ``paths`` (kinds ``dicom_seg``, ``rtstruct``) for a prediction.

    ``volume`` is the scan as read (its folder, series and whether it was resampled);
    ``seg_type``: ``binary`` or ``labelmap`` (None: :data:`DEFAULT_SEG_TYPE`).

    Raises:
        ConfigError: the scan was not read from a DICOM folder, or ``anonymize``.
        DicomSeriesError, GeometryError: the source slices cannot be referenced.
        OutputWriteError: a read-back check failed (nothing of that object is left).
    """
    wanted = [kind for kind in DICOM_OUTPUT_KINDS.values() if kind in paths]
    if not wanted:
        return {}
    if anonymize:
        raise ConfigError(
            "DICOM-SEG/RTSTRUCT outputs cannot be anonymized: a DICOM object must carry the patient and study "
            "identifiers of its source series. De-identify the series first, or write NIfTI only."
        )
    if volume is None:
        raise ConfigError("DICOM outputs need the scan as read: pass volume= to OutputSpec.write().")
    source = load_source_series(volume)
    written = {}
    if "dicom_seg" in paths:
        written["dicom_seg"] = write_dicom_seg(
            prediction.mask, prediction.geometry, prediction.labels, source, paths["dicom_seg"],
            seg_type=seg_type or DEFAULT_SEG_TYPE, overwrite=overwrite,
        )
    if "rtstruct" in paths:
        written["rtstruct"] = write_rtstruct(
            prediction.mask, prediction.geometry, prediction.labels, source, paths["rtstruct"], overwrite=overwrite,
        )
    return written
