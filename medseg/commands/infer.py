"""Segment scans with a trained model; masks overlay the input scans exactly.

Each input is a NIfTI/MetaImage/NRRD file, a DICOM series folder, or a folder
of scans (each file, and each DICOM sub-folder, is a case). Every case gets
OUT/<case>_mask.nii.gz on the scan's own grid (same shape, affine and NIfTI
codes) plus <case>_provenance.json (medseg version, model and input sha256,
settings). A DICOM folder's case name is the folder name. With --anonymize a
case is named case_<12 hex digits of its content's sha256> and no output holds a path.

Test-time augmentation (mirroring) averages 8 passes per window in 3D (4 in 2D):
typically a fraction of a Dice point better, 8x the network time. It is on by
default on GPUs and off on the CPU; --tta turns it on there.

Examples:
  medseg infer scan.nii.gz                       # newest run under ./runs, mask in .
  medseg infer scans/ -m runs/liver -o masks/ --stats --preview
  medseg infer dicom_dir/ -m runs/liver/fold_0/model -o liver_mask.nii.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.cli import add_folds_argument

HELP = "segment scans (NIfTI files, DICOM series folders or folders of scans) with a trained model"


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"overlap must be a number in [0, 1), got {text!r}") from err
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"overlap must be in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="scan file, DICOM folder or folder of scans")
    parser.add_argument(
        "-m", "--model", type=Path, metavar="MODEL_DIR",
        help="model folder, fold folder or run folder (all folds: an ensemble); default: newest run under ./runs",
    )
    parser.add_argument(
        "-o", "--output", type=Path, metavar="OUT", default=Path("."),
        help="output folder (created if missing; default: the current folder), or a .nii.gz file for one input",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--overlap", type=_overlap, help="sliding-window overlap in [0, 1) (default: the model's, 0.5)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument(
        "--tta", dest="tta", action="store_const", const="on",
        help="mirroring test-time augmentation: ~8x slower in 3D for typically < 1 Dice point "
        "(default: on for GPUs, off on the CPU)",
    )
    tta.add_argument("--no-tta", dest="tta", action="store_const", const="off", help="no test-time augmentation")
    add_folds_argument(parser, "folds of a run folder to ensemble (default: all)")
    parser.add_argument("--probs", action="store_true", help="also write <case>_probs.nii.gz (uint8, 255 = probability 1)")
    parser.add_argument("--stats", action="store_true", help="also write per-label voxels, mL and boxes (<case>_stats.json/.csv)")
    parser.add_argument("--preview", action="store_true", help="also write <case>_preview.png (mask over 3 orthogonal slices)")
    parser.add_argument(
        "--postprocess", metavar="MODE",
        help="largest (largest component per class), min-size=N (drop components < N voxels) or none",
    )
    parser.add_argument("--batch-size", type=_positive, help="windows per forward pass (default: the model's)")
    parser.add_argument("--series-uid", help="the series to segment when a DICOM folder holds several")
    parser.add_argument(
        "--resample-tilt", action="store_true",
        help="segment a gantry-tilted DICOM series (refused by default) after resampling it onto a regular grid; "
        "the mask is written on that corrected grid (docs/geometry.md)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (never the inputs)")
    parser.add_argument(
        "--anonymize", action="store_true",
        help="name outputs case_<first 12 hex digits of the input content's sha256> instead of after the input "
        "file or folder (often a patient name or ID), and write no input or model path into any output",
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from medseg.errors import ConfigError
    from medseg.inference.postprocess import parse_postprocess
    from medseg.inference.segmenter import Segmenter, collect_inputs, plan_outputs
    from medseg.training.model_folder import newest_run

    if args.postprocess is not None:
        parse_postprocess(args.postprocess)  # fail before loading anything
    cases = collect_inputs(args.inputs, anonymize=args.anonymize)
    out = args.output
    mask_path = None
    if out.name.lower().endswith((".nii.gz", ".nii")):
        if len(cases) != 1:
            raise ConfigError(f"-o {out} names one file but there are {len(cases)} inputs; pass a folder.")
        mask_path = out
        out = out.parent
    # refuse existing outputs before the model is loaded
    plan_outputs(
        cases, out, probabilities=args.probs, statistics=args.stats, preview=args.preview,
        overwrite=args.overwrite, mask_path=mask_path,
    )
    model_dir = args.model if args.model is not None else newest_run(Path("runs"))
    segmenter = Segmenter.load(
        model_dir, device=args.device, folds=args.folds, tta=args.tta, overlap=args.overlap,
        batch_size=args.batch_size, postprocess=args.postprocess,
    )
    log = logging.getLogger("medseg.infer")
    log.info(
        "model %s (%d fold(s)) on %s, tta %s, overlap %.2f",
        model_dir, len(segmenter.models), segmenter.device, "on" if segmenter.tta else "off", segmenter.overlap,
    )
    results = segmenter.predict_many(
        cases, out, probabilities=args.probs, statistics=args.stats, preview=args.preview,
        overwrite=args.overwrite, series_uid=args.series_uid, mask_path=mask_path, anonymize=args.anonymize,
        resample_tilt=args.resample_tilt,
    )
    for written in results:
        print(written["mask"])
    return 0
