"""Dataset folders, checks, fingerprint, plan, preprocessing, caching, transforms and loaders.

Names are imported lazily so that ``import medseg.data`` does not import torch or MONAI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg._lazy import lazy_exports

if TYPE_CHECKING:
    from medseg.data.cache import PreprocessedCache
    from medseg.data.check import CheckReport, check_dataset
    from medseg.data.fingerprint import Fingerprint, compute_fingerprint
    from medseg.data.folders import Case, DatasetIndex, read_case, scan_dataset
    from medseg.data.loaders import PatchBatchSampler, build_train_loader
    from medseg.data.plan import ChannelNorm, Plan, load_plan, make_plan, save_plan
    from medseg.data.preprocess import PreprocessedCase, PreprocessRecord, preprocess_case, restore_mask
    from medseg.data.splits import load_splits, make_splits, save_splits
    from medseg.data.transforms import build_train_transforms, build_val_transforms

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

__all__ = [
    "Case",
    "ChannelNorm",
    "CheckReport",
    "DatasetIndex",
    "Fingerprint",
    "PatchBatchSampler",
    "Plan",
    "PreprocessRecord",
    "PreprocessedCache",
    "PreprocessedCase",
    "build_train_loader",
    "build_train_transforms",
    "build_val_transforms",
    "check_dataset",
    "compute_fingerprint",
    "load_plan",
    "load_splits",
    "make_plan",
    "make_splits",
    "preprocess_case",
    "read_case",
    "restore_mask",
    "save_plan",
    "save_splits",
    "scan_dataset",
]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
