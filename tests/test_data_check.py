"""`medseg check`: every problem found at once, with the case and both files named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data import check_dataset, scan_dataset
from medseg.data.synthetic import write_synthetic_dataset
from medseg.errors import DatasetError


def _rewrite(path, *, array=None, affine=None, dtype=None):
    img = nib.load(path)
    data = np.asanyarray(img.dataobj) if array is None else array
    if dtype is not None:
        data = data.astype(dtype)
    out = nib.Nifti1Image(data, img.affine if affine is None else affine)
    out.set_qform(out.affine, code=1)
    out.set_sform(out.affine, code=1)
    nib.save(out, path)


@pytest.fixture
def dataset(tmp_path):
    return write_synthetic_dataset(tmp_path / "ds", layout="nnunet", num_cases=10, kind="ct", shape=(24, 20, 16))


def test_clean_dataset_has_no_problems(dataset):
    report = check_dataset(scan_dataset(dataset))
    assert report.ok and report.cases_checked == 10
    assert report.summary().startswith("no problems in")
    report.raise_if_problems()  # does not raise


def test_every_problem_is_reported_at_once(dataset):
    lab, img = dataset / "labelsTr", dataset / "imagesTr"
    (lab / "phantom_000.nii.gz").unlink()  # missing file
    label = np.asanyarray(nib.load(lab / "phantom_001.nii.gz").dataobj)
    _rewrite(lab / "phantom_001.nii.gz", array=label[:, :, :-1])  # shape mismatch
    image_shape = label.shape
    affine = nib.load(lab / "phantom_002.nii.gz").affine.copy()
    affine[:3, 3] += [1.5, 0.0, 2.0]
    _rewrite(lab / "phantom_002.nii.gz", affine=affine)  # origin shifted 2.5 mm
    bad = np.asanyarray(nib.load(lab / "phantom_003.nii.gz").dataobj).copy()
    bad[0, 0, 0] = 7
    _rewrite(lab / "phantom_003.nii.gz", array=bad)  # undeclared value
    frac = np.asanyarray(nib.load(lab / "phantom_004.nii.gz").dataobj).astype(np.float32)
    frac[0, 0, 0] = 0.5
    _rewrite(lab / "phantom_004.nii.gz", array=frac)  # non-integer
    nan = np.asanyarray(nib.load(img / "phantom_005_0000.nii.gz").dataobj).astype(np.float32)
    nan[1, 2, 3] = np.inf
    _rewrite(img / "phantom_005_0000.nii.gz", array=nan)  # Inf voxel
    shutil.copy(img / "phantom_006_0000.nii.gz", img / "phantom_006_0001.nii.gz")  # 2 channels, 1 declared
    empty = np.zeros_like(np.asanyarray(nib.load(lab / "phantom_007.nii.gz").dataobj))
    _rewrite(lab / "phantom_007.nii.gz", array=empty)  # empty label (warning)

    report = check_dataset(scan_dataset(dataset))
    messages = {p.case_id: p.format() for p in report.problems}
    assert len(report.problems) == 7, report.format()
    assert "label file labelsTr/phantom_000.nii.gz does not exist" in messages["phantom_000"]
    short = (*image_shape[:2], image_shape[2] - 1)
    assert f"label shape {short} != image shape {image_shape}" in messages["phantom_001"]
    assert "image: imagesTr/phantom_001_0000.nii.gz   label: labelsTr/phantom_001.nii.gz" in messages["phantom_001"]
    assert "2.5 mm apart" in messages["phantom_002"] and "origin" in messages["phantom_002"]
    assert "label values {7} not in dataset.json labels {0, 1, 2}" in messages["phantom_003"]
    assert "non-integer values 0.5" in messages["phantom_004"]
    assert "NaN or Inf" in messages["phantom_005"] and "phantom_005_0000.nii.gz" in messages["phantom_005"]
    assert "image has 2 channel(s) but dataset.json declares 1 (CT)" in messages["phantom_006"]
    assert [w.case_id for w in report.warnings] == ["phantom_007"]
    assert "label is empty (background only)" in report.warnings[0].message
    with pytest.raises(DatasetError, match=r"^7 problems in .*ds \(checked 10 cases\): run `medseg check .*ds` to list them"):
        report.raise_if_problems()


def test_duplicate_case_ids_and_too_few_cases_for_folds(tmp_path):
    root = write_synthetic_dataset(tmp_path / "msd", layout="msd", num_cases=2, kind="ct", shape=(20, 20, 12))
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append(dict(meta["training"][0]))
    (root / "dataset.json").write_text(json.dumps(meta))
    report = check_dataset(scan_dataset(root), num_folds=5)
    text = report.format()
    assert "case 'phantom_000': case id appears 2 times" in text
    assert not report.ok  # the duplicate id is a problem
    warnings = [w.message for w in report.warnings]
    assert any("2 case(s) but 5 cross-validation folds: splits fall back to leave-one-out" in w for w in warnings)
    assert any("set data.num_folds=2" in w for w in warnings)


def test_classes_never_present_are_a_warning(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", layout="msd", num_cases=2, kind="ct", shape=(20, 20, 12),
                                   num_tumours=0)
    report = check_dataset(scan_dataset(root), num_folds=2)
    assert report.ok
    assert [w.message for w in report.warnings] == ["class 2 (tumour) never occurs in any label file"]


def test_cli_exit_codes_and_listing(dataset, capsys):
    assert main(["check", str(dataset)]) == 0
    assert "no problems" in capsys.readouterr().out
    (dataset / "labelsTr" / "phantom_003.nii.gz").unlink()
    assert main(["check", str(dataset), "--folds", "3"]) == 2
    out = capsys.readouterr().out
    assert "1 problem in" in out and "labelsTr/phantom_003.nii.gz does not exist" in out


def test_cli_refuses_an_escaping_path_with_exit_2(tmp_path, capsys):
    root = write_synthetic_dataset(tmp_path / "evil", layout="msd", num_cases=1, kind="ct", shape=(16, 16, 8))
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["label"] = "../../../../etc/passwd"
    (root / "dataset.json").write_text(json.dumps(meta))
    assert main(["check", str(root)]) == 2
    assert "outside the dataset root" in capsys.readouterr().out


def test_path_escape_is_listed_together_with_the_per_case_problems(tmp_path, capsys):
    root = write_synthetic_dataset(tmp_path / "mixed", layout="msd", num_cases=3, kind="ct", shape=(16, 16, 8))
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["label"] = "../../../../etc/passwd"  # structural: leaves the root
    (root / "dataset.json").write_text(json.dumps(meta))
    lab = root / "labelsTr"
    label = np.asanyarray(nib.load(lab / "phantom_001.nii.gz").dataobj)
    _rewrite(lab / "phantom_001.nii.gz", array=label[:, :, :-1])  # shape mismatch
    bad = np.asanyarray(nib.load(lab / "phantom_002.nii.gz").dataobj).copy()
    bad[0, 0, 0] = 9
    _rewrite(lab / "phantom_002.nii.gz", array=bad)  # undeclared label value

    with pytest.raises(DatasetError, match=r"training\[0\]: path '\.\./\.\./\.\./\.\./etc/passwd' resolves"):
        scan_dataset(root)  # training stops at once
    report = check_dataset(scan_dataset(root, collect_problems=True), num_folds=None)
    assert [p.case_id for p in report.problems] == [None, "phantom_001", "phantom_002"], report.format()
    assert main(["check", str(root), "--folds", "1"]) == 2
    out = capsys.readouterr().out
    assert "3 problems in" in out
    assert "dataset.json: training[0]: path '../../../../etc/passwd' resolves to" in out
    assert "outside the dataset root" in out
    shape = label.shape
    assert f"case 'phantom_001': label shape {(*shape[:2], shape[2] - 1)} != image shape {shape}" in out
    assert "case 'phantom_002': label values {9} not in dataset.json labels" in out


def test_real_ct_laid_out_as_a_dataset_passes_check(tmp_path, shared_data):
    root = tmp_path / "RealCT"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(shared_data / "ct_organs" / "ct.nii.gz", root / "images" / "s0011.nii.gz")
    shutil.copy(shared_data / "ct_organs" / "organs.nii.gz", root / "labels" / "s0011.nii.gz")
    names = json.loads((shared_data / "ct_organs" / "label_names.json").read_text())["total"]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", **names}, "channel_names": {"0": "CT"}}))
    index = scan_dataset(root)
    assert index.layout == "plain" and len(index.label_values) == 118
    report = check_dataset(index, num_folds=1)
    assert report.ok, report.format()
    assert len(report.observed_label_values) == 42
    assert len(report.warnings) == 118 - 42  # declared classes absent from the one case


def test_console_script_runs_check(dataset):
    result = subprocess.run([sys.executable, "-m", "medseg", "check", str(dataset), "--folds", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "nnunet layout, 10 training case(s)" in result.stdout


def test_real_ct_without_metadata_is_planned_as_ct(tmp_path, shared_data):
    from medseg.data import compute_fingerprint, make_plan

    root = tmp_path / "RealCT"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(shared_data / "ct_organs" / "ct.nii.gz", root / "images" / "s0011.nii.gz")
    shutil.copy(shared_data / "ct_organs" / "organs.nii.gz", root / "labels" / "s0011.nii.gz")
    fingerprint = compute_fingerprint(scan_dataset(root))
    assert fingerprint.modality == "CT" and fingerprint.modality_inferred
    assert fingerprint.spacings == [[3.0, 3.0, 3.0]] and fingerprint.shapes == [[122, 101, 30]]
    assert len(fingerprint.label_values) == 42
    pancreas = fingerprint.label_values.index(7)
    assert fingerprint.class_voxels[0][pancreas] == 644
    plan = make_plan(fingerprint)
    assert plan.normalization[0].scheme == "ct" and plan.target_spacing == [3.0, 3.0, 3.0]
    # the default (uniform) centres the 644-voxel pancreas as often as the 38,634-voxel liver
    assert plan.class_sampling_ratios[pancreas] == pytest.approx(plan.class_sampling_ratios[fingerprint.label_values.index(5)])


def test_ignore_label_value_is_accepted_only_when_named(dataset):
    label_path = dataset / "labelsTr" / "phantom_000.nii.gz"
    label = np.asanyarray(nib.load(label_path).dataobj).copy()
    label[:2] = 255  # unlabeled voxels, not declared in dataset.json
    _rewrite(label_path, array=label)
    report = check_dataset(scan_dataset(dataset))
    assert not report.ok
    assert "label values {255} not in dataset.json labels" in report.format()
    assert "set loss.ignore_label (medseg check --ignore-label)" in report.format()
    assert check_dataset(scan_dataset(dataset), ignore_label=255).ok
    assert main(["check", str(dataset), "--ignore-label", "255"]) == 0
