"""A 2D/3D ResNet encoder with dilated late stages (He et al. 2016; Chen et al. 2017).

The encoder is the classic ResNet: a stride-2 7x7(x7) stem convolution, a
stride-2 max-pool, then four stages of basic residual blocks with ``w, 2w, 4w,
8w`` channels (``w = width``, 64 in ResNet-18/34). The stages down-sample by
1, 2, 2, 2, for an output stride (OS) of 32. DeepLab (Chen et al. 2017, §3.1)
keeps the resolution of the late stages by replacing their stride with
dilation ("atrous convolution"):

============== ================ ================
output_stride  stage 3          stage 4
============== ================ ================
32             stride 2         stride 2
16             stride 2         stride 1, dilation 2
8              stride 1, dil. 2 stride 1, dilation 4
============== ================ ================

Thick slices: the ``anisotropic_axis`` (e.g. the slice axis of 5 mm CT) is never
strided or dilated, so its output stride is 1 and in-plane context grows alone.

MONAI's ResNet has no dilation option, so the blocks are written here with
MONAI's layer factories.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from medseg.errors import ConfigError

__all__ = ["ResNetEncoder", "stage_layout"]

NormSpec = str | tuple[str, dict[str, Any]]
DEFAULT_NORM: tuple[str, dict[str, Any]] = ("instance", {"affine": True})
BLOCKS_PER_STAGE = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _per_axis(value: int, spatial_dims: int, anisotropic_axis: int | None, along_axis: int) -> tuple[int, ...]:
    return tuple(along_axis if axis == anisotropic_axis else value for axis in range(spatial_dims))


def stage_layout(output_stride: int) -> tuple[list[int], list[int]]:
    """``(strides, dilations)`` of the four ResNet stages for an output stride of 8, 16 or 32."""
    if output_stride == 32:
        return [1, 2, 2, 2], [1, 1, 1, 1]
    if output_stride == 16:
        return [1, 2, 2, 1], [1, 1, 1, 2]
    if output_stride == 8:
        return [1, 2, 1, 1], [1, 1, 2, 4]
    raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride!r}.")


class ConvNorm(nn.Sequential):
    """Convolution (no bias, "same" padding), normalisation and optionally ReLU.

    ``kernel_size``, ``stride`` and ``dilation`` are one int for every axis or one per axis.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        norm: NormSpec,
        act: bool = True,
    ) -> None:
        kernel_size, stride, dilation = (
            (v,) * spatial_dims if isinstance(v, int) else tuple(v) for v in (kernel_size, stride, dilation)
        )
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
        conv = Conv[Conv.CONV, spatial_dims](
            in_channels, out_channels, kernel_size=tuple(kernel_size), stride=tuple(stride),
            padding=padding, dilation=tuple(dilation), bias=False,
        )
        layers: list[tuple[str, nn.Module]] = [
            ("conv", conv),
            ("norm", get_norm_layer(norm, spatial_dims=spatial_dims, channels=out_channels)),
        ]
        if act:
            layers.append(("act", nn.ReLU(inplace=True)))
        super().__init__(OrderedDict(layers))


class BasicBlock(nn.Module):
    """Two 3x3(x3) convolutions with a residual connection (He et al. 2016)."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        stride: Sequence[int],
        dilation: Sequence[int],
        norm: NormSpec,
    ) -> None:
        super().__init__()
        kernel = (3,) * spatial_dims
        ones = (1,) * spatial_dims
        self.conv1 = ConvNorm(spatial_dims, in_channels, out_channels, kernel_size=kernel, stride=stride,
                               dilation=dilation, norm=norm, act=True)
        self.conv2 = ConvNorm(spatial_dims, out_channels, out_channels, kernel_size=kernel, stride=ones,
                               dilation=dilation, norm=norm, act=False)
        self.shortcut: nn.Module = nn.Identity()
        if any(s != 1 for s in stride) or in_channels != out_channels:
            self.shortcut = ConvNorm(spatial_dims, in_channels, out_channels, kernel_size=ones, stride=stride,
                                      dilation=ones, norm=norm, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet-10/18/34 feature extractor with an output stride of 8, 16 or 32.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        depth: 10, 18 or 34 (basic blocks per stage: 1-1-1-1, 2-2-2-2, 3-4-6-3).
        width: channels of the first stage (64 in the original ResNet; 16-32 is
            plenty for CPU training on small medical datasets).
        output_stride: 8, 16 or 32 (see the module docstring).
        anisotropic_axis: spatial axis that is never strided or dilated, or ``None``.
        norm: MONAI norm name or ``(name, kwargs)``; instance norm by default
            because medical batches are small (2 patches).

    ``forward`` returns the stem output and the four stage outputs, at strides
    2, 4, 8, 16, 32 for OS 32 (stages past the output stride stay at it).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        *,
        depth: Literal[10, 18, 34] = 18,
        width: int = 64,
        output_stride: int = 16,
        anisotropic_axis: int | None = None,
        norm: NormSpec = DEFAULT_NORM,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ConfigError(f"encoder_depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth!r}.")
        if anisotropic_axis is not None and anisotropic_axis not in range(spatial_dims):
            raise ConfigError(
                f"anisotropic_axis must be a spatial axis 0..{spatial_dims - 1} or null, got {anisotropic_axis!r}."
            )
        strides, dilations = stage_layout(output_stride)
        self.spatial_dims = spatial_dims
        self.output_stride = output_stride
        self.anisotropic_axis = anisotropic_axis
        self.channels = [width, width, 2 * width, 4 * width, 8 * width]

        def axes(value: int, along: int = 1) -> tuple[int, ...]:
            return _per_axis(value, spatial_dims, anisotropic_axis, along)

        self.stem = ConvNorm(spatial_dims, in_channels, width, kernel_size=axes(7, 3), stride=axes(2),
                              dilation=axes(1), norm=norm, act=True)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=axes(3, 1), stride=axes(2), padding=axes(1, 0))
        self.stages = nn.ModuleList()
        channels = width
        for index, (blocks, stride, dilation) in enumerate(zip(BLOCKS_PER_STAGE[depth], strides, dilations)):
            out = self.channels[index + 1]
            stage = nn.Sequential(
                *(
                    BasicBlock(spatial_dims, channels if b == 0 else out, out,
                               stride=axes(stride if b == 0 else 1), dilation=axes(dilation), norm=norm)
                    for b in range(blocks)
                )
            )
            self.stages.append(stage)
            channels = out
        #: down-sampling factor of the deepest features, per axis
        self.reduction = list(axes(output_stride))
        #: down-sampling factor of stage 1 (the low-level features of DeepLabV3+), per axis
        self.low_level_reduction = list(axes(4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = [x]
        x = self.pool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
