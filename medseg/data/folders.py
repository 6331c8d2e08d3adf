"""Dataset folders: recognise the layout, list the cases, keep every path inside the root.

Four layouts are recognised without flags (see docs/datasets.md):

* ``msd``: Medical Segmentation Decathlon. ``dataset.json`` with ``training``
  (``[{"image": ..., "label": ...}]``), ``labels`` (value -> name) and
  ``modality`` (channel -> name). A 4D image holds the channels. macOS ``._*``
  files are ignored.
* ``nnunet``: nnU-Net v2 raw. ``imagesTr/CASE_0000.nii.gz`` (one file per
  channel), ``labelsTr/CASE.nii.gz``, ``dataset.json`` with ``channel_names``,
  ``labels`` (name -> value) and ``file_ending``. 2D images follow nnU-Net's
  convention: ``imagesTr/CASE_0000.png`` holds all three channels of an RGB
  image, ``labelsTr/CASE.png`` the integer labels.

Every layout takes 2D images (``.png``, ``.jpg``, ``.tif``, ``.bmp``; read by
:mod:`medseg.io.images2d`) as well as scans.
* ``plain``: ``images/`` and ``labels/`` (or ``masks/``) with matching names; a
  case may be a DICOM series folder. An optional ``dataset.json`` may declare
  ``labels`` and ``channel_names``.
* ``list``: a CSV or JSON list of image/label paths (``dataset.csv``,
  ``dataset.json`` holding a list, or the list file passed directly).

``dataset.json`` and list files are untrusted input: every path is resolved
(symlinks included) and must stay inside the dataset root.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.errors import DatasetError, GeometryError, MedsegError
from medseg.io.formats import SCAN_SUFFIXES, strip_suffix
from medseg.records import read_json

__all__ = [
    "SCAN_EXTENSIONS",
    "Case",
    "DatasetIndex",
    "check_case_id",
    "parse_labels",
    "read_case",
    "resolve_inside",
    "safe_case_id",
    "scan_dataset",
    "strip_extension",
]

SCAN_EXTENSIONS = SCAN_SUFFIXES  # the scan endings (medseg.io.formats)
Layout = Literal["msd", "nnunet", "plain", "list"]
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_MAX_JSON_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One training (or test) case.

    Attributes:
        case_id: identifier (file name without extension and channel suffix).
        image_paths: one path per channel file, or a single path holding all
            channels (a 4D NIfTI, or a DICOM series folder).
        label_path: the label map, or ``None`` for test cases.
        patient_id: optional patient identifier (cases of one patient stay in
            one fold).
        root: the dataset root; the data files named by ``.mhd``/``.nhdr``
            headers must lie inside it (``None``: beside each header).
        resample_tilt: DICOM series acquired with gantry tilt are resampled onto
            a regular grid when read (``data.resample_tilt``; docs/geometry.md)
            instead of refused.
    """

    case_id: str
    image_paths: list[Path]
    label_path: Path | None = None
    patient_id: str | None = None
    root: Path | None = None
    resample_tilt: bool = False


@dataclass(frozen=True)
class DatasetIndex:
    """What :func:`scan_dataset` found in a dataset folder.

    Attributes:
        root: the dataset folder (resolved).
        layout: ``'msd'``, ``'nnunet'``, ``'plain'`` or ``'list'``.
        cases: training cases (with labels), in a stable sorted order.
        test_cases: cases without labels (``imagesTs``), if any.
        label_values: declared label values (sorted, 0 first) or ``None`` when
            the folder does not declare them (they are then read from the data).
        label_names: name per declared value (same order), or ``None``.
        channel_names: declared modality per channel (e.g. ``["CT"]``) or ``None``.
        file_ending: nnU-Net ``file_ending`` (e.g. ``".nii.gz"``), if declared.
        name: dataset name from ``dataset.json``, else the folder name.
        source: the file the cases were listed from (dataset.json or a list).
        problems: entries refused while listing (a path leaving the root, an
            unsafe case id, a malformed entry); their cases are left out. Only
            :func:`scan_dataset` with ``collect_problems=True`` returns them,
            otherwise it raises.
    """

    root: Path
    layout: Layout
    cases: list[Case]
    test_cases: list[Case] = field(default_factory=list)
    label_values: list[int] | None = None
    label_names: list[str] | None = None
    channel_names: list[str] | None = None
    file_ending: str | None = None
    name: str = ""
    source: Path | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def num_channels(self) -> int | None:
        """Declared channel count, or ``None`` when undeclared."""
        return None if self.channel_names is None else len(self.channel_names)

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def relative(self, path: Path | None) -> str:
        """A path relative to the root, for messages."""
        if path is None:
            return "-"
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DatasetError(f"case {case_id!r} is not in dataset {self.root} ({len(self.cases)} cases).")


