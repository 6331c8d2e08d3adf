"""medseg.spatial: one thick-slice rule, and one resampling grid for preprocessing and restoring."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.models.registry import anisotropic_axis_from_spacing
from medseg.spatial import resample_array, resample_slabs, separate_axis_for, thick_axis


@pytest.mark.parametrize(("spacing", "expected"), [
    ([1.0, 1.0, 3.0], None),      # exactly 3x: not thick (nnU-Net: ratio > 3)
    ([1.0, 1.0, 3.01], 2),
    ([4.0, 0.8, 0.8], 0),
    ([0.8, 0.8, 0.8], None),
    ([1.0, 0.0, 5.0], None),      # no valid spacing, no thick axis
])
def test_every_user_of_the_thick_slice_rule_gives_the_same_axis(spacing, expected):
    assert thick_axis(spacing) == expected
    assert anisotropic_axis_from_spacing(spacing) == expected
    if expected is not None or min(spacing) > 0:
        assert separate_axis_for(spacing, [1.0, 1.0, 1.0]) == expected


def test_resample_array_keeps_the_field_of_view_and_constant_values():
    x = np.full((1, 10, 8, 6), 3.0, dtype=np.float32)
    y = resample_array(x, (20, 4, 6), order=3)
    assert y.shape == (1, 20, 4, 6)
    np.testing.assert_allclose(y, 3.0, rtol=1e-5)


@pytest.mark.parametrize(("shape", "new_shape", "separate"), [
    ((2, 37, 41, 13), (20, 50, 7), None),  # trilinear, down and up
    ((1, 40, 30, 9), (15, 12, 20), 2),  # bilinear in-plane, nearest along the thick axis
    ((1, 30, 40), (17, 61), None),  # 2D
])
def test_linear_image_resampling_matches_scipy_spline_order_1(shape, new_shape, separate):
    from scipy import ndimage

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = resample_array(x, new_shape, order=1, separate_axis=separate, order_separate=0)
    assert got.dtype == np.float32 and got.shape == (shape[0], *new_shape)
    for c in range(shape[0]):
        if separate is None:
            zoom = [n / o for n, o in zip(new_shape, shape[1:])]
            ref = ndimage.zoom(x[c], zoom, order=1, mode="nearest", grid_mode=True)
        else:
            first = [1.0 if a == separate else n / o for a, (n, o) in enumerate(zip(new_shape, shape[1:]))]
            ref = ndimage.zoom(x[c], first, order=1, mode="nearest", grid_mode=True)
            second = [new_shape[a] / shape[1 + a] if a == separate else 1.0 for a in range(len(new_shape))]
            ref = ndimage.zoom(ref, second, order=0, mode="nearest", grid_mode=True)
        np.testing.assert_allclose(got[c], ref, atol=1e-4)


@pytest.mark.parametrize(("shape", "new_shape", "separate"), [
    ((3, 23, 17, 9), (31, 12, 20), 2),  # bilinear in-plane, nearest along the thick axis
    ((2, 9, 30, 14), (20, 17, 5), 0),
    ((3, 23, 17, 9), (31, 12, 20), None),  # trilinear
    ((2, 30, 40), (17, 61), None),  # 2D
])
@pytest.mark.parametrize("slab_elements", [1 << 24, 500])
def test_restoring_resamples_on_the_grid_preprocessing_resamples_on(shape, new_shape, separate, slab_elements):
    import torch

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    forward = resample_array(x, new_shape, order=1, separate_axis=separate, order_separate=0)
    axis = separate if separate is not None else int(np.argmax(new_shape))
    box = [(2, n - 3) for n in new_shape]
    for cut in (None, box):
        slabs = np.full_like(forward, np.nan)
        for start, stop, slab in resample_slabs(torch.from_numpy(x), new_shape, separate_axis=separate,
                                                slab_elements=slab_elements, box=cut):
            index = [slice(*b) for b in cut] if cut else [slice(None)] * len(new_shape)
            index[axis] = slice(start, stop)
            np.moveaxis(slabs[(slice(None), *index)], 1 + axis, 1)[...] = slab.numpy()
        inside = (slice(None), *(slice(*b) for b in (cut or [(0, n) for n in new_shape])))
        np.testing.assert_allclose(slabs[inside], forward[inside], rtol=0, atol=1e-5)  # float rounding only
