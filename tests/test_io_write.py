"""write_mask / write_volume: exact grid and codes, atomic writes, and every refusal."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import ORIENTATIONS, make_affine, sha256, sphere_mask

from medseg.errors import ArrayValueError, GeometryError, OutputExistsError, OutputWriteError
from medseg.io.geometry import Geometry, NiftiCodes
from medseg.io.readers import read_volume
from medseg.io.writers import write_mask, write_volume

SHAPE = (12, 10, 8)
SPACING = (0.8, 1.1, 2.5)


def save_scan(path, affine, *, qform_code=1, sform_code=1, shape=SHAPE):
    data = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    img = nib.Nifti1Image(data, None, header=header)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    img.to_filename(str(path))
    return path


@pytest.fixture
def scan(tmp_path):
    return read_volume(save_scan(tmp_path / "scan.nii.gz", make_affine("oblique")))


def mask_for(geometry):
    return sphere_mask(geometry.shape, radius=4.0, spacing=geometry.spacing).astype(np.uint8) * 3


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("codes", [(1, 1), (0, 2), (2, 0), (1, 4)], ids=lambda c: f"q{c[0]}s{c[1]}")
@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_mask_round_trip_keeps_corners_shape_and_codes(tmp_path, kind, codes):
    source = save_scan(
        tmp_path / "scan.nii.gz", make_affine(kind, spacing=SPACING), qform_code=codes[0], sform_code=codes[1]
    )
    volume = read_volume(source)
    mask = mask_for(volume.geometry)
    out = write_mask(mask, volume, tmp_path / "mask.nii.gz")
    again = read_volume(out)
    assert again.geometry.shape == volume.geometry.shape
    corners = np.linalg.norm(again.geometry.corners() - volume.geometry.corners(), axis=-1)
    assert corners.max() < 1e-4
    header = nib.load(out).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == codes
    assert again.geometry.nifti_codes == NiftiCodes(*codes)
    # both transforms written equal the scan's grid (a viewer may use either)
    for affine in (header.get_sform(), header.get_qform()):
        assert Geometry(SHAPE, affine).max_corner_distance(volume.geometry) < 1e-4
    np.testing.assert_array_equal(again.array[0], mask)
    assert again.array.dtype == np.uint8
    assert leftovers(tmp_path) == []


def test_geometry_without_codes_writes_scanner_codes(tmp_path):
    geometry = Geometry(SHAPE, make_affine("left_handed"))
    out = write_mask(mask_for(geometry), geometry, tmp_path / "m.nii")
    header = nib.load(out).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    assert header["pixdim"][0] == -1  # qfac: left-handed
    assert read_volume(out).geometry.same_grid(geometry)


def test_large_origin_is_checked_with_float32_scaled_tolerance(tmp_path):
    geometry = Geometry(SHAPE, make_affine("oblique", origin=(98765.4321, -123456.789, 5000.25)))
    out = write_mask(mask_for(geometry), geometry, tmp_path / "far.nii.gz")
    distance = read_volume(out).geometry.max_corner_distance(geometry)
    assert 0 < distance < 0.05  # float32 header storage: not exact, but within its rounding


def test_2d_mask_round_trip(tmp_path):
    affine = make_affine("oblique")
    affine[:3, 2] /= np.linalg.norm(affine[:3, 2])  # 2D: unit normal as third column
    geometry = Geometry((9, 7), affine)
    mask = np.zeros((9, 7), np.uint8)
    mask[2:5, 3] = 1
    again = read_volume(write_mask(mask, geometry, tmp_path / "flat.nii.gz"))
    assert again.geometry.shape == (9, 7) and again.geometry.same_grid(geometry)
    np.testing.assert_array_equal(again.array[0], mask)


def test_real_organs_written_back_reproduce_voxels_and_geometry(tmp_path, shared_data):
    ct = read_volume(shared_data / "ct_organs" / "ct.nii.gz")
    organs = read_volume(shared_data / "ct_organs" / "organs.nii.gz")
    before = sha256(shared_data / "ct_organs")
    out = write_mask(organs.array, ct, tmp_path / "organs.nii.gz")
    again = read_volume(out)
    np.testing.assert_array_equal(again.array, organs.array)
    assert again.geometry.max_corner_distance(ct.geometry) < 1e-4
    assert again.geometry.nifti_codes == ct.geometry.nifti_codes == NiftiCodes(0, 2)
    # the source's Caret XML extension and descrip are not copied
    header = nib.load(out).header
    assert len(nib.load(shared_data / "ct_organs" / "organs.nii.gz").header.extensions) == 1
    assert len(header.extensions) == 0
    assert header["descrip"] == b"" and header["aux_file"] == b"" and header["intent_name"] == b""
    assert sha256(shared_data / "ct_organs") == before


# --- mask values --------------------------------------------------------------------------
def test_channel_axis_of_one_and_bool_masks_are_accepted(tmp_path, scan):
    mask = mask_for(scan.geometry) > 0
    out = write_mask(mask[np.newaxis], scan, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(read_volume(out).array[0], mask.astype(np.uint8))


def test_labels_above_255_are_stored_as_uint16(tmp_path, scan):
    mask = mask_for(scan.geometry).astype(np.int64) * 100
    again = read_volume(write_mask(mask, scan, tmp_path / "m.nii.gz"))
    assert again.array.dtype == np.uint16 and again.array.max() == 300


def test_integer_valued_float_mask_is_accepted(tmp_path, scan):
    mask = mask_for(scan.geometry).astype(np.float32)
    again = read_volume(write_mask(mask, scan, tmp_path / "m.nii.gz"))
    assert again.array.dtype == np.uint8 and again.array.max() == 3


@pytest.mark.parametrize(
    ("mask_value", "match"),
    [
        (0.5, r"the mask has 1 non-integer value\(s\), e.g. \[0\.5\]; expected integer labels"),
        (-1, r"the mask has negative labels \(min -1\)"),
        (70000, r"label 70000 is above 65535"),
        (np.nan, r"the mask holds NaN/Inf values"),
    ],
)
def test_bad_mask_values_are_refused_and_nothing_is_written(tmp_path, scan, mask_value, match):
    mask = np.zeros(SHAPE, np.float64 if isinstance(mask_value, float) else np.int64)
    mask[1, 2, 3] = mask_value
    with pytest.raises(ArrayValueError, match=match):
        write_mask(mask, scan, tmp_path / "m.nii.gz")
    assert not (tmp_path / "m.nii.gz").exists() and leftovers(tmp_path) == []


def test_mask_of_the_wrong_shape_is_refused(tmp_path, scan):
    with pytest.raises(
        GeometryError,
        match=r"mask shape \(12, 10, 7\) does not match the scan's spatial shape "
        r"\(12, 10, 8\)",
    ):
        write_mask(np.zeros((12, 10, 7), np.uint8), scan, tmp_path / "m.nii.gz")
    assert leftovers(tmp_path) == []


# --- targets ----------------------------------------------------------------------------
def test_existing_output_needs_overwrite(tmp_path, scan):
    out = tmp_path / "m.nii.gz"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match=r"m\.nii\.gz already exists; pass overwrite=True"):
        write_mask(mask_for(scan.geometry), scan, out)
    assert out.read_bytes() == b"old"
    write_mask(mask_for(scan.geometry), scan, out, overwrite=True)
    assert read_volume(out).array.max() == 3 and leftovers(tmp_path) == []


def test_writing_onto_the_input_is_refused_even_with_overwrite(tmp_path, scan):
    before = sha256(scan.path)
    with pytest.raises(OutputExistsError, match=r"it is the input scan itself"):
        write_mask(mask_for(scan.geometry), scan, scan.path, overwrite=True)
    os.link(scan.path, tmp_path / "hardlink.nii.gz")  # same file under another name
    with pytest.raises(OutputExistsError, match=r"it is the input scan itself"):
        write_mask(mask_for(scan.geometry), scan, tmp_path / "hardlink.nii.gz", overwrite=True)
    assert sha256(scan.path) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["mask.mha", "mask.nrrd", "mask.gz", "mask"])
def test_non_nifti_extension_is_refused(tmp_path, scan, name):
    with pytest.raises(OutputWriteError, match=r"medseg writes NIfTI only; use a name ending in \.nii\.gz"):
        write_mask(mask_for(scan.geometry), scan, tmp_path / name)
    assert not (tmp_path / name).exists()


def test_missing_folder_is_refused_naming_it(tmp_path, scan):
    with pytest.raises(OutputWriteError, match=r"the folder .*no_such_dir does not exist; create it first"):
        write_mask(mask_for(scan.geometry), scan, tmp_path / "no_such_dir" / "m.nii.gz")


def test_folder_that_is_a_file_is_refused(tmp_path, scan):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputWriteError, match=r"file is not a folder"):
        write_mask(mask_for(scan.geometry), scan, blocker / "m.nii.gz")


def test_unwritable_folder_is_refused_before_any_work(scan):
    # /proc refuses new files even for root (chmod does not stop root)
    with pytest.raises(OutputWriteError, match=r"the folder /proc does not accept new files"):
        write_mask(np.zeros((1, 1, 1)), scan, "/proc/m.nii.gz")  # wrong shape: the folder is checked first


def test_failed_write_leaves_nothing_behind(tmp_path, scan, monkeypatch):
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(
        OutputWriteError,
        match=r"writing .*m\.nii\.gz failed \(.*No space left on device\); "
        r"nothing was written",
    ):
        write_mask(mask_for(scan.geometry), scan, tmp_path / "m.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_unicode_output_path_with_spaces(tmp_path, scan):
    out = write_mask(mask_for(scan.geometry), scan, tmp_path / "Patiënt scan ü 1.nii.gz")
    assert out.name == "Patiënt scan ü 1.nii.gz" and read_volume(out).geometry.same_grid(scan.geometry)


def test_gzip_header_holds_no_file_name(tmp_path, scan):
    out = write_mask(mask_for(scan.geometry), scan, tmp_path / "Doe_Peter.nii.gz")
    raw = out.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and b"Doe_Peter" not in raw and b".tmp" not in raw
    gzip.decompress(raw)  # complete, valid stream


# --- write_volume ---------------------------------------------------------------------
def test_multichannel_probabilities_round_trip_as_channels(tmp_path, scan):
    probs = np.random.default_rng(3).random((3, *SHAPE))  # float64 -> stored float32
    again = read_volume(write_volume(probs, scan, tmp_path / "probs.nii.gz"))
    assert again.array.shape == (3, *SHAPE) and again.array.dtype == np.float32
    np.testing.assert_allclose(again.array, probs.astype(np.float32))
    assert again.geometry.max_corner_distance(scan.geometry) < 1e-4
    assert again.geometry.nifti_codes == scan.geometry.nifti_codes


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, np.int16])
def test_write_volume_dtypes(tmp_path, scan, dtype):
    data = (np.arange(np.prod(SHAPE)) % 7).reshape(SHAPE).astype(dtype)
    again = read_volume(write_volume(data, scan, tmp_path / "v.nii"))
    assert again.array.dtype == (np.float32 if dtype == np.float16 else dtype)
    np.testing.assert_array_equal(again.array[0], data.astype(again.array.dtype))


def test_write_volume_refuses_nan_and_unsupported_types(tmp_path, scan):
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, 0] = np.inf
    with pytest.raises(ArrayValueError, match=r"1 value\(s\) are NaN/Inf; outputs must be finite"):
        write_volume(data, scan, tmp_path / "v.nii.gz")
    with pytest.raises(
        ArrayValueError, match=r"data type int64 is not supported; use float32, uint8 or int16"
    ):
        write_volume(np.zeros(SHAPE, np.int64), scan, tmp_path / "v.nii.gz")
    with pytest.raises(GeometryError, match=r"array shape \(2, 12, 10\) is neither the scan's spatial shape"):
        write_volume(np.zeros((2, 12, 10)), scan, tmp_path / "v.nii.gz")
    assert leftovers(tmp_path) == [] and not (tmp_path / "v.nii.gz").exists()


def test_sheared_scan_read_with_opt_in_gets_its_sform_back(tmp_path):
    sheared = make_affine("RAS")
    sheared[0, 1] = 0.3
    source = save_scan(tmp_path / "shear.nii.gz", sheared, qform_code=0, sform_code=2)
    volume = read_volume(source, allow_shear=True)
    out = write_mask(mask_for(volume.geometry), volume, tmp_path / "m.nii.gz")
    header = nib.load(out).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 2)
    np.testing.assert_allclose(header.get_sform(), sheared, atol=1e-6)


def test_header_check_refuses_a_misplaced_sform(tmp_path, scan, monkeypatch):
    import medseg.io.writers as writers

    make_image = writers._nifti_image

    def off_by_a_micron(data, geometry):  # simulate a writer bug: the sform lands 1 um off
        image, qcode, scode = make_image(data, geometry)
        moved = geometry.affine.copy()
        moved[0, 3] += 1e-3
        image.set_sform(moved, code=scode)
        return image, qcode, scode

    monkeypatch.setattr(writers, "_nifti_image", off_by_a_micron)
    with pytest.raises(
        GeometryError,
        match=r"the written header does not reproduce the scan's grid: sform corners "
        r"up to 0\.001 mm",
    ):
        write_mask(mask_for(scan.geometry), scan, tmp_path / "m.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_uncoded_geometry_is_written_with_scanner_codes(tmp_path):
    geometry = Geometry(SHAPE, make_affine("PIR"), nifti_codes=NiftiCodes(0, 0))
    header = nib.load(write_mask(mask_for(geometry), geometry, tmp_path / "m.nii.gz")).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)


def _rotation_near_180(angle_deg: float) -> np.ndarray:
    """A rotation by angle_deg about an oblique axis: near 180 degrees the qform quaternion's a ~ 0."""
    axis = np.array([0.1, -0.99, -0.07])
    axis /= np.linalg.norm(axis)
    t = np.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def test_near_180_degree_oblique_grid_is_written_exactly(tmp_path):
    # regression: the float32 quaternion of such a qform is ~1e-3 mm off; the check must allow
    # for that representation limit (the sform stays exact) instead of refusing the mask
    affine = np.eye(4)
    affine[:3, :3] = _rotation_near_180(179.1) * np.array([0.9, 1.1, 2.7])
    affine[:3, 3] = [-30.0, 12.0, 85.0]
    geometry = Geometry((56, 56, 36), affine)
    out = write_mask(np.ones(geometry.shape, dtype=np.uint8), geometry, tmp_path / "m.nii.gz")
    written = nib.load(out)
    assert Geometry(geometry.shape, written.header.get_sform()).max_corner_distance(geometry) < 1e-3
    assert int(written.header["qform_code"]) == 1


def test_qform_that_cannot_hold_the_grid_is_written_with_code_0_and_a_warning(tmp_path):
    affine = np.eye(4)
    affine[:3, :3] = _rotation_near_180(179.99) * np.array([0.9, 1.1, 2.7])
    geometry = Geometry((600, 600, 400), affine)  # a large field of view magnifies the quaternion error
    with pytest.warns(UserWarning, match="mask is written with qform_code 0 so that viewers use its exact sform"):
        out = write_mask(np.zeros(geometry.shape, dtype=np.uint8), geometry, tmp_path / "big.nii.gz")
    header = nib.load(out).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 1)
