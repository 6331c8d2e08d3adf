"""The plan: training and preprocessing settings derived from a dataset's fingerprint.

A :class:`Plan` is what the data implies (target spacing, normalisation, patch
and batch size, network topology, class weights); the config is what the user
asks for. The plan is saved as ``plan.json`` beside the model and drives the
exact same preprocessing at training and inference time.

Axis conventions: every case is first re-oriented (axis permutation and flips
only, no interpolation) to ``plan.orientation`` (RAS); ``target_spacing``,
``patch_size`` and the topology are in that canonical axis order.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medseg.errors import ConfigError
from medseg.records import check_record, field_problems, read_json
from medseg.settings import DataConfig
from medseg.spatial import ANISOTROPY_THRESHOLD, thick_axis
from medseg.topology import fit_patch_to_topology, unet_topology

if TYPE_CHECKING:
    from medseg.data.fingerprint import Fingerprint

PLAN_FORMAT_VERSION = 1

__all__ = [
    "PLAN_FORMAT_VERSION",
    "ChannelNorm",
    "Plan",
    "class_weights_from_frequencies",
    "ct_clip_rule",
    "ct_shoulder_rule",
    "load_plan",
    "make_plan",
    "modality_of",
    "save_plan",
]


_MR_NAMES = {
    "mr", "mri", "t1", "t1w", "t2", "t2w", "flair", "t1gd", "t1ce", "t1c", "adc", "dwi", "pd", "pdw", "swi",
    "bold", "dce", "hbv", "t2star", "t2*", "cine", "lge",
}


def modality_of(channel_names: list[str]) -> str:
    """``"CT"`` if any channel is named CT, ``"MR"`` for MR sequence names, else ``"other"``."""
    tokens = [set(re.split(r"[^a-z0-9*]+", n.lower())) | {n.strip().lower()} for n in channel_names]
    if any("ct" in t for t in tokens):
        return "CT"
    if any(t & _MR_NAMES for t in tokens):
        return "MR"
    return "other"


@dataclass(frozen=True, kw_only=True)
class ChannelNorm:
    """Intensity normalisation of one input channel.

    * ``ct``: clip to ``clip`` (a window in HU chosen by ``clip_rule``, see
      :func:`ct_clip_rule`), then ``(x - mean) / std`` with the dataset's
      foreground mean/std. With a ``knee`` (``contrast_robust``), HU outside the
      knee window (the training foreground's 0.5/99.5 percentiles) count
      ``1 / shoulder`` as much: soft tissue keeps nnU-Net's contrast, and brighter
      (contrast-enhanced) or darker tissue up to the clip stays ordered and
      distinct instead of saturating (:meth:`hu_to_units`; docs/plan.md).
    * ``zscore``: per-image ``(x - mean(x)) / std(x)``, computed inside the
      non-zero mask when ``use_nonzero_mask`` (outside stays 0).
    * ``none``: unchanged.
    """

    scheme: Literal["ct", "zscore", "none"]
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    use_nonzero_mask: bool = False
    clip_rule: Literal["contrast_robust", "foreground_percentiles"] | None = None
    """``ct`` only: the rule that chose ``clip`` (``data.ct_clip``); recorded for the reader of plan.json."""
    knee: tuple[float, float] | None = None
    """``ct`` only: HU window of full contrast; outside it (up to ``clip``) HU count ``1 / shoulder``."""
    shoulder: float = 1.0

    def hu_to_units(self, hu: Any) -> Any:
        """CT: HU -> the network's normalised units (clip, knee, then ``(x - mean) / std``); float32 arrays."""
        x = np.asarray(hu, dtype=np.float32)
        if self.clip is not None:
            x = np.clip(x, np.float32(self.clip[0]), np.float32(self.clip[1]))
        if self.knee is not None and self.shoulder != 1.0:
            a, b = np.float32(self.knee[0]), np.float32(self.knee[1])
            s = np.float32(self.shoulder)
            x = np.where(x > b, b + (x - b) / s, np.where(x < a, a + (x - a) / s, x))
        mean = np.float32(self.mean if self.mean is not None else 0.0)
        std = np.float32(max(float(self.std if self.std is not None else 1.0), 1e-8))
        return ((x - mean) / std).astype(np.float32, copy=False)

    def units_to_hu(self, units: Any) -> Any:
        """CT: the inverse of :meth:`hu_to_units` inside the clip window (values outside come back clipped)."""
        mean = float(self.mean if self.mean is not None else 0.0)
        std = max(float(self.std if self.std is not None else 1.0), 1e-8)
        x = np.asarray(units, dtype=np.float32) * np.float32(std) + np.float32(mean)
        if self.knee is not None and self.shoulder != 1.0:
            a, b = np.float32(self.knee[0]), np.float32(self.knee[1])
            s = np.float32(self.shoulder)
            x = np.where(x > b, b + (x - b) * s, np.where(x < a, a + (x - a) * s, x))
        if self.clip is not None:
            x = np.clip(x, np.float32(self.clip[0]), np.float32(self.clip[1]))
        return x.astype(np.float32, copy=False)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Settings derived from the data (see docs/plan.md for the rules).

    Attributes:
        spatial_dims: dimensionality of the network (2 or 3).
        data_dims: dimensionality of the cases (3 for volumes; 2D training on 3D
            data has ``data_dims=3, spatial_dims=2``).
        image_channels: channels per case (e.g. 4 MR sequences).
        in_channels: network input channels (``image_channels * (2 * slice_context + 1)``).
        channel_names: modality name per channel (e.g. ``["CT"]``).
        label_values: label value in the files for each output class index
            (``label_values[0] == 0`` is background).
        label_names: name per output class index.
        ignore_label: label value of unlabeled voxels (``loss.ignore_label``), or
            ``None``. It is no class: preprocessing maps it to the index
            ``num_classes``, which the losses and the validation Dice skip.
        orientation: axis codes every case is re-oriented to before resampling.
        target_spacing: mm per canonical axis (``data_dims`` entries).
        normalization: one :class:`ChannelNorm` per image channel.
        crop_to_nonzero: crop cases to the non-zero bounding box first.
        patch_size: training window (``spatial_dims`` entries); also the
            sliding-window size at inference.
        batch_size: patches per step.
        kernel_sizes, strides: U-Net topology, one entry per stage
            (``strides[0]`` is all ones); see ``medseg.topology``.
        slice_axis: 2D on 3D data: the canonical axis that is sliced.
        slice_context: 2D only: neighbouring slices each side as channels.
        class_weights: cross-entropy weight per class (background included).
        class_sampling_ratios: relative chance that a foreground patch is
            centred on each class (background entry is for random patches).
        foreground_oversample: share of patches centred on foreground.
        median_shape: median case shape after cropping and resampling.
        modality: "CT", "MR" or "other" (from the channel names).
        configuration: why this configuration (3D, 2D, 2.5D) was chosen when a
            time budget let medseg choose (``medseg.training.budget``); empty otherwise.
    """

    format_version: int = PLAN_FORMAT_VERSION
    spatial_dims: int
    data_dims: int
    image_channels: int
    in_channels: int
    channel_names: list[str]
    label_values: list[int]
    label_names: list[str]
    ignore_label: int | None = None
    orientation: str = "RAS"
    target_spacing: list[float]
    normalization: list[ChannelNorm]
    crop_to_nonzero: bool = True
    patch_size: list[int]
    batch_size: int
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    slice_axis: int | None = None
    slice_context: int = 0
    class_weights: list[float]
    class_sampling_ratios: list[float]
    foreground_oversample: float = 0.33
    median_shape: list[int] = field(default_factory=list)
    modality: str = "other"
    configuration: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name."""
        return dict(zip(self.label_values, self.label_names))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:

        check_record(cls, data, version=PLAN_FORMAT_VERSION, what="plan",
                     remedy="re-plan the dataset or use the medseg version that made it.")
        problems = field_problems(cls, data, skip={"normalization"})
        norms = data.get("normalization")
        if not isinstance(norms, list) or not all(isinstance(n, dict) for n in norms):
            problems.append(f"normalization={norms!r} (expected a list of mappings)")
            norms = []
        for i, norm in enumerate(norms):
            problems += [f"normalization[{i}].{p}" for p in field_problems(ChannelNorm, norm, skip={"clip", "knee"})]
            for name in ("clip", "knee"):
                window = norm.get(name)
                if window is not None and (
                    not isinstance(window, (list, tuple)) or len(window) != 2
                    or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in window)
                ):
                    problems.append(f"normalization[{i}].{name}={window!r} (expected [low, high] or null)")
        if problems:
            raise ConfigError(
                "plan has invalid fields: " + "; ".join(problems) + ". The plan.json (or model.json) was edited "
                "or corrupted: re-train, or restore the file from the run folder."
            )
        values = dict(data)
        values["normalization"] = [
            ChannelNorm(**{**n, **{k: tuple(n[k]) if n.get(k) is not None else None for k in ("clip", "knee")}})
            for n in norms
        ]
        return cls(**values)

    def diff(self, other: Plan) -> list[str]:
        """Field-by-field differences, for refusing mismatched checkpoints."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b.get(k) and k != "configuration"]


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write ``plan.json`` atomically (replacing an existing file)."""
    from medseg.io.atomic import write_json_atomic

    write_json_atomic(plan.to_dict(), path, overwrite=True)


