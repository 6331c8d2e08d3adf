"""A PNG quick-look of a prediction: what a person opens first.

Layout (3D scans): a large axial panel (two thirds of the width) and small
sagittal and coronal panels beside it, all cropped to the body, with a legend
that gives every structure's volume in mL below. Rules:

- **Orientation**: radiological convention, as 3D Slicer and ITK-SNAP show it
  (the patient's right on the viewer's left; anterior up in the axial panel,
  superior up in the others, anterior on the left in the sagittal panel). Each
  array axis is mapped to the closest patient axis of the affine
  (:func:`medseg.spatial.orientation_transform`) and each panel is
  only transposed and flipped (:func:`plane_layout`), never resampled; the
  letters R/L, A/P, S/I at the panel edges come from the same mapping.
- **True aspect**: pixels are drawn with their spacing in mm. A series thinner
  than :data:`THIN_SLICES` slices or :data:`THIN_MM` mm along an axis would give
  unreadable strips: the panels across a thin axis (too few slices, too few mm,
  or too flat against the field of view; :func:`thin_axes`) are left out and the
  figure says so.
- **Slices**: each panel shows the slice holding the most structures (ties: the
  largest labelled area); panel titles give the slice number in the file (1-based,
  of the total) and its patient coordinate in mm (RAS, as Slicer shows it); dashed
  lines on the small panels mark the axial slice.
- **Crop**: to the body (:func:`body_box`: CT voxels above -500 HU, other scans
  above 10 % of their 1st-99th percentile range; the largest connected part)
  plus every labelled voxel and a 10 mm margin; the whole scan when no body is found.
- **Colours**: label value *v* has the same colour as in the DICOM outputs
  (:func:`medseg.inference.dicom_outputs.structure_colour`, the ten tab10 hues
  first), filled at :data:`FILL_ALPHA` opacity with an opaque outline.
- **Intensities**: CT (air below -500 HU present) in a soft-tissue window
  (:data:`CT_WINDOW`); other scans in their 1st-99th percentiles.
- **Legend**: :func:`legend_entries` (names and mL from :mod:`medseg.inference.stats`),
  then the model's structures that were not found.

2D images give one panel (no orientation letters: a 2D image's axes need not be
anatomical). The title is what the caller passes (the case name); nothing else
in the figure comes from the file's header except geometry. Rendering uses
matplotlib's Agg canvas directly: no display and no global backend switch.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io.atomic import write_bytes_atomic
from medseg.io.geometry import Geometry
from medseg.spatial import orientation_transform

__all__ = [
    "CT_WINDOW",
    "FILL_ALPHA",
    "MAX_HEIGHT_PX",
    "MAX_WIDTH_PX",
    "THIN_MM",
    "THIN_RATIO",
    "THIN_SLICES",
    "PlaneLayout",
    "best_slices",
    "body_box",
    "crop_box",
    "legend_entries",
    "plane_layout",
    "render_preview",
    "rgba_overlay",
    "thin_axes",
    "write_preview",
]

#: Opacity of the structure fills (outlines are opaque).
FILL_ALPHA = 0.45
#: Sagittal/coronal panels across an axis with fewer slices than this, or ...
THIN_SLICES = 8
#: ... a thinner extent (mm) than this, are left out.
THIN_MM = 20.0
#: ... or an extent under this share of the largest other extent, are left out.
THIN_RATIO = 0.15
#: CT display window (HU): soft tissue, width 400, level 40.
CT_WINDOW = (-160.0, 240.0)
#: A scan with voxels below this (air) is treated as CT in HU; the CT body is above it.
CT_AIR_HU = -500.0
#: Margin (mm) around the body and the labels in the crop.
CROP_MARGIN_MM = 10.0
#: Most legend entries shown (the rest are counted), and the longest structure name shown.
MAX_LEGEND = 60
MAX_NAME = 40
#: Largest image: a taller figure is drawn at a lower dpi (the free-space check counts on this bound).
MAX_WIDTH_PX, MAX_HEIGHT_PX = 1200, 1600
_SAMPLES = 1 << 20
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))  # RAS axis -> (letter at +, letter at -)
_VIEW_OF_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}  # the view across each RAS axis


# --------------------------------------------------------------------------- geometry of the panels


@dataclass(frozen=True)
class PlaneLayout:
    """How a 2D slice of the array is put on screen, and the letters at its edges.

    Attributes:
        transpose: rows of the display are the slice's second array axis.
        flip_rows, flip_cols: reverse the display rows / columns (after any transpose).
        letters: patient directions at the (left, right, top, bottom) edges, e.g. ``("R", "L", "A", "P")``.
    """

    transpose: bool
    flip_rows: bool
    flip_cols: bool
    letters: tuple[str, str, str, str]

    def apply(self, plane: np.ndarray) -> np.ndarray:
        """The slice as displayed (a view: transposes and flips only)."""
        out = plane.T if self.transpose else plane
        if self.flip_rows:
            out = out[::-1]
        if self.flip_cols:
            out = out[:, ::-1]
        return out


def plane_layout(axes: tuple[tuple[int, int], tuple[int, int]]) -> PlaneLayout:
    """Radiological display of a slice whose two array axes point along ``axes``.

    Args:
        axes: for the slice's first and second array axis, ``(ras_axis, sign)``: the
            closest patient axis (0 = R, 1 = A, 2 = S) and +1 when the index grows
            towards R/A/S, -1 towards L/P/I (a row of an nibabel ``ornt``).

    Returns:
        The layout: columns run towards the patient's left (axial, coronal) or
        posterior (sagittal); rows run towards posterior (axial) or inferior.
    """
    (t0, s0), (t1, s1) = ((int(t), int(s)) for t, s in axes)
    if {t0, t1} == {1, 2}:  # sagittal: anterior on the left
        horizontal = 1
    else:  # axial or coronal: the patient's right on the left
        horizontal = 0
    if t0 == horizontal:  # the first array axis runs across the screen: transpose
        transpose, col_sign, row_axis, row_sign = True, s0, t1, s1
    else:
        transpose, col_sign, row_axis, row_sign = False, s1, t0, s0
    # the screen's columns and rows run towards the "-" end (L or P across, P or I down)
    plus_h, minus_h = _AXIS_LETTERS[horizontal]
    plus_v, minus_v = _AXIS_LETTERS[row_axis]
    return PlaneLayout(
        transpose=transpose, flip_rows=row_sign > 0, flip_cols=col_sign > 0, letters=(plus_h, minus_h, plus_v, minus_v)
    )


def _ornt(geometry: Geometry) -> np.ndarray:
    """``(spatial_dims, 2)``: each array axis's closest RAS axis and direction (+1 / -1)."""
    return orientation_transform(geometry.affine, "RAS")[: geometry.spatial_dims].astype(int)