# --------------------------------------------------------------------------- paths


def strip_extension(name: str) -> str:
    """File name without a known scan extension (``.nii.gz``, ``.nrrd`` ...)."""
    return strip_suffix(name)


def _is_scan_name(path: Path) -> bool:
    return path.name.lower().endswith(SCAN_EXTENSIONS)


def _is_image_name(path: Path) -> bool:
    from medseg.io.images2d import is_image_path

    return is_image_path(path)


def _is_junk(path: Path) -> bool:
    """macOS resource forks (``._x``), hidden files and Finder/Windows metadata."""
    name = path.name
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def resolve_inside(root: Path, value: Any, *, source: str) -> Path:
    """Resolve a path from an untrusted list so that it stays inside ``root``.

    Args:
        root: the resolved dataset root.
        value: the path as written in ``dataset.json`` or a list file.
        source: where the value came from, for the message.

    Raises:
        DatasetError: the value is not a string, contains NUL, or resolves
            (after ``..`` and symlinks) outside the root.
    """
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{source}: expected a relative file path, got {value!r}.")
    if "\x00" in value:
        raise DatasetError(f"{source}: path {value!r} contains a NUL byte.")
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = Path(os.path.realpath(candidate))
    root_real = Path(os.path.realpath(root))
    if os.path.commonpath([str(real), str(root_real)]) != str(root_real):
        raise DatasetError(
            f"{source}: path {value!r} resolves to {real}, outside the dataset root {root_real}; "
            "dataset paths must stay inside the dataset folder (no '..', absolute paths or symlinks leaving it)."
        )
    return real


