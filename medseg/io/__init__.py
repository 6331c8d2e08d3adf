"""Reading scans and writing masks with exact geometry."""

from typing import TYPE_CHECKING

from medseg._lazy import lazy_exports
from medseg.io.geometry import Geometry, NiftiCodes, affine_from_lps, lps_from_affine
from medseg.io.volume import Volume

if TYPE_CHECKING:
    from medseg.io.readers import list_dicom_series, read_volume
    from medseg.io.writers import write_mask, write_volume

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


# readers/writers import SimpleITK and pydicom: loaded on first use
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "read_volume": "medseg.io.readers",
        "list_dicom_series": "medseg.io.readers",
        "write_mask": "medseg.io.writers",
        "write_volume": "medseg.io.writers",
    },
    eager=["Geometry", "NiftiCodes", "Volume", "affine_from_lps", "lps_from_affine"],
)
