"""U-Net topology rule (nnU-Net's, re-derived) and patch fitting."""

from __future__ import annotations

import math

import pytest

from medseg.topology import fit_patch_to_topology, unet_topology


def _bottleneck(patch, strides):
    return [p / math.prod(s[d] for s in strides) for d, p in enumerate(patch)]


def test_isotropic_3d_patch_pools_until_the_bottleneck_is_4_voxels():
    kernels, strides = unet_topology([128, 128, 128], [1.0, 1.0, 1.0])
    assert strides == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert kernels == [[3, 3, 3]] * 6
    assert _bottleneck([128, 128, 128], strides) == [4, 4, 4]


def test_thick_slices_get_in_plane_kernels_and_strides_first():
    kernels, strides = unet_topology([128, 128, 32], [0.8, 0.8, 3.0])
    assert strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert kernels[0] == [3, 3, 1]  # 3.0 mm > 2 x 0.8 mm: no kernel across slices yet
    assert all(k == [3, 3, 3] for k in kernels[1:])
    assert len(kernels) == len(strides)


def test_small_axis_stops_pooling_at_twice_the_minimum_edge():
    _, strides = unet_topology([19, 17, 13], [1.0, 1.0, 1.0])
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 1]]


def test_2d_topology_has_two_entries_per_stage():
    kernels, strides = unet_topology([256, 192], [0.7, 0.7])
    assert all(len(k) == 2 for k in kernels) and all(len(s) == 2 for s in strides)
    assert strides[0] == [1, 1]


def test_fit_patch_rounds_up_to_the_total_stride():
    _, strides = unet_topology([128, 128, 32], [0.8, 0.8, 3.0])
    assert fit_patch_to_topology([100, 90, 30], strides) == [128, 96, 32]


def test_mismatched_spacing_is_rejected():
    with pytest.raises(ValueError, match=r"patch_size \[64, 64\] and spacing \[1.0, 1.0, 1.0\] must have the same length"):
        unet_topology([64, 64], [1.0, 1.0, 1.0])
