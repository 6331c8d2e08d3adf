"""The thick-slice rule that planning, preprocessing, augmentation and models share.

One owner for the rule, so that the planner, the resampler and the networks agree on
what a thick-slice (anisotropic) scan is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ANISOTROPY_THRESHOLD", "separate_axis_for", "thick_axis"]

#: An axis more than this many times coarser than the finest one is a thick-slice axis
#: (nnU-Net's ``ANISO_THRESHOLD``): resampled on its own, never rotated about another
#: axis, sliced across by 2D plans, and not pooled early by the networks.
ANISOTROPY_THRESHOLD = 3.0


def thick_axis(spacing: Sequence[float]) -> int | None:
    """The coarsest axis when it is more than :data:`ANISOTROPY_THRESHOLD` x the finest, else ``None``.

    Example::

        >>> thick_axis([0.8, 0.8, 5.0])
        2
        >>> thick_axis([1.0, 1.0, 3.0]) is None
        True
    """
    sp = np.asarray(spacing, dtype=float)
    if sp.size < 2 or not (sp > 0).all():
        return None
    axis = int(np.argmax(sp))
    return axis if sp[axis] > ANISOTROPY_THRESHOLD * sp.min() else None


def separate_axis_for(spacing: Sequence[float], target_spacing: Sequence[float]) -> int | None:
    """The thick axis to resample separately (nnU-Net: spacing ratio > 3), else None."""
    for sp in (spacing, target_spacing):
        sp = np.asarray(sp, dtype=float)
        axis = thick_axis(sp) if len(sp) == 3 else None
        if axis is not None:
            return axis
    return None
