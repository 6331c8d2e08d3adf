"""On-disk cache of preprocessed cases: ``.npy`` arrays plus a JSON record with the geometry.

Layout: ``<cache_dir>/plan-<key>/<case>.image.npy`` (float32 ``(C, *spatial)``),
``<case>.label.npy`` (uint8/int16 class indices ``(1, *spatial)``),
``<case>.locs.npy`` (int32 rows ``[class, *voxel]``: up to
:data:`LOCATIONS_PER_CLASS` sampled voxels per foreground class, for
class-balanced patch sampling) and ``<case>.json`` (the
:class:`~medseg.data.preprocess.PreprocessRecord` and the source files'
sizes and modification times).

``<key>`` hashes the plan fields that change preprocessing (orientation,
target spacing, normalisation, crop, labels, channels) and
:data:`~medseg.data.preprocess.PREPROCESS_VERSION` (the resampling rules), so a
new plan or a new medseg preprocessing rule gets a new folder and an old one is never reused by mistake; a changed source file
(size or mtime) makes its entry stale. Files are written to a temporary name
and renamed, the JSON last, so an interrupted run never leaves a half entry
that looks complete. Arrays are loaded with ``allow_pickle=False`` and
memory-mapped. The cache is never inside the dataset folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.folders import Case, read_case, safe_case_id
from medseg.data.plan import Plan
from medseg.data.preprocess import PREPROCESS_VERSION, PreprocessRecord, preprocess_case
from medseg.errors import DatasetError
from medseg.io.atomic import atomic_path
from medseg.records import field_problems, read_json

__all__ = ["CACHE_FORMAT_VERSION", "LOCATIONS_PER_CLASS", "CachedCase", "PreprocessedCache", "plan_cache_key"]

CACHE_FORMAT_VERSION = 1
LOCATIONS_PER_CLASS = 10_000
_PREPROCESS_FIELDS = (
    "format_version", "data_dims", "image_channels", "label_values", "ignore_label", "orientation",
    "target_spacing", "normalization", "crop_to_nonzero",
)
_log = logging.getLogger(__name__)


def plan_cache_key(plan: Plan) -> str:
    """Hash of the plan fields that affect preprocessing and of the preprocessing rules' version (16 hex digits)."""
    d = plan.to_dict()
    payload = {
        "cache_format": CACHE_FORMAT_VERSION,
        "preprocess_version": PREPROCESS_VERSION,
        **{k: d[k] for k in _PREPROCESS_FIELDS},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _source_signature(case: Case) -> list[list[Any]]:
    """(name, size, mtime_ns) of every source file; DICOM folders list their files."""
    out = []
    for path in [*case.image_paths, *([case.label_path] if case.label_path is not None else [])]:
        if path.is_dir():
            for f in sorted(p for p in path.iterdir() if p.is_file()):
                st = f.stat()
                out.append([str(f), st.st_size, st.st_mtime_ns])
        else:
            st = path.stat()
            out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


@dataclass(frozen=True)
class CacheEntryRecord:
    """``<case>.json``: the fields and types every entry's record must have (checked on each read)."""

    cache_format: int
    case_id: str
    plan_key: str
    sources: list[list[Any]]
    has_label: bool
    record: dict[str, Any]


@dataclass(frozen=True, eq=False)
class CachedCase:
    """A preprocessed case as stored in the cache (arrays memory-mapped, read-only).

    Attributes:
        case_id: the case.
        image: float32 ``(C, *spatial)`` on the plan grid.
        label: class indices ``(1, *spatial)`` or ``None``.
        record: how the case was preprocessed (to undo it).
        locations: class index -> ``(N, ndim)`` sampled voxel coordinates.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    record: PreprocessRecord
    locations: dict[int, np.ndarray]


def sample_class_locations(label: np.ndarray, *, case_id: str, per_class: int = LOCATIONS_PER_CLASS) -> np.ndarray:
    """Rows ``[class, *voxel]`` (int32): up to ``per_class`` seeded random voxels of each foreground class."""
    rng = np.random.default_rng(1234 + zlib.crc32(case_id.encode()))
    ndim = label.ndim - 1
    rows = [np.zeros((0, 1 + ndim), dtype=np.int32)]
    for value in np.unique(label):
        if value == 0:
            continue
        coords = np.argwhere(label[0] == value)
        if len(coords) > per_class:
            coords = coords[np.sort(rng.choice(len(coords), per_class, replace=False))]
        rows.append(np.column_stack([np.full(len(coords), value), coords]).astype(np.int32))
    return np.concatenate(rows)


def locations_by_class(rows: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): rows[rows[:, 0] == c, 1:] for c in np.unique(rows[:, 0])} if len(rows) else {}


class PreprocessedCache:
    """Preprocess each case once per plan and keep the result on disk.

    Args:
        cache_dir: the cache folder (created if needed).
        plan: the plan; its preprocessing fields choose the sub-folder.
        dataset_root: the dataset folder; the cache may not be inside it
            (inputs are never modified).

    Example::

        cache = PreprocessedCache(run_dir.parent / ".cache", plan, dataset_root=index.root)
        case = cache.get(index.cases[0])      # preprocesses, or loads from disk
        case.image.shape, case.record.final_geometry.spacing
    """

    def __init__(self, cache_dir: str | Path, plan: Plan, *, dataset_root: str | Path | None = None) -> None:
        cache_dir = Path(cache_dir).expanduser().resolve()
        if dataset_root is not None:
            root = Path(os.path.realpath(dataset_root))
            if os.path.commonpath([str(cache_dir), str(root)]) == str(root):
                raise DatasetError(
                    f"cache folder {cache_dir} is inside the dataset folder {root}; medseg never writes into a "
                    "dataset. Set data.cache_dir to a folder outside it."
                )
        self.plan = plan
        self.key = plan_cache_key(plan)
        self.folder = cache_dir / f"plan-{self.key}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ paths
    def paths(self, case_id: str) -> dict[str, Path]:
        stem = safe_case_id(case_id)
        return {
            "image": self.folder / f"{stem}.image.npy",
            "label": self.folder / f"{stem}.label.npy",
            "locs": self.folder / f"{stem}.locs.npy",
            "json": self.folder / f"{stem}.json",
        }

    def is_fresh(self, case: Case) -> bool:
        """True when the case's entry exists and its sources are unchanged."""
        meta = self._read_meta(case)
        return meta is not None

    def _read_meta(self, case: Case) -> dict | None:
        """The entry's record, or None when it is missing or stale (sources changed, another plan)."""
        paths = self.paths(case.case_id)
        if not paths["json"].is_file():
            return None
        meta = self._parse_meta(paths["json"])
        try:
            signature = _source_signature(case)
        except OSError:
            return None
        if meta["plan_key"] != self.key or meta["sources"] != signature or meta["case_id"] != case.case_id:
            return None
        if not paths["image"].is_file() or (meta["has_label"] and not paths["label"].is_file()):
            return None
        return meta

    def _parse_meta(self, path: Path) -> dict[str, Any]:
        """Read an entry's JSON record and check it against :class:`CacheEntryRecord`.

        Raises:
            DatasetError: unreadable, not JSON, or a field missing or of the wrong type (named).
        """

        meta = read_json(path, DatasetError, "cache entry", self._remedy())
        problems = field_problems(CacheEntryRecord, meta)
        if problems:
            raise DatasetError(f"cache entry {path} is damaged: {'; '.join(problems)}. {self._remedy()}")
        return meta

    def _remedy(self) -> str:
        return f"The cache was changed outside medseg; delete {self.folder} (it is rebuilt from the dataset) and run again."

    # ------------------------------------------------------------------ access
    def get(self, case: Case, *, mmap: bool = True) -> CachedCase:
        """Load the case from the cache, preprocessing it first when missing or stale."""
        meta = self._read_meta(case)
        if meta is None:
            self.misses += 1
            self._write(case)
            meta = self._read_meta(case)
            if meta is None:
                raise DatasetError(f"cache entry for case {case.case_id!r} in {self.folder} could not be read back.")
        else:
            self.hits += 1
        return self._load(case.case_id, meta, mmap=mmap)

    def prepare(self, cases: Sequence[Case]) -> list[Path]:
        """Preprocess every case that is missing or stale; returns their JSON record paths."""
        out = []
        for n, case in enumerate(cases):
            if self._read_meta(case) is None:
                _log.info("preprocessing %d/%d: %s", n + 1, len(cases), case.case_id)
                self.misses += 1
                self._write(case)
            else:
                self.hits += 1
            out.append(self.paths(case.case_id)["json"])
        return out

    def load(self, case_id: str, *, mmap: bool = True) -> CachedCase:
        """Load an entry by id without checking its sources (for loader workers after :meth:`prepare`).

        Raises:
            DatasetError: the entry is missing (call :meth:`prepare` first) or damaged (the file is named).
        """
        paths = self.paths(case_id)
        if not paths["json"].is_file():
            raise DatasetError(f"cache entry {paths['json']} is missing; call prepare() first.")
        return self._load(case_id, self._parse_meta(paths["json"]), mmap=mmap)

    def _load(self, case_id: str, meta: dict, *, mmap: bool) -> CachedCase:
        paths = self.paths(case_id)
        image = self._load_npy(paths["image"], mmap=mmap)
        spatial = image.shape[1:]
        if image.ndim not in (3, 4) or image.dtype.kind != "f":
            raise DatasetError(
                f"cache entry {paths['image']} holds {image.dtype} {image.shape}; expected float (C, *spatial). "
                f"{self._remedy()}"
            )
        label = self._load_npy(paths["label"], mmap=mmap) if meta["has_label"] else None
        if label is not None and (label.shape != (1, *spatial) or label.dtype.kind not in "iu"):
            raise DatasetError(
                f"cache entry {paths['label']} holds {label.dtype} {label.shape}; expected integer {(1, *spatial)}. "
                f"{self._remedy()}"
            )
        if paths["locs"].is_file():
            rows = self._load_npy(paths["locs"], mmap=False)
            if rows.ndim != 2 or rows.shape[1] != 1 + len(spatial) or rows.dtype.kind not in "iu":
                raise DatasetError(
                    f"cache entry {paths['locs']} holds {rows.dtype} {rows.shape}; expected integer rows "
                    f"(N, {1 + len(spatial)}). {self._remedy()}"
                )
        else:
            rows = np.zeros((0, 1 + len(spatial)), dtype=np.int32)
        try:
            record = PreprocessRecord.from_dict(meta["record"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DatasetError(
                f"cache entry {paths['json']} has a damaged 'record' ({type(err).__name__}: {err}). {self._remedy()}"
            ) from err
        return CachedCase(case_id=case_id, image=image, label=label, record=record, locations=locations_by_class(rows))

    def _load_npy(self, path: Path, *, mmap: bool) -> np.ndarray:
        """``np.load`` without pickle; a file that is not a plain ``.npy`` array is refused, naming it."""
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DatasetError(f"cache entry {path} is not a readable array ({err}). {self._remedy()}") from err
        if not isinstance(array, np.ndarray) or array.dtype.fields is not None:
            raise DatasetError(f"cache entry {path} is not a plain .npy array. {self._remedy()}")
        return array

    # ------------------------------------------------------------------ writing
    def _write(self, case: Case) -> None:
        signature = _source_signature(case)
        image_vol, label_vol = read_case(case)
        label = None if label_vol is None else label_vol.array
        if label is not None and label.shape[0] != 1:
            raise DatasetError(f"case {case.case_id!r}: label has {label.shape[0]} channels; expected one label map.")
        result = preprocess_case(image_vol, self.plan, label=label)
        paths = self.paths(case.case_id)
        self._save_npy(paths["image"], result.image)
        if result.label is not None:
            self._save_npy(paths["label"], result.label)
            self._save_npy(paths["locs"], sample_class_locations(result.label, case_id=case.case_id))
        meta = {
            "cache_format": CACHE_FORMAT_VERSION,
            "case_id": case.case_id,
            "plan_key": self.key,
            "sources": signature,
            "has_label": result.label is not None,
            "record": result.record.to_dict(),
        }
        self._atomic(paths["json"], lambda fh: fh.write(json.dumps(meta).encode()))

    def _save_npy(self, path: Path, array: np.ndarray) -> None:
        self._atomic(path, lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False))

    def _atomic(self, path: Path, write: Any) -> None:
        # a cache is rebuildable: no fsync (it would cost a disk flush per array)
        with atomic_path(path, overwrite=True, fsync=False) as temp, open(temp, "wb") as fh:
            write(fh)
