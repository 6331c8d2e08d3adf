"""The model folder: everything ``medseg infer`` needs, and nothing else.

Layout (``format_version`` 1)::

    MODEL_DIR/
      model.json           # what the network is, how its input was prepared, how it was trained
      weights.safetensors  # the state dict (safetensors: no pickle, no code execution)

``model.json``::

    {"format_version": 1,
     "medseg_version": "0.1.0",
     "model": {"name": "unet", "options": {...}},      # create_model_from_plan(name, plan, **options)
     "plan": {...},                                     # Plan.to_dict()
     "infer": {...},                                    # InferConfig as a dict
     "fold": 0 | "all",
     "weights": "weights.safetensors",
     "weights_sha256": "<hex>",
     "training": {"epoch": 120, "best_epoch": 95, "val_dice": {"liver": 0.95, ...}},
     "volume_ranges": {"1": {"min_ml": 900.0, "max_ml": 2400.0, "present": 40, "cases": 41}, ...}}

``volume_ranges`` (optional; absent in folders written before it existed) holds,
per foreground label value, the smallest and largest volume in mL over the
training cases that contain it, and in how many of how many cases it occurs:
the ``volume`` quality flag of ``medseg infer`` (:mod:`medseg.inference.quality`)
reads it here, so a copied model folder keeps that check without its run's
``fingerprint.json``.

A folder is written into a temporary sibling and renamed into place, so a
reader never sees a half-written folder. Loading verifies the weights' sha256
before they are parsed and loads the state dict strictly.

Where model folders live in a run (see docs/training.md)::

    RUN_DIR/fold_K/model/          best weights of fold K (K = 0.. or "all")
    RUN_DIR/fold_K/model_last/     weights after the last epoch

:func:`find_model_dirs` accepts a model folder, a fold folder or a run
(cross-validation) folder; :func:`newest_run` finds the latest run for
``medseg infer`` without ``-m``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medseg.config import InferConfig, config_from_dict
from medseg.data.plan import Plan
from medseg.errors import CheckpointError, ConfigError
from medseg.io.atomic import atomic_dir
from medseg.records import field_problems, file_sha256

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "MODEL_FORMAT_VERSION",
    "MODEL_JSON",
    "WEIGHTS_FILE",
    "LoadedModel",
    "ModelBuilder",
    "ModelRecord",
    "TransferReport",
    "find_model_dirs",
    "load_model_folder",
    "newest_run",
    "read_model_json",
    "save_model_folder",
    "transfer_weights",
]

MODEL_FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"
_FOLD_DIR = re.compile(r"^fold_(\d+|all)$")

ModelBuilder = Callable[[str, Plan, dict[str, Any]], "nn.Module"]


@dataclass
class LoadedModel:
    """A model folder loaded for inference.

    Attributes:
        model: the network in eval mode on the requested device.
        plan: the plan it was trained with (preprocessing, patch size, labels).
        infer_config: inference defaults stored with the model.
        meta: the parsed ``model.json``.
        path: the model folder.
    """

    model: nn.Module
    plan: Plan
    infer_config: InferConfig
    meta: dict[str, Any]
    path: Path

    @property
    def model_name(self) -> str:
        return str(self.meta["model"]["name"])

    @property
    def fold(self) -> int | str:
        return self.meta["fold"]


# --------------------------------------------------------------------------- writing


def save_model_folder(
    model_dir: str | Path,
    *,
    model: nn.Module,
    model_name: str,
    model_options: dict[str, Any],
    plan: Plan,
    infer_config: InferConfig,
    fold: int | str,
    training_info: dict[str, Any],
    volume_ranges: dict[int, dict[str, float]] | None = None,
) -> Path:
    """Write a model folder atomically (temp sibling folder, then rename into place).

    Args:
        model_dir: destination folder (replaced if it exists).
        model: the network; its ``state_dict()`` is saved (a DDP wrapper is unwrapped).
        model_name: registered model name (``medseg.models``).
        model_options: keyword arguments for ``create_model_from_plan`` (must be JSON-able).
        plan: the plan the model was trained with.
        infer_config: inference defaults to store.
        fold: fold index or ``"all"``.
        training_info: ``{"epoch", "best_epoch", "val_dice": {class_name: dice}}`` (JSON-able).
        volume_ranges: label value -> ``{"min_ml", "max_ml", "present", "cases"}`` over the
            training cases (:func:`medseg.inference.quality.fingerprint_volume_ranges`); omitted when None.

    Returns:
        The model folder path.
    """
    from safetensors.torch import save_file

    from medseg.version import __version__

    model_dir = Path(model_dir)
    module = getattr(model, "module", model)  # DistributedDataParallel
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}
    with atomic_dir(model_dir, overwrite=True) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_file(state, str(weights), metadata={"format": "pt", "medseg_version": __version__})
        meta = {
            "format_version": MODEL_FORMAT_VERSION,
            "medseg_version": __version__,
            "model": {"name": model_name, "options": dict(model_options)},
            "plan": plan.to_dict(),
            "infer": dataclasses.asdict(infer_config),
            "fold": fold,
            "weights": WEIGHTS_FILE,
            "weights_sha256": _sha256(weights),
            "training": training_info,
        }
        if volume_ranges is not None:
            meta["volume_ranges"] = {str(int(v)): dict(r) for v, r in sorted(volume_ranges.items())}
        try:
            text = json.dumps(meta, indent=2)
        except TypeError as err:
            raise CheckpointError(
                f"cannot write {model_dir / MODEL_JSON}: model options or training info are not JSON-able ({err})."
            ) from err
        (tmp / MODEL_JSON).write_text(text + "\n", encoding="utf-8")
    return model_dir


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as err:
        raise _cannot_read(path, err) from err


def _cannot_read(path: Path, err: OSError) -> CheckpointError:
    """A model file that exists but cannot be read (e.g. another user's private file)."""
    if isinstance(err, PermissionError):
        return CheckpointError(
            f"cannot read {path}: permission denied; ask its owner to make the model folder readable "
            f"(chmod -R a+rX {path.parent}) or copy it to a folder of yours."
        )
    return CheckpointError(f"cannot read {path} ({err.strerror or err}); copy the model folder again.")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ModelEntryRecord:
    """``model.json``'s ``model``: the registered network and its options."""

    name: str
    options: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelRecord:
    """``model.json``, ``format_version`` 1: the fields and types :func:`read_model_json` checks."""

    format_version: int
    model: ModelEntryRecord
    plan: dict[str, Any]
    infer: dict[str, Any]
    fold: int | Literal["all"]
    weights: str
    weights_sha256: str
    medseg_version: str | None = None
    training: dict[str, Any] | None = None
    volume_ranges: dict[str, Any] | None = None


def read_model_json(model_dir: str | Path) -> dict[str, Any]:
    """Parse and check ``model.json`` (format version, required fields) without loading weights.

    Raises:
        CheckpointError: missing or unreadable file, unknown format version, fields of
            :class:`ModelRecord` missing or of the wrong type (each one named).
    """
    model_dir = Path(model_dir)
    path = model_dir / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} is not a medseg model folder: {MODEL_JSON} is missing. "
            "Pass the model/ folder that `medseg train` wrote (e.g. runs/NAME/fold_0/model)."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as err:
        raise _cannot_read(path, err) from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"model file {path} is corrupt ({err}); re-export or re-train the model.") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"model file {path} is corrupt: expected a JSON object.")
    version = meta.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise CheckpointError(
            f"model folder {model_dir} has format_version {version!r}; this medseg ({_version()}) reads "
            f"format_version {MODEL_FORMAT_VERSION}. Use the medseg version that wrote it "
            f"({meta.get('medseg_version', 'unknown')}) or re-train."
        )
    problems = field_problems(ModelRecord, meta)
    if problems:
        raise CheckpointError(
            f"model file {path} is incomplete or damaged: {'; '.join(problems)}. It was edited or cut short; "
            "copy the model folder again or re-train."
        )
    weights = meta["weights"]
    if Path(weights).name != weights or weights in ("", ".", ".."):
        raise CheckpointError(f"model file {path}: 'weights' must be a file name inside the folder, got {weights!r}.")
    return meta