def safe_case_id(case_id: str) -> str:
    """A file-name-safe form of a case id (no ``/``, ``..``, NUL or odd characters).

    Ids that are already safe are returned unchanged; others get their unsafe
    characters replaced and a short hash appended so that two ids never map to
    the same name.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id).strip(".")
    if safe == case_id and safe:
        return safe
    import hashlib

    digest = hashlib.sha256(case_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe or 'case'}-{digest}"


def check_case_id(case_id: str, *, source: str) -> str:
    """Refuse a case id that cannot safely become part of a file name.

    Case ids end up in file names (cache, predictions) and in ``splits.json``;
    an id such as ``../../x`` or ``sub/dir/c1`` is refused, never rewritten.

    Raises:
        DatasetError: the id is empty, contains ``/`` or ``\\``, ``..``, or a control character.
    """
    if not case_id.strip():
        problem = "is empty"
    elif "/" in case_id or "\\" in case_id:
        problem = "contains a path separator"
    elif ".." in case_id:
        problem = "contains '..'"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in case_id):
        problem = "contains a control character"
    else:
        return case_id
    raise DatasetError(
        f"{source}: case id {case_id!r} {problem}; case ids become file names and split entries, so they may not "
        "hold path separators, '..' or control characters. Rename the case (e.g. 'sub_dir_c1')."
    )


def _check_inside(root: Path, path: Path, what: str) -> Path:
    """Resolve a path found by listing a folder (a symlink may still point out)."""
    return resolve_inside(root, str(path), source=what)


# --------------------------------------------------------------------------- scanning


def scan_dataset(path: str | Path, *, collect_problems: bool = False, resample_tilt: bool = False) -> DatasetIndex:
    """Recognise a dataset folder's layout and list its cases.

    Args:
        path: the dataset folder, or a CSV/JSON list file (its folder is the root).
        collect_problems: keep going past refused entries (a path leaving the
            root, an unsafe case id, a malformed entry): they are left out and
            listed in ``index.problems``, which :func:`medseg.data.check_dataset`
            reports together with the per-case problems (``medseg check``).
        resample_tilt: read the cases' tilted DICOM series onto a regular grid
            (opt-in, ``data.resample_tilt``) instead of refusing them.

    Returns:
        The :class:`DatasetIndex`. Missing or unreadable files are *not* errors
        here: :func:`medseg.data.check_dataset` reports them all at once.

    Raises:
        DatasetError: the folder does not exist, its layout is not recognised,
            ``dataset.json`` is malformed, or (unless ``collect_problems``) an
            entry is refused; every refused entry is listed.

    Example::

        index = scan_dataset("data/Task09_Spleen")
        index.layout, len(index.cases)   # ('msd', 41)
    """
    index = _scan(Path(path).expanduser())
    if index.problems and not collect_problems:
        _raise_collected(index.problems, index.root)
    if resample_tilt:
        index = dataclasses.replace(
            index,
            cases=[dataclasses.replace(c, resample_tilt=True) for c in index.cases],
            test_cases=[dataclasses.replace(c, resample_tilt=True) for c in index.test_cases],
        )
    return index


def _scan(path: Path) -> DatasetIndex:
    """:func:`scan_dataset` without raising for refused entries (they are in ``index.problems``)."""
    if path.is_file():
        root = Path(os.path.realpath(path.parent))
        return _scan_list(root, Path(os.path.realpath(path)))
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist; pass the folder that holds dataset.json or images/.")
    root = Path(os.path.realpath(path))
    meta_path = root / "dataset.json"
    meta = _load_json(meta_path) if meta_path.is_file() else None
    if isinstance(meta, list):
        return _scan_list(root, meta_path, entries=meta)
    if isinstance(meta, dict):
        if "training" in meta:
            return _scan_msd(root, meta_path, meta)
        if "file_ending" in meta or (root / "imagesTr").is_dir():
            return _scan_nnunet(root, meta_path, meta)
        if isinstance(meta.get("cases"), list):
            return _scan_list(root, meta_path, entries=meta["cases"], meta=meta)
    elif meta is not None:
        raise DatasetError(f"{meta_path} must hold a JSON object or list, got {type(meta).__name__}.")
    for images_dir in ("images", "imagesTr"):
        if (root / images_dir).is_dir():
            return _scan_plain(root, root / images_dir, meta)
    lists = sorted(p for p in root.glob("*.csv") if not _is_junk(p))
    if (root / "dataset.csv").is_file():
        lists = [root / "dataset.csv"]
    if len(lists) == 1:
        return _scan_list(root, lists[0], meta=meta)
    found = sorted(p.name for p in root.iterdir() if not _is_junk(p))[:10]
    raise DatasetError(
        f"{root} is not a recognised dataset folder (found: {', '.join(found) or 'nothing'}). Expected one of: "
        "dataset.json + imagesTr/ + labelsTr/ (Medical Segmentation Decathlon or nnU-Net v2), images/ + labels/ "
        "with matching file names, or dataset.csv with image,label columns. See docs/datasets.md."
    )


def _load_json(path: Path) -> Any:
    return read_json(path, DatasetError, "dataset file", max_bytes=_MAX_JSON_BYTES)


def parse_labels(
    labels: Any, source: str, *, allow_regions: bool = False, require_background: bool = True,
    error: type[MedsegError] = DatasetError,
) -> tuple[list[int], list[str], dict[str, list[int]]]:
    """A dataset.json ``labels`` map in either convention -> ``(values, names, regions)``, sorted by value.

    The keys decide the convention: all integers is MSD (``{"0": "background", "1": "liver"}``),
    otherwise nnU-Net v2 (``{"background": 0, "liver": 1}``), where a list value is a region
    (``"whole_tumour": [1, 2, 3]``). Training refuses regions (it needs one value per class);
    evaluation scores them (``allow_regions``). Every reader of dataset labels calls this.

    Raises:
        ``error``: not a map, a key or value of the wrong kind, duplicate values, no background 0
            (when ``require_background``), a region when not allowed, nnU-Net's ``ignore`` label.
    """
    if not isinstance(labels, dict) or not labels:
        raise error(f"{source}: 'labels' must map label values to names, e.g. {{\"0\": \"background\", \"1\": \"liver\"}}, "
                    "or names to values, e.g. {\"background\": 0, \"liver\": 1}.")
    pairs: list[tuple[int, str]] = []
    regions: dict[str, list[int]] = {}
    if all(str(k).strip().lstrip("-").isdigit() for k in labels):  # MSD: value -> name
        pairs = [(int(str(key)), str(name)) for key, name in labels.items()]
    else:  # nnU-Net v2: name -> value (or region)
        for name, value in labels.items():
            if isinstance(value, list):
                if not allow_regions:
                    raise error(
                        f"{source}: label {name!r} is a region ({value}); region-based labels are not supported, "
                        "declare one value per class."
                    )
                if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
                    raise error(f"{source}: region {name!r} must list non-negative label values, got {value}.")
                regions[str(name)] = [int(v) for v in value]
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise error(f"{source}: label {name!r} must be an integer value, got {value!r}.")
            if name == "ignore":
                raise error(
                    f"{source}: the nnU-Net 'ignore' label ({value}) is not supported in dataset.json; "
                    "set loss.ignore_label in the config instead."
                )
            pairs.append((value, str(name)))
    pairs.sort()
    values = [v for v, _ in pairs]
    names = [n for _, n in pairs]
    if len(set(values)) != len(values):
        raise error(f"{source}: label values {values} contain duplicates.")
    if values and values[0] < 0:
        raise error(f"{source}: label values must be >= 0, got {values}.")
    if require_background and (not values or values[0] != 0):
        raise error(f"{source}: labels must include background 0, got values {values}.")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise error(f"{source}: label names {duplicated} are used for several values; names must be unique.")
    return values, names, regions


def _labels_any(labels: Any, source: str) -> tuple[list[int], list[str]]:
    """Training's labels: either convention, no regions (see :func:`parse_labels`)."""
    values, names, _ = parse_labels(labels, source)
    return values, names


