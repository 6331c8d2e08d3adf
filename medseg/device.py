"""Which torch device to run on: one rule for training, inference and the CLI's ``--device``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device"]


def resolve_device(spec: str | torch.device = "auto", *, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this process's GPU) > Apple MPS > CPU; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` as given.

    Names are case- and space-insensitive. ``cuda`` without an index picks GPU
    ``local_rank`` (modulo the GPUs present), so each torchrun process gets its own.

    Raises:
        ConfigError: an unknown device name, or a device that is not available here.
    """
    import torch

    spec = str(spec).strip().lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("mps") if has_mps else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device {spec!r} is not valid; use auto, cpu, cuda, cuda:N or mps.") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available here; use --device cpu or auto.")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here.")
    elif device.type == "mps":
        if not has_mps:
            raise ConfigError(f"device {spec!r} requested but MPS is not available here; use --device cpu or auto.")
    elif device.type != "cpu":
        raise ConfigError(f"device {spec!r} is not supported; use auto, cpu, cuda, cuda:N or mps.")
    return device
