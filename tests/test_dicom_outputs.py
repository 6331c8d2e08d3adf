"""DICOM-SEG and RTSTRUCT outputs: read back by other readers, compared with the source slices, refusals.

The real series (../shared/data/ct_dicom_series) has its UIDs blanked by its de-identification; the tests
segment a copy with UIDs filled in (and with identifying attributes added, to prove they do not leak).
Masks follow rules on the source's own pixels (bone > 300 HU on the patient's left / right), so every
check can be made against the DICOM files themselves, independently of medseg's reader.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import require_shared_data, sha256
from inference_support import make_plan, save_model
from pydicom.uid import generate_uid
from skimage.draw import polygon

from medseg.cli import main
from medseg.errors import ConfigError, DicomSeriesError, OutputWriteError
from medseg.inference import dicom_outputs
from medseg.inference.dicom_outputs import (
    PALETTE,
    fill_even_odd,
    load_source_series,
    parse_formats,
    structure_colour,
    write_dicom_seg,
    write_rtstruct,
)
from medseg.io import read_volume
from medseg.io.geometry import Geometry

LABELS = {0: "background", 1: "bone_left", 2: "bone_right", 4: "soft_block", 7: "absent"}
IDENTIFYING = {"InstitutionName": "Spital Nowhere", "PatientAge": "061Y", "OtherPatientIDs": "XX-99"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """The real series with UIDs filled in, a patient name/ID, and identifying extras that must not leak."""
    source = require_shared_data("ct_dicom_series")
    folder = tmp_path_factory.mktemp("dicom") / "Doe_Jane_CT_series"
    folder.mkdir()
    study, series_uid = generate_uid(entropy_srcs=["medseg study"]), generate_uid(entropy_srcs=["medseg series"])
    for file in sorted(source.iterdir()):
        ds = pydicom.dcmread(file)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.PatientName, ds.PatientID = "Doe^Jane", "P-12345"
        for keyword, value in IDENTIFYING.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / file.name)
    return folder


@pytest.fixture(scope="module")
def sources(series) -> list[pydicom.Dataset]:
    """The source files, decoded by pydicom (with pixels), in slice order."""
    found = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    return sorted(found, key=lambda ds: float(ds.ImagePositionPatient[2]))


def dicom_lps_x(ds: pydicom.Dataset) -> np.ndarray:
    """Patient x (LPS: + is the patient's left) of every pixel of a slice, by the DICOM rule."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    r, c = np.indices((int(ds.Rows), int(ds.Columns)))
    return ipp[0] + iop[0] * c * dc + iop[3] * r * dr


def expected_frame(ds: pydicom.Dataset) -> np.ndarray:
    """The label values (rows, columns) of a slice by the rules, computed from the DICOM file alone."""
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    left = dicom_lps_x(ds) > 0
    frame = np.zeros(hu.shape, dtype=np.uint8)
    frame[(hu > 300) & left] = 1
    frame[(hu > 300) & ~left] = 2
    return frame


@pytest.fixture(scope="module")
def case(series):
    """medseg's scan, the rule mask on its grid, and the source series."""
    volume = read_volume(series)
    hu = volume.array[0]
    i, j, k = np.indices(hu.shape)
    lps_x = -(volume.geometry.voxel_to_world(np.stack([i, j, k], axis=-1))[..., 0])
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[(hu > 300) & (lps_x > 0)] = 1
    mask[(hu > 300) & (lps_x <= 0)] = 2
    mask[300:340, 350:380, 4:9] = 4  # a block in one corner of the slices (replaces what was there)
    return volume, mask, load_source_series(volume)


def frames_by_source(path: Path, sources: list[pydicom.Dataset]) -> np.ndarray:
    """A SEG's label values per source slice (K, rows, columns), decoded by highdicom."""
    seg = hd.seg.segread(path)
    values = [v for v in sorted(LABELS) if v != 0]
    pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True, assert_missing_frames_are_empty=True)
    lut = np.array([0, *values])
    return lut[pixels]


