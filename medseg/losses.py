"""Segmentation losses for imbalanced classes, with deep supervision and an ignore label.

``build_loss(config.loss, plan)`` returns a :class:`SegmentationLoss` whose
``forward(logits, target)`` returns a scalar. ``config.name`` picks one of

- ``dice_ce`` (default): soft Dice + cross-entropy, 1:1, as nnU-Net (Isensee et al. 2021);
- ``dice_focal``: soft Dice + focal loss (Lin et al. 2017);
- ``generalized_dice``: Dice with class weights ``1 / volume^2`` (Sudre et al. 2017);
- ``tversky``: Tversky index, ``alpha`` weighting false positives and ``beta``
  false negatives (Salehi et al. 2017); ``beta > alpha`` favours recall;
- ``focal_tversky``: ``(1 - TI) ** gamma`` (Abraham and Khan 2019);
- ``ce``: cross-entropy only (with class weights when ``class_weights`` is set).

Conventions:

- ``logits``: ``(B, C, *spatial)`` raw scores (softmax is applied inside), or a
  list/tuple of them at decreasing resolution (deep supervision, see below).
- ``target``: ``(B, 1, *spatial)`` (or ``(B, *spatial)``) integer class
  indices ``0..C-1``, as produced by the data pipeline from ``plan.label_values``.
- **Ignore label**: when ``config.ignore_label`` is set, the data pipeline maps
  voxels with that label *value* to the class *index* ``C`` (``num_classes``,
  one past the last class); the loss drops every voxel whose index is outside
  ``0..C-1`` from every term (cross-entropy average and Dice sums alike).
- ``include_background`` applies to the Dice-type terms only; cross-entropy
  always covers every class.
- **Class weights** (``class_weights``: ``'auto'`` takes ``plan.class_weights``,
  a list is used as is) weight the cross-entropy/focal terms only, as a weighted
  mean (``sum w_y * ce / sum w_y``, like ``torch.nn.CrossEntropyLoss``). The
  rule behind ``'auto'`` is :func:`class_weights_from_frequencies`.
- Dice terms: per class ``(2 * sum(p * y) + s) / (sum(p) + sum(y) + s)`` with
  ``s = 1e-5`` summed over the batch too when ``batch_dice`` (nnU-Net); loss is
  ``1 - mean over classes``. A class absent from the target scores ~1 when it is
  not predicted and ~0 when it is (false positives are penalised).
- **Deep supervision**: given a list ``[full, 1/2, 1/4, ...]``, the target is
  down-sampled to each output's size by strided indexing (the voxel at each
  output cell's corner, matching the U-Net's ``ceil(size / stride)`` outputs;
  nearest interpolation otherwise) and the terms are weighted ``1 / 2^i``,
  normalised to sum 1, with the lowest resolution weighted 0 (nnU-Net).
- Never NaN: empty classes, all-ignored and empty (``B = 0``) batches give finite
  values (0 for an empty batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medseg.data.plan import class_weights_from_frequencies  # the rule lives with the plan that applies it
from medseg.errors import ConfigError

__all__ = [
    "SegmentationLoss",
    "build_loss",
    "class_weights_from_frequencies",
    "deep_supervision_weights",
]

LossName = Literal["dice_ce", "dice_focal", "generalized_dice", "tversky", "focal_tversky", "ce"]
LOSS_NAMES: tuple[str, ...] = ("dice_ce", "dice_focal", "generalized_dice", "tversky", "focal_tversky", "ce")
SMOOTH = 1e-5


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """Weights ``1 / 2^i``, the lowest resolution set to 0 (when there are several), normalised to sum 1.

    Example::

        >>> deep_supervision_weights(3)
        [0.6666666666666666, 0.3333333333333333, 0.0]
    """
    weights = [1.0 / 2**i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def _downsample_target(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Target ``(B, 1, *spatial)`` at ``size``: strided indexing when a stride fits, else nearest interpolation."""
    spatial = target.shape[2:]
    if tuple(spatial) == tuple(size):
        return target
    slices: list[slice] = []
    for n, m in zip(spatial, size):
        step = next((s for s in (max(1, round(n / m)), math.ceil(n / m)) if math.ceil(n / s) == m), None)
        if step is None:
            return F.interpolate(target.float(), size=tuple(size), mode="nearest").long()
        slices.append(slice(None, None, step))
    return target[(slice(None), slice(None), *slices)]


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (not NaN) for an empty tensor (an empty batch without batch Dice)."""
    return x.mean() if x.numel() else x.sum()


class SegmentationLoss(nn.Module):
    """Dice/CE-family loss over softmax probabilities; see the module docstring for all conventions.

    Args:
        name: one of ``dice_ce``, ``dice_focal``, ``generalized_dice``, ``tversky``, ``focal_tversky``, ``ce``.
        num_classes: number of classes ``C`` (background included).
        include_background: Dice-type terms include class 0.
        batch_dice: Dice-type sums over the whole batch instead of per sample.
        class_weights: ``C`` weights for the cross-entropy/focal term, or ``None``.
        ignore: voxels whose target index is outside ``0..C-1`` are ignored
            (the data pipeline writes index ``C`` for the ignore label).
        dice_weight: weight of the Dice-type term in ``dice_ce``/``dice_focal``.
        ce_weight: weight of the cross-entropy/focal term in ``dice_ce``/``dice_focal``.
        focal_gamma: focusing parameter of the focal term.
        tversky_alpha: Tversky weight of false positives.
        tversky_beta: Tversky weight of false negatives.
        tversky_gamma: focal Tversky exponent.
    """

    def __init__(
        self,
        name: LossName = "dice_ce",
        *,
        num_classes: int,
        include_background: bool = False,
        batch_dice: bool = True,
        class_weights: Sequence[float] | None = None,
        ignore: bool = False,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        focal_gamma: float = 2.0,
        tversky_alpha: float = 0.3,
        tversky_beta: float = 0.7,
        tversky_gamma: float = 0.75,
    ) -> None:
        super().__init__()
        if name not in LOSS_NAMES:
            raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}.")
        if num_classes < 2:
            raise ConfigError(f"losses need num_classes >= 2 (background + foreground), got {num_classes}.")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ConfigError(
                f"loss.class_weights has {len(class_weights)} values but there are {num_classes} classes "
                "(background included); give one weight per class, or use 'auto' / 'none'."
            )
        self.name = name
        self.num_classes = num_classes
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.ignore = ignore
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.focal_gamma = focal_gamma
        self.tversky_alpha = tversky_alpha
        self.tversky_beta = tversky_beta
        self.tversky_gamma = tversky_gamma
        weights = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Scalar loss for logits ``(B, C, *spatial)`` (or a deep-supervision list) and target ``(B, 1, *spatial)``."""
        outputs = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        if target.ndim == outputs[0].ndim - 1:
            target = target.unsqueeze(1)
        total = outputs[0].new_zeros(())
        for weight, out in zip(deep_supervision_weights(len(outputs)), outputs):
            if weight == 0.0:
                continue
            total = total + weight * self.single(out, _downsample_target(target, out.shape[2:]))
        return total

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss for one output ``(B, C, *spatial)`` and a target of the same spatial size."""
        logits = logits.float()
        target = target[:, 0].long()
        valid = (target >= 0) & (target < self.num_classes)
        if not self.ignore:
            # inner code trusts its inputs; only the ignore convention may put indices outside 0..C-1
            valid = torch.ones_like(valid)
        index = torch.where(valid, target, torch.zeros_like(target))
        mask = valid.unsqueeze(1).to(logits.dtype)
        log_probs = F.log_softmax(logits, dim=1)
        name = self.name
        if name == "ce":
            return self._cross_entropy(log_probs, index, valid, gamma=0.0)
        probs = log_probs.exp()
        onehot = F.one_hot(index, self.num_classes).movedim(-1, 1).to(logits.dtype) * mask
        probs = probs * mask
        if name == "dice_ce":
            return self.dice_weight * self._dice(probs, onehot) + self.ce_weight * self._cross_entropy(
                log_probs, index, valid, gamma=0.0
            )
        if name == "dice_focal":
            return self.dice_weight * self._dice(probs, onehot) + self.ce_weight * self._cross_entropy(
                log_probs, index, valid, gamma=self.focal_gamma
            )
        if name == "generalized_dice":
            return self._generalized_dice(probs, onehot)
        tversky_index = self._tversky_index(probs, onehot)
        if name == "tversky":
            return _mean(1.0 - tversky_index)
        # focal Tversky; x ** gamma (gamma < 1) has an infinite slope at x = 0: clamp, and give exactly 0 there
        miss = 1.0 - tversky_index
        return _mean(torch.where(miss > 0, miss.clamp_min(1e-6).pow(self.tversky_gamma), torch.zeros_like(miss)))

    # ------------------------------------------------------------------ terms

    def _sum_axes(self, x: torch.Tensor) -> tuple[int, ...]:
        spatial = tuple(range(2, x.ndim))
        return (0, *spatial) if self.batch_dice else spatial

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.include_background else x[:, 1:]

    def _dice(self, probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        probs, onehot = self._select(probs), self._select(onehot)
        axes = self._sum_axes(probs)
        intersect = (probs * onehot).sum(axes)
        denominator = probs.sum(axes) + onehot.sum(axes)
        return _mean(1.0 - (2 * intersect + SMOOTH) / (denominator + SMOOTH))

    def _tversky_index(self, probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        probs, onehot = self._select(probs), self._select(onehot)
        axes = self._sum_axes(probs)
        tp = (probs * onehot).sum(axes)
        fp = (probs * (1 - onehot)).sum(axes)
        fn = ((1 - probs) * onehot).sum(axes)
        return (tp + SMOOTH) / (tp + self.tversky_alpha * fp + self.tversky_beta * fn + SMOOTH)

    def _generalized_dice(self, probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        probs, onehot = self._select(probs), self._select(onehot)
        axes = self._sum_axes(probs)
        volume = onehot.sum(axes)
        weights = 1.0 / volume.clamp_min(1.0) ** 2
        # an absent class gets the largest weight of a present one (Sudre 2017 leaves it undefined)
        present = volume > 0
        largest = torch.where(present, weights, torch.zeros_like(weights)).amax(dim=-1, keepdim=True)
        weights = torch.where(present, weights, largest).detach()
        intersect = (weights * (probs * onehot).sum(axes)).sum(-1)
        denominator = (weights * (probs.sum(axes) + volume)).sum(-1)
        return _mean(1.0 - (2 * intersect + SMOOTH) / (denominator + SMOOTH))

    def _cross_entropy(
        self, log_probs: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, *, gamma: float
    ) -> torch.Tensor:
        picked = log_probs.gather(1, index.unsqueeze(1)).squeeze(1)
        loss = -picked
        if gamma > 0:
            loss = (1 - picked.exp()).clamp_min(0).pow(gamma) * loss
        weight = valid.to(log_probs.dtype)
        if self.class_weights is not None:
            weight = weight * self.class_weights.to(log_probs.device)[index]
        return (loss * weight).sum() / weight.sum().clamp_min(1e-8)


def build_loss(config: Any, plan: Any) -> SegmentationLoss:
    """Build the loss a :class:`~medseg.config.LossConfig` describes, for a plan's classes.

    Args:
        config: a ``LossConfig`` (``name``, ``include_background``, ``batch_dice``,
            ``class_weights``, ``ignore_label``, weights and shape parameters).
        plan: the dataset plan (``num_classes``; ``class_weights`` for ``'auto'``).

    Raises:
        ConfigError: unknown loss name, or class weights that do not match the classes.

    Example::

        loss_fn = build_loss(cfg.loss, plan)
        loss = loss_fn(model(batch["image"]), batch["label"])
    """
    num_classes = int(plan.num_classes)
    spec = config.class_weights
    weights: list[float] | None
    if spec is None or spec == "none":
        weights = None
    elif spec == "auto":
        planned = getattr(plan, "class_weights", None)
        if not planned:
            raise ConfigError(
                "loss.class_weights is 'auto' but the plan has no class_weights; re-plan the dataset or give "
                "one weight per class."
            )
        weights = [float(w) for w in planned]
    elif isinstance(spec, (list, tuple)):
        weights = [float(w) for w in spec]
    else:
        raise ConfigError(f"loss.class_weights must be 'none', 'auto' or a list of numbers, got {spec!r}.")
    if weights is not None and len(weights) != num_classes:
        source = "plan.class_weights" if spec == "auto" else "loss.class_weights"
        raise ConfigError(
            f"{source} has {len(weights)} values but the plan has {num_classes} classes (background included); "
            "give one weight per class."
        )
    return SegmentationLoss(
        config.name,
        num_classes=num_classes,
        include_background=bool(config.include_background),
        batch_dice=bool(config.batch_dice),
        class_weights=weights,
        ignore=config.ignore_label is not None,
        dice_weight=float(config.dice_weight),
        ce_weight=float(config.ce_weight),
        focal_gamma=float(config.focal_gamma),
        tversky_alpha=float(config.tversky_alpha),
        tversky_beta=float(config.tversky_beta),
        tversky_gamma=float(config.tversky_gamma),
    )
