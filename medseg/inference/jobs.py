"""The job runner of ``medseg infer``: cases from files, parts, resuming, a manifest, per-case failures.

The predictor (:class:`~medseg.inference.segmenter.Segmenter`) segments one scan
and the output specification (:class:`~medseg.inference.outputs.OutputSpec`)
names, checks and writes its files; this module runs them over a cohort the way
a researcher's 500 scans need (:func:`run_cohort`; :func:`predict_many` is the
same loop that stops at the first error and keeps no manifest):

* **Cases** (:func:`collect_cases`): a file, a DICOM series folder, or a folder of
  them. nnU-Net-layout channel files ``CASE_0000.nii.gz ... CASE_000{C-1}.nii.gz``
  of a ``C``-channel model form one case named ``CASE`` (so ``CASE_mask.nii.gz``
  pairs with ``labelsTs/CASE.nii.gz`` in ``medseg evaluate``); a case missing a
  channel file is refused before anything runs. With a 1-channel model a lone
  ``CASE_0000.nii.gz`` is case ``CASE``; files that only look numbered
  (``scan_0000``, ``scan_0001``, ...) keep their full names. A DICOM folder read
  with ``series_uid`` is named ``FOLDER_<last 8 hex digits of sha256(uid)>``, so two
  series of one folder never share output names.
* **Parts** (:func:`select_part`): case ``i`` of the cohort sorted by case name
  belongs to part ``i mod N`` (round-robin), so ``N`` processes or cluster jobs
  share a cohort with no overlap and similar loads.
* **Resuming** (``resume=True``, ``--continue``): a case whose outputs are complete
  (:func:`incomplete_reason` finds nothing wrong) is skipped; the others are done
  again. Without ``resume`` or ``overwrite`` an existing output is refused
  before any work starts, as before.
* **Failures**: a case that cannot be read or segmented (unreadable, wrong
  dimensionality or channels, refused geometry, out of memory) is recorded with
  its one-line reason and the run goes on; problems of the output folder (not
  writable, disk full) stop the run.
* **Manifest** (:data:`MANIFEST_NAME` ``.csv`` and ``.json`` in the output folder,
  rewritten atomically after every case): case, input, outputs, status, seconds,
  QC flags (:mod:`medseg.inference.quality`) and the error of a failed case.
  Rows of an earlier run into the same folder for cases not in this run are kept.
  With ``anonymize`` it holds no input path. With parts each part writes its own
  ``infer_manifest_part{K}of{N}``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import (
    ConfigError,
    MedsegError,
    OutputWriteError,
    ScanReadError,
)
from medseg.inference.outputs import OutputSpec, check_output_space, output_bytes
from medseg.inference.provenance import anonymous_case_name
from medseg.io.atomic import write_bytes_atomic, write_json_atomic
from medseg.io.formats import MASK_IMAGE_SUFFIXES, NIFTI_SUFFIXES, SCAN_SUFFIXES, has_suffix, strip_suffix

if TYPE_CHECKING:
    from medseg.data.plan import Plan
    from medseg.inference.segmenter import Segmenter

__all__ = [
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_NAME",
    "CohortCase",
    "CohortResult",
    "anonymize_cases",
    "case_name",
    "collect_cases",
    "collect_inputs",
    "incomplete_reason",
    "manifest_name",
    "plan_of",
    "predict_many",
    "run_cohort",
    "select_part",
    "series_tag",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "infer_manifest"
MANIFEST_FORMAT_VERSION = 1
MANIFEST_CSV_FIELDS = ["case", "input", "status", "seconds", "qc_flags", "qc_details", "error", "outputs"]
#: nnU-Net channel file naming: ``<case>_<4-digit channel index>`` before the extension.
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: Hex digits of sha256(SeriesInstanceUID) appended to a DICOM case name read with ``series_uid``.
SERIES_TAG_DIGITS = 8


@dataclass(frozen=True)
class CohortCase:
    """One case of a cohort: its output name and its input(s).

    Attributes:
        name: the case name; outputs are ``<name>_mask.nii.gz`` etc.
        inputs: one scan file or DICOM folder, or one file per channel (channel order).
    """

    name: str
    inputs: tuple[Path, ...]

    @property
    def scan(self) -> Path | list[Path]:
        """What :meth:`Segmenter.predict` takes: the path, or the list of channel files."""
        return self.inputs[0] if len(self.inputs) == 1 else list(self.inputs)

    @property
    def source(self) -> Path:
        return self.inputs[0]


@dataclass
class CohortResult:
    """What a cohort run did.

    Attributes:
        rows: the manifest rows of this run's cases (input order).
        manifest: the manifest's JSON file, or None when none was written.
        paths: case name -> output kind -> path, of the cases written by this run.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    manifest: Path | None = None
    paths: dict[str, dict[str, Path]] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def written(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "ok" and not r.get("skipped")]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("skipped")]


