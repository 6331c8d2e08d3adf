"""read_volume on NIfTI and MetaImage/NRRD: geometry rules, intensities and every refusal."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_affine, sha256

from medseg.errors import GeometryError, ScanReadError
from medseg.io.readers import read_volume


def save_nifti(path, data, affine=None, *, qform_code=1, sform_code=1, slope=None, inter=None):
    """Write a NIfTI-1 file with explicit qform/sform codes (nibabel decides compression by name)."""
    affine = make_affine("oblique") if affine is None else affine
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, None, header=header)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    img.to_filename(str(path))
    return path


@pytest.fixture
def small(tmp_path):
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    return save_nifti(tmp_path / "small.nii.gz", data), data


def refused(path, error, match, **kwargs):
    """read_volume must raise ``error`` matching ``match`` and leave the file untouched."""
    before = sha256(path)
    with pytest.raises(error, match=match):
        read_volume(path, **kwargs)
    assert sha256(path) == before


# --- what is read -------------------------------------------------------------------
def test_nifti_is_read_channel_first_with_its_exact_affine(small):
    path, data = small
    volume = read_volume(path)
    assert volume.array.shape == (1, 6, 5, 4)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array[0], data)
    np.testing.assert_allclose(volume.geometry.affine, nib.load(path).affine, atol=0)
    assert volume.geometry.nifti_codes.qform_code == 1 and volume.geometry.nifti_codes.sform_code == 1
    assert volume.path == path and volume.meta == {"format": "nifti"}


def test_4d_nifti_puts_the_fourth_axis_first_as_channels(tmp_path):
    data = np.random.default_rng(0).random((6, 5, 4, 3)).astype(np.float32)
    volume = read_volume(save_nifti(tmp_path / "mr.nii.gz", data))
    assert volume.geometry.shape == (6, 5, 4)
    assert volume.num_channels == 3
    for c in range(3):
        np.testing.assert_array_equal(volume.array[c], data[..., c])


def test_5d_nifti_is_refused(tmp_path):
    path = save_nifti(tmp_path / "vec.nii.gz", np.zeros((4, 4, 3, 1, 2), np.float32))
    refused(path, ScanReadError, r"5D image of shape \(4, 4, 3, 1, 2\) is not supported")


def test_2d_nifti_is_a_2d_volume_and_a_single_slice_stays_3d(tmp_path):
    flat = read_volume(save_nifti(tmp_path / "flat.nii.gz", np.ones((7, 6), np.uint8)))
    assert flat.geometry.shape == (7, 6) and flat.spatial_dims == 2 and flat.array.shape == (1, 7, 6)
    slab = read_volume(save_nifti(tmp_path / "slab.nii.gz", np.ones((7, 6, 1), np.uint8)))
    assert slab.geometry.shape == (7, 6, 1) and slab.spatial_dims == 3


def test_scl_slope_and_inter_give_hounsfield_units_as_integers(tmp_path):
    raw = np.array([[[0, 24, 1024, 2048]]], dtype=np.int16)
    volume = read_volume(save_nifti(tmp_path / "ct.nii.gz", raw, slope=1.0, inter=-1024.0))
    assert volume.array.dtype.kind == "i"
    np.testing.assert_array_equal(volume.array[0], [[[-1024, -1000, 0, 1024]]])


def test_fractional_slope_gives_floats(tmp_path):
    raw = np.array([[[0, 1, 2, 3]]], dtype=np.int16)
    volume = read_volume(save_nifti(tmp_path / "pet.nii.gz", raw, slope=0.5, inter=1.0))
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array[0], [[[1.0, 1.5, 2.0, 2.5]]])


def test_real_ct_has_the_documented_geometry_and_hu(shared_data):
    volume = read_volume(shared_data / "ct_organs" / "ct.nii.gz")
    g = volume.geometry
    assert g.shape == (122, 101, 30)
    np.testing.assert_allclose(g.spacing, (3.0, 3.0, 3.0), atol=1e-6)
    np.testing.assert_allclose(g.origin, (-177.956, 11.319, 94.302), atol=1e-3)
    assert g.orientation == "RAS"
    assert (g.nifti_codes.qform_code, g.nifti_codes.sform_code) == (0, 2)
    assert volume.array.dtype == np.int16 and -1100 <= volume.array.min() < -900 and volume.array.max() > 500


def test_unicode_path_with_spaces_is_read(tmp_path, small):
    path, data = small
    folder = tmp_path / "Données ü"
    folder.mkdir()
    target = folder / "Patiënt scan ü 1.nii.gz"
    shutil.copy(path, target)
    np.testing.assert_array_equal(read_volume(target).array[0], data)


# --- qform / sform rule -------------------------------------------------------------
def test_sform_wins_over_qform_and_a_disagreement_warns(tmp_path):
    data = np.zeros((6, 5, 4), np.int16)
    path = save_nifti(tmp_path / "two.nii.gz", data, make_affine("RAS"))
    img = nib.load(path)
    img.set_qform(make_affine("RAS", origin=(0.0, 0.0, 0.0)), code=1)  # 44 mm away from the sform
    img.to_filename(path)
    with pytest.warns(
        UserWarning, match=r"sform \(code 1\) and the qform \(code 1\) disagree by up to 4\d\.\d+ mm"
    ):
        volume = read_volume(path)
    np.testing.assert_allclose(volume.geometry.affine, make_affine("RAS"), atol=1e-5)


def test_qform_is_used_when_sform_code_is_zero(tmp_path):
    path = save_nifti(
        tmp_path / "q.nii.gz", np.zeros((6, 5, 4), np.int16), make_affine("PIR"), sform_code=0, qform_code=2
    )
    img = nib.load(path)
    img.header["srow_x"] = [9.0, 9.0, 9.0, 9.0]  # garbage in an uncoded sform must be ignored
    img.header.set_sform(None, code=0)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, img.header), path)
    volume = read_volume(path)
    np.testing.assert_allclose(volume.geometry.affine, make_affine("PIR"), atol=1e-5)
    assert (volume.geometry.nifti_codes.qform_code, volume.geometry.nifti_codes.sform_code) == (2, 0)


def test_no_qform_and_no_sform_is_refused(tmp_path):
    path = save_nifti(tmp_path / "none.nii.gz", np.zeros((6, 5, 4), np.int16), qform_code=0, sform_code=0)
    refused(
        path,
        GeometryError,
        r"none\.nii\.gz: the NIfTI header has no orientation \(qform_code and sform_code "
        r"are both 0\).*fslorient",
    )


def test_sheared_sform_is_refused_unless_allowed(tmp_path):
    sheared = make_affine("RAS")
    sheared[0, 1] = 0.3  # j axis leans towards x
    path = save_nifti(
        tmp_path / "shear.nii.gz", np.zeros((6, 5, 4), np.int16), sheared, qform_code=0, sform_code=2
    )
    refused(path, GeometryError, r"the sform is sheared \(voxel axes not orthogonal, largest \|cos\| 0\.26")
    volume = read_volume(path, allow_shear=True)
    np.testing.assert_allclose(volume.geometry.affine, sheared, atol=1e-6)


# --- content sniffing -------------------------------------------------------------
def test_uncompressed_nifti_named_nii_gz_is_read_with_a_warning(tmp_path, small):
    _, data = small
    raw = save_nifti(tmp_path / "raw.nii", data)
    misnamed = tmp_path / "misnamed.nii.gz"
    shutil.copy(raw, misnamed)
    with pytest.warns(
        UserWarning,
        match=r"misnamed\.nii\.gz: the name ends in \.nii\.gz but the content is "
        r"uncompressed NIfTI",
    ):
        volume = read_volume(misnamed)
    np.testing.assert_array_equal(volume.array[0], data)


def test_gzipped_nifti_named_nii_is_read_with_a_warning(tmp_path, small):
    path, data = small
    misnamed = tmp_path / "zipped.nii"
    shutil.copy(path, misnamed)
    with pytest.warns(UserWarning, match=r"ends in \.nii but the content is gzip-compressed"):
        np.testing.assert_array_equal(read_volume(misnamed).array[0], data)


def test_dicom_renamed_nii_gz_is_refused_naming_both(tmp_path, shared_data):
    source = sorted((shared_data / "ct_dicom_series").iterdir())[0]
    path = tmp_path / "scan.nii.gz"
    shutil.copy(source, path)
    refused(path, ScanReadError, r"scan\.nii\.gz: the extension says \.nii\.gz but the content is DICOM")


def test_single_dicom_file_asks_for_the_folder(tmp_path, shared_data):
    path = tmp_path / "slice.dcm"
    shutil.copy(sorted((shared_data / "ct_dicom_series").iterdir())[0], path)
    refused(path, ScanReadError, r"slice\.dcm is a single DICOM file; pass the folder")


def test_unknown_extension_is_refused(tmp_path):
    # PNG is read since 2D image support (tests/test_images_2d.py); GIF is not
    path = tmp_path / "scan.gif"
    path.write_bytes(b"GIF89a" + b"\0" * 600)
    refused(path, ScanReadError, r"scan\.gif: unsupported file type \.gif")


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(ScanReadError, match=r"nope\.nii\.gz: no such file or folder"):
        read_volume(tmp_path / "nope.nii.gz")


# --- corrupt files -----------------------------------------------------------------
def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    refused(path, ScanReadError, r"empty\.nii\.gz is empty \(0 bytes\): the file is truncated")


def test_truncated_gz_is_refused(tmp_path):
    data = np.random.default_rng(1).integers(-1000, 1000, (20, 20, 20)).astype(np.int16)
    full = save_nifti(tmp_path / "full.nii.gz", data).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(full[: len(full) // 2])
    refused(path, ScanReadError, r"cut\.nii\.gz: truncated or corrupt NIfTI file \(EOFError")



def test_gz_with_a_corrupt_deflate_stream_is_refused(tmp_path):
    # a valid gzip header, then a deflate block of the reserved type 3: every decoder refuses it
    path = tmp_path / "garbled.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\x07" + b"\x00" * 600)
    refused(path, ScanReadError, r"garbled\.nii\.gz: truncated or corrupt NIfTI file")


def test_gz_missing_only_its_crc_trailer_is_refused(tmp_path, small):
    path, _ = small
    cut = tmp_path / "trailer.nii.gz"
    cut.write_bytes(path.read_bytes()[:-4])
    refused(cut, ScanReadError, r"trailer\.nii\.gz: truncated or corrupt NIfTI file")


def test_header_declaring_more_voxels_than_present_is_refused(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((512, 512, 40))
    header.set_sform(np.eye(4), code=1)
    path = tmp_path / "short.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\1" * 1000)
    refused(
        path, ScanReadError, r"short\.nii: truncated or corrupt NIfTI file \(OSError: Expected 20971520 bytes"
    )
    gz = tmp_path / "short.nii.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    refused(gz, ScanReadError, r"short\.nii\.gz: truncated or corrupt NIfTI file")


def test_decompression_bomb_is_refused_before_reading(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((30000, 30000, 30000))
    header.set_sform(np.eye(4), code=1)
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    refused(
        path,
        ScanReadError,
        r"bomb\.nii\.gz: the header declares \(30000, 30000, 30000\) voxels of 4 bytes, "
        r"which needs about \d+\.\d GiB of memory",
    )


BOMB_PEAK_SCRIPT = """
import sys, tracemalloc
from medseg.errors import ScanReadError
from medseg.io.readers import read_volume
import nibabel  # imported before tracing: only the read itself is measured
tracemalloc.start()
try:
    read_volume(sys.argv[1])
    outcome = "read"
