"""Undo preprocessing in reverse order: plan-grid logits/probabilities -> mask on the scan's grid.

Order (the reverse of :func:`medseg.data.preprocess.preprocess_case`):

1. **resample** the ``(K, *plan_shape)`` scores back to ``record.shape_after_crop``
   with linear interpolation (nearest neighbour along ``record.separate_axis``,
   the thick-slice axis, as nnU-Net does), in slabs along the longest axis so
   that only one slab of float32 scores exists at a time; each slab is
   arg-maxed at once (and turned into uint8 probabilities when asked);
2. **un-crop** into ``record.shape_after_orient`` (background outside the
   crop box; probability 1 for background there);
3. **un-orient** (exact axis permutation and flips) with
   :func:`medseg.data.preprocess.restore_mask`.

The grid convention matches the forward resampling: output voxel ``j`` samples
source position ``(j + 0.5) * n_src / n_out - 0.5``, clamped at the edges (the
outer voxel edges coincide).

Before anything is returned, :func:`check_restored_grid` replays the recorded
grid chain (plan grid -> un-resample -> un-crop -> un-orient) on the affines and
requires the result to equal the scan's geometry within 1e-4 mm at the
field-of-view corners; a mismatch is a :class:`~medseg.errors.GeometryError`,
never a warning.

Memory: the restored class mask (1 byte per original voxel), the optional
uint8 probabilities (K bytes per voxel) and one float32 slab of at most
``slab_elements`` values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from medseg.errors import GeometryError
from medseg.io.geometry import Geometry

if TYPE_CHECKING:
    import torch

    from medseg.data.preprocess import PreprocessRecord

__all__ = ["argmax_channels", "check_restored_grid", "resample_slabs", "restore_prediction"]

#: Largest number of float32 values in one resampled slab (256 MiB).
DEFAULT_SLAB_ELEMENTS = 1 << 26


def _axis_weights(n_src: int, n_out: int, start: int, stop: int, linear: bool):
    """Indices and weights of output positions [start, stop) along one axis."""
    import torch

    j = torch.arange(start, stop, dtype=torch.float64)
    src = (j + 0.5) * (n_src / n_out) - 0.5
    if not linear:
        idx = torch.floor(src + 0.5).clamp_(0, n_src - 1).long()
        return idx, idx, None
    src = src.clamp(min=0.0)
    i0 = torch.floor(src).long().clamp_(0, n_src - 1)
    i1 = (i0 + 1).clamp_(max=n_src - 1)
    w = (src - i0.double()).clamp_(0.0, 1.0).float()
    return i0, i1, w


def _resample_axis(t: torch.Tensor, dim: int, n_out: int, start: int, stop: int, linear: bool) -> torch.Tensor:
    n_src = t.shape[dim]
    if n_src == n_out and start == 0 and stop == n_out:
        return t
    i0, i1, w = _axis_weights(n_src, n_out, start, stop, linear)
    i0, i1 = i0.to(t.device), i1.to(t.device)
    a = t.index_select(dim, i0).float()
    if w is None:
        return a
    b = t.index_select(dim, i1).float()
    shape = [1] * t.ndim
    shape[dim] = -1
    w = w.to(t.device).view(shape)
    return a.add_(b.sub_(a).mul_(w))


def _interpolate_rest(slab: torch.Tensor, out_rest: tuple[int, ...], linear: list[bool]) -> torch.Tensor:
    """Resample the axes after the slab axis of a ``(K, rows, *rest)`` tensor."""
    import torch.nn.functional as F

    k, rows = slab.shape[:2]
    rest = tuple(slab.shape[2:])
    if rest == out_rest:
        return slab
    if all(linear) and len(rest) in (1, 2):
        # torch's linear modes with align_corners=False use the same grid convention
        mode = "linear" if len(rest) == 1 else "bilinear"
        flat = slab.float().reshape(1, k * rows, *rest)
        return F.interpolate(flat, size=out_rest, mode=mode, align_corners=False).reshape(k, rows, *out_rest)
    for a, n in enumerate(out_rest):
        slab = _resample_axis(slab, 2 + a, n, 0, n, linear[a])
    return slab


def resample_slabs(
    scores: torch.Tensor,
    out_shape: Sequence[int],
    *,
    separate_axis: int | None = None,
    axis: int | None = None,
    slab_elements: int = DEFAULT_SLAB_ELEMENTS,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Resample channel-first ``scores`` to ``out_shape`` slab by slab.

    Args:
        scores: ``(K, *src_shape)`` tensor (float16 or float32, any device).
        out_shape: target spatial shape.
        separate_axis: axis resampled with nearest neighbour instead of linear.
        axis: slab axis; default ``separate_axis`` if given, else the longest output axis.
        slab_elements: most float32 values per yielded slab.

    Yields:
        ``(start, stop, slab)``: float32 ``(K, stop - start, *other axes)``: the
        slab axis comes first after the channels (``torch.movedim(slab, 1, 1 + axis)``
        puts it back); slabs come in order and cover the axis.
    """
    out_shape = tuple(int(s) for s in out_shape)
    dims = len(out_shape)
    if scores.ndim != dims + 1:
        raise GeometryError(f"scores of shape {tuple(scores.shape)} cannot be resampled to {out_shape}.")
    if axis is None:
        axis = separate_axis if separate_axis is not None else int(np.argmax(out_shape))
    moved = scores.movedim(1 + axis, 1)
    others = [a for a in range(dims) if a != axis]
    out_rest = tuple(out_shape[a] for a in others)
    linear = [separate_axis != a for a in others]
    per_row = scores.shape[0] * int(np.prod(out_rest))
    rows = max(1, slab_elements // max(per_row, 1))
    for start in range(0, out_shape[axis], rows):
        stop = min(start + rows, out_shape[axis])
        slab = _resample_axis(moved, 1, out_shape[axis], start, stop, separate_axis != axis)
        slab = _interpolate_rest(slab.float().contiguous(), out_rest, linear)
        yield start, stop, slab


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


def check_restored_grid(record: PreprocessRecord) -> None:
    """Replay the recorded grid chain back to the scan's grid and require it to match.

    Raises:
        GeometryError: the chain does not land on ``record.original_geometry``
            (within 1e-4 mm at the field-of-view corners).
    """
    import nibabel as nib

    original = record.original_geometry
    final = record.final_geometry
    dims = len(record.shape_after_crop)
    # undo resampling: scale about the outer voxel edges
    scale = np.eye(4)
    for a in range(dims):
        f = record.shape_after_crop[a] / final.shape[a]
        scale[a, a] = f
        scale[a, 3] = 0.5 * f - 0.5
    cropped = final.affine @ np.linalg.inv(scale)
    shift = np.eye(4)
    shift[:dims, 3] = [b[0] for b in record.crop_bbox]
    oriented = cropped @ np.linalg.inv(shift)
    if dims == 3:
        back = oriented @ np.linalg.inv(
            nib.orientations.inv_ornt_aff(np.asarray(record.ornt), tuple(original.shape))
        )
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

    from medseg.data.preprocess import restore_mask, uncrop, unorient

    check_restored_grid(record)
    final_shape = tuple(record.final_geometry.shape)
    if tuple(scores.shape[1:]) != final_shape:
        raise GeometryError(f"scores of shape {tuple(scores.shape[1:])} are not on the plan grid {final_shape}.")
    k = int(scores.shape[0])
    crop_shape = tuple(record.shape_after_crop)
    dtype = np.uint8 if k <= 256 else np.uint16
    classes = np.empty(crop_shape, dtype=dtype)
    probs = np.empty((k, *crop_shape), dtype=np.uint8) if probabilities else None
    separate = record.separate_axis if final_shape != crop_shape else None
    axis = separate if separate is not None else int(np.argmax(crop_shape))
    moved_classes = np.moveaxis(classes, axis, 0)  # views: slabs are written in place
    moved_probs = np.moveaxis(probs, 1 + axis, 1) if probs is not None else None
    for start, stop, slab in resample_slabs(
        scores, crop_shape, separate_axis=separate, axis=axis, slab_elements=slab_elements
    ):
        moved_classes[start:stop] = argmax_channels(slab).numpy()
        if moved_probs is not None:
            p = torch.softmax(slab, dim=0) if kind == "logits" else slab
            moved_probs[:, start:stop] = p.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
        del slab
    restored = restore_mask(classes, record)
    if probs is not None:
        full = np.empty((k, *record.shape_after_orient), dtype=np.uint8)
        for c in range(k):
            full[c] = uncrop(probs[c : c + 1], record, fill=255 if c == 0 else 0)[0]
        del probs
        probs = unorient(full, record)
    shape = tuple(record.original_geometry.shape)
    if restored.shape != shape or (probs is not None and tuple(probs.shape[1:]) != shape):
        raise GeometryError(f"restored mask shape {restored.shape} != input shape {shape}.")
    return restored, probs
