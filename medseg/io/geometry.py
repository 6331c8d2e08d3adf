"""Scan geometry: where each voxel lies in the patient, in millimetres.

Conventions (the one place where they are converted):

* Array axes follow the file's voxel index order ``(i, j, k)``: nibabel's order
  and ITK's ``(x, y, z)`` order. ``Geometry.shape`` is the spatial shape in that
  order; ``spacing`` is in mm in that order.
* ``affine`` maps a voxel index ``(i, j, k, 1)`` to RAS+ world coordinates in mm
  (+x towards the patient's Right, +y Anterior, +z Superior), as in NIfTI/nibabel.
* ``direction_lps`` / ``origin_lps`` are the same transform in ITK/DICOM's LPS+
  convention: ``world_lps = origin_lps + direction_lps @ diag(spacing) @ index``.
  ``affine = diag(-1, -1, 1, 1) @ [[direction_lps * spacing, origin_lps], [0, 1]]``.

A 2D geometry has a 2-entry shape and spacing; its affine is still 4x4 (the
third column is the normal of the image plane, unit length).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from medseg.errors import GeometryError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

__all__ = [
    "Geometry",
    "NiftiCodes",
    "affine_from_lps",
    "lps_from_affine",
]


def affine_from_lps(direction: np.ndarray, spacing, origin) -> np.ndarray:
    """Build a 4x4 RAS+ affine from ITK-style LPS direction (columns = axes), spacing and origin."""
    direction = np.asarray(direction, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    n = direction.shape[0]
    lps = np.eye(4)
    lps[:n, :n] = direction * spacing[np.newaxis, :]
    lps[:n, 3] = origin
    return LPS_TO_RAS @ lps


def lps_from_affine(affine: np.ndarray, ndim: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a RAS+ affine into ITK-style ``(direction_lps, spacing, origin_lps)`` (3D)."""
    affine = np.asarray(affine, dtype=np.float64)
    lps = LPS_TO_RAS @ affine
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing == 0):
        raise GeometryError(f"affine has a zero-length axis (spacing {spacing.tolist()}); it is not a valid grid.")
    direction = columns / spacing[np.newaxis, :]
    return direction, spacing[:ndim] if ndim < 3 else spacing, lps[:3, 3].copy()


@dataclass(frozen=True)
class NiftiCodes:
    """The NIfTI header fields that decide how viewers place the volume.

    Kept from the input so that a mask written for it carries the same
    qform/sform codes (a viewer may prefer either transform).
    """

    qform_code: int
    sform_code: int


