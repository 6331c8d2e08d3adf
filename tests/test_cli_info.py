"""`medseg info`: in process, as a real console script, and the lazy-torch promise of the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from conftest import make_affine

from medseg.cli import main

MEDSEG = Path(sys.executable).parent / "medseg"


def test_info_on_nifti_prints_geometry_and_intensities(shared_data, capsys):
    assert main(["info", str(shared_data / "ct_organs" / "ct.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "shape:        (122, 101, 30) (3D), 1 channel(s)" in out
    assert "spacing:      (3, 3, 3) mm" in out
    assert "orientation:  RAS" in out
    assert "origin RAS:   (-177.956, 11.319, 94.3018) mm" in out
    assert "origin LPS:   (177.956, -11.319, 94.3018) mm" in out
    assert "data type:    int16" in out
    assert "intensities: min -1100, max 1207, mean" in out
    assert "nifti codes:  qform_code 0, sform_code 2" in out


def test_info_on_a_dicom_folder_lists_the_series(shared_data, capsys):
    assert main(["info", str(shared_data / "ct_dicom_series")]) == 0
    out = capsys.readouterr().out
    assert "1 DICOM series" in out
    assert "uid (empty)  modality CT  20 slice(s)  description 'CT Body 3.0'" in out
    assert "shape:        (512, 512, 20) (3D), 1 channel(s)" in out
    assert "origin LPS:   (-249.512, -437.512, -804.5) mm" in out
    assert "nifti codes" not in out


def test_info_on_several_series_asks_for_a_uid(shared_data, tmp_path, capsys):
    for i, file in enumerate(sorted((shared_data / "ct_dicom_series").iterdir())[:4]):
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID = f"1.2.3.{i % 2}"
        ds.save_as(tmp_path / file.name)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 DICOM series" in out and "Pass --series-uid UID" in out and "shape:" not in out
    assert main(["info", str(tmp_path), "--series-uid", "1.2.3.1"]) == 0
    assert "shape:        (512, 512, 2) (3D)" in capsys.readouterr().out


def test_info_on_multichannel_shows_each_channel(tmp_path, capsys):
    data = np.stack([np.zeros((4, 3, 2)), np.full((4, 3, 2), 7.0)], axis=-1).astype(np.float32)
    nib.Nifti1Image(data, make_affine("LPS")).to_filename(tmp_path / "mr.nii.gz")
    assert main(["info", str(tmp_path / "mr.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "2 channel(s)" in out and "orientation:  LPS" in out
    assert "channel 1:    min 7, max 7, mean 7" in out


def test_bad_file_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"")
    assert main(["info", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert (
        captured.err.startswith("medseg info: ScanReadError: ")
        and "bad.nii.gz is empty (0 bytes)" in captured.err
    )


def test_console_script_runs_info(shared_data, tmp_path):
    target = tmp_path / "Patiënt scan ü 1.nii.gz"
    shutil.copy(shared_data / "ct_organs" / "ct.nii.gz", target)
    result = subprocess.run([str(MEDSEG), "info", str(target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "shape:        (122, 101, 30)" in result.stdout and str(target) in result.stdout


def test_version_help_and_info_help_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from medseg.cli import main\n"
        "for argv in (['--version'], ['--help'], ['info', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "heavy = [m for m in ('torch', 'monai') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