def _channel_names(value: Any, source: str) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if not isinstance(value, dict) or not value:
        raise DatasetError(f"{source}: channel names must map channel index to name, e.g. {{\"0\": \"CT\"}}.")
    try:
        items = sorted((int(str(k)), str(v)) for k, v in value.items())
    except ValueError:
        raise DatasetError(f"{source}: channel keys must be integers 0, 1, ..., got {list(value)}.") from None
    if [k for k, _ in items] != list(range(len(items))):
        raise DatasetError(f"{source}: channel keys must be 0..{len(items) - 1}, got {[k for k, _ in items]}.")
    return [v for _, v in items]


def _patient_ids(meta: dict | None, source: str) -> dict[str, str]:
    if not meta or "patient_ids" not in meta:
        return {}
    value = meta["patient_ids"]
    if not isinstance(value, dict):
        raise DatasetError(f"{source}: 'patient_ids' must map case id to patient id.")
    return {str(k): str(v) for k, v in value.items()}


def _sorted_cases(cases: Iterable[Case]) -> list[Case]:
    return sorted(cases, key=lambda c: c.case_id)


def _scan_msd(root: Path, meta_path: Path, meta: dict) -> DatasetIndex:
    src = str(meta_path)
    values, names = _labels_any(meta.get("labels"), src)
    channels = _channel_names(meta["modality"], src) if "modality" in meta else None
    training = meta["training"]
    if not isinstance(training, list):
        raise DatasetError(f"{src}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} entries.")
    patients = _patient_ids(meta, src)
    errors: list[str] = []
    cases = []
    for n, entry in enumerate(training):
        where = f"{src}: training[{n}]"
        if not isinstance(entry, dict) or "image" not in entry:
            errors.append(f"{where} must be an object with 'image' and 'label', got {entry!r:.80}")
            continue
        try:
            image = resolve_inside(root, entry["image"], source=where)
            label = resolve_inside(root, entry["label"], source=where) if entry.get("label") is not None else None
        except DatasetError as err:
            errors.append(str(err))
            continue
        images = [image]
        if not image.exists():
            # nnU-Net v1 / converted MSD: the list names CASE.nii.gz, the files are CASE_0000.nii.gz ...
            images = _channel_files_for(image) or images
        case_id = strip_extension(image.name)
        cases.append(Case(case_id, images, label, patients.get(case_id), root))
    test_cases = []
    for n, entry in enumerate(meta.get("test", []) or []):
        value = entry.get("image") if isinstance(entry, dict) else entry
        try:
            image = resolve_inside(root, value, source=f"{src}: test[{n}]")
        except DatasetError as err:
            errors.append(str(err))
            continue
        test_cases.append(Case(strip_extension(image.name), [image], None, root=root))
    return DatasetIndex(
        root=root,
        layout="msd",
        cases=_sorted_cases(cases),
        test_cases=_sorted_cases(test_cases),
        label_values=values,
        label_names=names,
        channel_names=channels,
        name=str(meta.get("name") or root.name),
        source=meta_path,
        problems=errors,
    )


