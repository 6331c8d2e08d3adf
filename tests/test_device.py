"""One device rule for training, inference and ``--device`` (medseg.device.resolve_device)."""

from __future__ import annotations

import pytest
import torch

from medseg.device import resolve_device
from medseg.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_names_are_case_and_space_insensitive():
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@no_cuda
def test_auto_without_a_gpu_is_the_cpu_or_mps():
    assert resolve_device("auto").type in ("cpu", "mps")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_is_refused_with_the_way_out(spec):
    with pytest.raises(ConfigError, match="requested but CUDA is not available here; use --device cpu or auto"):
        resolve_device(spec)


@pytest.mark.parametrize(("spec", "message"), [("gpu0", "is not valid; use auto, cpu"),
                                                ("meta", "is not supported; use auto, cpu")])
def test_unknown_devices_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_device(spec)
