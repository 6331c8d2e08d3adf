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
    WindowOptions,
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
    got = predict_logits(net, image, plan, WindowOptions(skip_empty=False))
    assert got.shape == (3, 40, 33, 21)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_volume_smaller_than_patch_is_padded_and_cropped_back():
    net = ThresholdNet(3, 1, 2)
    image = np.zeros((1, 10, 7, 5), dtype=np.float32)
    image[0, 2:5, 1:3, 1:4] = 10.0
    logits = predict_logits(net, image, make_plan(), WindowOptions(skip_empty=False))
    assert logits.shape == (2, 10, 7, 5)
    np.testing.assert_array_equal(logits.argmax(0).numpy(), image[0] > 5)


def test_streaming_equals_whole_volume_accumulation_bitwise():
    net = SkewedNet(3, 1, 3, seed=1)
    image = torch.randn(1, 44, 30, 24, generator=torch.Generator().manual_seed(0))
    plan = make_plan(num_classes=3, patch_size=(12, 12, 12))
    slabs = list(iter_logit_slabs(net, image, plan, WindowOptions(stream=True, skip_empty=False, batch_size=3)))
    assert len(slabs) > 2  # the ring really streams
    axis = plan_windows(image.shape[1:], plan, 0.5).stream_axis
    bounds = [(a, b) for a, b, _ in slabs]
    assert bounds[0][0] == 0 and bounds[-1][1] == image.shape[1 + axis]
    assert all(b0[1] == b1[0] for b0, b1 in itertools.pairwise(bounds))  # in order, no gap, no overlap
    streamed = predict_logits(net, image, plan, WindowOptions(stream=True, skip_empty=False, batch_size=3))
    whole = predict_logits(net, image, plan, WindowOptions(stream=False, skip_empty=False, batch_size=5))
    assert torch.equal(streamed, whole)


def test_float16_output_storage_stays_close_to_float32():
    net = SkewedNet(3, 1, 2)
    image = torch.randn(1, 30, 30, 20, generator=torch.Generator().manual_seed(2))
    plan = make_plan(patch_size=(16, 16, 16))
    full = predict_logits(net, image, plan, WindowOptions(skip_empty=False))
    half = predict_logits(net, image, plan, WindowOptions(skip_empty=False), out_dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=2e-3)


def test_skipping_empty_windows_keeps_body_voxels_identical_and_skips_air():
    net = SkewedNet(3, 1, 2, seed=3)
    plan = make_plan(patch_size=(16, 16, 16))
    image = np.full((1, 64, 48, 40), -10.0, dtype=np.float32)  # -1000 HU air after normalisation
    image[0, 40:56, 30:44, 20:34] = np.random.default_rng(0).normal(0.5, 1.0, (16, 14, 14))
    body = body_mask_from_image(image, plan)
    timings: dict = {}
    skipped = predict_logits(net, image, plan, WindowOptions(skip_empty=True), timings=timings)
    full = predict_logits(net, image, plan, WindowOptions(skip_empty=False))
    assert timings["skipped_windows"] > timings["windows"] // 2
    # same windows at body voxels (batches differ, so allow float rounding)
    inside = torch.from_numpy(body)
    torch.testing.assert_close(skipped[:, inside], full[:, inside], atol=1e-5, rtol=1e-5)
    # far from the body no window ran: background logits
    assert skipped[0, 0, 0, 0] == 0 and skipped[1, 0, 0, 0] == -BACKGROUND_MARGIN
    assert not torch.equal(skipped, full)


class PositionNet(nn.Module):
    """Content-dependent logits (a seeded convolution) plus a fixed ramp over the window's coordinates.

    Its output at a voxel depends on where the window sits, so any change in the
    window layout shows up in the blended logits (a pointwise network would hide it).
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int):
        super().__init__()
        self.content = SkewedNet(spatial_dims, in_channels, num_classes, seed=5)
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.content(x)
        for a, n in enumerate(x.shape[2:]):
            shape = [1] * (2 + self.spatial_dims)
            shape[2 + a] = n
            out = out + torch.linspace(-2.0, 2.0, n).reshape(shape) * (a + 1)
        return out


@pytest.mark.parametrize("dims", [3, 2])
def test_window_skipping_changes_nothing_inside_the_body_for_a_position_dependent_network(dims):
    # the patient fills a quarter of the field of view: a layout over the body's box would differ
    if dims == 3:
        plan = make_plan(patch_size=(16, 16, 16), num_classes=3)
    else:
        plan = make_plan(spatial_dims=2, patch_size=(16, 16), slice_axis=2, slice_context=1, num_classes=3)
    image = np.full((1, 80, 64, 40), -10.0, dtype=np.float32)  # -1000 HU air
    image[0, 31:50, 21:43, 5:35] = np.random.default_rng(1).normal(0.5, 4.0, (19, 22, 30))
    net = PositionNet(plan.spatial_dims, plan.in_channels, 3)
    body = torch.from_numpy(body_mask_from_image(image, plan))
    on: dict = {}
    off: dict = {}
    skipped = predict_logits(net, image, plan, WindowOptions(skip_empty=True), timings=on)
    full = predict_logits(net, image, plan, WindowOptions(skip_empty=False), timings=off)
    assert on["windows"] == off["windows"] and on["skipped_windows"] > on["windows"] // 4
    assert off["skipped_windows"] == 0
    torch.testing.assert_close(skipped[:, body], full[:, body], atol=1e-5, rtol=1e-5)
    assert torch.equal(skipped.argmax(0)[body], full.argmax(0)[body])


def test_streamed_skipping_covers_the_axis_in_order_with_an_empty_image_all_background():
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
    plain = predict_logits(skewed, image, plan, WindowOptions(skip_empty=False))
    mirrored = predict_logits(skewed, image, plan, WindowOptions(skip_empty=False, tta=True))
    assert (plain - mirrored).abs().max() > 1e-3
    pointwise = ThresholdNet(3, 1, 2)
    torch.testing.assert_close(
        predict_logits(pointwise, image, plan, WindowOptions(skip_empty=False, tta=True)),
        predict_logits(pointwise, image, plan, WindowOptions(skip_empty=False)),
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
    out = predict_logits(net, image, plan, WindowOptions(skip_empty=False, batch_size=7))
    previous = torch.cat([image[0, :, :, :1], image[0, :, :, :-1]], dim=2)  # clamped at the first slice
    following = torch.cat([image[0, :, :, 1:], image[0, :, :, -1:]], dim=2)
    torch.testing.assert_close(out[0], previous, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], image[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], following, atol=1e-5, rtol=1e-5)


def test_network_mode_is_restored_after_prediction():
    net = SkewedNet(3, 1, 2).train()
    predict_logits(net, torch.zeros(1, 16, 16, 16), make_plan(), WindowOptions(skip_empty=False))
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
        predict_logits(ThresholdNet(3, 1, 2), torch.zeros(1, 16, 16, 16), plan, WindowOptions(skip_empty=False))


def test_window_options_are_checked_once_where_they_are_made():
    from medseg.errors import ConfigError

    assert WindowOptions(overlap=0, batch_size="3").batch_size == 3  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"overlap must be in \[0, 1\), got 1.0"):
        WindowOptions(overlap=1.0)
    with pytest.raises(ConfigError, match="batch size must be >= 1, got 0"):
        WindowOptions(batch_size=0)
    with pytest.raises(ConfigError, match="accumulate must be auto, device or cpu, got 'gpu'"):
        WindowOptions(accumulate="gpu")  # type: ignore[arg-type]
