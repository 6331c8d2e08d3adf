"""Masks come back on the input's exact grid, and a known shape lands where it is in world space."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import ORIENTATIONS, make_affine, sphere_mask
from inference_support import make_plan, save_model

from medseg.data.preprocess import preprocess_case
from medseg.errors import GeometryError
from medseg.inference.restore import check_restored_grid, restore_prediction
from medseg.inference.segmenter import Segmenter
from medseg.io import read_volume

SHAPE = (24, 20, 16)
SPACING = (0.8, 1.1, 2.5)
CENTRE = (11.0, 9.0, 7.0)


def _sphere_scan(path, kind: str, *, qform_code: int = 1, sform_code: int = 1):
    """A bright ball (1000 HU) in a dimmer box (40 HU) on zero background, written as NIfTI."""
    truth = sphere_mask(SHAPE, center=CENTRE, radius=6.0, spacing=SPACING)
    image = np.zeros(SHAPE, dtype=np.int16)
    image[2:22, 2:18, 1:15] = 40
    image[truth] = 1000
    img = nib.Nifti1Image(image, make_affine(kind))
    img.set_qform(make_affine(kind), code=qform_code)
    img.set_sform(make_affine(kind), code=sform_code)
    nib.save(img, path)
    return truth


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    index = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ index + affine[:3, 3]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def threshold_model(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("models") / "threshold", make_plan(target_spacing=(1.5, 1.5, 1.5)))


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_mask_has_input_shape_affine_and_codes_and_sphere_in_place(tmp_path, threshold_model, kind):
    scan = tmp_path / "scan.nii.gz"
    truth = _sphere_scan(scan, kind, qform_code=1, sform_code=2)
    seg = Segmenter.load(threshold_model, device="cpu")
    prediction = seg.predict(scan)
    out = prediction.save(tmp_path / "scan_mask.nii.gz")

    written, source = nib.load(out), nib.load(scan)
    assert written.shape == source.shape == SHAPE
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    mask = np.asarray(written.dataobj) == 1
    assert _dice(mask, truth) > 0.95
    distance = np.linalg.norm(_world_centroid(mask, written.affine) - _world_centroid(truth, source.affine))
    assert distance < 0.3  # mm: the ball is where it is in the patient, not flipped or shifted


def test_2d_model_on_3d_data_matches_the_3d_model(tmp_path, threshold_model):
    scan = tmp_path / "scan.nii.gz"
    _sphere_scan(scan, "oblique")
    plan2d = make_plan(spatial_dims=2, patch_size=(16, 16), slice_context=1, slice_axis=2, target_spacing=(1.5, 1.5, 1.5))
    model2d = save_model(tmp_path / "m2d", plan2d)
    mask3d = Segmenter.load(threshold_model, device="cpu").predict(scan).mask
    mask2d = Segmenter.load(model2d, device="cpu").predict(scan).mask
    assert mask2d.shape == SHAPE
    np.testing.assert_array_equal(mask2d, mask3d)


def test_2d_scan_with_2d_model_keeps_its_grid(tmp_path):
    plan = make_plan(spatial_dims=2, data_dims=2, patch_size=(16, 16), target_spacing=(1.0, 1.0))
    model = save_model(tmp_path / "m", plan)
    disc = sphere_mask((40, 30), center=(25, 12), radius=7.0, spacing=(0.7, 1.3))
    image = np.where(disc, 1000, 30).astype(np.int16)
    affine = make_affine("LPS", spacing=(0.7, 1.3, 1.0))
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "slice.nii.gz")
    prediction = Segmenter.load(model, device="cpu").predict(tmp_path / "slice.nii.gz")
    written = nib.load(prediction.save(tmp_path / "slice_mask.nii.gz"))
    assert written.shape == (40, 30)
    np.testing.assert_allclose(written.affine, nib.load(tmp_path / "slice.nii.gz").affine, atol=1e-4)
    assert _dice(np.asarray(written.dataobj) == 1, disc) > 0.93


def test_label_values_of_the_training_data_are_written(tmp_path):
    plan = make_plan(label_values=[0, 7])
    model = save_model(tmp_path / "m", plan)
    scan = tmp_path / "scan.nii.gz"
    truth = _sphere_scan(scan, "RAS")
    mask = Segmenter.load(model, device="cpu").predict(scan).mask
    assert set(np.unique(mask).tolist()) == {0, 7}
    assert _dice(mask == 7, truth) > 0.95


def test_real_dicom_series_mask_lies_on_the_series_grid(shared_data, tmp_path):
    series = shared_data / "ct_dicom_series"
    volume = read_volume(series)
    # segment the body (> -300 HU) on a coarse 2.5 x 2.5 x 4 mm plan grid
    plan = make_plan(target_spacing=(2.5, 2.5, 4.0), patch_size=(64, 64, 16))
    model = save_model(tmp_path / "body", plan, options={"threshold": -3.0})
    prediction = Segmenter.load(model, device="cpu").predict(series)
    assert prediction.mask.shape == volume.geometry.shape == (512, 512, 20)
    assert prediction.geometry.same_grid(volume.geometry, atol_mm=1e-6)
    out = prediction.save(tmp_path / "series_mask.nii.gz")
    assert read_volume(out).geometry.same_grid(volume.geometry, atol_mm=1e-3)
    body = volume.array[0] > -300
    predicted = prediction.mask == 1
    assert _dice(predicted, body) > 0.97
    assert np.linalg.norm(
        _world_centroid(predicted, volume.geometry.affine) - _world_centroid(body, volume.geometry.affine)
    ) < 1.0


def test_restore_refuses_scores_off_the_plan_grid(tmp_path):
    import torch

    truth = _sphere_scan(tmp_path / "scan.nii.gz", "PIR")
    case = preprocess_case(read_volume(tmp_path / "scan.nii.gz"), make_plan())
    check_restored_grid(case.record)  # the recorded chain lands on the scan
    with pytest.raises(GeometryError, match="not on the plan grid"):
        restore_prediction(torch.zeros(2, 3, 3, 3), case.record)
    assert truth.any()


def test_restore_with_probabilities_puts_background_outside_the_crop(tmp_path):
    import torch

    _sphere_scan(tmp_path / "scan.nii.gz", "LPS")
    case = preprocess_case(read_volume(tmp_path / "scan.nii.gz"), make_plan())
    assert case.record.shape_after_crop != case.record.shape_after_orient  # the zero border was cropped
    logits = torch.zeros((2, *case.image.shape[1:]))
    logits[1] = torch.from_numpy(case.image[0] - 5.0)
    classes, probs = restore_prediction(logits, case.record, probabilities=True)
    assert probs.shape == (2, *SHAPE) and probs.dtype == np.uint8
    outside = np.ones(SHAPE, dtype=bool)
    outside[2:22, 2:18, 1:15] = False
    assert np.all(probs[0][outside] == 255) and np.all(probs[1][outside] == 0)
    clear = np.abs(probs[0].astype(int) - probs[1]) > 1  # away from ties lost to uint8 rounding
    np.testing.assert_array_equal(classes[clear], np.argmax(probs, axis=0)[clear])


@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_restore_resamples_only_around_computed_scores_with_the_same_result(tmp_path, kind):
    import torch

    from medseg.data.preprocess import restore_mask
    from medseg.inference.restore import argmax_channels, informative_box
    from medseg.inference.sliding_window import BACKGROUND_MARGIN
    from medseg.spatial import resample_slabs

    _sphere_scan(tmp_path / "scan.nii.gz", "PIR")
    case = preprocess_case(read_volume(tmp_path / "scan.nii.gz"), make_plan(num_classes=3))
    shape = case.image.shape[1:]
    scores = torch.full((3, *shape), -BACKGROUND_MARGIN)
    scores[0] = 0.0  # what the sliding window leaves where no window ran
    inner = tuple(slice(n // 4, n - n // 4) for n in shape)
    scores[(slice(None), *inner)] = torch.randn((3, *scores[(0, *inner)].shape), generator=torch.Generator().manual_seed(0))
    if kind == "probs":
        scores = torch.softmax(scores, dim=0)
    crop_shape = case.record.shape_after_crop
    separate = case.record.separate_axis
    box = informative_box(scores, crop_shape, kind=kind, separate_axis=separate)
    assert all(b - a < n for (a, b), n in zip(box, crop_shape))  # a real saving on every axis
    classes, probs = restore_prediction(scores, case.record, kind=kind, probabilities=True)
    # reference: resample every voxel, then argmax / uint8 probabilities
    axis = separate if separate is not None else int(np.argmax(crop_shape))
    ref = np.empty(crop_shape, dtype=np.uint8)
    ref_p = np.empty((3, *crop_shape), dtype=np.uint8)
    gap = np.empty(crop_shape, dtype=np.float32)  # top-1 minus top-2 score: ties may go either way
    for start, stop, slab in resample_slabs(scores, crop_shape, separate_axis=separate, axis=axis):
        np.moveaxis(ref, axis, 0)[start:stop] = argmax_channels(slab).numpy()
        top = slab.topk(2, dim=0).values
        np.moveaxis(gap, axis, 0)[start:stop] = (top[0] - top[1]).numpy()
        p = torch.softmax(slab, dim=0) if kind == "logits" else slab
        np.moveaxis(ref_p, 1 + axis, 1)[:, start:stop] = p.mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    clear = restore_mask(gap > 1e-4, case.record) | ~restore_mask(np.ones(crop_shape, dtype=bool), case.record)
    np.testing.assert_array_equal(classes[clear], restore_mask(ref, case.record)[clear])
    assert clear.mean() > 0.99
    restored_p = np.stack([restore_mask(ref_p[c], case.record) for c in range(3)])
    inside = np.zeros(SHAPE, dtype=bool)
    inside[2:22, 2:18, 1:15] = True  # the crop box (outside it restore_mask's fill is 0 for every class)
    assert np.abs(probs[:, inside].astype(int) - restored_p[:, inside]).max() <= 1  # float rounding only
    assert classes.any() and (classes == 0).any()
