"""Undo preprocessing in reverse order: plan-grid logits/probabilities -> mask on the scan's grid.

Order (the reverse of :func:`medseg.data.preprocess.preprocess_case`):

1. **resample** the ``(K, *plan_shape)`` scores back to ``record.shape_after_crop``
   with linear interpolation (nearest neighbour along ``record.separate_axis``,
   the thick-slice axis, as nnU-Net does), in slabs along the longest axis so
   that only one slab of float32 scores exists at a time
   (:func:`medseg.spatial.resample_slabs`, the forward resampling's grid
   convention); each slab is arg-maxed at once (and turned into uint8
   probabilities when asked);
2. **un-crop** into ``record.shape_after_orient`` (background outside the
   crop box; probability 1 for background there);
3. **un-orient** (exact axis permutation and flips). Steps 2-3 cost no copy:
   the outputs are allocated on the scan's grid and the slabs of step 1 are
   written through :func:`medseg.spatial.cropped_view`, as
   :func:`medseg.data.preprocess.restore_mask` does.

Every grid operation here is :mod:`medseg.spatial`'s. Before anything is
returned, :func:`check_restored_grid` replays the recorded
grid chain (plan grid -> un-resample -> un-crop -> un-orient) on the affines and
requires the result to equal the scan's geometry within 1e-4 mm at the
field-of-view corners; a mismatch is a :class:`~medseg.errors.GeometryError`,
never a warning.

Only the box of output voxels whose interpolation touches a computed
(non-background) score is resampled (:func:`informative_box`): voxels outside
it are background by construction, so the result is the same as resampling
everything, and a body in a wide field of view restores in a fraction of the
time.

Memory: the restored class mask (1 byte per original voxel, written in place), the optional
uint8 probabilities (K bytes per voxel) and one float32 slab of at most
``slab_elements`` values (64 MiB by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from medseg.errors import GeometryError
from medseg.io.geometry import Geometry
from medseg.spatial import (
    DEFAULT_SLAB_ELEMENTS,
    axis_weights,
    crop_affine,
    cropped_view,
    orientation_affine,
    resample_slabs,
    resampling_affine,
)

if TYPE_CHECKING:
    import torch

    from medseg.data.preprocess import PreprocessRecord

__all__ = ["argmax_channels", "check_restored_grid", "informative_box", "restore_prediction"]


def argmax_channels(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(0)`` (first maximum wins), by K comparisons: much faster than a strided argmax."""
    import torch

    best = scores[0].clone()
    index = torch.zeros(scores.shape[1:], dtype=torch.int64 if scores.shape[0] > 255 else torch.uint8)
    for k in range(1, scores.shape[0]):
        better = scores[k] > best
        index[better] = k
        torch.maximum(best, scores[k], out=best)
    return index


def informative_box(
    scores: torch.Tensor, out_shape: Sequence[int], *, kind: str, separate_axis: int | None, tolerance: float = 1e-3
) -> list[tuple[int, int]]:
    """Output voxels ``[(start, stop), ...]`` whose interpolation touches a non-background score.

    Plan-grid voxels that no window computed hold the background logits of
    :mod:`~medseg.inference.sliding_window` (0 for class 0, ``-BACKGROUND_MARGIN``
    for the others; their softmax for probabilities). An output voxel whose
    interpolation taps all hold (within ``tolerance``) that vector is
    background with probability ``round(255 * p) = (255, 0, ...)``, exactly
    what :func:`restore_prediction` fills in outside the box, so only the box
    needs resampling. Returns ``[]`` when every score is background.
    """
    import torch

    from medseg.inference.sliding_window import BACKGROUND_MARGIN

    k = scores.shape[0]
    background = torch.full((k,), -BACKGROUND_MARGIN, dtype=torch.float32)
    background[0] = 0.0
    if kind == "probs":
        background = torch.softmax(background, dim=0)
    informative = torch.zeros(scores.shape[1:], dtype=torch.bool)
    for c in range(k):
        informative |= (scores[c].float() - float(background[c])).abs_() > tolerance
    if not bool(informative.any()):
        return []
    box = []
    for a, n_out in enumerate(out_shape):
        other = tuple(d for d in range(informative.ndim) if d != a)
        hit = torch.nonzero(informative.any(dim=other) if other else informative).flatten()
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        i0, i1, _w = axis_weights(scores.shape[1 + a], int(n_out), linear=separate_axis != a)
        needed = torch.nonzero(((i0 >= lo) & (i0 < hi)) | ((i1 >= lo) & (i1 < hi))).flatten()
        box.append((int(needed[0]), int(needed[-1]) + 1))
    return box


