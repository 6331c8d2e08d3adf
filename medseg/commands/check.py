"""Check a dataset folder and list every problem at once (nothing is modified).

Recognises Medical Segmentation Decathlon, nnU-Net v2 raw, images/ + labels/
folders and CSV/JSON lists (see docs/datasets.md). Exit status: 0 when there are
no problems (warnings are listed), 2 when there are problems.

Examples:
  medseg check data/Task09_Spleen
  medseg check data/my_ct_dataset --folds 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.commands import emit

HELP = "check a dataset folder: list every problem (missing files, geometry, labels) at once"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, metavar="DATASET_DIR", help="dataset folder (or a CSV/JSON list file)")
    parser.add_argument(
        "--folds", type=int, default=5, metavar="N",
        help="cross-validation folds that will be used (data.num_folds): fewer cases is a warning, splits then "
             "fall back to leave-one-out (default: 5; 1 skips the check)",
    )
    parser.add_argument(
        "--ignore-label", type=int, default=None, metavar="VALUE",
        help="label value that marks unlabeled voxels (loss.ignore_label): allowed although not declared",
    )
    parser.add_argument(
        "--resample-tilt", action="store_true",
        help="read DICOM series acquired with gantry tilt onto a regular grid (data.resample_tilt) instead of "
             "refusing them",
    )


def run(args: argparse.Namespace) -> int:
    from medseg.api import check_dataset

    # an unrecognised folder raises DatasetError: medseg.cli prints it as one line and exits 2
    report = check_dataset(args.dataset, num_folds=args.folds, ignore_label=args.ignore_label,
                           resample_tilt=args.resample_tilt)
    emit(report.header())
    emit(report.format())
    return 0 if report.ok else 2