def load_model_folder(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    build_model: ModelBuilder | None = None,
) -> LoadedModel:
    """Load a model folder for inference.

    Args:
        model_dir: folder with ``model.json`` and the weights.
        device: where to put the network.
        build_model: ``(name, plan, options) -> nn.Module``; default
            ``medseg.models.create_model_from_plan(name, plan, **options)``.

    Raises:
        CheckpointError: unknown format version, corrupt or truncated weights (sha256
            mismatch), state dict keys or shapes that do not match the network.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta = read_model_json(model_dir)
    try:
        plan = Plan.from_dict(meta["plan"])
        infer_config = config_from_dict({"infer": meta["infer"]}, source=str(model_dir / MODEL_JSON)).infer
    except (ConfigError, TypeError, KeyError) as err:
        raise CheckpointError(f"model file {model_dir / MODEL_JSON} has an invalid plan or infer section: {err}") from err

    weights = model_dir / meta["weights"]
    if not weights.is_file():
        raise CheckpointError(f"model weights {weights} are missing; copy the whole model folder.")
    digest = _sha256(weights)
    if digest != meta["weights_sha256"]:
        raise CheckpointError(
            f"model weights {weights} are corrupt (sha256 {digest[:12]}... != {str(meta['weights_sha256'])[:12]}... "
            f"recorded in {MODEL_JSON}): the file was truncated or changed. Copy the model folder again or re-train."
        )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"model weights {weights} are corrupt ({err}); copy the model folder again.") from err

    name = meta["model"]["name"]
    options = dict(meta["model"].get("options") or {})
    if build_model is None:
        from medseg.models import create_model_from_plan

        def build_model(n: str, p: Plan, o: dict[str, Any]) -> nn.Module:
            return create_model_from_plan(n, p, **o)

    model = build_model(name, plan, options)
    check_state_dict(model, state, source=str(weights))
    model.load_state_dict(state, strict=True)
    model.to(torch.device(device)).eval()
    return LoadedModel(model=model, plan=plan, infer_config=infer_config, meta=meta, path=model_dir)


def check_state_dict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    remedy: str = "The folder's model.json and weights come from different models; re-train or copy a matching folder.",
) -> None:
    """Refuse a state dict whose keys or shapes differ from ``model``'s, listing the differences.

    ``remedy`` ends the message (what the user should do about it).

    Raises:
        CheckpointError: with missing keys, unexpected keys and shape mismatches.
    """
    import torch

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(
            f"weights {source} are damaged: entries {_head(not_tensors)} are not tensors. {remedy}"
        )
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k}: {got[k]} != {expected[k]}" for k in sorted(set(expected) & set(got)) if got[k] != expected[k]]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_head(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_head(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches (file != network) {_head(shapes)}")
    raise CheckpointError(
        f"weights {source} do not fit the network {type(model).__name__}: " + "; ".join(parts)
        + f". {remedy}"
    )


def _head(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', ... (+{len(items) - n} more)' if len(items) > n else ''}]"


def _version() -> str:
    from medseg.version import __version__

    return __version__


# --------------------------------------------------------------------------- finding


def find_model_dirs(path: str | Path, folds: Sequence[int | str] | None = None) -> list[Path]:
    """Model folders under ``path``.

    ``path`` may be a model folder (has ``model.json``), a fold folder with
    ``model/`` inside, or a run / cross-validation folder with ``fold_K/model/``.
    For a run folder, ``folds=None`` selects every numbered fold (sorted), or
    ``fold_all`` when there are none; ``folds=[0, 2]`` / ``["all"]`` selects those.

    Raises:
        CheckpointError: no model folder found, or a requested fold is missing.
    """
    path = Path(path)
    if (path / MODEL_JSON).is_file():
        return [path]
    if (path / "model" / MODEL_JSON).is_file():
        return [path / "model"]
    found: dict[int | str, Path] = {}
    if path.is_dir():
        for child in path.iterdir():
            m = _FOLD_DIR.match(child.name)
            if m and (child / "model" / MODEL_JSON).is_file():
                key: int | str = m.group(1) if m.group(1) == "all" else int(m.group(1))
                found[key] = child / "model"
    if not found:
        raise CheckpointError(
            f"no medseg model in {path}: expected {MODEL_JSON}, model/{MODEL_JSON} or fold_K/model/{MODEL_JSON}. "
            "Pass a folder written by `medseg train` (e.g. runs/NAME or runs/NAME/fold_0/model)."
        )
    if folds is None:
        numbered = sorted(k for k in found if isinstance(k, int))
        return [found[k] for k in numbered] if numbered else [found["all"]]
    wanted = [f if f == "all" else int(f) for f in folds]
    missing = [str(f) for f in wanted if f not in found]
    if missing:
        have = ", ".join(str(k) for k in sorted(found, key=str))
        raise CheckpointError(f"fold(s) {', '.join(missing)} not trained in {path} (found folds: {have}).")
    return [found[f] for f in wanted]


def newest_run(runs_root: str | Path = Path("runs")) -> Path:
    """The most recently trained run folder under ``runs_root`` (by the age of its model.json files).

    Raises:
        CheckpointError: no trained model under ``runs_root``; the message shows how to pass ``-m``.
    """
    runs_root = Path(runs_root)
    best: tuple[float, Path] | None = None
    if runs_root.is_dir():
        for run in runs_root.iterdir():
            if not run.is_dir() or run.name.startswith("."):
                continue
            for meta in [run / MODEL_JSON, run / "model" / MODEL_JSON, *run.glob(f"fold_*/model/{MODEL_JSON}")]:
                if meta.is_file():
                    mtime = meta.stat().st_mtime
                    if best is None or mtime > best[0]:
                        best = (mtime, run)
    if best is None:
        raise CheckpointError(
            f"no trained model found under {runs_root}/. Pass one with -m, e.g. "
            "`medseg infer -m runs/NAME/fold_0/model scan.nii.gz`, or train one with `medseg train DATASET_DIR`."
        )
    return best[1]


# --------------------------------------------------------------------------- fine-tuning


@dataclass
class TransferReport:
    """What :func:`transfer_weights` copied.

    Attributes:
        loaded: tensor names copied from the source model.
        new_head: head tensors left freshly initialised (the label set differs).
        skipped: ``name: reason`` for other tensors that were not copied.
        source: the source model folder.
    """

    loaded: list[str]
    new_head: list[str]
    skipped: list[str]
    source: Path

    def summary(self) -> str:
        text = f"initialised {len(self.loaded)} tensors from {self.source}"
        if self.new_head:
            text += f"; new head ({len(self.new_head)} tensors: {_head(self.new_head, 3)})"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: {_head(self.skipped, 5)}"
        return text


def transfer_weights(model: nn.Module, source_dir: str | Path, *, label_names: Sequence[str]) -> TransferReport:
    """Start ``model`` from another model folder's weights (``--init-from``): transfer learning.

    Every tensor whose name and shape match is copied. The classifier head
    (``medseg.models.head_parameter_names``) is copied only when the label names
    are the same; otherwise it keeps its fresh initialisation. The source's
    sha256 is verified first.

    Raises:
        CheckpointError: unreadable or corrupt source, or no tensor matched
            (another architecture or dimensionality).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from medseg.models import head_parameter_names

    source_dir = find_model_dirs(source_dir)[0]
    meta = read_model_json(source_dir)
    weights = source_dir / meta["weights"]
    if not weights.is_file() or _sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"model weights {weights} are corrupt or missing; copy the model folder again.")
    try:
        source = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"model weights {weights} are corrupt ({err}).") from err
    same_labels = list(meta["plan"].get("label_names", [])) == list(label_names)
    heads = set(head_parameter_names(model))
    # buffers of the head (none today) follow their parameters' prefixes
    prefixes = tuple(getattr(model, "HEAD_PREFIXES", ()))
    target = model.state_dict()
    loaded, new_head, skipped = [], [], []
    update = {}
    for name, tensor in target.items():
        is_head = name in heads or (bool(prefixes) and name.startswith(prefixes))
        if is_head and not same_labels:
            new_head.append(name)
        elif name not in source:
            skipped.append(f"{name}: not in source")
        elif tuple(source[name].shape) != tuple(tensor.shape):
            skipped.append(f"{name}: shape {tuple(source[name].shape)} != {tuple(tensor.shape)}")
        else:
            update[name] = source[name].to(tensor.dtype)
            loaded.append(name)
    if not loaded:
        raise CheckpointError(
            f"--init-from {source_dir}: no layer of its {meta['model']['name']!r} network matches this "
            f"{type(model).__name__} (names or shapes differ); use a model of the same architecture and dimensionality."
        )
    with torch.no_grad():
        model.load_state_dict(update, strict=False)
    return TransferReport(loaded=loaded, new_head=new_head, skipped=skipped, source=source_dir)
