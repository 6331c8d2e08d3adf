"""Show a scan's geometry and intensities (like nib-ls or c3d -info).

Examples:
  medseg info scan.nii.gz
  medseg info dicom_folder/ --series-uid 1.2.840.113619.2.55.3
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.commands import emit

if TYPE_CHECKING:
    from medseg.io.volume import Volume

HELP = "show a scan's shape, spacing, orientation, origin and intensity range"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scan", type=Path, help="a .nii/.nii.gz/.mha/.nrrd file or a DICOM series folder")
    parser.add_argument("--series-uid", help="the series to show when a DICOM folder holds several")
    parser.add_argument(
        "--resample-tilt", action="store_true",
        help="show a gantry-tilted DICOM series (refused by default) as resampled onto a regular grid",
    )


def run(args: argparse.Namespace) -> int:
    from medseg.io.readers import list_dicom_series, read_volume

    if args.scan.is_dir():
        series = list_dicom_series(args.scan)
        emit(f"{args.scan}: {len(series)} DICOM series")
        for one in series:
            emit(f"  {one.summary()}")
        if len(series) > 1 and args.series_uid is None:
            emit("Pass --series-uid UID to show one series.")
            return 0
    emit(format_info(read_volume(args.scan, series_uid=args.series_uid, resample_tilt=args.resample_tilt)))
    return 0


def format_info(volume: Volume) -> str:
    """Human-readable summary of a :class:`~medseg.io.volume.Volume` (no patient data)."""
    g = volume.geometry
    a = volume.array

    def vec(values) -> str:
        return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"

    lines = [
        f"file:         {volume.path}",
        f"format:       {volume.meta.get('format', '?')}"
        + (f", modality {volume.meta['modality']}" if volume.meta.get("modality") else ""),
        f"shape:        {g.shape} ({g.spatial_dims}D), {volume.num_channels} channel(s)",
        f"spacing:      {vec(g.spacing)} mm",
        f"orientation:  {g.orientation}" + (" (oblique)" if g.is_oblique else ""),
        f"origin RAS:   {vec(g.origin)} mm",
        f"origin LPS:   {vec(g.origin_lps)} mm",
        "direction:    LPS columns " + ", ".join(vec(col) for col in g.direction_lps.T[: g.spatial_dims]),
        f"data type:    {a.dtype}",
    ]
    for c in range(volume.num_channels):
        channel = a[c]
        name = "intensities:" if volume.num_channels == 1 else f"channel {c}:".ljust(13)
        lines.append(
            f"{name} min {channel.min():.6g}, max {channel.max():.6g}, mean {channel.mean(dtype=np.float64):.6g}"
        )
    if g.nifti_codes is not None:
        lines.append(
            f"nifti codes:  qform_code {g.nifti_codes.qform_code}, sform_code {g.nifti_codes.sform_code}"
        )
    return "\n".join(lines)
