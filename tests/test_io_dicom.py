"""DICOM series folders: exact geometry against pydicom's per-slice headers, validation, PHI."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import sha256

from medseg.errors import DicomSeriesError, OutputExistsError
from medseg.io.readers import list_dicom_series, read_volume
from medseg.io.writers import write_mask


@pytest.fixture
def series_dir(shared_data):
    return shared_data / "ct_dicom_series"


@pytest.fixture(scope="module")
def real_series():
    from conftest import require_shared_data

    return read_volume(require_shared_data("ct_dicom_series"))


def headers(folder):
    """pydicom headers sorted along the slice normal (z ascending for this axial series)."""
    found = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    return sorted(found, key=lambda ds: float(ds.ImagePositionPatient[2]))


def copy_series(source, target, count=None, edit=None):
    """Copy the first ``count`` slices (by file name) into ``target``, rewriting headers with ``edit(i, ds)``."""
    target.mkdir()
    files = sorted(source.iterdir())[:count]
    for i, file in enumerate(files):
        if edit is None:
            shutil.copy(file, target / file.name)
        else:
            ds = pydicom.dcmread(file)
            edit(i, ds)
            ds.save_as(target / file.name)
    return target


def refused(folder, match, **kwargs):
    before = sha256(folder)
    with pytest.raises(DicomSeriesError, match=match):
        read_volume(folder, **kwargs)
    assert sha256(folder) == before


# --- the real series ----------------------------------------------------------------
def test_real_series_shape_spacing_and_origin_match_the_headers(real_series, series_dir):
    slices = headers(series_dir)
    g = real_series.geometry
    assert g.shape == (512, 512, 20)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    step = float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2])
    np.testing.assert_allclose(g.spacing, (col_spacing, row_spacing, step), atol=1e-9)
    np.testing.assert_allclose(g.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-9)
    np.testing.assert_allclose(g.origin_lps, (-249.512, -437.512, -804.5), atol=1e-3)
    np.testing.assert_allclose(g.origin_lps, [float(v) for v in slices[0].ImagePositionPatient], atol=1e-9)
    assert g.nifti_codes is None and g.source == "dicom"
    assert real_series.meta == {"format": "dicom", "modality": "CT"}


def test_real_series_is_in_hounsfield_units(real_series):
    array = real_series.array
    assert array.shape == (1, 512, 512, 20) and array.dtype.kind == "i"
    assert array.min() in (-1024, -2048) and 1000 < array.max() < 4000
    assert -900 < array.mean() < -300  # mostly air around the patient


def test_mask_for_the_series_lands_on_every_slice_position(real_series, series_dir, tmp_path):
    before = sha256(series_dir)
    mask = np.zeros(real_series.geometry.shape, np.uint8)
    out = write_mask(mask, real_series, tmp_path / "mask.nii.gz")
    affine = nib.load(out).affine
    for k, ds in enumerate(headers(series_dir)):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        for i, j in [(0, 0), (511, 0), (0, 511), (511, 511)]:  # i = column, j = row
            lps = ipp + i * col_spacing * iop[:3] + j * row_spacing * iop[3:]
            ras = (affine @ [i, j, k, 1.0])[:3]
            np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-3)
    assert sha256(series_dir) == before


def test_voxel_values_match_pydicom_decoding(real_series, series_dir):
    ds = pydicom.dcmread(headers_file(series_dir, index=0))
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    np.testing.assert_array_equal(real_series.array[0, :, :, 0], hu.T)  # pydicom (row, col) -> (i=col, j=row)


def headers_file(folder, index):
    files = sorted(
        folder.iterdir(),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    return files[index]


# --- validation --------------------------------------------------------------------
def test_several_series_are_refused_listing_each(series_dir, tmp_path):
    def split(i, ds):
        ds.SeriesInstanceUID = "1.2.3.4" if i < 3 else "1.2.3.5"
        ds.SeriesDescription = "first" if i < 3 else "second"

    folder = copy_series(series_dir, tmp_path / "two", 6, split)
    refused(
        folder,
        r"holds 2 DICOM series; choose one with series_uid= \(CLI: --series-uid UID\): "
        r"\[uid 1\.2\.3\.4  modality CT  3 slice\(s\)  description 'first'\]; "
        r"\[uid 1\.2\.3\.5  modality CT  3 slice\(s\)  description 'second'\]$",
    )
    volume = read_volume(folder, series_uid="1.2.3.5")
    assert volume.geometry.shape == (512, 512, 3)
    assert volume.meta["series_uid"] == "1.2.3.5"
    assert [s.uid for s in list_dicom_series(folder)] == ["1.2.3.4", "1.2.3.5"]
    refused(folder, r"no series with uid '9\.9'. Series found:", series_uid="9.9")


def test_missing_middle_slice_is_refused_with_the_gap(series_dir, tmp_path):
    folder = copy_series(series_dir, tmp_path / "gap", 8)
    sorted(folder.iterdir())[4].unlink()  # z = -774.5
    refused(
        folder,
        r"slice spacing is not uniform \(expected 2\.000 mm .*gaps at -776\.500 -> -772\.500 mm "
        r"\(step 4\.000\)\)",
    )


def test_slices_with_different_orientations_are_refused(series_dir, tmp_path):
    def rotate_one(i, ds):
        if i == 2:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal localizer slice

    folder = copy_series(series_dir, tmp_path / "mixed", 5, rotate_one)
    refused(
        folder,
        r"the slices have different orientations \(ImageOrientationPatient\).*\[1\.0, 0\.0, 0\.0, 0\.0, "
        r"0\.0, -1\.0\]",
    )


def test_gantry_tilt_tag_is_refused(series_dir, tmp_path):
    def tilt(i, ds):
        ds.GantryDetectorTilt = 15

    folder = copy_series(series_dir, tmp_path / "tilt", 4, tilt)
    refused(folder, r"acquired with gantry tilt 15 deg \(GantryDetectorTilt, 0018,1120\)")


def test_sheared_slice_positions_are_refused_as_tilt(series_dir, tmp_path):
    def shear(i, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y - 0.25 * (-766.5 - z), z]  # 0.5 mm per 2 mm step: about 14 deg

    folder = copy_series(series_dir, tmp_path / "shear", 4, shear)
    refused(
        folder,
        r"slice positions drift off the slice normal by up to 1\.5 mm \(about 14\.04 deg\): gantry tilt "
        r"\(0018,1120\)",
    )


def test_duplicate_positions_are_refused(series_dir, tmp_path):
    def duplicate(i, ds):
        if i == 1:
            ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [-766.5]

    folder = copy_series(series_dir, tmp_path / "dup", 4, duplicate)
    refused(folder, r"1 duplicate slice position\(s\), e\.g\. .* both at -766\.500 mm along the slice normal")


def test_different_pixel_spacing_is_refused(series_dir, tmp_path):
    def respace(i, ds):
        if i == 0:
            ds.PixelSpacing = [0.5, 0.5]

    folder = copy_series(series_dir, tmp_path / "spacing", 3, respace)
    refused(folder, r"the slices have different PixelSpacing")


def test_single_slice_is_a_2d_scan(series_dir, tmp_path):
    folder = copy_series(series_dir, tmp_path / "one", 1)
    volume = read_volume(folder)
    assert volume.geometry.shape == (512, 512) and volume.array.shape == (1, 512, 512)
    np.testing.assert_allclose(volume.geometry.origin_lps, (-249.51171875, -437.51171875, -766.5), atol=1e-6)
    np.testing.assert_allclose(volume.geometry.spacing, (0.9765625, 0.9765625))


def test_non_dicom_files_are_skipped_and_empty_folders_refused(series_dir, tmp_path):
    folder = copy_series(series_dir, tmp_path / "extra", 3)
    (folder / "README.txt").write_text("notes")
    (folder / "DICOMDIR").write_bytes(b"\0" * 200)
    assert read_volume(folder).geometry.shape == (512, 512, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    refused(empty, r"no DICOM image files found \(1 file\(s\) skipped as not DICOM images\)")


def test_mask_inside_the_input_folder_is_refused(series_dir, tmp_path):
    folder = copy_series(series_dir, tmp_path / "in", 2)
    volume = read_volume(folder)
    with pytest.raises(OutputExistsError, match=r"inside the input DICOM folder"):
        write_mask(np.zeros(volume.geometry.shape, np.uint8), volume, folder / "mask.nii.gz", overwrite=True)
    assert len(list(folder.iterdir())) == 2


# --- PHI ------------------------------------------------------------------------------
def test_patient_name_and_id_never_reach_the_mask(series_dir, tmp_path):
    def identify(i, ds):
        ds.PatientName = "Doe^Peter"
        ds.PatientID = "PID-4711-XYZ"

    folder = copy_series(series_dir, tmp_path / "phi", 3, identify)
    volume = read_volume(folder)
    assert "Doe" not in repr(volume.meta) and "4711" not in repr(volume.meta)
    out = write_mask(np.ones(volume.geometry.shape, np.uint8), volume, tmp_path / "mask.nii.gz")
    for data in (out.read_bytes(), gzip.decompress(out.read_bytes())):
        assert b"Doe^Peter" not in data and b"Doe" not in data and b"PID-4711-XYZ" not in data
    assert (
        b"Doe^Peter" in (folder / sorted(p.name for p in folder.iterdir())[0]).read_bytes()
    )  # the test is real


# --- gantry tilt: refused by default, resampled on request ---------------------------
PIXEL = 0.9765625  # the real series' pixel spacing (mm)


def tilted_copy(series_dir, target, count=6, *, shift_mm=PIXEL, iop_tilt_deg=None, tag=26.0):
    """The first ``count`` slices as a gantry-tilted series.

    Either the slices keep their axial planes and drift ``shift_mm`` along y per 2 mm slice
    (a sheared stack, as some scanners write it), or (``iop_tilt_deg``) the image planes are
    tilted about x while the positions stay on the table axis (as GE writes tilted CT).
    """
    z0 = min(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
             for f in sorted(series_dir.iterdir())[:count])

    def tilt(i, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        if iop_tilt_deg is None:
            ds.ImagePositionPatient = [x, y + (z - z0) / 2.0 * shift_mm, z]
        else:
            t = np.radians(iop_tilt_deg)
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t))]
        ds.GantryDetectorTilt = tag

    return copy_series(series_dir, target, count, tilt)


def test_tilted_series_is_refused_by_default_and_resampled_only_on_request(series_dir, tmp_path):
    folder = tilted_copy(series_dir, tmp_path / "tilt")
    refused(folder, r"acquired with gantry tilt 26 deg \(GantryDetectorTilt, 0018,1120\).*resample_tilt=True")
    before = sha256(folder)
    volume = read_volume(folder, resample_tilt=True)
    assert sha256(folder) == before
    original = read_volume(copy_series(series_dir, tmp_path / "flat", 6))
    g = volume.geometry
    assert g.shape == (512, 512, 6) and volume.array.dtype == np.float32
    np.testing.assert_allclose(g.spacing, (PIXEL, PIXEL, 2.0), atol=1e-9)
    np.testing.assert_allclose(g.direction_lps, np.eye(3), atol=1e-12)  # a regular grid, perpendicular to the table
    assert g.shear < 1e-12 and volume.meta["tilt_resampled_deg"] == pytest.approx(26.03, abs=0.01)
    # slice k drifted k pixels along y: it is shifted back by exactly k pixels, air shifted in at the edge
    for k in range(6):
        flat = original.array[0, :, :, k]
        np.testing.assert_array_equal(volume.array[0, :, k:, k], flat[:, : 512 - k])
        assert np.all(volume.array[0, :, :k, k] == -1024)


@pytest.mark.parametrize("kind", ["sheared positions", "tilted planes"])
def test_mask_on_the_resampled_grid_reproduces_every_original_slice_position(series_dir, tmp_path, kind):
    if kind == "sheared positions":
        folder = tilted_copy(series_dir, tmp_path / "tilt", shift_mm=0.5)  # 0.512 pixel per slice: interpolated
    else:
        folder = tilted_copy(series_dir, tmp_path / "tilt", iop_tilt_deg=20.0)
    volume = read_volume(folder, resample_tilt=True)
    out = write_mask(np.zeros(volume.geometry.shape, np.uint8), volume, tmp_path / "mask.nii.gz")
    affine = nib.load(out).affine
    inverse = np.linalg.inv(affine)
    slices = sorted(
        (pydicom.dcmread(f, stop_before_pixels=True) for f in folder.iterdir()),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    if kind == "tilted planes":
        np.testing.assert_allclose(volume.geometry.direction_lps[:, 2], normal, atol=1e-9)
        np.testing.assert_allclose(volume.geometry.spacing[2], 2.0 * np.cos(np.radians(20.0)), atol=1e-6)
    for k, ds in enumerate(slices):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        index = (inverse @ [*(ipp * [-1, -1, 1]), 1.0])[:3]
        # the original slice centre lies on the corrected grid at integer slice index k (within 0.1 mm)
        assert abs(index[2] - k) * volume.geometry.spacing[2] < 0.1
        # and every corner pixel of that slice is where the mask's affine puts it, shifted in-plane
        for i, j in [(0, 0), (511, 0), (0, 511), (511, 511)]:
            lps = ipp + i * PIXEL * iop[:3] + j * PIXEL * iop[3:]
            ras = (affine @ [i + index[0], j + index[1], k, 1.0])[:3]
            np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=0.1)


def test_tilted_slices_off_the_corrected_grid_are_refused():
    from types import SimpleNamespace

    from medseg.io.readers import _resample_tilted

    first = SimpleNamespace(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    positions = np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 2.0], [0.0, 1.0, 4.0], [0.0, 1.5, 6.3]])  # last step 2.3 mm
    files = [Path(f"s{k}.dcm") for k in range(4)]
    with pytest.raises(
        DicomSeriesError, match=r"the ImagePositionPatient of slice 2 \(s2\.dcm\) is 0\.2 mm from its place on the corrected"
    ):
        _resample_tilted(Path("tilted"), files, np.zeros((4, 4, 4), np.int16), positions, np.array([0.0, 0.0, 1.0]),
                         first, np.array([1.0, 1.0]))
    regular = positions.copy()
    regular[3, 2] = 6.0
    array, geometry = _resample_tilted(Path("tilted"), files, np.zeros((4, 4, 4), np.int16), regular,
                                       np.array([0.0, 0.0, 1.0]), first, np.array([1.0, 1.0]))
    assert array.shape == (1, 4, 4, 4) and geometry.spacing[2] == pytest.approx(2.0)


def test_cli_info_and_infer_refuse_tilt_unless_resample_tilt_is_given(series_dir, tmp_path, capsys):
    from inference_support import make_plan, save_model

    from medseg.cli import main

    folder = tilted_copy(series_dir, tmp_path / "tilt", count=4)
    assert main(["info", str(folder)]) == 2
    assert "acquired with gantry tilt 26 deg" in capsys.readouterr().err
    assert main(["info", str(folder), "--resample-tilt"]) == 0
    assert "shape:        (512, 512, 4) (3D)" in capsys.readouterr().out

    model = save_model(tmp_path / "m", make_plan(target_spacing=(4.0, 4.0, 4.0), patch_size=(32, 32, 8)))
    out = tmp_path / "out"
    assert main(["infer", str(folder), "-m", str(model), "-o", str(out)]) == 2
    assert "acquired with gantry tilt 26 deg" in capsys.readouterr().err and not out.exists()
    assert main(["infer", str(folder), "-m", str(model), "-o", str(out), "--resample-tilt"]) == 0
    mask = nib.load(out / "tilt_mask.nii.gz")
    corrected = read_volume(folder, resample_tilt=True).geometry
    assert mask.shape == corrected.shape
    np.testing.assert_allclose(mask.affine, corrected.affine, atol=1e-4)  # the corrected grid, not the tilted one


def test_a_dataset_case_with_a_tilted_series_is_refused_unless_the_dataset_opts_in(series_dir, tmp_path, capsys):
    from medseg.cli import main
    from medseg.data import scan_dataset
    from medseg.data.folders import read_case
    from medseg.io import write_mask

    root = tmp_path / "TiltedCT"
    (root / "images").mkdir(parents=True)
    tilted_copy(series_dir, root / "images" / "ct01")
    (root / "labels").mkdir()
    corrected = read_volume(root / "images" / "ct01", resample_tilt=True)
    write_mask((corrected.array[0] > 0).astype(np.uint8), corrected, root / "labels" / "ct01.nii.gz")
    before = sha256(root / "images" / "ct01")

    assert main(["check", str(root), "--folds", "1"]) == 2
    assert "acquired with gantry tilt 26 deg" in capsys.readouterr().out
    assert main(["check", str(root), "--folds", "1", "--resample-tilt"]) == 0
    image, label = read_case(scan_dataset(root, resample_tilt=True).cases[0])
    assert image.geometry.same_grid(label.geometry, atol_mm=1e-3)
    assert sha256(root / "images" / "ct01") == before
