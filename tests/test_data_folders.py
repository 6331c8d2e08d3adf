"""Dataset folder recognition (MSD, nnU-Net v2, plain, list) and path safety."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from medseg.data import scan_dataset
from medseg.data.folders import read_case, safe_case_id
from medseg.data.synthetic import write_synthetic_dataset
from medseg.errors import DatasetError


def test_msd_four_channel_case_becomes_channels_and_mac_files_are_ignored(tmp_path):
    root = write_synthetic_dataset(tmp_path / "Task01", layout="msd", num_cases=3, kind="mr", channels=4,
                                   num_test_cases=1)
    # the MSD archives ship macOS resource forks next to every file
    for folder in ("imagesTr", "labelsTr"):
        for f in list((root / folder).iterdir()):
            (root / folder / f"._{f.name}").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    index = scan_dataset(root)
    assert index.layout == "msd"
    assert index.case_ids == ["phantom_000", "phantom_001", "phantom_002"]
    assert [c.case_id for c in index.test_cases] == ["phantom_003"]
    assert index.channel_names == ["FLAIR", "T1w", "T1gd", "T2w"]
    assert index.label_values == [0, 1, 2, 3] and index.label_names[3] == "enhancing_tumour"
    image, label = read_case(index.cases[0])
    assert image.array.shape[0] == 4 and label.array.shape[0] == 1
    assert image.geometry.shape == label.geometry.shape


def test_nnunet_v2_layout_groups_channel_files(tmp_path):
    root = write_synthetic_dataset(tmp_path / "Dataset001_X", layout="nnunet", num_cases=2, kind="mr", channels=4)
    (root / "imagesTr" / "._phantom_000_0000.nii.gz").write_bytes(b"junk")
    index = scan_dataset(root)
    assert index.layout == "nnunet" and index.file_ending == ".nii.gz"
    case = index.cases[0]
    assert [p.name for p in case.image_paths] == [f"phantom_000_000{c}.nii.gz" for c in range(4)]
    assert case.label_path.name == "phantom_000.nii.gz"
    assert index.label_values == [0, 1, 2, 3]
    assert read_case(case)[0].array.shape[0] == 4


def test_plain_layout_matches_names_and_reads_labels_declared_in_dataset_json(tmp_path):
    root = write_synthetic_dataset(tmp_path / "plain", layout="plain", num_cases=2, kind="ct")
    index = scan_dataset(root)
    assert index.layout == "plain"
    assert [(c.image_paths[0].name, c.label_path.name) for c in index.cases] == [
        ("phantom_000.nii.gz", "phantom_000.nii.gz"), ("phantom_001.nii.gz", "phantom_001.nii.gz")]
    assert index.channel_names == ["CT"] and index.label_values == [0, 1, 2]


def test_plain_layout_without_metadata_leaves_labels_undeclared(tmp_path):
    root = write_synthetic_dataset(tmp_path / "plain", layout="plain", num_cases=1, kind="ct", metadata=False)
    index = scan_dataset(root)
    assert index.label_values is None and index.channel_names is None


def test_csv_and_json_lists_are_recognised(tmp_path):
    root = write_synthetic_dataset(tmp_path / "listed", layout="list", num_cases=2, kind="ct")
    index = scan_dataset(root)
    assert index.layout == "list" and len(index.cases) == 2
    assert index.cases[0].image_paths[0].parent.name == "scans"
    entries = [{"image": "scans/phantom_001.nii.gz", "label": "masks/phantom_001.nii.gz", "patient_id": "p7",
                "case_id": "one"}]
    (root / "cases.json").write_text(json.dumps(entries))
    index = scan_dataset(root / "cases.json")
    assert index.layout == "list" and index.cases[0].case_id == "one" and index.cases[0].patient_id == "p7"


def test_dicom_series_folder_is_a_case(tmp_path, shared_data):
    from medseg.io import read_volume, write_mask

    root = tmp_path / "dicom_ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copytree(shared_data / "ct_dicom_series", root / "images" / "ct01")
    volume = read_volume(root / "images" / "ct01")
    mask = (volume.array[0] > 200).astype(np.uint8)
    write_mask(mask, volume, root / "labels" / "ct01.nii.gz")
    index = scan_dataset(root)
    assert index.layout == "plain" and index.cases[0].case_id == "ct01"
    assert index.cases[0].image_paths[0].is_dir()
    image, label = read_case(index.cases[0])
    assert image.geometry.same_grid(label.geometry, atol_mm=0.01)


@pytest.mark.parametrize(
    ("path", "expected"),
    [("../../etc/passwd", "outside the dataset root"), ("/etc/passwd", "outside the dataset root")],
)
def test_paths_leaving_the_root_are_refused(tmp_path, path, expected):
    root = write_synthetic_dataset(tmp_path / "evil", layout="msd", num_cases=1, kind="ct")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": path, "label": "./labelsTr/phantom_000.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=expected):
        scan_dataset(root)


def test_symlink_leaving_the_root_is_refused(tmp_path):
    root = write_synthetic_dataset(tmp_path / "links", layout="plain", num_cases=1, kind="ct")
    outside = tmp_path / "secret.nii.gz"
    shutil.copy(root / "images" / "phantom_000.nii.gz", outside)
    os.symlink(outside, root / "images" / "phantom_009.nii.gz")
    with pytest.raises(DatasetError, match=r"phantom_009.*outside the dataset root"):
        scan_dataset(root)


def test_dotdot_that_stays_inside_is_accepted(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ok", layout="msd", num_cases=1, kind="ct")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "./labelsTr/../imagesTr/phantom_000.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    assert scan_dataset(root).cases[0].image_paths[0] == root.resolve() / "imagesTr" / "phantom_000.nii.gz"


def test_unrecognised_folder_lists_the_expected_layouts(tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"not a recognised dataset folder \(found: notes.txt\).*imagesTr"):
        scan_dataset(tmp_path / "random")


def test_malformed_dataset_json_names_the_position(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text('{"training": [,]}')
    with pytest.raises(DatasetError, match=r"dataset.json is not valid JSON.*line 1"):
        scan_dataset(tmp_path / "bad")


def test_region_labels_are_refused_with_the_reason(tmp_path):
    root = write_synthetic_dataset(tmp_path / "regions", layout="nnunet", num_cases=1, kind="ct")
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["whole"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"label 'whole' is a region"):
        scan_dataset(root)


def test_case_ids_are_made_safe_for_file_names():
    assert safe_case_id("liver_012") == "liver_012"
    unsafe = safe_case_id("../../etc/x")
    assert "/" not in unsafe and not unsafe.startswith(".")
    assert safe_case_id("a/b") != safe_case_id("a_b")


def _mhd_case(root, case_id, data_file):
    """images/CASE.mhd (data file renamed as ``data_file``, relative to images/) and labels/CASE.mha."""
    import SimpleITK as sitk

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    data = np.zeros((2, 3, 4), np.int16)
    data[1, 1, 1] = 1
    header = root / "images" / f"{case_id}.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(data), str(header))
    target = (root / "images" / data_file).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    (root / "images" / f"{case_id}.raw").rename(target)
    text = header.read_text().replace(f"ElementDataFile = {case_id}.raw", f"ElementDataFile = {data_file}")
    header.write_text(text)
    sitk.WriteImage(sitk.GetImageFromArray(data.astype(np.uint8)), str(root / "labels" / f"{case_id}.mha"))


def test_mhd_data_file_may_lie_anywhere_inside_the_dataset_root_but_not_outside(tmp_path):
    from medseg.data import check_dataset
    from medseg.errors import ScanReadError

    root = tmp_path / "mhd_ds"
    _mhd_case(root, "c0", "../raw/c0.raw")  # a sibling folder inside the root: allowed
    index = scan_dataset(root)
    assert index.cases[0].root == root.resolve()
    image, label = read_case(index.cases[0])
    assert label.geometry.same_grid(image.geometry, atol_mm=0.01)
    assert image.geometry.shape == (4, 3, 2) and int(image.array.sum()) == 1
    _mhd_case(root, "c1", "../../outside_secret.raw")  # leaves the dataset root
    index = scan_dataset(root)
    with pytest.raises(ScanReadError, match=r"c1\.mhd: the header's data file '\.\./\.\./outside_secret\.raw' resolves"):
        read_case(index.case("c1"))
    report = check_dataset(index, num_folds=None)
    assert [p.case_id for p in report.problems] == ["c1"]
    assert "outside_secret.raw" in report.problems[0].message and "detached data files must stay" in (
        report.problems[0].message
    )


@pytest.mark.parametrize(
    ("case_id", "problem"),
    [
        ("../../../escape_case/c0", "contains a path separator"),
        ("sub/dir/c1", "contains a path separator"),
        ("back\\slash", "contains a path separator"),
        ("..", "contains '..'"),
        ("tab\there", "contains a control character"),
    ],
)
def test_unsafe_case_ids_in_a_list_are_refused_naming_the_entry(tmp_path, case_id, problem):
    root = write_synthetic_dataset(tmp_path / "ids", layout="list", num_cases=2, kind="ct")
    entries = [
        {"image": "scans/phantom_000.nii.gz", "label": "masks/phantom_000.nii.gz", "case_id": "fine"},
        {"image": "scans/phantom_001.nii.gz", "label": "masks/phantom_001.nii.gz", "case_id": case_id},
    ]
    (root / "dataset.json").write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match=r"dataset\.json: entry 2: case id .* " + problem):
        scan_dataset(root)


def test_unsafe_case_ids_in_an_nnunet_dataset_mapping_are_refused(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ids", layout="nnunet", num_cases=1, kind="ct")
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {
        "sub/dir/c1": {"images": ["imagesTr/phantom_000_0000.nii.gz"], "label": "labelsTr/phantom_000.nii.gz"}
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"dataset\['sub/dir/c1'\]: case id 'sub/dir/c1' contains a path separator"):
        scan_dataset(root)
