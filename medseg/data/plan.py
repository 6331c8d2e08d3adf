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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.errors import ConfigError

PLAN_FORMAT_VERSION = 1

__all__ = ["PLAN_FORMAT_VERSION", "ChannelNorm", "Plan", "load_plan", "save_plan"]


@dataclass(frozen=True, kw_only=True)
class ChannelNorm:
    """Intensity normalisation of one input channel.

    * ``ct``: clip to ``clip`` (dataset foreground 0.5/99.5 percentiles), then
      ``(x - mean) / std`` with the dataset's foreground mean/std.
    * ``zscore``: per-image ``(x - mean(x)) / std(x)``, computed inside the
      non-zero mask when ``use_nonzero_mask`` (outside stays 0).
    * ``none``: unchanged.
    """

    scheme: Literal["ct", "zscore", "none"]
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    use_nonzero_mask: bool = False


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
        orientation: axis codes every case is re-oriented to before resampling.
        target_spacing: mm per canonical axis (``data_dims`` entries).
        normalization: one :class:`ChannelNorm` per image channel.
        crop_to_nonzero: crop cases to the non-zero bounding box first.
        patch_size: training window (``spatial_dims`` entries); also the
            sliding-window size at inference.
        batch_size: patches per step.
        kernel_sizes, strides: U-Net topology, one entry per stage
            (``strides[0]`` is all ones); see ``medseg.models.topology``.
        slice_axis: 2D on 3D data: the canonical axis that is sliced.
        slice_context: 2D only: neighbouring slices each side as channels.
        class_weights: cross-entropy weight per class (background included).
        class_sampling_ratios: relative chance that a foreground patch is
            centred on each class (background entry is for random patches).
        foreground_oversample: share of patches centred on foreground.
        median_shape: median case shape after cropping and resampling.
        modality: "CT", "MR" or "other" (from the channel names).
    """

    format_version: int = PLAN_FORMAT_VERSION
    spatial_dims: int
    data_dims: int
    image_channels: int
    in_channels: int
    channel_names: list[str]
    label_values: list[int]
    label_names: list[str]
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
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise ConfigError(
                f"plan format_version {version!r} is not supported by this medseg (expects {PLAN_FORMAT_VERSION}); "
                "re-plan the dataset or use the medseg version that made it."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"plan has unknown fields {unknown}; it was made by another medseg version.")
        values = dict(data)
        values["normalization"] = [
            ChannelNorm(**{**n, "clip": tuple(n["clip"]) if n.get("clip") is not None else None})
            for n in data["normalization"]
        ]
        return cls(**values)

    def diff(self, other: Plan) -> list[str]:
        """Field-by-field differences, for refusing mismatched checkpoints."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b.get(k)]


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write ``plan.json`` atomically."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(plan.to_dict(), fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read plan {path}: {err}") from err
    return Plan.from_dict(data)