def _channel_files_for(image: Path) -> list[Path]:
    stem = strip_extension(image.name)
    ending = image.name[len(stem) :]
    files = []
    for c in range(1000):
        candidate = image.with_name(f"{stem}_{c:04d}{ending}")
        if not candidate.exists():
            break
        files.append(candidate)
    return files


def _raise_collected(errors: list[str], root: Path) -> None:
    if len(errors) == 1:
        raise DatasetError(errors[0])
    if errors:
        head = f"{len(errors)} invalid entries in dataset {root}:"
        raise DatasetError("\n".join([head, *(f"  - {e}" for e in errors)]))


def _scan_nnunet(root: Path, meta_path: Path, meta: dict) -> DatasetIndex:
    src = str(meta_path)
    values, names = _labels_any(meta.get("labels"), src)
    channels = _channel_names(meta.get("channel_names") or meta.get("modality"), src)
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DatasetError(f"{src}: file_ending must look like '.nii.gz', got {ending!r}.")
    patients = _patient_ids(meta, src)
    errors: list[str] = []
    if isinstance(meta.get("dataset"), dict):
        cases = []
        for case_id, entry in meta["dataset"].items():
            where = f"{src}: dataset[{case_id!r}]"
            try:
                check_case_id(str(case_id), source=where)
                images = [resolve_inside(root, p, source=where) for p in entry.get("images", [])]
                label = resolve_inside(root, entry["label"], source=where) if entry.get("label") else None
            except (DatasetError, AttributeError) as err:
                errors.append(str(err) if isinstance(err, DatasetError) else f"{where} must be an object")
                continue
            cases.append(Case(str(case_id), images, label, patients.get(str(case_id)), root))
        test_cases: list[Case] = []
    else:
        cases = _nnunet_cases(root, root / "imagesTr", root / "labelsTr", ending, patients, errors)
        test_cases = (
            _nnunet_cases(root, root / "imagesTs", None, ending, {}, errors) if (root / "imagesTs").is_dir() else []
        )
    return DatasetIndex(
        root=root,
        layout="nnunet",
        cases=cases,
        test_cases=test_cases,
        label_values=values,
        label_names=names,
        channel_names=channels,
        file_ending=ending,
        name=str(meta.get("name") or root.name),
        source=meta_path,
        problems=errors,
    )


def _nnunet_cases(
    root: Path, images_dir: Path, labels_dir: Path | None, ending: str, patients: dict[str, str], errors: list[str]
) -> list[Case]:
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: nnU-Net layout expects {images_dir.name}/ with CASE_0000{ending} files.")
    groups: dict[str, dict[int, Path]] = {}
    stray = []
    for p in sorted(images_dir.iterdir()):
        if _is_junk(p) or not p.name.endswith(ending):
            continue
        m = _CHANNEL_SUFFIX.match(p.name[: -len(ending)])
        if not m:
            stray.append(p.name)
            continue
        groups.setdefault(m["case"], {})[int(m["channel"])] = p
    if stray:
        warnings.warn(
            f"{images_dir}: ignored {len(stray)} file(s) without a _XXXX channel suffix (e.g. {stray[0]}); "
            f"nnU-Net images are named CASE_0000{ending}.",
            stacklevel=5,
        )
    cases = []
    for case_id, files in sorted(groups.items()):
        # a gap in channel numbers shows up as a missing file in the check
        n = max(files) + 1
        label = None
        try:
            paths = [
                _check_inside(root, files[c], f"{images_dir.name}/{files[c].name}")
                if c in files
                else images_dir / f"{case_id}_{c:04d}{ending}"
                for c in range(n)
            ]
            if labels_dir is not None:
                label_file = labels_dir / f"{case_id}{ending}"
                label = (
                    _check_inside(root, label_file, f"{labels_dir.name}/{label_file.name}")
                    if label_file.exists()
                    else label_file
                )
        except DatasetError as err:
            errors.append(str(err))
            continue
        cases.append(Case(case_id, paths, label, patients.get(case_id), root))
    return cases


