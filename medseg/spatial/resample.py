"""Resampling with one grid convention, forward (whole arrays) and back (slab by slab).

The convention: output voxel ``j`` of an axis with ``n_out`` voxels samples source
position ``(j + 0.5) * n_src / n_out - 0.5``, clamped at the edges (the outer voxel
edges coincide: ``scipy.ndimage.zoom(grid_mode=True)``, ``F.interpolate(align_corners=False)``);
nearest neighbour takes ``floor(position + 0.5)``. :func:`axis_weights` is its one
implementation for a single axis; :func:`resample_array` (preprocessing) and
:func:`resample_slabs` (restoring predictions) use it and torch's linear modes, which
share the convention, and :func:`resampling_affine` is the same map on the affines.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import GeometryError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_SLAB_ELEMENTS",
    "axis_weights",
    "resample_array",
    "resample_axis",
    "resample_slabs",
    "resampling_affine",
]

#: Most float32 values in one resampled slab or chunk (64 MiB).
DEFAULT_SLAB_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- the convention


def axis_weights(
    n_src: int, n_out: int, *, linear: bool, start: int = 0, stop: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Source indices ``(i0, i1)`` and float32 weights of ``i1`` for output positions ``[start, stop)``.

    Linear interpolation gives ``x[i0] + (x[i1] - x[i0]) * w``; nearest neighbour
    (``linear=False``) gives ``i0 == i1`` and ``w = None``.
    """
    import torch

    stop = n_out if stop is None else stop
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


def resample_axis(
    t: torch.Tensor, dim: int, n_out: int, *, linear: bool, start: int = 0, stop: int | None = None,
    n_src: int | None = None, offset: int = 0,
) -> torch.Tensor:
    """Output positions ``[start, stop)`` of axis ``dim`` resampled to ``n_out`` (float32).

    ``t`` holds source rows ``offset, offset + 1, ...`` of an axis of ``n_src`` rows
    (default: all of them).
    """
    stop = n_out if stop is None else stop
    n_src = t.shape[dim] if n_src is None else n_src
    if n_src == n_out and start == 0 and stop == n_out and offset == 0 and t.shape[dim] == n_src:
        return t
    i0, i1, w = axis_weights(n_src, n_out, linear=linear, start=start, stop=stop)
    i0, i1 = (i0 - offset).to(t.device), (i1 - offset).to(t.device)
    a = t.index_select(dim, i0).float()
    if w is None:
        return a
    b = t.index_select(dim, i1).float()
    shape = [1] * t.ndim
    shape[dim] = -1
    w = w.to(t.device).view(shape)
    return a.add_(b.sub_(a).mul_(w))


def resampling_affine(shape_before: Sequence[int], shape_after: Sequence[int]) -> np.ndarray:
    """Voxel index on the resampled grid -> index on the grid before (4x4; outer voxel edges kept).

    The grid's world affine after resampling is ``affine @ step``, before it
    ``affine_after @ inv(step)`` (as :mod:`medseg.spatial.grid`'s steps).
    """
    scale = np.eye(4)
    for a, (o, n) in enumerate(zip(shape_before, shape_after)):
        f = o / n
        scale[a, a] = f
        scale[a, 3] = 0.5 * f - 0.5
    return scale


# --------------------------------------------------------------------------- whole arrays (forward)


def resample_array(
    array: np.ndarray,
    new_shape: Sequence[int],
    *,
    order: int,
    separate_axis: int | None = None,
    order_separate: int = 0,
) -> np.ndarray:
    """Resample the spatial axes of a channel-first array to ``new_shape``, keeping the field of view.

    Voxel ``j`` of the output samples input position ``(j + 0.5) * old / new - 0.5``
    (outer voxel edges coincide; ``scipy.ndimage.zoom(grid_mode=True)``), with
    the edge value repeated beyond the first/last voxel centre.

    Orders 0 and 1 (nearest, linear) run in float32 with torch
    (``F.interpolate(align_corners=False)`` has exactly this grid convention;
    nearest rounds ``(j + 0.5) * old / new - 0.5``), multi-threaded and with
    no float64 copy; higher orders use ``scipy.ndimage.zoom`` (spline prefilter).

    Args:
        array: ``(C, *spatial)``.
        new_shape: target spatial shape.
        order: interpolation order on the (other) axes: 1 images, logits, one-hot.
        separate_axis: resample this axis on its own with ``order_separate``
            (thick slices, nnU-Net's separate-z).
        order_separate: interpolation order along ``separate_axis``.
    """
    old = tuple(array.shape[1:])
    new_shape = tuple(int(s) for s in new_shape)
    if old == new_shape:
        return array.copy()
    out_dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32
    if order in (0, 1) and order_separate in (0, 1) and len(old) in (2, 3):
        y = _resample_torch(array, new_shape, order, separate_axis, order_separate)
    else:
        y = _resample_scipy(array, new_shape, order, separate_axis, order_separate)
    if tuple(y.shape[1:]) != new_shape:  # pragma: no cover - both paths produce the exact shape
        raise GeometryError(f"resampling produced {y.shape[1:]}, expected {new_shape}.")
    return y.astype(out_dtype, copy=False)


_TORCH_MODES = {(0, 1): "nearest-exact", (0, 2): "nearest-exact", (0, 3): "nearest-exact",
                (1, 1): "linear", (1, 2): "bilinear", (1, 3): "trilinear"}


