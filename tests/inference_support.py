"""Helpers for the inference tests: tiny plans, deterministic networks, model folders.

``threshold`` is a registered model whose output is known in advance: a 1x1
convolution that gives class 1 where the normalised intensity is above
``threshold`` (class 0 elsewhere), so a bright sphere must come out exactly
where it lies in world space. ``skewed`` is a small random 3x3(x3) convolution
network: it is not mirror-symmetric, so test-time mirroring changes its logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medseg.config import InferConfig
from medseg.data.plan import ChannelNorm, Plan
from medseg.model_folder import save_model_folder
from medseg.models import list_models, register_model


def make_plan(
    *,
    spatial_dims: int = 3,
    data_dims: int = 3,
    patch_size=(16, 16, 16),
    target_spacing=(1.5, 1.5, 1.5),
    num_classes: int = 2,
    image_channels: int = 1,
    slice_context: int = 0,
    slice_axis: int | None = None,
    crop_to_nonzero: bool = True,
    label_values=None,
) -> Plan:
    """A CT plan: clip to [-1000, 1000] HU, then (x - 0) / 100."""
    in_channels = image_channels * (2 * slice_context + 1) if spatial_dims < data_dims else image_channels
    values = list(label_values) if label_values is not None else list(range(num_classes))
    return Plan(
        spatial_dims=spatial_dims,
        data_dims=data_dims,
        image_channels=image_channels,
        in_channels=in_channels,
        channel_names=["CT"] * image_channels,
        label_values=values,
        label_names=["background"] + [f"class_{v}" for v in values[1:]],
        target_spacing=list(target_spacing),
        normalization=[ChannelNorm(scheme="ct", clip=(-1000.0, 1000.0), mean=0.0, std=100.0)] * image_channels,
        crop_to_nonzero=crop_to_nonzero,
        patch_size=list(patch_size),
        batch_size=2,
        kernel_sizes=[[3] * spatial_dims],
        strides=[[1] * spatial_dims],
        slice_axis=slice_axis if slice_axis is not None else (2 if spatial_dims < data_dims else None),
        slice_context=slice_context,
        class_weights=[1.0] * len(values),
        class_sampling_ratios=[1.0] * len(values),
        modality="CT",
    )


class ThresholdNet(nn.Module):
    """Logits ``[0, gain * (x - threshold), ...]`` from the first (centre) input channel."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, threshold: float = 5.0, gain: float = 4.0):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.conv = conv(in_channels, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            centre = in_channels // 2
            for k in range(1, num_classes):
                self.conv.weight[k, centre] = gain / k
                self.conv.bias[k] = -gain * threshold / k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SkewedNet(nn.Module):
    """Two random (seeded) convolutions: deterministic but not mirror-symmetric."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, seed: int = 0):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        gen = torch.Generator().manual_seed(seed)
        self.a = conv(in_channels, 4, 3, padding=1)
        self.b = conv(4, num_classes, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


if "test_threshold" not in list_models():

    @register_model("test_threshold")
    def _threshold(*, spatial_dims: int, in_channels: int, num_classes: int, threshold: float = 5.0) -> nn.Module:
        return ThresholdNet(spatial_dims, in_channels, num_classes, threshold)

    @register_model("test_skewed")
    def _skewed(*, spatial_dims: int, in_channels: int, num_classes: int, seed: int = 0) -> nn.Module:
        return SkewedNet(spatial_dims, in_channels, num_classes, seed)


def save_model(
    model_dir: Path,
    plan: Plan,
    *,
    name: str = "test_threshold",
    options: dict | None = None,
    fold: int | str = 0,
    infer: InferConfig | None = None,
    volume_ranges: dict[int, dict] | None = None,
) -> Path:
    """Build a registered test network for ``plan`` and save it as a model folder."""
    from medseg.models import create_model_from_plan

    options = dict(options or {})
    model = create_model_from_plan(name, plan, **options)
    return save_model_folder(
        model_dir,
        model=model,
        model_name=name,
        model_options=options,
        plan=plan,
        infer_config=infer or InferConfig(),
        fold=fold,
        training_info={"epoch": 0, "best_epoch": 0, "val_dice": {}},
        volume_ranges=volume_ranges,
    )


def one_error_line(capsys) -> str:
    """The CLI's stderr, which must be exactly one line (the error)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]
