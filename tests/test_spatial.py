"""The thick-slice rule is one rule: the planner, the resampler and the networks agree at its boundary."""

from __future__ import annotations

import pytest

from medseg.data.preprocess import separate_axis_for
from medseg.models.registry import anisotropic_axis_from_spacing
from medseg.spatial import thick_axis


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
