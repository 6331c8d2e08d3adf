"""Segmenter options: TTA default, fold ensembles, postprocessing, statistics, preview, provenance, inputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine, sphere_mask
from inference_support import make_plan, save_model

from medseg.config import InferConfig
from medseg.data.preprocess import preprocess_case
from medseg.errors import CheckpointError, ConfigError, GeometryError, OutputExistsError, ScanReadError
from medseg.inference.jobs import collect_inputs
from medseg.inference.outputs import OutputSpec
from medseg.inference.postprocess import keep_largest_component, parse_postprocess, remove_small_components
from medseg.inference.segmenter import Segmenter
from medseg.inference.sliding_window import WindowOptions, predict_logits
from medseg.inference.stats import label_statistics
from medseg.io import Volume, read_volume
from medseg.io.geometry import Geometry

SHAPE = (28, 24, 16)
SPACING = (0.9, 1.2, 2.0)


def _write_scan(path, *, blob: bool = False, kind: str = "LPS") -> np.ndarray:
    image = np.zeros(SHAPE, dtype=np.int16)
    image[1:27, 1:23, 1:15] = 50
    big = sphere_mask(SHAPE, center=(10, 11, 8), radius=6.0, spacing=SPACING)
    image[big] = 900
    if blob:
        image[22:24, 19:21, 11:13] = 900  # a small separate bright blob (8 voxels)
    nib.save(nib.Nifti1Image(image, make_affine(kind, spacing=SPACING)), path)
    return image


@pytest.fixture
def model(tmp_path):
    return save_model(tmp_path / "model", make_plan(target_spacing=(1.2, 1.2, 2.0)))


def test_tta_is_off_by_default_on_the_cpu_and_on_when_asked(model):
    assert Segmenter.load(model, device="cpu").window.tta is False
    assert Segmenter.load(model, device="cpu", tta="on").window.tta is True
    assert Segmenter.load(model, device="cpu", tta=True).settings()["tta"] is True
    with pytest.raises(ConfigError, match="tta must be auto, on or off"):
        Segmenter.load(model, device="cpu", tta="sometimes")


def test_tta_changes_the_logits_of_an_asymmetric_model(tmp_path):
    path = save_model(tmp_path / "skewed", make_plan(), name="test_skewed", options={"seed": 2})
    image = np.random.default_rng(0).normal(size=(1, 20, 18, 16)).astype(np.float32)
    plain, _ = Segmenter.load(path, device="cpu").predict_scores(image)
    mirrored, _ = Segmenter.load(path, device="cpu", tta="on").predict_scores(image)
    assert float((plain - mirrored).abs().max()) > 1e-3


def test_folds_are_averaged_in_probability_space(tmp_path):
    plan = make_plan(target_spacing=(1.2, 1.2, 2.0))
    run = tmp_path / "run"
    save_model(run / "fold_0" / "model", plan, fold=0, options={"threshold": 3.0})
    save_model(run / "fold_1" / "model", plan, fold=1, options={"threshold": 7.0})
    _write_scan(tmp_path / "scan.nii.gz")
    ensemble = Segmenter.load(run, device="cpu")
    assert [m.fold for m in ensemble.models] == [0, 1]
    image = preprocess_case(read_volume(tmp_path / "scan.nii.gz"), plan).image
    scores, kind = ensemble.predict_scores(image)
    assert kind == "probs"
    expected = sum(
        torch.softmax(predict_logits(m.model, image, plan, WindowOptions(overlap=0.5, batch_size=2)), dim=0)
        for m in ensemble.models
    ) / 2
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-6)
    # restored: where both folds agree, the ensemble agrees; the low threshold (fold 0) covers more
    masks = [
        Segmenter.load(run, device="cpu", folds=[f]).predict(tmp_path / "scan.nii.gz").mask for f in (0, 1)
    ]
    joint = ensemble.predict(tmp_path / "scan.nii.gz").mask
    agree = masks[0] == masks[1]
    np.testing.assert_array_equal(joint[agree], masks[0][agree])
    assert (masks[0] == 1).sum() >= (joint == 1).sum() >= (masks[1] == 1).sum()
    with pytest.raises(CheckpointError, match="fold"):
        Segmenter.load(run, device="cpu", folds=[3])


def test_folds_with_different_plans_are_refused(tmp_path):
    run = tmp_path / "run"
    save_model(run / "fold_0" / "model", make_plan(), fold=0)
    save_model(run / "fold_1" / "model", make_plan(patch_size=(8, 8, 8)), fold=1)
    with pytest.raises(CheckpointError, match="different plans"):
        Segmenter.load(run, device="cpu")


def test_postprocess_largest_removes_the_small_blob(tmp_path, model):
    _write_scan(tmp_path / "scan.nii.gz", blob=True)
    raw = Segmenter.load(model, device="cpu").predict(tmp_path / "scan.nii.gz").mask
    largest = Segmenter.load(model, device="cpu", postprocess="largest").predict(tmp_path / "scan.nii.gz").mask
    small = Segmenter.load(model, device="cpu", postprocess="min-size=50").predict(tmp_path / "scan.nii.gz").mask
    assert raw[22:24, 19:21, 11:13].all()
    assert not largest[22:24, 19:21, 11:13].any() and not small[22:24, 19:21, 11:13].any()
    np.testing.assert_array_equal(largest[:20], raw[:20])  # the big ball is untouched
    np.testing.assert_array_equal(small, largest)


def test_postprocess_functions_work_per_class():
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[0:4, 0:4] = 1
    mask[8, 8] = 1
    mask[0:2, 6:9] = 2
    mask[5, 5] = 2
    largest = keep_largest_component(mask)
    assert largest[8, 8] == 0 and largest[5, 5] == 0 and (largest == 1).sum() == 16 and (largest == 2).sum() == 6
    cleaned = remove_small_components(mask, 2)
    assert cleaned[8, 8] == 0 and cleaned[5, 5] == 0 and (cleaned == 2).sum() == 6
    assert str(parse_postprocess("min-size=12")) == "min-size=12"
    with pytest.raises(ConfigError, match="postprocess 'biggest' is not valid"):
        parse_postprocess("biggest")


def test_statistics_count_voxels_and_millilitres():
    mask = np.zeros((10, 12, 8), dtype=np.uint8)
    mask[2:5, 3:9, 1:2] = 3
    geometry = Geometry(shape=mask.shape, affine=make_affine("oblique", spacing=(2.0, 1.0, 5.0)))
    rows = label_statistics(mask, geometry, {0: "background", 1: "liver", 3: "tumour"})
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"liver", "tumour"}
    assert by_name["liver"]["voxels"] == 0 and by_name["liver"]["bbox_min"] is None
    tumour = by_name["tumour"]
    assert tumour["voxels"] == 18
    assert tumour["volume_ml"] == pytest.approx(18 * 10.0 / 1000.0)
    assert tumour["bbox_min"] == [2, 3, 1] and tumour["bbox_max"] == [4, 8, 1]
    np.testing.assert_allclose(tumour["centroid_ras_mm"], geometry.voxel_to_world([3.0, 5.5, 1.0]), atol=1e-3)


def test_outputs_side_files_and_provenance(tmp_path, model):
    scan = tmp_path / "scan.nii.gz"
    _write_scan(scan)
    seg = Segmenter.load(model, device="cpu")
    written = seg.predict_many(
        [scan], tmp_path / "out", probabilities=True, statistics=True, preview=True
    )[0]
    assert {p.name for p in written.values()} == {
        "scan_mask.nii.gz", "scan_probs.nii.gz", "scan_stats.json", "scan_stats.csv", "scan_preview.png",
        "scan_provenance.json",
    }
    probs = nib.load(written["probabilities"])
    assert probs.shape == (*SHAPE, 2) and probs.get_data_dtype() == np.uint8
    np.testing.assert_allclose(probs.affine, nib.load(scan).affine, atol=1e-4)
    stats = json.loads(written["statistics"].read_text())
    mask = np.asarray(nib.load(written["mask"]).dataobj)
    assert stats["labels"][0]["voxels"] == int((mask == 1).sum()) > 0
    assert written["preview"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provenance = json.loads(written["provenance"].read_text())
    model_json = json.loads((model / "model.json").read_text())
    assert provenance["models"][0]["weights_sha256"] == model_json["weights_sha256"]
    assert provenance["input"]["sha256"] == hashlib.sha256(scan.read_bytes()).hexdigest()
    assert provenance["settings"]["tta"] is False and provenance["medseg_version"]
    assert "mask" in provenance["outputs"]


def test_predict_accepts_volume_and_array_affine_alike(tmp_path, model):
    image = _write_scan(tmp_path / "scan.nii.gz", kind="oblique")
    seg = Segmenter.load(model, device="cpu")
    from_file = seg.predict(tmp_path / "scan.nii.gz").mask
    affine = nib.load(tmp_path / "scan.nii.gz").affine
    from_array = seg.predict((image, affine)).mask
    from_volume = seg.predict(Volume(array=image[np.newaxis], geometry=Geometry(shape=SHAPE, affine=affine))).mask
    np.testing.assert_array_equal(from_array, from_file)
    np.testing.assert_array_equal(from_volume, from_file)


def test_model_input_checks_give_one_clear_line(tmp_path, model):
    seg = Segmenter.load(model, device="cpu")
    with pytest.raises(GeometryError, match=r"is 2D \(20, 20\) but the model expects 3D volumes"):
        seg.predict(Volume(array=np.zeros((1, 20, 20)), geometry=Geometry(shape=(20, 20), affine=np.eye(4))))
    with pytest.raises(
        ScanReadError, match=r"the scan: found \(2, 10, 10, 10\) with 2 channels; the model expects 1 channel \(CT\) of 3D"
    ):
        seg.predict((np.zeros((2, 10, 10, 10)), np.eye(4)))


def test_infer_config_defaults_come_from_the_model(tmp_path):
    path = save_model(
        tmp_path / "m", make_plan(), infer=InferConfig(overlap=0.25, batch_size=3, postprocess="largest", tta="on")
    )
    seg = Segmenter.load(path, device="cpu")
    assert (seg.window.overlap, seg.window.batch_size, str(seg.postprocess), seg.window.tta) == (0.25, 3, "largest", True)
    assert Segmenter.load(path, device="cpu", overlap=0.5, tta="off").settings()["overlap"] == 0.5


def test_case_names_come_from_files_and_folders_never_tags(tmp_path):
    (tmp_path / "scans").mkdir()
    for name in ("b.nii.gz", "a.nii"):
        (tmp_path / "scans" / name).write_bytes(b"x")
    (tmp_path / "scans" / "series_7").mkdir()
    (tmp_path / "scans" / "series_7" / "IM0001").write_bytes(b"x")
    (tmp_path / "dicom_case").mkdir()
    (tmp_path / "dicom_case" / "1.2.3").write_bytes(b"x")
    cases = collect_inputs([tmp_path / "scans", tmp_path / "dicom_case"])
    assert [name for _, name in cases] == ["a", "b", "series_7", "dicom_case"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(ConfigError, match="both give case name 'a'"):
        collect_inputs([tmp_path / "scans", tmp_path / "other"])
    paths = OutputSpec(tmp_path, mask_path=tmp_path / "liver.nii.gz", statistics=True).paths("a")
    assert paths["mask"].name == "liver.nii.gz" and paths["statistics"].name == "liver_stats.json"


def test_output_spec_names_every_kind_and_refuses_outputs_on_inputs_before_any_work(tmp_path):
    spec = OutputSpec.to(tmp_path / "out", probabilities=True, statistics=True, preview=True, formats="dicom-seg")
    assert spec.mask_path is None and spec.formats == ("nifti", "dicom-seg")
    assert {k: p.name for k, p in spec.paths("ct1").items()} == {
        "mask": "ct1_mask.nii.gz", "probabilities": "ct1_probs.nii.gz", "statistics": "ct1_stats.json",
        "statistics_csv": "ct1_stats.csv", "preview": "ct1_preview.png", "provenance": "ct1_provenance.json",
        "dicom_seg": "ct1_seg.dcm",
    }
    single = OutputSpec.to(tmp_path / "liver.nii.gz")
    assert single.mask_path == tmp_path / "liver.nii.gz" and single.out_dir == tmp_path
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'overwrite'"):
        spec.overwrite = True  # type: ignore[misc]
    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "IM1").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="would write onto the input"):
        OutputSpec(dicom).plan([(dicom, "series")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ct1_provenance.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"ct1_provenance.json exists; pass --overwrite"):
        OutputSpec(tmp_path / "out").plan([(tmp_path / "ct1.nii.gz", "ct1")])
    assert OutputSpec(tmp_path / "out", overwrite=True).plan([(tmp_path / "ct1.nii.gz", "ct1")])[0]["mask"].parent.name == "out"
