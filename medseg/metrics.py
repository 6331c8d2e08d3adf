"""Segmentation metrics: overlap from confusion counts, surface distances in mm, lesion-wise detection.

Definitions, the empty-mask policy and the known differences from MONAI,
DeepMind's surface-distance and nnU-Net are in ``docs/metrics.md``. In short:

* **Overlap** metrics come from one confusion matrix per case (a single
  ``np.bincount`` over ``pred * K + gt``), so every class costs the same one pass.
* **Surfaces** (see :data:`SurfaceKind`), two definitions:

  - ``surface="surfel"`` (default; DeepMind's ``surface-distance``, Nikolov et
    al., the reference of Metrics Reloaded): surface elements on the grid of
    voxel corners. Each corner gets the code of its 2x2(x2) voxel neighbourhood;
    a code other than all-inside/all-outside is a surface point whose area
    (3D, marching-cubes triangles through edge midpoints) or length (2D) comes
    from a table per spacing. Distances from each surface point to the nearest
    surface point of the other mask are Euclidean in mm, and every metric is
    weighted by the areas.
  - ``surface="voxel"`` (MONAI with ``use_subvoxels=False``): the voxels with
    at least one face neighbour (6 in 3D, 4 in 2D) outside the mask, the image
    border counting as outside (``mask & ~binary_erosion(mask)``); distances
    between voxel centres (``index * spacing``), every voxel counting once.
* ``hd`` = max of both directed maxima; ``hd95`` = max of the two directed
  95th percentiles (surfel: area-weighted, as ``compute_robust_hausdorff``;
  voxel: linear interpolation); ``assd`` = mean of both directed distance sets
  pooled (surfel: area-weighted); ``nsd`` = share of both surfaces (area, or
  voxel count) within ``tolerance_mm`` of the other surface.
* **Empty masks** (see :data:`EmptyPolicy`): both empty -> NaN (``empty="nan"``,
  the default: excluded from means and counted in ``n_valid``) or a perfect
  score (``empty="one"``). One empty -> Dice/IoU/NSD 0 and distances at the
  worst value (``inf`` by default, see :data:`WorstDistance`): never NaN, never
  dropped.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg.errors import ArrayValueError, ConfigError, GeometryError

__all__ = [
    "DEFAULT_METRICS",
    "LESION_METRICS",
    "OVERLAP_METRICS",
    "SURFACE_KINDS",
    "SURFACE_METRICS",
    "EmptyPolicy",
    "Lesion",
    "LesionOptions",
    "LesionScores",
    "SurfaceDistances",
    "SurfaceKind",
    "WorstDistance",
    "aggregate",
    "as_label_map",
    "check_spacing",
    "check_surface",
    "compute_scores",
    "confusion_matrix",
    "dice_per_class",
    "distance_scores",
    "empty_case_scores",
    "lesion_scores",
    "metric_unit",
    "overlap_scores",
    "resolve_metrics",
    "summarize",
    "surface_distances",
    "worst_distance_mm",
]

EmptyPolicy = Literal["nan", "one"]
"""What a class gets when prediction and reference are both empty.

``"nan"``: every agreement metric is NaN; aggregates exclude it and count it
(``n_valid < n_total``), as nnU-Net and MONAI's default do. ``"one"``: a perfect
score (Dice/IoU/NSD/precision/recall 1, distances 0), as Metrics Reloaded and
MONAI's ``ignore_empty=False`` do.
"""

WorstDistance = Literal["inf", "diagonal"] | float
"""Distance reported when exactly one mask is empty: ``"inf"`` (default),
``"diagonal"`` (the length of the image diagonal in mm, the BraTS convention) or
a fixed number of mm."""

OVERLAP_METRICS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "specificity",
    "accuracy",
    "pixel_accuracy",
    "avd",
    "rvd",
    "pred_volume",
    "gt_volume",
)
SURFACE_METRICS = ("hd", "hd95", "assd", "nsd")
LESION_METRICS = (
    "lesion_tp",
    "lesion_fp",
    "lesion_fn",
    "detection_sensitivity",
    "lesion_precision",
    "lesion_dice",
)
DEFAULT_METRICS = ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd", "avd", "rvd")
IMAGE_DEFAULT_METRICS = ("dice", "iou", "pixel_accuracy", "precision", "recall")
"""Default of ``medseg evaluate`` on 2D image masks (PNG/TIFF): no mm distances or mL volumes, which
would be in pixels there (images have spacing 1)."""

_ALIASES = {
    "jaccard": "iou",
    "sensitivity": "recall",
    "tpr": "recall",
    "ppv": "precision",
    "tnr": "specificity",
    "hausdorff": "hd",
    "hd100": "hd",
    "asd": "assd",
    "surface_dice": "nsd",
    "absolute_volume_difference": "avd",
    "relative_volume_difference": "rvd",
}
_UNITS = {"hd": "mm", "hd95": "mm", "assd": "mm", "avd": "mL", "pred_volume": "mL", "gt_volume": "mL"}

# voxels per bincount chunk: bounds the temporary int64 copy at 32 MiB
_CHUNK = 1 << 22


def metric_unit(name: str) -> str:
    """Unit of a metric's values ("mm", "mL" or "" for ratios and counts)."""
    return _UNITS.get(name, "")


