"""preprocess_case: re-orient, crop, normalise, resample, with a record that undoes it exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ORIENTATIONS, make_affine, sphere_mask

from medseg.data.plan import ChannelNorm, Plan
from medseg.data.preprocess import (
    PreprocessRecord,
    class_indices,
    normalize,
    preprocess_case,
    restore_mask,
)
from medseg.errors import DatasetError, GeometryError
from medseg.io.geometry import Geometry
from medseg.io.volume import Volume
from medseg.spatial import resample_array

SHAPE = (24, 20, 16)
SPACING = (0.8, 1.1, 2.5)


def _plan(**overrides) -> Plan:
    values = {
        "spatial_dims": 3, "data_dims": 3, "image_channels": 1, "in_channels": 1, "channel_names": ["CT"],
        "label_values": [0, 2, 5], "label_names": ["background", "a", "b"], "target_spacing": list(SPACING),
        "normalization": [ChannelNorm(scheme="ct", clip=(-100.0, 200.0), mean=50.0, std=25.0)],
        "patch_size": [16, 16, 8], "batch_size": 2, "kernel_sizes": [[3, 3, 3]], "strides": [[1, 1, 1]],
        "class_weights": [1.0, 1.0, 1.0], "class_sampling_ratios": [0.67, 0.165, 0.165],
    }
    values.update(overrides)
    return Plan(**values)


def _case(kind: str):
    affine = make_affine(kind, spacing=SPACING)
    body = np.zeros(SHAPE, dtype=bool)
    body[3:21, 2:17, 1:14] = True  # non-zero region, so cropping does something
    ball = sphere_mask(SHAPE, center=(10, 9, 7), radius=4.0, spacing=SPACING)
    small = sphere_mask(SHAPE, center=(16, 12, 9), radius=2.0, spacing=SPACING)
    image = np.where(body, 40.0, 0.0).astype(np.float32)
    image[ball] = 120.0
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[ball] = 2
    label[small & body] = 5
    return Volume(image[np.newaxis], Geometry(SHAPE, affine)), label


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_restore_undoes_crop_and_orientation_exactly(kind):
    volume, label = _case(kind)
    # target = the case's own spacing in RAS axis order: no resampling, so the round trip is exact
    ras_spacing = preprocess_case(volume, _plan()).record.spacing_before_resampling
    out = preprocess_case(volume, _plan(target_spacing=list(ras_spacing)), label=label)
    record = out.record
    assert record.crop_bbox != [[0, s] for s in record.shape_after_orient]
    assert record.final_geometry.orientation == "RAS" or kind in ("oblique", "left_handed")
    assert out.image.shape[1:] == record.shape_after_crop
    values = np.asarray([0, 2, 5])[out.label[0]]
    restored = restore_mask(values.astype(np.uint8), PreprocessRecord.from_dict(json.loads(json.dumps(record.to_dict()))))
    np.testing.assert_array_equal(restored, label)


@pytest.mark.parametrize("kind", ["LPS", "PIR", "oblique"])
def test_final_geometry_keeps_structures_in_place_after_resampling(kind):
    volume, label = _case(kind)
    out = preprocess_case(volume, _plan(target_spacing=[1.0, 1.0, 1.0]), label=label)
    geometry = out.record.final_geometry
    assert geometry.spacing == pytest.approx((1.0, 1.0, 1.0), abs=0.07)
    before = volume.geometry.voxel_to_world(np.argwhere(label == 2).mean(axis=0))
    after = geometry.voxel_to_world(np.argwhere(out.label[0] == 1).mean(axis=0))
    assert np.linalg.norm(before - after) < 0.5  # mm
    assert out.image.dtype == np.float32 and out.label.dtype == np.uint8


def test_thick_slices_are_resampled_separately():
    volume, label = _case("RAS")
    out = preprocess_case(volume, _plan(target_spacing=[0.5, 0.5, 2.5]), label=label)
    assert out.record.separate_axis == 2
    assert out.record.spacing_before_resampling == pytest.approx(SPACING)


def test_ct_normalisation_clips_then_uses_dataset_statistics():
    image = np.array([[-1000.0, 50.0, 100.0, 3000.0]], dtype=np.float32)
    out, _ = normalize(image, [ChannelNorm(scheme="ct", clip=(-100.0, 200.0), mean=50.0, std=25.0)])
    np.testing.assert_allclose(out[0], [-6.0, 0.0, 2.0, 6.0])


def test_zscore_inside_the_nonzero_mask_keeps_outside_at_zero():
    image = np.array([[0.0, 2.0, 4.0, 0.0]], dtype=np.float32)
    out, stats = normalize(image, [ChannelNorm(scheme="zscore", use_nonzero_mask=True)])
    np.testing.assert_allclose(out[0], [0.0, -1.0, 1.0, 0.0])
    assert stats == [{"mean": 3.0, "std": 1.0}]


def test_label_values_map_to_class_indices_and_unknown_values_are_refused():
    np.testing.assert_array_equal(class_indices(np.array([0, 5, 2, 5]), [0, 2, 5]), [0, 2, 1, 2])
    with pytest.raises(DatasetError, match=r"contains values \[3\] not in the plan's labels \[0, 2, 5\]"):
        class_indices(np.array([0, 3]), [0, 2, 5], where="label of x")
    with pytest.raises(DatasetError, match=r"non-integer values \[0.5\]"):
        class_indices(np.array([0.0, 0.5]), [0, 1])


def test_wrong_channel_count_and_label_shape_are_refused():
    volume, label = _case("RAS")
    with pytest.raises(DatasetError, match=r"has 1 channel\(s\) but the plan expects 2"):
        preprocess_case(volume, _plan(image_channels=2, channel_names=["T1", "T2"]))
    with pytest.raises(GeometryError, match="label shape"):
        preprocess_case(volume, _plan(), label=label[:, :, :-1])


def test_preprocessing_resamples_images_linearly():
    from medseg.data.preprocess import IMAGE_ORDER, PREPROCESS_VERSION

    assert IMAGE_ORDER == 1 and PREPROCESS_VERSION >= 2
    # a linear ramp stays a linear ramp under linear interpolation (a cubic spline would too, but
    # only linear keeps a step's values inside the input range)
    step = np.zeros((1, 8, 4, 4), dtype=np.float32)
    step[0, 4:] = 100.0
    out = resample_array(step, (13, 4, 4), order=IMAGE_ORDER)
    assert out.min() >= 0.0 and out.max() <= 100.0
    assert 0.0 < out[0, 6, 0, 0] < 100.0


def test_ignore_label_maps_to_the_index_after_the_last_class():
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    indices = class_indices(label, [0, 1, 2], ignore_label=255)
    assert indices.tolist() == [[0, 1], [2, 3]]
    with pytest.raises(DatasetError, match=r"contains values \[255\] not in the plan's labels \[0, 1, 2\]"):
        class_indices(label, [0, 1, 2])
