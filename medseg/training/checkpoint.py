"""Training checkpoints: atomic, pickle-free, and enough state to resume bitwise.

A checkpoint is a dict of tensors and plain Python values (``int``, ``float``,
``str``, ``bool``, ``None``, lists, tuples, dicts), written with
``torch.save`` into a temporary file in the same folder, fsync'ed and moved
into place with ``os.replace``: a kill at any moment leaves either the old or
the new file, never a torn one. It is read with ``torch.load(weights_only=True)``
only; a file that needs the full unpickler is refused, never loaded.

Contents (``format_version`` 1)::

    {"format_version": 1, "kind": "medseg-training-state",
     "identity": {"model_name", "model_options", "label_values", "label_names", "plan"},
     "epoch": completed epochs, "iteration": optimizer steps done in the next epoch (0 at an epoch end),
     "model": state_dict, "optimizer": state_dict, "scaler": state_dict | None,
     "trainer": {"best_metric", "best_epoch", "bad_validations", "val_dice", ...},
     "rng": {"python": [...], "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor], "generators": {...}},
     "seed": int, "medseg_version": str}

``numpy``'s and ``random``'s states are stored as lists and ints because the
weights-only unpickler refuses ``numpy`` arrays (reliability.md §3, §4.1).

The fields and their types are declared once, as the dataclasses below
(:class:`TrainingStateRecord` and its parts), and :func:`load_training_state`
checks a file against them before anything is restored: a file that loads but
lacks a field, has one of the wrong type, or whose tensors do not fit the network
is refused with a :class:`~medseg.errors.CheckpointError` naming the file and the
field, never a ``KeyError`` half-way through a resume.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import CheckpointError
from medseg.io.atomic import atomic_path
from medseg.records import field_problems

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medseg.data.plan import Plan

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "TrainingStateRecord",
    "capture_rng_state",
    "check_identity",
    "load_checkpoint",
    "load_training_state",
    "make_identity",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT_VERSION = 1
_KIND = "medseg-training-state"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: temp file in the same folder, fsync, ``os.replace``, fsync the folder.

    ``format_version`` and ``kind`` are added. ``state`` must hold only tensors and
    plain values, so that :func:`load_checkpoint` can read it with ``weights_only=True``.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": CHECKPOINT_FORMAT_VERSION, "kind": _KIND, **state}
    with atomic_path(path, overwrite=True) as temp:
        torch.save(payload, temp)
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing, truncated or corrupt file; objects that need the
            full unpickler (refused, never loaded); not a medseg training checkpoint;
            unknown format version.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; nothing to resume. Train without --resume first.")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values and was refused "
            "(medseg never unpickles arbitrary objects). Use a checkpoint written by medseg."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({err}).") from err
    if not isinstance(data, dict) or data.get("kind") != _KIND:
        raise CheckpointError(f"{path} is not a medseg training checkpoint (expected kind {_KIND!r}).")
    if data.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {data.get('format_version')!r}; this medseg reads "
            f"{CHECKPOINT_FORMAT_VERSION}. Resume with the medseg version that wrote it."
        )
    return data


# --------------------------------------------------------------------------- the training-state record


@dataclass(frozen=True)
class IdentityRecord:
    """``identity``: what a checkpoint must agree on with the run that resumes it."""

    model_name: str
    model_options: dict[str, Any]
    label_values: list[int]
    label_names: list[str]
    plan: dict[str, Any]


@dataclass(frozen=True)
class NumpyRngRecord:
    """``rng.numpy``: ``np.random.get_state()`` with the key array as an int64 tensor."""

    kind: str
    keys: torch.Tensor
    pos: int
    has_gauss: int
    cached_gaussian: float


@dataclass(frozen=True)
class RngRecord:
    """``rng``: what :func:`capture_rng_state` writes."""

    python: list[Any]
    numpy: NumpyRngRecord
    torch: torch.Tensor
    cuda: list[torch.Tensor]
    generators: dict[str, Any]


@dataclass(frozen=True)
class OptimizerRecord:
    """``optimizer``: a ``torch.optim`` state dict."""

    state: dict[Any, Any]
    param_groups: list[dict]


@dataclass(frozen=True)
class TrainingStateRecord:
    """A training checkpoint (``checkpoint_last.pt``), ``format_version`` 1."""

    format_version: int
    kind: str
    identity: IdentityRecord
    epoch: int
    iteration: int
    model: dict[str, torch.Tensor]
    optimizer: OptimizerRecord
    trainer: dict[str, Any]
    rng: RngRecord
    scaler: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    seed: int | None = None
    medseg_version: str | None = None


def load_training_state(
    path: str | Path,
    *,
    identity: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: type,
) -> dict[str, Any]:
    """Read a training checkpoint and check it completely before anything is restored from it.

    Checks, in order: the file (:func:`load_checkpoint`), every field of
    :class:`TrainingStateRecord` (present, right type), the ``identity`` against this
    run (:func:`check_identity`), the model tensors' names and shapes against
    ``model``, the optimizer's parameter groups against ``optimizer``, the RNG
    states' sizes, and the ``trainer`` section against the dataclass ``loop_state``.

    Raises:
        CheckpointError: naming ``path`` and each missing, wrong-typed or mismatched field.
    """
    import torch

    from medseg.model_folder import check_state_dict

    path = Path(path)
    data = load_checkpoint(path, map_location="cpu")
    problems = field_problems(TrainingStateRecord, data, localns={"torch": torch})
    if not problems:
        problems = [f"trainer.{p}" for p in field_problems(loop_state, data["trainer"], strict=True)]
        problems += _rng_problems(data["rng"])
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or damaged: " + "; ".join(problems)
            + ". It was not written by this medseg's trainer (or was edited); resume from an intact "
            "checkpoint_last.pt or train again without --resume in a new folder (-o)."
        )
    check_identity(data["identity"], identity, source=path)
    check_state_dict(
        model, data["model"], source=str(path),
        remedy="The checkpoint does not belong to this run's network; resume from an intact checkpoint_last.pt.",
    )
    saved_groups = [len(g["params"]) if isinstance(g.get("params"), list) else None
                    for g in data["optimizer"]["param_groups"]]
    groups = [len(g["params"]) for g in optimizer.param_groups]
    if saved_groups != groups:
        raise CheckpointError(
            f"checkpoint {path}: the optimizer state has parameter groups of sizes {saved_groups}, this run's "
            f"optimizer {groups}; the file does not belong to this run. Resume from an intact checkpoint_last.pt."
        )
    return data


def _rng_problems(rng: dict[str, Any]) -> list[str]:
    """RNG states that cannot be restored (wrong length or element type)."""
    import torch

    problems = []
    python = rng["python"]
    if not (len(python) == 3 and isinstance(python[0], int) and isinstance(python[1], (list, tuple))
            and len(python[1]) == len(random.getstate()[1]) and all(isinstance(x, int) for x in python[1])
            and (python[2] is None or isinstance(python[2], float))):
        problems.append("rng.python is not a Python random state [version, 625 integers, gauss]")
    expected = torch.get_rng_state()
    if rng["torch"].dtype != expected.dtype or rng["torch"].shape != expected.shape:
        problems.append(
            f"rng.torch has {rng['torch'].dtype} {tuple(rng['torch'].shape)} (expected {expected.dtype} "
            f"{tuple(expected.shape)})"
        )
    keys = rng["numpy"]["keys"]
    if keys.dim() != 1 or keys.numel() != 624:
        problems.append(f"rng.numpy.keys has shape {tuple(keys.shape)} (expected (624,))")
    return problems


# --------------------------------------------------------------------------- identity


def make_identity(*, model_name: str, model_options: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes it."""
    return {
        "model_name": model_name,
        "model_options": dict(model_options),
        "label_values": list(plan.label_values),
        "label_names": list(plan.label_names),
        "plan": plan.to_dict(),
    }


