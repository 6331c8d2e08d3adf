"""Training loaders: balanced patches from the preprocessed cache, reproducible and resumable.

Every random choice of sample ``i`` (which case, which patch, which
augmentation) is drawn from a generator seeded with ``(seed, i)``, where
``i = batch * batch_size + position``. So the batches depend only on the seed
and the batch index: not on the number of workers, their scheduling, or
whether training was interrupted. The :class:`PatchBatchSampler` says which
batch indices an epoch covers; its ``state_dict()`` (seed, epoch, offset) is
all a checkpoint needs to resume bitwise-exactly.

Example::

    loader = build_train_loader(index, plan, cache=cache, data=cfg.data, augmentation=cfg.augment, fold=0)
    for epoch in range(start_epoch, max_epochs):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:          # iterations_per_epoch batches
            batch["image"]            # (B, C, *patch) float32
            batch["label"]            # (B, 1, *patch) int64
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medseg.data.cache import CachedCase, PreprocessedCache
from medseg.data.folders import Case, DatasetIndex
from medseg.data.plan import Plan
from medseg.data.splits import load_splits, make_splits, select_split
from medseg.errors import DatasetError
from medseg.settings import AugmentConfig, DataConfig, TrainConfig

__all__ = ["PatchBatchSampler", "PatchDataset", "build_train_loader", "default_num_workers", "seed_worker"]

_log = logging.getLogger(__name__)
_VIRTUAL_LENGTH = 2**62


def default_num_workers() -> int:
    """Loader worker processes: one per spare core, at most 4 (0 on a single core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed python, numpy and torch in each worker from the loader's generator.

    The loader's patches do not depend on these seeds (each sample reseeds its
    own generator); this only makes any other randomness in a worker repeatable.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    del worker_id


class PatchDataset(Dataset):
    """Sample ``i`` is a random patch of a random case, drawn from a generator seeded with ``(seed, i)``.

    Args:
        cache: the prepared cache (every case in ``case_ids`` must be in it).
        case_ids: training cases.
        transform: from :func:`build_train_transforms` (a MONAI ``Compose``).
        seed: base seed.
    """

    def __init__(self, cache: PreprocessedCache, case_ids: Sequence[str], transform: Any, *, seed: int) -> None:
        if not case_ids:
            raise DatasetError("no training cases for the loader; check the split / fold.")
        self.cache = cache
        self.case_ids = list(case_ids)
        self.transform = transform
        self.seed = int(seed)
        self._loaded: dict[str, CachedCase] = {}

    def __len__(self) -> int:
        return _VIRTUAL_LENGTH

    def _case(self, case_id: str) -> CachedCase:
        case = self._loaded.get(case_id)
        if case is None:
            case = self.cache.load(case_id, mmap=True)
            self._loaded[case_id] = case
        return case

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, int(index)])
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        case = self._case(case_id)
        self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        data = {"image": case.image, "label": case.label, "locations": case.locations}
        # one thread, as in a worker process: reductions (blur, gamma statistics) then give the
        # same bits whatever the number of workers
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            out = self.transform(data)
        finally:
            if threads != 1:
                torch.set_num_threads(threads)
        return {"image": out["image"], "label": out["label"], "case_id": case_id, "patch_class": out["patch_class"]}


class PatchBatchSampler(Sampler):
    """Yields lists of global sample indices, one list per batch.

    Batch ``b`` holds samples ``b * batch_size ... b * batch_size + batch_size - 1``.
    With ``iterations_per_epoch`` set, epoch ``e`` covers batches
    ``e * iterations_per_epoch + offset ... (e + 1) * iterations_per_epoch - 1``
    and the epoch counter moves on when an epoch has been fully handed out;
    without it, iteration is infinite from batch ``offset``.

    State for checkpoints: :meth:`state_dict` / :meth:`load_state_dict`; resume
    mid-epoch with ``set_epoch(epoch, offset=batches_done)``.
    """

    def __init__(self, batch_size: int, *, iterations_per_epoch: int | None, epoch: int = 0, offset: int = 0) -> None:
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = int(batch_size)
        self.iterations_per_epoch = iterations_per_epoch
        self.epoch = int(epoch)
        self.offset = int(offset)

    def set_epoch(self, epoch: int, *, offset: int = 0) -> None:
        self.epoch, self.offset = int(epoch), int(offset)

    def state_dict(self) -> dict[str, int | None]:
        return {"epoch": self.epoch, "offset": self.offset, "batch_size": self.batch_size,
                "iterations_per_epoch": self.iterations_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["batch_size"]) != self.batch_size:
            raise DatasetError(f"loader state has batch_size {state['batch_size']}, this loader {self.batch_size}.")
        self.set_epoch(int(state["epoch"]), offset=int(state.get("offset", 0)))

    def __len__(self) -> int:
        if self.iterations_per_epoch is None:
            return _VIRTUAL_LENGTH
        return max(0, self.iterations_per_epoch - self.offset)

    def __iter__(self) -> Iterator[list[int]]:
        ipe = self.iterations_per_epoch
        if ipe is None:
            batch = self.offset
            while True:
                yield self._batch(batch)
                batch += 1
        first = self.epoch * ipe + self.offset
        for batch in range(first, (self.epoch + 1) * ipe):
            yield self._batch(batch)
        self.epoch, self.offset = self.epoch + 1, 0

    def _batch(self, batch: int) -> list[int]:
        return list(range(batch * self.batch_size, (batch + 1) * self.batch_size))


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([i["image"] for i in items]),
        "label": torch.stack([i["label"] for i in items]),
        "case_id": [i["case_id"] for i in items],
        "patch_class": torch.as_tensor([i["patch_class"] for i in items]),
    }


