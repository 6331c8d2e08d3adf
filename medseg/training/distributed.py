"""Devices, determinism and multi-process training with PyTorch's own engine.

``torchrun --nproc_per_node=N -m medseg train ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed` then joins the
process group (``nccl`` on CUDA, ``gloo`` on CPU), each rank drives
``cuda:LOCAL_RANK`` (or the CPU), the model is wrapped in
``DistributedDataParallel`` and every rank samples its own patches from a
seed offset by its rank. Only rank 0 writes logs, TensorBoard events,
checkpoints and model folders.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_flag",
    "configure_determinism",
    "configure_threads",
    "destroy_distributed",
    "dist_info_from_env",
    "init_distributed",
    "seed_everything",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``)."""
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as err:
        raise ConfigError(f"torchrun environment is malformed ({err}); launch with torchrun.") from err
    return DistInfo(rank=rank, world_size=world, local_rank=local, local_world_size=local_world)


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group for a torchrun launch (no-op for a single process)."""
    import torch
    import torch.distributed as dist

    if not info.is_distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    log.info("distributed: rank %d of %d (%s, backend %s)", info.rank, info.world_size, device, backend)


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (identity for a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (to stop all ranks together)."""
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_sum(t)
    return bool(t.item() > 0)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """``deterministic``: deterministic algorithms, no cuDNN autotuning (bitwise on CPU, best effort on GPU).

    Otherwise cuDNN autotuning is enabled on CUDA (nnU-Net's choice: faster, not bitwise).
    """
    import torch

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = device.type == "cuda"


def configure_threads(num_threads: int | None, info: DistInfo) -> int:
    """Set torch's intra-op threads: the configured number, or the cores shared among local ranks."""
    import torch

    if num_threads is None:
        # the cores this process may use (SLURM, taskset and containers restrict them), shared among local ranks
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_threads = max(1, cores // max(1, info.local_world_size))
    torch.set_num_threads(num_threads)
    return num_threads
