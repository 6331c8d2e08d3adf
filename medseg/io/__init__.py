"""Reading scans and writing masks with exact geometry."""

from medseg.io.geometry import Geometry, NiftiCodes, affine_from_lps, lps_from_affine
from medseg.io.volume import Volume

__all__ = ["Geometry", "NiftiCodes", "Volume", "affine_from_lps", "lps_from_affine", "read_volume", "write_mask"]


def __getattr__(name: str):
    # readers/writers import SimpleITK and pydicom: load them on first use
    if name == "read_volume":
        from medseg.io.readers import read_volume

        return read_volume
    if name == "write_mask":
        from medseg.io.writers import write_mask

        return write_mask
    raise AttributeError(f"module 'medseg.io' has no attribute {name!r}")
