"""``medseg check``: find every problem in a dataset folder at once.

Each case is read through ``medseg.io.read_volume`` (so corrupt files, NaN/Inf
voxels and bad geometry get the reader's messages) and compared with its label
and with the dataset's declarations. Nothing stops at the first problem: the
report lists them all, naming the case and both files.

Problems (training would fail or learn garbage): entries of ``dataset.json`` or
a list that were refused while listing (a path leaving the root, an unsafe case
id; pass ``scan_dataset(path, collect_problems=True)``), missing or unreadable files,
image/label shape or grid mismatch (origin, spacing, direction, with the
distance in mm), label values not declared, non-integer or negative labels,
labels with several channels, channel count mismatch, channel files on
different grids, duplicate case ids, no cases.

Warnings (listed, exit code stays 0): empty labels (background only), declared
classes that never occur, fewer cases than folds (splits then fall back to
leave-one-out, see ``medseg.data.splits``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.folders import (
    GEOMETRY_TOLERANCE_MM,
    Case,
    DatasetIndex,
    read_case,
    refuse_multichannel_label,
)
from medseg.errors import DatasetError, GeometryError, ScanReadError

__all__ = ["CheckReport", "Finding", "check_dataset"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One problem or warning.

    Attributes:
        message: what is wrong, with the values found and expected.
        case_id: the case, or ``None`` for dataset-wide findings.
        files: the files involved, relative to the dataset root.
    """

    message: str
    case_id: str | None = None
    files: tuple[str, ...] = ()

    def format(self) -> str:
        head = f"  - case {self.case_id!r}: {self.message}" if self.case_id is not None else f"  - {self.message}"
        if not self.files:
            return head
        return head + "\n      " + "   ".join(self.files)


@dataclass
class CheckReport:
    """Every problem and warning found by :func:`check_dataset`.

    Attributes:
        root: the dataset folder.
        problems: findings that make the dataset unusable for training.
        warnings: findings worth knowing (empty labels, absent classes).
        cases_checked: number of cases read.
        observed_label_values: label values found in the label files.
        layout: the dataset layout found (``msd``, ``nnunet``, ``plain``, ``list``, ...).
        training_cases, test_cases: cases listed for training, and test images.
    """

    root: Path
    layout: str = ""
    training_cases: int = 0
    test_cases: int = 0
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    cases_checked: int = 0
    observed_label_values: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def header(self) -> str:
        """What was found, e.g. ``/data/Liver: msd layout, 131 training case(s), 70 test case(s)``."""
        tests = f", {self.test_cases} test case(s)" if self.test_cases else ""
        return f"{self.root}: {self.layout} layout, {self.training_cases} training case(s){tests}"

    def summary(self) -> str:
        """One line, e.g. ``2 problems in /data/Liver (checked 131 cases): run `medseg check ...` to list them``."""
        n = len(self.problems)
        noun = "problem" if n == 1 else "problems"
        if n == 0:
            return f"no problems in {self.root} (checked {self.cases_checked} cases, {len(self.warnings)} warnings)"
        return f"{n} {noun} in {self.root} (checked {self.cases_checked} cases): run `medseg check {self.root}` to list them"

    def format(self) -> str:
        """The summary line, then every problem and warning."""
        lines = [self.summary()]
        if self.problems:
            lines.append("Problems:")
            lines.extend(p.format() for p in self.problems)
        if self.warnings:
            lines.append("Warnings:")
            lines.extend(w.format() for w in self.warnings)
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        """Raise :class:`DatasetError` listing every problem (first line: the summary).

        Raises:
            DatasetError: when there is at least one problem.
        """
        if self.problems:
            lines = [self.summary(), *(p.format() for p in self.problems)]
            raise DatasetError("\n".join(lines))


def _files(index: DatasetIndex, case: Case) -> tuple[str, ...]:
    images = ", ".join(index.relative(p) for p in case.image_paths)
    return (f"image: {images}", f"label: {index.relative(case.label_path)}")


def _short(err: Exception, index: DatasetIndex) -> str:
    """The reader's message with absolute paths shortened to the root."""
    return str(err).replace(str(index.root) + "/", "")


def check_dataset(index: DatasetIndex, *, num_folds: int | None = 5, ignore_label: int | None = None) -> CheckReport:
    """Read every case and report all problems and warnings.

    Args:
        index: from :func:`medseg.data.scan_dataset`.
        num_folds: cross-validation folds that will be used; fewer (distinct)
            cases is a warning (splits fall back to leave-one-out). ``None`` skips this check.
        ignore_label: label value of unlabeled voxels (``loss.ignore_label``): allowed
            in label files although dataset.json does not declare it.

    Returns:
        The :class:`CheckReport`; call ``report.raise_if_problems()`` to stop on problems.
    """
    report = CheckReport(root=index.root, layout=index.layout, training_cases=len(index.cases),
                         test_cases=len(index.test_cases))
    # entries refused while listing (scan_dataset(..., collect_problems=True)): reported with the rest
    report.problems.extend(Finding(message.replace(str(index.root) + "/", "")) for message in index.problems)
    if not index.cases:
        report.problems.append(Finding(f"no training cases found ({index.layout} layout, listed from {index.source})"))
        return report
    counts = Counter(c.case_id for c in index.cases)
    for case_id, n in sorted(counts.items()):
        if n > 1:
            files = [index.relative(c.image_paths[0]) for c in index.cases if c.case_id == case_id]
            report.problems.append(
                Finding(f"case id appears {n} times (ids must be unique): {', '.join(files)}", case_id)
            )
    declared = set(index.label_values) if index.label_values is not None else None
    if declared is not None and ignore_label is not None:
        declared.add(ignore_label)
    expected_channels = index.num_channels
    channel_source = "dataset.json declares" if expected_channels is not None else "the first case has"
    observed: set[int] = set()
    present_in: Counter[int] = Counter()
    for n, case in enumerate(index.cases):
        _log.info("checking %d/%d: %s", n + 1, len(index.cases), case.case_id)
        channels = _check_case(index, case, report, declared, expected_channels, channel_source, observed, present_in)
        if expected_channels is None and channels is not None:
            expected_channels = channels
        report.cases_checked += 1
    report.observed_label_values = sorted(observed)
    if declared is not None and report.cases_checked:
        for value, name in zip(index.label_values or [], index.label_names or []):
            if value not in (0, ignore_label) and present_in[value] == 0:
                report.warnings.append(Finding(f"class {value} ({name}) never occurs in any label file"))
    distinct = len(counts)
    if num_folds is not None and num_folds > 1 and distinct < num_folds:
        fallback = "leave-one-out" if distinct > 1 else "training and validating on the one case ('all')"
        report.warnings.append(
            Finding(
                f"{distinct} case(s) but {num_folds} cross-validation folds: splits fall back to {fallback}; "
                f"add cases, or set data.num_folds={max(distinct, 1)} (medseg check --folds / medseg train --set), or train with fold 'all'"
            )
        )
    return report


