"""`medseg evaluate` / medseg.evaluation.evaluate end to end on small NIfTI folders."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_affine, sphere_mask

from medseg import metrics as M
from medseg.cli import main
from medseg.errors import (
    ArrayValueError,
    ConfigError,
    DatasetError,
    GeometryError,
    OutputExistsError,
    OutputWriteError,
)
from medseg.evaluation import CSV_NAME, LESIONS_CSV_NAME, SUMMARY_NAME, case_name, evaluate, load_labels

SHAPE = (24, 20, 16)
SPACING = (0.8, 1.1, 2.5)
AFFINE = make_affine("oblique", spacing=SPACING)


def save(array, path: Path, affine=AFFINE, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), affine), path)
    return path


def labelled(center, radius=3.0, label=1, other=None):
    out = np.zeros(SHAPE, dtype=np.uint8)
    out[sphere_mask(SHAPE, center=center, radius=radius, spacing=(1, 1, 1))] = label
    if other is not None:
        out[sphere_mask(SHAPE, center=other, radius=2.5, spacing=(1, 1, 1))] = 2
    return out


@pytest.fixture
def cases(tmp_path):
    """Three cases: a good one, one where class 2 is absent in both, one where the prediction misses class 2."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    arrays = {
        "case_a": (labelled((8, 8, 8), other=(16, 12, 8)), labelled((9, 8, 8), other=(16, 12, 9))),
        "case_b": (labelled((12, 10, 8)), labelled((12, 10, 8))),
        "case_c": (labelled((10, 10, 7), other=(18, 14, 8)), labelled((10, 11, 7))),
    }
    for name, (gt, pred) in arrays.items():
        save(gt, gt_dir / f"{name}.nii.gz")
        save(pred, pred_dir / f"{name}_mask.nii.gz")
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour"}})
    )
    return tmp_path, arrays


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_folders_writes_correct_csv_and_summary(cases):
    root, arrays = cases
    out = root / "eval"
    report = evaluate(root / "pred", root / "gt", labels=root / "dataset.json", output_dir=out, num_workers=0)
    rows = read_csv(out / CSV_NAME)
    assert [(r["case"], r["class"]) for r in rows] == [
        (c, k) for c in ("case_a", "case_b", "case_c") for k in ("liver", "tumour")
    ]
    for row in rows:
        gt, pred = arrays[row["case"]]
        want = M.compute_scores(pred, gt, spacing=SPACING, labels={1: "liver", 2: "tumour"})[row["class"]]
        for metric in M.DEFAULT_METRICS:
            got = float(row[metric])
            if math.isnan(want[metric]):
                assert math.isnan(got), (row["case"], row["class"], metric)
            else:
                # the header stores spacing as float32
                assert got == pytest.approx(want[metric], rel=1e-6), (row["case"], row["class"], metric)

    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["classes"] == ["liver", "tumour"] and summary["n_cases"] == 3
    liver = summary["summary"]["liver"]["dice"]
    dices = [float(r["dice"]) for r in rows if r["class"] == "liver"]
    assert liver["mean"] == pytest.approx(np.mean(dices))
    assert liver["median"] == pytest.approx(np.median(dices))
    assert liver["std"] == pytest.approx(np.std(dices))
    assert (liver["n_valid"], liver["n_total"]) == (3, 3)
    tumour = summary["summary"]["tumour"]
    # case_b: tumour absent in both -> NaN, excluded and counted; case_c: missed -> Dice 0, HD95 inf
    assert (tumour["dice"]["n_valid"], tumour["dice"]["n_total"]) == (2, 3)
    assert tumour["hd95"]["mean"] == "inf" and tumour["hd95"]["n_inf"] == 1
    assert summary["settings"]["empty"] == "nan" and summary["units"]["hd95"] == "mm"
    assert summary["summary"]["foreground_mean"]["dice"]["mean"] == pytest.approx(
        np.mean([liver["mean"], tumour["dice"]["mean"]])
    )
    assert report.summary_path == out / SUMMARY_NAME
    table = report.format_table()
    tumour_line = next(line for line in table.splitlines() if line.startswith("tumour"))
    assert "inf [2/3]" in tumour_line and "0.3704 [2/3]" in tumour_line


def test_empty_one_policy_scores_absent_classes_as_perfect(cases):
    root, _ = cases
    report = evaluate(
        root / "pred", root / "gt", labels=root / "dataset.json", empty="one", metrics="dice", num_workers=0
    )
    case_b = next(c for c in report.cases if c.name == "case_b")
    assert case_b.scores["tumour"]["dice"] == 1.0
    assert report.summary["tumour"]["dice"]["n_valid"] == 3


