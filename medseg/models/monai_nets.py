"""Registry entries for MONAI networks, so they can be compared with medseg's own under one interface.

- ``segresnet``: SegResNet (Myronenko 2018), Auto3DSeg's default network.
- ``unetr``: UNETR (Hatamizadeh et al. 2022); a ViT with a fixed ``img_size``
  (the training patch; :func:`~medseg.models.create_model_from_plan` passes
  ``plan.patch_size``). Needs the ``einops`` package.
- ``swinunetr``: Swin UNETR (Hatamizadeh et al. 2022).
- ``attentionunet``: Attention U-Net (Oktay et al. 2018).

Each is a thin subclass of the MONAI class whose ``forward`` pads the input to
the size the network needs (a multiple of its total stride; ``img_size`` for
UNETR) and crops the logits back, so any input size works; options are the
MONAI constructor's keyword arguments (``out_channels`` is ``num_classes``).
Parameter names are MONAI's, so MONAI checkpoints load unchanged.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import UNETR, AttentionUnet, SegResNet, SwinUNETR
from torch import nn

from medseg.errors import ConfigError, GeometryError
from medseg.models.base import ModelParts, crop_to, pad_to_multiple
from medseg.models.registry import check_options, register_model

__all__ = ["PaddedAttentionUnet", "PaddedSegResNet", "PaddedSwinUNETR", "PaddedUNETR"]


def _valid_options(cls: type[nn.Module]) -> set[str]:
    return set(inspect.signature(cls).parameters) - {"spatial_dims", "in_channels", "out_channels", "self"}


class PaddedSegResNet(ModelParts, SegResNet):
    """MONAI ``SegResNet`` accepting any input size."""

    ENCODER_PREFIXES = ("convInit.", "down_layers.")
    HEAD_PREFIXES = ("conv_final.",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        depth = len(kwargs.get("blocks_down", (1, 2, 2, 4)))
        self.multiple = [2 ** (depth - 1)] * int(kwargs.get("spatial_dims", 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, spatial = pad_to_multiple(x, self.multiple)
        return crop_to(super().forward(x), spatial)


class PaddedSwinUNETR(ModelParts, SwinUNETR):
    """MONAI ``SwinUNETR`` accepting any input size (padded to a multiple of ``patch_size ** 5``)."""

    ENCODER_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
    HEAD_PREFIXES = ("out.",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.multiple = [int(kwargs.get("patch_size", 2)) ** 5] * int(kwargs.get("spatial_dims", 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, spatial = pad_to_multiple(x, self.multiple)
        return crop_to(super().forward(x), spatial)


class PaddedAttentionUnet(ModelParts, AttentionUnet):
    """MONAI ``AttentionUnet`` accepting any input size (padded to a multiple of the product of strides)."""

    HEAD_PREFIXES = ("model.2.",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dims = int(kwargs["spatial_dims"])
        factor = [1] * dims
        for stride in kwargs["strides"]:
            stride = [int(stride)] * dims if isinstance(stride, int) else [int(s) for s in stride]
            factor = [f * s for f, s in zip(factor, stride)]
        self.multiple = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, spatial = pad_to_multiple(x, self.multiple)
        return crop_to(super().forward(x), spatial)


class PaddedUNETR(ModelParts, UNETR):
    """MONAI ``UNETR`` padded to its fixed ``img_size`` (rounded up to a multiple of the 16-voxel ViT patch).

    Inputs larger than ``img_size`` raise :class:`~medseg.errors.GeometryError`:
    the transformer's position embeddings are fixed at construction.
    """

    ENCODER_PREFIXES = ("vit.", "encoder1.", "encoder2.", "encoder3.", "encoder4.")
    HEAD_PREFIXES = ("out.",)

    def __init__(self, *, img_size: Sequence[int] | int, spatial_dims: int = 3, **kwargs: Any) -> None:
        size = [int(img_size)] * spatial_dims if isinstance(img_size, int) else [int(s) for s in img_size]
        if len(size) != spatial_dims:
            raise ConfigError(f"unetr img_size {size} must have {spatial_dims} entries (spatial_dims).")
        if importlib.util.find_spec("einops") is None:
            raise ConfigError("model 'unetr' needs the einops package, which is not installed; run `pip install einops`.")
        padded = [math.ceil(s / 16) * 16 for s in size]
        super().__init__(img_size=padded, spatial_dims=spatial_dims, **kwargs)
        self.input_size = padded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s > m for s, m in zip(spatial, self.input_size)):
            raise GeometryError(
                f"unetr input {list(spatial)} is larger than its img_size {self.input_size}; "
                "use sliding-window inference with the training patch, or build it with a larger img_size."
            )
        pad: list[int] = []
        for s, m in zip(reversed(spatial), reversed(self.input_size)):
            pad += [0, m - s]
        return crop_to(super().forward(torch.nn.functional.pad(x, pad)), spatial)


def _build(name: str, cls: type[nn.Module], base: type[nn.Module], spatial_dims: int, in_channels: int,
           num_classes: int, options: dict[str, Any], defaults: dict[str, Any] | None = None) -> nn.Module:
    check_options(name, options, _valid_options(base))
    model = cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                **{**(defaults or {}), **options})
    model.deep_supervision = False
    return model


@register_model("segresnet")
def segresnet(*, spatial_dims: int, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """MONAI SegResNet (Myronenko 2018) with MONAI's defaults (``init_filters=8``)."""
    return _build("segresnet", PaddedSegResNet, SegResNet, spatial_dims, in_channels, num_classes, options)


@register_model("swinunetr")
def swinunetr(*, spatial_dims: int, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """MONAI Swin UNETR (Hatamizadeh et al. 2022) with MONAI's defaults (``feature_size=24``)."""
    return _build("swinunetr", PaddedSwinUNETR, SwinUNETR, spatial_dims, in_channels, num_classes, options)


@register_model("attentionunet")
def attentionunet(*, spatial_dims: int, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """MONAI Attention U-Net (Oktay et al. 2018); default ``channels=(32, 64, 128, 256)``, ``strides=(2, 2, 2)``."""
    defaults = {"channels": (32, 64, 128, 256), "strides": (2, 2, 2)}
    return _build("attentionunet", PaddedAttentionUnet, AttentionUnet, spatial_dims, in_channels, num_classes, options, defaults)


def _unetr_plan_options(plan: Any, spacing: list[float]) -> dict[str, Any]:
    return {"img_size": [int(s) for s in plan.patch_size]}


@register_model("unetr", plan_options=_unetr_plan_options)
def unetr(*, spatial_dims: int, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """MONAI UNETR (Hatamizadeh et al. 2022); ``img_size`` (the training patch) is required."""
    if "img_size" not in options:
        raise ConfigError(
            "model 'unetr' needs img_size (its fixed input size, e.g. the training patch); pass it as an option "
            "or build the model with create_model_from_plan, which uses plan.patch_size."
        )
    return _build("unetr", PaddedUNETR, UNETR, spatial_dims, in_channels, num_classes, options)
