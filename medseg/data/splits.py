"""Cross-validation splits by case (or by patient), saved as ``splits.json``.

k-fold with a fixed seed (5 folds, seed 12345 by default, as nnU-Net): the
sorted group ids (patient ids when known and ``group_by_patient``, else case
ids) are shuffled with ``numpy.random.default_rng(seed)`` and dealt into
``num_folds`` nearly equal folds; fold ``k`` validates on group chunk ``k``.
With fewer groups than folds: leave-one-out (one fold per group) with a
warning; with a single case: one split that trains and validates on it
("all"), with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.folders import Case, DatasetIndex
from medseg.errors import DatasetError
from medseg.io.atomic import write_json_atomic
from medseg.records import read_json

__all__ = ["load_splits", "make_splits", "save_splits", "select_split"]

Split = dict[str, list[str]]


def _cases(index_or_cases: DatasetIndex | Sequence[Case]) -> list[Case]:
    return list(index_or_cases.cases if isinstance(index_or_cases, DatasetIndex) else index_or_cases)


def make_splits(
    index_or_cases: DatasetIndex | Sequence[Case],
    *,
    num_folds: int = 5,
    seed: int = 12345,
    group_by_patient: bool = True,
) -> list[Split]:
    """k-fold splits by case; ``[{"train": [case ids], "val": [case ids]}, ...]``.

    Args:
        index_or_cases: the dataset (its training cases) or a list of cases.
        num_folds: folds wanted.
        seed: shuffle seed (the same seed and cases give the same splits).
        group_by_patient: keep cases with the same ``patient_id`` in one fold.

    Raises:
        DatasetError: no cases, or ``num_folds < 1``.
    """
    cases = _cases(index_or_cases)
    if not cases:
        raise DatasetError("cannot split an empty dataset: no training cases.")
    if num_folds < 1:
        raise DatasetError(f"num_folds must be >= 1, got {num_folds}.")
    groups: dict[str, list[str]] = {}
    for case in cases:
        key = case.patient_id if (group_by_patient and case.patient_id) else f"case:{case.case_id}"
        groups.setdefault(key, []).append(case.case_id)
    keys = sorted(groups)
    all_ids = sorted(c.case_id for c in cases)
    if len(keys) == 1 or num_folds == 1:
        if len(keys) == 1 and num_folds > 1:
            warnings.warn(
                f"only one {'patient' if group_by_patient and cases[0].patient_id else 'case'}: no cross-validation "
                "possible; using one split that trains and validates on all cases ('all').",
                stacklevel=2,
            )
        return [{"train": all_ids, "val": all_ids}]
    if len(keys) < num_folds:
        warnings.warn(
            f"{len(keys)} groups for {num_folds} folds: falling back to leave-one-out ({len(keys)} folds).",
            stacklevel=2,
        )
        num_folds = len(keys)
    order = np.random.default_rng(seed).permutation(len(keys))
    chunks = np.array_split(order, num_folds)
    splits = []
    for chunk in chunks:
        val = sorted(i for k in chunk for i in groups[keys[int(k)]])
        val_set = set(val)
        splits.append({"train": [i for i in all_ids if i not in val_set], "val": val})
    return splits


def select_split(splits: list[Split], fold: int | str) -> Split:
    """The split for ``fold`` (an index) or ``'all'`` (train and validate on everything).

    Raises:
        DatasetError: the fold is out of range.
    """
    if fold == "all":
        ids = sorted({i for s in splits for i in s["train"] + s["val"]})
        return {"train": ids, "val": ids}
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise DatasetError(f"fold {fold!r} does not exist: there are {len(splits)} folds (0..{len(splits) - 1}) or 'all'.")
    return splits[fold]


def save_splits(splits: list[Split], path: str | Path) -> None:
    """Write ``splits.json`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(splits, path, overwrite=True)


def load_splits(path: str | Path, *, case_ids: Sequence[str] | None = None) -> list[Split]:
    """Read and validate a splits file (``[{"train": [...], "val": [...]}, ...]``).

    Args:
        path: the JSON file.
        case_ids: when given, every id in the file must be one of them.

    Raises:
        DatasetError: unreadable, malformed, or naming unknown cases.
    """
    path = Path(path)
    data: Any = read_json(path, DatasetError, "splits file")
    if not isinstance(data, list) or not data:
        raise DatasetError(f"splits file {path} must hold a non-empty list of {{\"train\": [...], \"val\": [...]}}.")
    known = set(case_ids) if case_ids is not None else None
    splits = []
    for n, item in enumerate(data):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), list) for k in ("train", "val")):
            raise DatasetError(f"splits file {path}: entry {n} must have 'train' and 'val' lists of case ids.")
        split = {"train": [str(i) for i in item["train"]], "val": [str(i) for i in item["val"]]}
        if not split["train"]:
            raise DatasetError(f"splits file {path}: fold {n} has no training cases.")
        if known is not None:
            unknown = sorted(set(split["train"] + split["val"]) - known)
            if unknown:
                raise DatasetError(
                    f"splits file {path}: fold {n} names cases not in the dataset: {', '.join(unknown[:5])}"
                    + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
                )
        splits.append(split)
    return splits
