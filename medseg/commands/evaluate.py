"""Score predicted masks against reference masks, in mm, with a documented empty-mask policy.

PRED and GT are two mask files or two folders (cases matched by file name,
without extension and without a trailing '_mask'). Writes metrics_per_case.csv
and metrics_summary.json (mean, median, std, n_valid/n_total per class and
metric) into OUT_DIR and prints a short table. Definitions: docs/metrics.md.

Examples:
  medseg evaluate preds/ data/Task09_Spleen/labelsTs --labels data/Task09_Spleen/dataset.json
  medseg evaluate preds/ labels/ --metrics dice,hd95,nsd --tolerance 2 -o eval/
  medseg evaluate preds/ labels/ --lesion --region WT=1,2,3 --region TC=2,3 --region ET=3   (MSD Task01 labels)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.commands import emit

HELP = "score predicted masks against reference masks (Dice, HD95, NSD, lesion-wise ...), in mm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred", type=Path, metavar="PRED", help="prediction mask file or folder")
    parser.add_argument("gt", type=Path, metavar="GT", help="reference mask file or folder")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT_DIR",
        help="folder for the CSV and JSON reports (default: the PRED folder, or the folder of the PRED file)",
    )
    parser.add_argument(
        "--labels",
        metavar="JSON|MODEL_DIR",
        help="label names from a dataset.json or a model folder (default: classes named by their values)",
    )
    parser.add_argument(
        "--metrics",
        metavar="LIST",
        help="comma-separated, e.g. dice,iou,hd95 (default: dice,iou,precision,recall,hd95,assd,nsd,avd,rvd; "
        "also hd, specificity, accuracy, pred_volume, gt_volume)",
    )
    parser.add_argument(
        "--tolerance",
        default="1.0",
        metavar="MM",
        help="NSD tolerance in mm, or per class: liver=2,spleen=1,default=1 (default: 1.0)",
    )
    parser.add_argument(
        "--empty",
        choices=["nan", "one"],
        default="nan",
        help="both masks empty: nan = undefined, excluded and counted in n_valid (default); one = perfect score",
    )
    parser.add_argument(
        "--worst-distance",
        default="inf",
        metavar="inf|diagonal|MM",
        help="distance reported when one mask is empty (default: inf; diagonal = image diagonal in mm)",
    )
    parser.add_argument(
        "--surface",
        choices=["surfel", "voxel"],
        default="surfel",
        help="surface of HD, HD95, ASSD and NSD: surfel = surface elements on the voxel-corner grid weighted "
        "by area, as DeepMind's surface-distance (default); voxel = boundary voxel centres, as MONAI",
    )
    parser.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="NAME=V,V,...",
        help="also score a union of labels as one mask, e.g. WT=1,2,3 (repeatable)",
    )
    parser.add_argument("--include-background", action="store_true", help="also score label 0")
    parser.add_argument(
        "--lesion",
        action="store_true",
        help="lesion-wise metrics (connected components): TP/FP/FN, detection sensitivity, lesion Dice; "
        "writes lesions.csv",
    )
    parser.add_argument(
        "--lesion-match-iou",
        type=float,
        default=0.0,
        metavar="T",
        help="a reference lesion is detected when its IoU with the touching predicted components is > T "
        "(default 0: any overlap)",
    )
    parser.add_argument(
        "--lesion-min-voxels",
        type=int,
        default=0,
        metavar="N",
        help="ignore connected components smaller than N voxels (default 0: keep all)",
    )
    parser.add_argument(
        "--resample-to-reference",
        action="store_true",
        help="resample predictions on another voxel grid onto the reference grid (nearest neighbour) "
        "instead of refusing them",
    )
    parser.add_argument(
        "--missing",
        choices=["error", "empty", "skip"],
        default="error",
        help="references without prediction: error (default), empty (score as an empty prediction), skip",
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="parallel processes (default: CPUs, max 4)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing report files")
    parser.add_argument(
        "--anonymize",
        action="store_true",
        help="name cases case_<first 12 hex digits of the reference file's sha256> in the reports instead of "
        "by file name (often a patient name or ID), and write no file or folder path into them",
    )


def run(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.evaluation import evaluate
    from medseg.metrics import LesionOptions

    output = args.output or (args.pred if args.pred.is_dir() else args.pred.parent)
    lesion = (
        LesionOptions(match_iou=args.lesion_match_iou, min_voxels=args.lesion_min_voxels)
        if args.lesion
        else False
    )
    report = evaluate(
        args.pred,
        args.gt,
        labels=args.labels,
        regions=dict(_parse_region(text, ConfigError) for text in args.region),
        metrics=args.metrics,
        tolerance_mm=_parse_tolerance(args.tolerance, ConfigError),
        empty=args.empty,
        worst_distance=_parse_worst(args.worst_distance, ConfigError),
        surface=args.surface,
        include_background=args.include_background,
        lesion=lesion,
        resample_to_reference=args.resample_to_reference,
        missing=args.missing,
        output_dir=output,
        overwrite=args.overwrite,
        num_workers=args.workers,
        parallel="processes",  # safe here: the medseg command is the __main__ module the workers import
        anonymize=args.anonymize,
    )
    emit(report.format_table())
    for label, names in (
        ("predictions without reference (not scored)", report.predictions_without_reference),
        ("references without prediction", report.references_without_prediction),
    ):
        if names:
            emit(f"{label}: {len(names)}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    for path in (report.csv_path, report.summary_path, report.lesions_path):
        if path is not None:
            emit(f"wrote {path}")
    return 0


def _parse_region(text: str, error: type[Exception]) -> tuple[str, list[int]]:
    name, sep, values = text.partition("=")
    try:
        members = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        members = []
    if not sep or not name.strip() or not members:
        raise error(f"--region {text!r}: expected NAME=V,V,... with integer label values, e.g. WT=1,2,3.")
    return name.strip(), members


def _parse_tolerance(text: str, error: type[Exception]) -> float | dict[str, float]:
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            out[key.strip()] = float(value)
        return out
    except ValueError as err:
        raise error(f"--tolerance {text!r}: expected mm (e.g. 1.5) or per class liver=2,default=1.") from err


def _parse_worst(text: str, error: type[Exception]) -> str | float:
    if text in ("inf", "diagonal"):
        return text
    try:
        return float(text)
    except ValueError as err:
        raise error(f"--worst-distance {text!r}: expected inf, diagonal or a distance in mm.") from err
