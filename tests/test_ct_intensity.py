"""CT intensities across contrast phases: the clip window rule and the HU-scale augmentations (docs/plan.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.config import AugmentConfig, DataConfig
from medseg.data.fingerprint import Fingerprint
from medseg.data.plan import ChannelNorm, Plan, ct_clip_rule, load_plan, make_plan, save_plan
from medseg.data.preprocess import normalize
from medseg.data.transforms import RandCTIntensityd, RandLabelIntensityOffsetd, build_train_transforms
from medseg.errors import ConfigError

CT = ChannelNorm(scheme="ct", clip=(-200.0, 500.0), mean=40.0, std=50.0, clip_rule="contrast_robust")


def _fingerprint(hu_values: np.ndarray, *, channels=("CT",)) -> Fingerprint:
    """A fingerprint whose foreground intensity statistics are those of ``hu_values``."""
    p005, p995 = np.percentile(hu_values, [0.5, 99.5])
    stats = {"mean": float(hu_values.mean()), "std": float(hu_values.std()), "median": float(np.median(hu_values)),
             "min": float(hu_values.min()), "max": float(hu_values.max()), "p00_5": float(p005), "p99_5": float(p995)}
    return Fingerprint(
        case_ids=["c0", "c1"], data_dims=3, spacings=[[1.0, 1.0, 1.0]] * 2, shapes=[[64, 64, 64]] * 2,
        shapes_after_crop=[[64, 64, 64]] * 2, channel_names=list(channels),
        modality="CT" if "CT" in channels else "MR", intensity=[stats for _ in channels],
        label_values=[0, 1, 2], label_names=["background", "liver", "spleen"],
        class_voxels=[[1_000_000, 40_000, 9_000]] * 2,
    )


def _non_contrast_foreground() -> np.ndarray:
    """HU of a non-contrast abdomen's organs: 0.5 % gas-containing bowel near -245 HU, 99.5th percentile 78 HU."""
    rng = np.random.default_rng(0)
    values = rng.uniform(-100.0, 78.0, 100_000)
    values[:500] = -245.0
    values[-1000:] = 78.0
    return values


# --------------------------------------------------------------------------- clip window


def test_contrast_robust_window_reaches_past_enhanced_organs_when_training_scans_are_non_contrast():
    fp = _fingerprint(_non_contrast_foreground())
    assert fp.intensity[0]["p99_5"] == pytest.approx(78.0)
    norm = make_plan(fp).normalization[0]
    assert norm.clip_rule == "contrast_robust"
    assert norm.clip[1] >= 350.0  # portal-venous spleen/liver and an arterial aorta (~350 HU) stay below it
    assert norm.clip[0] <= -200.0
    assert norm.mean == pytest.approx(fp.intensity[0]["mean"]) and norm.std == pytest.approx(fp.intensity[0]["std"])


def test_foreground_percentile_window_is_nnunets_and_stays_selectable():
    fp = _fingerprint(_non_contrast_foreground())
    norm = make_plan(fp, DataConfig(ct_clip="foreground_percentiles")).normalization[0]
    assert norm.clip_rule == "foreground_percentiles"
    assert norm.clip == pytest.approx((fp.intensity[0]["p00_5"], fp.intensity[0]["p99_5"]))


def test_contrast_robust_window_keeps_wider_percentiles():
    # training scans that already reach further (lung, bone) keep their own percentiles
    assert ct_clip_rule(-1000.0, 1500.0, rule="contrast_robust") == (-1000.0, 1500.0)
    assert ct_clip_rule(-245.0, 78.0, rule="contrast_robust") == (-245.0, 500.0)
    assert ct_clip_rule(-50.0, 78.0, rule="contrast_robust") == (-200.0, 500.0)
    with pytest.raises(ConfigError, match=r"data\.ct_clip must be 'contrast_robust' or 'foreground_percentiles'"):
        ct_clip_rule(-50.0, 78.0, rule="window")


