"""A PNG quick-look: the mask over three orthogonal slices of the scan.

The slices go through the centre of mass of the largest predicted structure
(the middle of the scan when the mask is empty). The arrays are first turned
to the closest RAS axes (permutation and flips only, from the affine) so the
panels show sagittal, coronal and axial views the usual way up, with square
millimetres (the aspect ratio follows the spacing); coronal and axial views
use the radiological convention (the patient's right on the viewer's left), as
3D Slicer and ITK-SNAP do. CT-like intensities are
windowed to their 1st-99th percentiles. 2D scans give one panel.

Rendering uses matplotlib's Agg canvas directly: no display and no global
backend switch.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from medseg.io.atomic import write_bytes_atomic
from medseg.io.geometry import Geometry

__all__ = ["render_preview", "write_preview"]


def _to_ras(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Array and spacing re-ordered to the closest RAS axes (3D only)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(geometry.affine)
    spacing = np.asarray(geometry.spacing)
    out = nib.orientations.apply_orientation(array, ornt)
    new_spacing = np.empty(3)
    for src, (dst, _flip) in enumerate(ornt):
        new_spacing[int(dst)] = spacing[src]
    return out, new_spacing


def render_preview(
    image: np.ndarray, mask: np.ndarray, geometry: Geometry, *, labels: dict[int, str] | None = None, title: str = ""
) -> bytes:
    """PNG bytes of the mask (coloured, semi-transparent) over orthogonal slices of ``image``.

    Args:
        image: spatial intensities (first channel of the scan) on ``geometry``'s grid.
        mask: integer labels on the same grid.
        geometry: the grid (for the orientation and the aspect ratio).
        labels: label value -> name, for the legend.
        title: figure title (e.g. the case name; never patient data).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask)
    present = [int(v) for v in np.unique(mask) if v != 0]
    if geometry.spatial_dims == 3:
        img, spacing = _to_ras(image, geometry)
        msk, _ = _to_ras(mask, geometry)
        if present:
            counts = {v: int(np.count_nonzero(msk == v)) for v in present}
            largest = max(counts, key=counts.get)
            center = np.round(np.argwhere(msk == largest).mean(axis=0)).astype(int)
        else:
            center = np.array(img.shape) // 2
        x, y, z = (int(c) for c in center)
        # (2D array, (row spacing, column spacing), name): superior / anterior up, anterior on the
        # left in the sagittal view, the patient's right on the viewer's left (radiological convention)
        panels = [
            (np.fliplr(np.rot90(img[x, :, :])), np.fliplr(np.rot90(msk[x, :, :])), (spacing[2], spacing[1]), "sagittal"),
            (np.fliplr(np.rot90(img[:, y, :])), np.fliplr(np.rot90(msk[:, y, :])), (spacing[2], spacing[0]), "coronal"),
            (np.fliplr(np.rot90(img[:, :, z])), np.fliplr(np.rot90(msk[:, :, z])), (spacing[1], spacing[0]), "axial"),
        ]
    else:
        spacing = geometry.spacing
        panels = [(np.rot90(image), np.rot90(mask), (spacing[1], spacing[0]), "slice")]

    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    top = max(present) if present else 1
    base = colormaps["tab20"]
    cmap = ListedColormap([base(i % 20) for i in range(top + 1)])

    fig = Figure(figsize=(4 * len(panels), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (img2, msk2, (row_sp, col_sp), name) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(img2, cmap="gray", vmin=lo, vmax=hi, aspect=row_sp / col_sp, interpolation="nearest")
        overlay = np.ma.masked_equal(msk2, 0)
        ax.imshow(overlay, cmap=cmap, vmin=0, vmax=top, alpha=0.45, aspect=row_sp / col_sp, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if present:
        handles = [Patch(color=cmap(v), label=(labels or {}).get(v, str(v))) for v in present[:20]]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_preview(
    image: np.ndarray,
    mask: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike,
    *,
    labels: dict[int, str] | None = None,
    title: str = "",
    overwrite: bool = False,
) -> Path:
    """Render the preview (see :func:`render_preview`) and write it atomically as PNG."""
    return write_bytes_atomic(render_preview(image, mask, geometry, labels=labels, title=title), path, overwrite=overwrite)