def test_labels_inferred_from_the_masks_count_absent_classes_as_empty(cases):
    root, _ = cases
    report = evaluate(root / "pred", root / "gt", metrics="dice", num_workers=0)
    assert report.classes == ["1", "2"]
    case_b = next(c for c in report.cases if c.name == "case_b")
    assert math.isnan(case_b.scores["2"]["dice"])
    assert report.summary["2"]["dice"]["n_total"] == 3


def test_parallel_workers_give_the_same_report(cases):
    root, _ = cases
    serial = evaluate(root / "pred", root / "gt", metrics="dice,hd95", num_workers=0)
    parallel = evaluate(root / "pred", root / "gt", metrics="dice,hd95", num_workers=2)
    assert [c.name for c in parallel.cases] == [c.name for c in serial.cases]
    for a, b in zip(serial.cases, parallel.cases):
        np.testing.assert_equal(a.scores, b.scores)


def test_single_files_are_one_case(cases):
    root, arrays = cases
    report = evaluate(root / "pred" / "case_a_mask.nii.gz", root / "gt" / "case_a.nii.gz", metrics="dice")
    assert [c.name for c in report.cases] == ["case_a"]
    gt, pred = arrays["case_a"]
    assert report.cases[0].scores["1"]["dice"] == pytest.approx(
        M.compute_scores(pred, gt, spacing=SPACING, metrics="dice")["1"]["dice"]
    )


def test_grid_mismatch_is_refused_naming_both_files(cases):
    root, arrays = cases
    pred = arrays["case_a"][1]
    moved = AFFINE.copy()
    moved[:3, 3] += 5.0
    save(pred, root / "pred" / "case_a_mask.nii.gz", affine=moved)
    with pytest.raises(
        GeometryError,
        match=r"case_a_mask\.nii\.gz and reference .*case_a\.nii\.gz are on different "
        r"voxel grids \(prediction vs reference: origin",
    ):
        evaluate(root / "pred", root / "gt", num_workers=0)


def test_resample_to_reference_restores_a_shifted_grid(tmp_path):
    gt = labelled((10, 10, 8))
    save(gt, tmp_path / "gt" / "x.nii.gz")
    # the same mask stored on a grid that starts 2 voxels earlier along i (array shifted accordingly)
    shifted = AFFINE.copy()
    shifted[:3, 3] -= 2 * AFFINE[:3, 0]
    pred = np.zeros((SHAPE[0] + 2, *SHAPE[1:]), dtype=np.uint8)
    pred[2:] = gt
    save(pred, tmp_path / "pred" / "x.nii.gz", affine=shifted)
    with pytest.raises(GeometryError, match="--resample-to-reference"):
        evaluate(tmp_path / "pred", tmp_path / "gt", metrics="dice", num_workers=0)
    report = evaluate(
        tmp_path / "pred", tmp_path / "gt", metrics="dice,hd", resample_to_reference=True, num_workers=0
    )
    assert report.cases[0].scores["1"] == {"dice": 1.0, "hd": 0.0}
    assert "resampled" in report.cases[0].notes[0]


def test_unmatched_cases_are_reported(cases):
    root, arrays = cases
    save(arrays["case_a"][0], root / "pred" / "extra_case.nii.gz")
    (root / "pred" / "case_c_mask.nii.gz").unlink()
    with (
        pytest.warns(UserWarning, match="extra_case"),
        pytest.raises(DatasetError, match=r"1 reference case\(s\) have no prediction in .*: 'case_c'"),
    ):
        evaluate(root / "pred", root / "gt", num_workers=0)
    with pytest.warns(
        UserWarning, match=r"1 prediction\(s\) have no reference and are not scored: 'extra_case'"
    ):
        skipped = evaluate(root / "pred", root / "gt", missing="skip", metrics="dice", num_workers=0)
    assert [c.name for c in skipped.cases] == ["case_a", "case_b"]
    assert skipped.references_without_prediction == ["case_c"]
    assert skipped.predictions_without_reference == ["extra_case"]
    with pytest.warns(UserWarning, match="extra_case"):
        worst = evaluate(root / "pred", root / "gt", missing="empty", metrics="dice,hd95", num_workers=0)
    case_c = next(c for c in worst.cases if c.name == "case_c")
    assert case_c.scores["1"] == {"dice": 0.0, "hd95": math.inf}
    assert case_c.pred_path is None


