"""Reading scans and writing masks with exact geometry."""

from medseg.io.geometry import Geometry, NiftiCodes, affine_from_lps, lps_from_affine
from medseg.io.volume import Volume

__all__ = [
    "Geometry",
    "NiftiCodes",
    "Volume",
    "affine_from_lps",
    "list_dicom_series",
    "lps_from_affine",
    "read_volume",
    "write_mask",
    "write_volume",
]


def __getattr__(name: str):
    # readers/writers import SimpleITK and pydicom: load them on first use
    if name in ("read_volume", "list_dicom_series"):
        from medseg.io import readers

        return getattr(readers, name)
    if name in ("write_mask", "write_volume"):
        from medseg.io import writers

        return getattr(writers, name)
    raise AttributeError(f"module 'medseg.io' has no attribute {name!r}")