def _scan_plain(root: Path, images_dir: Path, meta: dict | None) -> DatasetIndex:
    labels_dir = next(
        (root / d for d in ("labels", "labelsTr", "masks", "segmentations") if (root / d).is_dir()), None
    )
    src = str(root / "dataset.json")
    values = names = channels = None
    if meta:
        if "labels" in meta:
            values, names = _labels_any(meta["labels"], src)
        if "channel_names" in meta or "modality" in meta:
            channels = _channel_names(meta.get("channel_names") or meta.get("modality"), src)
    patients = _patient_ids(meta, src)
    label_files: dict[str, Path] = {}
    if labels_dir is not None:
        for p in sorted(labels_dir.iterdir()):
            if _is_junk(p) or not (_is_scan_name(p) or p.is_dir()):
                continue
            label_files[strip_extension(p.name)] = p
    groups: dict[str, list[tuple[int, Path]]] = {}
    for p in sorted(images_dir.iterdir()):
        if _is_junk(p) or not (_is_scan_name(p) or p.is_dir()):
            continue
        stem = strip_extension(p.name)
        m = _CHANNEL_SUFFIX.match(stem)
        if m and stem not in label_files and (m["case"] in label_files or labels_dir is None):
            groups.setdefault(m["case"], []).append((int(m["channel"]), p))
        else:
            groups.setdefault(stem, []).append((0, p))
    cases = []
    errors: list[str] = []
    for case_id, files in sorted(groups.items()):
        label = label_files.get(case_id)
        try:
            paths = [_check_inside(root, p, f"{images_dir.name}/{p.name}") for _, p in sorted(files)]
            if label is None and labels_dir is not None:
                # reported as missing by the check; a 2D image's label is expected as PNG
                ending = ".png" if _is_image_name(files[0][1]) else ".nii.gz"
                label = labels_dir / f"{case_id}{ending}"
            elif label is not None:
                label = _check_inside(root, label, f"{labels_dir.name}/{label.name}")
        except DatasetError as err:
            errors.append(str(err))
            continue
        cases.append(Case(case_id, paths, label, patients.get(case_id), root))
    extra = sorted(set(label_files) - set(groups))
    if extra:
        warnings.warn(
            f"{labels_dir}: {len(extra)} label file(s) have no image (e.g. {extra[0]}); they are ignored.",
            stacklevel=4,
        )
    return DatasetIndex(
        root=root,
        layout="plain",
        cases=cases,
        label_values=values,
        label_names=names,
        channel_names=channels,
        name=str((meta or {}).get("name") or root.name),
        source=images_dir,
        problems=errors,
    )


def _scan_list(root: Path, list_path: Path, *, entries: list | None = None, meta: dict | None = None) -> DatasetIndex:
    src = str(list_path)
    if entries is None:
        if list_path.suffix.lower() == ".csv":
            entries = _read_csv(list_path)
        else:
            loaded = _load_json(list_path)
            if isinstance(loaded, dict):
                meta = loaded
                loaded = loaded.get("cases", loaded.get("training"))
            if not isinstance(loaded, list):
                raise DatasetError(f"{src}: expected a list of {{\"image\": ..., \"label\": ...}} entries.")
            entries = loaded
    values = names = channels = None
    if meta:
        if "labels" in meta:
            values, names = _labels_any(meta["labels"], src)
        if "channel_names" in meta or "modality" in meta:
            channels = _channel_names(meta.get("channel_names") or meta.get("modality"), src)
    errors: list[str] = []
    cases = []
    for n, entry in enumerate(entries):
        where = f"{src}: entry {n + 1}"
        if not isinstance(entry, dict):
            errors.append(f"{where} must be an object with 'image' and 'label', got {entry!r:.80}")
            continue
        raw_images = _entry_images(entry)
        if not raw_images:
            errors.append(f"{where} has no 'image' (columns/keys found: {', '.join(map(str, entry)) or 'none'})")
            continue
        try:
            images = [resolve_inside(root, p, source=where) for p in raw_images]
            raw_label = entry.get("label")
            label = resolve_inside(root, raw_label, source=where) if raw_label not in (None, "") else None
        except DatasetError as err:
            errors.append(str(err))
            continue
        try:
            case_id = check_case_id(
                str(entry.get("case_id") or entry.get("id") or strip_extension(images[0].name)), source=where
            )
        except DatasetError as err:
            errors.append(str(err))
            continue
        patient = entry.get("patient_id")
        cases.append(Case(case_id, images, label, str(patient) if patient not in (None, "") else None, root))
    return DatasetIndex(
        root=root,
        layout="list",
        cases=[c for c in cases if c.label_path is not None] or cases,
        test_cases=[c for c in cases if c.label_path is None] if any(c.label_path for c in cases) else [],
        label_values=values,
        label_names=names,
        channel_names=channels,
        name=str((meta or {}).get("name") or root.name),
        source=list_path,
        problems=errors,
    )


