"""Losses: hand-computed values, agreement with MONAI, ordering, class weights, ignore label, empty inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss, GeneralizedDiceLoss, TverskyLoss

from medseg.config import LossConfig
from medseg.errors import ConfigError
from medseg.losses import (
    LOSS_NAMES,
    SegmentationLoss,
    build_loss,
    class_weights_from_frequencies,
    deep_supervision_weights,
)

S = 1e-5  # the smoothing term


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors run faster on one thread, and the 2 cores here are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits_from_probs(probs) -> torch.Tensor:
    """Logits whose softmax over dim 1 is exactly ``probs`` (shape ``(B, C, *spatial)``)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


# two voxels, two classes: foreground probability 0.2 and 0.6; targets 0 and 1
PROBS = [[[0.8, 0.4], [0.2, 0.6]]]  # (B=1, C=2, N=2)
TARGET = torch.tensor([[[0, 1]]])  # (B=1, 1, N=2)


def make(name: str, **kwargs) -> SegmentationLoss:
    return SegmentationLoss(name, num_classes=kwargs.pop("num_classes", 2), **kwargs)


# ----------------------------------------------------------------------------- hand-computed values


def test_cross_entropy_by_hand():
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert make("ce")(logits_from_probs(PROBS), TARGET).item() == pytest.approx(expected, rel=1e-5)


def test_dice_ce_by_hand():
    dice = (2 * 0.6 + S) / (0.8 + 1.0 + S)  # foreground only: intersect 0.6, sum p 0.8, sum y 1
    ce = -(math.log(0.8) + math.log(0.6)) / 2
    value = make("dice_ce")(logits_from_probs(PROBS), TARGET).item()
    assert value == pytest.approx((1 - dice) + ce, rel=1e-5)


def test_dice_with_background_averages_both_classes():
    dice_bg = (2 * 0.8 + S) / (1.2 + 1.0 + S)
    dice_fg = (2 * 0.6 + S) / (0.8 + 1.0 + S)
    ce = -(math.log(0.8) + math.log(0.6)) / 2
    value = make("dice_ce", include_background=True)(logits_from_probs(PROBS), TARGET).item()
    assert value == pytest.approx(1 - (dice_bg + dice_fg) / 2 + ce, rel=1e-5)


def test_focal_by_hand():
    focal = -((0.2**2) * math.log(0.8) + (0.4**2) * math.log(0.6)) / 2
    dice = (2 * 0.6 + S) / (0.8 + 1.0 + S)
    value = make("dice_focal", focal_gamma=2.0)(logits_from_probs(PROBS), TARGET).item()
    assert value == pytest.approx((1 - dice) + focal, rel=1e-5)


def test_tversky_and_focal_tversky_by_hand():
    tp, fp, fn = 0.6, 0.2, 0.4
    ti = (tp + S) / (tp + 0.3 * fp + 0.7 * fn + S)
    logits = logits_from_probs(PROBS)
    assert make("tversky")(logits, TARGET).item() == pytest.approx(1 - ti, rel=1e-5)
    assert make("focal_tversky", tversky_gamma=0.75)(logits, TARGET).item() == pytest.approx((1 - ti) ** 0.75, rel=1e-5)


def test_generalized_dice_by_hand():
    # both classes, each with volume 1: weights 1 and 1
    intersect = 0.8 + 0.6
    denominator = (1.2 + 1) + (0.8 + 1)
    expected = 1 - (2 * intersect + S) / (denominator + S)
    value = make("generalized_dice", include_background=True)(logits_from_probs(PROBS), TARGET).item()
    assert value == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- agreement with MONAI


def _random_case(seed: int = 0, num_classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 6, 5, 4, generator=g)
    target = torch.randint(0, num_classes, (2, 1, 6, 5, 4), generator=g)
    return logits, target


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_ce_agrees_with_monai(include_background, batch_dice):
    logits, target = _random_case()
    ours = make("dice_ce", num_classes=3, include_background=include_background, batch_dice=batch_dice)
    monai = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True, batch=batch_dice,
                       smooth_nr=S, smooth_dr=S)
    torch.testing.assert_close(ours(logits, target), monai(logits, target))