# --------------------------------------------------------------------------- cases


def case_name(path: str | os.PathLike) -> str:
    """Case name of a scan path: the file name without its extension, or the DICOM folder's name."""
    path = Path(path)
    if path.is_dir():
        return path.resolve().name if path.name in ("", ".", "..") else path.name
    return strip_suffix(path.name)


def collect_inputs(inputs: Sequence[str | os.PathLike], *, anonymize: bool = False) -> list[tuple[Path, str]]:
    """Expand ``medseg infer`` inputs into ``(path, case name)`` pairs (one file or DICOM folder each).

    A file is one case. A folder holding scan files (``.nii.gz`` ...) is a folder
    of scans: each file is a case, and each sub-folder a DICOM series case. Any
    other folder is one DICOM series, named after the folder. With ``anonymize``
    every case is named by :func:`~medseg.inference.provenance.anonymous_case_name`.
    :func:`collect_cases` groups channel files on top of this.

    Raises:
        ScanReadError: a path does not exist, or a folder holds nothing to segment.
        ConfigError: two inputs would give the same case name (and output file).
    """
    cases: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ScanReadError(f"input {path}: no such file or folder. Check the path.")
        if path.is_file():
            cases.append((path, case_name(path)))
            continue
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        scans = [p for p in children if p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES)]
        if scans:
            cases.extend((p, case_name(p)) for p in scans)
            cases.extend((p, case_name(p)) for p in children if p.is_dir() and any(p.iterdir()))
        elif any(p.is_file() for p in children):
            cases.append((path, case_name(path)))
        else:
            subdirs = [p for p in children if p.is_dir() and any(p.iterdir())]
            if not subdirs:
                raise ScanReadError(f"input folder {path} is empty: expected scans or a DICOM series.")
            cases.extend((p, case_name(p)) for p in subdirs)
    if anonymize:
        cases = [(path, anonymous_case_name(path)) for path, _name in cases]
    _refuse_duplicates([CohortCase(name, (path,)) for path, name in cases], anonymized=anonymize)
    return cases