def _train_ids(index_or_cases: DatasetIndex | Sequence[Case], data: DataConfig, split: dict | None,
               fold: int | str | None) -> tuple[list[Case], list[str]]:
    cases = list(index_or_cases.cases if isinstance(index_or_cases, DatasetIndex) else index_or_cases)
    if split is None and fold is not None:
        if data.splits_file:
            splits = load_splits(data.splits_file, case_ids=[c.case_id for c in cases])
        else:
            splits = make_splits(cases, num_folds=data.num_folds, seed=data.split_seed,
                                 group_by_patient=data.group_by_patient)
        split = select_split(splits, fold)
    ids = [c.case_id for c in cases] if split is None else list(split["train"])
    known = {c.case_id: c for c in cases}
    missing = [i for i in ids if i not in known]
    if missing:
        raise DatasetError(f"split names cases that are not in the dataset: {', '.join(missing[:5])}.")
    return [known[i] for i in ids], ids


def build_train_loader(
    index_or_cases: DatasetIndex | Sequence[Case],
    plan: Plan,
    *,
    cache: PreprocessedCache,
    data: DataConfig | None = None,
    augmentation: AugmentConfig | None = None,
    split: dict[str, list[str]] | None = None,
    fold: int | str | None = None,
    seed: int | None = None,
    num_workers: int | None = None,
    iterations_per_epoch: int | None = -1,
    augment: bool = True,
) -> DataLoader:
    """A DataLoader of balanced, augmented patches: ``{"image": (B, C, *patch) float32, "label": (B, 1, *patch) int64}``.

    Args:
        index_or_cases: the dataset (or a list of cases).
        plan: the plan (patch and batch size, sampling ratios).
        cache: where preprocessed cases live; missing ones are preprocessed now.
        data: the ``data`` settings (folds, split seed, splits file, workers); ``None``: defaults.
        augmentation: the ``augment`` settings; ``None``: defaults.
        split: ``{"train": [...], ...}``: train on these case ids. Overrides ``fold``.
        fold: fold index or ``'all'``: the split comes from ``data.splits_file``
            or :func:`make_splits` with ``data``'s folds and split seed.
            Neither split nor fold: all cases.
        seed: base seed of the patches (default: ``train.seed``'s default).
        num_workers: worker processes (default: ``data.num_workers``,
            else :func:`default_num_workers`).
        iterations_per_epoch: batches per epoch; ``-1`` (default):
            ``train.iterations_per_epoch``'s default; ``None``: infinite.
        augment: ``False`` samples patches without augmentation.

    Returns:
        The loader; ``loader.batch_sampler`` is the :class:`PatchBatchSampler`
        (``set_epoch``, ``state_dict``, ``load_state_dict``).
    """
    from medseg.data.transforms import build_train_transforms, build_val_transforms

    data = data if data is not None else DataConfig()
    cases, ids = _train_ids(index_or_cases, data, split, fold)
    cache.prepare(cases)
    transform = build_train_transforms(plan, augmentation) if augment else build_val_transforms(plan)
    seed = int(TrainConfig().seed if seed is None else seed)
    dataset = PatchDataset(cache, ids, transform, seed=seed)
    if iterations_per_epoch == -1:
        iterations_per_epoch = int(TrainConfig().iterations_per_epoch)
    sampler = PatchBatchSampler(plan.batch_size, iterations_per_epoch=iterations_per_epoch)
    workers = num_workers if num_workers is not None else data.num_workers
    workers = default_num_workers() if workers is None else int(workers)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
