"""Fingerprint numbers on a hand-made case, and the planning rules (docs/plan.md)."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from medseg.config import Config, DataConfig, LossConfig, config_from_dict
from medseg.data import compute_fingerprint, scan_dataset
from medseg.data.fingerprint import Fingerprint
from medseg.data.plan import Plan, load_plan, make_plan, save_plan, target_spacing_rule
from medseg.errors import ConfigError, DatasetError
from medseg.training.run import plan_from_config


def _save(array, affine, path):
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def test_fingerprint_numbers_on_a_hand_made_case(tmp_path):
    root = tmp_path / "hand"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    # stored LPS with spacing (1, 1.5, 2): after re-orientation to RAS the spacing keeps its axis order
    affine = np.diag([-1.0, -1.5, 2.0, 1.0])
    image = np.zeros((10, 8, 6), dtype=np.float32)
    image[2:8, 1:7, 1:5] = 5.0  # non-zero box 6 x 6 x 4
    label = np.zeros((10, 8, 6), dtype=np.uint8)
    label[3:5, 2:4, 2:4] = 1  # 8 voxels
    values = np.arange(8, dtype=np.float32) * 10.0 + 100.0
    image[3:5, 2:4, 2:4] = values.reshape(2, 2, 2)
    _save(image, affine, root / "images" / "c1.nii.gz")
    _save(label, affine, root / "labels" / "c1.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "organ", "2": "lesion"},
                                                   "channel_names": {"0": "CT"}}))
    fp = compute_fingerprint(scan_dataset(root))
    assert fp.spacings == [[1.0, 1.5, 2.0]]
    assert fp.shapes == [[10, 8, 6]] and fp.shapes_after_crop == [[6, 6, 4]]
    stats = fp.intensity[0]
    assert stats["mean"] == pytest.approx(135.0) and stats["std"] == pytest.approx(np.std(values))
    assert stats["p00_5"] == pytest.approx(np.percentile(values, 0.5))
    assert stats["p99_5"] == pytest.approx(np.percentile(values, 99.5))
    assert stats["min"] == 100.0 and stats["max"] == 170.0
    assert fp.class_voxels == [[480 - 8, 8, 0]]
    assert fp.class_presence == [1.0, 1.0, 0.0]
    assert fp.class_frequencies[1] == pytest.approx(8 / 480)
    assert fp.modality == "CT" and not fp.modality_inferred
    assert fp.median_relative_size_after_crop == pytest.approx(144 / 480)
    assert Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp
    edited = {**json.loads(json.dumps(fp.to_dict())), "modality": 3}
    with pytest.raises(ConfigError, match=r"fingerprint has invalid fields: modality=3 \(expected a string\)"):
        Fingerprint.from_dict(edited)
    with pytest.raises(ConfigError, match=r"fingerprint format_version 99 is not supported.*recompute it"):
        Fingerprint.from_dict({**edited, "format_version": 99})


def _fp(*, spacings, shapes, channels=("CT",), data_dims=3, class_voxels=None, cropped=None) -> Fingerprint:
    n = len(spacings)
    return Fingerprint(
        case_ids=[f"c{i}" for i in range(n)],
        data_dims=data_dims,
        spacings=[list(s) for s in spacings],
        shapes=[list(s) for s in shapes],
        shapes_after_crop=[list(s) for s in (cropped or shapes)],
        channel_names=list(channels),
        modality="CT" if "CT" in channels else "MR",
        intensity=[{"mean": 60.0, "std": 20.0, "median": 58.0, "min": -100.0, "max": 300.0, "p00_5": -50.0,
                    "p99_5": 250.0} for _ in channels],
        label_values=[0, 1, 2],
        label_names=["background", "liver", "pancreas"],
        class_voxels=class_voxels or [[1_000_000, 40_000, 600]] * n,
    )


def test_isotropic_data_gets_the_median_spacing():
    spacings = [[0.7, 0.7, 0.8], [0.8, 0.8, 0.8], [0.9, 0.9, 1.0]]
    assert target_spacing_rule(spacings, [[200, 200, 180]] * 3) == pytest.approx([0.8, 0.8, 0.8])


def test_thick_slices_get_the_tenth_percentile_spacing():
    spacings = [[0.8, 0.8, z] for z in (3.0, 4.0, 5.0, 5.0, 6.0)]
    shapes = [[512, 512, 40]] * 5
    target = target_spacing_rule(spacings, shapes)
    assert target[:2] == pytest.approx([0.8, 0.8])
    assert target[2] == pytest.approx(np.percentile([3.0, 4.0, 5.0, 5.0, 6.0], 10))


def test_thick_spacing_with_many_slices_keeps_the_median():
    # anisotropic spacing but the thick axis has as many voxels as the others: no exception
    spacings = [[0.8, 0.8, z] for z in (3.0, 4.0, 5.0)]
    assert target_spacing_rule(spacings, [[200, 200, 200]] * 3)[2] == pytest.approx(4.0)


def test_ct_uses_dataset_foreground_statistics_and_mr_per_image_zscore():
    ct = make_plan(_fp(spacings=[[1, 1, 1]] * 3, shapes=[[64, 64, 64]] * 3))
    norm = ct.normalization[0]
    # default window: the percentiles (-50, 250) widened to at least [-200, 500] HU (contrast phases)
    assert (norm.scheme, norm.clip, norm.mean, norm.std) == ("ct", (-200.0, 500.0), 60.0, 20.0)
    assert norm.clip_rule == "contrast_robust"
    nnunet = make_plan(_fp(spacings=[[1, 1, 1]] * 3, shapes=[[64, 64, 64]] * 3),
                       DataConfig(ct_clip="foreground_percentiles")).normalization[0]
    assert (nnunet.clip, nnunet.clip_rule) == ((-50.0, 250.0), "foreground_percentiles")
    mr = make_plan(_fp(spacings=[[1, 1, 1]] * 3, shapes=[[64, 64, 64]] * 3, channels=("T2", "ADC"),
                       cropped=[[40, 40, 40]] * 3))
    assert [n.scheme for n in mr.normalization] == ["zscore", "zscore"]
    assert all(n.use_nonzero_mask for n in mr.normalization)  # crop kept 24 % < 75 %
    forced = make_plan(_fp(spacings=[[1, 1, 1]], shapes=[[64, 64, 64]]), DataConfig(normalization="zscore"))
    assert forced.normalization[0].scheme == "zscore" and not forced.normalization[0].use_nonzero_mask


def test_3d_data_plans_3d_and_2d_on_request_slices_the_thick_axis():
    fp = _fp(spacings=[[0.8, 0.8, 5.0]] * 3, shapes=[[256, 256, 30]] * 3)
    plan3 = make_plan(fp)
    assert plan3.spatial_dims == 3 and plan3.slice_axis is None and len(plan3.patch_size) == 3
    assert plan3.kernel_sizes[0][2] == 1  # thick axis: in-plane kernels first
    plan2 = make_plan(fp, DataConfig(spatial_dims=2, slice_context=2))
    assert plan2.spatial_dims == 2 and plan2.data_dims == 3 and plan2.slice_axis == 2
    assert len(plan2.patch_size) == 2 and plan2.in_channels == 5
    assert all(p % math.prod(s[a] for s in plan2.strides) == 0 for a, p in enumerate(plan2.patch_size))


def test_2d_data_plans_2d_and_refuses_3d():
    fp = _fp(spacings=[[0.5, 0.5]] * 2, shapes=[[300, 200]] * 2, data_dims=2)
    assert make_plan(fp).spatial_dims == 2
    with pytest.raises(ConfigError, match="spatial_dims=3 but the dataset holds 2D images"):
        make_plan(fp, DataConfig(spatial_dims=3))


def test_cpu_budget_gives_a_small_patch_and_cuda_a_large_one():
    fp = _fp(spacings=[[0.8, 0.8, 0.8]] * 10, shapes=[[400, 400, 300]] * 10)
    cpu = make_plan(fp)
    cuda = make_plan(fp, device_type="cuda")
    assert cpu.batch_size == 2 and math.prod(cpu.patch_size) <= 80**3
    assert math.prod(cuda.patch_size) >= 4 * math.prod(cpu.patch_size)
    assert cuda.batch_size >= 2
    for plan in (cpu, cuda):
        factors = [math.prod(s[a] for s in plan.strides) for a in range(3)]
        assert all(p % f == 0 for p, f in zip(plan.patch_size, factors))
        assert len(plan.kernel_sizes) == len(plan.strides)


def test_patch_is_clipped_to_small_data():
    plan = make_plan(_fp(spacings=[[1, 1, 1]] * 4, shapes=[[30, 28, 20]] * 4))
    assert plan.patch_size[0] <= 32 and plan.patch_size[2] <= 24
    assert plan.median_shape == [30, 28, 20]


def test_any_field_can_be_pinned_by_the_config():
    fp = _fp(spacings=[[1, 1, 1]] * 4, shapes=[[128, 128, 128]] * 4)
    cfg = Config(
        data=DataConfig(target_spacing=[2.0, 2.0, 2.0], patch_size=[48, 40, 36], batch_size=3,
                        foreground_oversample=0.5, class_sampling="uniform", crop_to_nonzero=False),
        loss=LossConfig(class_weights=[0.5, 1.0, 2.0]),
    )
    plan = plan_from_config(fp, cfg)
    assert plan.target_spacing == [2.0, 2.0, 2.0] and plan.patch_size == [48, 40, 36] and plan.batch_size == 3
    assert plan.class_weights == [0.5, 1.0, 2.0] and not plan.crop_to_nonzero
    assert plan.class_sampling_ratios == pytest.approx([0.5, 0.25, 0.25])
    factors = [math.prod(s[a] for s in plan.strides) for a in range(3)]
    assert all(p % f == 0 for p, f in zip(plan.patch_size, factors))
    with pytest.raises(ConfigError, match=r"loss.class_weights has 2 entries but the dataset has 3 classes"):
        plan_from_config(fp, Config(loss=LossConfig(class_weights=[1.0, 2.0])))


def test_default_sampling_centres_each_present_class_equally():
    plan = make_plan(_fp(spacings=[[1, 1, 1]] * 2, shapes=[[64, 64, 64]] * 2))
    assert plan.class_sampling_ratios == pytest.approx([0.67, 0.165, 0.165])


def test_balanced_sampling_favours_the_rare_class_and_weights_too():
    plan = make_plan(_fp(spacings=[[1, 1, 1]] * 2, shapes=[[64, 64, 64]] * 2),
                     DataConfig(class_sampling="balanced"))
    ratios = plan.class_sampling_ratios
    assert sum(ratios) == pytest.approx(1.0) and ratios[0] == pytest.approx(0.67)
    assert ratios[2] > ratios[1]  # 600-voxel pancreas centred more often than the 40,000-voxel liver
    assert plan.class_weights[2] > plan.class_weights[1] > plan.class_weights[0]


def test_plan_json_round_trip(tmp_path):
    plan = make_plan(_fp(spacings=[[0.8, 0.8, 3.0]] * 2, shapes=[[128, 128, 40]] * 2))
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan
    assert isinstance(plan, Plan) and plan.format_version == 1


def test_edited_plan_with_wrong_types_is_refused_field_by_field(tmp_path):
    plan = make_plan(_fp(spacings=[[0.8, 0.8, 3.0]] * 2, shapes=[[128, 128, 40]] * 2))
    data = plan.to_dict()
    data["patch_size"] = "abc"
    data["normalization"][0]["clip"] = [1.0]
    del data["batch_size"]
    with pytest.raises(ConfigError, match=r"patch_size='abc' \(expected a list of integers\).*batch_size is missing"):
        Plan.from_dict(data)
    with pytest.raises(ConfigError, match=r"normalization\[0\]\.clip=\[1\.0\]"):
        Plan.from_dict(data)


# --- ignore label (loss.ignore_label): a label value that is no class -------------------------------
def _ignore_dataset(root, *, declare_ignore: bool):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image = np.full((10, 8, 6), 50.0, dtype=np.float32)
    image[2:4, 2:4, 2:4] = 900.0  # unlabeled voxels: not foreground for the intensity statistics
    label = np.zeros((10, 8, 6), dtype=np.uint8)
    label[5:7, 2:4, 2:4] = 1
    label[2:4, 2:4, 2:4] = 255
    _save(image, affine, root / "images" / "c1.nii.gz")
    _save(label, affine, root / "labels" / "c1.nii.gz")
    labels = {"0": "bg", "1": "organ", **({"255": "unlabeled"} if declare_ignore else {})}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "CT"}}))
    return scan_dataset(root)


@pytest.mark.parametrize("declare_ignore", [False, True])
def test_ignore_label_is_no_class_in_the_plan(tmp_path, declare_ignore):
    index = _ignore_dataset(tmp_path / "ds", declare_ignore=declare_ignore)
    fp = compute_fingerprint(index, ignore_label=255)
    assert fp.intensity[0]["max"] == 50.0  # the unlabeled voxels (900) were not sampled as foreground
    config = Config(loss=LossConfig(ignore_label=255))
    plan = plan_from_config(fp, config)
    assert plan.label_values == [0, 1] and plan.label_names == ["bg", "organ"] and plan.num_classes == 2
    assert plan.ignore_label == 255 and len(plan.class_weights) == 2 and len(plan.class_sampling_ratios) == 2
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_undeclared_ignore_value_is_refused_without_ignore_label(tmp_path):
    index = _ignore_dataset(tmp_path / "ds", declare_ignore=False)
    with pytest.raises(DatasetError, match=r"label values \[255\] occur in .* but dataset.json declares \[0, 1\]"):
        compute_fingerprint(index)


def test_background_cannot_be_the_ignore_label():
    with pytest.raises(ConfigError, match=r"loss.ignore_label must be a label value >= 1 that is no class"):
        config_from_dict({"loss": {"ignore_label": 0}})
    fp = _fp(spacings=[[1.0, 1.0, 1.0]], shapes=[[64, 64, 64]])
    with pytest.raises(ConfigError, match=r"loss.ignore_label is 0, the background value"):
        plan_from_config(fp, Config(loss=LossConfig(ignore_label=0)))  # built directly: make_plan checks it too