def load_plan(path: str | Path) -> Plan:
    """Read ``plan.json``.

    Raises:
        ConfigError: unreadable file, or a record that is not a plan (each bad field named), naming ``path``.
    """
    path = Path(path)
    data = read_json(path, ConfigError, "plan")
    try:
        return Plan.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


# =========================================================================== planning
#
# The rules (docs/plan.md lists them with the numbers): nnU-Net's planner,
# re-derived, with a memory budget that also fits a small CPU.

"""A thick axis is > 3x the other spacings (and has < 1/3 of their voxels)."""
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
MIN_EDGE = 4
MAX_STAGES = {2: 7, 3: 6}
INITIAL_PATCH_VOXELS = {2: 2048**2, 3: 256**3}
BYTES_PER_UNIT = 8e9 / (560e6 * 2)
"""Activation bytes per feature-map element per sample (nnU-Net's reference: 560e6 units <-> 8 GB at batch 2)."""
MIN_BATCH = 2
MAX_DATASET_COVERED = 0.05
"""A batch may cover at most 5 % of all dataset voxels (nnU-Net), but is never below MIN_BATCH."""
DEFAULT_BUDGET_GB = {"cuda": 8.0, "cpu": 1.0, "mps": 1.0}
ZSCORE_NONZERO_MASK_BELOW = 0.75
"""Per-image z-score inside the non-zero mask when cropping keeps < 75 % of the voxels (median)."""
CLASS_WEIGHT_CLIP = (0.1, 10.0)
CT_CLIP_LOWER_AT_MOST = -200.0
"""``contrast_robust``: the CT window reaches down to at least -200 HU (fat, -150..-50 HU, stays inside)."""
CT_CLIP_UPPER_AT_LEAST = 500.0
"""``contrast_robust``: the CT window reaches up to at least +500 HU, above contrast-enhanced organs
(portal-venous liver ~100-130, spleen ~120-140, kidney cortex up to ~250 HU) and the bulk of an
arterial-phase aorta (250-400 HU; patient C's median 354 HU); see docs/plan.md."""


