"""Segment scans with a trained model; masks overlay the input scans exactly.

Each input is a NIfTI/MetaImage/NRRD file, a DICOM series folder, or a folder
of scans (each file, and each DICOM sub-folder, is a case). Every case gets
OUT/<case>_mask.nii.gz on the scan's own grid (same shape, affine and NIfTI
codes) plus <case>_provenance.json (medseg version, model and input sha256,
settings). A DICOM folder's case name is the folder name. With --anonymize a
case is named case_<12 hex digits of its content's sha256> and no output holds a path.
nnU-Net channel files CASE_0000.nii.gz ... of a multi-channel model are one case,
CASE (its mask: CASE_mask.nii.gz); a DICOM folder read with --series-uid is named
FOLDER_<8 hex digits of the series uid's sha256>.

Cohorts: a case that fails (unreadable, wrong dimensionality, refused geometry) is
reported and the run goes on; OUT/infer_manifest.csv/.json lists every case with its
status, time and QC flags (border, volume, low_confidence, intensity). Exit status:
0 all cases done, 1 some cases failed (listed at the end), 2 nothing run (bad input
or options; a single scan that fails). --continue resumes an interrupted run;
--num-parts N --part-id K splits a cohort between N processes (docs/inference.md).

Test-time augmentation (mirroring) averages 8 passes per window in 3D (4 in 2D),
8x the network time; its accuracy gain has not been measured by medseg. It is on by
default on GPUs and off on the CPU; --tta turns it on there.

Examples:
  medseg infer scan.nii.gz                       # newest run under ./runs, mask in .
  medseg infer scans/ -m runs/liver -o masks/ --stats --preview
  medseg infer dicom_dir/ -m runs/liver/fold_0/model -o liver_mask.nii.gz
  medseg infer imagesTs/ -m runs/brats -o masks/ --continue --num-parts 4 --part-id 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.commands import emit
from medseg.commands._options import add_folds_argument
from medseg.inference.backends import BACKENDS

HELP = "segment scans (NIfTI files, DICOM series folders or folders of scans) with a trained model"


def _overlap(text: str) -> float:
    from medseg.settings import check_overlap

    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"overlap must be a number in [0, 1), got {text!r}") from err
    try:
        return check_overlap(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _part_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


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
        help="output folder (created if missing; default: the current folder), or a .nii.gz file (.png for a 2D image) for one input",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--overlap", type=_overlap, help="sliding-window overlap in [0, 1) (default: the model's, 0.5)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument(
        "--tta", dest="tta", action="store_const", const="on",
        help="mirroring test-time augmentation: 8x slower in 3D (8 forward passes per window; 4 in 2D) "
        "(default: on for GPUs, off on the CPU)",
    )
    tta.add_argument("--no-tta", dest="tta", action="store_const", const="off", help="no test-time augmentation")
    add_folds_argument(parser, "folds of a run folder to ensemble (default: all)")
    parser.add_argument("--probs", action="store_true", help="also write <case>_probs.nii.gz (uint8, 255 = probability 1)")
    parser.add_argument("--stats", action="store_true", help="also write per-label voxels, mL and boxes (<case>_stats.json/.csv)")
    parser.add_argument("--preview", action="store_true", help="also write <case>_preview.png (mask over 3 orthogonal slices)")
    parser.add_argument(
        "--format", default="nifti", metavar="LIST",
        help="output formats, comma-separated: nifti (always written), dicom-seg (<case>_seg.dcm, a DICOM "
        "Segmentation) and rtstruct (<case>_rtstruct.dcm, an RT Structure Set); the DICOM formats need DICOM "
        "series inputs and are read back and checked against the mask before they are kept",
    )
    parser.add_argument(
        "--seg-type", choices=("binary", "labelmap"), default=None,
        help="DICOM-SEG encoding: binary (default; every SEG reader) or labelmap (one frame per slice, "
        "DICOM 2024; recent readers only)",
    )
    parser.add_argument(
        "--postprocess", metavar="MODE",
        help="largest (largest component per class), min-size=N (drop components < N voxels) or none",
    )
    parser.add_argument("--batch-size", type=_positive, help="windows per forward pass (default: the model's)")
    parser.add_argument(
        "--backend", default="auto", choices=BACKENDS,
        help="how the network runs on the CPU: torch (PyTorch eager), channels-last, compile (torch.compile), "
        "onnxruntime or openvino (pip install 'medseg[cpu-fast]'); each is checked against PyTorch's logits "
        "when set up. openvino is the fastest on CPUs (1.5x the network, masks within 0.999 Dice of torch's, "
        "docs/performance.md). auto (default): torch, the only one that reproduces PyTorch within float32 "
        "tolerance without a set-up cost larger than its gain",
    )
    parser.add_argument("--series-uid", help="the series to segment when a DICOM folder holds several")
    parser.add_argument(
        "--resample-tilt", action="store_true",
        help="segment a gantry-tilted DICOM series (refused by default) after resampling it onto a regular grid; "
        "the mask is written on that corrected grid (docs/geometry.md)",
    )
    redo = parser.add_mutually_exclusive_group()
    redo.add_argument("--overwrite", action="store_true", help="replace existing outputs (never the inputs)")
    redo.add_argument(
        "--continue", dest="resume", action="store_true",
        help="resume an interrupted run: skip cases whose outputs are complete (mask loads and lies on the "
        "input's grid, every listed output exists), segment the others again",
    )
    parser.add_argument(
        "--num-parts", type=_positive, metavar="N",
        help="split the cohort into N parts (case i of the cases sorted by name goes to part i mod N) "
        "for N processes or cluster jobs; use with --part-id",
    )
    parser.add_argument(
        "--part-id", type=_part_id, metavar="K", help="the part (0..N-1) this process segments; use with --num-parts"
    )
    parser.add_argument(
        "--anonymize", action="store_true",
        help="name outputs case_<first 12 hex digits of the input content's sha256> instead of after the input "
        "file or folder (often a patient name or ID), and write no input or model path into any output",
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from medseg.api import infer
    from medseg.inference.outputs import OutputSpec

    outputs = OutputSpec.to(
        args.output, probabilities=args.probs, statistics=args.stats, preview=args.preview, formats=args.format,
        dicom_seg_type=args.seg_type, overwrite=args.overwrite, anonymize=args.anonymize,
    )
    result = infer(
        args.inputs, outputs, model_dir=args.model, folds=args.folds, series_uid=args.series_uid,
        resample_tilt=args.resample_tilt, resume=args.resume, num_parts=args.num_parts, part_id=args.part_id,
        device=args.device, tta=args.tta, overlap=args.overlap, batch_size=args.batch_size,
        postprocess=args.postprocess, backend=args.backend,
    )
    for row in result.written:
        emit(result.paths[row["case"]]["mask"])
    log = logging.getLogger("medseg.infer")
    if result.skipped:
        log.info("%d case(s) already complete, skipped (--continue)", len(result.skipped))
    if result.manifest is not None:
        log.info("manifest: %s", result.manifest)
    if result.failed:
        emit(f"medseg infer: {len(result.failed)} of {len(result.rows)} case(s) failed:", file=sys.stderr)
        for row in result.failed:
            emit(f"  {row['case']}: {row['error']}", file=sys.stderr)
        return 1
    return 0
