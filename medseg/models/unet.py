"""The nnU-Net-style U-Net, 2D and 3D (Ronneberger et al. 2015; Isensee et al. 2021).

Topology comes from the plan: one entry per stage in ``kernel_sizes`` and
``strides`` (``strides[0]`` is all ones), as computed by
:func:`medseg.topology.unet_topology` (stages until the bottleneck is
about 4 voxels; anisotropic kernels and strides for thick slices). Each stage is
two convolutions with instance norm and leaky ReLU (MONAI's ``UnetBasicBlock``),
down-sampling is a strided convolution, up-sampling a transposed convolution;
features double from ``base_features`` (32) and are capped at ``max_features``
(320 in 3D, 512 in 2D, as nnU-Net).

Deep supervision: in training mode with ``deep_supervision=True`` the forward
returns a list ``[full-resolution logits, 1/2, 1/4, ...]``, one entry per
decoder stage, each ``(B, num_classes, *spatial_i)`` where ``spatial_i`` is
``ceil(spatial / total_stride_i)``; in eval mode it returns the full-resolution
logits only. ``medseg.losses`` takes either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

from medseg.errors import ConfigError
from medseg.models.base import ModelParts, crop_to, pad_to_multiple
from medseg.models.registry import register_model
from medseg.topology import unet_topology

__all__ = ["UNet"]

DEFAULT_NORM: tuple[str, dict[str, Any]] = ("instance", {"affine": True})
DEFAULT_ACT: tuple[str, dict[str, Any]] = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


class UNet(ModelParts, nn.Module):
    """Plain convolutional U-Net with per-stage kernels and strides (nnU-Net's ``PlainConvUNet`` design).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output channels (background included).
        kernel_sizes: per stage, one kernel size per axis.
        strides: per stage, one stride per axis; ``strides[0]`` is usually all ones.
        base_features: channels of the first stage; doubled per stage.
        max_features: cap on the channels of a stage.
        deep_supervision: return lower-resolution logits too (training mode only).
        norm: MONAI norm name or ``(name, kwargs)``.
        dropout: dropout probability inside the conv blocks (nnU-Net: none).

    Shapes: input ``(B, in_channels, *spatial)`` of any size (padded to a
    multiple of the total stride per axis, output cropped back).
    """

    ENCODER_PREFIXES = ("encoder.",)
    HEAD_PREFIXES = ("head.", "ds_heads.")

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        *,
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        base_features: int = 32,
        max_features: int | None = None,
        deep_supervision: bool = False,
        norm: str | tuple[str, dict[str, Any]] = DEFAULT_NORM,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        kernel_sizes = [list(k) for k in kernel_sizes]
        strides = [list(s) for s in strides]
        _check_topology(spatial_dims, kernel_sizes, strides)
        if max_features is None:
            max_features = 512 if spatial_dims == 2 else 320
        features = [min(base_features * 2**i, max_features) for i in range(len(strides))]
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.deep_supervision = bool(deep_supervision)
        self.kernel_sizes = kernel_sizes
        self.strides = strides
        self.features = features
        # cumulative down-sampling factor of each stage, per axis
        self.stage_factors: list[list[int]] = []
        factor = [1] * spatial_dims
        for stride in strides:
            factor = [f * s for f, s in zip(factor, stride)]
            self.stage_factors.append(factor)
        self.multiple = self.stage_factors[-1]

        self.encoder = nn.ModuleList()
        channels = in_channels
        for k, s, f in zip(kernel_sizes, strides, features):
            self.encoder.append(
                UnetBasicBlock(spatial_dims, channels, f, kernel_size=k, stride=s, norm_name=norm,
                               act_name=DEFAULT_ACT, dropout=dropout)
            )
            channels = f
        self.decoder = nn.ModuleList()
        for stage in range(len(strides) - 1, 0, -1):  # deepest first
            self.decoder.append(
                UnetUpBlock(spatial_dims, features[stage], features[stage - 1], kernel_size=kernel_sizes[stage - 1],
                            stride=strides[stage], upsample_kernel_size=strides[stage], norm_name=norm,
                            act_name=DEFAULT_ACT, dropout=dropout)
            )
        self.head = UnetOutBlock(spatial_dims, features[0], num_classes)
        # one 1x1 head per lower decoder stage (stages len-2 .. 1), in decoder order
        self.ds_heads = nn.ModuleList(
            UnetOutBlock(spatial_dims, features[stage - 1], num_classes) for stage in range(len(strides) - 1, 1, -1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``(B, num_classes, *spatial)``; a list of them with deep supervision in training."""
        x, spatial = pad_to_multiple(x, self.multiple)
        skips = []
        for block in self.encoder[:-1]:
            x = block(x)
            skips.append(x)
        x = self.encoder[-1](x)
        decoded = []
        for up, skip in zip(self.decoder, reversed(skips)):
            x = up(x, skip)
            decoded.append(x)
        logits = crop_to(self.head(x), spatial)
        if not (self.training and self.deep_supervision):
            return logits
        outputs = [logits]
        # decoded[j] lives at stage len(strides) - 2 - j; walk from the second-finest down
        num_stages = len(self.strides)
        for j in range(len(decoded) - 2, -1, -1):
            stage = num_stages - 2 - j
            head = self.ds_heads[j]
            size = [math.ceil(s / f) for s, f in zip(spatial, self.stage_factors[stage])]
            outputs.append(crop_to(head(decoded[j]), size))
        return outputs


def _check_topology(spatial_dims: int, kernel_sizes: list[list[int]], strides: list[list[int]]) -> None:
    if not strides or len(kernel_sizes) != len(strides):
        raise ConfigError(
            f"unet needs one kernel size and one stride per stage, got {len(kernel_sizes)} kernel sizes and "
            f"{len(strides)} strides; pass both from the plan (or patch_size to compute them)."
        )
    for what, items in (("kernel_sizes", kernel_sizes), ("strides", strides)):
        for item in items:
            if len(item) != spatial_dims or any(int(v) < 1 for v in item):
                raise ConfigError(
                    f"unet {what} entry {item} must have {spatial_dims} positive values (spatial_dims={spatial_dims})."
                )


def _unet_plan_options(plan: Any, spacing: list[float]) -> dict[str, Any]:
    kernel_sizes = getattr(plan, "kernel_sizes", None)
    strides = getattr(plan, "strides", None)
    if kernel_sizes and strides:
        return {"kernel_sizes": [list(k) for k in kernel_sizes], "strides": [list(s) for s in strides]}
    kernel_sizes, strides = unet_topology(list(plan.patch_size), spacing)
    return {"kernel_sizes": kernel_sizes, "strides": strides}


@register_model("unet", plan_options=_unet_plan_options)
def unet(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    strides: Sequence[Sequence[int]] | None = None,
    patch_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    base_features: int = 32,
    max_features: int | None = None,
    deep_supervision: bool = False,
    norm: str | tuple[str, dict[str, Any]] = DEFAULT_NORM,
    dropout: float | None = None,
) -> UNet:
    """nnU-Net-style U-Net (Ronneberger 2015, Isensee 2021).

    Without ``kernel_sizes``/``strides`` the topology is computed with
    ``unet_topology(patch_size, spacing)``; defaults: patch 128^3 (3D) or
    512^2 (2D), isotropic spacing.
    """
    if (kernel_sizes is None) != (strides is None):
        raise ConfigError("unet needs both kernel_sizes and strides, or neither (then patch_size/spacing are used).")
    if kernel_sizes is None or strides is None:
        patch = list(patch_size) if patch_size is not None else [128] * 3 if spatial_dims == 3 else [512] * 2
        spacing = list(spacing) if spacing is not None else [1.0] * spatial_dims
        if len(patch) != spatial_dims or len(spacing) != spatial_dims:
            raise ConfigError(
                f"unet patch_size {patch} and spacing {spacing} must have {spatial_dims} entries (spatial_dims)."
            )
        kernel_sizes, strides = unet_topology(patch, spacing)
    return UNet(
        spatial_dims, in_channels, num_classes, kernel_sizes=kernel_sizes, strides=strides,
        base_features=base_features, max_features=max_features, deep_supervision=deep_supervision,
        norm=norm, dropout=dropout,
    )
