"""Several single-channel scans of one case (nnU-Net's ``CASE_0000``, ``CASE_0001`` ...) as one volume."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from medseg.errors import GeometryError, ScanReadError
from medseg.io.volume import Volume

__all__ = ["read_channels"]


def read_channels(
    scans: Sequence[str | os.PathLike | Volume],
    *,
    series_uid: str | None = None,
    resample_tilt: bool = False,
) -> Volume:
    """One multi-channel :class:`~medseg.io.Volume` from one single-channel scan per channel.

    Every channel must lie on the same grid as the first (shape, and corners within
    0.01 mm); the result has the first channel's geometry and path.

    Raises:
        ScanReadError: a channel file holds several channels itself.
        GeometryError: channels on different grids (the difference is named).
    """
    from medseg.io.readers import read_volume

    volumes = [
        s if isinstance(s, Volume) else read_volume(s, series_uid=series_uid, resample_tilt=resample_tilt)
        for s in scans
    ]
    if not volumes:
        raise ScanReadError("an empty list of channels was given; pass one scan per channel.")
    first = volumes[0]

    def where(i: int, v: Volume) -> str:
        return v.path.name if v.path is not None else f"channel {i}"

    for i, v in enumerate(volumes):
        if v.num_channels != 1:
            raise ScanReadError(
                f"{where(i, v)} holds {v.num_channels} channels; pass one single-channel scan per channel."
            )
        if i and not v.geometry.same_grid(first.geometry, atol_mm=1e-2):
            raise GeometryError(
                f"channel {where(i, v)} is not on the grid of {where(0, first)} "
                f"({v.geometry.describe_difference(first.geometry)}); all channels of a case must be co-registered "
                "on one grid: resample them first."
            )
    dtype = np.result_type(*[v.array.dtype for v in volumes])
    array = np.concatenate([v.array.astype(dtype, copy=False) for v in volumes], axis=0)
    return Volume(array=array, geometry=first.geometry, path=first.path, meta=dict(first.meta))
