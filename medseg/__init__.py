"""medseg: medical image segmentation with masks that lie exactly on the original scan.

The public API is re-exported here lazily, so ``import medseg`` and ``medseg --help``
stay fast and do not import torch::

    import medseg
    vol = medseg.read_volume("scan.nii.gz")
    medseg.write_mask(mask, vol.geometry, "mask.nii.gz")
"""

from __future__ import annotations

import importlib
from typing import Any

from medseg.version import __version__

_EXPORTS = {
    "read_volume": "medseg.io",
    "write_mask": "medseg.io",
    "Volume": "medseg.io",
    "Geometry": "medseg.io",
    "load_config": "medseg.config",
    "Config": "medseg.config",
    "MedsegError": "medseg.errors",
    "train": "medseg.api",
    "Run": "medseg.api",
    "Segmenter": "medseg.api",
    "Prediction": "medseg.api",
    "evaluate": "medseg.api",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