def resolve_metrics(names: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validate metric names (comma-separated string or list) and resolve aliases.

    Args:
        names: e.g. ``"dice,hd95"`` or ``["dice", "jaccard"]``; ``None`` gives
            :data:`DEFAULT_METRICS`.

    Returns:
        Canonical names, in the given order, without duplicates.

    Raises:
        ConfigError: for an unknown name (with the closest valid one).
    """
    if names is None:
        return DEFAULT_METRICS
    if isinstance(names, str):
        names = names.split(",")
    known = OVERLAP_METRICS + SURFACE_METRICS + LESION_METRICS
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        name = _ALIASES.get(name, name)
        if name not in known:
            close = difflib.get_close_matches(name, list(known) + list(_ALIASES), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown metric {raw.strip()!r}.{hint} Valid metrics: {', '.join(known)} "
                f"(aliases: {', '.join(sorted(_ALIASES))})."
            )
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"no metric given; choose from {', '.join(known)}.")
    return tuple(out)


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------
def check_spacing(
    spacing: Sequence[float] | None, spatial_dims: int, *, what: str = "the scan"
) -> tuple[float, ...]:
    """Return ``spacing`` as floats after checking that it is usable for distances in mm.

    Raises:
        GeometryError: when spacing is missing, has the wrong length, or is not
            finite and positive.
    """
    if spacing is None:
        raise GeometryError(
            f"surface metrics need the voxel spacing in mm of {what}, but none is known. "
            "Pass spacing=(...) (array axis order), or choose overlap metrics only (e.g. metrics='dice,iou')."
        )
    values = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=np.float64)))
    if len(values) != spatial_dims:
        raise GeometryError(
            f"spacing {values} of {what} has {len(values)} entries but the masks have {spatial_dims} "
            "spatial dimensions; give one spacing (mm) per array axis."
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise GeometryError(
            f"spacing {values} of {what} is not usable: every entry must be a finite, positive size in mm. "
            "Fix the file's header (pixdim / affine) before computing distances."
        )
    return values


def as_label_map(array: np.ndarray, *, what: str = "mask") -> np.ndarray:
    """Return ``array`` as a non-negative integer label map (bool stays bool).

    Float arrays are accepted when every value is a whole number (NIfTI masks are
    often stored as float).

    Raises:
        ArrayValueError: for negative, fractional or non-finite values.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all() or not np.array_equal(array, np.round(array)):
            bad = array[~finite] if not finite.all() else array[array != np.round(array)]
            raise ArrayValueError(
                f"{what} holds non-integer values (e.g. {float(bad.flat[0])!r}); a mask must hold integer "
                "labels. If these are probabilities, threshold or argmax them first."
            )
        if array.size and array.min() < 0:
            raise ArrayValueError(f"{what} holds negative labels (min {array.min():g}); labels must be >= 0.")
        top = array.max() if array.size else 0
        dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int64
        return array.astype(dtype)
    if not np.issubdtype(array.dtype, np.integer):
        raise ArrayValueError(f"{what} has dtype {array.dtype}; a mask must hold integer labels.")
    if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
        raise ArrayValueError(f"{what} holds negative labels (min {int(array.min())}); labels must be >= 0.")
    return array


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = as_label_map(pred, what="prediction")
    gt = as_label_map(gt, what="reference")
    if pred.shape != gt.shape:
        raise GeometryError(
            f"prediction shape {pred.shape} differs from reference shape {gt.shape}; "
            "both masks must lie on the same voxel grid."
        )
    if pred.ndim not in (2, 3):
        raise GeometryError(
            f"masks must be 2D or 3D label maps, got shape {pred.shape}; drop the channel axis first."
        )
    return pred, gt


# --------------------------------------------------------------------------------------
# overlap
# --------------------------------------------------------------------------------------
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Voxel counts ``m[p, g]``: voxels labelled ``p`` in the prediction and ``g`` in the reference.

    One pass over the volume (chunked ``np.bincount`` of ``pred * K + gt``).

    Args:
        pred: integer label map.
        gt: integer label map of the same shape.
        num_classes: ``K``; default ``max(pred.max(), gt.max()) + 1``.

    Returns:
        ``(K, K)`` int64 matrix.

    Raises:
        ArrayValueError: when a label is ``>= num_classes``.
    """
    pred = as_label_map(pred, what="prediction").ravel()
    gt = as_label_map(gt, what="reference").ravel()
    if pred.size != gt.size:
        raise GeometryError(f"prediction has {pred.size} voxels and reference {gt.size}; they must match.")
    top = int(max(pred.max(initial=0), gt.max(initial=0)))
    k = top + 1 if num_classes is None else int(num_classes)
    if top >= k:
        raise ArrayValueError(f"label {top} found but num_classes is {k}; labels must be < num_classes.")
    if k * k > 1 << 24:  # sparse labels (e.g. 5000): count the pairs that occur
        codes, n = np.unique(pred.astype(np.int64) * k + gt, return_counts=True)
        matrix = np.zeros((k, k), dtype=np.int64)
        matrix[codes // k, codes % k] = n
        return matrix
    code_dtype = np.uint8 if k * k <= 256 else np.uint16 if k * k <= 65536 else np.int64
    counts = np.zeros(k * k, dtype=np.int64)
    for start in range(0, pred.size, _CHUNK):
        p = pred[start : start + _CHUNK].astype(code_dtype, copy=False)
        g = gt[start : start + _CHUNK].astype(code_dtype, copy=False)
        counts += np.bincount(p * code_dtype(k) + g, minlength=k * k)
    return counts.reshape(k, k)


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of class indices 1..K-1 for one case (the trainer's validation); NaN where a class is in neither.

    Voxels whose label index is ``K`` (the ignore label's index, see :class:`~medseg.data.plan.Plan`)
    are skipped, as are the predictions on them.
    """
    pred = np.asarray(pred).reshape(-1)
    label = np.asarray(label).reshape(-1)
    labelled = label < num_classes
    if not labelled.all():
        pred, label = pred[labelled], label[labelled]
    m = confusion_matrix(pred, label, num_classes)  # m[p, g]
    tp = np.diag(m).astype(np.float64)
    denom = m.sum(axis=0) + m.sum(axis=1)  # 2 tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    return dice[1:]


def _counts_for(matrix: np.ndarray, values: Sequence[int]) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) for the binary mask "label in values" from a confusion matrix."""
    k = matrix.shape[0]
    sel = np.zeros(k, dtype=bool)
    sel[[v for v in values if v < k]] = True
    tp = int(matrix[np.ix_(sel, sel)].sum())
    fp = int(matrix[np.ix_(sel, ~sel)].sum())
    fn = int(matrix[np.ix_(~sel, sel)].sum())
    tn = int(matrix.sum()) - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def overlap_scores(
    tp: int,
    fp: int,
    fn: int,
    tn: int,
    *,
    voxel_volume_ml: float = float("nan"),
    empty: EmptyPolicy = "nan",
) -> dict[str, float]:
    """Every overlap metric of one binary class from its confusion counts.

    Args:
        tp, fp, fn, tn: voxel counts (reference = ``gt``).
        voxel_volume_ml: volume of one voxel in mL (``prod(spacing) / 1000``);
            NaN gives NaN volumes.
        empty: both-empty policy (:data:`EmptyPolicy`).

    Returns:
        ``dice, iou, precision, recall, specificity, accuracy`` (ratios),
        ``pred_volume, gt_volume, avd`` (mL) and ``rvd`` (signed, (pred - gt) / gt).
        A metric whose denominator is zero because one side is empty is NaN
        (recall with an empty reference, precision with an empty prediction);
        Dice and IoU are then 0. Both empty: NaN or 1 per ``empty``.
    """
    _check_empty(empty)
    pred_n, gt_n = tp + fp, tp + fn
    both_empty = pred_n == 0 and gt_n == 0
    perfect = float("nan") if empty == "nan" else 1.0
    scores = {
        "dice": perfect if both_empty else 2.0 * tp / (2 * tp + fp + fn),
        "iou": perfect if both_empty else tp / (tp + fp + fn),
        "precision": perfect if both_empty else _ratio(tp, pred_n),
        "recall": perfect if both_empty else _ratio(tp, gt_n),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "pred_volume": pred_n * voxel_volume_ml,
        "gt_volume": gt_n * voxel_volume_ml,
        "avd": abs(pred_n - gt_n) * voxel_volume_ml,
        "rvd": (0.0 if empty == "one" else float("nan")) if both_empty else _ratio(pred_n - gt_n, gt_n),
    }
    return {k: float(v) for k, v in scores.items()}


def _check_empty(empty: str) -> None:
    if empty not in ("nan", "one"):
        raise ConfigError(f"empty-mask policy must be 'nan' or 'one', got {empty!r} (see docs/metrics.md).")


# --------------------------------------------------------------------------------------
# surfaces
# --------------------------------------------------------------------------------------
SurfaceKind = Literal["surfel", "voxel"]
"""Which surface the distance metrics (``hd``, ``hd95``, ``assd``, ``nsd``) use.