def test_enhanced_spleen_stays_apart_from_liver_only_with_the_contrast_robust_window():
    fp = _fingerprint(_non_contrast_foreground())
    # portal-venous phase: liver ~110 HU, spleen ~130 HU; arterial aorta ~350 HU
    scan = np.array([110.0, 130.0, 350.0], dtype=np.float32).reshape(1, 3, 1, 1)
    robust, _ = normalize(scan, make_plan(fp).normalization)
    nnunet, _ = normalize(scan, make_plan(fp, DataConfig(ct_clip="foreground_percentiles")).normalization)
    assert len(set(np.round(nnunet.ravel(), 5))) == 1  # all saturate at the 78 HU clip
    assert np.all(np.diff(robust.ravel()) > 0)


def test_contrast_robust_keeps_nnunets_soft_tissue_contrast_inside_the_knee_and_compresses_outside():
    fp = _fingerprint(_non_contrast_foreground())
    robust = make_plan(fp).normalization[0]
    nnunet = make_plan(fp, DataConfig(ct_clip="foreground_percentiles")).normalization[0]
    assert robust.knee == pytest.approx(nnunet.clip)
    soft = np.linspace(robust.knee[0] + 1, robust.knee[1] - 1, 50, dtype=np.float32)  # inside the percentile window
    assert np.allclose(robust.hu_to_units(soft), nnunet.hu_to_units(soft), atol=1e-5)
    # outside: still increasing, and each side spans at most CT_SHOULDER_UNITS units
    from medseg.data.plan import CT_SHOULDER_UNITS

    bright = np.linspace(80.0, 500.0, 50, dtype=np.float32)
    units = robust.hu_to_units(bright)
    assert np.all(np.diff(units) > 0)
    assert units[-1] - robust.hu_to_units(np.float32(robust.knee[1])) <= CT_SHOULDER_UNITS + 1e-4
    assert robust.shoulder == pytest.approx((500.0 - robust.knee[1]) / (CT_SHOULDER_UNITS * robust.std))


def test_hu_to_units_and_back_is_the_identity_inside_the_clip():
    norm = ChannelNorm(scheme="ct", clip=(-245.0, 500.0), mean=40.0, std=50.0, clip_rule="contrast_robust",
                       knee=(-100.0, 78.0), shoulder=4.2)
    hu = np.linspace(-245.0, 500.0, 200, dtype=np.float32)
    assert np.allclose(norm.units_to_hu(norm.hu_to_units(hu)), hu, atol=1e-3)
    assert norm.units_to_hu(norm.hu_to_units(np.float32(900.0))) == pytest.approx(500.0)


def test_window_rule_is_recorded_in_plan_json(tmp_path):
    plan = make_plan(_fingerprint(_non_contrast_foreground()))
    save_plan(plan, tmp_path / "plan.json")
    loaded = load_plan(tmp_path / "plan.json")
    assert loaded.normalization[0].clip_rule == "contrast_robust"
    assert loaded.normalization[0].clip == plan.normalization[0].clip


def test_mr_plan_still_zscores_per_image_whatever_the_ct_clip():
    fp = _fingerprint(_non_contrast_foreground(), channels=("T1", "T2"))
    for rule in ("contrast_robust", "foreground_percentiles"):
        plan = make_plan(fp, DataConfig(ct_clip=rule))
        assert [(n.scheme, n.clip, n.clip_rule) for n in plan.normalization] == [("zscore", None, None)] * 2


# --------------------------------------------------------------------------- label-aware augmentation


