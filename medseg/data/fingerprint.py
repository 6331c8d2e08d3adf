"""Dataset fingerprint: the facts about the data that the planner needs (nnU-Net's recipe).

Per case (after re-orientation to RAS, so axes are comparable across cases):
spacing, shape, shape after cropping to the non-zero bounding box, voxels per
label value. Per channel, over all cases: statistics of the *foreground*
intensities (voxels with label > 0), from a seeded sample of at most
:data:`SAMPLES_PER_CASE` voxels per case: mean, std, median, min, max and the
0.5 / 99.5 percentiles (the CT clipping window).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.data.folders import DatasetIndex, read_case
from medseg.data.plan import modality_of
from medseg.errors import ConfigError, DatasetError, GeometryError, ScanReadError
from medseg.records import check_record, field_problems
from medseg.spatial import nonzero_bbox, orientation_transform, reorient

__all__ = ["FINGERPRINT_FORMAT_VERSION", "SAMPLES_PER_CASE", "Fingerprint", "compute_fingerprint", "modality_of"]

FINGERPRINT_FORMAT_VERSION = 1
SAMPLES_PER_CASE = 100_000
"""Foreground voxels sampled per case and channel for the intensity statistics."""
SAMPLING_SEED = 1234

_log = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class Fingerprint:
    """What the data looks like (see module docstring); frozen, JSON-serialisable.

    Attributes:
        case_ids: cases in the order of the per-case lists.
        data_dims: 3 for volumes, 2 for 2D images.
        spacings: mm per RAS axis per case.
        shapes: voxels per RAS axis per case.
        shapes_after_crop: shapes after cropping to the non-zero bounding box.
        channel_names: modality per channel (declared, or inferred).
        modality: "CT", "MR" or "other".
        modality_inferred: True when the folder did not declare channel names
            and the modality was inferred from the intensities (HU-like integer
            data reaching below -500 is taken as CT).
        intensity: per channel ``{mean, std, median, min, max, p00_5, p99_5}``
            of foreground voxels (empty dict when no case has foreground).
        label_values, label_names: declared (or observed) label values and names.
        class_voxels: per case, voxels per label value (aligned with label_values).
    """

    format_version: int = FINGERPRINT_FORMAT_VERSION
    dataset_name: str = ""
    case_ids: list[str]
    data_dims: int
    spacings: list[list[float]]
    shapes: list[list[int]]
    shapes_after_crop: list[list[int]]
    channel_names: list[str]
    modality: str
    modality_inferred: bool = False
    intensity: list[dict[str, float]]
    label_values: list[int]
    label_names: list[str]
    class_voxels: list[list[int]]

    @property
    def num_cases(self) -> int:
        return len(self.case_ids)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def class_frequencies(self) -> list[float]:
        """Share of all voxels per class (background included), summing to 1."""
        totals = np.asarray(self.class_voxels, dtype=np.float64).sum(axis=0)
        return (totals / max(totals.sum(), 1.0)).tolist()

    @property
    def class_presence(self) -> list[float]:
        """Share of cases in which each class occurs."""
        counts = np.asarray(self.class_voxels) > 0
        return counts.mean(axis=0).tolist() if len(counts) else [0.0] * len(self.label_values)

    @property
    def median_relative_size_after_crop(self) -> float:
        ratios = [np.prod(c) / max(np.prod(s), 1) for c, s in zip(self.shapes_after_crop, self.shapes)]
        return float(np.median(ratios)) if ratios else 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:

        check_record(cls, data, version=FINGERPRINT_FORMAT_VERSION, what="fingerprint",
                     remedy="recompute it with compute_fingerprint.")
        problems = field_problems(cls, data)
        if problems:
            raise ConfigError(f"fingerprint has invalid fields: {'; '.join(problems)}; recompute it with compute_fingerprint.")
        return cls(**data)


def _oriented(image: np.ndarray, geometry: Any) -> tuple[np.ndarray, list[float]]:
    """Image re-oriented to RAS and its spacing in RAS axis order (3D); 2D unchanged."""
    spacing = list(geometry.spacing)
    if geometry.spatial_dims != 3:
        return image, spacing
    ornt = orientation_transform(geometry.affine)
    oriented_spacing = [0.0] * 3
    for axis, (target, _) in enumerate(ornt):
        oriented_spacing[int(target)] = spacing[axis]
    return reorient(image, ornt), oriented_spacing


def compute_fingerprint(
    index: DatasetIndex, *, samples_per_case: int = SAMPLES_PER_CASE, ignore_label: int | None = None
) -> Fingerprint:
    """Read every training case once and summarise it.

    Args:
        index: from :func:`medseg.data.scan_dataset` (run :func:`check_dataset` first:
            this function stops at the first unreadable case).
        samples_per_case: foreground voxels sampled per case for intensity statistics.
        ignore_label: label value of unlabeled voxels (``loss.ignore_label``): no class,
            allowed although dataset.json does not declare it, and not foreground.

    Raises:
        DatasetError: no cases, or a case cannot be read.
    """
    if not index.cases:
        raise DatasetError(f"dataset {index.root} has no training cases; nothing to fingerprint.")
    rng = np.random.default_rng(SAMPLING_SEED)
    spacings, shapes, cropped, counts = [], [], [], []
    samples: list[list[np.ndarray]] = []
    data_dims = None
    num_channels = None
    integer_valued = True
    global_min: float = np.inf
    for n, case in enumerate(index.cases):
        try:
            image_vol, label_vol = read_case(case)
        except (ScanReadError, GeometryError) as err:
            raise DatasetError(f"case {case.case_id!r}: {err} (run `medseg check {index.root}`)") from err
        if label_vol is None:
            raise DatasetError(f"case {case.case_id!r} has no label file; the fingerprint needs labelled cases.")
        image, spacing = _oriented(image_vol.array, image_vol.geometry)
        label, _ = _oriented(label_vol.array, label_vol.geometry)
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise DatasetError(
                f"case {case.case_id!r}: label shape {label.shape[1:]} != image shape {image.shape[1:]} "
                f"(run `medseg check {index.root}`)."
            )
        data_dims = data_dims or image_vol.spatial_dims
        num_channels = num_channels or image.shape[0]
        if image.shape[0] != num_channels:
            raise DatasetError(
                f"case {case.case_id!r} has {image.shape[0]} channels, the first case {num_channels} "
                f"(run `medseg check {index.root}`)."
            )
        spacings.append([float(s) for s in spacing])
        shapes.append([int(s) for s in image.shape[1:]])
        bbox = nonzero_bbox(image)
        cropped.append([b - a for a, b in bbox])
        values, value_counts = np.unique(label, return_counts=True)
        counts.append(dict(zip((int(v) for v in values), (int(c) for c in value_counts))))
        foreground = (label[0] > 0) & (label[0] != ignore_label) if ignore_label is not None else label[0] > 0
        per_channel = []
        for c in range(image.shape[0]):
            fg = image[c][foreground]
            if fg.size > samples_per_case:
                fg = fg[rng.choice(fg.size, samples_per_case, replace=False)]
            per_channel.append(fg.astype(np.float64))
        samples.append(per_channel)
        if index.channel_names is None:
            global_min = min(global_min, float(image.min()))
            integer_valued = integer_valued and (
                np.issubdtype(image.dtype, np.integer) or bool(np.all(np.mod(image[:, ::4], 1) == 0))
            )
        _log.debug("fingerprint %d/%d: %s", n + 1, len(index.cases), case.case_id)
    num_channels = int(num_channels or 0)
    intensity = []
    for c in range(num_channels):
        values = np.concatenate([s[c] for s in samples]) if samples else np.zeros(0)
        if values.size == 0:
            intensity.append({})
            continue
        p005, p995 = np.percentile(values, [0.5, 99.5])
        intensity.append({
            "mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
            "min": float(values.min()), "max": float(values.max()), "p00_5": float(p005), "p99_5": float(p995),
        })
    observed = sorted(set().union(*counts) - {ignore_label})
    if index.label_values is not None:
        label_values, label_names = list(index.label_values), list(index.label_names or [])
        unknown = sorted(set(observed) - set(label_values))
        if unknown:
            raise DatasetError(
                f"label values {unknown} occur in {index.root} but dataset.json declares {label_values} "
                f"(run `medseg check {index.root}`)."
            )
    else:
        label_values = sorted(set(observed) | {0})
        label_names = ["background" if v == 0 else f"label_{v}" for v in label_values]
    class_voxels = [[c.get(v, 0) for v in label_values] for c in counts]
    inferred = index.channel_names is None
    if inferred:
        looks_ct = num_channels == 1 and integer_valued and global_min <= -500
        channel_names = ["CT"] if looks_ct else [f"channel_{c}" for c in range(num_channels)]
    else:
        channel_names = list(index.channel_names or [])
    return Fingerprint(
        dataset_name=index.name,
        case_ids=[c.case_id for c in index.cases],
        data_dims=int(data_dims),
        spacings=spacings,
        shapes=shapes,
        shapes_after_crop=cropped,
        channel_names=channel_names,
        modality=modality_of(channel_names),
        modality_inferred=inferred,
        intensity=intensity,
        label_values=label_values,
        label_names=label_names,
        class_voxels=class_voxels,
    )