def rasterised_with_skimage(path: Path, sources: list[pydicom.Dataset]) -> np.ndarray:
    """An RTSTRUCT's structures per source slice (K, rows, columns): skimage.draw.polygon, even-odd."""
    ds = pydicom.dcmread(path)
    by_uid = {s.SOPInstanceUID: k for k, s in enumerate(sources)}
    out = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), dtype=np.uint8)
    for roi in ds.ROIContourSequence:
        inside = np.zeros(out.shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            k = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            src = sources[k]
            iop = np.array([float(v) for v in src.ImageOrientationPatient])
            dr, dc = (float(v) for v in src.PixelSpacing)
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            points -= np.array([float(v) for v in src.ImagePositionPatient])
            rr, cc = polygon(points @ iop[3:] / dr, points @ iop[:3] / dc, out.shape[1:])
            inside[k, rr, cc] ^= True
        out[inside] = int(roi.ReferencedROINumber)
    return out


# --------------------------------------------------------------------------- DICOM-SEG


@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
def test_dicom_seg_read_by_highdicom_matches_each_source_slice(case, sources, tmp_path, seg_type):
    volume, mask, source = case
    path = write_dicom_seg(mask, volume.geometry, LABELS, source, tmp_path / "ct_seg.dcm", seg_type=seg_type)
    frames = frames_by_source(path, sources)
    # each frame against the rule applied to the source file's own pixels (no medseg geometry involved)
    for k, src in enumerate(sources):
        expected = expected_frame(src)
        block = np.zeros_like(expected, dtype=bool)
        block[350:380, 300:340] = k in range(4, 9)  # (rows j, columns i) of the block
        expected[block] = 4
        np.testing.assert_array_equal(frames[k], expected, err_msg=f"slice {k}")
    seg = hd.seg.segread(path)
    sop_classes = {"binary": "1.2.840.10008.5.1.4.1.1.66.4", "labelmap": "1.2.840.10008.5.1.4.1.1.66.7"}
    assert seg.SOPClassUID == sop_classes[seg_type]
    assert str(seg.SegmentationType) == seg_type.upper()


def test_dicom_seg_references_the_source_series_with_label_names_and_colours(case, sources, tmp_path):
    volume, mask, source = case
    ds = pydicom.dcmread(write_dicom_seg(mask, volume.geometry, LABELS, source, tmp_path / "s.dcm"))
    first = sources[0]
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    (ref,) = ds.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} == {s.SOPInstanceUID for s in sources}
    segments = [(int(s.SegmentNumber), s.SegmentLabel) for s in ds.SegmentSequence]
    assert segments == [(1, "bone_left"), (2, "bone_right"), (3, "soft_block"), (4, "absent")]
    for segment, value in zip(ds.SegmentSequence, (1, 2, 4, 7)):
        rgb = hd.color.CIELabColor.from_dicom_value([int(v) for v in segment.RecommendedDisplayCIELabValue]).to_rgb()
        assert np.max(np.abs(np.subtract(rgb, structure_colour(value)))) <= 1


def test_palette_is_matplotlib_tab20_as_in_the_preview():
    from matplotlib import colormaps

    tab20 = colormaps["tab20"]
    assert [tuple(round(255 * c) for c in tab20(i)[:3]) for i in range(20)] == list(PALETTE)
    assert [structure_colour(v) for v in range(1, 11)] == list(PALETTE[0::2])  # ten distinct hues first
    assert [structure_colour(v) for v in range(11, 21)] == list(PALETTE[1::2])
    assert structure_colour(21) == structure_colour(1)


# --------------------------------------------------------------------------- RTSTRUCT


def test_rtstruct_contours_rasterised_by_skimage_match_each_source_slice(case, sources, tmp_path):
    volume, mask, source = case
    path = write_rtstruct(mask, volume.geometry, LABELS, source, tmp_path / "ct_rtstruct.dcm")
    raster = rasterised_with_skimage(path, sources)
    for k, src in enumerate(sources):
        expected = expected_frame(src)
        expected[350:380, 300:340] = 4 if k in range(4, 9) else expected[350:380, 300:340]
        np.testing.assert_array_equal(raster[k], expected, err_msg=f"slice {k}")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert [(int(r.ROINumber), r.ROIName) for r in ds.StructureSetROISequence] == [
        (1, "bone_left"), (2, "bone_right"), (4, "soft_block"), (7, "absent")
    ]
    assert [tuple(int(c) for c in r.ROIDisplayColor) for r in ds.ROIContourSequence] == [
        structure_colour(v) for v in (1, 2, 4, 7)
    ]
    assert "ContourSequence" not in ds.ROIContourSequence[3]  # the empty structure has no contours
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == sources[0].StudyInstanceUID
    (ref,) = study.RTReferencedSeriesSequence
    assert ref.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in ref.ContourImageSequence] == [s.SOPInstanceUID for s in sources]