def test_dice_tversky_generalized_dice_agree_with_monai():
    logits, target = _random_case(1)
    common = {"include_background": False, "to_onehot_y": True, "softmax": True, "batch": True}
    dice = DiceLoss(smooth_nr=S, smooth_dr=S, **common)(logits, target)
    ce = make("ce", num_classes=3)(logits, target)
    torch.testing.assert_close(make("dice_ce", num_classes=3)(logits, target) - ce, dice)
    tversky = TverskyLoss(alpha=0.3, beta=0.7, smooth_nr=S, smooth_dr=S, **common)(logits, target)
    torch.testing.assert_close(make("tversky", num_classes=3)(logits, target), tversky)
    gdl = GeneralizedDiceLoss(w_type="square", smooth_nr=S, smooth_dr=S, **common)(logits, target)
    torch.testing.assert_close(make("generalized_dice", num_classes=3)(logits, target), gdl)


# ----------------------------------------------------------------------------- ordering


def _scene():
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[:, :, 2:5, 2:6] = 1
    target[:, :, 6:, 6:] = 2
    onehot = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    return target, onehot


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_perfect_prediction_scores_best_and_good_beats_bad(name):
    torch.manual_seed(0)
    target, onehot = _scene()
    loss = make(name, num_classes=3)
    perfect = loss(20 * onehot, target)
    good = loss(3 * onehot + torch.randn_like(onehot), target)
    bad = loss(3 * onehot.roll(1, dims=1) + torch.randn_like(onehot), target)
    random = loss(torch.randn_like(onehot), target)
    assert perfect < good < random < bad
    assert perfect < 1e-3


# ----------------------------------------------------------------------------- class weights


def test_class_weight_increases_the_gradient_on_the_rare_class():
    target = torch.zeros(1, 1, 10, dtype=torch.long)
    target[..., 0] = 1  # one rare voxel

    def rare_share(weights):
        logits = torch.zeros(1, 2, 10, requires_grad=True)
        make("ce", class_weights=weights)(logits, target).backward()
        grad = logits.grad.abs().sum(dim=1)[0]
        return (grad[0] / grad.sum()).item()

    unweighted = rare_share(None)
    weighted = rare_share(class_weights_from_frequencies([0.9, 0.1]))
    assert unweighted == pytest.approx(0.1)
    assert weighted > 2 * unweighted
    assert rare_share([1.0, 0.2]) < unweighted


def test_class_weights_from_frequencies_rule():
    weights = class_weights_from_frequencies([0.81, 0.18, 0.01])
    raw = [1 / math.sqrt(f) for f in (0.81, 0.18, 0.01)]
    assert weights == pytest.approx([w / (sum(raw) / 3) for w in raw])
    clipped = class_weights_from_frequencies([0.999998, 0.000001, 0.000001, 0.0])
    assert clipped[0] == pytest.approx(0.1) and clipped[3] == 1.0
    assert class_weights_from_frequencies([900, 100]) == pytest.approx(class_weights_from_frequencies([0.9, 0.1]))
    with pytest.raises(ConfigError, match="class frequencies must be finite, non-negative and not all zero"):
        class_weights_from_frequencies([0.0, 0.0])


def test_build_loss_takes_auto_weights_from_the_plan_and_validates_lists():
    plan = SimpleNamespace(num_classes=3, class_weights=[0.5, 1.0, 4.0])
    loss = build_loss(LossConfig(name="ce", class_weights="auto"), plan)
    assert loss.class_weights.tolist() == [0.5, 1.0, 4.0]
    assert build_loss(LossConfig(name="ce"), plan).class_weights is None
    assert build_loss(LossConfig(class_weights=[1.0, 2.0, 3.0]), plan).class_weights.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match=r"loss.class_weights has 2 values but the plan has 3 classes"):
        build_loss(LossConfig(class_weights=[1.0, 2.0]), plan)
    with pytest.raises(ConfigError, match="'auto' but the plan has no class_weights"):
        build_loss(LossConfig(class_weights="auto"), SimpleNamespace(num_classes=3, class_weights=[]))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_configured_loss_is_built(name):
    loss = build_loss(LossConfig(name=name, include_background=True, batch_dice=False),
                      SimpleNamespace(num_classes=4, class_weights=[1.0] * 4))
    assert (loss.name, loss.num_classes, loss.include_background, loss.batch_dice) == (name, 4, True, False)


