"""DeepLabV3 and DeepLabV3+ in 2D and 3D (Chen et al. 2017, arXiv:1706.05587; Chen et al. 2018, ECCV).

Both use a :class:`~medseg.models.resnet.ResNetEncoder` whose late stages are
dilated instead of strided (``output_stride`` 16 or 8), followed by atrous
spatial pyramid pooling (ASPP): five parallel branches on the deepest features

- a 1x1 convolution,
- three 3x3 convolutions with atrous rates ``atrous_rates`` (default
  (6, 12, 18) at output stride 16 and doubled, (12, 24, 36), at output stride 8,
  as in the paper),
- image pooling: global average, 1x1 convolution, ReLU, broadcast back (no
  normalisation: a 1-voxel map cannot be instance-normalised),

concatenated, projected by a 1x1 convolution and regularised by dropout.

- **DeepLabV3** adds a 3x3 convolution, a 1x1 classifier, and bilinear
  (trilinear) up-sampling of the logits by the output stride.
- **DeepLabV3+** up-samples the ASPP output to stride 4, concatenates a 48-channel
  1x1 projection of the stride-4 encoder features (the low-level skip), refines
  with two 3x3 convolutions, classifies, and up-samples by 4.

Thick slices: with ``anisotropic_axis`` set, that axis is never strided (encoder)
or dilated (encoder and ASPP); its kernels stay 3 wide.

Any input size works: the input is zero-padded at the high end to a multiple of
the output stride (per axis; 1 along the anisotropic axis) and the logits are
cropped back. Large rates on small feature maps mostly sample padding; this is
why the paper adds the image-pooling branch (Chen 2017, §3.3). Pass smaller
``atrous_rates`` for small 3D patches if needed.

Normalisation is instance norm by default (batches of 2 patches are too small
for batch norm); ``norm="batch"`` gives the paper's choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from medseg.errors import ConfigError
from medseg.models.base import ModelParts, crop_to, pad_to_multiple
from medseg.models.registry import anisotropic_plan_options, register_model
from medseg.models.resnet import DEFAULT_NORM, ConvNorm, NormSpec, ResNetEncoder

__all__ = ["ASPP", "DeepLabV3", "DeepLabV3Plus", "default_atrous_rates"]


def default_atrous_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP rates of the paper: (6, 12, 18) at output stride 16, doubled at 8."""
    if output_stride == 16:
        return (6, 12, 18)
    if output_stride == 8:
        return (12, 24, 36)
    raise ConfigError(f"DeepLab output_stride must be 8 or 16, got {output_stride!r}.")


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear (bi/tri-linear) up-sampling to ``size``, ``align_corners=False``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=tuple(int(s) for s in size), mode=mode, align_corners=False)


