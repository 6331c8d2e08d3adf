"""Sliding-window prediction of logits on the plan grid, with bounded memory.

:func:`predict_logits` runs a network over a preprocessed ``(C, *spatial)``
image (already re-oriented, cropped, normalised and resampled to the plan
grid) and returns logits ``(K, *spatial)``. :func:`iter_logit_slabs` is the
streaming form used by :class:`~medseg.inference.segmenter.Segmenter`: it
yields finished slabs along one axis, so the caller never holds more than
one full-size array.

Windows
    Window positions follow nnU-Net's rule: per axis ``n = ceil((size - patch)
    / (patch * (1 - overlap))) + 1`` windows, spread evenly so that the first
    touches the start and the last the end of the axis. An axis shorter than
    the patch is padded with 0 (normalised units, as training pads its
    patches; nnU-Net and MONAI do the same) and cropped back afterwards.

    A 2D model on 3D data (``plan.spatial_dims == 2``, ``plan.data_dims == 3``)
    slides over every slice along ``plan.slice_axis``; with ``plan.slice_context
    = c`` the ``2c + 1`` slices around it (indices clamped at the volume's ends)
    are stacked as channels, channel-major: ``[ch0 z-c..z+c, ch1 z-c..z+c, ...]``.

Blending
    Every window's logits are multiplied by a Gaussian importance map (sigma =
    1/8 of the window per axis, peak 1, cached) and summed; the sum is divided
    by the summed weights at the end (nnU-Net's and MONAI's ``mode="gaussian"``).

Window skipping (``skip_empty=True``)
    The windows keep the whole-image layout above; a window is skipped when it
    contains no body voxel, and nothing else changes. Every window that covers
    a body voxel runs, so the logits at body voxels sum the same windows as
    without skipping (equal up to float rounding from different batches: the
    answer inside the body does not depend on skipping). An earlier version
    laid the windows out anew over the body's bounding box; that moved every
    window and changed a trained model's segmentation (issue 15). Unless
    ``body_mask`` is passed, a voxel is body when any channel is (see
    :func:`body_mask_from_image`):

    * CT channel (``ChannelNorm.scheme == "ct"``): original intensity above
      ``max(-500 HU, clip low)``, tested in normalised units. Air outside the
      body (about -1000 HU) is empty; lungs are not skipped because every
      window inside them holds vessels or walls above -500 HU.
    * z-score channel with ``use_nonzero_mask``: value != 0 (outside the
      non-zero mask the normaliser writes exactly 0).
    * any other channel: value above the channel's minimum (zero padding,
      constant background).

    Voxels that no computed window covers get *background logits*: 0 for
    class 0 and ``-BACKGROUND_MARGIN`` for every other class (softmax > 0.9999
    background).

Accumulation and memory
    Windows are processed in rows along the *stream axis* (the axis with the
    most window positions). The float32 accumulators cover only one window's
    extent along that axis (a ring of ``K x patch_s x rest``), and each slab is
    divided by its weights and handed out as soon as no later window touches
    it. With ``stream=False`` the accumulators span the whole volume (the
    classic approach); both give bitwise identical results because every voxel
    sums the same windows in the same order. On CUDA the accumulators live on
    the GPU when they fit in half of the free memory (``accumulate="auto"``),
    else on the CPU; :func:`predict_logits` stores the full result on the CPU
    in ``out_dtype`` (float32 by default, float16 halves it).

    Peak memory of :func:`predict_logits` beyond the input image: the output
    (``K * N * bytes(out_dtype)``) plus the ring (``(K + 1) * 4 bytes * patch_s
    * rest``) plus one batch of windows.

Precision
    Convolutions run in float32 on the CPU (never autocast there: fp16/bf16
    kernels crash some CPUs); on CUDA under ``torch.autocast(float16)``.

The settings that shape the result (overlap, batch size, mirroring, window
skipping, streaming, where the accumulators live) travel together as one frozen
:class:`WindowOptions`.

Example::

    logits = predict_logits(net, case.image, plan, WindowOptions(overlap=0.5, batch_size=4))
    mask = logits.argmax(0)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from medseg.errors import ConfigError, GeometryError
from medseg.settings import check_overlap

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medseg.data.plan import Plan

__all__ = [
    "BACKGROUND_MARGIN",
    "CT_BODY_THRESHOLD_HU",
    "WindowLayout",
    "WindowOptions",
    "body_mask_from_image",
    "gaussian_importance",
    "iter_logit_slabs",
    "plan_windows",
    "predict_logits",
    "window_starts",
]

log = logging.getLogger(__name__)

#: Original CT intensity (HU) above which a voxel counts as body for window skipping.
CT_BODY_THRESHOLD_HU = -500.0
#: Logit gap between background and every other class where no window was computed.
BACKGROUND_MARGIN = 10.0


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class WindowOptions:
    """How the sliding window runs (one object instead of the same keywords in every signature).

    Attributes:
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        batch_size: windows per forward pass.
        tta: average over mirroring along every combination of the network's axes
            (8 passes in 3D, 4 in 2D).
        skip_empty: skip windows without a body voxel (rule in the module docstring).
        stream: accumulate in a ring one window long along the stream axis
            (bounded memory) instead of over the whole volume; same result.
        accumulate: where the accumulators live: ``auto`` (GPU when they fit), ``device``, ``cpu``.

    Raises:
        ConfigError: an overlap outside [0, 1) or a batch size below 1.
    """

    overlap: float = 0.5
    batch_size: int = 2
    tta: bool = False
    skip_empty: bool = True
    stream: bool = True
    accumulate: Literal["auto", "device", "cpu"] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "overlap", check_overlap(self.overlap))
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}.")
        object.__setattr__(self, "batch_size", int(self.batch_size))
        object.__setattr__(self, "tta", bool(self.tta))
        object.__setattr__(self, "skip_empty", bool(self.skip_empty))
        object.__setattr__(self, "stream", bool(self.stream))
        if self.accumulate not in ("auto", "device", "cpu"):
            raise ConfigError(f"accumulate must be auto, device or cpu, got {self.accumulate!r}.")


# --------------------------------------------------------------------------- window layout


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of windows along one axis (first at 0, last flush with the end).

    Example::

        >>> window_starts(10, 4, 0.5)  # n = ceil((10 - 4) / 2) + 1 = 4
        [0, 2, 4, 6]
    """
    if size <= window:
        return [0]
    step = max(window * (1.0 - overlap), 1.0)
    n = math.ceil((size - window) / step) + 1
    return [round(i * (size - window) / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class WindowLayout:
    """How windows cover a volume on the plan grid.

    Attributes:
        shape: spatial shape of the (unpadded) image.
        padded: spatial shape after padding axes shorter than the window.
        pad_before: voxels of padding before the image, per axis.
        window: window extent per data axis (1 along the slice axis of 2D models).
        context: slices each side stacked as channels (2D models on 3D data).
        slice_axis: data axis that a 2D model slides over (``None`` for matching dims).
        starts: window start positions per axis, in padded coordinates.
        stream_axis: axis along which finished slabs are handed out.
    """

    shape: tuple[int, ...]
    padded: tuple[int, ...]
    pad_before: tuple[int, ...]
    window: tuple[int, ...]
    context: int
    slice_axis: int | None
    starts: tuple[tuple[int, ...], ...]
    stream_axis: int

    @property
    def num_windows(self) -> int:
        return math.prod(len(s) for s in self.starts)

    @property
    def net_axes(self) -> tuple[int, ...]:
        """Data axes that the network sees (and that TTA mirrors)."""
        return tuple(a for a in range(len(self.shape)) if a != self.slice_axis)


def plan_windows(shape: Sequence[int], plan: Plan, overlap: float, *, stream_axis: int | None = None) -> WindowLayout:
    """Window layout for an image of spatial ``shape`` on ``plan``'s grid.

    ``stream_axis`` forces the axis along which slabs are handed out (default:
    the slice axis of a 2D model, else the axis with the most window positions).

    Raises:
        GeometryError: the image dimensionality does not fit the model.
    """
    shape = tuple(int(s) for s in shape)
    data_dims = len(shape)
    patch = [int(p) for p in plan.patch_size]
    if plan.spatial_dims == data_dims:
        window = tuple(patch)
        slice_axis = None
        context = 0
    elif plan.spatial_dims == 2 and data_dims == 3:
        slice_axis = int(plan.slice_axis) if plan.slice_axis is not None else 2
        in_plane = iter(patch)
        window = tuple(1 if a == slice_axis else next(in_plane) for a in range(3))
        context = int(plan.slice_context)
    else:
        raise GeometryError(
            f"image has {data_dims} spatial dimensions {shape} but the model is {plan.spatial_dims}D "
            f"(trained on {plan.data_dims}D data); pass a {plan.data_dims}D scan."
        )
    if len(window) != data_dims:
        raise GeometryError(f"plan patch_size {patch} does not fit a {data_dims}D image of shape {shape}.")
    padded = tuple(max(s, w) for s, w in zip(shape, window))
    pad_before = tuple((p - s) // 2 for p, s in zip(padded, shape))
    starts = tuple(tuple(window_starts(p, w, overlap)) for p, w in zip(padded, window))
    if stream_axis is not None:
        stream_axis = int(stream_axis)
    elif slice_axis is not None:
        stream_axis = slice_axis
    else:
        # most positions first (smallest ring), then the longest axis
        stream_axis = max(range(data_dims), key=lambda a: (len(starts[a]), padded[a]))
    return WindowLayout(
        shape=shape,
        padded=padded,
        pad_before=pad_before,
        window=window,
        context=context,
        slice_axis=slice_axis,
        starts=starts,
        stream_axis=stream_axis,
    )


# --------------------------------------------------------------------------- importance map


@functools.lru_cache(maxsize=16)
def _gaussian_numpy(window: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    out = np.ones((), dtype=np.float64)
    for w in window:
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        sigma = max(w * sigma_scale, 1e-6)
        g = np.exp(-0.5 * (x / sigma) ** 2) if w > 1 else np.ones(1)
        out = np.multiply.outer(out, g)
    out = out / out.max()
    # the corners of a 3D window are ~exp(-24): keep every weight > 0 to avoid 0/0
    out = np.maximum(out, 1e-6)
    out = out.astype(np.float32)
    out.setflags(write=False)
    return out


def gaussian_importance(window: Sequence[int], *, sigma_scale: float = 0.125, device=None) -> torch.Tensor:
    """Gaussian weight map over a window (peak 1, sigma = ``sigma_scale`` x window), cached."""
    return _gaussian_tensor(tuple(int(w) for w in window), float(sigma_scale), str(device or "cpu"))


@functools.lru_cache(maxsize=16)
def _gaussian_tensor(window: tuple[int, ...], sigma_scale: float, device: str) -> torch.Tensor:
    import torch

    return torch.from_numpy(_gaussian_numpy(window, sigma_scale).copy()).to(device)


# --------------------------------------------------------------------------- body mask


def body_mask_from_image(image: np.ndarray | torch.Tensor, plan: Plan) -> np.ndarray:
    """Voxels that count as body for window skipping (rule in the module docstring).

    Args:
        image: preprocessed ``(C, *spatial)`` image (normalised intensities).
        plan: gives each channel's normalisation.

    Returns:
        Boolean array of the spatial shape.
    """
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    body = np.zeros(arr.shape[1:], dtype=bool)
    norms = list(plan.normalization)
    for c in range(arr.shape[0]):
        channel = arr[c]
        norm = norms[c] if c < len(norms) else None
        if norm is not None and norm.scheme == "ct" and norm.std:
            threshold = float(norm.hu_to_units(CT_BODY_THRESHOLD_HU))
            # tolerance for float32 rounding of values sitting exactly at the clip
            body |= channel > threshold + 1e-4 * max(1.0, abs(threshold))
        elif norm is not None and norm.scheme == "zscore" and norm.use_nonzero_mask:
            body |= channel != 0
        else:
            body |= channel > channel.min()
    return body


# --------------------------------------------------------------------------- prediction


def _network_device(network: nn.Module):
    import torch

    for p in itertools.chain(network.parameters(), network.buffers()):
        return p.device
    return torch.device("cpu")


def _forward(network: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    import torch

    ctx = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with ctx:
        out = network(x)
    if isinstance(out, (list, tuple)):  # deep supervision outputs: full resolution first
        out = out[0]
    return out.float()


def _choose_accumulator_device(device, ring_bytes: int, accumulate: str):
    import torch

    if accumulate == "cpu" or device.type != "cuda":
        return torch.device("cpu")
    if accumulate == "device":
        return device
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):  # pragma: no cover - depends on the driver
        return torch.device("cpu")
    return device if ring_bytes < 0.5 * free else torch.device("cpu")


def iter_logit_slabs(
    network: nn.Module,
    image: np.ndarray | torch.Tensor,
    plan: Plan,
    options: WindowOptions | None = None,
    *,
    device: str | torch.device | None = None,
    body_mask: np.ndarray | None = None,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield finished logits slabs ``(start, stop, logits)`` along the stream axis.

    ``logits`` is float32 ``(K, *spatial)`` with ``stop - start`` voxels along
    :attr:`WindowLayout.stream_axis` (see :func:`plan_windows`), on the
    accumulator device. Slabs come in order and cover the whole axis.
    Arguments as in :func:`predict_logits`; ``timings`` (if given) receives
    ``network_s`` (seconds in forward passes), ``windows`` and ``skipped_windows``.
    """
    import torch

    options = options or WindowOptions()
    device = torch.device(device) if device is not None else _network_device(network)
    img = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    img = img.float()
    if img.ndim < 3:
        raise GeometryError(f"image must be channel-first (C, *spatial), got shape {tuple(img.shape)}.")
    layout = plan_windows(img.shape[1:], plan, options.overlap)
    expected_channels = plan.image_channels if layout.slice_axis is not None else plan.in_channels
    if img.shape[0] != expected_channels:
        raise GeometryError(
            f"image has {img.shape[0]} channel(s) but the model expects {expected_channels}; "
            "pass one channel per modality the model was trained on."
        )
    body = None
    if options.skip_empty:
        if body_mask is None:
            body = body_mask_from_image(img, plan)
        else:
            body = np.asarray(body_mask, dtype=bool)
            if body.shape != layout.shape:
                raise GeometryError(f"body_mask shape {body.shape} != image spatial shape {layout.shape}.")
    yield from _iter_layout(
        network, img, plan, layout, body, options, device=device, progress=progress, timings=timings
    )


def _iter_layout(
    network: nn.Module,
    img: torch.Tensor,
    plan: Plan,
    layout: WindowLayout,
    body: np.ndarray | None,
    options: WindowOptions,
    *,
    device,
    progress: bool,
    timings: dict[str, float] | None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Slabs of one window layout over ``img`` (unpadded ``(C, *layout.shape)``); ``body`` skips windows."""
    import torch

    batch_size, stream = options.batch_size, options.stream

    dims = len(layout.shape)
    # pad axes shorter than the window with 0, as training pads its patches (normalised units)
    if layout.padded != layout.shape:
        padded = img.new_zeros((img.shape[0], *layout.padded))
        region = tuple(slice(b, b + s) for b, s in zip(layout.pad_before, layout.shape))
        padded[(slice(None), *region)] = img
        img = padded
        if body is not None:
            full = np.zeros(layout.padded, dtype=bool)
            full[region] = body
            body = full

    k_classes = plan.num_classes
    sa = layout.stream_axis
    ring_len = max(layout.window[sa], min(batch_size, len(layout.starts[sa]))) if stream else layout.padded[sa]
    rest = [p for a, p in enumerate(layout.padded) if a != sa]
    ring_bytes = (k_classes + 1) * 4 * ring_len * math.prod(rest)
    acc_device = _choose_accumulator_device(device, ring_bytes, options.accumulate)
    gauss = gaussian_importance(layout.window, device=acc_device)
    flips = [()]
    if options.tta:
        axes = [2 + a for a in layout.net_axes]
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def new_ring(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = list(layout.padded)
        shape[sa] = length
        return (
            torch.zeros((k_classes, *shape), dtype=torch.float32, device=acc_device),
            torch.zeros(shape, dtype=torch.float32, device=acc_device),
        )

    def finish(acc: torch.Tensor, weight: torch.Tensor, lo: int, b: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Normalise rows [lo, b) (padded coords; the ring starts at lo) and yield them unpadded.

        Rows past the ring's end were covered by no computed window: they get background logits.
        """
        length = acc.shape[1 + sa]
        pad0, size = layout.pad_before[sa], layout.shape[sa]
        for c0 in range(lo, b, length):
            s0, s1 = max(c0, pad0), min(c0 + length, b, pad0 + size)
            if s1 <= s0:
                continue
            index = [slice(pb, pb + n) for pb, n in zip(layout.pad_before, layout.shape)]
            index[sa] = slice(s0 - c0, s1 - c0)
            if c0 == lo:
                w = weight[tuple(index)]
                logits = acc[(slice(None), *index)] / w.clamp_min(1e-12)
                empty = w <= 0
            else:
                logits = torch.zeros_like(acc[(slice(None), *index)])
                empty = torch.ones_like(weight[tuple(index)], dtype=torch.bool)
            if bool(empty.any()):
                logits[0][empty] = 0.0
                logits[1:, empty] = -BACKGROUND_MARGIN
            yield s0 - pad0, s1 - pad0, logits

    other_axes = [a for a in range(dims) if a != sa]
    total = layout.num_windows
    counter = {"skipped": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="windows", unit="win", leave=False)

    def positions() -> Iterator[list[int]]:
        """Window starts in row order along the stream axis, empty windows left out."""
        for row_start in layout.starts[sa]:
            for combo in itertools.product(*(layout.starts[a] for a in other_axes)):
                start = [0] * dims
                start[sa] = row_start
                for a, s in zip(other_axes, combo):
                    start[a] = s
                if body is not None and not body[tuple(slice(s, s + w) for s, w in zip(start, layout.window))].any():
                    counter["skipped"] += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                yield start

    ctx_offsets = torch.arange(-layout.context, layout.context + 1, device=img.device)
    win_s = layout.window[sa]
    was_training = network.training
    network.eval()
    try:
        lo = 0
        acc, weight = new_ring(layout.window[sa] if stream else layout.padded[sa])
        batches = _batched(positions(), batch_size)
        for batch_pos in batches:
            first, last = batch_pos[0][sa], batch_pos[-1][sa]
            if last + win_s > lo + acc.shape[1 + sa]:
                # later windows start at >= first: rows before it are final
                yield from finish(acc, weight, lo, first)
                new_acc, new_weight = new_ring(max(win_s, last - first + win_s))
                keep = min(lo + acc.shape[1 + sa], first + new_acc.shape[1 + sa]) - first
                if keep > 0:
                    src = [slice(None)] * dims
                    dst = [slice(None)] * dims
                    src[sa] = slice(first - lo, first - lo + keep)
                    dst[sa] = slice(0, keep)
                    new_acc[(slice(None), *dst)] = acc[(slice(None), *src)]
                    new_weight[tuple(dst)] = weight[tuple(src)]
                acc, weight, lo = new_acc, new_weight, first
            windows = []
            for start in batch_pos:
                box = [slice(s, s + w) for s, w in zip(start, layout.window)]
                if layout.slice_axis is not None:
                    idx = (ctx_offsets + start[layout.slice_axis]).clamp_(0, layout.padded[layout.slice_axis] - 1)
                    box[layout.slice_axis] = slice(None)
                    windows.append(img[(slice(None), *box)].index_select(1 + layout.slice_axis, idx))
                else:
                    windows.append(img[(slice(None), *box)])
            x = torch.stack(windows).to(device, non_blocking=True)
            with torch.inference_mode():
                t0 = time.perf_counter()
                summed = _predict_batch(network, x, flips, layout.slice_axis, device)
                if timings is not None:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    timings["network_s"] = timings.get("network_s", 0.0) + time.perf_counter() - t0
                if summed.shape[1] != k_classes:
                    raise GeometryError(
                        f"network returned {summed.shape[1]} classes but the plan has {k_classes} "
                        f"({', '.join(plan.label_names)}); the model folder is inconsistent."
                    )
                summed = summed.to(acc_device)
                for j, start in enumerate(batch_pos):
                    box = [slice(s, s + w) for s, w in zip(start, layout.window)]
                    box[sa] = slice(start[sa] - lo, start[sa] - lo + win_s)
                    acc[(slice(None), *box)].addcmul_(summed[j], gauss)
                    weight[tuple(box)].add_(gauss)
            if bar is not None:
                bar.update(len(batch_pos))
        yield from finish(acc, weight, lo, layout.padded[sa])
    finally:
        if was_training:
            network.train()
        if bar is not None:
            bar.close()
    if timings is not None:
        timings["windows"] = timings.get("windows", 0) + total
        timings["skipped_windows"] = timings.get("skipped_windows", 0) + counter["skipped"]
    if counter["skipped"]:
        log.debug("sliding window: skipped %d of %d windows outside the body", counter["skipped"], total)


def _batched(items: Iterator[list[int]], n: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _predict_batch(network: nn.Module, x: torch.Tensor, flips: list[tuple[int, ...]], slice_axis: int | None, device):
    """Logits of one batch of windows, averaged over the mirrored copies in ``flips``."""
    import torch

    summed = None
    for flip in flips:
        xin = torch.flip(x, flip) if flip else x
        if slice_axis is not None:
            xin = _slices_to_channels(xin, slice_axis)
        out = _forward(network, xin, device)
        if slice_axis is not None:
            out = out.unsqueeze(2 + slice_axis)
        if flip:
            out = torch.flip(out, flip)
        summed = out if summed is None else summed.add_(out)
    if len(flips) > 1:
        summed = summed.div_(len(flips))
    return summed


def _slices_to_channels(x: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """(B, C, *win) with 2c+1 slices along ``slice_axis`` -> (B, C * (2c+1), *in_plane), channel-major."""
    x = x.movedim(2 + slice_axis, 2)
    b, c, s = x.shape[:3]
    return x.reshape(b, c * s, *x.shape[3:])


def predict_logits(
    network: nn.Module,
    image: np.ndarray | torch.Tensor,
    plan: Plan,
    options: WindowOptions | None = None,
    *,
    device: str | torch.device | None = None,
    body_mask: np.ndarray | None = None,
    out_dtype: torch.dtype | None = None,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Sliding-window logits of ``network`` over a preprocessed image.

    Args:
        network: maps ``(B, plan.in_channels, *patch)`` to logits ``(B, K, *patch)``;
            put in eval mode for the call (its mode is restored afterwards).
        image: ``(C, *spatial)`` float image on the plan grid (``C =
            plan.image_channels``; for a model with matching dims ``C = plan.in_channels``).
        plan: gives ``patch_size``, the number of classes, 2D slicing and the normalisation.
        options: overlap, batch size, mirroring TTA, window skipping, streaming and
            accumulator placement (:class:`WindowOptions`; default ``WindowOptions()``).
        device: where the network runs; ``None``: the network's device.
        body_mask: boolean ``spatial`` mask that replaces the default body rule.
        out_dtype: dtype of the returned tensor (default float32; float16 halves its memory).
        progress: show a progress bar.
        timings: if given, receives ``network_s``, ``windows`` and ``skipped_windows``.

    Returns:
        Logits ``(K, *spatial)`` on the CPU.

    Raises:
        GeometryError: the image's dimensionality or channels do not fit the model.
    """
    import torch

    options = options or WindowOptions()
    out_dtype = out_dtype or torch.float32
    shape = tuple((image.shape if hasattr(image, "shape") else np.shape(image))[1:])
    layout_axis = None
    out = None
    for start, stop, slab in iter_logit_slabs(
        network, image, plan, options, device=device, body_mask=body_mask, progress=progress, timings=timings
    ):
        if out is None:
            out = torch.empty((slab.shape[0], *shape), dtype=out_dtype)
            # the stream axis is the one where the slab is shorter than (or equal to) the image
            layout_axis = plan_windows(shape, plan, options.overlap).stream_axis
        index = [slice(None)] * len(shape)
        index[layout_axis] = slice(start, stop)
        out[(slice(None), *index)] = slab.to("cpu", dtype=out_dtype)
    if out is None:  # pragma: no cover - iter_logit_slabs always covers the stream axis
        raise RuntimeError("sliding window produced no output")
    return out
