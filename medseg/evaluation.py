"""Score predicted masks against reference masks: per-case CSV, summary JSON, terminal table.

::

    report = medseg.evaluate("preds/", "labelsTs/", labels="dataset.json", output_dir="eval/")
    report.format_table()                     # the table `medseg evaluate` shows
    report.summary["liver"]["dice"]["mean"]

Cases are matched by name: the file name without ``.nii.gz``/``.nii``/``.mha``/
``.mhd``/``.nrrd``/``.nhdr`` (or the 2D image endings ``.png``/``.tif``/``.tiff``/
``.bmp``) and without a trailing ``_mask``. When every reference is a 2D image,
the default metrics are :data:`medseg.metrics.IMAGE_DEFAULT_METRICS` (Dice, IoU,
pixel accuracy, precision, recall): images have spacing 1, so distances and
volumes would be in pixels. A prediction must lie
on its reference's voxel grid (checked with :meth:`Geometry.same_grid`); with
``resample_to_reference=True`` it is resampled (nearest neighbour) onto it.
Metrics, units and the empty-mask policy are defined in ``docs/metrics.md``.
With ``anonymize=True`` the reports name each case
``case_<12 hex digits of the reference file's sha256>``
(:func:`medseg.inference.provenance.anonymous_case_name`, the rule of
``medseg infer --anonymize``) and hold no file or folder path.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

import medseg.metrics as M
from medseg.errors import (
    ConfigError,
    DatasetError,
    GeometryError,
    MedsegError,
    OutputExistsError,
)
from medseg.io.atomic import make_folder, write_text_atomic
from medseg.io.formats import MASK_SUFFIXES, strip_suffix
from medseg.records import json_safe

__all__ = [
    "CSV_NAME",
    "LESIONS_CSV_NAME",
    "SUMMARY_NAME",
    "CaseResult",
    "EvaluationReport",
    "case_name",
    "evaluate",
    "load_labels",
    "match_cases",
    "resample_nearest",
]

CSV_NAME = "metrics_per_case.csv"
SUMMARY_NAME = "metrics_summary.json"
LESIONS_CSV_NAME = "lesions.csv"
SUMMARY_FORMAT_VERSION = 1
NAME_SUFFIX = "_mask"

MissingPolicy = Literal["error", "empty", "skip"]


# --------------------------------------------------------------------------------------
# case matching
# --------------------------------------------------------------------------------------
def case_name(path: str | os.PathLike) -> str:
    """Case name of a mask file: its name without extension and without a trailing ``_mask``."""
    name = strip_suffix(Path(path).name, MASK_SUFFIXES)
    if name.endswith(NAME_SUFFIX) and len(name) > len(NAME_SUFFIX):
        name = name[: -len(NAME_SUFFIX)]
    return name


def _all_images(gt: str | os.PathLike) -> bool:
    """True when the reference (a file, or the mask files of a folder) is made of 2D images."""
    from medseg.io.images2d import is_image_path

    path = Path(gt)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(MASK_SUFFIXES)]
    else:
        files = [path]
    return bool(files) and all(is_image_path(p) for p in files)


def _mask_files(folder: Path, what: str) -> dict[str, Path]:
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(MASK_SUFFIXES)
    )
    by_name: dict[str, list[Path]] = {}
    for p in files:
        by_name.setdefault(case_name(p), []).append(p)
    clashes = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if clashes:
        lines = [f"  - {n!r}: " + ", ".join(p.name for p in ps) for n, ps in sorted(clashes.items())]
        raise DatasetError(
            f"{len(clashes)} case name(s) in the {what} folder {folder} belong to several files:\n"
            + "\n".join(lines)
            + "\nKeep one file per case (names are compared without extension and without '_mask')."
        )
    if not by_name:
        raise DatasetError(
            f"the {what} folder {folder} holds no mask files ({', '.join(MASK_SUFFIXES)}); check the path."
        )
    return {n: ps[0] for n, ps in by_name.items()}


def match_cases(
    pred: str | os.PathLike, gt: str | os.PathLike
) -> tuple[list[tuple[str, Path, Path]], list[str], list[tuple[str, Path]]]:
    """Pair prediction and reference files by case name.

    Args:
        pred: a prediction file or folder.
        gt: a reference file or folder (the same kind as ``pred``).

    Returns:
        ``(matched, predictions_without_reference, references_without_prediction)``:
        ``matched`` is ``[(case, pred_path, gt_path)]`` sorted by case name.

    Raises:
        DatasetError: a path is missing, a file is paired with a folder, a folder
            holds no masks or two files with one case name.
    """
    pred, gt = Path(pred), Path(gt)
    for path, what in ((pred, "prediction"), (gt, "reference")):
        if not path.exists():
            raise DatasetError(f"{what} path {path} does not exist; check the path.")
    if pred.is_file() and gt.is_file():
        return [(case_name(gt), pred, gt)], [], []
    if pred.is_dir() != gt.is_dir():
        raise DatasetError(
            f"prediction {pred} is a {'folder' if pred.is_dir() else 'file'} but reference {gt} is a "
            f"{'folder' if gt.is_dir() else 'file'}; pass two files or two folders."
        )
    preds = _mask_files(pred, "prediction")
    gts = _mask_files(gt, "reference")
    matched = [(n, preds[n], gts[n]) for n in sorted(set(preds) & set(gts))]
    extra = sorted(set(preds) - set(gts))
    missing = [(n, gts[n]) for n in sorted(set(gts) - set(preds))]
    if not matched:
        raise DatasetError(
            f"no case name is both in {pred} ({len(preds)} file(s), e.g. {_examples(preds)}) and in {gt} "
            f"({len(gts)} file(s), e.g. {_examples(gts)}). Cases are matched by file name without extension "
            "and without a trailing '_mask'."
        )
    return matched, extra, missing


def _examples(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------
def load_labels(
    source: str | os.PathLike | Mapping | None,
) -> tuple[dict[int, str] | None, dict[str, list[int]]]:
    """Label names (and nnU-Net-style regions) from a dataset.json, a model folder or a dict.

    Accepted forms:

    * MSD ``{"labels": {"0": "background", "1": "liver"}}``;
    * nnU-Net v2 ``{"labels": {"background": 0, "liver": 1}}``; a list value
      (``"whole_tumour": [1, 2, 3]``) is a region;
    * a model folder: ``model.json`` (or ``model/model.json``, ``fold_*/model/model.json``)
      with ``plan.label_values`` and ``plan.label_names``;
    * a flat ``{value: name}`` map, also as a JSON file or nested one level deep
      (TotalSegmentator's ``{"total": {...}}``);
    * a plain dict in either of the first two forms.

    Returns:
        ``(labels, regions)``: ``{value: name}`` (``None`` when ``source`` is None)
        and ``{region name: [values]}``.

    Raises:
        ConfigError: the file or folder holds no usable labels.
    """
    if source is None:
        return None, {}
    if isinstance(source, Mapping):
        return _labels_from_mapping(source, "the labels argument")
    path = Path(source)
    if path.is_dir():
        candidates = [path / "dataset.json", path / "model.json", path / "model" / "model.json"]
        candidates += sorted(path.glob("fold_*/model/model.json"))
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(
                f"--labels {path}: the folder holds no dataset.json or model.json; pass a dataset.json, "
                "a model folder, or leave --labels out to name classes by their values."
            )
        path = found
    if not path.is_file():
        raise ConfigError(f"--labels {path}: no such file or folder.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--labels {path}: cannot read it as JSON ({err}).") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"--labels {path}: expected a JSON object with labels, got {type(data).__name__}.")
    return _labels_from_mapping(data, str(path))


def _labels_from_mapping(data: Mapping, where: str) -> tuple[dict[int, str], dict[str, list[int]]]:
    plan = data.get("plan")
    if isinstance(plan, Mapping) and "label_values" in plan and "label_names" in plan:
        data = plan
    if "label_values" in data and "label_names" in data:
        values, names = list(data["label_values"]), list(data["label_names"])
        if len(values) != len(names):
            raise ConfigError(f"{where}: {len(values)} label_values but {len(names)} label_names.")
        return _checked({int(v): str(n) for v, n in zip(values, names)}, where), {}
    if isinstance(data.get("labels"), Mapping):
        data = data["labels"]
    elif len(data) == 1 and isinstance(next(iter(data.values())), Mapping):
        data = next(iter(data.values()))
    from medseg.data.folders import parse_labels

    values, names, regions = parse_labels(
        dict(data), where, allow_regions=True, require_background=False, error=ConfigError
    )
    return dict(zip(values, names)), regions


def _checked(labels: dict[int, str], where: str) -> dict[int, str]:
    if any(v < 0 for v in labels):
        raise ConfigError(f"{where}: negative label values {sorted(v for v in labels if v < 0)}.")
    names = list(labels.values())
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: label names {dup} are used for several values; names must be unique.")
    return dict(sorted(labels.items()))


# --------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------
def resample_nearest(mask: np.ndarray, source, target) -> np.ndarray:
    """Nearest-neighbour resampling of a label map from grid ``source`` onto grid ``target``.

    Args:
        mask: spatial label map on ``source`` (a :class:`~medseg.io.geometry.Geometry`).
        source: the mask's geometry.
        target: the geometry to resample onto; voxels outside ``source``'s field of view get 0.

    Returns:
        A label map of ``target.shape`` and ``mask``'s dtype.
    """
    from scipy import ndimage

    if source.spatial_dims != target.spatial_dims:
        raise GeometryError(
            f"cannot resample a {source.spatial_dims}D mask onto a {target.spatial_dims}D grid."
        )
    nd = target.spatial_dims
    index_map = np.linalg.inv(source.affine) @ target.affine  # target index -> source index
    return ndimage.affine_transform(
        np.asarray(mask),
        index_map[:nd, :nd],
        offset=index_map[:nd, 3],
        output_shape=target.shape,
        order=0,
        mode="constant",
        cval=0,
        prefilter=False,
    )


# --------------------------------------------------------------------------------------
# one case (runs in worker processes)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    labels: dict[int, str] | None
    regions: dict[str, list[int]]
    metrics: tuple[str, ...]
    tolerance_mm: float | dict
    empty: str
    worst_distance: Any
    surface: str
    include_background: bool
    lesion: M.LesionOptions | None
    resample_to_reference: bool


@dataclass
class CaseResult:
    """Scores of one case.

    Attributes:
        name: case name.
        pred_path: prediction file (``None`` when it was missing and scored as empty).
        gt_path: reference file.
        scores: ``{class: {metric: value}}``.
        lesions: per-lesion rows (``class`` added to :meth:`medseg.metrics.Lesion.to_dict`).
        notes: what was done to the case (``"resampled"``, ``"missing prediction scored as empty"``).
    """

    name: str
    pred_path: Path | None
    gt_path: Path
    scores: dict[str, dict[str, float]]
    lesions: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read_mask(path: Path):
    from medseg.io import read_volume

    volume = read_volume(path)
    if volume.num_channels != 1:
        raise DatasetError(
            f"{path} has {volume.num_channels} channels; a mask must be a single label map "
            "(argmax multi-channel outputs first)."
        )
    return volume, M.as_label_map(volume.array[0], what=str(path))


def _score_case(name: str, pred_path: Path | None, gt_path: Path, settings: _Settings) -> CaseResult:
    notes = []
    try:
        gt_volume, gt = _read_mask(gt_path)
        if pred_path is None:
            pred = np.zeros_like(gt)
            notes.append("missing prediction scored as empty")
        else:
            pred_volume, pred = _read_mask(pred_path)
            if not pred_volume.geometry.same_grid(gt_volume.geometry):
                difference = pred_volume.geometry.describe_difference(gt_volume.geometry)
                if not settings.resample_to_reference:
                    raise GeometryError(
                        f"case {name!r}: prediction {pred_path} and reference {gt_path} are on different "
                        f"voxel grids (prediction vs reference: {difference}). Write predictions on the "
                        "reference grid, or pass --resample-to-reference (nearest neighbour)."
                    )
                pred = resample_nearest(pred, pred_volume.geometry, gt_volume.geometry)
                notes.append(f"resampled to the reference grid ({difference})")
        spacing = gt_volume.geometry.spacing
        scores = M.compute_scores(
            pred,
            gt,
            spacing=spacing,
            labels=settings.labels,
            regions=settings.regions,
            metrics=settings.metrics,
            tolerance_mm=settings.tolerance_mm,
            empty=settings.empty,
            worst_distance=settings.worst_distance,
            include_background=settings.include_background,
            surface=settings.surface,
        )
        lesion_rows: list[dict] = []
        if settings.lesion is not None:
            groups = _groups_of(scores, settings)
            for cls, members in groups.items():
                result = M.lesion_scores(
                    np.isin(pred, members),
                    np.isin(gt, members),
                    spacing=spacing,
                    options=settings.lesion,
                    empty=settings.empty,
                )
                scores[cls].update(result.as_dict())
                lesion_rows.extend({"case": name, "class": cls, **les.to_dict()} for les in result.lesions)
    except MedsegError as err:
        if f"{name!r}" in str(err) or str(gt_path) in str(err):
            raise
        raise type(err)(f"case {name!r} (prediction {pred_path}, reference {gt_path}): {err}") from err
    return CaseResult(name, pred_path, gt_path, scores, lesion_rows, notes)


def _groups_of(scores: Mapping[str, Any], settings: _Settings) -> dict[str, list[int]]:
    """Label values per scored class name (labels and regions)."""
    by_name: dict[str, list[int]] = {}
    if settings.labels is not None:
        by_name.update({n: [v] for v, n in settings.labels.items()})
    for name in scores:
        if name in settings.regions:
            by_name[name] = list(settings.regions[name])
        elif name not in by_name:
            by_name[name] = [int(name)]
    return {n: by_name[n] for n in scores}


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
@dataclass
class EvaluationReport:
    """Per-case scores, their summary, and where they were written.

    Attributes:
        cases: one :class:`CaseResult` per scored case, sorted by name.
        classes: scored class names (labels, then regions), in report order.
        metrics: metric names, in column order.
        summary: ``{class: {metric: {mean, median, std, n_valid, n_total, n_inf}}}``
            plus ``"foreground_mean"`` (mean of the label classes' means).
        settings: the options used (policy, tolerance, units, ...), as in the JSON.
        predictions_without_reference: case names only in the prediction folder.
        references_without_prediction: case names only in the reference folder.
        csv_path, summary_path, lesions_path: files written (``None`` when not written).
        anonymized: case names are anonymous and the reports hold no path.
    """

    cases: list[CaseResult]
    classes: list[str]
    metrics: tuple[str, ...]
    summary: dict[str, dict[str, dict[str, float | int]]]
    settings: dict[str, Any]
    predictions_without_reference: list[str] = field(default_factory=list)
    references_without_prediction: list[str] = field(default_factory=list)
    csv_path: Path | None = None
    summary_path: Path | None = None
    lesions_path: Path | None = None
    anonymized: bool = False

    # --- serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The summary JSON (NaN -> null, inf -> "inf")."""
        return json_safe(
            {
                "format_version": SUMMARY_FORMAT_VERSION,
                "n_cases": len(self.cases),
                "classes": self.classes,
                "metrics": list(self.metrics),
                "units": {m: M.metric_unit(m) for m in self.metrics},
                "settings": self.settings,
                "summary": self.summary,
                "cases": {
                    c.name: {
                        "prediction": str(c.pred_path) if c.pred_path and not self.anonymized else None,
                        "reference": None if self.anonymized else str(c.gt_path),
                        "notes": c.notes,
                    }
                    for c in self.cases
                },
                "predictions_without_reference": self.predictions_without_reference,
                "references_without_prediction": self.references_without_prediction,
            }
        )

    def csv_text(self) -> str:
        """Per-case CSV: one row per case and class; NaN as ``nan``, infinity as ``inf``."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["case", "class", *self.metrics])
        for case in self.cases:
            for cls in self.classes:
                values = case.scores.get(cls, {})
                writer.writerow(
                    [case.name, cls, *(_fmt_csv(values.get(m, float("nan"))) for m in self.metrics)]
                )
        return buf.getvalue()

    def lesions_csv_text(self) -> str:
        """Per-lesion CSV (only with lesion evaluation)."""
        columns = [
            "case",
            "class",
            "kind",
            "index",
            "voxels",
            "volume_ml",
            "pred_voxels",
            "pred_volume_ml",
            "overlap_voxels",
            "dice",
            "iou",
            "detected",
            "matched",
        ]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for case in self.cases:
            for row in case.lesions:
                writer.writerow({k: _fmt_csv(v) if isinstance(v, float) else v for k, v in row.items()})
        return buf.getvalue()

    def save(self, output_dir: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
        """Write the per-case CSV, the summary JSON (and lesions CSV) into ``output_dir``, atomically.

        Raises:
            OutputExistsError: a report file exists and ``overwrite`` is False.
            OutputWriteError: the folder cannot be created or written.
        """
        out = Path(output_dir)
        targets = _report_paths(out, lesions=bool(self.settings.get("lesion")))
        _check_targets(targets, overwrite=overwrite)
        make_folder(out, "evaluation report folder")
        write_text_atomic(self.csv_text(), targets[0], overwrite=overwrite)
        write_text_atomic(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", targets[1], overwrite=overwrite)
        self.csv_path, self.summary_path = targets[0], targets[1]
        if len(targets) > 2:
            write_text_atomic(self.lesions_csv_text(), targets[2], overwrite=overwrite)
            self.lesions_path = targets[2]
        return targets

    # --- terminal -------------------------------------------------------------
    def format_table(self, metrics: Sequence[str] | None = None, *, max_metrics: int = 6) -> str:
        """Short text table: class x mean of each metric, with ``[n_valid/n_total]`` where cases were excluded.

        A mean of ``inf`` (a one-empty case) is shown with the median beside it when that is finite.
        At most ``max_metrics`` columns (all of them are in the CSV and JSON).
        """
        names = list(metrics or self.metrics)[:max_metrics]
        header = ["class", *(f"{m} ({M.metric_unit(m)})" if M.metric_unit(m) else m for m in names), "cases"]
        rows = []
        hidden = 0
        for cls in [*self.classes, "foreground_mean"]:
            stats = self.summary.get(cls)
            if stats is None:
                continue
            if names and all(stats[m]["n_valid"] == 0 for m in names if m in stats):
                hidden += 1  # e.g. absent from every case under empty="nan"
                continue
            cells = [cls]
            for m in names:
                s = stats.get(m)
                cells.append("-" if s is None else _fmt_stat(s))
            first = stats.get(names[0]) if names else None
            if cls == "foreground_mean":
                cells.append("")
            else:
                cells.append(f"{first['n_total']}" if first else "")
            rows.append(cells)
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
            for r in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if hidden:
            lines.append(f"{hidden} class(es) without any valid value not shown (all NaN; see the CSV).")
        policy = self.settings.get("empty")
        lines.append(
            f"{len(self.cases)} case(s); mean over valid cases, [n_valid/n_total] where some were undefined "
            f"(empty policy {policy!r}, see docs/metrics.md)."
        )
        return "\n".join(lines)


def _fmt_stat(s: Mapping[str, float | int]) -> str:
    mean = s["mean"]
    text = _fmt_num(mean)
    median = s["median"]
    if isinstance(mean, float) and math.isinf(mean) and not math.isinf(median):
        text += f" (median {_fmt_num(median)})"
    if s["n_valid"] < s["n_total"]:
        text += f" [{s['n_valid']}/{s['n_total']}]"
    return text


def _fmt_num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if math.isinf(v):
        return "inf"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _fmt_csv(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    return v


def _report_paths(out: Path, *, lesions: bool) -> list[Path]:
    paths = [out / CSV_NAME, out / SUMMARY_NAME]
    if lesions:
        paths.append(out / LESIONS_CSV_NAME)
    return paths


def _check_targets(targets: Sequence[Path], *, overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise OutputExistsError(
            f"evaluation report {', '.join(existing)} exists; pass --overwrite (overwrite=True) to replace "
            "it, or choose another output folder with -o."
        )


# --------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------
def evaluate(
    pred: str | os.PathLike,
    gt: str | os.PathLike,
    *,
    labels: str | os.PathLike | Mapping | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    metrics: Iterable[str] | str | None = None,
    tolerance_mm: float | Mapping[str | int, float] = 1.0,
    empty: M.EmptyPolicy = "nan",
    worst_distance: M.WorstDistance = "inf",
    include_background: bool = False,
    lesion: bool | M.LesionOptions = False,
    resample_to_reference: bool = False,
    missing: MissingPolicy = "error",
    surface: M.SurfaceKind = "surfel",
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    num_workers: int | None = None,
    parallel: Literal["threads", "processes"] = "threads",
    progress: bool | None = None,
    anonymize: bool = False,
) -> EvaluationReport:
    """Score prediction masks against reference masks (files or folders matched by case name).

    Args:
        pred: prediction mask file, or folder of them.
        gt: reference mask file, or folder of them.
        labels: a dataset.json, a model folder, or a dict (see :func:`load_labels`);
            default: classes named by their label value, found in the masks.
        regions: named unions of labels scored as one mask (e.g. ``{"WT": [1, 2, 3]}``);
            added to the regions a dataset.json defines.
        metrics: names or ``"dice,hd95"`` (see :func:`medseg.metrics.resolve_metrics`).
        tolerance_mm: NSD tolerance in mm, or per class ``{name: mm}``.
        empty: both-empty policy ``"nan"`` (default) or ``"one"`` (docs/metrics.md).
        worst_distance: distance for one-empty cases: ``"inf"``, ``"diagonal"`` or mm.
        surface: surface of HD/HD95/ASSD/NSD: ``"surfel"`` (default, area-weighted
            surface elements as DeepMind's surface-distance) or ``"voxel"`` (boundary
            voxel centres as MONAI); see docs/metrics.md.
        include_background: also score label 0.
        lesion: add lesion-wise metrics and a per-lesion CSV (``True`` or
            :class:`medseg.metrics.LesionOptions`).
        resample_to_reference: resample a prediction on another grid onto the
            reference grid (nearest neighbour) instead of refusing it.
        missing: a reference without prediction: ``"error"`` (default), ``"empty"``
            (scored as an empty prediction, the worst case) or ``"skip"`` (listed only).
        output_dir: where to write ``metrics_per_case.csv``, ``metrics_summary.json``
            (and ``lesions.csv``); ``None`` writes nothing.
        overwrite: replace existing report files.
        num_workers: workers scoring cases in parallel (default: up to the
            number of CPUs, at most 4); 0 or 1 scores in this process.
        parallel: ``"threads"`` (default: works in any script, no ``if __name__ ==
            "__main__":`` guard needed; reading, distance transforms and surface
            searches run in numpy/scipy/zlib code) or ``"processes"`` (spawned worker
            processes, as ``medseg evaluate`` uses; a script calling this at its top
            level needs the ``__main__`` guard, since each worker imports the script).
        progress: show a progress bar (default: when stderr is a terminal and there
            are several cases).
        anonymize: name cases ``case_<12 hex digits of the reference file's sha256>``
            (:func:`medseg.inference.provenance.anonymous_case_name`) in the report and
            its files, and write no path (settings and per-case file entries are null).

    Returns:
        The :class:`EvaluationReport` (with paths set when written).

    Raises:
        DatasetError: no matching cases, missing predictions (``missing="error"``),
            bad mask values, labels not in ``labels``.
        GeometryError: a prediction on another grid (without ``resample_to_reference``).
        ConfigError: unknown metric or option.
        OutputExistsError: report files exist (without ``overwrite``).
    """
    names = M.resolve_metrics(metrics)
    if metrics is None and _all_images(gt):
        names = M.IMAGE_DEFAULT_METRICS
    lesion_opts = M.LesionOptions.coerce(lesion)
    if lesion_opts is not None:
        names = names + tuple(m for m in M.LESION_METRICS if m not in names)
    if empty not in ("nan", "one"):
        raise ConfigError(f"empty must be 'nan' or 'one', got {empty!r}.")
    if missing not in ("error", "empty", "skip"):
        raise ConfigError(f"missing must be 'error', 'empty' or 'skip', got {missing!r}.")
    M.worst_distance_mm(worst_distance, (1,), (1.0,))  # validate early
    M.check_surface(surface)
    label_map, file_regions = load_labels(labels)
    all_regions = {**file_regions, **{k: [int(v) for v in vs] for k, vs in (regions or {}).items()}}
    if output_dir is not None:
        _check_targets(_report_paths(Path(output_dir), lesions=lesion_opts is not None), overwrite=overwrite)

    matched, extra, missing_refs = match_cases(pred, gt)
    if anonymize and extra:
        from medseg.inference.provenance import anonymous_case_name

        files = _mask_files(Path(pred), "prediction")
        extra = sorted(anonymous_case_name(files[n]) for n in extra)
    if extra:
        warnings.warn(
            f"{len(extra)} prediction(s) have no reference and are not scored: {_examples(extra, 5)}.",
            stacklevel=2,
        )
    if missing_refs and missing == "error":  # names the files even with anonymize: the user must find them
        raise DatasetError(
            f"{len(missing_refs)} reference case(s) have no prediction in {pred}: "
            f"{_examples([n for n, _ in missing_refs], 10)}. Predict them, or pass --missing empty "
            "(score them as empty predictions, the worst case) or --missing skip (leave them out, listed)."
        )
    tasks = [(n, p, g) for n, p, g in matched]
    if missing == "empty":
        tasks += [(n, None, g) for n, g in missing_refs]
    if anonymize:
        tasks, missing_refs = _anonymized(tasks, missing_refs)
    tasks.sort(key=lambda t: t[0])
    settings = _Settings(
        labels=label_map,
        regions=all_regions,
        metrics=tuple(m for m in names if m not in M.LESION_METRICS),
        tolerance_mm=dict(tolerance_mm) if isinstance(tolerance_mm, Mapping) else float(tolerance_mm),
        empty=empty,
        worst_distance=worst_distance,
        surface=surface,
        include_background=include_background,
        lesion=lesion_opts,
        resample_to_reference=resample_to_reference,
    )
    results = _run_cases(tasks, settings, num_workers=num_workers, parallel=parallel, progress=progress)

    classes = _class_order(results, label_map, all_regions, include_background)
    filler = M.empty_case_scores(names, empty=empty)
    for case in results:
        for cls in classes:
            case.scores.setdefault(cls, dict(filler))
    foreground = [c for c in classes if c not in all_regions]
    summary = M.aggregate([c.scores for c in results], foreground=foreground)
    report = EvaluationReport(
        cases=results,
        classes=classes,
        metrics=names,
        summary=summary,
        settings=json_safe(
            {
                "prediction": None if anonymize else str(pred),
                "reference": None if anonymize else str(gt),
                "anonymized": anonymize,
                "labels": None if label_map is None else {str(v): n for v, n in label_map.items()},
                "regions": all_regions,
                "empty": empty,
                "worst_distance": worst_distance,
                "tolerance_mm": settings.tolerance_mm,
                "include_background": include_background,
                "lesion": None if lesion_opts is None else vars(lesion_opts),
                "resample_to_reference": resample_to_reference,
                "missing": missing,
                "surface": surface,
                **M.SURFACE_DEFINITIONS[surface],
                "aggregation": "NaN excluded and counted (n_valid); inf kept (mean inf, n_inf)",
            }
        ),
        predictions_without_reference=extra,
        references_without_prediction=[n for n, _ in missing_refs],
        anonymized=anonymize,
    )
    if output_dir is not None:
        report.save(output_dir, overwrite=overwrite)
    return report


def _anonymized(
    tasks: list[tuple[str, Path | None, Path]], missing_refs: list[tuple[str, Path]]
) -> tuple[list[tuple[str, Path | None, Path]], list[tuple[str, Path]]]:
    """Tasks and references without prediction renamed by ``anonymous_case_name`` of the reference file.

    Raises:
        DatasetError: two references with identical content (one anonymous name).
    """
    from medseg.inference.provenance import anonymous_case_name

    names = {g: anonymous_case_name(g) for _n, _p, g in tasks}
    names.update({g: names.get(g) or anonymous_case_name(g) for _n, g in missing_refs})
    seen: dict[str, Path] = {}
    for gt_path, name in names.items():
        if name in seen:
            raise DatasetError(
                f"references {seen[name]} and {gt_path} have identical content (anonymous case name {name!r}); "
                "keep one of them."
            )
        seen[name] = gt_path
    renamed = sorted(((names[g], p, g) for _n, p, g in tasks), key=lambda t: t[0])
    return renamed, sorted((names[g], g) for _n, g in missing_refs)


def _class_order(
    results: Sequence[CaseResult],
    labels: Mapping[int, str] | None,
    regions: Mapping[str, Sequence[int]],
    include_background: bool,
) -> list[str]:
    if labels is not None:
        names = [n for v, n in sorted(labels.items()) if v != 0 or include_background]
    else:
        seen = {cls for case in results for cls in case.scores if cls not in regions}
        names = sorted(seen, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    return names + [r for r in regions if r not in names]


def _run_cases(
    tasks: Sequence[tuple[str, Path | None, Path]],
    settings: _Settings,
    *,
    num_workers: int | None,
    parallel: Literal["threads", "processes"] = "threads",
    progress: bool | None,
) -> list[CaseResult]:
    from tqdm.auto import tqdm

    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1, len(tasks))
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}.")
    if parallel not in ("threads", "processes"):
        raise ConfigError(f"parallel must be 'threads' or 'processes', got {parallel!r}.")
    if progress is None:
        disable = None if len(tasks) > 1 else True  # None: tqdm shows it on a terminal only
    else:
        disable = not progress
    bar = tqdm(total=len(tasks), desc="evaluate", unit="case", disable=disable, leave=False)
    results: list[CaseResult] = []
    try:
        if num_workers <= 1 or len(tasks) == 1:
            for name, p, g in tasks:
                results.append(_score_case(name, p, g, settings))
                bar.update()
        else:
            pool: Executor
            if parallel == "processes":  # spawn: each worker imports the caller's __main__ module
                pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"))
            else:
                pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="medseg-evaluate")
            with pool:
                futures: dict[Future, str] = {
                    pool.submit(_score_case, name, p, g, settings): name for name, p, g in tasks
                }
                try:
                    for future in as_completed(futures):
                        results.append(future.result())
                        bar.update()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    results.sort(key=lambda r: r.name)
    return results