def _median_shape_after_resampling(fp: Any, target: list[float]) -> list[float]:
    import numpy as np

    shapes = np.asarray(fp.shapes_after_crop, dtype=float)
    spacings = np.asarray(fp.spacings, dtype=float)
    resampled = shapes * spacings / np.asarray(target, dtype=float)
    return np.median(resampled, axis=0).tolist()


def target_spacing_rule(spacings: list[list[float]], shapes: list[list[int]]) -> list[float]:
    """Median spacing per axis; nnU-Net's rule for thick slices.

    When the largest median spacing is more than 3x the smallest *and* that
    axis has fewer than 1/3 of the voxels of the smallest axis (median shape),
    its target is the 10th percentile of its spacings instead, but never finer
    than the largest of the other axes' targets.
    """
    import numpy as np

    spacings_arr = np.asarray(spacings, dtype=float)
    target = np.median(spacings_arr, axis=0)
    if target.size < 3:
        return target.tolist()
    median_shape = np.median(np.asarray(shapes, dtype=float), axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(target.size) if a != worst]
    has_aniso_spacing = thick_axis(target) == worst
    has_aniso_voxels = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[others])
    if has_aniso_spacing and has_aniso_voxels:
        thick = float(np.percentile(spacings_arr[:, worst], 10))
        target[worst] = max(thick, float(max(target[others])))
    return target.tolist()


