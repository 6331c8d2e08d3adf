"""Undo preprocessing in reverse order: plan-grid logits/probabilities -> mask on the scan's grid.

Order (the reverse of :func:`medseg.data.preprocess.preprocess_case`):

1. **resample** the ``(K, *plan_shape)`` scores back to ``record.shape_after_crop``
   with linear interpolation (nearest neighbour along ``record.separate_axis``,
   the thick-slice axis, as nnU-Net does), in slabs along the longest axis so
   that only one slab of float32 scores exists at a time; each slab is
   arg-maxed at once (and turned into uint8 probabilities when asked);
2. **un-crop** into ``record.shape_after_orient`` (background outside the
   crop box; probability 1 for background there);
3. **un-orient** (exact axis permutation and flips), as
   :func:`medseg.data.preprocess.restore_mask` does. Steps 2-3 cost no copy:
   the outputs are allocated on the scan's grid and the slabs of step 1 are
   written through their re-oriented, cropped view.

The grid convention matches the forward resampling: output voxel ``j`` samples
source position ``(j + 0.5) * n_src / n_out - 0.5``, clamped at the edges (the
outer voxel edges coincide).

Before anything is returned, :func:`check_restored_grid` replays the recorded
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

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from medseg.errors import GeometryError
from medseg.io.geometry import Geometry

if TYPE_CHECKING:
    import torch

    from medseg.data.preprocess import PreprocessRecord

__all__ = ["argmax_channels", "check_restored_grid", "informative_box", "resample_slabs", "restore_prediction"]

#: Largest number of float32 values in one resampled slab (64 MiB).
DEFAULT_SLAB_ELEMENTS = 1 << 24


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


def _resample_axis(
    t: torch.Tensor, dim: int, n_out: int, start: int, stop: int, linear: bool, *, n_src: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Output positions [start, stop) of one axis; ``t`` holds source rows ``offset ...`` of ``n_src``."""
    n_src = t.shape[dim] if n_src is None else n_src
    if n_src == n_out and start == 0 and stop == n_out and offset == 0 and t.shape[dim] == n_src:
        return t
    i0, i1, w = _axis_weights(n_src, n_out, start, stop, linear)
    i0, i1 = (i0 - offset).to(t.device), (i1 - offset).to(t.device)
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


def _sample_grid(out_rest: tuple[int, int], ranges: list[tuple[int, int]]) -> torch.Tensor:
    """``grid_sample`` grid of output voxels ``ranges`` of a 2D output of shape ``out_rest``.

    Output voxel ``j`` of an axis with ``n`` outputs sits at normalised
    coordinate ``2 (j + 0.5) / n - 1`` (``align_corners=False``, border
    clamping): the same grid convention as the whole-axis path.
    """
    import torch

    coords = [
        (2.0 * (torch.arange(lo, hi, dtype=torch.float64) + 0.5) / n - 1.0).float()
        for (lo, hi), n in zip(ranges, out_rest)
    ]
    grid_y, grid_x = torch.meshgrid(coords[0], coords[1], indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)[None]  # grid_sample wants (x, y) = (last axis, first)


def _sample_rest(slab: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of the last two axes of ``(K, rows, a, b)`` at ``grid`` (:func:`_sample_grid`)."""
    import torch.nn.functional as F

    k, rows = slab.shape[:2]
    out = F.grid_sample(slab.reshape(1, k * rows, *slab.shape[2:]), grid, mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.reshape(k, rows, *grid.shape[1:3])


def resample_slabs(
    scores: torch.Tensor,
    out_shape: Sequence[int],
    *,
    separate_axis: int | None = None,
    axis: int | None = None,
    slab_elements: int = DEFAULT_SLAB_ELEMENTS,
    box: Sequence[tuple[int, int]] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Resample channel-first ``scores`` to ``out_shape`` slab by slab.

    Args:
        scores: ``(K, *src_shape)`` tensor (float16 or float32, any device).
        out_shape: target spatial shape.
        separate_axis: axis resampled with nearest neighbour instead of linear.
        axis: slab axis; default ``separate_axis`` if given, else the longest output axis.
        slab_elements: most float32 values per yielded slab.
        box: compute only output voxels ``[(start, stop), ...]`` per axis (default: all).

    Yields:
        ``(start, stop, slab)``: float32 ``(K, stop - start, *other axes)``: the
        slab axis comes first after the channels (``torch.movedim(slab, 1, 1 + axis)``
        puts it back); slabs come in order and cover the axis (the box's range
        of it, with the other axes cut to the box).
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
    box = [(0, n) for n in out_shape] if box is None else [(int(a), int(b)) for a, b in box]
    whole_rest = all(box[a] == (0, out_shape[a]) for a in others)
    per_row = scores.shape[0] * int(np.prod([box[a][1] - box[a][0] for a in others]))
    rows = max(1, slab_elements // max(per_row, 1))
    grid = None
    for start in range(box[axis][0], box[axis][1], rows):
        stop = min(start + rows, box[axis][1])
        # only the source rows this slab interpolates from, made contiguous (a small copy): index_select
        # on a strided axis of the whole scores is many times slower
        i0, i1, _w = _axis_weights(moved.shape[1], out_shape[axis], start, stop, separate_axis != axis)
        lo, hi = int(i0.min()), int(i1.max()) + 1
        rows_src = moved.narrow(1, lo, hi - lo).contiguous()
        slab = _resample_axis(rows_src, 1, out_shape[axis], start, stop, separate_axis != axis,
                              n_src=moved.shape[1], offset=lo)
        if whole_rest:
            slab = _interpolate_rest(slab.float().contiguous(), out_rest, linear)
        elif len(others) == 2 and all(linear):
            if grid is None:
                grid = _sample_grid(out_rest, [box[a] for a in others])
            slab = _sample_rest(slab.float().contiguous(), grid)
        else:
            for i, a in enumerate(others):
                slab = _resample_axis(slab, 2 + i, out_shape[a], box[a][0], box[a][1], linear[i])
            slab = slab.float()
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
        i0, i1, _w = _axis_weights(scores.shape[1 + a], int(n_out), 0, int(n_out), separate_axis != a)
        needed = torch.nonzero(((i0 >= lo) & (i0 < hi)) | ((i1 >= lo) & (i1 < hi))).flatten()
        box.append((int(needed[0]), int(needed[-1]) + 1))
    return box


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
    """A view of ``array`` (on the scan's grid, optionally channel-first) in the re-oriented, cropped frame.

    Writing ``view[...] = x`` is ``array = unorient(uncrop(x))`` (:mod:`medseg.data.preprocess`)
    without the copies: re-orientation is flips and a transpose, cropping a slice.
    """
    import nibabel as nib

    channel = array.ndim == len(record.shape_after_crop) + 1
    arr = array if channel else array[np.newaxis]
    if len(record.ornt):
        moved = nib.orientations.apply_orientation(np.moveaxis(arr, 0, -1), np.asarray(record.ornt))
        arr = np.moveaxis(moved, -1, 0)
    if tuple(arr.shape[1:]) != tuple(record.shape_after_orient):
        raise GeometryError(
            f"re-oriented shape {tuple(arr.shape[1:])} != recorded {tuple(record.shape_after_orient)}."
        )
    view = arr[(slice(None), *(slice(a, b) for a, b in record.crop_bbox))]
    if not np.may_share_memory(view, array):  # pragma: no cover - nibabel returns views
        raise RuntimeError("re-orientation did not return a view; cannot restore in place.")
    return view if channel else view[0]
