"""medseg.metrics: hand-computed values, the empty-mask policy, spacing, and agreement with MONAI / DeepMind."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from medseg import metrics as M
from medseg.errors import ArrayValueError, ConfigError, GeometryError

# DeepMind's package imports deprecated scipy namespaces
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:surface_distance")

NAN = float("nan")
INF = float("inf")


def blobs(shape, num_classes, seed, sigma=2.0, threshold=0.1):
    """Smooth random label map: argmax of smoothed noise, background where all channels are low."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(
        rng.standard_normal((num_classes, *shape)), sigma=(0, *[sigma] * len(shape))
    )
    labels = np.argmax(field, axis=0) + 1
    labels[field.max(axis=0) < threshold] = 0
    return labels.astype(np.uint8)


def box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


# --------------------------------------------------------------------------------------
# overlap
# --------------------------------------------------------------------------------------
def test_overlap_metrics_match_hand_computed_counts():
    gt = np.zeros((4, 5), dtype=np.uint8)
    pred = np.zeros((4, 5), dtype=np.uint8)
    gt[0, :4] = 1  # 4 reference voxels
    pred[0, 1:] = 1  # 4 predicted voxels: tp 3, fp 1, fn 1, tn 15
    pred[3, 4] = 2
    scores = M.compute_scores(
        pred,
        gt,
        spacing=(10.0, 10.0),
        labels={1: "a", 2: "b"},
        metrics="dice,iou,precision,recall,specificity,accuracy,avd,rvd,pred_volume,gt_volume",
    )
    a = scores["a"]
    assert a["dice"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert a["iou"] == pytest.approx(3 / 5)
    assert a["precision"] == pytest.approx(3 / 4)
    assert a["recall"] == pytest.approx(3 / 4)
    assert a["specificity"] == pytest.approx(15 / 16)
    assert a["accuracy"] == pytest.approx(18 / 20)
    # 2D "voxel" of 10 x 10 mm counts as 100 mm^3 = 0.1 mL (unit depth)
    assert a["pred_volume"] == pytest.approx(0.4)
    assert a["gt_volume"] == pytest.approx(0.4)
    assert a["avd"] == pytest.approx(0.0)
    assert a["rvd"] == pytest.approx(0.0)
    b = scores["b"]  # false positive only: reference empty
    assert b["dice"] == 0.0 and b["iou"] == 0.0 and b["precision"] == 0.0
    assert math.isnan(b["recall"]) and math.isnan(b["rvd"])
    assert b["avd"] == pytest.approx(0.1)


def test_confusion_matrix_is_one_pass_and_equals_per_class_counts(rng, monkeypatch):
    monkeypatch.setattr(M, "_CHUNK", 1000)  # force several bincount chunks
    pred = rng.integers(0, 5, size=(23, 17, 11)).astype(np.uint8)
    gt = rng.integers(0, 5, size=(23, 17, 11)).astype(np.int16)
    matrix = M.confusion_matrix(pred, gt)
    expected = np.array([[np.sum((pred == p) & (gt == g)) for g in range(5)] for p in range(5)])
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.sum() == pred.size


def test_confusion_matrix_with_sparse_large_labels():
    pred = np.array([0, 5000, 5000, 7], dtype=np.uint16)
    gt = np.array([0, 5000, 7, 7], dtype=np.uint16)
    matrix = M.confusion_matrix(pred, gt)
    assert matrix.shape == (5001, 5001)
    assert matrix[5000, 5000] == 1 and matrix[5000, 7] == 1 and matrix[7, 7] == 1 and matrix[0, 0] == 1


def test_float_masks_with_whole_numbers_are_accepted_and_fractions_refused():
    gt = np.array([[0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    assert M.compute_scores(gt, gt, spacing=(1, 1), metrics="dice")["2"]["dice"] == 1.0
    with pytest.raises(ArrayValueError, match=r"non-integer values.*probabilities"):
        M.compute_scores(gt * 0.5, gt, spacing=(1, 1), metrics="dice")
    with pytest.raises(ArrayValueError, match="negative labels"):
        M.compute_scores(-gt.astype(np.int16), gt, spacing=(1, 1), metrics="dice")


def test_labels_outside_the_known_labels_are_refused():
    gt = np.array([[0, 1], [1, 3]], dtype=np.uint8)
    with pytest.raises(ArrayValueError, match=r"label values \[3\] are not among the known labels \[0, 1\]"):
        M.compute_scores(gt, gt, spacing=(1, 1), labels={1: "liver"}, metrics="dice")


def test_unknown_metric_names_suggest_the_closest():
    assert M.resolve_metrics("dice, jaccard,sensitivity") == ("dice", "iou", "recall")
    with pytest.raises(ConfigError, match=r"unknown metric 'dise'\. Did you mean 'dice'"):
        M.resolve_metrics("dise,hd95")


def test_shape_mismatch_is_refused():
    with pytest.raises(
        GeometryError, match=r"prediction shape \(3, 4\) differs from reference shape \(4, 3\)"
    ):
        M.compute_scores(np.zeros((3, 4), np.uint8), np.zeros((4, 3), np.uint8), spacing=(1, 1))


# --------------------------------------------------------------------------------------
# surfaces, hand-computed
# --------------------------------------------------------------------------------------
def test_voxel_surface_distances_between_single_voxels_use_spacing():
    pred = np.zeros((6, 6), dtype=bool)
    gt = np.zeros((6, 6), dtype=bool)
    pred[0, 0] = True
    gt[3, 4] = True
    d_pg, d_gp, areas_p, areas_g = M.surface_distances(pred, gt, spacing=(1.0, 1.0), surface="voxel")
    assert d_pg.tolist() == [5.0] and d_gp.tolist() == [5.0]
    assert areas_p is None and areas_g is None  # voxel surfaces: every voxel counts once
    d_pg, _, _, _ = M.surface_distances(pred, gt, spacing=(2.0, 1.0), surface="voxel")
    assert d_pg[0] == pytest.approx(math.sqrt(6**2 + 4**2))
    scores = M.distance_scores(d_pg, d_pg, tolerance_mm=7.3)
    assert scores["hd"] == scores["hd95"] == scores["assd"] == pytest.approx(math.sqrt(52))
    assert scores["nsd"] == 1.0
    assert M.distance_scores(d_pg, d_pg, tolerance_mm=7.2)["nsd"] == 0.0


def test_voxel_surface_metrics_of_a_shortened_line_by_hand():
    gt = np.zeros((3, 12), dtype=np.uint8)
    pred = np.zeros((3, 12), dtype=np.uint8)
    gt[1, 0:10] = 1  # a one-voxel-thick line: every voxel is on its surface
    pred[1, 0:5] = 1
    s = M.compute_scores(
        pred, gt, spacing=(1.0, 1.0), metrics="hd,hd95,assd,nsd", tolerance_mm=2.0, surface="voxel"
    )["1"]
    # pred -> gt: five zeros; gt -> pred: five zeros and 1, 2, 3, 4, 5
    assert s["hd"] == 5.0
    assert s["hd95"] == pytest.approx(4.55)  # linear 95th percentile of [0]*5 + [1..5] (index 8.55)
    assert s["assd"] == pytest.approx(15 / 15)
    assert s["nsd"] == pytest.approx((5 + 7) / 15)


def test_voxel_surface_is_the_face_connected_boundary_of_scipy_erosion(rng):
    mask = ndimage.binary_opening(rng.random((20, 18, 14)) > 0.4)
    d_pg = M.surface_distances(mask, mask, spacing=(1, 1, 1), surface="voxel").pred_to_gt
    boundary = mask & ~ndimage.binary_erosion(mask)  # default structure = faces, border counts as outside
    assert d_pg.size == int(boundary.sum())
    assert np.all(d_pg == 0)


@pytest.mark.parametrize("surface", ["surfel", "voxel"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shift_along_an_anisotropic_axis_scales_distances_by_that_spacing(axis, surface):
    spacing = (0.5, 1.5, 3.0)
    shape = (20, 20, 20)
    gt = box(shape, (5, 5, 5), (12, 13, 11))
    pred = np.roll(gt, 2, axis=axis)
    s = M.compute_scores(
        pred.astype(np.uint8), gt.astype(np.uint8), spacing=spacing, metrics="hd,hd95", surface=surface
    )["1"]
    assert s["hd"] == 2 * spacing[axis]  # exact: distances come from integer steps times the spacing
    assert s["hd95"] <= s["hd"]
    iso = M.compute_scores(
        pred.astype(np.uint8), gt.astype(np.uint8), spacing=(1, 1, 1), metrics="hd", surface=surface
    )["1"]
    assert iso["hd"] == pytest.approx(2.0)


@pytest.mark.parametrize("surface", ["surfel", "voxel"])
def test_scaling_the_spacing_scales_distances_and_volumes(surface):
    gt = blobs((24, 20, 16), 2, seed=3)
    pred = np.roll(blobs((24, 20, 16), 2, seed=3), 1, axis=1)
    metrics = "hd,hd95,assd,pred_volume,avd,dice"
    base = M.compute_scores(pred, gt, spacing=(0.8, 1.1, 2.5), metrics=metrics, surface=surface)
    scaled = M.compute_scores(pred, gt, spacing=(1.6, 2.2, 5.0), metrics=metrics, surface=surface)
    for cls in base:
        for m in ("hd", "hd95", "assd"):
            assert scaled[cls][m] == pytest.approx(2 * base[cls][m])
        assert scaled[cls]["pred_volume"] == pytest.approx(8 * base[cls]["pred_volume"])
        assert scaled[cls]["dice"] == base[cls]["dice"]


def test_nsd_tolerance_per_class():
    gt = np.zeros((10, 10), np.uint8)
    gt[2:5, 2:5] = 1
    gt[6:9, 6:9] = 2
    pred = np.roll(gt, 1, axis=0)
    s = M.compute_scores(
        pred, gt, spacing=(2.0, 1.0), labels={1: "a", 2: "b"}, metrics="nsd", tolerance_mm={"a": 2.0, 2: 1.0}
    )
    assert s["a"]["nsd"] == 1.0  # every point is within one 2 mm step
    assert s["b"]["nsd"] < 1.0
    with pytest.raises(ConfigError, match="no NSD tolerance for class 'b'"):
        M.compute_scores(
            pred, gt, spacing=(2.0, 1.0), labels={1: "a", 2: "b"}, metrics="nsd", tolerance_mm={"a": 2.0}
        )


# --------------------------------------------------------------------------------------
# spacing is required
# --------------------------------------------------------------------------------------
def test_surface_metrics_refuse_unknown_spacing():
    gt = np.ones((4, 4), np.uint8)
    with pytest.raises(GeometryError, match="surface metrics need the voxel spacing in mm"):
        M.compute_scores(gt, gt, spacing=None, metrics="dice,hd95")
    with pytest.raises(GeometryError, match="must be a finite, positive size in mm"):
        M.compute_scores(gt, gt, spacing=(1.0, 0.0), metrics="hd95")
    with pytest.raises(GeometryError, match="has 3 entries but the masks have 2 spatial dimensions"):
        M.surface_distances(gt, gt, spacing=(1.0, 1.0, 1.0))
    # overlap ratios need no spacing
    assert M.compute_scores(gt, gt, spacing=None, metrics="dice,iou")["1"] == {"dice": 1.0, "iou": 1.0}


# --------------------------------------------------------------------------------------
# empty-mask policy (docs/metrics.md, table of the four cases)
# --------------------------------------------------------------------------------------
ALL = "dice,iou,precision,recall,specificity,accuracy,avd,rvd,pred_volume,gt_volume,hd,hd95,assd,nsd"


def _case(kind):
    gt = np.zeros((8, 8, 4), np.uint8)
    pred = np.zeros((8, 8, 4), np.uint8)
    if kind in ("both", "gt_only"):
        gt[2:4, 2:4, 1:3] = 1
    if kind in ("both", "pred_only"):
        pred[3:5, 2:4, 1:3] = 1
    return pred, gt


EXPECTED = {
    ("neither", "nan"): {
        "dice": NAN,
        "iou": NAN,
        "precision": NAN,
        "recall": NAN,
        "rvd": NAN,
        "hd": NAN,
        "hd95": NAN,
        "assd": NAN,
        "nsd": NAN,
        "avd": 0.0,
        "pred_volume": 0.0,
        "gt_volume": 0.0,
        "specificity": 1.0,
        "accuracy": 1.0,
    },
    ("neither", "one"): {
        "dice": 1.0,
        "iou": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "rvd": 0.0,
        "hd": 0.0,
        "hd95": 0.0,
        "assd": 0.0,
        "nsd": 1.0,
        "avd": 0.0,
        "pred_volume": 0.0,
        "gt_volume": 0.0,
        "specificity": 1.0,
        "accuracy": 1.0,
    },
    ("pred_only", "nan"): {
        "dice": 0.0,
        "iou": 0.0,
        "precision": 0.0,
        "recall": NAN,
        "rvd": NAN,
        "hd": INF,
        "hd95": INF,
        "assd": INF,
        "nsd": 0.0,
        "avd": 0.008,
        "pred_volume": 0.008,
        "gt_volume": 0.0,
    },
    ("gt_only", "nan"): {
        "dice": 0.0,
        "iou": 0.0,
        "precision": NAN,
        "recall": 0.0,
        "rvd": -1.0,
        "hd": INF,
        "hd95": INF,
        "assd": INF,
        "nsd": 0.0,
        "avd": 0.008,
        "pred_volume": 0.0,
        "gt_volume": 0.008,
    },
}
EXPECTED[("pred_only", "one")] = EXPECTED[("pred_only", "nan")]  # the policy only changes both-empty
EXPECTED[("gt_only", "one")] = EXPECTED[("gt_only", "nan")]


@pytest.mark.parametrize(("kind", "empty"), sorted(EXPECTED))
def test_empty_mask_policy_table(kind, empty):
    pred, gt = _case(kind)
    scores = M.compute_scores(
        pred, gt, spacing=(1.0, 1.0, 1.0), labels={1: "lesion"}, metrics=ALL, empty=empty
    )
    got = scores["lesion"]
    for metric, want in EXPECTED[(kind, empty)].items():
        if math.isnan(want):
            assert math.isnan(got[metric]), (metric, got[metric])
        else:
            assert got[metric] == pytest.approx(want), (metric, got[metric])


def test_empty_case_scores_are_what_an_absent_class_gets():
    pred, gt = _case("neither")
    for empty in ("nan", "one"):
        direct = M.compute_scores(pred, gt, spacing=(1, 1, 1), labels={1: "x"}, metrics=ALL, empty=empty)["x"]
        filler = M.empty_case_scores(ALL, empty=empty)
        np.testing.assert_equal(filler, direct)


def test_worst_distance_cap_for_one_empty_mask():
    pred, gt = _case("gt_only")
    spacing = (0.5, 1.0, 2.0)
    diag = M.compute_scores(pred, gt, spacing=spacing, metrics="hd95,assd", worst_distance="diagonal")["1"]
    assert diag["hd95"] == diag["assd"] == pytest.approx(math.sqrt(4**2 + 8**2 + 8**2))
    fixed = M.compute_scores(pred, gt, spacing=spacing, metrics="hd", worst_distance=373.13)["1"]
    assert fixed["hd"] == 373.13
    with pytest.raises(ConfigError, match="worst_distance must be 'inf', 'diagonal' or a number of mm"):
        M.compute_scores(pred, gt, spacing=spacing, metrics="hd", worst_distance="max")


def test_empty_policy_name_is_checked():
    pred, gt = _case("both")
    with pytest.raises(ConfigError, match="empty-mask policy must be 'nan' or 'one', got 'zero'"):
        M.compute_scores(pred, gt, spacing=(1, 1, 1), empty="zero")


# --------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------
def test_summarize_excludes_and_counts_nan_and_keeps_inf():
    s = M.summarize([0.5, NAN, 1.0, 0.0])
    assert s["n_valid"] == 3 and s["n_total"] == 4 and s["n_inf"] == 0
    assert (
        s["mean"] == pytest.approx(0.5)
        and s["median"] == 0.5
        and s["std"] == pytest.approx(np.std([0.5, 1, 0]))
    )
    d = M.summarize([2.0, INF, 4.0, NAN])
    assert d["mean"] == INF and d["std"] == INF and d["median"] == 4.0
    assert (d["n_valid"], d["n_total"], d["n_inf"]) == (3, 4, 1)
    none = M.summarize([NAN, NAN])
    assert none["n_valid"] == 0 and math.isnan(none["mean"])


def test_aggregate_per_class_and_foreground_mean():
    cases = [
        {"liver": {"dice": 0.9}, "tumour": {"dice": 0.5}},
        {"liver": {"dice": 0.7}, "tumour": {"dice": NAN}},
    ]
    out = M.aggregate(cases)
    assert out["liver"]["dice"]["mean"] == pytest.approx(0.8)
    assert out["tumour"]["dice"]["n_valid"] == 1 and out["tumour"]["dice"]["n_total"] == 2
    assert out["foreground_mean"]["dice"]["mean"] == pytest.approx((0.8 + 0.5) / 2)


def test_regions_are_scored_as_unions_of_labels():
    gt = blobs((20, 18, 12), 3, seed=7)
    pred = np.roll(gt, 1, axis=0)
    s = M.compute_scores(
        pred, gt, spacing=(1, 1, 2), regions={"WT": [1, 2, 3], "TC": [1, 3]}, metrics="dice,hd95,nsd"
    )
    wt = M.compute_scores(
        (pred > 0).astype(np.uint8), (gt > 0).astype(np.uint8), spacing=(1, 1, 2), metrics="dice,hd95,nsd"
    )["1"]
    assert s["WT"] == pytest.approx(wt)
    tc_p, tc_g = np.isin(pred, [1, 3]), np.isin(gt, [1, 3])
    assert s["TC"]["dice"] == pytest.approx(2 * (tc_p & tc_g).sum() / (tc_p.sum() + tc_g.sum()))
    assert list(s) == ["1", "2", "3", "WT", "TC"]


# --------------------------------------------------------------------------------------
# agreement with MONAI (same definitions: face-connected voxel boundary, spacing in mm)
# --------------------------------------------------------------------------------------
def _monai_scores(pred, gt, num_classes, spacing, tolerance):
    import torch
    from monai.metrics import (
        DiceMetric,
        HausdorffDistanceMetric,
        MeanIoU,
        SurfaceDiceMetric,
        SurfaceDistanceMetric,
    )

    def one_hot(a):
        t = torch.from_numpy(a.astype(np.int64))
        return torch.nn.functional.one_hot(t, num_classes + 1).movedim(-1, 0)[None].float()

    p, g = one_hot(pred), one_hot(gt)
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "dice": DiceMetric(include_background=False, ignore_empty=False)(p, g),
            "iou": MeanIoU(include_background=False, ignore_empty=False)(p, g),
            "hd": HausdorffDistanceMetric(include_background=False)(p, g, spacing=sp),
            "hd95": HausdorffDistanceMetric(include_background=False, percentile=95)(p, g, spacing=sp),
            "assd": SurfaceDistanceMetric(include_background=False, symmetric=True)(p, g, spacing=sp),
            "nsd": SurfaceDiceMetric(
                [tolerance] * num_classes, include_background=False, use_subvoxels=False
            )(p, g, spacing=sp),
        }
    return {k: v.numpy().ravel().astype(np.float64) for k, v in out.items()}


@pytest.mark.parametrize(
    ("shape", "spacing", "shift"),
    [
        ((30, 26, 18), (0.8, 1.1, 2.5), (2, 0, 1)),
        ((30, 26, 18), (1.0, 1.0, 1.0), (0, -3, 0)),
        ((48, 40), (0.7, 1.9), (1, 2)),
    ],
)
def test_voxel_surfaces_agree_with_monai_on_random_and_shifted_shapes(shape, spacing, shift):
    num_classes = 3
    gt = blobs(shape, num_classes, seed=11)
    pred = np.roll(blobs(shape, num_classes, seed=11, threshold=0.15), shift, axis=tuple(range(len(shape))))
    pred[blobs(shape, num_classes, seed=12) == 2] = 3  # random disagreements as well as a shift
    for c in range(1, num_classes + 1):
        assert (gt == c).any() and (pred == c).any()
    tolerance = 1.5
    ours = M.compute_scores(
        pred,
        gt,
        spacing=spacing,
        labels=[1, 2, 3],
        metrics="dice,iou,hd,hd95,assd,nsd",
        tolerance_mm=tolerance,
        surface="voxel",
    )
    theirs = _monai_scores(pred, gt, num_classes, spacing, tolerance)
    for metric, values in theirs.items():
        mine = np.array([ours[str(c)][metric] for c in range(1, num_classes + 1)])
        # MONAI computes in float32: compare to 1e-6 relative
        np.testing.assert_allclose(mine, values, rtol=1e-6, atol=1e-6, err_msg=metric)


def test_voxel_surfaces_agree_with_monai_on_real_organ_labels(shared_data):
    import nibabel as nib

    img = nib.load(shared_data / "ct_organs" / "organs.nii.gz")
    gt = np.asarray(img.dataobj).astype(np.uint8)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    keep = [5, 1, 2]  # liver, spleen, right kidney -> 1, 2, 3
    raw = np.asarray(img.dataobj)
    gt = np.zeros(raw.shape, dtype=np.uint8)
    for i, value in enumerate(keep, start=1):
        gt[raw == value] = i
    pred = ndimage.binary_dilation(gt == 1, iterations=1).astype(np.uint8)  # liver over-segmented by 1 voxel
    pred[np.roll(gt, 1, axis=2) == 2] = 2  # spleen shifted by one slice
    pred[gt == 3] = 3
    ours = M.compute_scores(
        pred,
        gt,
        spacing=spacing,
        labels=[1, 2, 3],
        metrics="dice,iou,hd,hd95,assd,nsd",
        tolerance_mm=3.0,
        surface="voxel",
    )
    theirs = _monai_scores(pred, gt, 3, spacing, 3.0)
    for metric, values in theirs.items():
        mine = np.array([ours[str(c)][metric] for c in (1, 2, 3)])
        np.testing.assert_allclose(mine, values, rtol=1e-6, atol=1e-6, err_msg=metric)
    d_pg = M.surface_distances(pred == 1, gt == 1, spacing, surface="voxel").pred_to_gt
    assert d_pg.max() == pytest.approx(3.0)  # every added liver voxel is one 3 mm step from the reference
    assert ours["3"]["dice"] == 1.0


# --------------------------------------------------------------------------------------
# surfel surfaces (the default): DeepMind's surface-distance, by hand and by agreement
# --------------------------------------------------------------------------------------
def _deepmind(gt_mask, pred_mask, spacing, tolerances):
    """HD, HD95, ASSD (both directions pooled, area-weighted) and NSD per tolerance from surface-distance."""
    surface_distance = pytest.importorskip("surface_distance")
    dm = surface_distance.compute_surface_distances(gt_mask, pred_mask, spacing)
    area_g, area_p = dm["surfel_areas_gt"], dm["surfel_areas_pred"]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "hd": surface_distance.compute_robust_hausdorff(dm, 100),
            "hd95": surface_distance.compute_robust_hausdorff(dm, 95),
            "assd": (
                np.sum(dm["distances_gt_to_pred"] * area_g) + np.sum(dm["distances_pred_to_gt"] * area_p)
            )
            / (np.sum(area_g) + np.sum(area_p)),
            "directed": surface_distance.compute_average_surface_distance(dm),
        }
        for tol in tolerances:
            out[f"nsd@{tol}"] = surface_distance.compute_surface_dice_at_tolerance(dm, tol)
    return out


def test_surfel_sizes_equal_deepmind_lookup_tables():
    """Every neighbour code's surface area (3D, 256 codes) and contour length (2D, 16) at anisotropic spacing."""
    lookup = pytest.importorskip("surface_distance.lookup_tables")
    for spacing in [(0.5, 0.7, 3.0), (1.3, 0.4, 2.2)]:
        np.testing.assert_allclose(
            M._surfel_sizes(spacing),
            lookup.create_table_neighbour_code_to_surface_area(spacing),
            rtol=1e-12,
            atol=1e-12,
        )
    for spacing in [(0.5, 0.7), (1.3, 0.4)]:
        np.testing.assert_allclose(
            M._surfel_sizes(spacing),
            lookup.create_table_neighbour_code_to_contour_length(spacing),
            rtol=1e-12,
        )


def test_surfel_metrics_of_two_pixels_by_hand():
    """A pixel's contour is a diamond through its edge midpoints: 4 elements at its 4 corners, each half a
    pixel diagonal long. Shifting the pixel 3 steps along axis 1 puts two corners 2 steps and two 3 steps
    from the other contour."""
    spacing = (2.0, 0.5)
    pred = np.zeros((5, 9), dtype=bool)
    gt = np.zeros((5, 9), dtype=bool)
    gt[2, 2] = True
    pred[2, 5] = True
    d_pg, d_gp, area_p, area_g = M.surface_distances(pred, gt, spacing)
    assert sorted(d_pg) == sorted(d_gp) == [1.0, 1.0, 1.5, 1.5]
    np.testing.assert_allclose(np.concatenate([area_p, area_g]), [0.5 * math.hypot(2.0, 0.5)] * 8)
    s = M.compute_scores(pred.view(np.uint8), gt.view(np.uint8), spacing=spacing, metrics="hd,hd95,assd,nsd")[
        "1"
    ]
    assert (s["hd"], s["hd95"], s["nsd"]) == (1.5, 1.5, 0.5)  # NSD at 1 mm: half the corners
    assert s["assd"] == pytest.approx(1.25)
    voxel = M.compute_scores(
        pred.view(np.uint8), gt.view(np.uint8), spacing=spacing, metrics="assd,nsd", surface="voxel"
    )["1"]
    assert (voxel["assd"], voxel["nsd"]) == (1.5, 0.0)  # voxel centres: one point 3 steps away


def test_surfel_area_of_one_voxel_is_its_octahedron():
    """Marching cubes around one voxel: an octahedron through its face centres, area sqrt(b²c² + a²c² + a²b²)."""
    a, b, c = 0.5, 1.5, 3.0
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[1, 1, 1] = True
    dist = M.surface_distances(mask, mask, (a, b, c))
    assert dist.pred_areas.size == 8 and np.all(dist.pred_to_gt == 0)
    assert dist.pred_areas.sum() == pytest.approx(math.sqrt((b * c) ** 2 + (a * c) ** 2 + (a * b) ** 2))


def _random_pair(shape, seed):
    """Label maps with classes 1-2 in both, 3 only in the reference, 4 only in the prediction, 5 in neither."""
    gt = blobs(shape, 3, seed=seed)
    pred = np.roll(blobs(shape, 3, seed=seed, threshold=0.15), 1, axis=tuple(range(len(shape))))
    pred[blobs(shape, 3, seed=seed + 100) == 2] = 2  # random disagreements as well as a shift
    pred[pred == 3] = 0
    pred[tuple(slice(2, 6) for _ in shape)] = 4
    return pred, gt


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((30, 26, 18), (0.8, 1.1, 2.5)), ((26, 22, 14), (0.5, 0.5, 3.0)), ((48, 40), (0.7, 1.9))],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surfel_metrics_agree_with_deepmind_surface_distance(shape, spacing, seed):
    pred, gt = _random_pair(shape, seed)
    tolerances = (1.0, 2 * spacing[0], 2.7)  # 2 * spacing: distances that equal the tolerance exactly
    labels = [1, 2, 3, 4, 5]
    compared = 0
    for tol in tolerances:
        ours = M.compute_scores(
            pred,
            gt,
            spacing=spacing,
            labels=labels,
            regions={"1+2": [1, 2]},
            metrics="hd,hd95,assd,nsd",
            tolerance_mm=tol,
        )
        for name, members in [*((str(c), [c]) for c in labels), ("1+2", [1, 2])]:
            p_mask, g_mask = np.isin(pred, members), np.isin(gt, members)
            if not (p_mask.any() and g_mask.any()):
                # surface-distance defines no value with an empty mask (it even fails on NumPy 2's removed
                # np.Inf); medseg follows its documented policy: one empty -> inf and NSD 0, both -> NaN
                one_empty = p_mask.any() or g_mask.any()
                assert name in ("3", "4", "5") and one_empty == (name != "5")
                got = ours[name]
                if one_empty:
                    assert (got["hd"], got["hd95"], got["assd"], got["nsd"]) == (math.inf,) * 3 + (0.0,)
                else:
                    assert all(math.isnan(got[m]) for m in ("hd", "hd95", "assd", "nsd"))
                continue
            theirs = _deepmind(g_mask, p_mask, spacing, [tol])
            theirs["nsd"] = theirs[f"nsd@{tol}"]
            for metric in ("hd", "hd95", "assd", "nsd"):
                assert ours[name][metric] == pytest.approx(theirs[metric], abs=1e-6), (name, metric, tol)
                compared += 1
    assert compared == 3 * 4 * len(tolerances)  # classes 1, 2 and the region 1+2, every metric


@pytest.mark.parametrize("seed", [3, 4])
def test_surfel_directed_average_distances_equal_deepmind(seed):
    spacing = (0.9, 1.3, 2.7)
    pred, gt = _random_pair((24, 22, 16), seed)
    dist = M.surface_distances(pred == 1, gt == 1, spacing)
    gt_to_pred, pred_to_gt = _deepmind(gt == 1, pred == 1, spacing, [])["directed"]
    assert dist.pred_to_gt @ dist.pred_areas / dist.pred_areas.sum() == pytest.approx(pred_to_gt, abs=1e-9)
    assert dist.gt_to_pred @ dist.gt_areas / dist.gt_areas.sum() == pytest.approx(gt_to_pred, abs=1e-9)


def test_surfel_metrics_agree_with_deepmind_on_real_organ_labels(shared_data):
    import nibabel as nib

    img = nib.load(shared_data / "ct_organs" / "organs.nii.gz")
    raw = np.asarray(img.dataobj)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    gt = np.zeros(raw.shape, dtype=np.uint8)
    gt[raw == 5] = 1  # liver
    gt[raw == 1] = 2  # spleen
    pred = ndimage.binary_erosion(gt == 1, iterations=1).astype(np.uint8)
    pred[np.roll(gt, 1, axis=0) == 2] = 2
    ours = M.compute_scores(
        pred, gt, spacing=spacing, labels=[1, 2], metrics="hd,hd95,assd,nsd", tolerance_mm=3.0
    )
    for c in (1, 2):
        theirs = _deepmind(gt == c, pred == c, spacing, [3.0])
        theirs["nsd"] = theirs["nsd@3.0"]
        for metric in ("hd", "hd95", "assd", "nsd"):
            assert ours[str(c)][metric] == pytest.approx(theirs[metric], abs=1e-6), (c, metric)


def test_surfel_and_voxel_definitions_differ_on_a_two_voxel_shift():
    """The example of docs/metrics.md: both definitions are computed, and differ."""
    from conftest import sphere_mask

    spacing = (0.5, 0.5, 3.0)
    gt = sphere_mask((48, 48, 24), radius=8.0, spacing=spacing)
    pred = np.roll(gt, 2, axis=2)
    metrics = "hd,hd95,assd,nsd"
    surfel = M.compute_scores(pred.view(np.uint8), gt.view(np.uint8), spacing=spacing, metrics=metrics)["1"]
    voxel = M.compute_scores(
        pred.view(np.uint8), gt.view(np.uint8), spacing=spacing, metrics=metrics, surface="voxel"
    )["1"]
    theirs = _deepmind(gt, pred, spacing, [1.0])
    assert surfel["hd95"] == pytest.approx(theirs["hd95"], abs=1e-6)
    assert surfel["nsd"] == pytest.approx(theirs["nsd@1.0"], abs=1e-6)
    assert voxel["hd95"] != pytest.approx(surfel["hd95"]) and voxel["nsd"] != pytest.approx(surfel["nsd"])


def test_surface_option_and_areas_are_checked():
    gt = np.zeros((6, 6), np.uint8)
    gt[2:4, 2:4] = 1
    with pytest.raises(ConfigError, match=r"surface must be 'surfel' .* or 'voxel' .*, got 'mesh'"):
        M.compute_scores(gt, gt, spacing=(1, 1), metrics="hd95", surface="mesh")
    with pytest.raises(ArrayValueError, match="surface areas must be given for both directions"):
        M.distance_scores(np.zeros(3), np.zeros(2), np.ones(3))


# --------------------------------------------------------------------------------------
# voxel surfaces against DeepMind's surface-distance: Dice identical, HD bounded
# --------------------------------------------------------------------------------------
def test_dice_agrees_with_deepmind_surface_distance(rng):
    surface_distance = pytest.importorskip("surface_distance")
    gt = blobs((26, 22, 14), 1, seed=5) > 0
    pred = np.roll(blobs((26, 22, 14), 1, seed=6, threshold=0.0) > 0, 1, axis=0)
    ours = M.compute_scores(pred.astype(np.uint8), gt.astype(np.uint8), spacing=None, metrics="dice")["1"][
        "dice"
    ]
    assert ours == pytest.approx(surface_distance.compute_dice_coefficient(gt, pred), abs=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_voxel_hausdorff_differs_from_deepmind_by_at_most_one_voxel_diagonal(seed):
    """Voxel-centre boundaries lie within half a voxel diagonal of DeepMind's surfel vertices, so the
    two Hausdorff distances differ by at most one voxel diagonal (docs/metrics.md)."""
    surface_distance = pytest.importorskip("surface_distance")
    spacing = (0.8, 1.2, 2.0)
    gt = blobs((24, 22, 16), 1, seed=seed) > 0
    pred = np.roll(blobs((24, 22, 16), 1, seed=seed + 10, threshold=0.05) > 0, seed, axis=2)
    dm = surface_distance.compute_surface_distances(gt, pred, spacing)
    theirs = surface_distance.compute_robust_hausdorff(dm, 100)
    ours = M.compute_scores(
        pred.astype(np.uint8), gt.astype(np.uint8), spacing=spacing, metrics="hd", surface="voxel"
    )["1"]["hd"]
    assert abs(ours - theirs) <= float(np.linalg.norm(spacing)) + 1e-9
    assert ours > 0


def test_dice_per_class_counts_and_ignores_classes_absent_from_both():
    label = np.array([0, 1, 1, 1, 0, 0])
    pred = np.array([0, 1, 1, 0, 1, 0])
    dice = M.dice_per_class(pred, label, 3)
    assert dice[0] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert np.isnan(dice[1])


def test_dice_per_class_skips_voxels_of_the_ignore_index():
    label = np.array([0, 1, 1, 3, 3, 0])  # 3 == num_classes: the ignore label's index
    pred = np.array([0, 1, 1, 1, 2, 0])  # predictions on ignored voxels count for nothing
    dice = M.dice_per_class(pred, label, 3)
    assert dice[0] == pytest.approx(1.0)
    assert np.isnan(dice[1])