def series_tag(series_uid: str) -> str:
    """Short id of a DICOM series for output names: last 8 hex digits of sha256(uid)."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[-SERIES_TAG_DIGITS:]


def collect_cases(
    inputs: Sequence[str | os.PathLike],
    *,
    channels: int = 1,
    channel_names: Sequence[str] | None = None,
    series_uid: str | None = None,
) -> list[CohortCase]:
    """The cases of ``medseg infer`` inputs, with channel files grouped (module doc).

    Args:
        inputs: files, DICOM folders, folders of scans (as ``collect_inputs`` expands them).
        channels: the model's channels per case (``plan.image_channels``).
        channel_names: the model's channel names, for messages.
        series_uid: DICOM folder cases get the series tag in their name.

    Raises:
        ScanReadError: a case misses channel files, has more than the model takes, or
            an input does not exist / a folder is empty.
        ConfigError: two inputs give one case name.
    """
    from medseg.io.images2d import is_image_path

    names = list(channel_names or [])
    entries = collect_inputs(inputs)
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    order: list[tuple[str, Any]] = []  # ("single", (path, name)) or ("group", key), in input order
    for path, name in entries:
        match = CHANNEL_FILE.match(name) if path.is_file() else None
        if match is None:
            order.append(("single", (path, name)))
            continue
        key = (path.parent.resolve(), match["case"])
        if key not in groups:
            groups[key] = {}
            order.append(("group", key))
        groups[key][int(match["channel"])] = path

    def label(c: int) -> str:
        return f"_{c:04d}" + (f" ({names[c]})" if c < len(names) else "")

    cases: list[CohortCase] = []
    problems: list[str] = []
    for kind, item in order:
        if kind == "single":
            path, name = item
            if series_uid is not None and path.is_dir():
                name = f"{name}_{series_tag(series_uid)}"
            cases.append(CohortCase(name, (path,)))
            continue
        folder, case = item
        files = groups[item]
        if channels == 1:
            if set(files) == {0}:
                cases.append(CohortCase(case, (files[0],)))
            else:
                if len(files) > 1:
                    log.warning(
                        "%s: %s look like channel files of case %r, but the model takes 1 channel; "
                        "segmenting each file as its own case",
                        folder, ", ".join(p.name for _, p in sorted(files.items())), case,
                    )
                cases.extend(CohortCase(_stem(p), (p,)) for _, p in sorted(files.items()))
            continue
        if set(files) == {0} and is_image_path(files[0]):
            # nnU-Net's 2D convention: one CASE_0000.png holds all channels (RGB); the count is checked when read
            cases.append(CohortCase(case, (files[0],)))
            continue
        missing = [c for c in range(channels) if c not in files]
        extra = sorted(c for c in files if c >= channels)
        ext = _extension(next(iter(files.values())))
        if missing:
            problems.append(
                f"case {case!r} in {folder} is incomplete: missing "
                + ", ".join(f"{case}_{c:04d}{ext}{label(c)[5:]}" for c in missing)
            )
        if extra:
            problems.append(
                f"case {case!r} in {folder} has channel file(s) "
                + ", ".join(files[c].name for c in extra)
                + f" beyond the model's {channels} channels"
            )
        if not missing and not extra:
            cases.append(CohortCase(case, tuple(files[c] for c in range(channels))))
    if problems:
        expected = ", ".join(label(c) for c in range(channels))
        raise ScanReadError(
            f"{len(problems)} case(s) do not have the model's channel files: " + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + f". The model expects {channels} files per case, CASE{expected.replace(', ', ', CASE')}"
            " (nnU-Net naming); add the missing files or leave the case out."
        )
    _refuse_duplicates(cases)
    return cases


def _extension(path: Path) -> str:
    return path.name[len(_stem(path)) :]


def _stem(path: Path) -> str:
    return case_name(path)


def _refuse_duplicates(cases: Sequence[CohortCase], *, anonymized: bool = False) -> None:
    seen: dict[str, CohortCase] = {}
    for case in cases:
        other = seen.get(case.name)
        if other is not None:
            if anonymized:
                raise ConfigError(
                    f"inputs {other.source} and {case.source} have identical content (anonymous case name "
                    f"{case.name!r}); segment only one of them."
                )
            raise ConfigError(
                f"inputs {other.source} and {case.source} both give case name {case.name!r} "
                f"(output {case.name}_mask.nii.gz); segment them into different -o folders."
            )
        seen[case.name] = case


def anonymize_cases(cases: Sequence[CohortCase], *, series_uid: str | None = None) -> list[CohortCase]:
    """Cases renamed by :func:`~medseg.inference.provenance.anonymous_case_name` of their first input.

    A channel group is named after its first channel file's content; a DICOM folder read
    with ``series_uid`` keeps its series tag after the anonymous name.
    """
    renamed = []
    for case in cases:
        name = anonymous_case_name(case.source)
        if series_uid is not None and case.source.is_dir():
            name = f"{name}_{series_tag(series_uid)}"
        renamed.append(CohortCase(name, case.inputs))
    _refuse_duplicates(renamed, anonymized=True)
    return renamed


def select_part(cases: Sequence[CohortCase], num_parts: int, part_id: int) -> list[CohortCase]:
    """Part ``part_id`` of ``num_parts``: case ``i`` of the cases sorted by name goes to part ``i mod num_parts``.

    The parts of one cohort are disjoint and together hold every case, whatever
    order the inputs were given in.

    Raises:
        ConfigError: ``num_parts < 1`` or ``part_id`` outside ``0 .. num_parts - 1``.
    """
    if num_parts < 1:
        raise ConfigError(f"--num-parts must be >= 1, got {num_parts}.")
    if not 0 <= part_id < num_parts:
        raise ConfigError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}.")
    ordered = sorted(cases, key=lambda c: c.name)
    return [c for i, c in enumerate(ordered) if i % num_parts == part_id]


def manifest_name(num_parts: int = 1, part_id: int = 0) -> str:
    """File name stem of a run's manifest: ``infer_manifest``, or ``infer_manifest_part{K}of{N}``."""
    return MANIFEST_NAME if num_parts == 1 else f"{MANIFEST_NAME}_part{part_id}of{num_parts}"


