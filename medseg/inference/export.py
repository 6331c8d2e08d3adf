"""Export a model folder to TorchScript or ONNX, runnable without medseg.

The export folder holds::

    OUT/
      model.torchscript.pt | model.onnx   # the network: (N, C, *patch) float32 -> logits (N, K, *patch)
      plan.json                           # the preprocessing plan (orientation, spacing, normalisation, patch)
      export.json                         # input/output names and shapes, labels, weights sha256, medseg version

The network takes windows of exactly ``plan.patch_size`` (any batch size), as
the sliding window feeds them; preprocessing, sliding windows and restoring
the geometry are the caller's job, described by ``plan.json`` and
``docs/inference.md``. After writing, the exported model is run on a random
window and its logits are compared with the PyTorch model's
(``max |difference| <= 1e-4``); a larger difference is an error.

The folder is built in a temporary sibling and renamed into place. It is
never the model folder, inside it, or a folder that holds it (a run folder);
``overwrite`` replaces an earlier export, never a folder with other contents
(:func:`medseg.io.atomic.atomic_dir`). The default folder is ``export_FORMAT``
beside the model folder (``RUN/fold_K/export_onnx``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from medseg.errors import CheckpointError, ConfigError, OutputExistsError
from medseg.io.atomic import atomic_dir, check_folder_replaceable, refuse_output_over_inputs

__all__ = ["EXPORT_FILES", "export_model", "run_exported", "write_onnx"]

EXPORT_FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
LOGITS_ATOL = 1e-4


def _example_input(plan, batch: int = 1, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, plan.in_channels, *plan.patch_size), generator=gen)


def write_onnx(model, example, target: str | os.PathLike | BinaryIO, *, opset: int = 17) -> None:
    """Export ``model`` (eval mode) to ONNX at ``target`` (a path or a binary file object).

    Input ``image`` ``(N, C, *patch)``, output ``logits``; the batch axis is dynamic,
    the window shape that of ``example``. The TorchScript-based exporter is used
    (it needs no onnxscript); its deprecation and tracer warnings are silenced.

    Raises:
        RuntimeError, TypeError, ValueError, torch.jit.Error: the exporter's own errors.
    """
    import torch

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*instance_norm.*train=True", category=UserWarning)
        torch.onnx.export(
            model, (example,), target, dynamo=False, opset_version=opset,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )


def run_exported(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """Run an exported network file on a float32 batch ``(N, C, *patch)`` and return its logits."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    format: Literal["torchscript", "onnx"],
    overwrite: bool = False,
    opset: int = 17,
) -> Path:
    """Export the network of a model folder (see the module docstring).

    Args:
        model_dir: a model folder (``model.json`` + weights).
        out_dir: export folder to create; default ``export_FORMAT`` beside the model folder.
            It may not be the model folder, lie inside it or contain it.
        format: ``torchscript`` (``torch.jit.trace``) or ``onnx`` (``torch.onnx.export``,
            TorchScript-based exporter, dynamic batch axis).
        overwrite: replace an existing export folder (one that holds only export files).
        opset: ONNX opset version.

    Returns:
        The export folder.

    Raises:
        ConfigError: unknown format.
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is False, holds other
            files, or overlaps the model folder.
        CheckpointError: the model cannot be exported, or the exported logits differ.
    """
    import torch

    from medseg.data.plan import save_plan
    from medseg.model_folder import find_model_dirs, load_model_folder
    from medseg.version import __version__

    if format not in EXPORT_FILES:
        raise ConfigError(f"export format {format!r} is not supported; use torchscript or onnx.")
    dirs = find_model_dirs(model_dir)
    if len(dirs) != 1:
        raise ConfigError(
            f"{model_dir} holds {len(dirs)} folds; export one model folder at a time "
            f"(e.g. {dirs[0]})."
        )
    out_dir = Path(out_dir) if out_dir is not None else dirs[0].parent / f"export_{format}"
    refuse_output_over_inputs(out_dir, {"model folder": dirs[0]}, what="export folder")
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"export folder {out_dir} exists; pass --overwrite to replace it.")
    owned = [*EXPORT_FILES.values(), "plan.json", "export.json"]  # an earlier export of either format
    check_folder_replaceable(out_dir, owned)  # before the work; atomic_dir checks again before its swap
    loaded = load_model_folder(dirs[0], device="cpu")
    model, plan = loaded.model.eval(), loaded.plan
    example = _example_input(plan)
    with atomic_dir(out_dir, overwrite=overwrite, also_replaces=owned) as tmp:
        target = tmp / EXPORT_FILES[format]
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                # the TorchScript-based exporters are deprecated upstream but are what works without onnxscript
                warnings.simplefilter("ignore", DeprecationWarning)
                # shapes are fixed to the patch size on purpose: the sliding window only feeds patches
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=".*instance_norm.*train=True", category=UserWarning)
                if format == "torchscript":
                    traced = torch.jit.trace(model, example, check_trace=False)
                    traced.save(str(target))
                else:
                    write_onnx(model, example, str(target), opset=opset)
        except (RuntimeError, TypeError, ValueError, torch.jit.Error) as err:
            raise CheckpointError(f"cannot export {dirs[0]} to {format}: {err}".splitlines()[0]) from err
        save_plan(plan, tmp / "plan.json")
        check = _example_input(plan, batch=2, seed=1)
        with torch.no_grad():
            expected = model(check)
            expected = (expected[0] if isinstance(expected, (list, tuple)) else expected).numpy()
        got = run_exported(target, check.numpy())
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= LOGITS_ATOL:
            raise CheckpointError(
                f"exported {format} model of {dirs[0]} differs from PyTorch by {diff:.3g} (> {LOGITS_ATOL}); "
                "the network uses operations the exporter does not reproduce."
            )
        info = {
            "format": format,
            "file": target.name,
            "medseg_version": __version__,
            "model": loaded.meta["model"],
            "weights_sha256": loaded.meta["weights_sha256"],
            "input": {"name": "image", "shape": ["N", plan.in_channels, *plan.patch_size], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["N", plan.num_classes, *plan.patch_size], "dtype": "float32"},
            "labels": {str(v): n for v, n in plan.labels.items()},
            "checked_max_abs_diff": diff,
            "preprocessing": "see plan.json and docs/inference.md: re-orient to plan.orientation, crop to non-zero, "
            "normalise, resample to plan.target_spacing; sliding windows of plan.patch_size with Gaussian blending",
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir
