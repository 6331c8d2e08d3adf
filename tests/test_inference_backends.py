"""Inference backends (``--backend``) reproduce PyTorch eager, and refuse clearly when they cannot."""

from __future__ import annotations

import dataclasses
import logging
import sys

import numpy as np
import pytest
import torch
from inference_support import make_plan, save_model
from torch import nn

from medseg.cli import main
from medseg.errors import ConfigError
from medseg.inference import backends
from medseg.inference.backends import (
    BACKENDS,
    LOGITS_ATOL,
    BackendNetwork,
    backend_unavailable,
    prepare_network,
)
from medseg.inference.segmenter import Segmenter
from medseg.model_folder import load_model_folder

FAST = ["channels-last", "onnxruntime", "openvino"]


def _unet_plan(spatial_dims: int):
    if spatial_dims == 3:
        return dataclasses.replace(
            make_plan(num_classes=3, patch_size=(16, 16, 8)),
            kernel_sizes=[[3, 3, 3], [3, 3, 3]],
            strides=[[1, 1, 1], [2, 2, 2]],
        )
    return dataclasses.replace(  # 2.5D: 2D network on 3 slices of a volume
        make_plan(num_classes=3, spatial_dims=2, patch_size=(16, 16), slice_context=1),
        kernel_sizes=[[3, 3], [3, 3]],
        strides=[[1, 1], [2, 2]],
    )


@pytest.fixture(scope="module", params=[3, 2], ids=["3d", "2d"])
def unet_model(request, tmp_path_factory):
    """A tiny registry U-Net (deep supervision: the sliding window takes the first output)."""
    plan = _unet_plan(request.param)
    folder = tmp_path_factory.mktemp(f"backends{request.param}d") / "unet"
    return save_model(folder, plan, name="unet", options={"base_features": 4, "deep_supervision": True})


def _skip_if_missing(name: str) -> None:
    reason = backend_unavailable(name)
    if reason is not None:
        pytest.skip(reason)


def _eager(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = network(x)
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("backend", [*FAST, pytest.param("compile", marks=pytest.mark.slow)])
def test_backend_reproduces_torch_eager_logits(unet_model, backend):
    _skip_if_missing(backend)
    loaded = load_model_folder(unet_model)
    network = prepare_network(loaded.model, loaded.plan, backend, batch_size=2)
    assert isinstance(network, BackendNetwork) and network.backend == backend
    assert network.max_abs_diff <= LOGITS_ATOL
    gen = torch.Generator().manual_seed(3)
    for batch in (2, 1, 3):  # the check's batch, a short last batch, a larger one
        x = torch.randn(batch, loaded.plan.in_channels, *loaded.plan.patch_size, generator=gen)
        with torch.inference_mode():
            got = network(x)
        expected = _eager(loaded.model, x)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= LOGITS_ATOL


@pytest.mark.parametrize("backend", FAST)
def test_segmenter_with_backend_gives_the_torch_scores(unet_model, backend):
    _skip_if_missing(backend)
    rng = np.random.default_rng(0)
    plan = load_model_folder(unet_model).plan
    image = rng.normal(0, 3, size=(plan.image_channels, 40, 36, 20)).astype(np.float32)
    reference = Segmenter.load(unet_model, device="cpu", backend="torch")
    segmenter = Segmenter.load(unet_model, device="cpu", backend=backend)
    assert reference.backend == "torch" and reference.networks[0] is reference.models[0].model
    assert segmenter.backend == backend and segmenter.settings()["backend"] == backend
    expected, kind = reference.predict_scores(image)
    got, kind2 = segmenter.predict_scores(image)
    assert kind == kind2 == "logits"
    assert segmenter.networks[0].calls > 0  # the sliding window ran the backend
    assert float((got - expected).abs().max()) <= LOGITS_ATOL


def test_unknown_backend_is_refused(unet_model):
    loaded = load_model_folder(unet_model)
    with pytest.raises(ConfigError, match=r"unknown inference backend 'tensorrt'; choose one of auto, torch"):
        prepare_network(loaded.model, loaded.plan, "tensorrt")
    with pytest.raises(ConfigError, match="unknown inference backend 'tensorrt'"):
        Segmenter.load(unet_model, device="cpu", backend="tensorrt")


def test_cli_refuses_an_unknown_backend(unet_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["infer", str(tmp_path / "scan.nii.gz"), "-m", str(unet_model), "--backend", "tensorrt"])
    assert exc.value.code == 2
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_missing_package_gives_a_clear_message(unet_model, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # Python's own marker for "not importable"
    reason = backend_unavailable(backend)
    assert reason is not None and f"pip install {backend}" in reason and "medseg[cpu-fast]" in reason
    loaded = load_model_folder(unet_model)
    with pytest.raises(ConfigError, match=rf"backend '{backend}' needs the Python package\(s\) {backend}"):
        prepare_network(loaded.model, loaded.plan, backend)


def test_auto_without_openvino_runs_torch(unet_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("openvino", "torch"))
    loaded = load_model_folder(unet_model)
    assert prepare_network(loaded.model, loaded.plan, "auto") is loaded.model


def test_auto_is_torch_even_with_openvino_installed(unet_model):
    # openvino is not within float32 tolerance of PyTorch on real scans (docs/performance.md): opt-in only
    assert backends.AUTO_ORDER == ("torch",)
    loaded = load_model_folder(unet_model)
    assert prepare_network(loaded.model, loaded.plan, "auto") is loaded.model


def test_auto_is_torch_on_a_gpu_device_and_the_others_refuse_it(unet_model):
    loaded = load_model_folder(unet_model)
    assert prepare_network(loaded.model, loaded.plan, "auto", device="cuda") is loaded.model
    _skip_if_missing("onnxruntime")
    with pytest.raises(ConfigError, match="backend 'onnxruntime' runs on the CPU but the device is cuda"):
        prepare_network(loaded.model, loaded.plan, "onnxruntime", device="cuda")


class DriftingNet(nn.Module):
    """Adds the number of calls so far: tracing (ONNX export) freezes it, so the exported graph differs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x) + float(self.calls)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_that_differs_from_torch_is_refused_and_auto_falls_back(backend, caplog, monkeypatch):
    _skip_if_missing(backend)
    plan = _unet_plan(3)
    with pytest.raises(ConfigError, match=rf"backend '{backend}' gives logits that differ from PyTorch's by 1"):
        prepare_network(DriftingNet().eval(), plan, backend)
    if backend == "openvino":
        monkeypatch.setattr(backends, "AUTO_ORDER", ("openvino", "torch"))  # the fall-back mechanism
        net = DriftingNet().eval()
        with caplog.at_level(logging.WARNING, logger="medseg.inference.backends"):
            assert prepare_network(net, plan, "auto") is net
        assert "backend 'openvino' gives logits that differ" in caplog.text
        assert "trying the next backend" in caplog.text


def test_availability_check_answers_for_every_backend():
    for name in BACKENDS:
        reason = backend_unavailable(name)
        assert reason is None or "pip install" in reason or "compiler" in reason


def test_cli_backend_is_recorded_in_the_provenance(unet_model, tmp_path, capsys):
    _skip_if_missing("onnxruntime")
    import json

    import nibabel as nib

    rng = np.random.default_rng(1)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(0, 300, (30, 28, 18)).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1])), scan)
    code = main(["infer", str(scan), "-m", str(unet_model), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--backend", "onnxruntime"])
    assert code == 0, capsys.readouterr().err
    provenance = json.loads((tmp_path / "out" / "scan_provenance.json").read_text())
    assert provenance["settings"]["backend"] == "onnxruntime"