def check_restored_grid(record: PreprocessRecord) -> None:
    """Replay the recorded grid chain back to the scan's grid and require it to match.

    Raises:
        GeometryError: the chain does not land on ``record.original_geometry``
            (within 1e-4 mm at the field-of-view corners).
    """
    original = record.original_geometry
    final = record.final_geometry
    dims = len(record.shape_after_crop)
    # each step's affine (medseg.spatial) as preprocessing applied it, inverted, last step first
    cropped = final.affine @ np.linalg.inv(resampling_affine(record.shape_after_crop, final.shape))
    oriented = cropped @ np.linalg.inv(crop_affine(record.crop_bbox))
    if dims == 3:
        back = oriented @ np.linalg.inv(orientation_affine(record.ornt, original.shape))
    else:
        back = oriented
    restored = Geometry(shape=tuple(original.shape), affine=back)
    if not restored.same_grid(original, atol_mm=1e-4 + 1e-6 * float(np.abs(original.affine[:3, 3]).max())):
        raise GeometryError(
            "restored grid does not match the input scan: " + restored.describe_difference(original)
            + ". This is a bug in medseg's preprocessing record; please report it with the scan's header."
        )


def restore_prediction(
    scores: torch.Tensor,
    record: PreprocessRecord,
    *,
    kind: Literal["logits", "probs"] = "logits",
    probabilities: bool = False,
    slab_elements: int = DEFAULT_SLAB_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Map plan-grid scores back onto the scan's grid.

    Args:
        scores: ``(K, *record.final_geometry.shape)`` logits or probabilities.
        record: the case's :class:`~medseg.data.preprocess.PreprocessRecord`.
        kind: whether ``scores`` are logits (softmax is applied for
            probabilities) or already probabilities.
        probabilities: also return uint8 probabilities (``round(255 * p)``).
        slab_elements: memory bound of one resampled slab (float32 values).

    Returns:
        ``(classes, probs)``: class indices ``0..K-1`` (uint8, uint16 above 255
        classes) of the original shape, and ``(K, *shape)`` uint8 probabilities or None.

    Raises:
        GeometryError: the scores do not have the plan grid's shape, or the grid
            chain does not land on the scan's geometry.
    """
    import torch

    check_restored_grid(record)
    final_shape = tuple(record.final_geometry.shape)
    if tuple(scores.shape[1:]) != final_shape:
        raise GeometryError(f"scores of shape {tuple(scores.shape[1:])} are not on the plan grid {final_shape}.")
    k = int(scores.shape[0])
    crop_shape = tuple(record.shape_after_crop)
    dtype = np.uint8 if k <= 256 else np.uint16
    separate = record.separate_axis if final_shape != crop_shape else None
    # outside the box every score is background (windows skipped or cropped away): class 0
    box = informative_box(scores, crop_shape, kind=kind, separate_axis=separate)
    # the outputs are allocated on the scan's grid (background everywhere) and the slabs are written
    # through a re-oriented, cropped view of them: no un-crop or un-orient copies
    shape = tuple(record.original_geometry.shape)
    restored = np.zeros(shape, dtype=dtype)
    classes = _cropped_view(restored, record)
    probs = full_probs = None
    if probabilities:
        full_probs = np.zeros((k, *shape), dtype=np.uint8)
        full_probs[0] = 255
        probs = _cropped_view(full_probs, record)
    axis = separate if separate is not None else int(np.argmax(crop_shape))
    moved_classes = np.moveaxis(classes, axis, 0)  # views: slabs are written in place
    moved_probs = np.moveaxis(probs, 1 + axis, 1) if probs is not None else None
    rest = tuple(slice(*box[a]) for a in range(len(crop_shape)) if a != axis) if box else ()
    for start, stop, slab in resample_slabs(
        scores, crop_shape, separate_axis=separate, axis=axis, slab_elements=slab_elements, box=box or None
    ) if box else ():
        moved_classes[(slice(start, stop), *rest)] = argmax_channels(slab).numpy()
        if moved_probs is not None:
            p = torch.softmax(slab, dim=0) if kind == "logits" else slab
            moved_probs[(slice(None), slice(start, stop), *rest)] = (
                p.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
            )
        del slab
    return restored, full_probs


def _cropped_view(array: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """:func:`medseg.spatial.cropped_view` of ``array`` with the record's orientation and crop."""
    return cropped_view(array, ornt=record.ornt, crop_bbox=record.crop_bbox,
                        shape_after_orient=record.shape_after_orient)