# --------------------------------------------------------------------------- channels


# --------------------------------------------------------------------------- completeness


def incomplete_reason(
    case: CohortCase, paths: dict[str, Path], row: dict[str, Any] | None, *, data_dims: int = 3
) -> str | None:
    """Why the outputs of ``case`` are not complete, or None when they are.

    Complete: every planned output exists, every output the manifest row lists
    exists, the row (when there is one) says ``ok``, the mask loads fully (no
    truncated or corrupt gzip), and its grid matches the input's: the NIfTI
    input's header, or the grid the manifest row recorded (other inputs; without
    a row such a case is redone). The provenance must be valid JSON.
    """
    import nibabel as nib

    from medseg.io.geometry import Geometry

    for path in paths.values():
        if not path.exists():
            return f"{path.name} is missing"
    if row is not None:
        if row.get("status") != "ok":
            return f"the manifest says {row.get('status')}"
        for name in (row.get("outputs") or {}).values():
            if not (paths["mask"].parent / name).exists():
                return f"{name} (listed in the manifest) is missing"
    mask_path = paths["mask"]
    if has_suffix(mask_path, MASK_IMAGE_SUFFIXES):  # a 2D image mask: decoded fully, compared with the input's size
        return _incomplete_image_mask(case.source, mask_path, paths)
    try:
        image = nib.load(mask_path)
        np.asarray(image.dataobj)
        mask_grid = Geometry(shape=image.shape[:data_dims], affine=image.affine)
    except Exception as err:  # nibabel raises many types for a corrupt file
        return f"{mask_path.name} does not load ({type(err).__name__}: {err})"
    if len(image.shape) != data_dims:
        return f"{mask_path.name} has shape {image.shape}, not a {data_dims}D mask"
    expected = None
    source = case.source
    if source.is_file() and has_suffix(source, NIFTI_SUFFIXES):
        try:
            header = nib.load(source)
            expected = Geometry(shape=header.shape[:data_dims], affine=header.affine)
        except Exception as err:
            return f"the input {source.name} does not load ({type(err).__name__})"
    elif row is not None and isinstance(row.get("geometry"), dict):
        try:
            expected = Geometry.from_dict(row["geometry"])
        except (MedsegError, KeyError, TypeError, ValueError):
            expected = None
    if expected is None:
        return "no record of the input's grid to check the mask against"
    if not mask_grid.same_grid(expected, atol_mm=1e-3):
        return f"{mask_path.name} is not on the input's grid ({mask_grid.describe_difference(expected)})"
    return _invalid_provenance(paths)


