"""Clean up a predicted label mask: keep the largest component per class, drop small ones.

Both operations work class by class inside that class's bounding box
(``scipy.ndimage.find_objects``), so memory stays proportional to the largest
structure, not to the scan. Removed voxels become background (0).
Connectivity is face-connectivity (6 neighbours in 3D, 4 in 2D), as in
MONAI's ``KeepLargestConnectedComponent`` default.

Example::

    mask = postprocess(mask, "largest")
    mask = postprocess(mask, "min-size=50")
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from medseg.settings import PostprocessSpec, parse_postprocess

__all__ = ["PostprocessSpec", "keep_largest_component", "parse_postprocess", "postprocess", "remove_small_components"]


def _class_boxes(mask: np.ndarray) -> list[tuple[int, tuple[slice, ...]]]:
    if mask.size == 0 or int(mask.max()) == 0:
        return []
    boxes = ndimage.find_objects(mask.astype(np.int32, copy=False) if mask.dtype == bool else mask)
    return [(k + 1, box) for k, box in enumerate(boxes) if box is not None]


def keep_largest_component(mask: np.ndarray, labels: list[int] | None = None) -> np.ndarray:
    """Keep only the largest connected component of each label (others become 0).

    Args:
        mask: integer label array (any spatial dims); a modified copy is returned.
        labels: labels to process; ``None``: every label present.
    """

    def all_but_largest(sizes: np.ndarray) -> np.ndarray:
        return np.arange(len(sizes)) != int(np.argmax(sizes[1:])) + 1

    return _drop_components(mask, labels, all_but_largest)


def remove_small_components(mask: np.ndarray, min_size: int, labels: list[int] | None = None) -> np.ndarray:
    """Set connected components smaller than ``min_size`` voxels to background, per label."""
    return _drop_components(mask, labels, lambda sizes: sizes < min_size)


def _drop_components(
    mask: np.ndarray, labels: list[int] | None, select: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """A copy of ``mask`` where, per label, the components ``select(sizes)`` marks are set to 0.

    ``sizes[i]`` is the voxel count of component ``i`` of one label inside its
    bounding box (``sizes[0]``: the voxels that are not that label, never dropped).
    """
    out = mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    for value, box in _class_boxes(mask):
        if labels is not None and value not in labels:
            continue
        region = out[box]
        binary = region == value
        components, _count = ndimage.label(binary, structure=structure)
        drop = select(np.bincount(components.ravel()))
        drop[0] = False
        if drop.any():
            region[binary & drop[components]] = 0
    return out


def postprocess(mask: np.ndarray, spec: str | PostprocessSpec | None) -> np.ndarray:
    """Apply a ``--postprocess`` setting to a label mask (returns the mask itself for ``none``)."""
    parsed = parse_postprocess(spec)
    if parsed.mode == "largest":
        return keep_largest_component(mask)
    if parsed.mode == "min-size":
        return remove_small_components(mask, parsed.min_size)
    return mask
