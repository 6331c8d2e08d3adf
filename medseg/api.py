"""The Python API for research scripts (the CLI is a thin layer over it).

::

    import medseg
    run = medseg.train("data/Task09_Spleen", medseg.load_config("configs/cpu_quick.yaml"))
    seg = medseg.Segmenter.load(run.model_dir)
    pred = seg.predict("scan.nii.gz")          # Prediction: mask, geometry, statistics
    report = medseg.evaluate("preds/", "labels/")

The names are resolved lazily so that importing medseg does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "train": "medseg.training.run",
    "Run": "medseg.training.run",
    "Segmenter": "medseg.inference.segmenter",
    "Prediction": "medseg.inference.segmenter",
    "evaluate": "medseg.evaluation",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg.api' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