def test_no_matching_names_is_refused(tmp_path):
    save(labelled((8, 8, 8)), tmp_path / "gt" / "a.nii.gz")
    save(labelled((8, 8, 8)), tmp_path / "pred" / "b.nii.gz")
    with pytest.raises(DatasetError, match=r"no case name is both in .*pred \(1 file\(s\), e.g. 'b'\)"):
        evaluate(tmp_path / "pred", tmp_path / "gt")


def test_probability_maps_are_refused_naming_the_file(tmp_path):
    save(labelled((8, 8, 8)), tmp_path / "gt" / "a.nii.gz")
    save(labelled((8, 8, 8)) * 0.7, tmp_path / "pred" / "a.nii.gz", dtype=np.float32)
    with pytest.raises(ArrayValueError, match=r"pred/a\.nii\.gz holds non-integer values"):
        evaluate(tmp_path / "pred", tmp_path / "gt", num_workers=0)


def test_existing_reports_are_not_overwritten(cases):
    root, _ = cases
    evaluate(root / "pred", root / "gt", metrics="dice", output_dir=root / "eval", num_workers=0)
    with pytest.raises(OutputExistsError, match=r"metrics_per_case\.csv.* exists; pass --overwrite"):
        evaluate(root / "pred", root / "gt", metrics="dice", output_dir=root / "eval", num_workers=0)
    evaluate(
        root / "pred", root / "gt", metrics="iou", output_dir=root / "eval", overwrite=True, num_workers=0
    )
    assert "iou" in (root / "eval" / CSV_NAME).read_text().splitlines()[0]


def test_report_folder_that_cannot_be_created_is_one_clear_error(cases, capsys):
    root, _ = cases
    blocker = root / "notes.txt"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OutputWriteError, match=r"cannot create the evaluation report folder .*notes\.txt/eval"):
        evaluate(root / "pred", root / "gt", metrics="dice", output_dir=blocker / "eval", num_workers=0)
    assert main(["evaluate", str(root / "pred"), str(root / "gt"), "-o", str(blocker / "eval")]) == 2
    assert "OutputWriteError: cannot create the evaluation report folder" in capsys.readouterr().err


def test_lesion_evaluation_writes_per_lesion_rows(cases):
    root, _ = cases
    report = evaluate(
        root / "pred",
        root / "gt",
        labels=root / "dataset.json",
        metrics="dice",
        lesion=True,
        output_dir=root / "eval",
        num_workers=0,
    )
    rows = read_csv(root / "eval" / LESIONS_CSV_NAME)
    missed = [r for r in rows if r["case"] == "case_c" and r["class"] == "tumour"]
    assert len(missed) == 1 and missed[0]["kind"] == "reference" and missed[0]["detected"] == "False"
    case_c = next(c for c in report.cases if c.name == "case_c")
    assert case_c.scores["tumour"]["lesion_fn"] == 1.0 and case_c.scores["liver"]["lesion_tp"] == 1.0
    assert report.summary["liver"]["detection_sensitivity"]["mean"] == 1.0


def test_label_names_from_every_supported_source(tmp_path):
    msd = {"labels": {"0": "background", "1": "liver", "2": "tumour"}}
    nnunet = {"labels": {"background": 0, "liver": 1, "tumour": 2, "liver_and_tumour": [1, 2]}}
    assert load_labels(msd) == ({0: "background", 1: "liver", 2: "tumour"}, {})
    assert load_labels(nnunet) == ({0: "background", 1: "liver", 2: "tumour"}, {"liver_and_tumour": [1, 2]})
    model = tmp_path / "run" / "fold_0" / "model"
    model.mkdir(parents=True)
    (model / "model.json").write_text(
        json.dumps({"plan": {"label_values": [0, 3], "label_names": ["bg", "kidney"]}})
    )
    assert load_labels(tmp_path / "run")[0] == {0: "bg", 3: "kidney"}
    assert load_labels(model)[0] == {0: "bg", 3: "kidney"}
    with pytest.raises(ConfigError, match=r"the folder holds no dataset\.json or model\.json"):
        load_labels(tmp_path)
    with pytest.raises(ConfigError, match=r"label names \['liver'\] are used for several values"):
        load_labels({"1": "liver", "2": "liver"})


def test_real_label_name_file(shared_data):
    labels, _ = load_labels(shared_data / "ct_organs" / "label_names.json")
    assert labels[5] == "liver" and labels[1] == "spleen"