def _patch(channels: int = 1):
    """A (C, 12, 10, 8) image in normalised units with a rotated affine, and a label with 3 classes + ignore."""
    rng = np.random.default_rng(3)
    hu = rng.uniform(-100.0, 100.0, size=(channels, 12, 10, 8)).astype(np.float32)
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.5], [0, 0, 0, 1]])
    image = MetaTensor(torch.from_numpy((hu - CT.mean) / CT.std), affine=torch.as_tensor(affine),
                       meta={"case_id": "c0", "spacing": [1.5, 2.0, 3.0]})
    label = np.zeros((1, 12, 10, 8), dtype=np.int64)
    label[0, 1:5, 1:5, 1:5] = 1
    label[0, 6:11, 2:8, 2:7] = 2
    label[0, 1:3, 7:9, 6:8] = 3  # the ignore index (num_classes)
    return image, label


def test_each_structure_gets_its_own_offset_and_label_and_geometry_are_untouched():
    image, label = _patch()
    before_image, before_label = image.clone(), label.copy()
    transform = RandLabelIntensityOffsetd(channel_norms=[CT], num_classes=3, offset_range_hu=(-30.0, 300.0),
                                          prob=1.0, smooth=False)
    transform.set_random_state(seed=11)
    out = transform({"image": image, "label": label})
    offsets = transform.offsets_hu
    delta_hu = (out["image"].as_tensor() - before_image.as_tensor()).numpy()[0] * CT.std
    for k in (1, 2):
        assert np.allclose(delta_hu[label[0] == k], offsets[k], atol=1e-3)
    assert abs(offsets[1] - offsets[2]) > 1.0  # independent draws
    assert np.all(delta_hu[label[0] == 0] == 0) and np.all(delta_hu[label[0] == 3] == 0)
    assert out["label"] is label and np.array_equal(label, before_label)
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == before_image.shape
    assert torch.equal(out["image"].affine, before_image.affine)
    assert out["image"].meta["case_id"] == "c0" and out["image"].meta["spacing"] == [1.5, 2.0, 3.0]
    assert torch.equal(image.as_tensor(), before_image.as_tensor())  # input not modified


def test_label_offsets_skip_saturated_voxels_clip_to_the_window_and_spare_non_ct_channels():
    image, label = _patch(channels=2)
    values = image.as_tensor().numpy().copy()
    values[0, 1, 1, 1] = (CT.clip[0] - CT.mean) / CT.std  # gas at the lower clip bound, inside structure 1
    values[0, 7, 3, 3] = (480.0 - CT.mean) / CT.std  # near the upper bound, inside structure 2
    image = MetaTensor(torch.from_numpy(values), affine=image.affine)
    mr = ChannelNorm(scheme="zscore")
    transform = RandLabelIntensityOffsetd(channel_norms=[CT, mr], num_classes=3, offset_range_hu=(100.0, 300.0),
                                          prob=1.0, smooth=False)
    transform.set_random_state(seed=5)
    out = transform({"image": image, "label": label})["image"].as_tensor().numpy()
    assert out[0, 1, 1, 1] == pytest.approx(values[0, 1, 1, 1])
    assert out[0, 7, 3, 3] * CT.std + CT.mean == pytest.approx(CT.clip[1], abs=1e-3)
    assert np.array_equal(out[1], values[1])


def test_smoothed_offsets_blend_edges_over_one_voxel_only():
    image, label = _patch()
    transform = RandLabelIntensityOffsetd(channel_norms=[CT], num_classes=3, offset_range_hu=(200.0, 300.0),
                                          prob=1.0, smooth=True)
    transform.set_random_state(seed=2)
    out = transform({"image": image, "label": label})["image"]
    delta_hu = (out - image).as_tensor().numpy()[0] * CT.std
    offset = transform.offsets_hu[2]
    assert np.allclose(delta_hu[7:10, 3:7, 3:6], offset, atol=1e-3)  # interior of structure 2
    edge = delta_hu[6, 4, 4]  # on the boundary of structure 2
    assert 0 < edge < offset - 1
    assert np.all(delta_hu[8, 0, :] == 0)  # two voxels away from any structure


def test_label_offsets_apply_with_the_configured_probability():
    image, label = _patch()
    transform = RandLabelIntensityOffsetd(channel_norms=[CT], num_classes=3, prob=0.5)
    transform.set_random_state(seed=0)
    changed = sum(
        not torch.equal(transform({"image": image, "label": label})["image"], image) for _ in range(400)
    )
    assert 150 < changed < 250


