"""Lesion-wise metrics on hand-made multi-lesion volumes: hits, misses, false positives, splits, merges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg import metrics as M
from medseg.errors import ConfigError

SHAPE = (30, 20, 12)
SPACING = (1.0, 1.0, 1.0)  # one voxel = 0.001 mL


def boxes(*extents, shape=SHAPE):
    mask = np.zeros(shape, dtype=bool)
    for lo, hi in extents:
        mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


A = ((2, 2, 2), (6, 6, 6))  # 64 voxels
B = ((10, 2, 2), (12, 4, 8))  # 2 x 2 x 6 = 24 voxels
C = ((20, 10, 2), (23, 13, 5))  # 27 voxels
F = ((25, 15, 8), (27, 17, 10))  # 8 voxels, far from every reference lesion


def test_exact_match_of_two_lesions():
    gt = boxes(A, C)
    s = M.lesion_scores(gt, gt, spacing=SPACING)
    assert (s.tp, s.fp, s.fn, s.n_gt, s.n_pred) == (2, 0, 0, 2, 2)
    assert s.detection_sensitivity == 1.0 and s.lesion_precision == 1.0 and s.lesion_dice == 1.0
    assert [les.volume_ml for les in s.lesions] == pytest.approx([0.064, 0.027])


def test_missed_lesion_and_false_positive():
    gt = boxes(A, C)
    pred = boxes(A, F)
    s = M.lesion_scores(pred, gt, spacing=SPACING)
    assert (s.tp, s.fp, s.fn) == (1, 1, 1)
    assert s.detection_sensitivity == 0.5
    assert s.lesion_precision == 0.5
    assert s.lesion_dice == pytest.approx((1.0 + 0.0) / (2 + 1))  # missed -> 0, FP adds a 0 entry
    missed = next(les for les in s.lesions if les.kind == "reference" and not les.detected)
    assert missed.dice == 0.0 and missed.pred_voxels == 0 and missed.volume_ml == pytest.approx(0.027)
    fp = next(les for les in s.lesions if les.kind == "false_positive")
    assert fp.voxels == 8 and fp.volume_ml == pytest.approx(0.008) and math.isnan(fp.dice)


def test_lesion_split_into_two_predicted_components_is_one_detection():
    gt = boxes(B)
    pred = boxes(((10, 2, 2), (12, 4, 4)), ((10, 2, 6), (12, 4, 8)))  # two 8-voxel pieces, gap of 2 slices
    s = M.lesion_scores(pred, gt, spacing=SPACING)
    assert (s.tp, s.fp, s.fn, s.n_pred) == (1, 0, 0, 2)
    (lesion,) = s.lesions
    assert lesion.matched == (1, 2)
    assert lesion.overlap_voxels == 16 and lesion.pred_voxels == 16
    assert lesion.dice == pytest.approx(2 * 16 / (24 + 16))
    assert s.lesion_dice == pytest.approx(0.8)


def test_two_lesions_merged_by_one_prediction_are_both_detected_with_lower_dice():
    gt = boxes(((2, 2, 2), (5, 5, 5)), ((8, 2, 2), (11, 5, 5)))  # two 27-voxel cubes, 3 voxels apart
    pred = boxes(((2, 2, 2), (11, 5, 5)))  # one bar covering both and the gap: 81 voxels
    s = M.lesion_scores(pred, gt, spacing=SPACING)
    assert (s.tp, s.fp, s.fn, s.n_pred) == (2, 0, 0, 1)
    for lesion in s.lesions:
        assert lesion.matched == (1,)
        assert lesion.dice == pytest.approx(2 * 27 / (27 + 81))
    assert s.lesion_dice == pytest.approx(0.5)


def test_match_threshold_turns_a_weak_overlap_into_a_miss_and_a_false_positive():
    gt = boxes(A)  # 64 voxels
    pred = boxes(((5, 5, 5), (9, 9, 9)))  # 64 voxels, 1 shared: IoU 1/127
    loose = M.lesion_scores(pred, gt, spacing=SPACING)
    assert (loose.tp, loose.fp, loose.fn) == (1, 0, 0)
    assert loose.lesion_dice == pytest.approx(2 / 128)
    strict = M.lesion_scores(pred, gt, spacing=SPACING, options=M.LesionOptions(match_iou=0.1))
    assert (strict.tp, strict.fp, strict.fn) == (0, 1, 1)
    assert strict.lesion_dice == 0.0 and strict.detection_sensitivity == 0.0
    assert strict.lesions[0].overlap_voxels == 1 and not strict.lesions[0].detected


def test_connectivity_decides_whether_diagonal_voxels_are_one_lesion():
    gt = np.zeros((6, 6, 6), dtype=bool)
    gt[1, 1, 1] = gt[2, 2, 2] = True  # touch at a corner only
    full = M.lesion_scores(gt, gt, spacing=SPACING)
    faces = M.lesion_scores(gt, gt, spacing=SPACING, options=M.LesionOptions(connectivity=1))
    assert full.n_gt == 1 and faces.n_gt == 2


def test_min_voxels_ignores_tiny_components():
    gt = boxes(A)
    pred = boxes(A)
    pred[20, 15, 10] = True  # 1-voxel false positive
    assert M.lesion_scores(pred, gt, spacing=SPACING).fp == 1
    kept = M.lesion_scores(pred, gt, spacing=SPACING, options=M.LesionOptions(min_voxels=2))
    assert kept.fp == 0 and kept.n_pred == 1


def test_empty_reference_and_prediction_follow_the_empty_policy():
    none = np.zeros(SHAPE, dtype=bool)
    nan = M.lesion_scores(none, none, spacing=SPACING)
    assert (nan.tp, nan.fp, nan.fn) == (0, 0, 0)
    assert math.isnan(nan.lesion_dice) and math.isnan(nan.detection_sensitivity)
    one = M.lesion_scores(none, none, spacing=SPACING, empty="one")
    assert one.lesion_dice == 1.0 and one.detection_sensitivity == 1.0


def test_false_positives_on_a_lesion_free_case_are_counted():
    none = np.zeros(SHAPE, dtype=bool)
    s = M.lesion_scores(boxes(A, F), none, spacing=SPACING)
    assert (s.tp, s.fp, s.fn) == (0, 2, 0)
    assert s.lesion_dice == 0.0 and s.lesion_precision == 0.0
    assert math.isnan(s.detection_sensitivity)  # no reference lesion: undefined, counted as not valid


def test_missed_everything():
    s = M.lesion_scores(np.zeros(SHAPE, dtype=bool), boxes(A, C), spacing=SPACING)
    assert (s.tp, s.fp, s.fn) == (0, 0, 2)
    assert s.detection_sensitivity == 0.0 and s.lesion_dice == 0.0 and math.isnan(s.lesion_precision)


def test_lesion_volumes_use_the_spacing():
    gt = boxes(C)
    s = M.lesion_scores(gt, gt, spacing=(0.5, 2.0, 3.0))
    assert s.lesions[0].volume_ml == pytest.approx(27 * 3.0 / 1000)


def test_compute_scores_adds_lesion_metrics_per_class():
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[boxes(A)] = 1
    labels[boxes(C)] = 2
    pred = labels.copy()
    pred[boxes(F)] = 2  # false positive of class 2 only
    s = M.compute_scores(
        pred, labels, spacing=SPACING, labels={1: "necrosis", 2: "edema"}, metrics="dice", lesion=True
    )
    assert s["necrosis"]["lesion_tp"] == 1 and s["necrosis"]["lesion_fp"] == 0
    assert s["edema"]["lesion_tp"] == 1 and s["edema"]["lesion_fp"] == 1
    assert s["edema"]["lesion_dice"] == pytest.approx(0.5)
    assert set(M.LESION_METRICS) <= set(s["edema"])


def test_bad_lesion_options_are_refused():
    with pytest.raises(ConfigError, match=r"lesion match_iou must be in \[0, 1\), got 1.5"):
        M.LesionOptions(match_iou=1.5)
    with pytest.raises(ConfigError, match="lesion connectivity 3 is larger than the 2 image dimensions"):
        M.lesion_scores(
            np.ones((3, 3), bool),
            np.ones((3, 3), bool),
            spacing=(1, 1),
            options=M.LesionOptions(connectivity=3),
        )