``"surfel"`` (default): the surface is made of surface elements on the grid of
voxel *corners*, each weighted by its area (its length in 2D); distances,
percentiles, averages and NSD are area-weighted. This is the definition of
DeepMind's ``surface-distance`` (Nikolov et al. 2021), which Metrics Reloaded
refers to. ``"voxel"``: the surface is the set of boundary voxels (centres),
each counting once: MONAI's definition (``use_subvoxels=False``).
"""

SURFACE_KINDS = ("surfel", "voxel")


class SurfaceDistances(NamedTuple):
    """Directed distances (mm) between the surfaces of a prediction and a reference.

    Attributes:
        pred_to_gt: for each surface point of the prediction, the distance to
            the nearest surface point of the reference (``inf`` when the
            reference is empty; empty when the prediction is).
        gt_to_pred: the same from the reference to the prediction.
        pred_areas: area in mm² (length in mm for 2D) of the surface element of
            each ``pred_to_gt`` entry; ``None`` for voxel surfaces (every voxel
            counts once).
        gt_areas: the same for ``gt_to_pred``.
    """

    pred_to_gt: np.ndarray
    gt_to_pred: np.ndarray
    pred_areas: np.ndarray | None = None
    gt_areas: np.ndarray | None = None


SURFACE_DEFINITIONS = {
    "surfel": {
        "surface_definition": "surface elements on the voxel-corner grid weighted by area (DeepMind surface-distance); "
        "Euclidean distances in mm between surface points",
        "hd95": "max of the two directed area-weighted 95th percentiles (surface-distance compute_robust_hausdorff)",
    },
    "voxel": {
        "surface_definition": "face-connected boundary voxels (MONAI), Euclidean distance between voxel centres in mm",
        "hd95": "max of the two directed 95th percentiles (linear interpolation)",
    },
}
"""One-line definitions of each :data:`SurfaceKind`, recorded in evaluation reports."""


def check_surface(surface: str) -> None:
    """Raise :class:`ConfigError` unless ``surface`` is one of :data:`SURFACE_KINDS`."""
    if surface not in SURFACE_KINDS:
        raise ConfigError(
            f"surface must be 'surfel' (area-weighted surface elements, as DeepMind's surface-distance) "
            f"or 'voxel' (boundary voxel centres, as MONAI), got {surface!r} (see docs/metrics.md)."
        )


# ---- voxel surfaces (MONAI) -----------------------------------------------------------
def _boundary(label_map: np.ndarray, *, border_for_zero: bool) -> np.ndarray:
    """Voxels with a face neighbour of another label (image border = another label).

    For the mask ``label_map == c`` this is ``mask & ~binary_erosion(mask)`` with
    SciPy's default (face) structure and ``border_value=0``, for every ``c`` at once.
    """
    out = np.zeros(label_map.shape, dtype=bool)
    nd = label_map.ndim
    for axis in range(nd):
        lo = [slice(None)] * nd
        hi = [slice(None)] * nd
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        diff = label_map[tuple(hi)] != label_map[tuple(lo)]
        out[tuple(lo)] |= diff
        out[tuple(hi)] |= diff
        for edge in (0, -1):
            sl = [slice(None)] * nd
            sl[axis] = edge
            if border_for_zero:
                out[tuple(sl)] = True
            else:
                out[tuple(sl)] |= label_map[tuple(sl)] != 0
    return out


def _surface_points(
    label_map: np.ndarray, boundary: np.ndarray, shared: np.ndarray, classes: Sequence[int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per class: flat indices of its surface voxels and whether each is on the other surface too."""
    flat = np.flatnonzero(boundary)
    labels = label_map.ravel()[flat]
    keep = np.isin(labels, np.asarray(classes))
    flat, labels = flat[keep], labels[keep]
    zero = shared.ravel()[flat]
    order = np.argsort(labels, kind="stable")
    flat, labels, zero = flat[order], labels[order], zero[order]
    starts = np.searchsorted(labels, classes, side="left")
    stops = np.searchsorted(labels, classes, side="right")
    return {c: (flat[a:b], zero[a:b]) for c, a, b in zip(classes, starts, stops)}


def _directed(
    from_flat: np.ndarray, from_zero: np.ndarray, to_flat: np.ndarray, shape, spacing: np.ndarray
) -> np.ndarray:
    """Distance (mm) from each grid point ``from_flat`` to the nearest grid point of ``to_flat``.

    Points marked ``from_zero`` (on both surfaces) are 0 without a search. The
    nearest point is found with a k-d tree; the distance is then recomputed from
    the integer index offset as ``sqrt(sum((offset * spacing) ** 2))``, the
    expression of ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``,
    so that a step of exactly ``k`` voxels is exactly ``k * spacing`` mm (NSD
    compares distances with ``<=``).
    """
    out = np.zeros(from_flat.size, dtype=np.float64)
    todo = ~from_zero
    if todo.any():
        to_idx = np.column_stack(np.unravel_index(to_flat, shape))
        from_idx = np.column_stack(np.unravel_index(from_flat[todo], shape))
        tree = cKDTree(to_idx * spacing, leafsize=32, balanced_tree=False, compact_nodes=False)
        nearest = tree.query(from_idx * spacing, k=1)[1]
        step = (to_idx[nearest] - from_idx).astype(np.float64) * spacing
        squared = step[:, 0] * step[:, 0]
        for axis in range(1, step.shape[1]):
            squared += step[:, axis] * step[:, axis]
        out[todo] = np.sqrt(squared)
    return out