def _check_case(
    index: DatasetIndex,
    case: Case,
    report: CheckReport,
    declared: set[int] | None,
    expected_channels: int | None,
    channel_source: str,
    observed: set[int],
    present_in: Counter[int],
) -> int | None:
    files = _files(index, case)

    def problem(message: str) -> None:
        report.problems.append(Finding(message, case.case_id, files))

    missing = [p for p in case.image_paths if not p.exists()]
    for p in missing:
        problem(f"image file {index.relative(p)} does not exist")
    if case.label_path is None:
        problem("no label file listed for this case")
    elif not case.label_path.exists():
        problem(f"label file {index.relative(case.label_path)} does not exist")
    if missing:
        return None
    try:
        image, _ = read_case(case, with_label=False)
    except (ScanReadError, GeometryError) as err:
        problem(f"cannot read the image: {_short(err, index)}")
        image = None
    label = None
    if case.label_path is not None and case.label_path.exists():
        try:
            from medseg.io import read_volume

            label = read_volume(case.label_path, data_root=case.root, resample_tilt=case.resample_tilt)
        except (ScanReadError, GeometryError) as err:
            problem(f"cannot read the label: {_short(err, index)}")
    channels = None
    if image is not None:
        channels = image.num_channels
        if expected_channels is not None and channels != expected_channels:
            names = f" ({', '.join(index.channel_names)})" if index.channel_names else ""
            problem(f"image has {channels} channel(s) but {channel_source} {expected_channels}{names}")
    if label is None:
        return channels
    if label.num_channels != 1:
        try:
            refuse_multichannel_label(label)
        except ScanReadError as err:
            problem(_short(err, index))
        return channels
    if label.meta.get("format") == "jpeg":
        problem(
            "the label is a JPEG image: JPEG compression is lossy and changes class values at edges; "
            "store label images as PNG (or TIFF)"
        )
    if image is not None:
        if image.geometry.shape != label.geometry.shape:
            if image.spatial_dims == 2 and label.spatial_dims == 2 and image.meta.get("format") != "nifti":
                (w, h), (lw, lh) = image.geometry.shape, label.geometry.shape
                problem(f"label size {lw} x {lh} != image size {w} x {h} (width x height)")
            else:
                problem(f"label shape {label.geometry.shape} != image shape {image.geometry.shape}")
        elif not image.geometry.same_grid(label.geometry, atol_mm=GEOMETRY_TOLERANCE_MM):
            distance = image.geometry.max_corner_distance(label.geometry)
            problem(
                f"label grid differs from the image grid by up to {distance:.3g} mm at the field-of-view corners: "
                f"{label.geometry.describe_difference(image.geometry)} (label vs image); resample the label onto "
                "the image (nearest neighbour) or fix its header"
            )
    _check_label_values(label.array, case, declared, problem, report, index, files, observed, present_in)
    return channels


def _check_label_values(array, case, declared, problem, report, index, files, observed, present_in) -> None:
    values = np.unique(array)
    if np.issubdtype(values.dtype, np.floating):
        fractional = values[values != np.rint(values)]
        if fractional.size:
            shown = ", ".join(f"{v:g}" for v in fractional[:5])
            more = f" (+{fractional.size - 5} more)" if fractional.size > 5 else ""
            problem(f"label holds non-integer values {shown}{more}; label maps must hold integer class values")
            return
    ints = sorted({int(v) for v in values})
    negative = [v for v in ints if v < 0]
    if negative:
        problem(f"label holds negative values {negative}; class values must be >= 0")
    observed.update(ints)
    for v in ints:
        present_in[v] += 1
    if declared is not None:
        unknown = sorted(set(ints) - declared)
        if unknown:
            problem(
                f"label values {_fmt_set(unknown)} not in dataset.json labels {_fmt_set(sorted(declared))}; "
                "declare them, fix the label map, or set loss.ignore_label (medseg check --ignore-label) "
                "if one marks unlabeled voxels"
            )
    if ints == [0]:
        report.warnings.append(Finding("label is empty (background only)", case.case_id, files))


def _fmt_set(values: list[int]) -> str:
    return "{" + ", ".join(str(v) for v in values) + "}"