def test_even_odd_fill_equals_skimage_polygon_on_contours_with_holes(rng):
    from scipy import ndimage

    binary = ndimage.binary_opening(rng.random((60, 50)) > 0.45)
    binary[20:40, 10:30] = True
    binary[25:35, 15:25] = False  # a hole
    contours = dicom_outputs._contours(binary)
    reference = np.zeros(binary.shape, dtype=bool)
    for c in contours:
        rr, cc = polygon(c[:, 0], c[:, 1], binary.shape)
        reference[rr, cc] ^= True
    np.testing.assert_array_equal(fill_even_odd(contours, binary.shape), reference)
    np.testing.assert_array_equal(reference, binary)  # the pixel-centre rule: exact


# --------------------------------------------------------------------------- verification must refuse


@pytest.mark.parametrize("writer", ["seg", "rtstruct"])
def test_a_mirrored_object_is_refused_and_nothing_is_left(case, tmp_path, monkeypatch, writer):
    volume, mask, source = case
    builder = "_build_seg" if writer == "seg" else "_build_rtstruct"
    original = getattr(dicom_outputs, builder)
    monkeypatch.setattr(dicom_outputs, builder, lambda m, *a, **k: original(m[::-1], *a, **k))  # a bug: L-R flip
    write = write_dicom_seg if writer == "seg" else write_rtstruct
    with pytest.raises(OutputWriteError, match=r"differs from the mask \(\d+ voxels differ\); nothing was written"):
        write(mask, volume.geometry, LABELS, source, tmp_path / "out.dcm")
    assert list(tmp_path.iterdir()) == []


def test_a_grid_mirrored_against_the_headers_is_refused_by_the_centroid_check(case, tmp_path):
    """The mask array is right but the geometry written with it is mirrored (TotalSegmentator's old bug)."""
    volume, mask, source = case
    affine = volume.geometry.affine.copy()
    affine[:3, 3] += affine[:3, 0] * (mask.shape[0] - 1)
    affine[:3, 0] *= -1
    mirrored = Geometry(shape=volume.geometry.shape, affine=affine)
    with pytest.raises(OutputWriteError, match="mirrored or rotated"):
        write_dicom_seg(mask, mirrored, LABELS, source, tmp_path / "out.dcm")
    with pytest.raises(OutputWriteError, match="differs from the mask"):
        write_rtstruct(mask, mirrored, LABELS, source, tmp_path / "out.dcm")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- patient data


@pytest.mark.parametrize("writer", ["seg", "rtstruct"])
def test_only_the_required_patient_and_study_attributes_are_copied(case, sources, series, tmp_path, writer):
    volume, mask, source = case
    write = write_dicom_seg if writer == "seg" else write_rtstruct
    path = write(mask, volume.geometry, LABELS, source, tmp_path / "out.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PatientName == "Doe^Jane" and ds.PatientID == "P-12345"  # type 2: copied from the source
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    for keyword in (*IDENTIFYING, "StationName", "InstitutionAddress", "DeviceSerialNumber", "ProtocolName"):
        assert keyword not in ds or ds[keyword].value != sources[0].get(keyword), keyword
    assert not any(elem.tag.is_private for elem in ds.iterall())
    raw = path.read_bytes()
    for text in (series.name, str(series), "Spital", "XX-99", "SIEMENS"):
        assert text.encode() not in raw, text


# --------------------------------------------------------------------------- pydicom's single-slice test file


def test_pydicom_ct_small_single_slice(tmp_path):
    from pydicom.data import get_testdata_file

    folder = tmp_path / "ct_small"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "slice.dcm")
    source_ds = pydicom.dcmread(folder / "slice.dcm")
    volume = read_volume(folder)
    assert volume.geometry.spatial_dims == 2
    mask = np.zeros(volume.geometry.shape, dtype=np.uint8)
    mask[10:50, 70:120] = 1  # (i = column, j = row): columns 10-49, rows 70-119
    labels = {0: "background", 1: "lesion"}
    source = load_source_series(volume)
    seg_path = write_dicom_seg(mask, volume.geometry, labels, source, tmp_path / "seg.dcm", seg_type="labelmap")
    rt_path = write_rtstruct(mask, volume.geometry, labels, source, tmp_path / "rt.dcm")
    frame = hd.seg.segread(seg_path).get_pixels_by_source_instance([source_ds.SOPInstanceUID], combine_segments=True, assert_missing_frames_are_empty=True)[0]
    expected = np.zeros((source_ds.Rows, source_ds.Columns), dtype=frame.dtype)
    expected[70:120, 10:50] = 1
    np.testing.assert_array_equal(frame, expected)
    np.testing.assert_array_equal(rasterised_with_skimage(rt_path, [source_ds])[0], expected)
    for path in (seg_path, rt_path):
        ds = pydicom.dcmread(path)
        assert ds.PatientName == source_ds.PatientName == "CompressedSamples^CT1"
        assert "PatientAge" not in ds and "InstitutionName" not in ds and "PatientWeight" not in ds