def _invalid_provenance(paths: dict[str, Path]) -> str | None:
    if "provenance" in paths:
        try:
            json.loads(paths["provenance"].read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return f"{paths['provenance'].name} is not valid JSON"
    return None


def _incomplete_image_mask(source: Path, mask_path: Path, paths: dict[str, Path]) -> str | None:
    """:func:`incomplete_reason` for a PNG/TIFF mask: it decodes, and has the input image's width and height."""
    from medseg.io.readers import read_volume

    try:
        mask_shape = read_volume(mask_path).geometry.shape
    except Exception as err:  # Pillow and tifffile raise many types for a corrupt file
        return f"{mask_path.name} does not load ({type(err).__name__}: {err})"
    try:
        input_shape = read_volume(source).geometry.shape
    except Exception as err:
        return f"the input {source.name} does not load ({type(err).__name__})"
    if mask_shape != input_shape:
        return f"{mask_path.name} is {mask_shape[0]} x {mask_shape[1]} pixels, the input {input_shape[0]} x {input_shape[1]}"
    return _invalid_provenance(paths)


# --------------------------------------------------------------------------- manifest


class _Manifest:
    """The run manifest: rows by case name, rewritten atomically (JSON, then CSV) after each change."""

    def __init__(self, out_dir: Path, stem: str, *, header: dict[str, Any]) -> None:
        self.json_path = out_dir / f"{stem}.json"
        self.csv_path = out_dir / f"{stem}.csv"
        self.header = header
        self.rows: dict[str, dict[str, Any]] = {}
        if self.json_path.is_file():
            try:
                record = json.loads(self.json_path.read_text(encoding="utf-8"))
                self.rows = {r["case"]: r for r in record.get("cases", []) if isinstance(r, dict) and "case" in r}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as err:
                log.warning("ignoring unreadable manifest %s (%s): every case is checked from its files", self.json_path, err)

    def update(self, row: dict[str, Any]) -> None:
        self.rows[row["case"]] = row
        self.save()

    def save(self) -> None:
        from medseg.version import __version__

        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        rows = sorted(self.rows.values(), key=lambda r: r["case"])
        record = {"format_version": MANIFEST_FORMAT_VERSION, "medseg_version": __version__, **self.header, "cases": rows}
        write_json_atomic(record, self.json_path, overwrite=True)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=MANIFEST_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            inputs = r.get("input")
            writer.writerow({
                "case": r["case"],
                "input": ";".join(inputs) if isinstance(inputs, list) else (inputs or ""),
                "status": r["status"],
                "seconds": "" if r.get("seconds") is None else f"{r['seconds']:.2f}",
                "qc_flags": ";".join(r.get("qc") or {}),
                "qc_details": " | ".join(f"{k}: {v}" for k, v in (r.get("qc") or {}).items()),
                "error": r.get("error") or "",
                "outputs": ";".join((r.get("outputs") or {}).values()),
            })
        write_bytes_atomic(text.getvalue().encode("utf-8"), self.csv_path, overwrite=True)


# --------------------------------------------------------------------------- running

#: Per-case errors: recorded, and the run goes on. Output-folder problems (OutputWriteError) stop it.
_CASE_ERRORS: tuple[type[BaseException], ...] = (MedsegError, OSError, MemoryError)


def _is_case_error(err: BaseException) -> bool:
    if isinstance(err, OutputWriteError):
        return False
    if isinstance(err, _CASE_ERRORS):
        return True
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError)


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines() or [""]
    return f"{type(err).__name__}: {lines[0]}"


