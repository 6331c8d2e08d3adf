"""`medseg infer` and `medseg export` on the command line: same masks as the API, clean refusals."""

from __future__ import annotations

import dataclasses
import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_affine, sha256, sphere_mask
from inference_support import make_plan, one_error_line, save_model

from medseg.cli import main
from medseg.inference.segmenter import Segmenter

SHAPE = (26, 22, 14)


def _scan(path: Path, kind: str = "PIR", channels: int = 1) -> Path:
    image = np.zeros(SHAPE, dtype=np.int16)
    image[1:25, 1:21, 1:13] = 30
    image[sphere_mask(SHAPE, center=(12, 10, 6), radius=5.0, spacing=(0.8, 1.1, 2.5))] = 800
    data = image if channels == 1 else np.stack([image] * channels, axis=-1)
    nib.save(nib.Nifti1Image(data, make_affine(kind)), path)
    return path


@pytest.fixture
def model(tmp_path):
    return save_model(tmp_path / "model", make_plan(target_spacing=(1.2, 1.2, 2.5)))


def test_cli_and_python_api_give_identical_masks(tmp_path, model):
    scan = _scan(tmp_path / "case_7.nii.gz")
    assert main(["infer", str(scan), "-m", str(model), "-o", str(tmp_path / "out"), "--postprocess", "largest"]) == 0
    written = tmp_path / "out" / "case_7_mask.nii.gz"
    api = Segmenter.load(model, device="cpu", postprocess="largest").predict(scan)
    np.testing.assert_array_equal(np.asarray(nib.load(written).dataobj), api.mask)
    assert (tmp_path / "out" / "case_7_provenance.json").is_file()


def test_folder_of_scans_gives_one_mask_per_case(tmp_path, model):
    (tmp_path / "scans").mkdir()
    _scan(tmp_path / "scans" / "a.nii.gz", "RAS")
    _scan(tmp_path / "scans" / "b.nii.gz", "oblique")
    assert main(["infer", str(tmp_path / "scans"), "-m", str(model), "-o", str(tmp_path / "out"), "--stats"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"{c}_{k}" for c in "ab" for k in ("mask.nii.gz", "provenance.json", "stats.csv", "stats.json")] + [
        "infer_manifest.csv", "infer_manifest.json",
    ]
    for case in "ab":
        mask, scan = nib.load(tmp_path / "out" / f"{case}_mask.nii.gz"), nib.load(tmp_path / "scans" / f"{case}.nii.gz")
        assert mask.shape == scan.shape
        np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-4)


def test_dicom_folder_is_named_after_the_folder(shared_data, tmp_path):
    plan = make_plan(target_spacing=(4.0, 4.0, 4.0), patch_size=(32, 32, 8))
    model = save_model(tmp_path / "m", plan, options={"threshold": -3.0})
    assert main(["infer", str(shared_data / "ct_dicom_series"), "-m", str(model), "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ct_dicom_series_mask.nii.gz", "ct_dicom_series_provenance.json", "infer_manifest.csv", "infer_manifest.json",
    ]
    assert nib.load(tmp_path / "out" / "ct_dicom_series_mask.nii.gz").shape == (512, 512, 20)


def test_single_output_file_name_and_default_output_folder(tmp_path, model, monkeypatch):
    scan = _scan(tmp_path / "scan.nii.gz")
    assert main(["infer", str(scan), "-m", str(model), "-o", str(tmp_path / "liver.nii.gz")]) == 0
    assert (tmp_path / "liver.nii.gz").is_file() and (tmp_path / "liver_provenance.json").is_file()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["infer", str(scan), "-m", str(model)]) == 0
    assert (work / "scan_mask.nii.gz").is_file()


def test_newest_run_is_used_without_model_flag(tmp_path, monkeypatch, capsys):
    scan = _scan(tmp_path / "scan.nii.gz")
    monkeypatch.chdir(tmp_path)
    assert main(["infer", str(scan), "-o", "out"]) == 2
    assert "Pass one with -m" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    save_model(tmp_path / "runs" / "r1" / "fold_0" / "model", make_plan(target_spacing=(1.2, 1.2, 2.5)))
    assert main(["infer", str(scan), "-o", "out"]) == 0
    assert (tmp_path / "out" / "scan_mask.nii.gz").is_file()


