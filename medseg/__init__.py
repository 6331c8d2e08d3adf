"""medseg: medical image segmentation with masks that lie exactly on the original scan.

The public API (the front door, :mod:`medseg.api`) is re-exported here and loaded on
first use, so ``import medseg`` and ``medseg --help`` stay fast and do not import torch::

    import medseg
    vol = medseg.read_volume("scan.nii.gz")
    medseg.write_mask(mask, vol.geometry, "mask.nii.gz")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg._lazy import lazy_exports
from medseg.api import EXPORTS, FUNCTIONS, check_dataset, console_progress, infer, train
from medseg.version import __version__

if TYPE_CHECKING:
    from medseg.api import (
        Config,
        Geometry,
        MedsegError,
        OutputSpec,
        Prediction,
        Run,
        Segmenter,
        Volume,
        create_model,
        evaluate,
        export_model,
        list_models,
        load_config,
        read_volume,
        write_mask,
    )

__all__ = [
    "Config",
    "Geometry",
    "MedsegError",
    "OutputSpec",
    "Prediction",
    "Run",
    "Segmenter",
    "Volume",
    "__version__",
    "check_dataset",
    "console_progress",
    "create_model",
    "evaluate",
    "export_model",
    "infer",
    "list_models",
    "load_config",
    "read_volume",
    "train",
    "write_mask",
]

__getattr__, __dir__ = lazy_exports(__name__, EXPORTS, eager=["__version__", *FUNCTIONS])
