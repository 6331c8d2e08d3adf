"""`--anonymize`: no output name, sidecar or report reveals the input's name (often a patient's) or path.

Inputs are named like patients ("Doe_John_12345"). Every output file is searched
byte by byte for the name parts and for the test's folder path: JSON, CSV and PNG
whole, NIfTI in its gzip header (no stored file name) and its decompressed
header and extensions (the voxels are not text).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_affine, sphere_mask
from inference_support import make_plan, save_model

import medseg
from medseg.cli import main
from medseg.errors import ConfigError
from medseg.inference.provenance import anonymous_case_name
from medseg.inference.segmenter import Segmenter

SHAPE = (26, 22, 14)
PATIENT = "Doe_John_12345"
GZIP_FNAME, GZIP_FCOMMENT = 0x08, 0x10


def _scan(path: Path, radius: float = 5.0) -> Path:
    image = np.zeros(SHAPE, dtype=np.int16)
    image[1:25, 1:21, 1:13] = 30
    image[sphere_mask(SHAPE, center=(12, 10, 6), radius=radius, spacing=(0.8, 1.1, 2.5))] = 800
    nib.save(nib.Nifti1Image(image, make_affine("PIR")), path)
    return path


def _content_name(path: Path) -> str:
    return "case_" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _searchable_bytes(path: Path) -> bytes:
    """What of a file could carry text: all of it, or for NIfTI the gzip header and the NIfTI header."""
    data = path.read_bytes()
    if path.name.endswith(".nii.gz"):
        assert data[:2] == b"\x1f\x8b" and not data[3] & (GZIP_FNAME | GZIP_FCOMMENT), path
        raw = gzip.decompress(data)
        with gzip.open(path) as f:
            offset = int(nib.Nifti1Header.from_fileobj(f).get_data_offset())
        return data[:10] + raw[:offset]
    return data


def _assert_nothing_identifying(folder: Path, tmp_path: Path) -> list[str]:
    needles = [b"Doe", b"John", b"12345", str(tmp_path).encode(), tmp_path.name.encode()]
    names = sorted(p.name for p in folder.iterdir())
    assert names
    for path in folder.iterdir():
        content = _searchable_bytes(path)
        for needle in needles:
            assert needle not in path.name.encode(), (path.name, needle)
            assert needle not in content, (path.name, needle)
    return names


@pytest.fixture
def model(tmp_path):
    return save_model(tmp_path / "model", make_plan(target_spacing=(1.2, 1.2, 2.5)))


def test_infer_anonymize_names_outputs_by_content_hash_and_leaks_no_name_or_path(tmp_path, model):
    scans = tmp_path / f"{PATIENT}_scans"
    scans.mkdir()
    first = _scan(scans / f"{PATIENT}.nii.gz")
    second = _scan(scans / "Roe_Jane_67890.nii.gz", radius=4.0)
    runs = []
    for out in ("out1", "out2"):
        args = ["infer", str(scans), "-m", str(model), "-o", str(tmp_path / out), "--anonymize"]
        assert main([*args, "--stats", "--preview", "--probs"]) == 0
        runs.append(_assert_nothing_identifying(tmp_path / out, tmp_path))
    assert runs[0] == runs[1]  # stable across runs
    expected = sorted(
        f"{_content_name(scan)}_{kind}"
        for scan in (first, second)
        for kind in ("mask.nii.gz", "probs.nii.gz", "provenance.json", "stats.json", "stats.csv", "preview.png")
    )
    assert runs[0] == [*expected, "infer_manifest.csv", "infer_manifest.json"]  # the manifest holds no path either
    assert anonymous_case_name(first) == _content_name(first)
    provenance = (tmp_path / "out1" / f"{_content_name(first)}_provenance.json").read_text()
    assert '"path": null' in provenance and '"anonymized": true' in provenance
    assert hashlib.sha256(first.read_bytes()).hexdigest() in provenance  # still traceable by content


def test_without_anonymize_the_patient_name_is_in_the_outputs(tmp_path, model):
    # guard for the test above: the needles are found when nothing is anonymized
    scan = _scan(tmp_path / f"{PATIENT}.nii.gz")
    assert main(["infer", str(scan), "-m", str(model), "-o", str(tmp_path / "out"), "--stats"]) == 0
    with pytest.raises(AssertionError, match="Doe"):
        _assert_nothing_identifying(tmp_path / "out", tmp_path)
    assert PATIENT in (tmp_path / "out" / f"{PATIENT}_provenance.json").read_text()


def test_dicom_folder_named_after_the_patient_is_anonymized(shared_data, tmp_path):
    folder = tmp_path / PATIENT
    shutil.copytree(shared_data / "ct_dicom_series", folder)
    plan = make_plan(target_spacing=(4.0, 4.0, 4.0), patch_size=(32, 32, 8))
    model = save_model(tmp_path / "m", plan, options={"threshold": -3.0})
    assert main(["infer", str(folder), "-m", str(model), "-o", str(tmp_path / "out"), "--anonymize"]) == 0
    names = _assert_nothing_identifying(tmp_path / "out", tmp_path)
    name = anonymous_case_name(folder)
    assert names == [f"{name}_mask.nii.gz", f"{name}_provenance.json", *["infer_manifest.csv", "infer_manifest.json"]]


def test_python_api_replaces_given_names_and_refuses_identical_content(tmp_path, model):
    scan = _scan(tmp_path / f"{PATIENT}.nii.gz")
    seg = Segmenter.load(model, device="cpu")
    written = seg.predict_many([(scan, PATIENT)], tmp_path / "out", statistics=True, anonymize=True)[0]
    assert written["mask"].name == f"{_content_name(scan)}_mask.nii.gz"
    _assert_nothing_identifying(tmp_path / "out", tmp_path)
    copy = tmp_path / "copy_of_scan.nii.gz"
    shutil.copyfile(scan, copy)
    with pytest.raises(ConfigError, match=r"have identical content .*anonymous case name 'case_"):
        seg.predict_many([scan, copy], tmp_path / "out2", anonymize=True)
    assert not (tmp_path / "out2").exists()


def _mask(path: Path, center, radius: float) -> Path:
    mask = sphere_mask(SHAPE, center=center, radius=radius, spacing=(0.8, 1.1, 2.5)).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, make_affine("PIR")), path)
    return path


def test_evaluate_anonymize_writes_reports_without_names_or_paths(tmp_path):
    preds, labels = tmp_path / f"{PATIENT}_preds", tmp_path / f"{PATIENT}_labels"
    preds.mkdir()
    labels.mkdir()
    for name, shift in ((PATIENT, 0), ("Roe_Jane_67890", 2)):
        _mask(preds / f"{name}.nii.gz", (12 + shift, 10, 6), 5.0)
        _mask(labels / f"{name}.nii.gz", (12, 10, 6), 5.0 + shift / 2)
    _mask(preds / "Poe_Edgar_55555.nii.gz", (10, 10, 6), 3.0)  # a prediction without reference
    runs = []
    for out in ("eval1", "eval2"):
        args = ["evaluate", str(preds), str(labels), "-o", str(tmp_path / out), "--lesion", "--anonymize"]
        with pytest.warns(UserWarning, match=r"have no reference and are not scored: 'case_[0-9a-f]{12}'"):
            assert main([*args, "--metrics", "dice,hd95", "--workers", "0"]) == 0
        runs.append((tmp_path / out / "metrics_per_case.csv").read_text())
        assert _assert_nothing_identifying(tmp_path / out, tmp_path) == [
            "lesions.csv", "metrics_per_case.csv", "metrics_summary.json",
        ]
    assert runs[0] == runs[1]  # stable across runs
    expected = {anonymous_case_name(labels / f"{n}.nii.gz") for n in (PATIENT, "Roe_Jane_67890")}
    assert expected == {_content_name(labels / f"{n}.nii.gz") for n in (PATIENT, "Roe_Jane_67890")}
    with pytest.warns(UserWarning, match="not scored: 'case_"):
        report = medseg.evaluate(preds, labels, metrics="dice", anonymize=True, num_workers=0)
    assert {c.name for c in report.cases} == expected
    assert report.predictions_without_reference == [_content_name(preds / "Poe_Edgar_55555.nii.gz")]
    summary = report.to_dict()
    assert summary["settings"]["prediction"] is None and summary["settings"]["anonymized"] is True
    assert all(c["reference"] is None and c["prediction"] is None for c in summary["cases"].values())