def predict_many(
    segmenter: Segmenter,
    scans: Sequence[str | os.PathLike] | Sequence[tuple[Path, str]],
    outputs: OutputSpec,
    *,
    series_uid: str | None = None,
    resample_tilt: bool = False,
    prefetch: bool = True,
) -> list[dict[str, Path]]:
    """Segment several scans and write their outputs; stop at the first error (no manifest).

    Reading + preprocessing of the next scan and writing of the previous
    one run in background threads while the network works on the current
    one. Every output path is checked before any work starts, so an
    existing output (without ``overwrite``) stops the run with nothing
    written; a bad scan stops it before that scan's outputs are written.

    Args:
        segmenter: the loaded model.
        scans: paths, or ``(path, case name)`` pairs from :func:`collect_inputs`.
        outputs: what to write where (with ``anonymize`` every case is named
            ``case_<12 hex digits of its content's sha256>``, replacing names given in pairs).
        series_uid: series to read from DICOM folders holding several.
        resample_tilt: read gantry-tilted DICOM series onto a regular grid
            (:func:`~medseg.io.read_volume`); their masks are on that corrected grid.
        prefetch: read the next scan while segmenting the current one
            (holds two scans in memory).

    Returns:
        Per case, output kind -> path written.
    """
    cases = [
        CohortCase(s[1], (Path(s[0]),)) if isinstance(s, tuple) else CohortCase(case_name(s), (Path(s),))
        for s in scans
    ]
    outputs.check_formats([(c.source, c.name) for c in cases])
    if outputs.anonymize:
        cases = anonymize_cases(cases)
    result = run_cohort(
        segmenter, cases, outputs, keep_going=False, series_uid=series_uid, resample_tilt=resample_tilt,
        manifest=None, prefetch=prefetch, quality=False,
    )
    return [result.paths[c.name] for c in cases]


