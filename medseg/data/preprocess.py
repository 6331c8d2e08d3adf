"""Deterministic preprocessing shared by training and inference, and its exact record.

:func:`preprocess_case` applies, in this order (nnU-Net's order):

1. **re-orient** to ``plan.orientation`` (RAS): axis permutation and flips
   only, chosen from the affine's closest axes (``nibabel.io_orientation``);
   no interpolation, exactly invertible. 2D cases are not re-oriented.
2. **crop** to the bounding box of voxels that are non-zero in any channel
   (when ``plan.crop_to_nonzero``); the box is recorded.
3. **normalise** each channel (``plan.normalization``, see
   :class:`~medseg.data.plan.ChannelNorm`).
4. **resample** to ``plan.target_spacing``: the new shape is
   ``round(shape * spacing / target_spacing)`` (at least 1), the field of view
   (outer voxel edges) is kept, so the actual new spacing is
   ``spacing * shape / new_shape``. Images use linear interpolation in
   float32 (:data:`IMAGE_ORDER`; trilinear, or bilinear in-plane), labels
   linear interpolation of each class's one-hot mask then argmax. When the
   spacing is anisotropic (largest/smallest > 3, as in nnU-Net), the thick
   axis is resampled separately with nearest neighbour
   (``record.separate_axis``) and the other axes as above.

   Until :data:`PREPROCESS_VERSION` 2 images used cubic splines (order 3,
   computed in float64 over the whole scan); linear float32 is ~10x faster,
   needs no float64 copy of the scan, and matches what MONAI's
   ``Spacingd(mode="bilinear")`` pipelines feed their networks. The version
   is part of the on-disk cache key, so caches made with the old rule are
   not reused.

Every grid operation (and its inverse) is :mod:`medseg.spatial`'s; this module
chooses the steps from the plan and records them. The :class:`PreprocessRecord`
holds everything needed to map a prediction on the plan grid back onto the
original scan, in reverse order (:func:`medseg.inference.restore.restore_prediction`):

1. resample from ``record.final_geometry.shape`` back to
   ``record.shape_after_crop`` (:func:`medseg.spatial.resample_slabs`, logits: linear);
2. un-crop into ``record.shape_after_orient`` at ``record.crop_bbox`` and
3. un-orient with ``record.ornt``, giving the original voxel order and
   ``record.original_geometry``: both by writing through
   :func:`medseg.spatial.cropped_view` of an array on the scan's grid.

:func:`restore_mask` does steps 2-3 for an integer mask exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.data.plan import ChannelNorm, Plan
from medseg.errors import DatasetError, GeometryError
from medseg.io.geometry import Geometry
from medseg.io.volume import Volume
from medseg.spatial import (
    crop,
    crop_affine,
    cropped_view,
    nonzero_bbox,
    orientation_affine,
    orientation_transform,
    reorient,
    reoriented_view,
    resample_array,
    resample_axis,
    resampling_affine,
    separate_axis_for,
)

__all__ = [
    "IMAGE_ORDER",
    "PREPROCESS_VERSION",
    "PreprocessRecord",
    "PreprocessedCase",
    "class_indices",
    "normalize",
    "preprocess_case",
    "restore_mask",
]

PREPROCESS_VERSION = 2
"""Version of the preprocessing rules (part of the cache key): 2 = linear float32 image resampling."""

IMAGE_ORDER = 1
"""Interpolation order for images (1: linear, float32)."""

_EPS = 1e-8


@dataclass(frozen=True, eq=False)
class PreprocessRecord:
    """How a case was preprocessed, to undo it exactly (JSON-serialisable).

    Attributes:
        original_geometry: the grid as read (original voxel order).
        orientation: the axis codes the case was re-oriented to ("RAS").
        ornt: nibabel orientation transform from the original voxel axes to
            the re-oriented ones: row ``i`` = ``[source axis, flip (+1/-1)]``
            for original axis ``i`` (``nibabel.orientations.apply_orientation``).
        shape_after_orient: spatial shape after re-orientation (= before crop).
        crop_bbox: ``[[start, stop], ...]`` per re-oriented axis (half-open).
        shape_after_crop: spatial shape after cropping (= before resampling).
        spacing_before_resampling: mm per re-oriented axis before resampling.
        separate_axis: the thick axis resampled separately, or ``None``.
        final_geometry: the plan grid (shape after resampling, its affine).
        channel_stats: per channel ``{"mean", "std"}`` used by z-score
            normalisation (for reference; empty entries for other schemes).
    """

    original_geometry: Geometry
    orientation: str
    ornt: list[list[int]]
    shape_after_orient: tuple[int, ...]
    crop_bbox: list[list[int]]
    shape_after_crop: tuple[int, ...]
    spacing_before_resampling: tuple[float, ...]
    separate_axis: int | None
    final_geometry: Geometry
    channel_stats: list[dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "original_geometry": self.original_geometry.to_dict(),
            "orientation": self.orientation,
            "ornt": [list(map(int, r)) for r in self.ornt],
            "shape_after_orient": list(self.shape_after_orient),
            "crop_bbox": [list(map(int, b)) for b in self.crop_bbox],
            "shape_after_crop": list(self.shape_after_crop),
            "spacing_before_resampling": list(self.spacing_before_resampling),
            "separate_axis": self.separate_axis,
            "final_geometry": self.final_geometry.to_dict(),
            "channel_stats": [dict(s) for s in self.channel_stats],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessRecord:
        return cls(
            original_geometry=Geometry.from_dict(data["original_geometry"]),
            orientation=str(data["orientation"]),
            ornt=[[int(a), int(f)] for a, f in data["ornt"]],
            shape_after_orient=tuple(int(s) for s in data["shape_after_orient"]),
            crop_bbox=[[int(a), int(b)] for a, b in data["crop_bbox"]],
            shape_after_crop=tuple(int(s) for s in data["shape_after_crop"]),
            spacing_before_resampling=tuple(float(s) for s in data["spacing_before_resampling"]),
            separate_axis=None if data.get("separate_axis") is None else int(data["separate_axis"]),
            final_geometry=Geometry.from_dict(data["final_geometry"]),
            channel_stats=[dict(s) for s in data.get("channel_stats", [])],
        )


@dataclass(frozen=True, eq=False)
class PreprocessedCase:
    """A case on the plan grid.

    Attributes:
        image: float32 ``(C, *spatial)``.
        label: ``(1, *spatial)`` class indices ``0..K-1`` (uint8 or int16), or None.
        record: how to map back to the original grid.
    """

    image: np.ndarray
    label: np.ndarray | None
    record: PreprocessRecord


def restore_mask(mask: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """Exactly undo crop and re-orientation of an integer mask on the cropped grid.

    The mask is written through :func:`medseg.spatial.cropped_view` of zeros on the
    original grid (background outside the crop box), as restoring a prediction does.

    Args:
        mask: ``(*shape_after_crop)`` or ``(1, *shape_after_crop)`` integer mask
            (already resampled back from the plan grid).
        record: the case's record.

    Returns:
        The mask on the original voxel grid, shape ``record.original_geometry.shape``
        (channel axis kept if it was given).
    """
    had_channel = mask.ndim == len(record.shape_after_crop) + 1
    arr = mask if had_channel else mask[np.newaxis]
    if tuple(arr.shape[1:]) != tuple(record.shape_after_crop):
        raise GeometryError(
            f"restore_mask: mask spatial shape {tuple(arr.shape[1:])} != the cropped shape "
            f"{record.shape_after_crop}; resample back to record.shape_after_crop first."
        )
    out = np.zeros((arr.shape[0], *record.original_geometry.shape), dtype=arr.dtype)
    cropped_view(out, ornt=record.ornt, crop_bbox=record.crop_bbox,
                 shape_after_orient=record.shape_after_orient)[...] = arr
    return out if had_channel else out[0]


# --------------------------------------------------------------------------- normalise and resample


def normalize(image: np.ndarray, norms: Sequence[ChannelNorm]) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Normalise each channel; returns float32 array and the per-image statistics used."""
    if len(norms) != image.shape[0]:
        raise DatasetError(
            f"the plan normalises {len(norms)} channel(s) but the image has {image.shape[0]}; "
            "the scan does not match the dataset the plan was made for."
        )
    # same memory layout as the input (NIfTI data is Fortran-ordered): no transposing copy here
    out = np.empty_like(image, dtype=np.float32)
    stats: list[dict[str, float]] = []
    for c, norm in enumerate(norms):
        if norm.scheme == "ct":
            # about 1 M voxels at a time along the slowest axis: no full-size temporaries
            src, dst = image[c], out[c]
            slow = int(np.argmax([abs(st) for st in src.strides]))
            rows = max(1, (1 << 20) // max(1, src.size // max(1, src.shape[slow])))
            for r0 in range(0, src.shape[slow], rows):
                index = tuple(slice(r0, r0 + rows) if a == slow else slice(None) for a in range(src.ndim))
                dst[index] = norm.hu_to_units(src[index])
            stats.append({})
            continue
        x = image[c].astype(np.float32, copy=False)
        if norm.scheme == "zscore":
            if norm.use_nonzero_mask:
                mask = image[c] != 0
                values = x[mask]
            else:
                mask = None
                values = x
            mean = float(values.mean()) if values.size else 0.0
            std = float(values.std()) if values.size else 1.0
            y = (x - mean) / max(std, _EPS)
            if mask is not None:
                y = np.where(mask, y, 0.0)
            out[c] = y
            stats.append({"mean": mean, "std": std})
        else:
            out[c] = x
            stats.append({})
    return out, stats


def _normalize_and_resample(
    image: np.ndarray, norms: Sequence[ChannelNorm], new_shape: tuple[int, ...], separate: int | None
) -> tuple[np.ndarray, list[dict[str, float]]] | None:
    """:func:`normalize` then linear :func:`resample_array`, a few planes at a time.

    Planes along the image's slowest memory axis (``z`` of a NIfTI scan) are
    normalised and resampled in-plane (bilinear) in chunks of about 4 M voxels,
    then that axis is resampled (linear, or nearest when it is the thick
    ``separate`` axis): the same separable interpolation as the whole-volume
    path, without a full-resolution float32 copy of the scan (1 GB for a
    512 x 512 x 1000 CT). Returns ``None`` (use the whole-volume path) for
    z-score channels (their statistics need the whole image), 2D images, a
    thick axis that is not the slowest one, or no resampling at all.
    """
    if (
        IMAGE_ORDER != 1
        or image.ndim != 4
        or len(norms) != image.shape[0]
        or any(n.scheme == "zscore" for n in norms)
        or tuple(image.shape[1:]) == tuple(new_shape)
    ):
        return None
    slow = int(np.argmax([abs(st) for st in image.strides[1:]]))
    if separate is not None and separate != slow:
        return None
    import torch
    import torch.nn.functional as F

    old = tuple(image.shape[1:])
    # the in-plane axes in memory order too (bilinear is separable): no transposing copy of the planes
    rest = sorted((a for a in range(3) if a != slow), key=lambda a: -abs(image.strides[1 + a]))
    rest_old = tuple(old[a] for a in rest)
    rest_new = tuple(new_shape[a] for a in rest)
    planes = torch.empty((image.shape[0], *[old[a] if a == slow else new_shape[a] for a in range(3)]))
    rows = max(1, (1 << 22) // max(1, image.shape[0] * math.prod(rest_old)))
    order = (1 + slow, 0, 1 + rest[0], 1 + rest[1])
    stats: list[dict[str, float]] = []
    with torch.inference_mode():
        for r0 in range(0, old[slow], rows):
            index = tuple(slice(r0, r0 + rows) if a == slow else slice(None) for a in range(3))
            part, stats = normalize(image[(slice(None), *index)], norms)
            chunk = torch.from_numpy(np.ascontiguousarray(np.transpose(part, order)))  # (n, C, *rest)
            if rest_new != rest_old:
                chunk = F.interpolate(chunk, size=rest_new, mode="bilinear", align_corners=False)
            planes.narrow(1 + slow, r0, chunk.shape[0]).permute(order).copy_(chunk)
        if new_shape[slow] != old[slow]:
            planes = resample_axis(planes, 1 + slow, new_shape[slow], linear=separate is None)
    return planes.numpy(), stats


def _resample_labels(label: np.ndarray, new_shape: Sequence[int], separate_axis: int | None) -> np.ndarray:
    """One-hot linear resampling (per present class) and argmax; nearest along a separate axis."""
    present = [int(v) for v in np.unique(label)]
    best = np.full(tuple(new_shape), -1.0, dtype=np.float32)
    out = np.zeros(tuple(new_shape), dtype=label.dtype)
    for value in present:
        onehot = (label[0] == value).astype(np.float32)[np.newaxis]
        resampled = resample_array(onehot, new_shape, order=1, separate_axis=separate_axis, order_separate=0)[0]
        better = resampled > best
        best[better] = resampled[better]
        out[better] = value
    return out[np.newaxis]


# --------------------------------------------------------------------------- labels


def class_indices(
    label: np.ndarray, label_values: Sequence[int], *, ignore_label: int | None = None, where: str = "label"
) -> np.ndarray:
    """Map label values to class indices ``0..K-1`` (uint8, or int16 for > 255 classes).

    The value ``ignore_label`` (``Plan.ignore_label``: unlabeled voxels) maps to index
    ``K = len(label_values)``, which the losses leave out.

    Raises:
        DatasetError: non-integer values, or values not in ``label_values``.
    """
    values = np.asarray(label_values, dtype=np.int64)
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.isfinite(label)):
            raise DatasetError(f"{where} contains NaN/Inf values; a label map must hold integer class values.")
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            bad = np.unique(label[rounded != label])[:5]
            raise DatasetError(f"{where} contains non-integer values {bad.tolist()}; expected integers {values.tolist()}.")
        label = rounded.astype(np.int64)
    present = np.unique(label)
    allowed = values if ignore_label is None else np.append(values, ignore_label)
    unknown = np.setdiff1d(present, allowed)
    if unknown.size:
        raise DatasetError(
            f"{where} contains values {unknown.tolist()} not in the plan's labels {values.tolist()}; "
            "fix the label map or declare the values in dataset.json."
        )
    dtype = np.uint8 if len(values) + (ignore_label is not None) <= 256 else np.int16  # index K must fit
    lut_size = int(max(allowed.max(), present.max())) + 1
    if present.min() < 0:
        raise DatasetError(f"{where} contains negative values {present[present < 0].tolist()}.")
    lut = np.zeros(lut_size, dtype=dtype)
    lut[values] = np.arange(len(values), dtype=dtype)
    if ignore_label is not None:
        lut[ignore_label] = len(values)
    return lut[label.astype(np.int64, copy=False)]


# --------------------------------------------------------------------------- the pipeline


def preprocess_case(volume: Volume, plan: Plan, *, label: np.ndarray | None = None) -> PreprocessedCase:
    """Bring a scan (and optionally its label map) onto the plan grid.

    Args:
        volume: the scan as read by ``medseg.io.read_volume`` (channel-first).
        plan: the plan (orientation, crop, normalisation, target spacing).
        label: label map on the scan's grid, ``(*spatial)`` or ``(1, *spatial)``,
            holding label *values* (mapped to class indices via ``plan.label_values``).

    Returns:
        :class:`PreprocessedCase` with float32 image, class-index label and the record.

    Raises:
        DatasetError: channel count or label values do not match the plan.
        GeometryError: the label's shape differs from the scan's, or the scan's
            dimensionality differs from the plan's.
    """
    geometry = volume.geometry
    image = volume.array
    name = volume.name
    if volume.spatial_dims != plan.data_dims:
        raise GeometryError(
            f"{name} is {volume.spatial_dims}D {geometry.shape} but the plan expects {plan.data_dims}D volumes."
        )
    if image.shape[0] != plan.image_channels:
        raise DatasetError(
            f"{name} has {image.shape[0]} channel(s) but the plan expects {plan.image_channels} "
            f"({', '.join(plan.channel_names)})."
        )
    if label is not None:
        label = np.asarray(label)
        if label.ndim == volume.spatial_dims:
            label = label[np.newaxis]
        if tuple(label.shape[1:]) != tuple(geometry.shape) or label.shape[0] != 1:
            raise GeometryError(f"label shape {label.shape} does not match the scan {name} (1, *{geometry.shape}).")
        label = class_indices(label, plan.label_values, ignore_label=plan.ignore_label, where=f"label of {name}")
    # 1. re-orient (permute/flip only)
    if volume.spatial_dims == 3:
        ornt = orientation_transform(geometry.affine, plan.orientation)
        image = reoriented_view(image, ornt)  # normalisation below makes the contiguous copy
        label = reorient(label, ornt) if label is not None else None
        affine = np.asarray(geometry.affine) @ orientation_affine(ornt, geometry.shape)
    else:
        ornt = np.column_stack([np.arange(2), np.ones(2)]).astype(int)
        affine = geometry.affine
    shape_after_orient = tuple(image.shape[1:])
    # 2. crop to non-zero
    if plan.crop_to_nonzero:
        bbox = nonzero_bbox(image)
    else:
        bbox = [[0, s] for s in shape_after_orient]
    image = crop(image, bbox)
    label = crop(label, bbox) if label is not None else None
    affine = affine @ crop_affine(bbox)
    shape_after_crop = tuple(image.shape[1:])
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)[: len(shape_after_crop)])
    # 3. normalise and 4. resample (fused plane by plane when the normalisation is pointwise)
    target = [float(t) for t in plan.target_spacing]
    new_shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(shape_after_crop, spacing, target))
    separate = separate_axis_for(spacing, target) if new_shape != shape_after_crop else None
    fused = _normalize_and_resample(image, plan.normalization, new_shape, separate)
    if fused is not None:
        image, stats = fused
    else:
        image, stats = normalize(image, plan.normalization)
        if new_shape != shape_after_crop:
            image = resample_array(image, new_shape, order=IMAGE_ORDER, separate_axis=separate, order_separate=0)
    if new_shape != shape_after_crop and label is not None:
        label = _resample_labels(label, new_shape, separate)
    final_affine = affine @ resampling_affine(shape_after_crop, new_shape)
    final_geometry = geometry.with_shape_and_affine(new_shape, final_affine)
    record = PreprocessRecord(
        original_geometry=geometry,
        orientation=plan.orientation,
        ornt=np.asarray(ornt).astype(int).tolist(),
        shape_after_orient=shape_after_orient,
        crop_bbox=bbox,
        shape_after_crop=shape_after_crop,
        spacing_before_resampling=spacing,
        separate_axis=separate,
        final_geometry=final_geometry,
        channel_stats=stats,
    )
    image = np.ascontiguousarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise DatasetError(f"{name}: preprocessing produced NaN/Inf values; the scan contains NaN/Inf voxels.")
    return PreprocessedCase(image=image, label=None if label is None else np.ascontiguousarray(label), record=record)