def test_ct_intensity_change_is_on_the_hu_scale_and_clipped_to_the_window():
    image, label = _patch()
    transform = RandCTIntensityd(channel_norms=[CT], shift_hu=15.0, scale_range=(0.9, 1.1), noise_hu=0.0, prob=1.0)
    transform.set_random_state(seed=1)
    out = transform({"image": image, "label": label})
    hu_in = image.as_tensor().numpy() * CT.std + CT.mean
    hu_out = out["image"].as_tensor().numpy() * CT.std + CT.mean
    expected = np.clip(hu_in * transform._scale + transform._shift, *CT.clip)
    assert np.allclose(hu_out, expected, atol=1e-3)
    assert abs(transform._shift) <= 15.0 and 0.9 <= transform._scale <= 1.1
    assert out["label"] is label
    assert torch.equal(out["image"].affine, image.affine)


def _plan(norm: ChannelNorm, **kw) -> Plan:
    values = {"spatial_dims": 3, "data_dims": 3, "image_channels": 1, "in_channels": 1, "channel_names": ["CT"],
              "label_values": [0, 1, 2], "label_names": ["background", "liver", "spleen"],
              "target_spacing": [1.0, 1.0, 1.0], "normalization": [norm], "patch_size": [8, 8, 8], "batch_size": 2,
              "kernel_sizes": [[3, 3, 3]], "strides": [[1, 1, 1]], "class_weights": [1.0, 1.0, 1.0],
              "class_sampling_ratios": [0.67, 0.165, 0.165]}
    values.update(kw)
    return Plan(**values)


def test_train_transforms_add_the_ct_augmentations_for_ct_only():
    def names(plan, augment=None):
        return [type(t).__name__ for t in build_train_transforms(plan, augment).transforms]

    ct = names(_plan(CT))
    assert ct.index("RandLabelIntensityOffsetd") == 1 and ct.index("RandCTIntensityd") == 2  # right after sampling
    mr = names(_plan(ChannelNorm(scheme="zscore"), channel_names=["T1"]))
    assert "RandLabelIntensityOffsetd" not in mr and "RandCTIntensityd" not in mr
    off = names(_plan(CT), AugmentConfig(label_intensity_prob=0.0, ct_intensity_prob=0.0))
    assert "RandLabelIntensityOffsetd" not in off and "RandCTIntensityd" not in off
    # 2D with slice context: every stacked channel of the CT input is CT
    plan2d = _plan(CT, spatial_dims=2, in_channels=3, slice_context=1, slice_axis=2, patch_size=[8, 8],
                   kernel_sizes=[[3, 3]], strides=[[1, 1]])
    label_step = build_train_transforms(plan2d).transforms[1]
    assert [c for c, *_ in label_step.channels] == [0, 1, 2]


def test_train_transforms_on_a_ct_case_keep_the_label_map():
    plan = _plan(CT)
    rng = np.random.default_rng(0)
    image = ((rng.uniform(-100, 100, (1, 12, 12, 12)) - CT.mean) / CT.std).astype(np.float32)
    label = np.zeros((1, 12, 12, 12), dtype=np.uint8)
    label[0, 2:8, 2:8, 2:8] = 1
    label[0, 8:11, 8:11, 8:11] = 2
    transform = build_train_transforms(plan, AugmentConfig(enabled=True, rotation_prob=0.0, scale_prob=0.0,
                                                           flip_prob=0.0, label_intensity_prob=1.0))
    transform.set_random_state(seed=4)
    out = transform({"image": image, "label": label})
    start = out["patch_start"]
    expected = label[:, start[0]:start[0] + 8, start[1]:start[1] + 8, start[2]:start[2] + 8]
    assert np.array_equal(out["label"].numpy(), expected.astype(np.int64))
