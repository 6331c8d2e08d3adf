"""`medseg demo`: the README's first command, end to end on synthetic data (short schedule)."""

import json

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.errors import OutputExistsError


@pytest.mark.slow
def test_demo_trains_segments_and_evaluates(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--max-epochs", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for line in ("medseg demo finished", "model", "mask", "preview", "report", "organ", "tumour", "Next:"):
        assert line in printed
    mask = nib.load(out / "prediction" / "phantom_test_mask.nii.gz")
    scan = nib.load(out / "held_out" / "phantom_test.nii.gz")
    assert mask.shape == scan.shape
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-4)
    assert (out / "prediction" / "phantom_test_preview.png").stat().st_size > 1000
    summary = json.loads((out / "report" / "metrics_summary.json").read_text())
    assert set(summary["summary"]) >= {"organ", "tumour"}
    assert (out / "run" / "fold_0" / "model" / "model.json").is_file()
    # a second run replaces the previous demo folder instead of refusing it
    assert main(["demo", "-o", str(out), "--max-epochs", "1", "--device", "cpu"]) == 0


def test_demo_never_replaces_a_folder_it_did_not_create(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    from medseg.demo import run_demo

    with pytest.raises(OutputExistsError, match="is not a previous medseg demo folder"):
        run_demo(out)
    assert main(["demo", "-o", str(out)]) == 2
    assert "is not a previous medseg demo folder" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "user data"


def test_demo_output_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", "-o", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