def check_identity(saved: dict[str, Any], current: dict[str, Any], *, source: str | Path) -> None:
    """Refuse a checkpoint made for another architecture, label map or plan.

    Raises:
        CheckpointError: listing every differing field (``checkpoint != this run``).
    """
    from medseg.data.plan import Plan

    diffs = []
    for key in ("model_name", "model_options", "label_values", "label_names"):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: {saved.get(key)!r} != {current.get(key)!r}")
    try:
        saved_plan = Plan.from_dict(_plain(saved["plan"]))
    except Exception as err:
        diffs.append(f"plan: unreadable in checkpoint ({err})")
    else:
        current_plan = Plan.from_dict(_plain(current["plan"]))
        diffs.extend(f"plan.{d}" for d in saved_plan.diff(current_plan))
    if diffs:
        raise CheckpointError(
            f"checkpoint {source} was made for a different model; differences (checkpoint != this run): "
            + "; ".join(diffs)
            + ". Use a fresh output folder (-o) or the config and dataset that made the checkpoint."
        )


def _plain(value: Any) -> Any:
    """Tuples -> lists recursively (what a JSON round trip does), so plans compare as in plan.json."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- RNG state


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """python, numpy, torch (and CUDA) RNG states plus named ``torch.Generator`` states, weights-only safe."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [int(version), [int(x) for x in internal], gauss],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name])
