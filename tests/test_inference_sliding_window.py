"""Sliding-window logits: blending, padding, 2D-on-3D slicing, streaming, window skipping, TTA."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from inference_support import SkewedNet, ThresholdNet, make_plan
from torch import nn

from medseg.errors import GeometryError
from medseg.inference.sliding_window import (
    BACKGROUND_MARGIN,
    body_box,
    body_mask_from_image,
    gaussian_importance,
    iter_logit_slabs,
    plan_windows,
    predict_logits,
    window_starts,
)


def test_window_starts_cover_the_axis_evenly():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(5, 16, 0.5) == [0]
    starts = window_starts(100, 32, 0.25)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert max(np.diff(starts)) <= 24  # step at most patch * (1 - overlap)


def test_gaussian_importance_peaks_in_the_centre_and_is_positive():
    g = gaussian_importance((16, 12, 8))
    assert g.shape == (16, 12, 8)
    assert float(g.max()) == pytest.approx(1.0)
    assert float(g.min()) > 0
    assert float(g[7:9, 5:7, 3:5].min()) > float(g[0, 0, 0])
    assert gaussian_importance((16, 12, 8)) is g  # cached


def test_pointwise_network_is_reproduced_exactly_by_blending():
    torch.manual_seed(0)
    net = nn.Conv3d(1, 3, 1)
    image = torch.randn(1, 40, 33, 21)
    plan = make_plan(num_classes=3)
    with torch.no_grad():
        expected = net(image[None])[0]
    got = predict_logits(net, image, plan, skip_empty=False)
    assert got.shape == (3, 40, 33, 21)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_volume_smaller_than_patch_is_padded_and_cropped_back():
    net = ThresholdNet(3, 1, 2)
    image = np.zeros((1, 10, 7, 5), dtype=np.float32)
    image[0, 2:5, 1:3, 1:4] = 10.0
    logits = predict_logits(net, image, make_plan(), skip_empty=False)
    assert logits.shape == (2, 10, 7, 5)
    np.testing.assert_array_equal(logits.argmax(0).numpy(), image[0] > 5)


def test_streaming_equals_whole_volume_accumulation_bitwise():
    net = SkewedNet(3, 1, 3, seed=1)
    image = torch.randn(1, 44, 30, 24, generator=torch.Generator().manual_seed(0))
    plan = make_plan(num_classes=3, patch_size=(12, 12, 12))
    slabs = list(iter_logit_slabs(net, image, plan, stream=True, skip_empty=False, batch_size=3))
    assert len(slabs) > 2  # the ring really streams
    axis = plan_windows(image.shape[1:], plan, 0.5).stream_axis
    bounds = [(a, b) for a, b, _ in slabs]
    assert bounds[0][0] == 0 and bounds[-1][1] == image.shape[1 + axis]
    assert all(b0[1] == b1[0] for b0, b1 in itertools.pairwise(bounds))  # in order, no gap, no overlap
    streamed = predict_logits(net, image, plan, stream=True, skip_empty=False, batch_size=3)
    whole = predict_logits(net, image, plan, stream=False, skip_empty=False, batch_size=5)
    assert torch.equal(streamed, whole)


def test_float16_output_storage_stays_close_to_float32():
    net = SkewedNet(3, 1, 2)
    image = torch.randn(1, 30, 30, 20, generator=torch.Generator().manual_seed(2))
    plan = make_plan(patch_size=(16, 16, 16))
    full = predict_logits(net, image, plan, skip_empty=False)
    half = predict_logits(net, image, plan, skip_empty=False, out_dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=2e-3)


def test_skipping_empty_windows_keeps_body_voxels_identical_and_skips_air():
    net = SkewedNet(3, 1, 2, seed=3)
    plan = make_plan(patch_size=(16, 16, 16))
    image = np.full((1, 64, 48, 40), -10.0, dtype=np.float32)  # -1000 HU air after normalisation
    image[0, 40:56, 30:44, 20:34] = np.random.default_rng(0).normal(0.5, 1.0, (16, 14, 14))
    body = body_mask_from_image(image, plan)
    timings: dict = {}
    skipped = predict_logits(net, image, plan, skip_empty=True, crop_to_body=False, timings=timings)
    full = predict_logits(net, image, plan, skip_empty=False)
    assert timings["skipped_windows"] > timings["windows"] // 2
    # same windows at body voxels (batches differ, so allow float rounding)
    inside = torch.from_numpy(body)
    torch.testing.assert_close(skipped[:, inside], full[:, inside], atol=1e-5, rtol=1e-5)
    # far from the body no window ran: background logits
    assert skipped[0, 0, 0, 0] == 0 and skipped[1, 0, 0, 0] == -BACKGROUND_MARGIN
    assert not torch.equal(skipped, full)


def test_body_crop_places_windows_over_the_body_box_only():
    plan = make_plan(patch_size=(16, 16, 16), num_classes=3)
    image = np.full((1, 80, 64, 40), -10.0, dtype=np.float32)  # air
    rng = np.random.default_rng(1)
    image[0, 30:50, 20:44, 5:35] = rng.normal(0.5, 8.0, (20, 24, 30))  # the "patient", 1/4 of the width
    body = body_mask_from_image(image, plan)
    layout = plan_windows(image.shape[1:], plan, 0.5)
    box = body_box(body, layout, margin=2)
    assert box == [(28, 52), (18, 46), (3, 37)]
    # a pointwise network: any window layout gives the same logits, so the crop must too
    net = ThresholdNet(3, 1, 3, threshold=0.5)
    crop_t: dict = {}
    skip_t: dict = {}
    cropped = predict_logits(net, image, plan, timings=crop_t)
    skipped = predict_logits(net, image, plan, crop_to_body=False, timings=skip_t)
    with torch.no_grad():
        exact = net(torch.from_numpy(image)[None])[0]
    inside = torch.from_numpy(body)
    torch.testing.assert_close(cropped[:, inside], exact[:, inside], atol=1e-5, rtol=1e-5)
    assert crop_t["windows"] == skip_t["windows"] == layout.num_windows
    ran_crop = crop_t["windows"] - crop_t["skipped_windows"]
    ran_skip = skip_t["windows"] - skip_t["skipped_windows"]
    assert ran_crop < ran_skip / 2
    # outside the (default-margin) box: exact background logits
    box = body_box(body, layout)
    outside = torch.ones(image.shape[1:], dtype=torch.bool)
    outside[tuple(slice(a, b) for a, b in box)] = False
    assert torch.all(cropped[0][outside] == 0) and torch.all(cropped[1:, outside] == -BACKGROUND_MARGIN)
    assert torch.equal(cropped.argmax(0)[~inside & ~outside], exact.argmax(0)[~inside & ~outside])
    assert skipped.shape == cropped.shape


def test_body_box_grows_to_one_window_and_keeps_the_slice_axis_of_2d_models():
    body = np.zeros((40, 30, 12), dtype=bool)
    body[20, 3, 5] = True
    layout3d = plan_windows(body.shape, make_plan(patch_size=(16, 16, 16)), 0.5)
    # one voxel + margin 1 = 3 voxels, grown to the 16-voxel window (12 along the short axis), kept inside
    assert body_box(body, layout3d, margin=1) == [(13, 29), (0, 16), (0, 12)]
    layout2d = plan_windows(body.shape, make_plan(spatial_dims=2, patch_size=(16, 16), slice_axis=2), 0.5)
    assert body_box(body, layout2d, margin=0) == [(13, 29), (0, 16), (0, 12)]
    assert body_box(np.zeros_like(body), layout3d) == []


def test_streamed_body_crop_covers_the_axis_in_order_with_an_empty_image_all_background():
    plan = make_plan(patch_size=(12, 12, 12))
    image = np.full((1, 60, 30, 24), -10.0, dtype=np.float32)
    image[0, 25:35, 10:20, 8:16] = 10.0
    net = ThresholdNet(3, 1, 2)
    slabs = list(iter_logit_slabs(net, image, plan))
    bounds = [(a, b) for a, b, _ in slabs]
    assert bounds[0][0] == 0 and bounds[-1][1] == 60 and len(bounds) > 2
    assert all(b0[1] == b1[0] for b0, b1 in itertools.pairwise(bounds))
    mask = torch.cat([s for _, _, s in slabs], dim=1).argmax(0).numpy()
    np.testing.assert_array_equal(mask, image[0] > 5)
    timings: dict = {}
    empty = predict_logits(net, np.full((1, 30, 30, 24), -10.0, dtype=np.float32), plan, timings=timings)
    assert timings["skipped_windows"] == timings["windows"] > 0
    assert torch.all(empty[0] == 0) and torch.all(empty[1] == -BACKGROUND_MARGIN)


def test_body_rule_uses_the_ct_threshold_in_original_units():
    plan = make_plan()  # clip [-1000, 1000], (x - 0) / 100
    hu = np.array([-1000.0, -900.0, -600.0, -400.0, 0.0, 300.0])
    image = (hu / 100.0).astype(np.float32).reshape(1, 6, 1, 1)
    assert body_mask_from_image(image, plan).ravel().tolist() == [False, False, False, True, True, True]


def test_tta_changes_an_asymmetric_network_and_not_a_symmetric_one():
    image = torch.randn(1, 24, 20, 16, generator=torch.Generator().manual_seed(4))
    plan = make_plan()
    skewed = SkewedNet(3, 1, 2)
    plain = predict_logits(skewed, image, plan, skip_empty=False)
    mirrored = predict_logits(skewed, image, plan, skip_empty=False, tta=True)
    assert (plain - mirrored).abs().max() > 1e-3
    pointwise = ThresholdNet(3, 1, 2)
    torch.testing.assert_close(
        predict_logits(pointwise, image, plan, skip_empty=False, tta=True),
        predict_logits(pointwise, image, plan, skip_empty=False),
        atol=1e-5,
        rtol=1e-5,
    )


def test_2d_model_slides_over_slices_with_context_channels_in_order():
    image = torch.randn(1, 20, 18, 9, generator=torch.Generator().manual_seed(5))
    plan = make_plan(spatial_dims=2, patch_size=(16, 16), num_classes=3, slice_context=1, slice_axis=2)
    assert plan_windows(image.shape[1:], plan, 0.5).window == (16, 16, 1)
    net = nn.Conv2d(3, 3, 1, bias=False)  # class c copies context channel c: z-1, z, z+1
    with torch.no_grad():
        net.weight.zero_()
        for c in range(3):
            net.weight[c, c] = 1.0
    out = predict_logits(net, image, plan, skip_empty=False, batch_size=7)
    previous = torch.cat([image[0, :, :, :1], image[0, :, :, :-1]], dim=2)  # clamped at the first slice
    following = torch.cat([image[0, :, :, 1:], image[0, :, :, -1:]], dim=2)
    torch.testing.assert_close(out[0], previous, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], image[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], following, atol=1e-5, rtol=1e-5)


def test_network_mode_is_restored_after_prediction():
    net = SkewedNet(3, 1, 2).train()
    predict_logits(net, torch.zeros(1, 16, 16, 16), make_plan(), skip_empty=False)
    assert net.training


def test_wrong_channels_and_dimensions_are_refused():
    plan = make_plan()
    net = ThresholdNet(3, 1, 2)
    with pytest.raises(GeometryError, match="2 channel"):
        predict_logits(net, torch.zeros(2, 16, 16, 16), plan)
    with pytest.raises(GeometryError, match="2 spatial dimensions"):
        predict_logits(net, torch.zeros(1, 16, 16), plan)


def test_network_with_wrong_class_count_is_reported():
    plan = make_plan(num_classes=3)
    with pytest.raises(GeometryError, match="returned 2 classes but the plan has 3"):
        predict_logits(ThresholdNet(3, 1, 2), torch.zeros(1, 16, 16, 16), plan, skip_empty=False)
