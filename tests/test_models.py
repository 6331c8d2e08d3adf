"""Model registry, contract tests over every registered model, DeepLab strides/dilations, plan wiring."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg.config import LossConfig
from medseg.errors import ConfigError, GeometryError
from medseg.losses import build_loss
from medseg.models import (
    create_model,
    create_model_from_plan,
    encoder_parameter_names,
    head_parameter_names,
    list_models,
    register_model,
)
from medseg.models import registry as registry_module
from medseg.models.base import crop_to, pad_to_multiple
from medseg.models.fcn import LearnedUpsample

SIZES = {2: (33, 29), 3: (19, 17, 13)}
# models registered by medseg itself (other test modules register toy models of their own)
BUILTIN = [n for n in list_models() if registry_module._REGISTRY[n].builder.__module__.startswith("medseg.models")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run faster on one thread, and the 2 cores here are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_options(name: str, spatial_dims: int) -> dict:
    """Small widths so every model runs in well under a second on 2 shared cores."""
    size = SIZES[spatial_dims]
    options = {
        "unet": {"base_features": 8, "max_features": 32, "patch_size": size},
        "deeplabv3": {"encoder_depth": 10, "encoder_width": 8, "decoder_channels": 16},
        "deeplabv3plus": {"encoder_depth": 10, "encoder_width": 8, "decoder_channels": 16, "low_level_channels": 8},
        "fcn": {"encoder_depth": 10, "encoder_width": 8},
        "segresnet": {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)},
        "unetr": {"img_size": size, "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
        "swinunetr": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 4},
        "attentionunet": {"channels": (8, 16, 32), "strides": (2, 2)},
    }
    if name not in options:
        pytest.fail(f"model {name!r} is registered but has no tiny options in tests/test_models.py; add them")
    return options[name]


# ----------------------------------------------------------------------------- contract (every registered model)


@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", BUILTIN)
def test_model_maps_any_size_to_logits_and_backpropagates(name, spatial_dims, in_channels):
    torch.manual_seed(0)
    size = SIZES[spatial_dims]
    model = create_model(name, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=3,
                         **tiny_options(name, spatial_dims))
    model.train()
    x = torch.randn(2, in_channels, *size)
    out = model(x)
    outputs = out if isinstance(out, (list, tuple)) else [out]
    assert outputs[0].shape == (2, 3, *size)
    sum(o.square().mean() for o in outputs).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0.5 * len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", BUILTIN)
def test_head_parameters_are_exactly_those_that_depend_on_num_classes(name):
    options = tiny_options(name, 2)
    a = create_model(name, spatial_dims=2, in_channels=1, num_classes=2, **options).state_dict()
    b = create_model(name, spatial_dims=2, in_channels=1, num_classes=5, **options).state_dict()
    model = create_model(name, spatial_dims=2, in_channels=1, num_classes=2, **options)
    differing = {k for k in a if a[k].shape != b[k].shape}
    head = set(head_parameter_names(model))
    assert differing <= head, f"parameters depending on num_classes outside the head: {differing - head}"
    assert head, "every built-in model names its head"
    assert not head & set(encoder_parameter_names(model))


@pytest.mark.parametrize("name", ["unet", "deeplabv3", "deeplabv3plus", "fcn", "segresnet", "swinunetr", "unetr"])
def test_encoder_parameters_are_named(name):
    model = create_model(name, spatial_dims=2, in_channels=1, num_classes=2, **tiny_options(name, 2))
    names = encoder_parameter_names(model)
    assert names and len(names) < len(list(model.parameters()))
    assert len(list(model.encoder_parameters())) == len(names)


# ----------------------------------------------------------------------------- training a step


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", ["unet", "deeplabv3", "deeplabv3plus", "fcn"])
def test_model_trains_with_the_default_loss(name, spatial_dims):
    torch.manual_seed(0)
    size = SIZES[spatial_dims]
    options = tiny_options(name, spatial_dims)
    if name == "unet":
        options = {**options, "deep_supervision": True}
    if name.startswith("deeplab"):
        options = {**options, "aspp_dropout": 0.0}
    model = create_model(name, spatial_dims=spatial_dims, in_channels=1, num_classes=3, **options)
    plan = SimpleNamespace(num_classes=3, class_weights=[1.0, 1.0, 1.0])
    loss_fn = build_loss(LossConfig(), plan)
    target = torch.zeros(2, 1, *size, dtype=torch.long)
    target[:, :, 4:12, 5:15] = 1
    target[:, :, 14:, :8] = 2
    x = target.float() + 0.3 * torch.randn(2, 1, *size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- registry


def test_unknown_model_lists_valid_names_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown model 'deeplab3'.*deeplabv3plus.*Did you mean 'deeplabv3'\?"):
        create_model("deeplab3", spatial_dims=2, in_channels=1, num_classes=2)


def test_unknown_option_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"model 'unet' has no option 'base_feature'.*Did you mean 'base_features'"):
        create_model("unet", spatial_dims=2, in_channels=1, num_classes=2, base_feature=8)


def test_unknown_option_of_a_monai_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model 'segresnet' has no option 'init_filter'.*'init_filters'"):
        create_model("segresnet", spatial_dims=2, in_channels=1, num_classes=2, init_filter=8)


def test_bad_spatial_dims_is_a_config_error():
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        create_model("unet", spatial_dims=4, in_channels=1, num_classes=2)


@pytest.fixture
def scratch_model_name():
    name = "scratch_test_model"
    yield name
    registry_module._REGISTRY.pop(name, None)


def test_registered_user_model_is_created_and_duplicates_are_refused(scratch_model_name):
    @register_model(scratch_model_name)
    def scratch(*, spatial_dims: int, in_channels: int, num_classes: int, width: int = 4) -> nn.Module:
        return nn.Conv2d(in_channels, num_classes, 1)

    assert scratch_model_name in list_models()
    model = create_model(scratch_model_name, spatial_dims=2, in_channels=2, num_classes=3, width=2)
    assert model(torch.zeros(1, 2, 5, 5)).shape == (1, 3, 5, 5)
    assert head_parameter_names(model) == [] and encoder_parameter_names(model) == []
    with pytest.raises(ConfigError, match="model name 'scratch_test_model' is already registered"):
        register_model(scratch_model_name)(scratch)


def test_unetr_requires_img_size_and_refuses_larger_inputs():
    with pytest.raises(ConfigError, match="model 'unetr' needs img_size"):
        create_model("unetr", spatial_dims=2, in_channels=1, num_classes=2)
    model = create_model("unetr", spatial_dims=2, in_channels=1, num_classes=2, **tiny_options("unetr", 2))
    with pytest.raises(GeometryError, match=r"unetr input \[50, 29\] is larger than its img_size \[48, 32\]"):
        model(torch.zeros(1, 1, 50, 29))


# ----------------------------------------------------------------------------- U-Net


def test_unet_deep_supervision_returns_lower_resolutions_in_training_only():
    torch.manual_seed(0)
    model = create_model("unet", spatial_dims=3, in_channels=1, num_classes=2, base_features=4,
                         kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 1], [2, 2, 1]],
                         deep_supervision=True)
    assert model.deep_supervision
    x = torch.randn(1, 1, 19, 17, 13)
    outputs = model.train()(x)
    assert [tuple(o.shape[2:]) for o in outputs] == [(19, 17, 13), (10, 9, 7), (5, 5, 7)]
    assert model.eval()(x).shape == (1, 2, 19, 17, 13)


def test_unet_features_double_and_are_capped():
    model = create_model("unet", spatial_dims=3, in_channels=1, num_classes=2, patch_size=[128, 128, 128])
    assert model.features == [32, 64, 128, 256, 320, 320]
    assert model.strides[0] == [1, 1, 1]
    assert isinstance(model.encoder[1].conv1.conv, nn.Conv3d)
    assert model.encoder[1].conv1.conv.stride == (2, 2, 2)


def test_unet_needs_both_kernel_sizes_and_strides():
    with pytest.raises(ConfigError, match="unet needs both kernel_sizes and strides"):
        create_model("unet", spatial_dims=2, in_channels=1, num_classes=2, strides=[[1, 1], [2, 2]])


def test_unet_rejects_strides_of_the_wrong_dimension():
    with pytest.raises(ConfigError, match=r"unet strides entry \[2, 2\] must have 3 positive values"):
        create_model("unet", spatial_dims=3, in_channels=1, num_classes=2,
                     kernel_sizes=[[3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [2, 2]])


# ----------------------------------------------------------------------------- DeepLab / FCN


def _conv_dilations(module: nn.Module) -> set[tuple[int, ...]]:
    return {m.dilation for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)) and max(m.kernel_size) > 1}


@pytest.mark.parametrize(
    ("output_stride", "stage3", "stage4", "rates"),
    [(16, {(1, 1)}, {(2, 2)}, (6, 12, 18)), (8, {(2, 2)}, {(4, 4)}, (12, 24, 36))],
)
def test_deeplab_output_stride_and_dilations(output_stride, stage3, stage4, rates):
    model = create_model("deeplabv3plus", spatial_dims=2, in_channels=1, num_classes=2, encoder_depth=10,
                         encoder_width=8, decoder_channels=8, output_stride=output_stride)
    features = model.encoder(torch.zeros(1, 1, 64, 96))
    assert [tuple(f.shape[2:]) for f in features] == [
        (32, 48), (16, 24), (8, 12), (64 // min(output_stride, 16), 96 // min(output_stride, 16)),
        (64 // output_stride, 96 // output_stride),
    ]
    assert _conv_dilations(model.encoder.stages[2]) == stage3
    assert _conv_dilations(model.encoder.stages[3]) == stage4
    assert [b.conv.dilation for b in model.aspp.branches[1:]] == [(r, r) for r in rates]
    assert model.atrous_rates == rates


def test_deeplab_3d_anisotropic_axis_is_never_strided_or_dilated():
    model = create_model("deeplabv3", spatial_dims=3, in_channels=1, num_classes=2, encoder_depth=10,
                         encoder_width=4, decoder_channels=8, anisotropic_axis=2)
    features = model.encoder(torch.zeros(1, 1, 64, 64, 12))
    assert tuple(features[-1].shape[2:]) == (4, 4, 12)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.MaxPool3d))]
    assert all(m.dilation[2] == 1 if isinstance(m, nn.Conv3d) else True for m in convs)
    assert all((m.stride[2] if isinstance(m.stride, tuple) else m.stride) == 1
               for m in convs if isinstance(m, nn.Conv3d))
    assert model.encoder.pool.stride == (2, 2, 1)
    assert [b.conv.dilation for b in model.aspp.branches[1:]] == [(6, 6, 1), (12, 12, 1), (18, 18, 1)]
    assert model(torch.zeros(1, 1, 30, 21, 5)).shape == (1, 2, 30, 21, 5)


def test_deeplab_rejects_output_stride_32():
    with pytest.raises(ConfigError, match="DeepLab output_stride must be 8 or 16, got 32"):
        create_model("deeplabv3", spatial_dims=2, in_channels=1, num_classes=2, output_stride=32)


def test_fcn_8s_fuses_three_scores():
    model = create_model("fcn", spatial_dims=2, in_channels=1, num_classes=3, encoder_width=8, encoder_depth=10)
    assert sorted(model.head.keys()) == ["final", "score2", "score3", "score4", "up0", "up1"]
    assert model.head["final"].factor == [8, 8]
    model32 = create_model("fcn", spatial_dims=2, in_channels=1, num_classes=3, encoder_width=8, variant="32s")
    assert model32.head["final"].factor == [32, 32]


def test_learned_upsampling_starts_as_linear_interpolation():
    torch.manual_seed(0)
    up = LearnedUpsample(2, 3, [2, 4])
    x = torch.randn(1, 3, 6, 5)
    y = up(x)
    ref = F.interpolate(x, scale_factor=(2, 4), mode="bilinear", align_corners=False)
    assert y.shape == ref.shape == (1, 3, 12, 20)
    torch.testing.assert_close(y[..., 2:-2, 4:-4], ref[..., 2:-2, 4:-4])


# ----------------------------------------------------------------------------- padding


def test_pad_to_multiple_and_crop_round_trip():
    x = torch.randn(1, 2, 19, 17, 13)
    padded, spatial = pad_to_multiple(x, [8, 8, 1])
    assert padded.shape == (1, 2, 24, 24, 13)
    assert torch.equal(crop_to(padded, spatial), x)
    tiny, _ = pad_to_multiple(torch.zeros(1, 1, 5, 7), [16, 16])
    assert tiny.shape == (1, 1, 16, 32)  # at least 2 voxels at the deepest level for instance norm


# ----------------------------------------------------------------------------- plan wiring


def _plan(**overrides):
    values = {"spatial_dims": 3, "in_channels": 1, "num_classes": 3, "patch_size": [40, 48, 12],
                  "target_spacing": [0.8, 0.8, 4.0], "kernel_sizes": None, "strides": None, "slice_axis": None}
    values.update(overrides)
    return SimpleNamespace(**values)


def test_from_plan_deeplab_gets_the_thick_slice_axis_and_drops_deep_supervision():
    model = create_model_from_plan("deeplabv3plus", _plan(), deep_supervision=True, encoder_width=4,
                                   encoder_depth=10, decoder_channels=8)
    assert model.encoder.anisotropic_axis == 2
    assert not model.deep_supervision
    iso = create_model_from_plan("fcn", _plan(target_spacing=[1.0, 1.0, 1.5]), encoder_width=4, encoder_depth=10)
    assert iso.encoder.anisotropic_axis is None


def test_from_plan_unet_uses_plan_topology_or_computes_it():
    kernels = [[3, 3, 1], [3, 3, 3], [3, 3, 3]]
    strides = [[1, 1, 1], [2, 2, 1], [2, 2, 2]]
    model = create_model_from_plan("unet", _plan(kernel_sizes=kernels, strides=strides), base_features=4,
                                   deep_supervision=True)
    assert model.strides == strides and model.kernel_sizes == kernels and model.deep_supervision
    computed = create_model_from_plan("unet", _plan(), base_features=4)
    from medseg.topology import unet_topology

    assert (computed.kernel_sizes, computed.strides) == unet_topology([40, 48, 12], [0.8, 0.8, 4.0])
    assert all(s[2] == 1 for s in computed.strides[:2])  # thick axis not pooled early


def test_from_plan_2d_on_3d_data_uses_the_in_plane_spacing():
    plan = _plan(spatial_dims=2, patch_size=[48, 12], target_spacing=[0.8, 0.8, 4.0], slice_axis=0)
    model = create_model_from_plan("deeplabv3", plan, encoder_width=4, encoder_depth=10, decoder_channels=8)
    assert model.encoder.anisotropic_axis == 1  # axes (1, 2) remain; the 4 mm axis is the second
    assert model(torch.zeros(1, 1, 48, 12)).shape == (1, 3, 48, 12)
    with pytest.raises(ConfigError, match="a 2D plan on 3D data needs slice_axis"):
        create_model_from_plan("fcn", _plan(spatial_dims=2, patch_size=[48, 12]))


def test_from_plan_drops_deep_supervision_for_monai_models():
    model = create_model_from_plan("segresnet", _plan(), deep_supervision=True, init_filters=8)
    assert model.deep_supervision is False


def test_from_plan_unetr_gets_the_patch_as_img_size():
    plan = _plan(spatial_dims=2, patch_size=[33, 29], target_spacing=[1.0, 1.0])
    model = create_model_from_plan("unetr", plan, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)
    assert model.input_size == [48, 32]


def test_builtin_models_are_registered():
    expected = {"unet", "deeplabv3", "deeplabv3plus", "fcn", "segresnet", "unetr", "swinunetr", "attentionunet"}
    assert set(BUILTIN) == expected
