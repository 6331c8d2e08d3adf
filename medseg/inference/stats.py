"""Per-label statistics of a mask on its scan's grid: voxels, millilitres, bounding box, centre.

Volumes use the voxel volume ``|det(affine[:3, :3])|`` in mm³ (exact for oblique
and anisotropic grids); 1 mL = 1000 mm³. Bounding boxes are inclusive voxel
index ranges in the file's axis order; ``centroid_ras_mm`` is the world
(RAS+, mm) position of the label's centre of mass.

Example::

    stats = label_statistics(mask, volume.geometry, {0: "background", 1: "liver"})
    write_statistics(stats, "case_stats.json")   # or .csv
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import ConfigError
from medseg.io.atomic import write_bytes_atomic, write_json_atomic
from medseg.io.geometry import Geometry

__all__ = ["label_statistics", "voxel_volume_mm3", "write_statistics"]

CSV_FIELDS = ["label", "name", "voxels", "volume_ml", "bbox_min", "bbox_max", "centroid_ras_mm"]


def voxel_volume_mm3(geometry: Geometry) -> float:
    """Volume of one voxel in mm³ (area in mm² for a 2D grid)."""
    if geometry.spatial_dims == 2:
        cols = geometry.affine[:3, :2]
        return float(np.linalg.norm(np.cross(cols[:, 0], cols[:, 1])))
    return float(abs(np.linalg.det(geometry.affine[:3, :3])))


def label_statistics(
    mask: np.ndarray, geometry: Geometry, labels: dict[int, str], *, include_background: bool = False
) -> list[dict[str, Any]]:
    """Statistics for every label in ``labels`` (absent labels have 0 voxels and no box).

    Args:
        mask: integer labels of ``geometry.shape``.
        geometry: the grid the mask lies on.
        labels: label value -> name (e.g. ``plan.labels``).
        include_background: also report label 0.

    Returns:
        One dict per label: ``label, name, voxels, volume_ml, bbox_min, bbox_max, centroid_ras_mm``.
    """
    mask = np.asarray(mask)
    unit = voxel_volume_mm3(geometry)
    top = int(mask.max()) if mask.size else 0
    counts = np.zeros(top + 1, dtype=np.int64)
    flat = mask.reshape(-1)
    for start in range(0, flat.size, 1 << 22):  # chunked: bincount would copy the mask as int64
        counts += np.bincount(flat[start : start + (1 << 22)], minlength=top + 1)
    labelled = mask if np.issubdtype(mask.dtype, np.integer) else mask.astype(np.int32)
    boxes = ndimage.find_objects(labelled) if top > 0 else []
    rows = []
    for value, name in sorted(labels.items()):
        if value == 0 and not include_background:
            continue
        voxels = int(counts[value]) if value < len(counts) else 0
        row: dict[str, Any] = {
            "label": int(value),
            "name": name,
            "voxels": voxels,
            "volume_ml": round(voxels * unit / 1000.0, 6),
            "bbox_min": None,
            "bbox_max": None,
            "centroid_ras_mm": None,
        }
        box = boxes[value - 1] if 0 < value <= len(boxes) else None
        if voxels and box is not None:
            row["bbox_min"] = [int(s.start) for s in box]
            row["bbox_max"] = [int(s.stop) - 1 for s in box]
            binary = mask[box] == value
            # centre of mass from the per-axis marginals (no index list: bounded memory)
            index = [
                s.start + float(np.dot(
                    np.count_nonzero(binary, axis=tuple(a for a in range(mask.ndim) if a != axis)),
                    np.arange(binary.shape[axis]),
                )) / voxels
                for axis, s in enumerate(box)
            ]
            row["centroid_ras_mm"] = [round(float(v), 4) for v in geometry.voxel_to_world(index)]
        elif voxels and value == 0:
            row["bbox_min"] = [0] * mask.ndim
            row["bbox_max"] = [s - 1 for s in mask.shape]
        rows.append(row)
    return rows


def write_statistics(
    stats: list[dict[str, Any]], path: str | os.PathLike, *, overwrite: bool = False, extra: dict[str, Any] | None = None
) -> Path:
    """Write statistics as ``.json`` (``{"labels": [...], **extra}``) or ``.csv`` (one row per label).

    Raises:
        ConfigError: another file suffix.
        OutputExistsError: the file exists and ``overwrite`` is False.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return write_json_atomic({**(extra or {}), "labels": stats}, path, overwrite=overwrite)
    if suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in stats:
            writer.writerow(
                {k: (" ".join(str(v) for v in row[k]) if isinstance(row[k], list) else row[k]) for k in CSV_FIELDS}
            )
        return write_bytes_atomic(buf.getvalue().encode("utf-8"), path, overwrite=overwrite)
    raise ConfigError(f"statistics file {path} must end in .json or .csv.")