# --------------------------------------------------------------------------- refusals


def test_the_real_series_without_uids_is_refused_naming_the_attribute():
    volume = read_volume(require_shared_data("ct_dicom_series"))
    with pytest.raises(DicomSeriesError, match=r"has no SOPClassUID; a DICOM-SEG or RTSTRUCT must reference"):
        load_source_series(volume)


def test_in_memory_and_nifti_scans_are_refused(case):
    volume, _mask, _source = case
    from medseg.io.volume import Volume

    with pytest.raises(ConfigError, match="need a scan read from a DICOM series folder; an in-memory scan is not one"):
        load_source_series(Volume(array=volume.array, geometry=volume.geometry))


def test_parse_formats():
    assert parse_formats("dicom-seg") == ("nifti", "dicom-seg")
    assert parse_formats("rtstruct, nifti,dicom-seg") == ("nifti", "dicom-seg", "rtstruct")
    with pytest.raises(ConfigError, match="unknown output format 'dicomseg'; choose from nifti, dicom-seg, rtstruct"):
        parse_formats("nifti,dicomseg")


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    plan = make_plan(target_spacing=(4.0, 4.0, 4.0), patch_size=(32, 32, 8), num_classes=2)
    return save_model(tmp_path_factory.mktemp("model") / "m", plan, options={"threshold": -3.0})


def test_cli_writes_verified_seg_and_rtstruct_matching_the_nifti_mask(series, sources, model, tmp_path):
    before = sha256(series)
    out = tmp_path / "out"
    args = ["infer", str(series), "-m", str(model), "-o", str(out), "--format", "dicom-seg,rtstruct", "--device", "cpu"]
    assert main(args) == 0
    name = series.name
    assert {f"{name}_mask.nii.gz", f"{name}_seg.dcm", f"{name}_rtstruct.dcm"} <= {p.name for p in out.iterdir()}
    mask = np.asarray(nib.load(out / f"{name}_mask.nii.gz").dataobj)
    assert 0 < mask.mean() < 1  # the threshold network found the body and not everything
    frames = hd.seg.segread(out / f"{name}_seg.dcm").get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in sources], combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(frames, np.transpose(mask, (2, 1, 0)))
    raster = rasterised_with_skimage(out / f"{name}_rtstruct.dcm", sources)
    np.testing.assert_array_equal(raster, np.transpose(mask, (2, 1, 0)))
    assert sha256(series) == before


def test_cli_refuses_dicom_formats_for_a_nifti_input_in_one_line(model, tmp_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.int16), np.eye(4)), scan)
    assert main(["infer", str(scan), "-m", str(model), "-o", str(tmp_path / "out"), "--format", "rtstruct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"--format rtstruct needs a DICOM series folder as input, but {scan} is a file" in err[0]
    assert "use --format nifti" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_refuses_dicom_formats_with_anonymize(series, model, tmp_path, capsys):
    args = ["infer", str(series), "-m", str(model), "-o", str(tmp_path / "o"), "--format", "dicom-seg", "--anonymize"]
    assert main(args) == 2
    assert "cannot be combined with --anonymize" in capsys.readouterr().err
