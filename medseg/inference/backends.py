"""Inference backends: run a loaded PyTorch network through a faster engine on the CPU.

``medseg infer --backend NAME`` / ``Segmenter.load(..., backend=NAME)``:

==================  =================================================================
``torch``           PyTorch eager, float32 (the reference).
``channels-last``   PyTorch eager with ``channels_last`` / ``channels_last_3d`` memory format.
``compile``         ``torch.compile`` (inductor; on the CPU it needs a C++ compiler).
``onnxruntime``     exported to ONNX in memory and run by ONNX Runtime (CPU provider).
``openvino``        exported to ONNX in memory and run by OpenVINO (CPU, f32 precision forced).
``auto``            the first of :data:`AUTO_ORDER` that is installed and reproduces PyTorch;
                    on a GPU always ``torch``.
==================  =================================================================

:data:`AUTO_ORDER` holds the backends measured (``benchmarks/backends.py``,
``docs/performance.md``) to be faster than eager end to end AND to reproduce eager's
logits within float32 tolerance on real scans; today that is only ``torch`` itself:
OpenVINO is 1.5x faster but differs by up to 3e-3 of the largest logit on real scans
(0.01-0.05 % of the voxels change label), ``compile`` reproduces eager but its set-up
(8-65 s) outweighs its 1.1x, so both are opt-in.

Every backend but ``torch`` is checked when it is set up: its logits on a fixed
pseudo-random batch of windows must match PyTorch eager's within :data:`LOGITS_ATOL`
(relative to the largest |logit| when above 1); a guard against a broken export, not a
proof of equality on real scans. An explicitly asked-for backend that fails the check
(or cannot be set up) is refused with an error; ``auto`` logs why and tries the next one. Nothing is written to disk: the ONNX graph is exported into
memory and handed to the runtime as bytes.

All backends compute in float32. OpenVINO's CPU plugin would otherwise pick
bf16 on CPUs that have it, which changes the answer (and on some CPUs crashes
the process), so its inference precision is pinned to f32.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from medseg.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medseg.data.plan import Plan

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "LOGITS_ATOL",
    "BackendNetwork",
    "backend_unavailable",
    "prepare_network",
]

log = logging.getLogger(__name__)

#: Names accepted by ``--backend``.
BACKENDS = ("auto", "torch", "channels-last", "compile", "onnxruntime", "openvino")
#: ``auto`` on the CPU: the first of these that is installed and passes the check (the rule:
#: faster end to end than eager and within float32 tolerance of it on real scans).
AUTO_ORDER: tuple[str, ...] = ("torch",)
#: Accepted ``max |logits - torch eager logits|`` of the set-up check, per unit of the
#: largest |logit| when that is above 1 (float32 reorderings give ~1e-5 relative here).
LOGITS_ATOL = 1e-3
#: Python package each backend needs, and how to install it.
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
_ONNX_OPSET = 17


def backend_unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run here (missing package or compiler), or None if it can.

    Raises:
        ConfigError: ``name`` is not a backend.
    """
    if name not in BACKENDS:
        raise ConfigError(f"unknown inference backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    package = _PACKAGES.get(name)
    if package is not None:
        missing = [p for p in (package, "onnx") if importlib.util.find_spec(p) is None]
        if missing:
            return (
                f"backend {name!r} needs the Python package(s) {', '.join(missing)}, which are not installed: "
                f"pip install {' '.join(missing)}  (or pip install 'medseg[cpu-fast]')"
            )
    if name == "compile" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return "backend 'compile' needs a C++ compiler (g++ or clang++) on the PATH for torch.compile's CPU code"
    return None


class BackendNetwork:
    """A network-like callable: ``(B, C, *patch)`` float32 tensor -> logits tensor, via ``run``.

    It has what the sliding window uses of an ``nn.Module`` (``training``, ``eval``,
    ``train``, ``parameters``, ``buffers``) so it can stand in for the network.

    Attributes:
        backend: the backend's name.
        setup_s: seconds spent setting it up (export, compilation, the check).
        max_abs_diff: the check's ``max |logits - torch eager logits|``.
        calls: forward passes run since the set-up.
    """

    training = False

    def __init__(self, backend: str, run: Callable[[torch.Tensor], torch.Tensor], *, setup_s: float = 0.0,
                 max_abs_diff: float = 0.0) -> None:
        self.backend = backend
        self._run = run
        self.setup_s = setup_s
        self.max_abs_diff = max_abs_diff
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self._run(x)

    def eval(self) -> BackendNetwork:
        return self

    def train(self, mode: bool = True) -> BackendNetwork:
        if mode:
            raise RuntimeError(f"a {self.backend} inference network cannot be trained")
        return self

    def parameters(self):
        return iter(())

    def buffers(self):
        return iter(())

    def __repr__(self) -> str:
        return f"BackendNetwork({self.backend!r}, max_abs_diff={self.max_abs_diff:.2g})"


def prepare_network(
    network: nn.Module,
    plan: Plan,
    backend: str = "auto",
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 2,
) -> nn.Module | BackendNetwork:
    """The network to give the sliding window for ``backend`` (see the module docstring).

    Args:
        network: the loaded network (eval mode).
        plan: its plan (window shape ``(plan.in_channels, *plan.patch_size)``).
        backend: one of :data:`BACKENDS`.
        device: where the network runs; backends other than ``torch`` need the CPU.
        batch_size: windows per forward pass (``compile`` compiles for this batch size).

    Returns:
        ``network`` itself for ``torch``, else a :class:`BackendNetwork`.

    Raises:
        ConfigError: unknown backend, its package missing, not on the CPU, or its
            logits differ from PyTorch's by more than :data:`LOGITS_ATOL`.
    """
    import torch

    reason = backend_unavailable(backend)
    device = torch.device(device)
    if backend == "torch" or (backend == "auto" and device.type != "cpu"):
        return network
    if backend != "auto":
        if reason is not None:
            raise ConfigError(reason + "; or use --backend torch.")
        if device.type != "cpu":
            raise ConfigError(
                f"backend {backend!r} runs on the CPU but the device is {device}; use --backend torch (or auto)."
            )
        try:
            return _build_checked(network, plan, backend, batch_size)
        except _BackendFailed as err:
            raise ConfigError(f"{err}; use --backend torch.") from err
    for name in AUTO_ORDER:
        if name == "torch":
            break
        why = backend_unavailable(name)
        if why is not None:
            log.debug("backend auto: %s", why)
            continue
        try:
            built = _build_checked(network, plan, name, batch_size)
        except _BackendFailed as err:
            log.warning("backend auto: %s; trying the next backend", err)
            continue
        log.info("backend auto: %s (set up in %.1f s, max |logit difference| %.1e)", name, built.setup_s,
                 built.max_abs_diff)
        return built
    log.info("backend auto: torch")
    return network


class _BackendFailed(Exception):
    """A backend could not be set up or does not reproduce PyTorch (message says which and why)."""


def check_input(plan: Plan, batch_size: int) -> torch.Tensor:
    """The fixed pseudo-random batch of windows the set-up check runs (seed 0)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn((max(1, batch_size), plan.in_channels, *plan.patch_size), generator=gen)


def logits_tolerance(expected: torch.Tensor) -> float:
    """Accepted ``max |difference|`` from logits ``expected``: :data:`LOGITS_ATOL` x max(1, max |expected|)."""
    return LOGITS_ATOL * max(1.0, float(expected.abs().max()))


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _build_checked(network: nn.Module, plan: Plan, name: str, batch_size: int) -> BackendNetwork:
    """Set up backend ``name`` for ``network`` and compare its logits with eager PyTorch's."""
    import torch

    t0 = time.perf_counter()
    # the check costs one eager forward pass: one window, except for compile's one compiled batch shape
    x = check_input(plan, batch_size if name == "compile" else 1)
    try:
        with warnings.catch_warnings():  # the runtimes' own deprecation notices are not the user's concern
            warnings.simplefilter("ignore", DeprecationWarning)
            run = _BUILDERS[name](network, x)
            with torch.inference_mode():
                expected = _first(network(x)).float()
                got = _first(run(x)).float()
    except _BackendFailed:
        raise
    except Exception as err:  # each runtime raises its own types; the message names the backend
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _BackendFailed(f"backend {name!r} could not run the network: {first_line}") from err
    if got.shape != expected.shape:
        raise _BackendFailed(
            f"backend {name!r} returned logits of shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}"
        )
    diff = float((got - expected).abs().max())
    limit = logits_tolerance(expected)
    if not diff <= limit:  # also catches NaN
        raise _BackendFailed(
            f"backend {name!r} gives logits that differ from PyTorch's by {diff:.3g} (> {limit:.3g}) "
            "on the check windows"
        )
    return BackendNetwork(name, run, setup_s=time.perf_counter() - t0, max_abs_diff=diff)


# --------------------------------------------------------------------------- builders: (network, example) -> run


def _channels_last(network: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import copy

    import torch

    fmt = torch.channels_last_3d if example.ndim == 5 else torch.channels_last
    net = copy.deepcopy(network).to(memory_format=fmt)  # the torch network stays as it was

    def run(x: torch.Tensor) -> torch.Tensor:
        return _first(net(x.contiguous(memory_format=fmt))).contiguous()

    return run


def _compile(network: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch

    compiled = torch.compile(network, dynamic=False)
    batch = example.shape[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        # one compiled shape: a short last batch is padded to the full batch (no recompilation)
        n = x.shape[0]
        if n < batch:
            x = torch.cat([x, x.new_zeros((batch - n, *x.shape[1:]))])
        out = _first(compiled(x))
        return out[:n] if n < batch else out

    return run


def _onnx_bytes(network: nn.Module, example: torch.Tensor) -> bytes:
    import torch

    from medseg.inference.export import write_onnx

    buffer = io.BytesIO()
    try:
        write_onnx(network, example, buffer, opset=_ONNX_OPSET)
    except (RuntimeError, TypeError, ValueError, torch.jit.Error) as err:
        raise _BackendFailed(f"the network cannot be exported to ONNX: {str(err).splitlines()[0]}") from err
    return buffer.getvalue()


def _onnxruntime(network: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(_onnx_bytes(network, example), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0])

    return run


def _openvino(network: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import numpy as np
    import openvino as ov
    import torch

    core = ov.Core()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = core.read_model(_onnx_bytes(network, example), b"")
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": "f32",  # never bf16/fp16: not float32's answer (and SIGILL on some CPUs)
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    })
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        return torch.from_numpy(np.array(out[compiled.output(0)], copy=True))

    return run


_BUILDERS: dict[str, Callable[[nn.Module, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "channels-last": _channels_last,
    "compile": _compile,
    "onnxruntime": _onnxruntime,
    "openvino": _openvino,
}