def thin_axes(geometry: Geometry) -> list[int]:
    """Array axes across which a 3D scan is too thin for a readable panel at true aspect.

    An axis is thin with fewer than :data:`THIN_SLICES` slices, an extent under
    :data:`THIN_MM` mm, or under :data:`THIN_RATIO` of the largest other extent
    (20 slices of 2 mm under a 500 mm field of view give a 40 x 500 mm strip).
    """
    if geometry.spatial_dims != 3:
        return []
    extent = [n * sp for n, sp in zip(geometry.shape, geometry.spacing)]
    return [
        a for a, n in enumerate(geometry.shape)
        if n < THIN_SLICES or extent[a] < THIN_MM or extent[a] < THIN_RATIO * max(extent[:a] + extent[a + 1:])
    ]


# --------------------------------------------------------------------------- intensities and crop


def _sample(image: np.ndarray) -> np.ndarray:
    flat = image.reshape(-1)
    sample = flat[:: max(1, flat.size // _SAMPLES)].astype(np.float32, copy=False)
    return sample[np.isfinite(sample)]


def _is_ct(sample: np.ndarray) -> bool:
    return bool(sample.size) and float(np.percentile(sample, 0.5)) < CT_AIR_HU and float(sample.max()) > 0


def _window(sample: np.ndarray, ct: bool) -> tuple[float, float]:
    if ct:
        return CT_WINDOW
    lo, hi = (float(v) for v in np.percentile(sample, [1, 99])) if sample.size else (0.0, 1.0)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def body_box(image: np.ndarray, *, ct: bool | None = None) -> tuple[slice, ...]:
    """Index box of the body: the largest connected part above the body threshold.

    The threshold is -500 HU for CT (``ct=None``: decided from the intensities),
    else 10 % of the 1st-99th percentile range. Found on a grid subsampled to at
    most ~96 voxels per axis (fast on a 512 x 512 x 1000 CT); the whole image
    when nothing is found or the part holds under 0.5 % of it.
    """
    from scipy import ndimage

    full = tuple(slice(0, s) for s in image.shape)
    sample = _sample(image)
    if not sample.size:
        return full
    if ct is None:
        ct = _is_ct(sample)
    if ct:
        threshold = CT_AIR_HU
    else:
        lo, hi = np.percentile(sample, [1, 99])
        threshold = float(lo + 0.1 * (hi - lo))
    strides = [max(1, s // 96) for s in image.shape]
    small = image[tuple(slice(None, None, k) for k in strides)] > threshold
    labelled, count = ndimage.label(small)
    if count == 0:
        return full
    sizes = np.bincount(labelled.reshape(-1))[1:]
    largest = int(np.argmax(sizes)) + 1
    if sizes[largest - 1] < 0.005 * small.size:
        return full
    box = ndimage.find_objects((labelled == largest).astype(np.uint8))[0]
    return tuple(
        slice(b.start * k, min(n, (b.stop - 1) * k + k)) for b, k, n in zip(box, strides, image.shape)
    )


def _label_boxes(statistics: list[dict[str, Any]]) -> dict[int, tuple[slice, ...]]:
    """Label value -> inclusive index box, from statistics rows (labels with voxels only)."""
    return {
        int(row["label"]): tuple(slice(int(a), int(b) + 1) for a, b in zip(row["bbox_min"], row["bbox_max"]))
        for row in statistics
        if int(row["label"]) != 0 and row.get("voxels") and row.get("bbox_min") is not None
    }


def crop_box(
    image: np.ndarray,
    spacing: tuple[float, ...],
    label_boxes: dict[int, tuple[slice, ...]],
    *,
    ct: bool | None = None,
) -> tuple[slice, ...]:
    """What the preview shows: :func:`body_box` joined with every label's box, widened by
    :data:`CROP_MARGIN_MM` on each side (within the image)."""
    box = body_box(image, ct=ct)
    for other in label_boxes.values():
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box, other))
    out = []
    for b, sp, n in zip(box, spacing, image.shape):
        pad = math.ceil(CROP_MARGIN_MM / max(sp, 1e-6))
        out.append(slice(max(0, b.start - pad), min(n, b.stop + pad)))
    return tuple(out)


def best_slices(mask: np.ndarray, label_boxes: dict[int, tuple[slice, ...]]) -> list[int]:
    """Per axis, the slice index holding the most labels, then the largest labelled area (first of ties).

    The middle slice where nothing is labelled. Each label is counted inside its own
    box only (one pass over the boxes, not over the whole mask).
    """
    n_labels = [np.zeros(n, dtype=np.int64) for n in mask.shape]
    area = [np.zeros(n, dtype=np.int64) for n in mask.shape]
    for value, box in label_boxes.items():
        inside = mask[box] == value
        for axis in range(mask.ndim):
            counts = np.count_nonzero(inside, axis=tuple(a for a in range(mask.ndim) if a != axis))
            n_labels[axis][box[axis]] += counts > 0
            area[axis][box[axis]] += counts
    best = []
    for axis, n in enumerate(mask.shape):
        if not area[axis].any():
            best.append(n // 2)
            continue
        score = n_labels[axis] * (int(area[axis].max()) + 1) + area[axis]  # lexicographic (labels, area)
        best.append(int(np.argmax(score)))
    return best


# --------------------------------------------------------------------------- legend


def _format_amount(value: float) -> str:
    if value == 0:
        return "0"
    if value < 0.01:
        return "<0.01"
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def legend_entries(
    statistics: list[dict[str, Any]], *, spatial_dims: int = 3, physical: bool = True
) -> tuple[list[tuple[int, str]], list[str]]:
    """Legend lines from per-label statistics (:func:`medseg.inference.stats.label_statistics` rows).

    Args:
        statistics: rows with ``label``, ``name``, ``voxels`` and ``volume_ml``.
        spatial_dims: 2 gives areas (``volume_ml`` is mm² / 1000 there).
        physical: False for a 2D image without a pixel size (spacing 1): pixels only.

    Returns:
        ``[(label value, "name  12.3 mL"), ...]`` for the structures found (2D:
        ``"name  400 px · 4.00 cm²"``), and the names of the structures not found.
    """
    found, missing = [], []
    for row in sorted(statistics, key=lambda r: int(r["label"])):
        if int(row["label"]) == 0:
            continue
        if not row.get("voxels"):
            missing.append(str(row["name"]))
            continue
        if spatial_dims == 2:
            amount = f"{int(row['voxels']):,} px"
            if physical:
                amount += f" · {_format_amount(float(row['volume_ml']) * 10.0)} cm²"
        else:
            amount = f"{_format_amount(float(row['volume_ml']))} mL"
        name = str(row["name"])
        name = name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"
        found.append((int(row["label"]), f"{name}  {amount}"))
    return found, missing


def _statistics(mask: np.ndarray, geometry: Geometry, labels: dict[int, str] | None) -> list[dict[str, Any]]:
    """Statistics of the named labels and of any other value in the mask (named ``label <v>``)."""
    from medseg.inference.stats import label_statistics

    named = {int(v): str(n) for v, n in (labels or {}).items() if int(v) != 0}
    top = int(mask.max()) if mask.size else 0
    rows = label_statistics(mask, geometry, {**{v: f"label {v}" for v in range(1, top + 1)}, **named})
    return [row for row in rows if row["voxels"] or row["label"] in named]


def _missing_line(missing: list[str]) -> str:
    if not missing:
        return ""
    if len(missing) <= 6:
        return "not found: " + ", ".join(missing)
    return f"not found: {', '.join(missing[:5])} and {len(missing) - 5} more"


# --------------------------------------------------------------------------- drawing


@dataclass
class _Panel:
    name: str
    image: np.ndarray  # displayed (rows, cols)
    mask: np.ndarray
    pixel_mm: tuple[float, float]  # (row, column) spacing
    letters: tuple[str, str, str, str] | None
    caption: str
    mark_rows: tuple[int, ...] = ()  # display rows to mark with a dashed line
    scale_bar: bool = True  # False when the pixel size is unknown (a 2D image with spacing 1)


def _colour(value: int) -> tuple[float, float, float]:
    """RGB in [0, 1] of a label value, as in the DICOM outputs."""
    from medseg.inference.dicom_outputs import structure_colour

    return tuple(c / 255 for c in structure_colour(value))


def rgba_overlay(mask: np.ndarray, colours: dict[int, tuple[float, float, float]] | None = None) -> np.ndarray:
    """``(H, W, 4)`` float32 overlay of a 2D label slice: each structure in its colour (``colours``, else the
    DICOM outputs' palette) at :data:`FILL_ALPHA`, with opaque 1-pixel outlines (a pixel with a differently
    labelled 4-neighbour); background transparent. The preview and the TensorBoard overlays both draw it."""
    colours = colours or {}
    out = np.zeros((*mask.shape, 4), dtype=np.float32)
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    for value in np.unique(mask).tolist():
        if value == 0:
            continue
        where = mask == value
        out[where, :3] = colours.get(int(value)) or _colour(int(value))
        out[where, 3] = np.where(edge[where], 1.0, FILL_ALPHA)
    return out


def _draw_panel(fig: Any, rect: list[float], panel: _Panel, window: tuple[float, float], colours: dict, *, big: bool) -> None:
    from matplotlib import patheffects

    ax = fig.add_axes(rect)
    ax.set_facecolor("black")
    aspect = panel.pixel_mm[0] / panel.pixel_mm[1]
    ax.imshow(panel.image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="bilinear")
    if panel.mask.any():
        ax.imshow(rgba_overlay(panel.mask, colours), aspect=aspect, interpolation="nearest")
    for row in panel.mark_rows:
        ax.axhline(row, color="#ffd400", linestyle=(0, (4, 3)), linewidth=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#444444")
    ax.set_title(panel.caption, fontsize=11 if big else 9, color="white", pad=4)
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    if panel.letters is not None:
        size = 15 if big else 10
        left, right, top, bottom = panel.letters
        for text, xy, ha, va in (
            (left, (0.012, 0.5), "left", "center"),
            (right, (0.988, 0.5), "right", "center"),
            (top, (0.5, 0.985), "center", "top"),
            (bottom, (0.5, 0.015), "center", "bottom"),
        ):
            ax.text(*xy, text, transform=ax.transAxes, ha=ha, va=va, fontsize=size, fontweight="bold",
                    color="#ffd400", path_effects=outline)
    if big and panel.scale_bar:  # a scale bar: 5 cm (1 cm for small fields of view), bottom right
        width_mm = panel.image.shape[1] * panel.pixel_mm[1]
        bar = 50.0 if width_mm >= 150 else 10.0
        cols = bar / panel.pixel_mm[1]
        x1 = panel.image.shape[1] - 0.04 * panel.image.shape[1]
        y = panel.image.shape[0] - 0.05 * panel.image.shape[0]
        ax.plot([x1 - cols, x1], [y, y], color="white", linewidth=3, solid_capstyle="butt", path_effects=outline)
        ax.text(x1 - cols / 2, y - 0.015 * panel.image.shape[0], f"{bar:g} mm", color="white", ha="center",
                va="bottom", fontsize=9, path_effects=outline)
    ax.set_xlim(-0.5, panel.image.shape[1] - 0.5)
    ax.set_ylim(panel.image.shape[0] - 0.5, -0.5)


def _panels_3d(
    image: np.ndarray, mask: np.ndarray, geometry: Geometry, label_boxes: dict[int, tuple[slice, ...]], ct: bool
) -> tuple[list[_Panel], str]:
    """The displayed panels (main first) and a note on the views left out."""
    ornt = _ornt(geometry)
    spacing = geometry.spacing
    box = crop_box(image, spacing, label_boxes, ct=ct)
    img, msk = image[box], mask[box]
    shifted = {v: tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(b, box)) for v, b in label_boxes.items()}
    index = best_slices(msk, shifted)
    axis_of = {int(ornt[a, 0]): a for a in range(3)}  # RAS axis -> array axis
    thin = thin_axes(geometry)
    if thin:  # only the view across the thinnest axis
        main = min(thin, key=lambda a: geometry.shape[a] * spacing[a])
        views = [main]
        n, mm = geometry.shape[main], geometry.shape[main] * spacing[main]
        others = [name for r, name in _VIEW_OF_AXIS.items() if axis_of[r] != main]
        note = f"{' and '.join(others)} views left out: the series is only {n} slice{'s' * (n != 1)} ({mm:.0f} mm) thick"
    else:
        views = [axis_of[2], axis_of[0], axis_of[1]]  # axial, sagittal, coronal
        note = ""
    axial = axis_of[2]
    panels = []
    for a in views:
        rest = [b for b in range(3) if b != a]
        layout = plane_layout((tuple(ornt[rest[0]]), tuple(ornt[rest[1]])))
        k = index[a]
        at = (slice(None),) * a + (k,)  # a view, not a copy of the volume (np.take would copy)
        plane_img, plane_msk = layout.apply(img[at]), layout.apply(msk[at])
        row_axis, col_axis = (rest[1], rest[0]) if layout.transpose else (rest[0], rest[1])
        # the slice's patient coordinate (RAS mm along the view's axis, at the centre of the slice)
        centre = [(s.start + s.stop - 1) / 2 for s in box]
        centre[a] = box[a].start + k
        ras_axis = int(ornt[a, 0])
        world = float(geometry.voxel_to_world(centre)[ras_axis])
        plus, minus = _AXIS_LETTERS[ras_axis]
        caption = (
            f"{_VIEW_OF_AXIS[ras_axis]} · slice {box[a].start + k + 1} of {geometry.shape[a]}"
            f" · {plus if world >= 0 else minus} {abs(world):.1f} mm"
        )
        mark_rows: tuple[int, ...] = ()
        if a != axial and row_axis == axial:  # the axial slice, as a line across this view
            mark_rows = (plane_img.shape[0] - 1 - index[axial] if layout.flip_rows else index[axial],)
        panels.append(_Panel(
            name=_VIEW_OF_AXIS[ras_axis], image=plane_img, mask=plane_msk,
            pixel_mm=(spacing[row_axis], spacing[col_axis]), letters=layout.letters, caption=caption,
            mark_rows=mark_rows,
        ))
    return panels, note


def _panel_2d(
    image: np.ndarray, mask: np.ndarray, geometry: Geometry, label_boxes: dict[int, tuple[slice, ...]], ct: bool
) -> _Panel:
    """One panel; CT slices are cropped to the body, other 2D images shown whole."""
    ornt = _ornt(geometry)
    box = crop_box(image, geometry.spacing, label_boxes, ct=True) if ct else tuple(slice(0, n) for n in image.shape)
    layout = plane_layout((tuple(ornt[0]), tuple(ornt[1])))
    row_axis, col_axis = (1, 0) if layout.transpose else (0, 1)
    return _Panel(
        name="image", image=layout.apply(image[box]), mask=layout.apply(mask[box]),
        pixel_mm=(geometry.spacing[row_axis], geometry.spacing[col_axis]), letters=None,
        caption=f"{geometry.shape[0]} x {geometry.shape[1]} pixels", scale_bar=not np.allclose(geometry.spacing, 1.0),
    )


def render_preview(
    image: np.ndarray,
    mask: np.ndarray,
    geometry: Geometry,
    *,
    labels: dict[int, str] | None = None,
    title: str = "",
    statistics: list[dict[str, Any]] | None = None,
) -> bytes:
    """PNG bytes of the preview (module doc).

    Args:
        image: spatial intensities (first channel of the scan) on ``geometry``'s grid.
        mask: integer labels on the same grid.
        geometry: the grid (orientation, spacing, slice positions).
        labels: label value -> name, for the legend (structures not found are listed too).
        title: figure title (e.g. the case name; never patient data).
        statistics: :func:`medseg.inference.stats.label_statistics` rows of ``mask``
            when already computed (else computed here).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = np.asarray(image)
    mask = np.asarray(mask)
    if not np.issubdtype(mask.dtype, np.integer):
        mask = mask.astype(np.int32)
    if statistics is None:
        statistics = _statistics(mask, geometry, labels)
    physical = geometry.spatial_dims == 3 or not np.allclose(geometry.spacing, 1.0)
    entries, missing = legend_entries(statistics, spatial_dims=geometry.spatial_dims, physical=physical)
    boxes = _label_boxes(statistics)
    colours = {v: _colour(v) for v in boxes}
    sample = _sample(image)
    ct = _is_ct(sample)
    window = _window(sample, ct)
    if geometry.spatial_dims == 3:
        panels, note = _panels_3d(image, mask, geometry, boxes, ct)
    else:
        panels, note = [_panel_2d(image, mask, geometry, boxes, ct)], ""

    # sizes in inches: the main panel is 2/3 of a 12-inch figure (8.5 inches alone), its height follows
    # its aspect; the small panels are stacked beside it at their own aspect
    wide = len(panels) > 1
    width = 12.0 if wide else 8.5
    main_w = 7.7 if wide else 7.9
    caption_h = 0.32
    main_h = float(np.clip(main_w * _aspect(panels[0]), 3.0, 9.0))
    side_w = width - main_w - 0.75
    side_h = [min(side_w * _aspect(p), (main_h - caption_h) / 2) for p in panels[1:]]
    body = max(main_h, sum(side_h) + caption_h * len(side_h)) + caption_h
    header = 0.85 if note else 0.6
    shown = entries[:MAX_LEGEND]
    font = 9.5 if len(shown) <= 20 else 8.5
    longest = max((len(text) for _, text in shown), default=10)
    column = 0.45 + longest * font / 140.0  # handle, text (about 0.52 em a character) and spacing
    ncol = max(1, min(len(shown), int((width - 0.4) // column)))
    rows = math.ceil(len(shown) / ncol) if shown else 1
    extra = _missing_line(missing)
    if len(entries) > len(shown):
        extra = f"{len(entries) - len(shown)} more structures in the statistics file" + (f" · {extra}" if extra else "")
    legend_h = 0.2 + rows * font / 46.0 + (0.25 if extra else 0.0)
    footer = 0.4
    height = header + body + legend_h + footer
    dpi = min(100.0, MAX_WIDTH_PX / width, MAX_HEIGHT_PX / height)
    fig = Figure(figsize=(width, height), dpi=dpi, facecolor="#111111")
    FigureCanvasAgg(fig)

    def rect(x: float, y_top: float, w: float, h: float) -> list[float]:  # inches from the top-left corner
        return [x / width, (height - y_top - h) / height, w / width, h / height]

    x0 = 0.2 if wide else (width - main_w) / 2
    _draw_panel(fig, rect(x0, header + caption_h, main_w, body - caption_h), panels[0], window, colours, big=True)
    y = header + caption_h
    for panel, h in zip(panels[1:], side_h):
        _draw_panel(fig, rect(x0 + main_w + 0.35, y, side_w, h), panel, window, colours, big=False)
        y += h + caption_h

    fig.text(0.5, 1 - 0.3 / height, title or "segmentation preview", ha="center", va="center", fontsize=15,
             color="white", fontweight="bold")
    if note:
        fig.text(0.5, 1 - 0.62 / height, note, ha="center", va="center", fontsize=10, color="#ffb347")
    legend_top = header + body + 0.1
    if shown:
        handles = [Patch(facecolor=(*colours[v], FILL_ALPHA + 0.25), edgecolor=colours[v], linewidth=1.5, label=text)
                   for v, text in shown]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - legend_top / height), ncol=ncol,
                   fontsize=font, frameon=False, labelcolor="white", handlelength=1.6, columnspacing=1.4,
                   borderaxespad=0.0)
    else:
        fig.text(0.5, 1 - (legend_top + 0.1) / height, "no structure found", ha="center", va="top", fontsize=11,
                 color="white")
    if extra:
        fig.text(0.5, 1 - (header + body + legend_h - 0.05) / height, extra, ha="center", va="bottom", fontsize=9,
                 color="#bbbbbb")
    if geometry.spatial_dims == 3:
        foot = "radiological view (the patient's right on the image's left)"
        foot += " · dashed line: the axial slice" if any(p.mark_rows for p in panels) else ""
        foot += f" · fills at {FILL_ALPHA:.0%} opacity · volumes over the whole scan"
    else:
        foot = f"fills at {FILL_ALPHA:.0%} opacity · areas over the whole image"
    fig.text(0.5, 0.2 / height, foot, ha="center", va="center", fontsize=8.5, color="#999999")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    return buf.getvalue()


def _aspect(panel: _Panel) -> float:
    """Displayed height / width of a panel (mm / mm)."""
    return panel.image.shape[0] * panel.pixel_mm[0] / max(1e-6, panel.image.shape[1] * panel.pixel_mm[1])


def write_preview(
    image: np.ndarray,
    mask: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike,
    *,
    labels: dict[int, str] | None = None,
    title: str = "",
    statistics: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Render the preview (see :func:`render_preview`) and write it atomically as PNG."""
    png = render_preview(image, mask, geometry, labels=labels, title=title, statistics=statistics)
    return write_bytes_atomic(png, path, overwrite=overwrite)
