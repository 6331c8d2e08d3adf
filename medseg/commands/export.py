"""Export a trained model to TorchScript or ONNX, with its preprocessing plan beside it.

The exported network maps windows (N, C, *patch) to logits (N, K, *patch) and
runs with plain PyTorch (torch.jit.load) or onnxruntime, without medseg.
plan.json says how to preprocess a scan; export.json names the inputs,
outputs and labels. The exported logits are checked against PyTorch's.

Examples:
  medseg export runs/liver/fold_0/model --format onnx     # -> runs/liver/fold_0/export_onnx
  medseg export runs/liver/fold_0/model --format torchscript -o liver_ts/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.commands import emit

HELP = "export a model folder to TorchScript or ONNX (runnable without medseg)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="model folder (or a fold folder)")
    parser.add_argument("--format", required=True, choices=["torchscript", "onnx"], help="export format")
    parser.add_argument(
        "-o", "--output", type=Path, metavar="OUT",
        help="export folder to create (default: export_FORMAT beside the model folder, e.g. "
        "runs/NAME/fold_0/export_onnx); never the model folder, inside it or around it",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier export folder (a folder holding other files is refused, never emptied)",
    )


def run(args: argparse.Namespace) -> int:
    from medseg.api import export_model

    emit(export_model(args.model_dir, args.output, format=args.format, overwrite=args.overwrite))
    return 0