def feature_map_units(patch: list[int], strides: list[list[int]], *, in_channels: int, num_classes: int) -> float:
    """Activation elements of a U-Net forward pass for one sample (nnU-Net-style estimate).

    Per stage ``s`` with ``v_s`` voxels and ``f_s = min(32 * 2**s, max)`` features:
    2 encoder convolutions, and (above the bottleneck) a transposed convolution,
    2 decoder convolutions and a deep-supervision output of ``num_classes``.
    """
    ndim = len(patch)
    size = [float(p) for p in patch]
    units = float(in_channels) * float(math.prod(size))
    last = len(strides) - 1
    for s, stride in enumerate(strides):
        size = [a / b for a, b in zip(size, stride)]
        voxels = float(math.prod(size))
        features = min(BASE_FEATURES * 2**s, MAX_FEATURES[ndim])
        units += 2 * voxels * features
        if s < last:
            units += 3 * voxels * features + voxels * num_classes
    return units


def _topology(patch: list[int], spacing: list[float]) -> tuple[list[list[int]], list[list[int]], list[int]]:

    ndim = len(patch)
    kernels, strides = unet_topology(patch, spacing, min_edge=MIN_EDGE, max_stages=MAX_STAGES[ndim])
    return kernels, strides, fit_patch_to_topology(patch, strides)


def _topology_for_pinned(patch: list[int], spacing: list[float]) -> tuple[list[list[int]], list[list[int]]]:
    """Topology for a user-pinned patch: drop the deepest stages until the patch is divisible."""

    kernels, strides = unet_topology(patch, spacing, min_edge=MIN_EDGE, max_stages=MAX_STAGES[len(patch)])
    while len(strides) > 1 and fit_patch_to_topology(patch, strides) != list(patch):
        strides = strides[:-1]
        kernels = [*kernels[: len(strides) - 1], [3] * len(patch)]
    return kernels, strides