def test_2d_scan_to_3d_model_exits_2_with_nothing_written(tmp_path, model, capsys):
    nib.save(nib.Nifti1Image(np.zeros((30, 20), dtype=np.int16), np.eye(4)), tmp_path / "slice.nii.gz")
    assert main(["infer", str(tmp_path / "slice.nii.gz"), "-m", str(model), "-o", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert line.startswith("medseg infer: GeometryError: slice.nii.gz is 2D (30, 20) but the model expects 3D")
    assert not (tmp_path / "out").exists()


def test_wrong_channel_count_exits_2_with_nothing_written(tmp_path, model, capsys):
    scan = _scan(tmp_path / "two.nii.gz", channels=2)
    assert main(["infer", str(scan), "-m", str(model), "-o", str(tmp_path / "out")]) == 2
    assert "two.nii.gz: found (26, 22, 14, 2) with 2 channels; the model expects 1 channel (CT)" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_unreadable_scan_exits_2_with_nothing_written(tmp_path, model, capsys):
    good = _scan(tmp_path / "good.nii.gz")
    data = good.read_bytes()
    (tmp_path / "bad.nii.gz").write_bytes(data[: len(data) // 2])
    assert main(["infer", str(tmp_path / "bad.nii.gz"), "-m", str(model), "-o", str(tmp_path / "out")]) == 2
    assert "medseg infer: ScanReadError: " in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    assert main(["infer", str(tmp_path / "empty"), "-m", str(model)]) == 2
    assert "is empty" in one_error_line(capsys)


def test_existing_output_needs_overwrite_and_inputs_are_never_replaced(tmp_path, model, capsys):
    scan = _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan_mask.nii.gz").write_bytes(b"keep me")
    before = sha256(scan)
    assert main(["infer", str(scan), "-m", str(model), "-o", str(out)]) == 2
    assert "exists; pass --overwrite" in one_error_line(capsys)
    assert (out / "scan_mask.nii.gz").read_bytes() == b"keep me"
    assert sorted(os.listdir(out)) == ["scan_mask.nii.gz"]
    assert main(["infer", str(scan), "-m", str(model), "-o", str(scan), "--overwrite"]) == 2
    assert "would write onto the input" in one_error_line(capsys)
    assert sha256(scan) == before
    assert main(["infer", str(scan), "-m", str(model), "-o", str(out), "--overwrite"]) == 0
    assert nib.load(out / "scan_mask.nii.gz").shape == SHAPE


def test_bad_flags_are_refused_before_any_work(tmp_path, model, capsys):
    scan = _scan(tmp_path / "scan.nii.gz")
    assert main(["infer", str(scan), "-m", str(model), "--postprocess", "biggest", "-o", str(tmp_path / "o")]) == 2
    assert "postprocess 'biggest' is not valid" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["infer", str(scan), "-m", str(model), "--overlap", "1.5"])
    assert exit_info.value.code == 2
    assert "overlap must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_states_the_cpu_tta_trade_off(capsys):
    with pytest.raises(SystemExit, match=r"^0$"):  # argparse exits 0 after printing help
        main(["infer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "8x slower in 3D" in text and "off on the CPU" in text


def test_console_script_runs_a_real_unet_in_a_subprocess(tmp_path):
    plan = dataclasses.replace(
        make_plan(target_spacing=(1.2, 1.2, 2.5)), kernel_sizes=[[3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [2, 2, 2]]
    )
    model = save_model(tmp_path / "unet", plan, name="unet", options={"base_features": 4})
    scan = _scan(tmp_path / "scan.nii.gz", "oblique")
    script = Path(sys.executable).with_name("medseg")
    result = subprocess.run(
        [str(script), "infer", str(scan), "-m", str(model), "-o", str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out" / "scan_mask.nii.gz")
    mask = nib.load(tmp_path / "out" / "scan_mask.nii.gz")
    assert mask.shape == SHAPE
    np.testing.assert_allclose(mask.affine, nib.load(scan).affine, atol=1e-4)
    api = Segmenter.load(model, device="cpu").predict(scan).mask
    np.testing.assert_array_equal(np.asarray(mask.dataobj), api)


def test_truncated_gzip_is_not_silently_read(tmp_path):
    # guard for the test above: the half file really is a broken gzip stream
    good = _scan(tmp_path / "good.nii.gz")
    data = good.read_bytes()
    with pytest.raises(EOFError, match="end-of-stream"):
        gzip.decompress(data[: len(data) // 2])


def test_output_folder_under_a_file_is_one_clear_line_before_any_work(tmp_path, model, capsys):
    scan = _scan(tmp_path / "good.nii.gz")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["infer", str(scan), "-m", str(model), "-o", str(blocker / "out")]) == 2
    assert "a_file is a file, not a folder" in one_error_line(capsys)
