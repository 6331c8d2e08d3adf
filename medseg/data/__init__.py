"""Dataset folders, checks, fingerprint, plan, preprocessing, caching, transforms and loaders.

Names are imported lazily so that ``import medseg.data`` does not import torch or MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Case": "medseg.data.folders",
    "DatasetIndex": "medseg.data.folders",
    "scan_dataset": "medseg.data.folders",
    "read_case": "medseg.data.folders",
    "CheckReport": "medseg.data.check",
    "check_dataset": "medseg.data.check",
    "Fingerprint": "medseg.data.fingerprint",
    "compute_fingerprint": "medseg.data.fingerprint",
    "ChannelNorm": "medseg.data.plan",
    "Plan": "medseg.data.plan",
    "make_plan": "medseg.data.plan",
    "load_plan": "medseg.data.plan",
    "save_plan": "medseg.data.plan",
    "PreprocessRecord": "medseg.data.preprocess",
    "PreprocessedCase": "medseg.data.preprocess",
    "preprocess_case": "medseg.data.preprocess",
    "restore_mask": "medseg.data.preprocess",
    "PreprocessedCache": "medseg.data.cache",
    "make_splits": "medseg.data.splits",
    "save_splits": "medseg.data.splits",
    "load_splits": "medseg.data.splits",
    "build_train_transforms": "medseg.data.transforms",
    "build_val_transforms": "medseg.data.transforms",
    "build_train_loader": "medseg.data.loaders",
    "PatchBatchSampler": "medseg.data.loaders",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
