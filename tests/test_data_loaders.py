"""Balanced patch sampling, the preprocessed cache, splits and the reproducible loader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from medseg.config import AugmentConfig, Config, DataConfig, TrainConfig
from medseg.data import (
    PreprocessedCache,
    build_train_loader,
    compute_fingerprint,
    load_splits,
    make_splits,
    save_splits,
    scan_dataset,
)
from medseg.data.folders import Case
from medseg.data.synthetic import write_synthetic_dataset
from medseg.data.transforms import RandBalancedPatchd, build_train_transforms
from medseg.errors import DatasetError
from medseg.training.run import plan_from_config


def _two_organ_case():
    image = np.random.default_rng(0).normal(size=(1, 40, 40, 20)).astype(np.float32)
    label = np.zeros((1, 40, 40, 20), dtype=np.uint8)
    label[0, 2:30, 2:30, 2:18] = 1  # large "liver" (12,544 voxels)
    label[0, 30:32, 30:32, 9:11] = 2  # tiny "pancreas" (8 voxels)
    return image, label


@pytest.mark.parametrize("with_locations", [True, False])
def test_sampler_centres_the_rare_class_at_the_configured_rate(with_locations):
    image, label = _two_organ_case()
    sampler = RandBalancedPatchd([16, 16, 8], foreground_oversample=0.5, class_ratios=[0.5, 0.1, 0.4])
    sampler.set_random_state(seed=7)
    data = {"image": image, "label": label}
    if with_locations:
        data["locations"] = {c: np.argwhere(label[0] == c) for c in (1, 2)}
    draws, hits_rare, rare_in_patch = 2000, 0, 0
    for _ in range(draws):
        out = sampler(data)
        assert out["image"].shape == (1, 16, 16, 8) and out["label"].shape == (1, 16, 16, 8)
        if out["patch_class"] == 2:
            hits_rare += 1
            rare_in_patch += int((out["label"] == 2).any())
    # expected: 0.5 (foreground share) * 0.4 / (0.1 + 0.4) = 0.4 ; binomial sd ~ 0.011
    assert abs(hits_rare / draws - 0.4) < 0.04
    assert rare_in_patch == hits_rare  # a patch centred on the class contains it


def test_default_plan_centres_every_present_class_equally_often(tmp_path):
    # three classes of 12,544, 8 and 300 voxels: each is the centre of 1/3 of the foreground-forced patches
    from medseg.data.plan import class_sampling_rule

    image, label = _two_organ_case()
    label[0, 34:37, 2:12, 2:12] = 3
    frequencies = [float((label == c).mean()) for c in range(4)]
    ratios = class_sampling_rule(frequencies, foreground_oversample=0.33, mode=DataConfig().class_sampling)
    assert ratios == pytest.approx([0.67, 0.11, 0.11, 0.11])
    sampler = RandBalancedPatchd([16, 16, 8], foreground_oversample=0.33, class_ratios=ratios)
    sampler.set_random_state(seed=9)
    draws = 3000
    counts = np.bincount([sampler({"image": image, "label": label})["patch_class"] for _ in range(draws)], minlength=4)
    # expected 0.11 each (binomial sd ~ 0.006) and 0.67 random patches
    assert np.all(np.abs(counts[1:] / draws - 0.11) < 0.025), counts
    assert abs(counts[0] / draws - 0.67) < 0.03


def test_class_still_at_zero_dice_after_a_third_of_training_is_warned_about():
    from medseg.training.monitor import zero_class_warning

    dice = {"liver": 0.91, "spleen": 0.0, "stomach": 0.0, "pancreas": float("nan")}
    assert zero_class_warning(dice, 0.2) is None  # too early to judge
    text = zero_class_warning(dice, 0.4)
    assert text.startswith("after 40% of the training, Dice is still 0 for 2 of 4 classes (spleen, stomach)")
    assert "pancreas" not in text and "liver" not in text  # NaN (absent) and learned classes are not named
    assert zero_class_warning({"liver": 0.91, "spleen": 0.02}, 0.9) is None


def test_case_without_foreground_gets_random_padded_patches():
    sampler = RandBalancedPatchd([16, 16, 8], foreground_oversample=1.0, class_ratios=[0.0, 0.5, 0.5])
    sampler.set_random_state(seed=1)
    data = {"image": np.ones((1, 10, 20, 6), np.float32), "label": np.zeros((1, 10, 20, 6), np.uint8), "locations": {}}
    for _ in range(20):
        out = sampler(data)
        assert out["patch_class"] == 0 and out["image"].shape == (1, 16, 16, 8)
        assert out["image"].sum() == 10 * 16 * 6  # the case is padded with zeros to the patch


def test_2d_patches_stack_neighbouring_slices_channel_major():
    image = np.zeros((2, 8, 8, 6), np.float32)
    for c in range(2):
        for z in range(6):
            image[c, :, :, z] = 100 * c + z
    label = np.zeros((1, 8, 8, 6), np.uint8)
    label[0, 4, 4, 0] = 1  # foreground on the first slice: context repeats the edge slice
    sampler = RandBalancedPatchd([8, 8], foreground_oversample=1.0, class_ratios=[0, 1], slice_axis=2, slice_context=1)
    sampler.set_random_state(seed=3)
    out = sampler({"image": image, "label": label})
    assert out["image"].shape == (6, 8, 8) and out["label"].shape == (1, 8, 8)
    assert out["image"][:, 0, 0].tolist() == [0, 0, 1, 100, 100, 101]


def test_augmented_patches_keep_shape_and_label_values():
    image, label = _two_organ_case()
    from medseg.data.plan import ChannelNorm, Plan

    plan = Plan(spatial_dims=3, data_dims=3, image_channels=1, in_channels=1, channel_names=["CT"],
                label_values=[0, 1, 2], label_names=["b", "l", "p"], target_spacing=[1.0, 1.0, 1.0],
                normalization=[ChannelNorm(scheme="zscore")], patch_size=[16, 16, 8], batch_size=2,
                kernel_sizes=[[3, 3, 3]], strides=[[1, 1, 1]], class_weights=[1, 1, 1],
                class_sampling_ratios=[0.5, 0.25, 0.25], foreground_oversample=0.5)
    everything = AugmentConfig(**dict.fromkeys(("rotation_prob", "scale_prob", "flip_prob", "gamma_prob", "contrast_prob", "brightness_prob", "noise_prob", "blur_prob", "lowres_prob"), 1.0))
    transform = build_train_transforms(plan, everything)
    transform.set_random_state(seed=0)
    out = transform({"image": image, "label": label})
    assert out["image"].shape == (1, 16, 16, 8) and out["image"].dtype == torch.float32
    assert out["label"].dtype == torch.int64 and set(out["label"].unique().tolist()) <= {0, 1, 2}
    assert torch.isfinite(out["image"]).all()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    root = write_synthetic_dataset(tmp / "ds", layout="msd", num_cases=5, kind="mr", channels=1, shape=(28, 28, 16))
    index = scan_dataset(root)
    config = Config(train=TrainConfig(iterations_per_epoch=3, seed=11), data=DataConfig(num_folds=5))
    plan = plan_from_config(compute_fingerprint(index), config)
    return tmp, index, config, plan


def test_cache_is_reused_and_invalidated_by_a_plan_or_source_change(prepared, tmp_path):
    _, index, _, plan = prepared
    case = index.cases[0]
    cache = PreprocessedCache(tmp_path / "cache", plan, dataset_root=index.root)
    first = cache.get(case)
    assert (cache.misses, cache.hits) == (1, 0)
    again = PreprocessedCache(tmp_path / "cache", plan)  # a new run
    second = again.get(case)
    assert (again.misses, again.hits) == (0, 1)
    np.testing.assert_array_equal(first.image, second.image)
    assert second.record.final_geometry.same_grid(first.record.final_geometry)
    assert set(second.locations) <= {1, 2, 3} and all(len(v) for v in second.locations.values())
    changed = make_plan_with(plan, target_spacing=[s * 1.5 for s in plan.target_spacing])
    other = PreprocessedCache(tmp_path / "cache", changed)
    assert other.folder != cache.folder
    other.get(case)
    assert other.misses == 1
    stat = case.label_path.stat()
    os.utime(case.label_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a newer label file
    assert not again.is_fresh(case)
    again.get(case)
    assert again.misses == 1


def make_plan_with(plan, **changes):
    import dataclasses

    return dataclasses.replace(plan, **changes)


def test_cache_inside_the_dataset_is_refused(prepared):
    _, index, _, plan = prepared
    with pytest.raises(DatasetError, match="is inside the dataset folder"):
        PreprocessedCache(index.root / ".cache", plan, dataset_root=index.root)


def test_loader_is_reproducible_across_workers_and_resumes_exactly(prepared, tmp_path):
    _, index, config, plan = prepared
    cache = PreprocessedCache(tmp_path / "cache", plan, dataset_root=index.root)
    loader = build_train_loader(index, plan, cache=cache, data=config.data, augmentation=config.augment, fold=0,
                                 seed=config.train.seed, iterations_per_epoch=config.train.iterations_per_epoch,
                                 num_workers=0)
    epoch0 = list(loader)
    epoch1 = list(loader)  # the epoch counter moved on
    assert len(epoch0) == 3 and loader.batch_sampler.state_dict()["epoch"] == 2
    batch = epoch0[0]
    assert batch["image"].shape == (plan.batch_size, 1, *plan.patch_size) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (plan.batch_size, 1, *plan.patch_size) and batch["label"].dtype == torch.int64
    val_ids = set(make_splits(index, num_folds=5, seed=config.data.split_seed)[0]["val"])
    assert not val_ids & {cid for b in epoch0 + epoch1 for cid in b["case_id"]}
    assert not torch.equal(epoch0[0]["image"], epoch1[0]["image"])

    resumed = build_train_loader(index, plan, cache=cache, data=config.data, augmentation=config.augment, fold=0,
                                 seed=config.train.seed, iterations_per_epoch=config.train.iterations_per_epoch,
                                 num_workers=1)
    resumed.batch_sampler.load_state_dict({"epoch": 1, "offset": 1, "batch_size": plan.batch_size})
    tail = list(resumed)
    assert len(tail) == 2
    for a, b in zip(epoch1[1:], tail):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_k_fold_splits_cover_every_case_once_and_keep_patients_together(tmp_path):
    cases = [Case(f"c{i}", [tmp_path / f"c{i}.nii.gz"], None, f"p{i // 2}") for i in range(10)]
    splits = make_splits(cases, num_folds=5, seed=12345)
    assert len(splits) == 5
    assert sorted(i for s in splits for i in s["val"]) == sorted(c.case_id for c in cases)
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        patients = {int(i[1:]) // 2 for i in s["val"]}
        assert all({f"c{2 * p}", f"c{2 * p + 1}"} <= set(s["val"]) for p in patients)
    assert make_splits(cases, num_folds=5, seed=12345) == splits
    assert make_splits(cases, num_folds=5, seed=1) != splits
    save_splits(splits, tmp_path / "splits.json")
    assert load_splits(tmp_path / "splits.json", case_ids=[c.case_id for c in cases]) == splits
    with pytest.raises(DatasetError, match="names cases not in the dataset: c0"):
        load_splits(tmp_path / "splits.json", case_ids=["c1"])


def test_fewer_cases_than_folds_fall_back_with_a_warning(tmp_path):
    three = [Case(f"c{i}", [tmp_path / f"c{i}"]) for i in range(3)]
    with pytest.warns(UserWarning, match="falling back to leave-one-out"):
        splits = make_splits(three, num_folds=5)
    assert [len(s["val"]) for s in splits] == [1, 1, 1]
    with pytest.warns(UserWarning, match="trains and validates on all cases"):
        assert make_splits(three[:1], num_folds=5) == [{"train": ["c0"], "val": ["c0"]}]