# ----------------------------------------------------------------------------- ignore label and empty inputs


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ignored_voxels_do_not_contribute(name):
    torch.manual_seed(0)
    target, onehot = _scene()
    target = target.clone()
    target[:, :, :, :2] = 3  # index num_classes marks the ignore label
    loss = make(name, num_classes=3, ignore=True)
    logits = torch.randn_like(onehot, requires_grad=True)
    value = loss(logits, target)
    value.backward()
    assert torch.all(logits.grad[..., :2] == 0)
    changed = logits.detach().clone()
    changed[..., :2] = 50 * torch.randn_like(changed[..., :2])
    torch.testing.assert_close(loss(changed, target), value.detach())


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_no_nan_for_empty_classes_empty_batches_and_all_ignored(name, batch_dice):
    loss = make(name, num_classes=3, ignore=True, batch_dice=batch_dice, class_weights=[0.5, 1.0, 3.0])
    cases = {
        "empty classes": torch.zeros(2, 1, 5, 4, dtype=torch.long),
        "all ignored": torch.full((2, 1, 5, 4), 3, dtype=torch.long),
        "empty batch": torch.zeros(0, 1, 5, 4, dtype=torch.long),
    }
    for what, target in cases.items():
        logits = torch.randn(target.shape[0], 3, 5, 4, requires_grad=True)
        value = loss(logits, target)
        value.backward()
        assert torch.isfinite(value), what
        assert torch.isfinite(logits.grad).all(), what
    zero = loss(torch.randn(0, 3, 5, 4), cases["empty batch"])
    assert zero.item() == 0.0


def test_empty_class_is_penalised_only_when_predicted():
    target = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    target[..., :3, :] = 1  # class 2 absent
    onehot = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    loss = make("dice_ce", num_classes=3)
    false_positive = onehot.clone()
    false_positive[:, 2, 5, 5], false_positive[:, 0, 5, 5] = 1.0, 0.0
    # the smoothing term costs an absent, unpredicted class ~0.7 % Dice at e^-20 probabilities
    assert loss(20 * onehot, target) < 0.01
    assert loss(20 * false_positive, target) > 0.4


# ----------------------------------------------------------------------------- deep supervision


def test_deep_supervision_weights_halve_and_drop_the_lowest():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(4) == pytest.approx([8 / 14, 4 / 14, 2 / 14, 0.0])


def test_deep_supervision_loss_combines_levels_with_downsampled_targets():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 19, 17, 13))
    full = torch.randn(2, 3, 19, 17, 13)
    half = torch.randn(2, 3, 10, 9, 7)
    quarter = torch.randn(2, 3, 5, 5, 4)
    loss = make("dice_ce", num_classes=3)
    expected = (2 / 3) * loss(full, target) + (1 / 3) * loss(half, target[:, :, ::2, ::2, ::2])
    torch.testing.assert_close(loss([full, half, quarter], target), expected)
    torch.testing.assert_close(loss((full, half, 100 * quarter), target), expected)


def test_deep_supervision_target_falls_back_to_nearest_interpolation():
    target = torch.zeros(1, 1, 9, 9, dtype=torch.long)
    target[..., 3:6, 3:6] = 1
    logits = torch.zeros(1, 2, 4, 4)
    # 9 -> 4 has no stride with ceil(9 / s) == 4, so nearest interpolation is used
    full = torch.zeros(1, 2, 9, 9)
    assert torch.isfinite(make("dice_ce")([full, logits, logits[..., :2, :2]], target))


def test_target_without_channel_axis_is_accepted():
    logits = logits_from_probs(PROBS)
    torch.testing.assert_close(make("dice_ce")(logits, TARGET[:, 0]), make("dice_ce")(logits, TARGET))