def run_cohort(
    segmenter: Segmenter,
    cases: Sequence[CohortCase],
    outputs: OutputSpec | str | os.PathLike,
    *,
    resume: bool = False,
    keep_going: bool = True,
    series_uid: str | None = None,
    resample_tilt: bool = False,
    manifest: str | None = MANIFEST_NAME,
    prefetch: bool = True,
    quality: bool = True,
) -> CohortResult:
    """Segment a cohort case by case, with a manifest (module doc).

    Args:
        segmenter: the loaded model.
        cases: from :func:`collect_cases` (and :func:`select_part`, :func:`anonymize_cases`).
        outputs: what to write where (:class:`~medseg.inference.outputs.OutputSpec`), or an
            output folder for the mask and provenance only. Without ``overwrite`` or
            ``resume`` an existing output is refused before any work.
        resume: skip cases whose outputs are complete, redo (replace) the others.
        keep_going: record a failed case and go on (False: raise its error at once).
        series_uid, resample_tilt: passed to the reader (``Segmenter.predict``).
        manifest: file name stem of the manifest (:func:`manifest_name`), or None for none
            (none either for a single ``mask_path``).
        prefetch: read the next case while the network works on the current one.
        quality: compute the QC flags (:mod:`medseg.inference.quality`) of every case.

    Returns:
        The manifest rows of this run's cases, and the paths written.

    Raises:
        OutputExistsError: an output exists (neither ``overwrite`` nor ``resume``) or lands on an input.
        OutputWriteError: the output folder cannot be written, or the disk is full.
        MedsegError: the error of a failed case when ``keep_going`` is False.
    """
    if not isinstance(outputs, OutputSpec):
        outputs = OutputSpec(Path(outputs))
    if resume and outputs.overwrite:
        raise ConfigError("--continue keeps complete outputs and --overwrite replaces them: pass only one.")
    anonymize = outputs.anonymize
    # never onto an input; existing outputs are refused before any work (resume: checked per case below)
    plans = outputs.plan([(c.inputs, c.name) for c in cases], check_existing=not resume)
    writing = replace(outputs, overwrite=True) if resume else outputs  # resume replaces incomplete outputs
    book = None
    if manifest is not None and outputs.mask_path is None:
        book = _Manifest(outputs.out_dir, manifest, header={"models": _model_records(segmenter, anonymize),
                                                             "settings": segmenter.settings()})
    previous = dict(book.rows) if book is not None else {}
    result = CohortResult(manifest=book.json_path if book is not None else None)
    todo: list[tuple[CohortCase, dict[str, Path]]] = []
    rows: dict[str, dict[str, Any]] = {}
    for case, paths in zip(cases, plans):
        if resume:
            reason = incomplete_reason(case, paths, previous.get(case.name), data_dims=segmenter.plan.data_dims)
            if reason is None:
                rows[case.name] = {**(previous.get(case.name) or _row(case, anonymize)), "status": "ok", "skipped": True}
                continue
            if any(p.exists() for p in paths.values()):
                log.info("%s: outputs incomplete (%s); segmenting it again", case.name, reason)
        todo.append((case, paths))
    if resume:
        log.info("--continue: %d of %d case(s) complete, %d to do", len(cases) - len(todo), len(cases), len(todo))
    outputs.check_folders([paths for _, paths in todo])
    num_models = len(segmenter.models)
    for case, paths in todo:
        shape = _declared_shape(case.source, segmenter.plan.data_dims)
        if shape is not None:
            check_output_space(paths, shape, segmenter.plan, num_models=num_models)
    if book is not None:
        for name, row in rows.items():
            book.rows[name] = row
        if rows:
            book.save()
    ranges = None
    if quality and todo:
        from medseg.inference.quality import training_volume_ranges

        ranges = training_volume_ranges(segmenter.models[0].path, segmenter.plan)
        if ranges is None:
            log.info("no training volume ranges (model.json, or a run fingerprint beside the model): "
                     "the 'volume' QC flag is not checked")

    def finish(case: CohortCase, row: dict[str, Any]) -> None:
        rows[case.name] = row
        if book is not None:
            book.update(row)
        if row["status"] == "failed":
            log.warning("%s failed: %s", case.name, row["error"])
        elif row.get("qc"):
            log.warning("%s: QC %s", case.name, "; ".join(f"{k}: {v}" for k, v in row["qc"].items()))

    def fail(case: CohortCase, err: Exception, seconds: float | None = None) -> None:
        if not keep_going or not _is_case_error(err):
            raise err
        log.debug("%s failed", case.name, exc_info=err)
        finish(case, {**_row(case, anonymize), "status": "failed", "seconds": seconds, "error": _reason(err)})

    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-read") as reader,
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-write") as writer,
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-hash") as hasher,
    ):
        pending: list[tuple[concurrent.futures.Future, CohortCase, dict[str, Any], int]] = []

        def prepare(case: CohortCase) -> Any:
            return segmenter.prepare(case.scan, series_uid=series_uid, resample_tilt=resample_tilt, hash_pool=hasher)

        def harvest(wait: bool) -> None:
            for item in list(pending):
                future, case, row, _size = item
                if not (wait or future.done()):
                    continue
                pending.remove(item)
                try:
                    written, write_s = future.result()
                except Exception as err:
                    fail(case, err, row["seconds"])
                    continue
                row["seconds"] = round(row["seconds"] + write_s, 3)
                row["outputs"] = {k: p.name for k, p in written.items()}
                result.paths[case.name] = written
                finish(case, row)

        def write(prediction: Any, paths: dict[str, Path], volume: Any) -> tuple[dict[str, Path], float]:
            t0 = time.perf_counter()
            written = writing.write(prediction, paths, volume=volume)
            return written, time.perf_counter() - t0

        # A scan is read in the reader thread only to overlap with the network on the previous
        # one; otherwise (the first scan, prefetch=False) in this thread: nothing to overlap
        # with, and a scan read in a worker thread leaves its transient read buffers in that
        # thread's malloc arena (+0.3-0.5 GB peak RSS on a 512 x 512 x 1000 CT).
        upcoming: concurrent.futures.Future | None = None
        for i, (case, paths) in enumerate(todo):
            try:
                prepared = upcoming.result() if upcoming is not None else prepare(case)
            except Exception as err:
                fail(case, err)  # raises unless keep_going
                upcoming = reader.submit(prepare, todo[i + 1][0]) if prefetch and i + 1 < len(todo) else None
                continue
            upcoming = reader.submit(prepare, todo[i + 1][0]) if prefetch and i + 1 < len(todo) else None
            harvest(wait=False)  # surface a failed write before going on
            try:
                # the disk may have filled since the start: check again before the network runs
                shape = prepared.volume.geometry.shape
                check_output_space(paths, shape, segmenter.plan, num_models=num_models,
                                   pending=sum(s for *_, s in pending))
                log.info("segmenting %s (%d/%d)", case.name, i + 1, len(todo))
                prediction = segmenter.predict_prepared(
                    prepared, probabilities=outputs.probabilities, confidence=quality
                )
                volume = prepared.volume
                qc = {}
                if quality:
                    from medseg.inference.quality import assess_prediction

                    qc = assess_prediction(
                        volume.array, prediction.mask, prediction.statistics, segmenter.plan,
                        confidence=prediction.confidence, volume_ranges=ranges,
                    )
            except Exception as err:
                fail(case, err, _seconds(prepared.timings))
                continue
            row = {
                **_row(case, anonymize),
                "status": "ok",
                "seconds": _seconds(prediction.timings),
                "qc": qc,
                "confidence": None if prediction.confidence is None else round(prediction.confidence, 4),
                "geometry": volume.geometry.to_dict(),
            }
            outputs.make_folder(paths)
            future = writer.submit(write, prediction, paths, volume)
            pending.append((future, case, row, sum(output_bytes(paths, shape, segmenter.plan,
                                                                num_models=num_models).values())))
            del prepared, prediction, volume
        harvest(wait=True)
    result.rows = [rows[c.name] for c in cases if c.name in rows]
    return result