def _crop_to(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the union of ``masks`` (non-zero voxels); None when all are empty."""
    union = masks[0] != 0
    for m in masks[1:]:
        union = union | (m != 0)
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(np.any(union, axis=other))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _voxel_class_distances(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: Sequence[int],
    spacing: tuple[float, ...],
) -> dict[int, SurfaceDistances]:
    """Directed distances between boundary voxel centres (MONAI's surfaces) for each class."""
    with_zero = 0 in classes
    if not with_zero:
        box = _crop_to(pred, gt)
        if box is None:
            return {c: SurfaceDistances(np.zeros(0), np.zeros(0)) for c in classes}
        pred, gt = pred[box], gt[box]
    bp = _boundary(pred, border_for_zero=with_zero)
    bg = _boundary(gt, border_for_zero=with_zero)
    shared = bp & bg & (pred == gt)
    points_p = _surface_points(pred, bp, shared, classes)
    points_g = _surface_points(gt, bg, shared, classes)
    sp = np.asarray(spacing, dtype=np.float64)
    out = {}
    for c in classes:
        fp, zp = points_p[c]
        fg, zg = points_g[c]
        if fp.size == 0 or fg.size == 0:
            out[c] = SurfaceDistances(np.full(fp.size, np.inf), np.full(fg.size, np.inf))
            continue
        out[c] = SurfaceDistances(
            _directed(fp, zp, fg, pred.shape, sp), _directed(fg, zg, fp, pred.shape, sp)
        )
    return out


# ---- surfel surfaces (DeepMind's surface-distance) ----------------------------------------
@functools.lru_cache(maxsize=1)
def _unit_area_vectors() -> tuple[np.ndarray, ...]:
    """Per 2x2x2 neighbour code (256): the area vectors of its surface triangles at unit spacing.

    Bit ``7 - (4a + 2b + c)`` of a code is the voxel at offset ``(a, b, c)`` in
    the 2x2x2 neighbourhood of a voxel corner. The triangles are those of the
    classic marching cubes table (Lorensen & Cline 1987, as
    ``skimage.measure.marching_cubes(method="lorensen")`` implements it), with
    vertices at edge midpoints, taken around the smaller set of corners: a code
    and its complement have the same surface. An area vector is half the cross
    product of two triangle edges; its length is the triangle's area.
    """
    from skimage.measure import marching_cubes

    bits = 7 - np.arange(8)
    out = []
    for code in range(256):
        inside = code if bin(code).count("1") <= 4 else 255 - code
        if inside == 0:
            out.append(np.zeros((0, 3)))
            continue
        cube = ((inside >> bits) & 1).reshape(2, 2, 2).astype(np.float64)
        verts, faces, _, _ = marching_cubes(cube, 0.5, method="lorensen")
        tri = verts[faces]
        out.append(0.5 * np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _surfel_sizes(spacing: tuple[float, ...]) -> np.ndarray:
    """Size of the surface inside each neighbour code: area in mm² (3D, 256 codes), length in mm (2D, 16).

    2D (marching squares, vertices at edge midpoints; bit ``3 - (2a + b)`` is the
    pixel at offset ``(a, b)``): one corner cut off (1 or 3 pixels set) is half a
    pixel diagonal; two pixels side by side give a segment across the square (the
    spacing of the other axis); two diagonal pixels give two cut corners.
    3D: the triangle area vectors of :func:`_unit_area_vectors` scaled to the
    spacing (the x-component of an area scales with ``s1 * s2``, and so on).
    """
    if len(spacing) == 2:
        s0, s1 = spacing
        cut_corner = 0.5 * math.sqrt(s0**2 + s1**2)
        sizes = np.zeros(16)
        for code in range(1, 15):
            n = bin(code).count("1")
            if n != 2:
                sizes[code] = cut_corner
            elif code in (0b1100, 0b0011):  # same row (axis 0 offset): the segment runs along axis 1
                sizes[code] = s1
            elif code in (0b1010, 0b0101):  # same column: the segment runs along axis 0
                sizes[code] = s0
            else:  # diagonal pair
                sizes[code] = 2 * cut_corner
        return sizes
    s0, s1, s2 = spacing
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.array([float(np.linalg.norm(v * scale, axis=1).sum()) for v in _unit_area_vectors()])


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbour code of every voxel corner of a boolean mask (outside the array counts as outside).

    Corner ``i`` (per axis) lies between voxels ``i - 1`` and ``i``, so the result
    has shape ``mask.shape + 1``. In 3D, bit ``7 - (4a + 2b + c)`` is set when the
    voxel at offset ``(a, b, c)`` from voxel ``(i - 1, j - 1, k - 1)`` is inside;
    in 2D bit ``3 - (2a + b)``.
    """
    nd = mask.ndim
    padded = np.zeros(tuple(s + 2 for s in mask.shape), dtype=np.uint8)
    padded[(slice(1, -1),) * nd] = mask
    shape = tuple(s + 1 for s in mask.shape)
    codes = np.zeros(shape, dtype=np.uint8)
    last = 2**nd - 1
    for index, offset in enumerate(itertools.product((0, 1), repeat=nd)):
        window = padded[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
        codes |= np.left_shift(window, np.uint8(last - index))
    return codes


def _surfel_pair(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> SurfaceDistances:
    """Area-weighted surface distances of two boolean masks (cropped: the corner grid is their shape + 1)."""
    full = 2 ** (2**pred.ndim) - 1
    sizes = _surfel_sizes(tuple(spacing))
    code_p, code_g = _neighbour_codes(pred), _neighbour_codes(gt)
    on_p = (code_p != 0) & (code_p != full)
    on_g = (code_g != 0) & (code_g != full)
    flat_p, flat_g = np.flatnonzero(on_p), np.flatnonzero(on_g)
    area_p, area_g = sizes[code_p.ravel()[flat_p]], sizes[code_g.ravel()[flat_g]]
    if flat_p.size == 0 or flat_g.size == 0:
        return SurfaceDistances(np.full(flat_p.size, np.inf), np.full(flat_g.size, np.inf), area_p, area_g)
    sp = np.asarray(spacing, dtype=np.float64)
    d_pg = _directed(flat_p, on_g.ravel()[flat_p], flat_g, code_p.shape, sp)
    d_gp = _directed(flat_g, on_p.ravel()[flat_g], flat_p, code_p.shape, sp)
    return SurfaceDistances(d_pg, d_gp, area_p, area_g)


def _class_boxes(
    pred: np.ndarray, gt: np.ndarray, classes: Sequence[int]
) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box of ``(pred == c) | (gt == c)`` per class (None when the class is in neither map)."""
    top = max(classes)
    if 0 in classes or top > 65535:
        return {c: _crop_to(pred == c, gt == c) for c in classes}
    found = [ndimage.find_objects(m, max_label=top) for m in (pred, gt)]
    out: dict[int, tuple[slice, ...] | None] = {}
    for c in classes:
        boxes = [f[c - 1] for f in found if c - 1 < len(f) and f[c - 1] is not None]
        out[c] = (
            tuple(
                slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(pred.ndim)
            )
            if boxes
            else None
        )
    return out


def _surfel_class_distances(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: Sequence[int],
    spacing: tuple[float, ...],
) -> dict[int, SurfaceDistances]:
    """Area-weighted distances between surfel surfaces for each class, each cropped to its bounding box."""
    out = {}
    for c, box in _class_boxes(pred, gt, classes).items():
        if box is None:
            none = np.zeros(0)
            out[c] = SurfaceDistances(none, none, none, none)
        else:
            out[c] = _surfel_pair(pred[box] == c, gt[box] == c, spacing)
    return out


def _class_distances(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: Sequence[int],
    spacing: tuple[float, ...],
    surface: SurfaceKind,
) -> dict[int, SurfaceDistances]:
    """Directed surface distances (pred->gt, gt->pred) in mm for each class of two label maps."""
    classes = [int(c) for c in classes]
    if pred.dtype == bool:
        pred, gt = pred.view(np.uint8), gt.view(np.uint8)
    if surface == "surfel":
        return _surfel_class_distances(pred, gt, classes, spacing)
    return _voxel_class_distances(pred, gt, classes, spacing)


def surface_distances(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    spacing: Sequence[float] | None,
    *,
    surface: SurfaceKind = "surfel",
) -> SurfaceDistances:
    """Directed surface distances in mm between two binary masks.

    Args:
        pred_mask: boolean (or 0/1) prediction, 2D or 3D.
        gt_mask: boolean reference of the same shape.
        spacing: voxel size in mm per array axis (required).
        surface: ``"surfel"`` (default): surface elements on the voxel-corner
            grid with their areas (DeepMind's ``surface-distance``);
            ``"voxel"``: boundary voxel centres, no areas (MONAI). See
            :data:`SurfaceKind`.

    Returns:
        :class:`SurfaceDistances`: for each surface point of one mask (C order
        of its grid), the distance to the nearest surface point of the other,
        and with ``"surfel"`` the area of each point's surface element. When
        the other mask is empty the distances are ``inf``; an empty mask gives
        empty arrays. ``distance_scores(*surface_distances(...))`` gives the metrics.
    """
    check_surface(surface)
    pred, gt = _check_pair(np.asarray(pred_mask) != 0, np.asarray(gt_mask) != 0)
    spacing = check_spacing(spacing, pred.ndim)
    return _class_distances(pred, gt, [1], spacing, surface)[1]


def worst_distance_mm(
    worst: WorstDistance, shape: Sequence[int] | None, spacing: Sequence[float] | None
) -> float:
    """The distance (mm, or inf) that a :data:`WorstDistance` setting gives for an image of this grid."""
    if isinstance(worst, str):
        if worst == "inf":
            return float("inf")
        if worst == "diagonal":
            if shape is None or spacing is None:
                raise ConfigError("worst_distance='diagonal' needs the image shape and spacing.")
            return float(np.linalg.norm(np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)))
        raise ConfigError(f"worst_distance must be 'inf', 'diagonal' or a number of mm, got {worst!r}.")
    value = float(worst)
    if not value > 0:
        raise ConfigError(f"worst_distance must be positive (mm), got {value}.")
    return value


def distance_scores(
    pred_to_gt: np.ndarray,
    gt_to_pred: np.ndarray,
    pred_areas: np.ndarray | None = None,
    gt_areas: np.ndarray | None = None,
    *,
    tolerance_mm: float = 1.0,
    empty: EmptyPolicy = "nan",
    worst: float = float("inf"),
) -> dict[str, float]:
    """``hd``, ``hd95``, ``assd`` (mm) and ``nsd`` from directed surface distances.

    With areas (surfel surfaces, DeepMind's ``surface-distance``), every value is
    area-weighted: ``hd95`` is the max over both directions of the smallest
    distance whose cumulative area (distances ascending) reaches 95 % of that
    surface (``compute_robust_hausdorff``); ``assd`` is the area-weighted mean of
    both directions pooled; ``nsd`` the area within tolerance over the total
    area (``compute_surface_dice_at_tolerance``). Without areas (voxel surfaces,
    MONAI) every point counts once and ``hd95`` is the max of the two directed
    95th percentiles with linear interpolation. ``hd`` is the largest distance.

    Args:
        pred_to_gt: distances from prediction surface points (see :func:`surface_distances`).
        gt_to_pred: distances from reference surface points.
        pred_areas: area (mm², or mm in 2D) of each ``pred_to_gt`` point's surface element, or None.
        gt_areas: the same for ``gt_to_pred``; give both or neither.
        tolerance_mm: NSD tolerance: a surface point counts when within this distance.
        empty: both-empty policy (:data:`EmptyPolicy`).
        worst: distance reported when exactly one mask is empty (mm or inf).
    """
    _check_empty(empty)
    pred_to_gt, gt_to_pred = (
        np.asarray(pred_to_gt, dtype=np.float64),
        np.asarray(gt_to_pred, dtype=np.float64),
    )
    weighted = pred_areas is not None or gt_areas is not None
    if weighted:
        if pred_areas is None or gt_areas is None:
            raise ArrayValueError(
                "surface areas must be given for both directions (pred_areas and gt_areas) or neither."
            )
        pred_areas, gt_areas = (
            np.asarray(pred_areas, dtype=np.float64),
            np.asarray(gt_areas, dtype=np.float64),
        )
        if pred_areas.shape != pred_to_gt.shape or gt_areas.shape != gt_to_pred.shape:
            raise ArrayValueError(
                f"surface areas {pred_areas.shape}, {gt_areas.shape} must have one entry per distance "
                f"{pred_to_gt.shape}, {gt_to_pred.shape}."
            )
    if pred_to_gt.size == 0 and gt_to_pred.size == 0:
        if empty == "nan":
            return dict.fromkeys(SURFACE_METRICS, float("nan"))
        return {"hd": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    if pred_to_gt.size == 0 or gt_to_pred.size == 0:
        return {"hd": worst, "hd95": worst, "assd": worst, "nsd": 0.0}
    hd = float(max(pred_to_gt.max(), gt_to_pred.max()))
    if not weighted:
        hd95 = max(float(np.percentile(pred_to_gt, 95)), float(np.percentile(gt_to_pred, 95)))
        within = np.count_nonzero(pred_to_gt <= tolerance_mm) + np.count_nonzero(gt_to_pred <= tolerance_mm)
        return {
            "hd": hd,
            "hd95": hd95,
            "assd": float((pred_to_gt.sum() + gt_to_pred.sum()) / (pred_to_gt.size + gt_to_pred.size)),
            "nsd": float(within / (pred_to_gt.size + gt_to_pred.size)),
        }
    total = pred_areas.sum() + gt_areas.sum()
    within = pred_areas[pred_to_gt <= tolerance_mm].sum() + gt_areas[gt_to_pred <= tolerance_mm].sum()
    return {
        "hd": hd,
        "hd95": max(_area_percentile(pred_to_gt, pred_areas, 95), _area_percentile(gt_to_pred, gt_areas, 95)),
        "assd": float((pred_to_gt @ pred_areas + gt_to_pred @ gt_areas) / total),
        "nsd": float(within / total),
    }


def _area_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """Smallest distance whose cumulative area share (distances ascending, then areas) reaches ``percent``."""
    order = np.lexsort((areas, distances))
    distances, areas = distances[order], areas[order]
    share = np.cumsum(areas) / np.sum(areas)
    index = int(np.searchsorted(share, percent / 100.0))
    return float(distances[min(index, distances.size - 1)])


# --------------------------------------------------------------------------------------
# per case, all classes
# --------------------------------------------------------------------------------------
def _tolerance_for(tolerance_mm: float | Mapping, value: int, name: str) -> float:
    tol = _lookup_tolerance(tolerance_mm, value, name)
    if not (math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"NSD tolerance for class {name!r} must be a distance in mm >= 0, got {tol}.")
    return tol


def _lookup_tolerance(tolerance_mm: float | Mapping, value: int, name: str) -> float:
    if isinstance(tolerance_mm, Mapping):
        for key in (name, value, str(value)):
            if key in tolerance_mm:
                return float(tolerance_mm[key])
        if "default" in tolerance_mm:
            return float(tolerance_mm["default"])
        raise ConfigError(
            f"no NSD tolerance for class {name!r} (label {value}); give one per class or a 'default' entry."
        )
    return float(tolerance_mm)


def compute_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    spacing: Sequence[float] | None,
    labels: Mapping[int, str] | Sequence[int] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    metrics: Iterable[str] | str | None = None,
    tolerance_mm: float | Mapping[str | int, float] = 1.0,
    empty: EmptyPolicy = "nan",
    worst_distance: WorstDistance = "inf",
    include_background: bool = False,
    lesion: bool | LesionOptions = False,
    surface: SurfaceKind = "surfel",
) -> dict[str, dict[str, float]]:
    """Score one case: every requested metric for every class (and region).

    Args:
        pred: predicted integer label map, 2D or 3D (no channel axis).
        gt: reference label map on the same grid.
        spacing: voxel size in mm per array axis; required for surface metrics
            and volumes (``None`` is allowed with overlap ratios only).
        labels: ``{value: name}`` or a list of label values to score; default:
            every non-zero value found in either map (named by its value).
            Background (0) is scored only with ``include_background``.
        regions: named unions of labels scored as one binary mask, e.g. BraTS
            ``{"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}``.
        metrics: names (see :func:`resolve_metrics`); default :data:`DEFAULT_METRICS`.
        tolerance_mm: NSD tolerance in mm, or ``{name or value: mm}`` per class
            (with an optional ``"default"``).
        empty: both-empty policy (:data:`EmptyPolicy`).
        worst_distance: distance for one-empty cases (:data:`WorstDistance`).
        include_background: also score label 0.
        lesion: add lesion-wise metrics (``True`` or :class:`LesionOptions`).
        surface: surface of the distance metrics: ``"surfel"`` (default,
            area-weighted surface elements as DeepMind's ``surface-distance``)
            or ``"voxel"`` (boundary voxel centres as MONAI); see :data:`SurfaceKind`.

    Returns:
        ``{class name: {metric: value}}``: labels first (ascending value), then regions.

    Raises:
        GeometryError: shapes differ, or surface metrics without a usable spacing.
        ArrayValueError: a map holds labels outside ``labels``.
        ConfigError: unknown metric or bad option.
    """
    pred, gt = _check_pair(pred, gt)
    names = resolve_metrics(metrics)
    _check_empty(empty)
    check_surface(surface)
    lesion_opts = LesionOptions.coerce(lesion)
    if lesion_opts is not None:
        names = names + tuple(m for m in LESION_METRICS if m not in names)
    wants_surface = any(m in SURFACE_METRICS for m in names)
    wants_volume = any(m in ("avd", "pred_volume", "gt_volume") for m in names) or lesion_opts is not None
    if wants_surface or wants_volume:
        spacing = check_spacing(spacing, pred.ndim)
    voxel_ml = float(np.prod(spacing)) / 1000.0 if spacing is not None else float("nan")

    matrix = confusion_matrix(pred, gt)
    present = {int(v) for v in np.flatnonzero(matrix.sum(axis=0) + matrix.sum(axis=1))}
    label_names = _label_names(labels, present)
    unknown = present - set(label_names) - {0}
    if unknown:
        raise ArrayValueError(
            f"label values {sorted(unknown)} are not among the known labels {sorted(label_names)}; "
            "pass the dataset's labels (e.g. --labels dataset.json) or fix the masks."
        )
    values = [v for v in sorted(label_names) if v != 0 or include_background]
    groups: dict[str, list[int]] = {label_names[v]: [v] for v in values}
    for region, members in (regions or {}).items():
        if region in groups:
            raise ConfigError(f"region name {region!r} is also a label name; rename the region.")
        groups[region] = [int(m) for m in members]

    results: dict[str, dict[str, float]] = {}
    total = int(matrix.sum())
    # every class and label at once: the share of voxels whose label equals the reference's
    pixel_accuracy = float(np.trace(matrix)) / total if total else float("nan")
    for name, members in groups.items():
        tp, fp, fn, tn = _counts_for(matrix, members)
        over = overlap_scores(tp, fp, fn, tn, voxel_volume_ml=voxel_ml, empty=empty)
        over["pixel_accuracy"] = pixel_accuracy
        results[name] = {m: over[m] for m in names if m in over}

    if wants_surface:
        worst = worst_distance_mm(worst_distance, pred.shape, spacing)
        per_label = _class_distances(pred, gt, values, spacing, surface) if values else {}
        for name, members in groups.items():
            if len(members) == 1 and members[0] in per_label:
                distances = per_label[members[0]]
            else:
                distances = _class_distances(
                    np.isin(pred, members), np.isin(gt, members), [1], spacing, surface
                )[1]
            tol = _tolerance_for(tolerance_mm, members[0] if len(members) == 1 else -1, name)
            surf = distance_scores(*distances, tolerance_mm=tol, empty=empty, worst=worst)
            results[name].update({m: surf[m] for m in names if m in surf})

    if lesion_opts is not None:
        for name, members in groups.items():
            les = lesion_scores(
                np.isin(pred, members),
                np.isin(gt, members),
                spacing=spacing,
                options=lesion_opts,
                empty=empty,
            )
            summary = les.as_dict()
            results[name].update({m: summary[m] for m in names if m in summary})
    return {name: {m: results[name][m] for m in names if m in results[name]} for name in groups}


def _label_names(labels: Mapping[int, str] | Sequence[int] | None, present: set[int]) -> dict[int, str]:
    if labels is None:
        return {v: str(v) for v in sorted(present | {0})}
    if isinstance(labels, Mapping):
        out = {int(v): str(n) for v, n in labels.items()}
    else:
        out = {int(v): str(v) for v in labels}
    out.setdefault(0, "background")
    return out


def empty_case_scores(
    metrics: Iterable[str] | str | None,
    *,
    empty: EmptyPolicy = "nan",
) -> dict[str, float]:
    """The scores of a class absent from both masks (what :func:`compute_scores` gives it).

    Volumes, AVD, accuracy and specificity are exact (0, 0, 1, 1); lesion counts are 0.
    """
    names = resolve_metrics(metrics)
    over = overlap_scores(0, 0, 0, 1, voxel_volume_ml=0.0, empty=empty)
    surf = distance_scores(np.zeros(0), np.zeros(0), empty=empty)
    les = LesionScores.from_lesions([], n_pred=0, empty=empty).as_dict()
    values = {**over, **surf, **les, "pixel_accuracy": float("nan")}  # a case's value, unknown from one class
    return {m: values[m] for m in names}


# --------------------------------------------------------------------------------------
# lesion-wise
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LesionOptions:
    """How lesions are found and matched (see ``docs/metrics.md``, "Lesion-wise").

    Args:
        connectivity: neighbourhood of connected components: 1 = faces (6 in 3D),
            ``ndim`` = full (26 in 3D, the default, as in BraTS 2023).
        match_iou: a reference lesion is *detected* when the IoU between it and
            the union of the predicted components that touch it is above this
            value; 0 (default) means any overlap of one voxel or more.
        min_voxels: components smaller than this (in either mask) are ignored
            before matching; 0 keeps all (beware: hides small false positives).
    """

    connectivity: int | None = None
    match_iou: float = 0.0
    min_voxels: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.match_iou < 1.0:
            raise ConfigError(f"lesion match_iou must be in [0, 1), got {self.match_iou}.")
        if self.min_voxels < 0:
            raise ConfigError(f"lesion min_voxels must be >= 0, got {self.min_voxels}.")
        if self.connectivity is not None and self.connectivity not in (1, 2, 3):
            raise ConfigError(f"lesion connectivity must be 1, 2 or 3, got {self.connectivity}.")

    @classmethod
    def coerce(cls, lesion: bool | LesionOptions | None) -> LesionOptions | None:
        """``None`` for False/None, the defaults for True, else the options given."""
        if lesion is None or lesion is False:
            return None
        if lesion is True:
            return cls()
        if isinstance(lesion, LesionOptions):
            return lesion
        raise ConfigError(f"lesion must be True, False or a LesionOptions, got {lesion!r}.")


@dataclass(frozen=True)
class Lesion:
    """One connected component: a reference lesion, or a false-positive predicted component.

    Attributes:
        kind: ``"reference"`` or ``"false_positive"``.
        index: component number (1-based) in its own mask (``scipy.ndimage.label`` order).
        voxels: size of the component; ``volume_ml`` the same in mL.
        pred_voxels: for a reference lesion, size of the union of the predicted
            components that touch it (0 if none); for a false positive, == voxels.
        overlap_voxels: voxels shared by the reference lesion and that union.
        dice, iou: of the reference lesion and that union (0 when missed; NaN for false positives).
        detected: reference lesion found (IoU above ``match_iou``); False for false positives.
        matched: indices of the predicted components touching a reference lesion.
    """

    kind: Literal["reference", "false_positive"]
    index: int
    voxels: int
    volume_ml: float
    pred_voxels: int
    pred_volume_ml: float
    overlap_voxels: int
    dice: float
    iou: float
    detected: bool
    matched: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["matched"] = " ".join(str(i) for i in self.matched)
        return out


@dataclass(frozen=True)
class LesionScores:
    """Lesion-wise detection summary of one class in one case (see :func:`lesion_scores`)."""

    tp: int
    fp: int
    fn: int
    n_gt: int
    n_pred: int
    detection_sensitivity: float
    lesion_precision: float
    lesion_dice: float
    lesions: tuple[Lesion, ...]

    @classmethod
    def from_lesions(cls, lesions: Sequence[Lesion], *, n_pred: int, empty: EmptyPolicy) -> LesionScores:
        refs = [les for les in lesions if les.kind == "reference"]
        fps = [les for les in lesions if les.kind == "false_positive"]
        tp = sum(1 for les in refs if les.detected)
        fn = len(refs) - tp
        fp = len(fps)
        if not refs and n_pred == 0:
            perfect = float("nan") if empty == "nan" else 1.0
            sens = prec = dice = perfect
        else:
            sens = _ratio(tp, len(refs))
            prec = _ratio(n_pred - fp, n_pred)
            dice = sum(les.dice for les in refs if les.detected) / (len(refs) + fp)
        return cls(tp, fp, fn, len(refs), n_pred, sens, prec, dice, tuple(lesions))

    def as_dict(self) -> dict[str, float]:
        """The :data:`LESION_METRICS` of this case (``lesion_fp`` is the false positives of the case)."""
        return {
            "lesion_tp": float(self.tp),
            "lesion_fp": float(self.fp),
            "lesion_fn": float(self.fn),
            "detection_sensitivity": self.detection_sensitivity,
            "lesion_precision": self.lesion_precision,
            "lesion_dice": self.lesion_dice,
        }


def _components(mask: np.ndarray, connectivity: int, min_voxels: int) -> tuple[np.ndarray, int, np.ndarray]:
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    comp, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    if min_voxels > 1 and n:
        small = sizes < min_voxels
        small[0] = False
        if small.any():
            keep = np.flatnonzero(~small)  # includes 0
            relabel = np.zeros(n + 1, dtype=comp.dtype)
            relabel[keep] = np.arange(keep.size, dtype=comp.dtype)
            comp = relabel[comp]
            n = keep.size - 1
            sizes = sizes[keep]
    return comp, n, sizes


def lesion_scores(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    *,
    spacing: Sequence[float] | None,
    options: LesionOptions | None = None,
    empty: EmptyPolicy = "nan",
) -> LesionScores:
    """Lesion-wise detection metrics of one binary class.

    Lesions are connected components. For each reference lesion ``g``, ``U`` is
    the union of predicted components that share at least one voxel with it;
    ``g`` is detected when ``IoU(g, U) > options.match_iou``. Predicted
    components in no detected lesion's ``U`` are false positives. Lesion-wise
    Dice (BraTS 2023 style) = sum of ``Dice(g, U)`` over detected reference
    lesions / (number of reference lesions + number of false positives):
    missed lesions and false positives count as 0.

    Args:
        pred_mask: boolean prediction (2D or 3D).
        gt_mask: boolean reference of the same shape.
        spacing: voxel size in mm (for volumes in mL).
        options: connectivity, match threshold, minimum size (:class:`LesionOptions`).
        empty: no lesion in either mask -> NaN (``"nan"``) or 1 (``"one"``) for
            sensitivity, precision and lesion-wise Dice.
    """
    options = options or LesionOptions()
    pred, gt = _check_pair(np.asarray(pred_mask) != 0, np.asarray(gt_mask) != 0)
    spacing = check_spacing(spacing, pred.ndim)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    connectivity = options.connectivity or pred.ndim
    if connectivity > pred.ndim:
        raise ConfigError(
            f"lesion connectivity {connectivity} is larger than the {pred.ndim} image dimensions."
        )
    comp_g, n_g, size_g = _components(gt, connectivity, options.min_voxels)
    comp_p, n_p, size_p = _components(pred, connectivity, options.min_voxels)
    both = (comp_g > 0) & (comp_p > 0)
    pairs = comp_g[both].astype(np.int64) * (n_p + 1) + comp_p[both]
    codes, overlaps = np.unique(pairs, return_counts=True)
    pair_g, pair_p = np.divmod(codes, n_p + 1)

    lesions: list[Lesion] = []
    matched_pred: set[int] = set()
    for g in range(1, n_g + 1):
        sel = pair_g == g
        touching = tuple(int(p) for p in pair_p[sel])
        inter = int(overlaps[sel].sum())
        union_size = int(size_p[list(touching)].sum()) if touching else 0
        denom = int(size_g[g]) + union_size
        iou = inter / (denom - inter) if inter else 0.0
        detected = inter > 0 and iou > options.match_iou
        if detected:
            matched_pred.update(touching)
        lesions.append(
            Lesion(
                kind="reference",
                index=g,
                voxels=int(size_g[g]),
                volume_ml=int(size_g[g]) * voxel_ml,
                pred_voxels=union_size,
                pred_volume_ml=union_size * voxel_ml,
                overlap_voxels=inter,
                dice=2.0 * inter / denom if detected else 0.0,
                iou=iou if detected else 0.0,
                detected=detected,
                matched=touching,
            )
        )
    for p in range(1, n_p + 1):
        if p not in matched_pred:
            lesions.append(
                Lesion(
                    kind="false_positive",
                    index=p,
                    voxels=int(size_p[p]),
                    volume_ml=int(size_p[p]) * voxel_ml,
                    pred_voxels=int(size_p[p]),
                    pred_volume_ml=int(size_p[p]) * voxel_ml,
                    overlap_voxels=0,
                    dice=float("nan"),
                    iou=float("nan"),
                    detected=False,
                )
            )
    return LesionScores.from_lesions(lesions, n_pred=n_p, empty=empty)


# --------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------
def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """Mean, median, std (population), n_valid, n_total and n_inf of one metric over cases.

    NaN values (undefined, e.g. both masks empty under ``empty="nan"``) are
    excluded and counted: ``n_valid`` < ``n_total``. ``inf`` values (a distance
    with one mask empty) are kept: the mean and std become ``inf`` and
    ``n_inf`` says how many; the median stays finite while fewer than half are inf.
    Use ``worst_distance="diagonal"`` for finite means.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    valid = arr[~np.isnan(arr)]
    n_inf = int(np.count_nonzero(np.isinf(valid)))
    out: dict[str, float | int] = {"n_valid": int(valid.size), "n_total": int(arr.size), "n_inf": n_inf}
    if valid.size == 0:
        out.update(mean=float("nan"), median=float("nan"), std=float("nan"))
    elif n_inf:
        out.update(mean=float("inf"), median=float(np.median(valid)), std=float("inf"))
    else:
        out.update(mean=float(valid.mean()), median=float(np.median(valid)), std=float(valid.std()))
    return {k: out[k] for k in ("mean", "median", "std", "n_valid", "n_total", "n_inf")}


def aggregate(
    cases: Sequence[Mapping[str, Mapping[str, float]]],
    *,
    foreground: Sequence[str] | None = None,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per class and metric :func:`summarize` over cases, plus ``"foreground_mean"``.

    Args:
        cases: one ``{class: {metric: value}}`` per case (as from :func:`compute_scores`).
        foreground: classes averaged into ``"foreground_mean"`` (default: all
            classes seen). Its value per metric is the mean of the per-class
            means that are not NaN (nnU-Net's definition); ``n_valid``/``n_total``
            count classes there, not cases.
    """
    classes: list[str] = []
    for case in cases:
        classes.extend(c for c in case if c not in classes)
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for cls in classes:
        metric_names: list[str] = []
        for case in cases:
            metric_names.extend(m for m in case.get(cls, {}) if m not in metric_names)
        out[cls] = {
            m: summarize(case[cls][m] if cls in case and m in case[cls] else float("nan") for case in cases)
            for m in metric_names
        }
    fg = [c for c in (foreground if foreground is not None else classes) if c in out]
    if fg:
        metric_names = []
        for c in fg:
            metric_names.extend(m for m in out[c] if m not in metric_names)
        out["foreground_mean"] = {
            m: summarize(out[c][m]["mean"] for c in fg if m in out[c]) for m in metric_names
        }
    return out