except ScanReadError as err:
    outcome = str(err)
print(tracemalloc.get_traced_memory()[1])
print(outcome)
"""


def test_decompression_bomb_with_a_small_header_is_refused_in_bounded_memory(tmp_path):
    """A 4x4x4 header followed by 200 MB of gzip-compressed zeros: refused, never decompressed in full."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((4, 4, 4))
    header.set_sform(np.eye(4), code=1)
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\1" * 128)
        zeros = b"\0" * (1 << 20)
        for _ in range(200):
            f.write(zeros)
    assert path.stat().st_size < 1_000_000  # the bomb is small on disk
    before = sha256(path)
    done = subprocess.run(
        [sys.executable, "-c", BOMB_PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True, timeout=600
    )
    peak, outcome = done.stdout.splitlines()[:2]
    assert int(peak) < 16 * 2**20, f"peak traced memory {int(peak) / 2**20:.0f} MiB"
    assert re.search(
        r"bomb\.nii\.gz: the header declares 480 bytes \(header, extensions and voxels\) but the decompressed "
        r"file holds more than 1049056 bytes: trailing data after the image",
        outcome,
    ), outcome
    assert sha256(path) == before


@pytest.mark.parametrize("name", ["glued.nii.gz", "glued.nii"])
def test_legit_file_with_trailing_garbage_is_refused(tmp_path, name):
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    raw = save_nifti(tmp_path / "plain.nii", data).read_bytes() + b"GARBAGE!" * 3
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    content = "decompressed " if name.endswith(".gz") else ""
    refused(
        path,
        ScanReadError,
        rf"{re.escape(name)}: the header declares 592 bytes \(header, extensions and voxels\) but the {content}"
        r"file holds 616 bytes: trailing data after the image",
    )


def test_not_nifti_content_is_refused(tmp_path):
    path = tmp_path / "text.nii"
    path.write_text("hello, this is not an image\n" * 30)
    refused(path, ScanReadError, r"text\.nii: not a NIfTI file \(no gzip or NIfTI header magic\)")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels_are_refused_with_count_and_first_index(tmp_path, value):
    data = np.zeros((6, 5, 4), np.float32)
    data[2, 3, 1] = value
    data[4, 0, 0] = value
    path = save_nifti(tmp_path / "bad.nii.gz", data)
    refused(path, ScanReadError, r"bad\.nii\.gz: 2 voxel\(s\) are NaN or Inf \(first at index \(2, 3, 1\)\)")


def test_rgb_nifti_is_refused(tmp_path):
    rgb = np.zeros((6, 5, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = save_nifti(tmp_path / "rgb.nii.gz", rgb)
    refused(
        path, ScanReadError, r"rgb\.nii\.gz: voxel type .* is not supported \(RGB, complex or structured\)"
    )


# --- MetaImage / NRRD ---------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_keep_oblique_geometry_and_drop_metadata(tmp_path, suffix):
    data = np.random.default_rng(2).integers(0, 100, (6, 5, 4)).astype(np.int16)  # (x, y, z)
    image = sitk.GetImageFromArray(data.T)
    direction = (
        np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]) @ make_affine("oblique")[:3, :3]
    )
    direction /= np.linalg.norm(direction, axis=0)
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetMetaData("PatientName", "Doe^Peter")
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array[0], data)
    np.testing.assert_allclose(volume.geometry.direction_lps, direction, atol=1e-6)
    np.testing.assert_allclose(volume.geometry.origin_lps, (10.0, -20.0, 30.0), atol=1e-6)
    np.testing.assert_allclose(volume.geometry.spacing, (0.8, 1.1, 2.5), atol=1e-6)
    # ITK's physical point of a voxel and ours agree (LPS -> RAS flips x and y)
    lps = np.array(image.TransformIndexToPhysicalPoint((5, 4, 3)))
    np.testing.assert_allclose(volume.geometry.voxel_to_world([5, 4, 3]), lps * [-1, -1, 1], atol=1e-5)
    assert "Doe^Peter" not in repr(volume.meta)