def plan_patch_and_batch(
    spacing: list[float],
    median_shape: list[float],
    *,
    budget_gb: float,
    in_channels: int,
    num_classes: int,
    dataset_voxels: float,
) -> tuple[list[int], int, list[list[int]], list[list[int]]]:
    """Patch size, batch size and topology from the median shape and a memory budget.

    1. Start from a patch with the aspect ratio ``1 / spacing`` and 256^3 (3D)
       or 2048^2 (2D) voxels, clipped to the median shape.
    2. Compute the topology and round the patch up to its down-sampling factor.
    3. While a batch of 2 would need more than the budget
       (``feature_map_units * BYTES_PER_UNIT * 2``), shrink the axis with the
       largest patch / median-shape ratio by one down-sampling step.
    4. Batch = budget / per-sample memory, capped so that a batch covers at
       most 5 % of the dataset's voxels, and at least 2.
    """
    import numpy as np

    ndim = len(spacing)
    inv = 1.0 / np.asarray(spacing, dtype=float)
    patch_f = inv * (INITIAL_PATCH_VOXELS[ndim] / float(np.prod(inv))) ** (1.0 / ndim)
    patch = [max(1, round(min(p, m))) for p, m in zip(patch_f, median_shape)]
    budget = budget_gb * 1e9
    kernels, strides, fitted = _topology(patch, spacing)
    for _ in range(1000):
        per_sample = feature_map_units(fitted, strides, in_channels=in_channels, num_classes=num_classes) * BYTES_PER_UNIT
        if per_sample * MIN_BATCH <= budget:
            break
        ratios = [p / max(m, 1.0) for p, m in zip(fitted, median_shape)]
        factors = [math.prod(s[a] for s in strides) for a in range(ndim)]
        order = sorted(range(ndim), key=lambda a: -ratios[a])
        axis = next((a for a in order if fitted[a] - factors[a] >= 2 * MIN_EDGE), None)
        if axis is None:
            break
        patch = list(fitted)
        patch[axis] = fitted[axis] - factors[axis]
        kernels, strides, fitted = _topology(patch, spacing)
    per_sample = feature_map_units(fitted, strides, in_channels=in_channels, num_classes=num_classes) * BYTES_PER_UNIT
    batch = int(budget // max(per_sample, 1.0))
    cap = int(dataset_voxels * MAX_DATASET_COVERED // max(math.prod(fitted), 1))
    batch = max(MIN_BATCH, min(batch, cap))
    return fitted, batch, kernels, strides


def class_weights_from_frequencies(freqs: Sequence[float], *, absent: float = 1.0) -> list[float]:
    """Cross-entropy class weights from class frequencies: inverse square root, normalised, clipped.

    Rule: ``w_c = 1 / sqrt(f_c)`` for each present class (``f_c > 0``), scaled so
    the mean over present classes is 1, then clipped to ``[0.1, 10]``; absent
    classes get ``absent`` (1). Frequencies may be fractions or voxel counts (the rule is
    scale-free). The square root tempers plain inverse frequency, which would
    give a 0.1 %-volume tumour 1000x the weight of the background. The plan's
    ``class_weights`` (``loss.class_weights: auto``) and the balanced patch
    sampling (:func:`class_sampling_rule`) both use it.

    Args:
        freqs: one non-negative frequency per class, background first.
        absent: the weight of a class that never occurs.

    Raises:
        ConfigError: negative or non-finite values, or no class present.

    Example::

        >>> [round(w, 3) for w in class_weights_from_frequencies([0.81, 0.18, 0.01])]
        [0.247, 0.525, 2.227]
    """
    freq = np.asarray([float(f) for f in freqs], dtype=float)
    if not freq.size or not np.isfinite(freq).all() or (freq < 0).any() or not (freq > 0).any():
        raise ConfigError(
            f"class frequencies must be finite, non-negative and not all zero, got {freq.tolist()}; "
            "recompute the dataset fingerprint."
        )
    present = freq > 0
    weights = np.full_like(freq, absent)
    weights[present] = 1.0 / np.sqrt(freq[present])
    weights[present] /= weights[present].mean()
    weights[present] = np.clip(weights[present], *CLASS_WEIGHT_CLIP)
    return [float(w) for w in weights]


def class_sampling_rule(
    frequencies: list[float], *, foreground_oversample: float, mode: str
) -> list[float]:
    """Chance that a patch is random (entry 0) or centred on each foreground class.

    Entry 0 is ``1 - foreground_oversample``; the foreground entries sum to
    ``foreground_oversample`` and are split by ``mode``: ``balanced``:
    proportional to ``1 / sqrt(frequency)`` (normalised, clipped to [0.1, 10]
    x the mean, so rare classes are centred more often); ``uniform``: equal.
    Classes that never occur get 0.
    """
    import numpy as np

    freq = np.asarray(frequencies, dtype=float)
    ratios = np.zeros_like(freq)
    fg = freq[1:]
    present = fg > 0
    if present.any():
        if mode == "balanced":
            share = np.asarray(class_weights_from_frequencies([1.0, *fg.tolist()], absent=0.0)[1:])
        else:
            share = present.astype(float)
        share = np.where(present, share, 0.0)
        ratios[1:] = foreground_oversample * share / share.sum()
        ratios[0] = 1.0 - foreground_oversample
    else:
        ratios[0] = 1.0
    return ratios.tolist()


CT_SHOULDER_UNITS = 2.0  # contrast_robust: HU between the knee and the clip span at most this many units


def ct_shoulder_rule(clip: tuple[float, float], knee: tuple[float, float], std: float) -> float:
    """How much less a HU outside the knee window counts than one inside it (``contrast_robust``).

    Inside the knee (the training foreground's 0.5/99.5 percentiles) one HU is ``1 / std``
    units, as in nnU-Net. The HU between the knee and the clip bounds (enhanced vessels and
    organs above it, fat and gas below) are compressed so that each side spans at most
    ``CT_SHOULDER_UNITS`` units: wide enough that enhanced tissue stays ordered and
    distinct, narrow enough that the network's inputs stay within a few units (inputs of
    10-20 units slow training down badly; measured on the synthetic phantoms).

    Example::

        >>> ct_shoulder_rule((-245.0, 500.0), (-245.0, 78.0), 50.0)  # 422 HU above the knee -> 2 units
        4.22
    """
    widest = max(clip[1] - knee[1], knee[0] - clip[0], 0.0)
    return float(max(1.0, widest / (CT_SHOULDER_UNITS * std)))


def ct_clip_rule(p00_5: float, p99_5: float, *, rule: str) -> tuple[float, float]:
    """The CT clip window in HU from the training foreground's 0.5 / 99.5 percentiles.

    * ``foreground_percentiles`` (nnU-Net): ``(p00_5, p99_5)``. On non-contrast
      training scans the upper bound lands near 80 HU, so every contrast-enhanced
      organ of a later scan saturates at the same value.
    * ``contrast_robust`` (default): ``(min(p00_5, -200), max(p99_5, 500))``: the
      window never stops short of the HU range that contrast-enhanced soft
      tissue and vessels occupy, whatever phase the training scans were taken in.

    Example::

        >>> ct_clip_rule(-245.0, 78.0, rule="contrast_robust")
        (-245.0, 500.0)
    """
    if rule == "foreground_percentiles":
        return float(p00_5), float(p99_5)
    if rule == "contrast_robust":
        return float(min(p00_5, CT_CLIP_LOWER_AT_MOST)), float(max(p99_5, CT_CLIP_UPPER_AT_LEAST))
    raise ConfigError(f"data.ct_clip must be 'contrast_robust' or 'foreground_percentiles', got {rule!r}.")


def make_plan(
    fingerprint: Fingerprint,
    data: DataConfig | None = None,
    *,
    class_weights: Sequence[float] | None = None,
    ignore_label: int | None = None,
    device_type: str = "cpu",
) -> Plan:
    """Derive the plan from a dataset fingerprint (nnU-Net's rules; docs/plan.md).

    Args:
        fingerprint: :class:`medseg.data.fingerprint.Fingerprint`.
        data: the ``data`` settings; any non-null field (spatial_dims,
            target_spacing, patch_size, batch_size, normalization, ...) pins the
            matching plan field. ``None``: defaults.
        class_weights: pinned cross-entropy weights, one per class (``loss.class_weights``
            given as a list); ``None``: :func:`class_weights_from_frequencies`.
        ignore_label: the label value marking unlabeled voxels (``loss.ignore_label``).
        device_type: ``"cpu"``, ``"cuda"`` or ``"mps"``: picks the default
            memory budget when ``data.memory_budget_gb`` is null (8 GB on
            CUDA, 1 GB otherwise).

    Returns:
        A frozen :class:`Plan`.

    Raises:
        ConfigError: a pinned field does not fit the data (e.g. 3D on 2D images,
            wrong number of class weights).
    """
    import warnings

    import numpy as np

    data = data if data is not None else DataConfig()
    fp = fingerprint
    data_dims = int(fp.data_dims)
    # --- target spacing
    target = target_spacing_rule(fp.spacings, fp.shapes_after_crop)
    median = _median_shape_after_resampling(fp, target)
    # --- dimensionality
    spatial_dims = data.spatial_dims
    if spatial_dims is None:
        spatial_dims = 3 if data_dims == 3 and min(median) > 1.5 else 2
    if spatial_dims == 3 and data_dims == 2:
        raise ConfigError("data.spatial_dims=3 but the dataset holds 2D images; use spatial_dims 2 (or null).")
    slice_axis = None
    if spatial_dims == 2 and data_dims == 3:
        sp = np.asarray(target)
        # thick slices: slice across the thick axis; otherwise axial slices (S axis)
        thick = thick_axis(sp)
        slice_axis = thick if thick is not None else 2
    if data.target_spacing is not None:
        pinned = [float(s) for s in data.target_spacing]
        if len(pinned) == data_dims:
            target = pinned
        elif slice_axis is not None and len(pinned) == 2:
            target = [pinned.pop(0) if a != slice_axis else target[a] for a in range(3)]
        else:
            raise ConfigError(f"data.target_spacing {data.target_spacing} must have {data_dims} entries for this dataset.")
        median = _median_shape_after_resampling(fp, target)
    # --- channels and normalisation
    image_channels = fp.num_channels
    slice_context = int(data.slice_context) if spatial_dims == 2 and data_dims == 3 else 0
    in_channels = image_channels * (2 * slice_context + 1)
    normalization = []
    use_mask = fp.median_relative_size_after_crop < ZSCORE_NONZERO_MASK_BELOW
    for c, name in enumerate(fp.channel_names):
        scheme = data.normalization
        if scheme == "auto":
            scheme = "ct" if modality_of([name]) == "CT" else "zscore"
        stats = fp.intensity[c] if c < len(fp.intensity) else {}
        if scheme == "ct" and not stats:
            warnings.warn(
                f"channel {c} ({name}): no foreground voxels to compute CT statistics from; using per-image z-score.",
                stacklevel=2,
            )
            scheme = "zscore"
        if scheme == "ct":
            rule = data.ct_clip
            clip = ct_clip_rule(stats["p00_5"], stats["p99_5"], rule=rule)
            knee = (float(stats["p00_5"]), float(stats["p99_5"]))
            std = max(float(stats["std"]), 1e-8)
            robust = rule == "contrast_robust" and clip != knee
            normalization.append(
                ChannelNorm(scheme="ct", clip=clip, mean=stats["mean"], std=std, clip_rule=rule,
                            knee=knee if robust else None, shoulder=ct_shoulder_rule(clip, knee, std) if robust else 1.0)
            )
        elif scheme == "zscore":
            normalization.append(ChannelNorm(scheme="zscore", use_nonzero_mask=bool(use_mask)))
        else:
            normalization.append(ChannelNorm(scheme="none"))
    # --- classes (the ignore label is none; a fingerprint lists it when dataset.json declares it)
    if ignore_label == 0:
        raise ConfigError(
            "loss.ignore_label is 0, the background value; mark unlabeled voxels with a value that is no class "
            "(e.g. 255) and set loss.ignore_label to it."
        )
    keep = [i for i, v in enumerate(fp.label_values) if v != ignore_label]
    label_values = [int(fp.label_values[i]) for i in keep]
    label_names = [str(fp.label_names[i]) for i in keep]
    all_frequencies = fp.class_frequencies
    frequencies = [all_frequencies[i] for i in keep]
    # --- patch, batch, topology
    num_classes = len(label_values)
    if slice_axis is not None:
        net_spacing = [target[a] for a in range(3) if a != slice_axis]
        net_median = [median[a] for a in range(3) if a != slice_axis]
    else:
        net_spacing, net_median = list(target), list(median)
    budget = data.memory_budget_gb
    if budget is None:
        budget = DEFAULT_BUDGET_GB.get(device_type.split(":")[0], 1.0)
    total_voxels = float(sum(math.prod(s) for s in fp.shapes_after_crop)) * float(
        math.prod(np.median(np.asarray(fp.spacings), axis=0)) / math.prod(target)
    )
    patch, batch, kernels, strides = plan_patch_and_batch(
        net_spacing, net_median, budget_gb=float(budget), in_channels=in_channels, num_classes=num_classes,
        dataset_voxels=total_voxels,
    )
    if data.patch_size is not None:
        patch = [int(p) for p in data.patch_size]
        if len(patch) != spatial_dims:
            raise ConfigError(f"data.patch_size {patch} must have {spatial_dims} entries (spatial_dims={spatial_dims}).")
        kernels, strides = _topology_for_pinned(patch, net_spacing)
    if data.batch_size is not None:
        batch = int(data.batch_size)
    # --- class weights and sampling
    if class_weights is not None:
        weights = [float(w) for w in class_weights]
        if len(weights) != num_classes:
            raise ConfigError(
                f"loss.class_weights has {len(weights)} entries but the dataset has {num_classes} classes "
                f"({', '.join(label_names)})."
            )
    else:
        weights = class_weights_from_frequencies(frequencies)
    ratios = class_sampling_rule(frequencies, foreground_oversample=data.foreground_oversample, mode=data.class_sampling)
    return Plan(
        spatial_dims=int(spatial_dims),
        data_dims=data_dims,
        image_channels=image_channels,
        in_channels=in_channels,
        channel_names=list(fp.channel_names),
        label_values=label_values,
        label_names=label_names,
        ignore_label=None if ignore_label is None else int(ignore_label),
        target_spacing=[float(t) for t in target],
        normalization=normalization,
        crop_to_nonzero=bool(data.crop_to_nonzero),
        patch_size=[int(p) for p in patch],
        batch_size=int(batch),
        kernel_sizes=[[int(k) for k in ks] for ks in kernels],
        strides=[[int(s) for s in st] for st in strides],
        slice_axis=slice_axis,
        slice_context=slice_context,
        class_weights=weights,
        class_sampling_ratios=ratios,
        foreground_oversample=float(data.foreground_oversample),
        median_shape=[round(m) for m in median],
        modality=fp.modality,
    )