def _resample_torch(array: np.ndarray, new_shape: tuple[int, ...], order: int, separate_axis: int | None,
                    order_separate: int) -> np.ndarray:
    import torch

    arr = np.asarray(array, dtype=np.float32)
    # interpolate the spatial axes in memory order (every mode here is separable per axis, so a
    # transposed view gives the same values) instead of copying a Fortran-ordered scan
    perm = sorted(range(arr.ndim - 1), key=lambda a: -abs(arr.strides[1 + a]))
    view = np.ascontiguousarray(np.transpose(arr, (0, *[1 + p for p in perm])))
    inverse = [perm.index(a) for a in range(len(perm))]
    y = _resample_torch_contiguous(
        torch.from_numpy(view), tuple(new_shape[p] for p in perm), order,
        None if separate_axis is None else perm.index(separate_axis), order_separate,
    )
    return y.permute(0, *[1 + i for i in inverse]).numpy()


def _resample_torch_contiguous(x, new_shape: tuple[int, ...], order: int, separate_axis: int | None,
                               order_separate: int):
    import torch
    import torch.nn.functional as F

    old = tuple(x.shape[1:])
    with torch.inference_mode():
        if separate_axis is None or old[separate_axis] == new_shape[separate_axis]:
            if separate_axis is not None:  # only the in-plane axes change
                return _resample_planes(x, new_shape, order, separate_axis)
            mode = _TORCH_MODES[(order, len(old))]
            kwargs = {} if mode.startswith("nearest") else {"align_corners": False}
            return F.interpolate(x[None], size=new_shape, mode=mode, **kwargs)[0]
        planes = _resample_planes(x, tuple(n if a != separate_axis else old[a] for a, n in enumerate(new_shape)),
                                  order, separate_axis)
        return resample_axis(planes, 1 + separate_axis, new_shape[separate_axis], linear=order_separate == 1)


def _resample_planes(x, new_shape: tuple[int, ...], order: int, axis: int):
    """Resample every axis but ``axis`` (kept) of a ``(C, *spatial)`` tensor, chunked along ``axis``."""
    import torch
    import torch.nn.functional as F

    old = tuple(x.shape[1:])
    rest = tuple(n for a, n in enumerate(new_shape) if a != axis)
    if rest == tuple(n for a, n in enumerate(old) if a != axis):
        return x
    mode = _TORCH_MODES[(order, len(rest))]
    kwargs = {} if mode.startswith("nearest") else {"align_corners": False}
    out = torch.empty((x.shape[0], *new_shape), dtype=torch.float32)
    per_plane = x.shape[0] * max(math.prod(old) // old[axis], math.prod(rest))
    step = max(1, DEFAULT_SLAB_ELEMENTS // max(per_plane, 1))
    for s0 in range(0, old[axis], step):
        n = min(step, old[axis] - s0)
        chunk = x.narrow(1 + axis, s0, n).movedim(1 + axis, 0).contiguous()  # (n, C, *rest)
        res = F.interpolate(chunk, size=rest, mode=mode, **kwargs)
        out.narrow(1 + axis, s0, n).copy_(res.movedim(0, 1 + axis))
    return out


def _resample_scipy(array: np.ndarray, new_shape: tuple[int, ...], order: int, separate_axis: int | None,
                    order_separate: int) -> np.ndarray:
    from scipy import ndimage

    old = tuple(array.shape[1:])
    result = []
    for channel in array:
        x = channel.astype(np.float32, copy=False)
        if separate_axis is None:
            zoom = [n / o for n, o in zip(new_shape, old)]
            y = ndimage.zoom(x, zoom, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
        else:
            first = [1.0 if a == separate_axis else n / o for a, (n, o) in enumerate(zip(new_shape, old))]
            y = x
            if any(f != 1.0 for f in first):
                y = ndimage.zoom(y, first, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
            second = [new_shape[a] / old[a] if a == separate_axis else 1.0 for a in range(len(old))]
            if second[separate_axis] != 1.0:
                y = ndimage.zoom(y, second, order=order_separate, mode="nearest", grid_mode=True,
                                 prefilter=order_separate > 1)
        if y.shape != new_shape:  # zoom rounds; enforce the exact shape
            raise GeometryError(f"resampling produced {y.shape}, expected {new_shape}.")
        result.append(y)
    return np.stack(result)


# --------------------------------------------------------------------------- slab by slab (back)


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

    Linear interpolation (nearest neighbour along ``separate_axis``), in the grid
    convention of :func:`resample_array`; only one float32 slab exists at a time.

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
        i0, i1, _w = axis_weights(moved.shape[1], out_shape[axis], linear=separate_axis != axis, start=start,
                                  stop=stop)
        lo, hi = int(i0.min()), int(i1.max()) + 1
        rows_src = moved.narrow(1, lo, hi - lo).contiguous()
        slab = resample_axis(rows_src, 1, out_shape[axis], linear=separate_axis != axis, start=start, stop=stop,
                             n_src=moved.shape[1], offset=lo)
        if whole_rest:
            slab = _interpolate_rest(slab.float().contiguous(), out_rest, linear)
        elif len(others) == 2 and all(linear):
            if grid is None:
                grid = _sample_grid(out_rest, [box[a] for a in others])
            slab = _sample_rest(slab.float().contiguous(), grid)
        else:
            for i, a in enumerate(others):
                slab = resample_axis(slab, 2 + i, out_shape[a], linear=linear[i], start=box[a][0], stop=box[a][1])
            slab = slab.float()
        yield start, stop, slab


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
        slab = resample_axis(slab, 2 + a, n, linear=linear[a])
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
