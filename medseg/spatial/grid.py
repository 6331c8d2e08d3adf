"""Re-orientation and cropping: exact index operations, their one inverse and their affines.

Re-orientation permutes and flips axes (a nibabel ``ornt`` transform: row ``i`` =
``[target axis, flip (+1/-1)]`` for source axis ``i``); cropping takes a half-open box
``[[start, stop], ...]``. Neither interpolates, so both are undone exactly, and the
undoing costs no copy: :func:`cropped_view` is a view of an array on the scan's grid
in the re-oriented, cropped frame, and writing through it *is* un-crop then
un-orient. Production restoring (:mod:`medseg.inference.restore`) and
:func:`medseg.data.preprocess.restore_mask` both write through it.

Each step's affine (:func:`orientation_affine`, :func:`crop_affine`, like
:func:`~medseg.spatial.resample.resampling_affine`) maps a voxel index of the grid
after the step to an index of the grid before it: the world affine after the step
is ``affine @ step``, before it ``affine_after @ inv(step)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.errors import GeometryError

__all__ = [
    "crop",
    "crop_affine",
    "cropped_view",
    "nonzero_bbox",
    "orientation_affine",
    "orientation_transform",
    "reorient",
    "reoriented_view",
]


# --------------------------------------------------------------------------- orientation


def orientation_transform(affine: np.ndarray, target: str = "RAS") -> np.ndarray:
    """nibabel ornt transform taking the affine's voxel axes to the closest ``target`` axes."""
    import nibabel as nib

    start = nib.orientations.io_orientation(np.asarray(affine))
    end = nib.orientations.axcodes2ornt(tuple(target))
    return nib.orientations.ornt_transform(start, end).astype(int)


def reoriented_view(array: np.ndarray, ornt: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """The spatial axes of a channel-first array re-oriented by ``ornt``: a strided view (flips, transposes)."""
    import nibabel as nib

    moved = np.moveaxis(array, 0, -1)
    return np.moveaxis(nib.orientations.apply_orientation(moved, np.asarray(ornt)), -1, 0)


def reorient(array: np.ndarray, ornt: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """:func:`reoriented_view` as a C-contiguous copy (exact)."""
    return np.ascontiguousarray(reoriented_view(array, ornt))


def orientation_affine(ornt: np.ndarray | Sequence[Sequence[int]], shape: Sequence[int]) -> np.ndarray:
    """Voxel index on the re-oriented grid -> index on the grid of ``shape`` (4x4; see the module doc)."""
    import nibabel as nib

    return nib.orientations.inv_ornt_aff(np.asarray(ornt), tuple(shape))


# --------------------------------------------------------------------------- crop


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """Half-open bounding box ``[[start, stop], ...]`` of voxels non-zero in any channel.

    An all-zero image gives the full extent.
    """
    mask = np.any(image != 0, axis=0)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, int(mask.shape[axis])])
    return bbox


def crop(array: np.ndarray, bbox: Sequence[Sequence[int]]) -> np.ndarray:
    """The box ``bbox`` of a channel-first array (a view)."""
    return array[(slice(None), *(slice(a, b) for a, b in bbox))]


def crop_affine(bbox: Sequence[Sequence[int]]) -> np.ndarray:
    """Voxel index in the box -> index on the uncropped grid (4x4; see the module doc)."""
    shift = np.eye(4)
    shift[: len(bbox), 3] = [b[0] for b in bbox]
    return shift


# --------------------------------------------------------------------------- the inverse


def cropped_view(
    array: np.ndarray,
    *,
    ornt: np.ndarray | Sequence[Sequence[int]],
    crop_bbox: Sequence[Sequence[int]],
    shape_after_orient: Sequence[int],
) -> np.ndarray:
    """A view of ``array`` (on the scan's grid, optionally channel-first) in the re-oriented, cropped frame.

    The inverse of re-orienting by ``ornt`` and cropping to ``crop_bbox``: writing
    ``view[...] = x`` puts ``x`` where it came from on the scan's grid, without copies
    (re-orientation is flips and a transpose, cropping a slice).

    Raises:
        GeometryError: the re-oriented array does not have ``shape_after_orient``.
    """
    channel = array.ndim == len(crop_bbox) + 1
    arr = array if channel else array[np.newaxis]
    if len(ornt):
        arr = reoriented_view(arr, ornt)
    if tuple(arr.shape[1:]) != tuple(shape_after_orient):
        raise GeometryError(
            f"re-oriented shape {tuple(arr.shape[1:])} != recorded {tuple(shape_after_orient)}."
        )
    view = crop(arr, crop_bbox)
    if not np.may_share_memory(view, array):  # pragma: no cover - nibabel returns views
        raise RuntimeError("re-orientation did not return a view; cannot restore in place.")
    return view if channel else view[0]