def _entry_images(entry: dict) -> list[str]:
    image = entry.get("image")
    if isinstance(image, list):
        return image
    if isinstance(image, str) and image:
        return [image]
    channels = sorted(k for k in entry if re.fullmatch(r"image_\d+", str(k)))
    return [entry[k] for k in channels if entry[k] not in (None, "")]


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read list {path}: {err}") from err
    if not rows:
        raise DatasetError(f"list {path} has no rows; expected a header 'image,label' and one row per case.")
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]


# --------------------------------------------------------------------------- reading


def read_case(case: Case, *, with_label: bool = True) -> tuple[Any, Any | None]:
    """Read a case's image (all channels stacked) and label through ``medseg.io.read_volume``.

    Returns:
        ``(image, label)`` Volumes; ``image.array`` is ``(C, *spatial)``,
        ``label`` is ``None`` when the case has none or ``with_label`` is False.

    Raises:
        ScanReadError: a file cannot be read (corrupt, missing, unsupported).
        GeometryError: the channel files do not lie on the same grid.
    """
    from medseg.io import read_volume
    from medseg.io.images2d import refuse_palette_image
    from medseg.io.volume import Volume

    volumes = [read_volume(p, data_root=case.root, resample_tilt=case.resample_tilt) for p in case.image_paths]
    for v in volumes:
        refuse_palette_image(v, f"the image of case {case.case_id!r}")
    first = volumes[0]
    if len(volumes) > 1:
        for p, v in zip(case.image_paths[1:], volumes[1:]):
            if not first.geometry.same_grid(v.geometry, atol_mm=GEOMETRY_TOLERANCE_MM):
                raise GeometryError(
                    f"case {case.case_id!r}: channel file {p.name} is not on the grid of {case.image_paths[0].name}: "
                    f"{v.geometry.describe_difference(first.geometry)}; every channel must share one grid."
                )
        array = np.concatenate([v.array for v in volumes], axis=0)
        image = Volume(array=array, geometry=first.geometry, path=case.image_paths[0], meta=dict(first.meta))
    else:
        image = first
    label = None
    if with_label and case.label_path is not None:
        label = read_volume(case.label_path, data_root=case.root, resample_tilt=case.resample_tilt)
        refuse_multichannel_label(label)
    return image, label


def refuse_multichannel_label(label: Any) -> None:
    """Refuse a label file with several channels (an RGB/colour label image, a 4D file).

    Raises:
        ScanReadError: ``label.num_channels != 1``.
    """
    from medseg.errors import ScanReadError

    if label.num_channels == 1:
        return
    if label.spatial_dims == 2 and label.meta.get("format") in ("png", "jpeg", "tiff", "bmp"):
        raise ScanReadError(
            f"{label.path}: the label image has {label.num_channels} colour channels ({label.meta.get('mode')}); "
            "a label image must hold one integer class value per pixel (greyscale, 16-bit greyscale or palette "
            "PNG). Convert colour-coded labels to class values first (one value per colour)."
        )
    raise ScanReadError(
        f"{label.path}: the label has {label.num_channels} channels (a 4D file); a label map must be a single "
        "3D/2D volume."
    )


GEOMETRY_TOLERANCE_MM = 0.01
"""Largest distance (mm) between matching field-of-view corners for two grids to count as the same."""


def channel_names_or_default(index: DatasetIndex, num_channels: int) -> list[str]:
    """Declared channel names, or ``channel_0``... when the folder does not declare them."""
    if index.channel_names is not None:
        return list(index.channel_names)
    return [f"channel_{c}" for c in range(num_channels)]


def describe_case_files(index: DatasetIndex, case: Case) -> str:
    images = ", ".join(index.relative(p) for p in case.image_paths)
    return f"image: {images}   label: {index.relative(case.label_path)}"
