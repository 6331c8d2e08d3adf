"""Cohort inference: channel files, failures that do not stop a run, --continue, the manifest, parts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_affine, sphere_mask
from inference_support import make_plan, save_model

from medseg.cli import main
from medseg.errors import ScanReadError
from medseg.inference.jobs import CohortCase, collect_cases, select_part, series_tag
from medseg.inference.segmenter import Segmenter

SHAPE = (26, 22, 14)


def _image(radius: float = 5.0, *, air: bool = True, center=(12, 10, 6)) -> np.ndarray:
    """A CT-like scan: air (-1000 HU) around a body (30 HU) holding a bright sphere (800 HU)."""
    image = np.full(SHAPE, -1000 if air else 0, dtype=np.int16)
    image[1:25, 1:21, 1:13] = 30
    image[sphere_mask(SHAPE, center=center, radius=radius, spacing=(0.8, 1.1, 2.5))] = 800
    return image


def _save(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, make_affine("PIR")), path)
    return path


def _read_manifest(out: Path, stem: str = "infer_manifest") -> dict[str, dict]:
    record = json.loads((out / f"{stem}.json").read_text())
    with open(out / f"{stem}.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(r["case"] for r in record["cases"])
    return {r["case"]: {**r, "csv": rows[r["case"]]} for r in record["cases"]}


@pytest.fixture
def model(tmp_path):
    return save_model(tmp_path / "model", make_plan(target_spacing=(1.2, 1.2, 2.5)))


@pytest.fixture
def model2(tmp_path):
    """A 2-channel CT model whose threshold net reads channel 1 (the centre of 2 channels)."""
    plan = make_plan(target_spacing=(1.2, 1.2, 2.5), image_channels=2)
    return save_model(tmp_path / "model2", plan)


# --------------------------------------------------------------------------- channel files


def test_channel_files_of_a_two_channel_model_are_one_case_named_without_suffix(tmp_path, model2):
    images = tmp_path / "imagesTs"
    for case, radius in (("BRATS_001", 5.0), ("BRATS_002", 3.5)):
        _save(np.zeros(SHAPE, dtype=np.int16) - 1000, images / f"{case}_0000.nii.gz")  # ignored by the net
        _save(_image(radius), images / f"{case}_0001.nii.gz")
    out = tmp_path / "out"
    assert main(["infer", str(images), "-m", str(model2), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*_mask.nii.gz")) == ["BRATS_001_mask.nii.gz", "BRATS_002_mask.nii.gz"]
    seg = Segmenter.load(model2, device="cpu")
    for case, radius in (("BRATS_001", 5.0), ("BRATS_002", 3.5)):
        mask = np.asarray(nib.load(out / f"{case}_mask.nii.gz").dataobj)
        expected = sphere_mask(SHAPE, center=(12, 10, 6), radius=radius, spacing=(0.8, 1.1, 2.5))
        dice = 2 * np.sum((mask > 0) & expected) / (np.sum(mask > 0) + np.sum(expected))
        assert dice > 0.8  # the sphere of channel 1, not channel 0's nothing
        api = seg.predict([images / f"{case}_0000.nii.gz", images / f"{case}_0001.nii.gz"])
        np.testing.assert_array_equal(api.mask, mask)
    provenance = json.loads((out / "BRATS_001_provenance.json").read_text())
    assert len(provenance["input"]["sha256"].split(",")) == 2
    manifest = _read_manifest(out)
    assert manifest["BRATS_001"]["input"] == [str(images / "BRATS_001_0000.nii.gz"), str(images / "BRATS_001_0001.nii.gz")]


def test_incomplete_channel_group_is_refused_naming_the_case_and_missing_channel(tmp_path, model2, capsys):
    images = tmp_path / "imagesTs"
    _save(_image(), images / "A_0000.nii.gz")
    _save(_image(), images / "A_0001.nii.gz")
    _save(_image(), images / "B_0000.nii.gz")
    assert main(["infer", str(images), "-m", str(model2), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "case 'B' in " in err and "is incomplete: missing B_0001.nii.gz (CT)" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ScanReadError, match=r"case 'B' .* incomplete: missing B_0001\.nii\.gz"):
        collect_cases([images], channels=2, channel_names=["CT", "CT"])


def test_one_channel_model_drops_the_0000_suffix_but_keeps_numbered_scans(tmp_path, model):
    images = tmp_path / "imagesTs"
    _save(_image(), images / "liver_3_0000.nii.gz")
    _save(_image(), images / "scan_0000.nii.gz")
    _save(_image(), images / "scan_0001.nii.gz")
    names = sorted(c.name for c in collect_cases([images], channels=1))
    assert names == ["liver_3", "scan_0000", "scan_0001"]
    out = tmp_path / "out"
    assert main(["infer", str(images / "liver_3_0000.nii.gz"), "-m", str(model), "-o", str(out)]) == 0
    assert (out / "liver_3_mask.nii.gz").is_file()  # pairs with labelsTs/liver_3.nii.gz in evaluate


def test_series_uid_gives_dicom_cases_a_short_series_id(tmp_path):
    folder = tmp_path / "dicom_dir"
    folder.mkdir()
    (folder / "slice1.dcm").write_bytes(b"not read here")
    a = collect_cases([folder], series_uid="1.2.840.1")[0].name
    b = collect_cases([folder], series_uid="1.2.840.2")[0].name
    assert a == f"dicom_dir_{series_tag('1.2.840.1')}" and b == f"dicom_dir_{series_tag('1.2.840.2')}" and a != b
    assert len(series_tag("1.2.840.1")) == 8


# --------------------------------------------------------------------------- failures, --continue


def _cohort(tmp_path: Path) -> Path:
    scans = tmp_path / "scans"
    for name, radius in (("a", 5.0), ("b", 4.0), ("d", 3.0)):
        _save(_image(radius), scans / f"{name}.nii.gz")
    data = (scans / "a.nii.gz").read_bytes()
    (scans / "c.nii.gz").write_bytes(data[: len(data) // 2])  # truncated
    return scans


def test_corrupt_scan_fails_alone_and_the_run_exits_1_listing_it(tmp_path, model, capsys):
    scans = _cohort(tmp_path)
    out = tmp_path / "out"
    assert main(["infer", str(scans), "-m", str(model), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 of 4 case(s) failed" in err and "  c: ScanReadError: " in err
    for name in "abd":
        assert nib.load(out / f"{name}_mask.nii.gz").shape == SHAPE
    assert not (out / "c_mask.nii.gz").exists()
    manifest = _read_manifest(out)
    assert {k: r["status"] for k, r in manifest.items()} == {"a": "ok", "b": "ok", "c": "failed", "d": "ok"}
    assert manifest["c"]["error"].startswith("ScanReadError: ") and manifest["c"]["csv"]["error"]
    assert manifest["a"]["outputs"] == {"mask": "a_mask.nii.gz", "provenance": "a_provenance.json"}
    assert manifest["a"]["seconds"] > 0 and manifest["a"]["input"] == str(scans / "a.nii.gz")


def test_continue_redoes_exactly_the_missing_and_corrupt_cases(tmp_path, model, capsys):
    scans = _cohort(tmp_path)
    (scans / "c.nii.gz").unlink()
    _save(_image(2.5), scans / "c.nii.gz")
    out = tmp_path / "out"
    assert main(["infer", str(scans), "-m", str(model), "-o", str(out), "--stats"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # an interrupted run: b's outputs never written, c's mask cut short, d's stats missing
    for p in out.glob("b_*"):
        p.unlink()
    data = (out / "c_mask.nii.gz").read_bytes()
    (out / "c_mask.nii.gz").write_bytes(data[:-12])  # header intact, data cut short
    (out / "d_stats.csv").unlink()  # listed in the manifest, gone
    assert main(["infer", str(scans), "-m", str(model), "-o", str(out), "--stats"]) == 2  # default: refuse
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["infer", str(scans), "-m", str(model), "-o", str(out), "--continue"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["b_mask.nii.gz", "c_mask.nii.gz", "d_mask.nii.gz"]
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert all(after[n] == before[n] for n in before if n.startswith("a_"))  # a untouched
    assert np.asarray(nib.load(out / "c_mask.nii.gz").dataobj).shape == SHAPE
    manifest = _read_manifest(out)
    assert manifest["a"]["skipped"] and not any(manifest[k].get("skipped") for k in "bcd")
    assert all(r["status"] == "ok" for r in manifest.values())


def test_continue_redoes_a_mask_on_another_grid(tmp_path, model, capsys):
    scans = _cohort(tmp_path)
    (scans / "c.nii.gz").unlink()
    out = tmp_path / "out"
    assert main(["infer", str(scans), "-m", str(model), "-o", str(out)]) == 0
    mask = nib.load(out / "a_mask.nii.gz")
    shifted = mask.affine.copy()
    shifted[:3, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj), shifted, mask.header), out / "a_mask.nii.gz")
    stamp = (out / "b_mask.nii.gz").stat().st_mtime_ns
    assert main(["infer", str(scans), "-m", str(model), "-o", str(out), "--continue"]) == 0
    np.testing.assert_allclose(nib.load(out / "a_mask.nii.gz").affine, nib.load(scans / "a.nii.gz").affine, atol=1e-4)
    assert (out / "b_mask.nii.gz").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main(["infer", str(scans), "-m", str(model), "-o", str(out), "--continue", "--stats"]) == 0
    assert len(capsys.readouterr().out.split()) == 3  # no stats yet: every case is done again
    assert (out / "b_stats.json").is_file()


# --------------------------------------------------------------------------- QC flags


def test_manifest_flags_a_structure_cut_by_the_border_and_an_mr_like_scan(tmp_path, model):
    scans = tmp_path / "scans"
    _save(_image(5.0), scans / "normal.nii.gz")
    _save(_image(5.0, center=(12, 10, 1)), scans / "cut.nii.gz")  # the sphere runs through axis 2's first slice
    mr = np.clip(_image(5.0), 0, None).astype(np.int16) * 2  # no air, positive values: MR-like
    _save(mr, scans / "mr.nii.gz")
    out = tmp_path / "out"
    assert main(["infer", str(scans), "-m", str(model), "-o", str(out)]) == 0
    manifest = _read_manifest(out)
    assert manifest["normal"]["qc"] == {}
    assert list(manifest["cut"]["qc"]) == ["border"]
    assert "class_1 (axis 2 first slice)" in manifest["cut"]["qc"]["border"]
    assert "intensity" in manifest["mr"]["qc"] and "no air" in manifest["mr"]["qc"]["intensity"]
    assert manifest["mr"]["csv"]["qc_flags"] == ";".join(manifest["mr"]["qc"])


def test_intensity_flag_names_a_foreground_median_outside_the_training_window(tmp_path):
    from medseg.data.plan import ChannelNorm
    from medseg.inference.quality import assess_prediction

    plan = make_plan()
    plan = type(plan)(**{**plan.__dict__, "normalization": [
        ChannelNorm(scheme="ct", clip=(-200.0, 500.0), mean=50.0, std=50.0, knee=(-20.0, 80.0), shoulder=2.0)
    ]})
    image = _image(5.0)[np.newaxis].astype(np.float32)
    mask = (image[0] == 800).astype(np.uint8)
    flags = assess_prediction(image, mask, [], plan, confidence=0.95, volume_ranges=None)
    assert "foreground's [p0.5, p99.5] = [-20, 80]" in flags["intensity"]
    image[0][mask > 0] = 60.0  # inside the knee window: no flag
    assert assess_prediction(image, mask, [], plan, confidence=0.95, volume_ranges=None) == {}
    assert "low_confidence" in assess_prediction(image, mask, [], plan, confidence=0.55, volume_ranges=None)


def test_volume_flag_uses_the_run_fingerprint(tmp_path, model):
    from medseg.inference.quality import training_volume_ranges, volume_finding

    plan = Segmenter.load(model, device="cpu").plan
    assert training_volume_ranges(model, plan) is None  # a model folder outside a run: the check is skipped
    run = tmp_path / "run"
    model_dir = save_model(run / "fold_0" / "model", plan)
    (run / "fingerprint.json").write_text(json.dumps({
        "label_values": [0, 1], "spacings": [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0]],
        "class_voxels": [[9000, 1000], [8000, 2000]],
    }))
    ranges = training_volume_ranges(model_dir, plan)
    assert ranges == {1: {"min_ml": 2.0, "max_ml": 4.0, "present": 2, "cases": 2}}
    stats = [{"label": 1, "name": "class_1", "volume_ml": 3.0}]
    assert volume_finding(stats, ranges) is None
    assert "class_1 9 mL (training 2-4 mL)" in volume_finding([{**stats[0], "volume_ml": 9.0}], ranges)
    assert "absent" in volume_finding([{**stats[0], "volume_ml": 0.0}], ranges)


def test_volume_flag_of_a_copied_model_folder_comes_from_its_model_json(tmp_path):
    from medseg.inference.quality import training_volume_ranges

    plan = make_plan(target_spacing=(1.2, 1.2, 2.5))
    ranges = {1: {"min_ml": 2.0, "max_ml": 4.0, "present": 2, "cases": 2}}
    model_dir = save_model(tmp_path / "copied_model", plan, volume_ranges=ranges)  # no fingerprint.json anywhere
    assert not list(tmp_path.rglob("fingerprint.json"))
    assert training_volume_ranges(model_dir, plan) == ranges
    scans = tmp_path / "scans"
    _save(_image(5.0), scans / "small.nii.gz")  # a 0.5 mL sphere: below 2 / 1.5 mL
    out = tmp_path / "out"
    assert main(["infer", str(scans), "-m", str(model_dir), "-o", str(out)]) == 0
    manifest = _read_manifest(out)
    assert list(manifest["small"]["qc"]) == ["volume"]
    assert "(training 2-4 mL)" in manifest["small"]["qc"]["volume"]
    # model.json's ranges win over a run's fingerprint; a damaged entry falls back to it
    run = tmp_path / "run"
    inside = save_model(run / "fold_0" / "model", plan, volume_ranges={1: {**ranges[1], "max_ml": 6.0}})
    (run / "fingerprint.json").write_text(json.dumps({
        "label_values": [0, 1], "spacings": [[1.0, 1.0, 2.0]], "class_voxels": [[9000, 1000]],
    }))
    assert training_volume_ranges(inside, plan)[1]["max_ml"] == 6.0
    meta = json.loads((inside / "model.json").read_text())
    meta["volume_ranges"] = {"7": ranges[1]}  # a label the plan does not have
    (inside / "model.json").write_text(json.dumps(meta))
    assert training_volume_ranges(inside, plan) == {1: {"min_ml": 2.0, "max_ml": 2.0, "present": 1, "cases": 1}}


def test_anonymized_manifest_holds_no_input_path(tmp_path, model):
    scans = tmp_path / "Doe_John_scans"
    _save(_image(5.0), scans / "Doe_John.nii.gz")
    _save(_image(4.0), scans / "Roe_Jane.nii.gz")
    out = tmp_path / "out"
    assert main(["infer", str(scans), "-m", str(model), "-o", str(out), "--anonymize"]) == 0
    for name in ("infer_manifest.json", "infer_manifest.csv"):
        text = (out / name).read_text()
        assert "Doe" not in text and "Roe" not in text and str(tmp_path) not in text
    assert all(r["input"] is None and r["case"].startswith("case_") for r in _read_manifest(out).values())


# --------------------------------------------------------------------------- parts


def test_parts_partition_a_cohort_exactly(tmp_path, model):
    cases = [CohortCase(f"case_{i:03d}", (Path(f"/x/{i}.nii.gz"),)) for i in range(17)]
    shuffled = list(reversed(cases))
    for n in (1, 2, 3, 5, 17, 20):
        parts = [select_part(shuffled, n, k) for k in range(n)]
        names = [c.name for part in parts for c in part]
        assert sorted(names) == sorted(c.name for c in cases) and len(names) == len(set(names))
        assert parts == [select_part(cases, n, k) for k in range(n)]  # input order does not matter
    scans = tmp_path / "scans"
    for name in "abcde":
        _save(_image(4.0), scans / f"{name}.nii.gz")
    out = tmp_path / "out"
    for k in range(2):
        assert main(["infer", str(scans), "-m", str(model), "-o", str(out), "--num-parts", "2", "--part-id", str(k)]) == 0
    parts = [_read_manifest(out, f"infer_manifest_part{k}of2") for k in range(2)]
    assert sorted(parts[0]) == ["a", "c", "e"] and sorted(parts[1]) == ["b", "d"]
    assert sorted(p.name for p in out.glob("*_mask.nii.gz")) == [f"{n}_mask.nii.gz" for n in "abcde"]
    assert main(["infer", str(scans), "-m", str(model), "-o", str(tmp_path / "o2"), "--part-id", "0"]) == 2
    assert main(["infer", str(scans), "-m", str(model), "-o", str(tmp_path / "o2"), "--num-parts", "2",
                 "--part-id", "2"]) == 2