def test_case_names_strip_extension_and_mask_suffix():
    assert case_name("a/liver_012_mask.nii.gz") == "liver_012"
    assert case_name("liver_012.nii") == "liver_012"
    assert case_name("_mask.nii.gz") == "_mask"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def test_cli_prints_a_table_and_writes_reports(cases, capsys):
    root, _ = cases
    code = main(
        [
            "evaluate",
            str(root / "pred"),
            str(root / "gt"),
            "--labels",
            str(root / "dataset.json"),
            "--metrics",
            "dice,hd95,nsd",
            "--tolerance",
            "2",
            "-o",
            str(root / "out"),
            "--workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "liver" in out and "hd95 (mm)" in out and f"wrote {root / 'out' / SUMMARY_NAME}" in out
    summary = json.loads((root / "out" / SUMMARY_NAME).read_text())
    assert summary["metrics"] == ["dice", "hd95", "nsd"] and summary["settings"]["tolerance_mm"] == 2.0


def test_surface_option_selects_surfels_by_default_and_voxels_on_request(cases, capsys):
    """Default: area-weighted surfels (DeepMind's surface-distance); --surface voxel: MONAI's voxel centres."""
    root, arrays = cases
    metrics = "hd,hd95,assd,nsd"
    for surface, args in (("surfel", []), ("voxel", ["--surface", "voxel"])):
        out = root / f"out_{surface}"
        cli = ["evaluate", str(root / "pred"), str(root / "gt"), "--metrics", metrics, "-o", str(out)]
        assert main([*cli, "--workers", "0", *args]) == 0
        summary = json.loads((out / SUMMARY_NAME).read_text())
        assert summary["settings"]["surface"] == surface
        assert summary["settings"]["hd95"] == M.SURFACE_DEFINITIONS[surface]["hd95"]
        for row in read_csv(out / CSV_NAME):
            gt, pred = arrays[row["case"]]
            want = M.compute_scores(pred, gt, spacing=SPACING, metrics=metrics, surface=surface)
            if row["class"] not in want:  # absent from both masks of this case
                continue
            for metric in metrics.split(","):
                assert float(row[metric]) == pytest.approx(want[row["class"]][metric], rel=1e-6), (
                    row,
                    metric,
                )
        case_a = next(r for r in read_csv(out / CSV_NAME) if r["case"] == "case_a" and r["class"] == "1")
        gt, pred = arrays["case_a"]
        other = M.compute_scores(
            pred, gt, spacing=SPACING, metrics="assd", surface="voxel" if surface == "surfel" else "surfel"
        )
        assert float(case_a["assd"]) != pytest.approx(other["1"]["assd"], rel=1e-3)  # the two really differ
    report = evaluate(root / "pred", root / "gt", metrics="hd95", surface="voxel", num_workers=0)
    assert report.settings["surface"] == "voxel"
    with pytest.raises(ConfigError, match=r"surface must be 'surfel' .* or 'voxel' .*, got 'mesh'"):
        evaluate(root / "pred", root / "gt", metrics="hd95", surface="mesh", num_workers=0)


def test_cli_writes_into_the_prediction_folder_by_default(cases, capsys):
    root, _ = cases
    assert (
        main(["evaluate", str(root / "pred"), str(root / "gt"), "--metrics", "dice", "--workers", "0"]) == 0
    )
    assert (root / "pred" / CSV_NAME).is_file()
    # the reports do not disturb a second evaluation of the same folder
    assert (
        main(
            [
                "evaluate",
                str(root / "pred"),
                str(root / "gt"),
                "--metrics",
                "dice",
                "--overwrite",
                "--workers",
                "0",
            ]
        )
        == 0
    )


def test_cli_bad_input_exits_2_with_one_line(cases, capsys):
    root, arrays = cases
    assert main(["evaluate", str(root / "nowhere"), str(root / "gt")]) == 2
    assert "DatasetError: prediction path" in capsys.readouterr().err
    assert main(["evaluate", str(root / "pred"), str(root / "gt"), "--metrics", "dice,hd96"]) == 2
    assert "Did you mean 'hd95'" in capsys.readouterr().err
    moved = AFFINE.copy()
    moved[:3, 3] += 1.0
    save(arrays["case_b"][1], root / "pred" / "case_b_mask.nii.gz", affine=moved)
    assert main(["evaluate", str(root / "pred"), str(root / "gt"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "GeometryError" in err and "case_b_mask.nii.gz" in err and "case_b.nii.gz" in err


def test_console_script_runs_in_a_subprocess(cases):
    root, _ = cases
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medseg",
            "evaluate",
            str(root / "pred"),
            str(root / "gt"),
            "--metrics",
            "dice,iou",
            "-o",
            str(root / "sub"),
            "--workers",
            "0",
            "--empty",
            "one",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "foreground_mean" in result.stdout
    rows = read_csv(root / "sub" / CSV_NAME)
    assert len(rows) == 6 and all(r["dice"] != "nan" for r in rows)
