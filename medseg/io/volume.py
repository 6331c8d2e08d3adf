"""A scan in memory: voxels plus the geometry that places them in the patient."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import GeometryError
from medseg.io.geometry import Geometry


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels and geometry of one scan.

    Args:
        array: always channel-first, ``(C, *geometry.shape)``: ``C == 1`` for an
            ordinary CT/MR volume, more for multi-channel (e.g. 4 MR sequences).
            Spatial axes follow the file's voxel order (see ``medseg.io.geometry``).
        geometry: the voxel grid (shape, spacing, affine, orientation).
        path: the file or DICOM folder it was read from, if any.
        meta: non-identifying facts about the source (format, modality, series
            uid only when the user passed it). Never patient data.
    """

    array: np.ndarray
    geometry: Geometry
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != self.geometry.spatial_dims + 1 or tuple(self.array.shape[1:]) != self.geometry.shape:
            raise GeometryError(
                f"volume array shape {self.array.shape} does not match (channels, *{self.geometry.shape}); "
                "arrays are channel-first."
            )

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spatial_dims(self) -> int:
        return self.geometry.spatial_dims

    @property
    def name(self) -> str:
        """Case name derived from the file name (no extension), e.g. ``'liver_012'``."""
        if self.path is None:
            return "volume"
        from medseg.io.formats import strip_suffix

        return strip_suffix(self.path.name)
