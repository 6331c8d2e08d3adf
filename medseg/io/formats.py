"""File name endings medseg reads and writes, and the one rule that turns a file name into a case name.

Every list of suffixes and every "name without its extension" in medseg comes from here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "ITK_SUFFIXES",
    "MASK_IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "SCAN_SUFFIXES",
    "has_suffix",
    "strip_suffix",
    "suffix_of",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
"""NIfTI-1/2 files (read with nibabel)."""
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
"""MetaImage and NRRD files (read with SimpleITK)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""2D images (X-ray, ultrasound, dermoscopy ...; :mod:`medseg.io.images2d`)."""
MASK_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
"""Lossless 2D image endings a mask may be written as."""
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE_SUFFIXES
"""Every file ending read as a scan (a DICOM series is a folder)."""
MASK_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + tuple(s for s in IMAGE_SUFFIXES if s not in (".jpg", ".jpeg"))
"""File endings read as label masks: the scan endings without lossy JPEG."""


def suffix_of(path: str | os.PathLike) -> str:
    """The lower-case ending of a file name, ``.nii.gz`` as one (``"scan.NII.GZ"`` -> ``".nii.gz"``)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def has_suffix(path: str | os.PathLike, suffixes: tuple[str, ...] = SCAN_SUFFIXES) -> bool:
    """Whether the file name ends in one of ``suffixes`` (case-insensitive)."""
    return Path(path).name.lower().endswith(suffixes)


def strip_suffix(name: str, suffixes: tuple[str, ...] = SCAN_SUFFIXES) -> str:
    """``name`` without the first matching ending of ``suffixes`` (case-insensitive), else unchanged.

    Example::

        >>> strip_suffix("liver_012.NII.GZ")
        'liver_012'
    """
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name
