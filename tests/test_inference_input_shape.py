"""Scans whose channels or voxel type do not fit the model are refused with the found and the expected shape."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_affine
from inference_support import make_plan, save_model

from medseg.cli import main
from medseg.errors import ScanReadError
from medseg.inference.segmenter import Segmenter

SHAPE = (18, 16, 10)


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, make_affine("RAS")), path)
    return path


def _grey(channels: int | None = None) -> np.ndarray:
    image = np.zeros(SHAPE, dtype=np.int16)
    image[4:12, 4:12, 2:8] = 800
    return image if channels is None else np.stack([image] * channels, axis=-1)


def _rgb() -> np.ndarray:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"][4:12, 4:12, 2:8] = 200
    return rgb


@pytest.fixture
def ct_model(tmp_path):
    return save_model(tmp_path / "model", make_plan())


def test_4d_scan_to_a_one_channel_model_names_found_and_expected_shape(tmp_path, ct_model):
    scan = _nifti(tmp_path / "scan.nii.gz", _grey(channels=2))
    seg = Segmenter.load(ct_model, device="cpu")
    with pytest.raises(
        ScanReadError,
        match=r"^scan\.nii\.gz: found \(18, 16, 10, 2\) with 2 channels; the model expects 1 channel \(CT\) of 3D volumes\. "
        r".*split a time series",
    ):
        seg.predict(scan)


def test_one_channel_scan_to_a_two_channel_model_names_both(tmp_path):
    model = save_model(tmp_path / "model", make_plan(image_channels=2))
    scan = _nifti(tmp_path / "t1.nii.gz", _grey())
    with pytest.raises(
        ScanReadError, match=r"^t1\.nii\.gz: found \(18, 16, 10\) with 1 channel; the model expects 2 channels \(CT, CT\) of 3D"
    ):
        Segmenter.load(model, device="cpu").predict(scan)


def test_rgb_nifti_names_its_shape_and_colour_voxels(tmp_path, ct_model):
    scan = _nifti(tmp_path / "photo.nii.gz", _rgb())
    with pytest.raises(
        ScanReadError,
        match=r"photo\.nii\.gz: voxel type .* is not supported \(RGB, complex or structured\): found \(18, 16, 10\) "
        r"with RGB voxels \(3 colour values each\)\. Expected one grey value per voxel and channel",
    ):
        Segmenter.load(ct_model, device="cpu").predict(scan)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_grey(channels=2), r"scan\.nii\.gz: found \(18, 16, 10, 2\) with 2 channels; the model expects 1 channel \(CT\) of 3D volumes"),
        (_rgb(), r"scan\.nii\.gz: voxel type .*: found \(18, 16, 10\) with RGB voxels"),
    ],
    ids=["4d", "rgb"],
)
def test_cli_refuses_4d_and_rgb_scans_in_one_line_with_nothing_written(tmp_path, ct_model, capsys, data, expected):
    scan = _nifti(tmp_path / "scan.nii.gz", data)
    assert main(["infer", str(scan), "-m", str(ct_model), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(expected, err[0]), err[0]
    assert not (tmp_path / "out").exists()