class _ImagePooling(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(self.pool(x)))
        return y.expand(-1, -1, *x.shape[2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with image pooling and dropout (Chen et al. 2017, §3.3).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the encoder's deepest features.
        out_channels: channels of each branch and of the projection.
        atrous_rates: three dilation rates of the 3x3 branches.
        dropout: dropout probability after the projection.
        anisotropic_axis: axis that gets dilation 1 in every branch, or ``None``.
        norm: MONAI norm name or ``(name, kwargs)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        atrous_rates: Sequence[int] = (6, 12, 18),
        dropout: float = 0.5,
        anisotropic_axis: int | None = None,
        norm: NormSpec = DEFAULT_NORM,
    ) -> None:
        super().__init__()
        if len(atrous_rates) != 3 or any(int(r) < 1 for r in atrous_rates):
            raise ConfigError(f"atrous_rates must be three positive integers, got {list(atrous_rates)}.")
        self.branches = nn.ModuleList([ConvNorm(spatial_dims, in_channels, out_channels, kernel_size=1, norm=norm)])
        for rate in atrous_rates:
            dilation = tuple(1 if axis == anisotropic_axis else int(rate) for axis in range(spatial_dims))
            self.branches.append(
                ConvNorm(spatial_dims, in_channels, out_channels, kernel_size=3, dilation=dilation, norm=norm)
            )
        self.pooling = _ImagePooling(spatial_dims, in_channels, out_channels)
        self.project = ConvNorm(spatial_dims, 5 * out_channels, out_channels, kernel_size=1, norm=norm)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [branch(x) for branch in self.branches] + [self.pooling(x)]
        return self.dropout(self.project(torch.cat(branches, dim=1)))


class _DeepLabBase(ModelParts, nn.Module):
    ENCODER_PREFIXES = ("encoder.",)
    HEAD_PREFIXES = ("head.",)

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        *,
        encoder_depth: Literal[10, 18, 34] = 18,
        encoder_width: int = 64,
        output_stride: int = 16,
        atrous_rates: Sequence[int] | None = None,
        decoder_channels: int = 256,
        aspp_dropout: float = 0.5,
        anisotropic_axis: int | None = None,
        norm: NormSpec = DEFAULT_NORM,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ConfigError(f"DeepLab output_stride must be 8 or 16, got {output_stride!r}.")
        rates = tuple(atrous_rates) if atrous_rates is not None else default_atrous_rates(output_stride)
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.deep_supervision = False
        self.encoder = ResNetEncoder(spatial_dims, in_channels, depth=encoder_depth, width=encoder_width,
                                     output_stride=output_stride, anisotropic_axis=anisotropic_axis, norm=norm)
        self.aspp = ASPP(spatial_dims, self.encoder.channels[-1], decoder_channels, atrous_rates=rates,
                         dropout=aspp_dropout, anisotropic_axis=anisotropic_axis, norm=norm)
        self.atrous_rates = rates
        self.norm = norm
        self.multiple = self.encoder.reduction


class DeepLabV3(_DeepLabBase):
    """DeepLabV3: dilated ResNet + ASPP + 3x3 conv + 1x1 classifier, logits up-sampled (Chen et al. 2017).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output channels (background included).
        encoder_depth: ResNet depth, 10, 18 or 34.
        encoder_width: channels of the first ResNet stage (64 = the original ResNet).
        output_stride: 16 (default) or 8 (denser, about 4x the encoder cost).
        atrous_rates: ASPP rates; default (6, 12, 18) at OS 16, (12, 24, 36) at OS 8.
        decoder_channels: channels of ASPP and decoder convolutions (256 in the paper).
        aspp_dropout: dropout after the ASPP projection.
        anisotropic_axis: thick-slice axis, never strided or dilated; ``None`` for isotropic data.
        norm: MONAI norm name or ``(name, kwargs)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, **options: Any) -> None:
        super().__init__(spatial_dims, in_channels, num_classes, **options)
        channels = self.aspp.project.conv.out_channels
        self.decoder = ConvNorm(spatial_dims, channels, channels, kernel_size=3, norm=self.norm)
        self.head = Conv[Conv.CONV, spatial_dims](channels, num_classes, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, *spatial)`` for input ``(B, in_channels, *spatial)`` of any size."""
        x, spatial = pad_to_multiple(x, self.multiple)
        features = self.encoder(x)
        logits = self.head(self.decoder(self.aspp(features[-1])))
        return crop_to(upsample_to(logits, x.shape[2:]), spatial)


class DeepLabV3Plus(_DeepLabBase):
    """DeepLabV3+: DeepLabV3's encoder and ASPP plus a decoder with a stride-4 skip (Chen et al. 2018).

    Takes the arguments of :class:`DeepLabV3` plus ``low_level_channels`` (48 in
    the paper), the width of the 1x1 projection of the stride-4 features.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, num_classes: int, *, low_level_channels: int = 48, **options: Any
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes, **options)
        channels = self.aspp.project.conv.out_channels
        self.low_level = ConvNorm(
            spatial_dims, self.encoder.channels[1], low_level_channels, kernel_size=1, norm=self.norm
        )
        self.decoder = nn.Sequential(
            ConvNorm(spatial_dims, channels + low_level_channels, channels, kernel_size=3, norm=self.norm),
            ConvNorm(spatial_dims, channels, channels, kernel_size=3, norm=self.norm),
        )
        self.head = Conv[Conv.CONV, spatial_dims](channels, num_classes, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, *spatial)`` for input ``(B, in_channels, *spatial)`` of any size."""
        x, spatial = pad_to_multiple(x, self.multiple)
        features = self.encoder(x)
        low = self.low_level(features[1])
        context = upsample_to(self.aspp(features[-1]), low.shape[2:])
        logits = self.head(self.decoder(torch.cat([context, low], dim=1)))
        return crop_to(upsample_to(logits, x.shape[2:]), spatial)


@register_model("deeplabv3", plan_options=anisotropic_plan_options)
def deeplabv3(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    encoder_depth: Literal[10, 18, 34] = 18,
    encoder_width: int = 64,
    output_stride: int = 16,
    atrous_rates: Sequence[int] | None = None,
    decoder_channels: int = 256,
    aspp_dropout: float = 0.5,
    anisotropic_axis: int | None = None,
    norm: NormSpec = DEFAULT_NORM,
) -> DeepLabV3:
    """DeepLabV3 (Chen et al. 2017) on a dilated ResNet-18; see :class:`DeepLabV3`."""
    return DeepLabV3(
        spatial_dims, in_channels, num_classes, encoder_depth=encoder_depth, encoder_width=encoder_width,
        output_stride=output_stride, atrous_rates=atrous_rates, decoder_channels=decoder_channels,
        aspp_dropout=aspp_dropout, anisotropic_axis=anisotropic_axis, norm=norm,
    )


@register_model("deeplabv3plus", plan_options=anisotropic_plan_options)
def deeplabv3plus(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    encoder_depth: Literal[10, 18, 34] = 18,
    encoder_width: int = 64,
    output_stride: int = 16,
    atrous_rates: Sequence[int] | None = None,
    decoder_channels: int = 256,
    low_level_channels: int = 48,
    aspp_dropout: float = 0.5,
    anisotropic_axis: int | None = None,
    norm: NormSpec = DEFAULT_NORM,
) -> DeepLabV3Plus:
    """DeepLabV3+ (Chen et al. 2018) on a dilated ResNet-18; see :class:`DeepLabV3Plus`."""
    return DeepLabV3Plus(
        spatial_dims, in_channels, num_classes, encoder_depth=encoder_depth, encoder_width=encoder_width,
        output_stride=output_stride, atrous_rates=atrous_rates, decoder_channels=decoder_channels,
        low_level_channels=low_level_channels, aspp_dropout=aspp_dropout, anisotropic_axis=anisotropic_axis,
        norm=norm,
    )