@dataclass(frozen=True, eq=False)
class Geometry:
    """Voxel grid of a scan: spatial ``shape`` plus the voxel-to-RAS ``affine``.

    Args:
        shape: spatial shape in array axis order (2 or 3 entries).
        affine: 4x4 voxel index -> RAS+ mm.
        nifti_codes: qform/sform codes of a NIfTI source, copied onto masks
            written for it; ``None`` for other sources (masks then get
            qform_code = sform_code = 1, "scanner anatomical").
        source: short description of where it came from ("nifti", "dicom", ...).
    """

    shape: tuple[int, ...]
    affine: np.ndarray = field(repr=False)
    nifti_codes: NiftiCodes | None = None
    source: str = "array"

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) not in (2, 3) or any(s < 1 for s in shape):
            raise GeometryError(f"geometry shape must have 2 or 3 positive entries, got {shape}.")
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise GeometryError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}.")
        if np.linalg.matrix_rank(affine[:3, :3]) < 3:
            raise GeometryError("affine is singular: two voxel axes point the same way (or one has zero length).")
        affine.setflags(write=False)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", affine)

    # --- derived views -------------------------------------------------
    @property
    def spatial_dims(self) -> int:
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm, array axis order."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(s) for s in norms[: self.spatial_dims])

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS+ position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def direction_lps(self) -> np.ndarray:
        """3x3 ITK direction matrix (columns are the axis directions in LPS)."""
        return lps_from_affine(self.affine)[0]

    @property
    def origin_lps(self) -> tuple[float, float, float]:
        """ITK/DICOM origin: LPS+ position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in lps_from_affine(self.affine)[2])

    @property
    def orientation(self) -> str:
        """Closest axis codes, e.g. ``'RAS'`` or ``'LPS'`` (letters name where each axis points)."""
        import nibabel as nib

        codes = nib.orientations.aff2axcodes(self.affine)
        return "".join(codes[: self.spatial_dims])

    @property
    def is_oblique(self) -> bool:
        direction = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        return bool(np.any(np.abs(np.abs(direction) - np.round(np.abs(direction))) > 1e-5))

    @property
    def shear(self) -> float:
        """Largest |cos| between two voxel axes: 0 for an orthogonal grid."""
        direction = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        gram = direction.T @ direction
        return float(np.max(np.abs(gram - np.eye(3))))

    # --- world coordinates ---------------------------------------------
    def voxel_to_world(self, index) -> np.ndarray:
        """RAS+ mm of voxel indices ``(..., spatial_dims)`` (fractional allowed)."""
        index = np.asarray(index, dtype=np.float64)
        full = np.zeros((*index.shape[:-1], 3))
        full[..., : index.shape[-1]] = index
        return full @ self.affine[:3, :3].T + self.affine[:3, 3]

    def corners(self) -> np.ndarray:
        """World coordinates (RAS+, mm) of the field-of-view corners (outer voxel edges).

        8 corners in 3D, 4 in 2D. Comparing corners checks shape, spacing,
        direction and origin at once.
        """
        ranges = [(-0.5, n - 0.5) for n in self.shape]
        return self.voxel_to_world(np.array(list(itertools.product(*ranges))))

    def max_corner_distance(self, other: Geometry) -> float:
        """Largest distance in mm between matching field-of-view corners; inf if shapes differ."""
        if self.shape != other.shape:
            return float("inf")
        return float(np.max(np.linalg.norm(self.corners() - other.corners(), axis=-1)))

    def same_grid(self, other: Geometry, *, atol_mm: float = 1e-4) -> bool:
        """True when both grids have the same shape and corners within ``atol_mm``."""
        return self.max_corner_distance(other) <= atol_mm

    def describe_difference(self, other: Geometry) -> str:
        """Human-readable difference (shape, spacing, origin, direction) for error messages."""
        parts = []
        if self.shape != other.shape:
            parts.append(f"shape {self.shape} vs {other.shape}")
        ds = np.abs(np.subtract(self.spacing[: other.spatial_dims], other.spacing[: self.spatial_dims]))
        if ds.size and np.max(ds) > 1e-4:
            parts.append(
                f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)} mm"
            )
        do = float(np.linalg.norm(np.subtract(self.origin, other.origin)))
        if do > 1e-4:
            parts.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} (RAS, {do:.4g} mm apart)")
        da = _direction_angle_deg(self.affine, other.affine)
        if da > 1e-3:
            parts.append(f"direction {self.orientation} vs {other.orientation} (axes up to {da:.3g} deg apart)")
        if not parts and self.shape == other.shape:
            parts.append(f"corners up to {self.max_corner_distance(other):.3g} mm apart")
        return "; ".join(parts)

    # --- serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "affine": self.affine.tolist(),
            "nifti_codes": None
            if self.nifti_codes is None
            else {"qform_code": self.nifti_codes.qform_code, "sform_code": self.nifti_codes.sform_code},
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        codes = data.get("nifti_codes")
        return cls(
            shape=tuple(data["shape"]),
            affine=np.asarray(data["affine"], dtype=np.float64),
            nifti_codes=None if codes is None else NiftiCodes(**codes),
            source=data.get("source", "array"),
        )

    def with_shape_and_affine(self, shape, affine) -> Geometry:
        """A new grid (e.g. after resampling) that keeps the source description."""
        return Geometry(shape=tuple(shape), affine=affine, nifti_codes=self.nifti_codes, source=self.source)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _direction_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    da = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    db = b[:3, :3] / np.linalg.norm(b[:3, :3], axis=0)
    cos = np.clip(np.sum(da * db, axis=0), -1.0, 1.0)
    return float(np.degrees(np.max(np.arccos(cos))))
