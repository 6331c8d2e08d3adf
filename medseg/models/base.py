"""What every medseg network shares: the encoder/head split and any-size inputs.

Encoder/head split (used for fine-tuning): a model class names its parameter
groups by prefix in two class attributes,

- ``ENCODER_PREFIXES``: parameters that can be frozen or given a lower
  learning rate (pretrained feature extractor);
- ``HEAD_PREFIXES``: every parameter whose shape depends on ``num_classes``
  (re-initialised when a checkpoint is loaded for a different label set).

:func:`encoder_parameter_names` and :func:`head_parameter_names` read them from
any model (a user model without them has no encoder and no head).

Any input size: convolutional networks need each spatial axis divisible by their
total down-sampling factor. medseg models pad the input at the high end of each
axis with zeros (the mean after normalisation) to the next multiple and crop the
output back, so every model accepts any size (:func:`pad_to_multiple`,
:func:`crop_to`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelParts",
    "crop_to",
    "encoder_parameter_names",
    "encoder_parameters",
    "head_parameter_names",
    "pad_to_multiple",
]


class ModelParts:
    """Mixin naming a model's encoder and head parameters by prefix.

    Subclasses set ``ENCODER_PREFIXES`` and ``HEAD_PREFIXES`` (prefixes of
    ``named_parameters()`` names, ending in ``"."``) and ``deep_supervision``.
    """

    ENCODER_PREFIXES: ClassVar[tuple[str, ...]] = ()
    HEAD_PREFIXES: ClassVar[tuple[str, ...]] = ()
    deep_supervision: bool = False

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder (see :func:`encoder_parameters`)."""
        return encoder_parameters(self)  # type: ignore[arg-type]


def _names_with_prefixes(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    if not prefixes:
        return []
    return [name for name, _ in model.named_parameters() if name.startswith(tuple(prefixes))]


def encoder_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the encoder's parameters.

    Example::

        >>> from medseg.models import create_model
        >>> net = create_model("deeplabv3", spatial_dims=2, in_channels=1, num_classes=2, encoder_width=8)
        >>> encoder_parameter_names(net)[0]
        'encoder.stem.conv.weight'
    """
    return _names_with_prefixes(model, getattr(model, "ENCODER_PREFIXES", ()))


def encoder_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The encoder's parameters, e.g. to freeze them or give them their own learning rate."""
    prefixes = tuple(getattr(model, "ENCODER_PREFIXES", ()))
    for name, param in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            yield param


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters whose shape depends on ``num_classes`` (the classifier layers)."""
    return _names_with_prefixes(model, getattr(model, "HEAD_PREFIXES", ()))


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of ``x`` (``(B, C, *spatial)``) at their high end to multiples of ``multiple``.

    The deepest feature map (``padded / multiple`` voxels) gets at least 2
    voxels, because instance norm cannot normalise a single voxel in training:
    a tiny input is padded one more multiple along its last axis.

    Returns:
        The padded tensor and the original spatial shape (for :func:`crop_to`).
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    multiple = [int(m) for m in multiple]
    extra = [(-s) % m for s, m in zip(spatial, multiple)]
    if math.prod((s + e) // m for s, e, m in zip(spatial, extra, multiple)) < 2:
        extra[-1] += multiple[-1]
    if not any(extra):
        return x, spatial
    pad: list[int] = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pad += [0, e]
    return F.pad(x, pad), spatial


def crop_to(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` to ``spatial`` (keeping the low end), undoing :func:`pad_to_multiple`."""
    # always slice (a no-op view when nothing was padded): no shape comparison for tracers to warn about
    return x[(slice(None), slice(None), *(slice(0, int(s)) for s in spatial))]