def write_detached(folder, suffix, data_file):
    """A small .mhd/.nhdr written by SimpleITK, its header then pointed at ``data_file``; returns the header."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    header = folder / f"scan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(data), str(header))
    raw = folder / "scan.raw"
    key = "ElementDataFile = " if suffix == ".mhd" else "data file: "
    text = header.read_text()
    assert f"{key}scan.raw" in text
    header.write_text(text.replace(f"{key}scan.raw", f"{key}{data_file}"))
    return header, raw


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_detached_data_file_outside_the_header_folder_is_refused(tmp_path, suffix):
    header, raw = write_detached(tmp_path / "case", suffix, "../outside_secret.raw")
    raw.rename(tmp_path / "outside_secret.raw")
    refused(
        header,
        ScanReadError,
        rf"scan{re.escape(suffix)}: the header's data file '\.\./outside_secret\.raw' resolves to .*outside_secret\.raw, "
        r"outside .*case; detached data files must stay beside their header",
    )
    # inside a wider root (a dataset's), the same file is allowed and read
    volume = read_volume(header, data_root=tmp_path)
    np.testing.assert_array_equal(volume.array[0], np.arange(24, dtype=np.int16).reshape(2, 3, 4).T)


def test_detached_data_file_beside_the_header_is_read(tmp_path):
    header, _ = write_detached(tmp_path / "case", ".mhd", "scan.raw")
    assert read_volume(header).geometry.shape == (4, 3, 2)


@pytest.mark.parametrize(
    ("value", "bad"),
    [
        ("LIST 2D\nscan.raw\n../../etc/passwd", "../../etc/passwd"),
        ("../slice%d.raw 1 2 1", "../slice1.raw"),
    ],
)
def test_every_name_of_a_list_or_pattern_data_file_is_checked(tmp_path, value, bad):
    header, _ = write_detached(tmp_path / "case", ".mhd", value)
    refused(header, ScanReadError, rf"the header's data file '{re.escape(bad)}' resolves to .*, outside")


def test_absolute_and_symlinked_data_files_are_refused(tmp_path):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"\0" * 48)
    header, raw = write_detached(tmp_path / "abs", ".nhdr", str(secret))
    refused(header, ScanReadError, r"data file '.*secret\.raw' resolves to .*secret\.raw, outside")
    header, raw = write_detached(tmp_path / "link", ".mhd", "scan.raw")
    raw.unlink()
    raw.symlink_to(secret)
    refused(header, ScanReadError, r"data file 'scan\.raw' resolves to .*secret\.raw, outside .*link")


def test_vector_pixel_mha_is_refused(tmp_path):
    image = sitk.Image([4, 4, 3], sitk.sitkVectorUInt8, 3)
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(image, str(path))
    refused(path, ScanReadError, r"rgb\.mha: 3 values per voxel \(vector/RGB pixels\) are not supported")


def test_no_warnings_for_a_clean_file(small):
    path, _ = small
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_volume(path)


def test_nifti2_is_read(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.Nifti2Image(data, make_affine("LPS")).to_filename(tmp_path / "two.nii.gz")
    volume = read_volume(tmp_path / "two.nii.gz")
    np.testing.assert_array_equal(volume.array[0], data)
    np.testing.assert_allclose(volume.geometry.affine, make_affine("LPS"), atol=1e-6)