def _declared_shape(path: Path, data_dims: int) -> tuple[int, ...] | None:
    """Spatial shape a scan file's header declares, without reading its voxels (None: not known).

    NIfTI headers are read with nibabel, MetaImage/NRRD headers with SimpleITK;
    DICOM folders and unreadable headers give None (the reader reports those).
    """
    lower = path.name.lower()
    try:
        if path.is_file() and lower.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(path).header.get_data_shape())
        elif path.is_file() and lower.endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = tuple(int(s) for s in reader.GetSize())
        else:
            return None
    except Exception:  # a broken header is reported by the reader, with its own message
        return None
    return shape[:data_dims] if len(shape) >= data_dims else None


#: The stages of ``Prediction.timings`` that add up to a case's time (others are parts of them, or counts).
_STAGES = ("read_s", "preprocess_s", "sliding_window_s", "restore_s", "postprocess_s")


def _seconds(timings: dict[str, float]) -> float:
    return round(sum(float(timings.get(k, 0.0)) for k in _STAGES), 3)


def _row(case: CohortCase, anonymize: bool) -> dict[str, Any]:
    inputs = [str(p) for p in case.inputs]
    return {
        "case": case.name,
        "input": None if anonymize else (inputs[0] if len(inputs) == 1 else inputs),
        "status": "pending",
        "seconds": None,
        "outputs": {},
        "qc": {},
        "error": None,
    }


def _model_records(segmenter: Segmenter, anonymize: bool) -> list[dict[str, Any]]:
    return [
        {"path": None if anonymize else str(m.path), "fold": m.fold, "weights_sha256": m.meta.get("weights_sha256")}
        for m in segmenter.models
    ]


def plan_of(model_dir: str | os.PathLike, folds: Sequence[int | str] | None = None) -> Plan:
    """The plan of a model, run or fold folder, read from ``model.json`` without loading weights."""
    from medseg.data.plan import Plan
    from medseg.model_folder import find_model_dirs, read_model_json

    first = find_model_dirs(model_dir, folds)[0]
    try:
        return Plan.from_dict(read_model_json(first)["plan"])
    except ConfigError as err:
        raise ConfigError(f"{first}: {err}") from err
