"""The fully convolutional network baseline (Long, Shelhamer and Darrell 2015, CVPR), 2D and 3D.

The same ResNet encoder as DeepLab, without dilation (output stride 32), a 1x1
classifier ("score" layer) on the deepest features, and learned up-sampling:
transposed convolutions initialised to bilinear (trilinear) interpolation.
``variant`` picks the paper's three nets:

- ``"32s"``: score the stride-32 features, up-sample by 32;
- ``"16s"``: up-sample by 2, add the score of the stride-16 features, up-sample by 16;
- ``"8s"`` (default, the paper's best): as 16s, then add the stride-8 score, up-sample by 8.

It is the reference point for DeepLab: same encoder, no atrous convolution, no ASPP.
With ``anisotropic_axis`` set, that axis is never strided or up-sampled.
Any input size works (padded to a multiple of 32 per axis, cropped back).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from medseg.errors import ConfigError
from medseg.models.base import ModelParts, crop_to, pad_to_multiple
from medseg.models.registry import anisotropic_plan_options, register_model
from medseg.models.resnet import DEFAULT_NORM, NormSpec, ResNetEncoder

__all__ = ["FCN", "LearnedUpsample"]


class LearnedUpsample(nn.Module):
    """Transposed convolution up-sampling each channel by ``factor`` per axis, initialised to linear interpolation.

    Kernel ``2f - f % 2``, stride ``f``, padding ``(k - f) / 2``: the output is exactly ``f`` times the input.
    """

    def __init__(self, spatial_dims: int, channels: int, factor: Sequence[int]) -> None:
        super().__init__()
        factor = [int(f) for f in factor]
        kernel = [2 * f - f % 2 for f in factor]
        padding = [(k - f) // 2 for k, f in zip(kernel, factor)]
        self.factor = factor
        self.up = Conv[Conv.CONVTRANS, spatial_dims](
            channels, channels, kernel_size=tuple(kernel), stride=tuple(factor), padding=tuple(padding), bias=False
        )
        with torch.no_grad():
            weight = torch.ones(kernel)
            for axis, (k, f) in enumerate(zip(kernel, factor)):
                center = (k - 1) / 2 if k % 2 == 1 else f - 0.5
                taps = 1 - (torch.arange(k, dtype=torch.float32) - center).abs() / f
                shape = [1] * len(kernel)
                shape[axis] = k
                weight = weight * taps.clamp_min(0).reshape(shape)
            self.up.weight.zero_()
            for c in range(channels):
                self.up.weight[c, c] = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


@register_model("fcn", plan_options=anisotropic_plan_options)
class FCN(ModelParts, nn.Module):
    """FCN-32s/16s/8s on a ResNet encoder (Long et al. 2015).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output channels (background included).
        variant: ``"8s"``, ``"16s"`` or ``"32s"`` (which skips are fused).
        encoder_depth: ResNet depth, 10, 18 or 34.
        encoder_width: channels of the first ResNet stage.
        anisotropic_axis: thick-slice axis, never strided; ``None`` for isotropic data.
        norm: MONAI norm name or ``(name, kwargs)``.
    """

    ENCODER_PREFIXES = ("encoder.",)
    HEAD_PREFIXES = ("head.",)

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        *,
        variant: Literal["8s", "16s", "32s"] = "8s",
        encoder_depth: Literal[10, 18, 34] = 18,
        encoder_width: int = 64,
        anisotropic_axis: int | None = None,
        norm: NormSpec = DEFAULT_NORM,
    ) -> None:
        super().__init__()
        skips = {"32s": 0, "16s": 1, "8s": 2}
        if variant not in skips:
            raise ConfigError(f"fcn variant must be one of 8s, 16s, 32s, got {variant!r}.")
        self.variant = variant
        self.num_classes = num_classes
        self.deep_supervision = False
        self.encoder = ResNetEncoder(spatial_dims, in_channels, depth=encoder_depth, width=encoder_width,
                                     output_stride=32, anisotropic_axis=anisotropic_axis, norm=norm)
        self.multiple = self.encoder.reduction

        def factor(f: int) -> list[int]:
            return [1 if axis == anisotropic_axis else f for axis in range(spatial_dims)]

        num_skips = skips[variant]
        # score layers for stage outputs 4 (stride 32), 3 (16), 2 (8); deepest first
        scored = [4, 3, 2][: num_skips + 1]
        head: dict[str, nn.Module] = {}
        for stage in scored:
            head[f"score{stage}"] = Conv[Conv.CONV, spatial_dims](
                self.encoder.channels[stage], num_classes, kernel_size=1, bias=True
            )
        for i in range(num_skips):
            head[f"up{i}"] = LearnedUpsample(spatial_dims, num_classes, factor(2))
        head["final"] = LearnedUpsample(spatial_dims, num_classes, factor(32 // 2**num_skips))
        self.head = nn.ModuleDict(head)
        self._scored = scored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, *spatial)`` for input ``(B, in_channels, *spatial)`` of any size."""
        x, spatial = pad_to_multiple(x, self.multiple)
        features = self.encoder(x)
        score = self.head[f"score{self._scored[0]}"](features[self._scored[0]])
        for i, stage in enumerate(self._scored[1:]):
            score = self.head[f"up{i}"](score) + self.head[f"score{stage}"](features[stage])
        return crop_to(self.head["final"](score), spatial)
