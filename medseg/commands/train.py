"""Train a segmentation model on a dataset folder (nnU-Net's recipe by default).

Checks the dataset, plans preprocessing and network from the data, trains,
validates on whole held-out cases and writes a run folder that `medseg infer`
can use (RUN_DIR/fold_K/model). Ctrl-C or SIGTERM saves a checkpoint and
prints the command that resumes exactly where training stopped.

examples:
  medseg train data/Task09_Spleen                       # 3D U-Net, fold 0
  medseg train data/Spleen --time-budget 25m           # what fits in 25 minutes on this machine
  medseg train data/Spleen -c cpu_quick                 # a built-in config by name (`medseg configs`)
  medseg train data/Spleen --folds 0,1,2,3,4            # 5-fold cross-validation (or --folds 0 1 2 3 4)
  medseg train data/Spleen -o runs/spleen --resume      # continue an interrupted run
  medseg train data/Small --init-from runs/big/fold_0/model --set train.freeze_encoder_epochs=10
  torchrun --nproc_per_node=4 -m medseg train data/Spleen   # 4 GPUs (see docs/training.md)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from medseg.commands import emit
from medseg.commands._options import add_folds_argument, parse_fold

HELP = "train a model on a dataset folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET_DIR", help="dataset folder (MSD, nnU-Net or plain layout)")
    parser.add_argument(
        "-c", "--config", metavar="CONFIG",
        help="config file, or a built-in config's name, e.g. cpu_quick (`medseg configs` lists them; "
        "default: the 3D U-Net recipe, unet3d)",
    )
    parser.add_argument(
        "-o", "--output", metavar="RUN_DIR", help="run folder (default: runs/<dataset>_<model>_<dims>d)"
    )
    parser.add_argument("--model", help="network: unet, deeplabv3plus, deeplabv3, fcn, segresnet, ... (model.name)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), help="2: train on slices, 3: on volumes")
    parser.add_argument(
        "--fold", type=parse_fold, metavar="K", help="fold to train: 0..num_folds-1, or 'all' for every case (train.fold)"
    )
    add_folds_argument(parser, "train these folds in turn and summarise them")
    parser.add_argument("--max-epochs", type=int, metavar="N", help="number of epochs (train.max_epochs)")
    parser.add_argument(
        "--time-budget", metavar="DURATION",
        help="train each fold for this wall-clock time, e.g. 90s, 25m, 4h: the run is sized from the measured "
        "step time (train.time_budget; replaces --max-epochs)",
    )
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps (train.device)")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument(
        "--init-from", metavar="MODEL_DIR", help="start from another model's weights (fine-tuning; new head if classes differ)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.learning_rate=0.005 data.batch_size=4",
    )
    parser.add_argument("--seed", type=int, help="random seed (train.seed)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise on CPU; slower)")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The ``section.key=value`` overrides that the flags stand for (flags win over ``--set``)."""
    items = [item for group in args.overrides for item in group]
    if args.model:
        items.append(f"model.name={args.model}")
    if args.spatial_dims:
        items.append(f"data.spatial_dims={args.spatial_dims}")
    if args.fold is not None:
        items.append(f"train.fold={args.fold}")
    if args.max_epochs is not None:
        items.append(f"train.max_epochs={args.max_epochs}")
    if args.time_budget is not None:
        items.append(f"train.time_budget={args.time_budget}")
    if args.device:
        items.append(f"train.device={args.device}")
    if args.seed is not None:
        items.append(f"train.seed={args.seed}")
    if args.deterministic:
        items.append("train.deterministic=true")
    return items


def resume_command(args: argparse.Namespace, run_dir: object) -> str:
    """The command line that continues this run."""
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    if "-o" not in argv and "--output" not in argv and not any(a.startswith("--output=") for a in argv):
        argv += ["-o", str(run_dir)]
    if "train" not in argv:
        argv = ["train", *argv]
    prefix = "medseg"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        prefix = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')} -m medseg"
    return " ".join([prefix, *(shlex.quote(a) for a in argv[argv.index("train"):]), "--resume"])


def run(args: argparse.Namespace) -> int:
    from medseg.api import train

    result = train(
        args.dataset,
        args.config,
        verbose=False,  # medseg.cli has set up the progress lines
        output_dir=args.output,
        folds=args.folds,
        resume=args.resume,
        init_from=args.init_from,
        overrides=overrides_from_args(args),
    )
    if result.status == "interrupted":
        if int(os.environ.get("RANK", "0")) == 0:
            emit(f"training stopped; resume with:\n  {resume_command(args, result.run_dir)}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        emit(f"run folder: {result.run_dir}")
        if result.model_dir is not None:
            emit(f"model: {result.model_dir}  (medseg infer -m {shlex.quote(str(result.model_dir))} SCAN)")
    return 0
