"""medseg from a research script: load a model, segment a DICOM series, volumes, evaluation.

Usage (from the repository root)::

    # your model, your DICOM folder, your reference mask (on the DICOM's grid)
    .venv/bin/python examples/python_api.py --model runs/liver/fold_0/model \\
        --dicom path/to/dicom_folder --reference path/to/reference.nii.gz --output results/

    # no model at hand: trains a tiny model on SYNTHETIC phantoms first (~30 s on a CPU)
    # and segments the real DICOM series in ../shared/data/ct_dicom_series
    .venv/bin/python examples/python_api.py --output results/

A model trained on synthetic phantoms cannot segment real anatomy: with the
fallback, the DICOM part only shows the mechanics (reading, grid, volumes,
mask file) and the evaluation is done on a synthetic phantom with a known
reference instead. Copy the parts you need.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import medseg

REPO = Path(__file__).resolve().parents[1]
DICOM_SERIES = REPO.parent / "shared" / "data" / "ct_dicom_series"


def train_tiny_model(folder: Path) -> Path:
    """A few epochs of a slim 3D U-Net on SYNTHETIC CT phantoms (labels: 1 organ, 2 tumour)."""
    from medseg.data.synthetic import write_synthetic_dataset

    if (folder / "run" / "fold_0" / "model" / "model.json").is_file():  # made by an earlier run
        return folder / "run" / "fold_0" / "model"
    dataset = write_synthetic_dataset(folder / "dataset", layout="msd", kind="ct", num_cases=6, shape=(40, 40, 24))
    run = medseg.train(
        dataset,
        REPO / "configs" / "cpu_quick.yaml",
        output_dir=folder / "run",
        overrides=["train.max_epochs=8", "train.iterations_per_epoch=12", "train.val_every=4", "loss.class_weights=auto",
                   "train.num_threads=1", "data.num_workers=0", "train.device=cpu"],
    )
    return run.model_dir


def evaluate_on_phantom(segmenter: medseg.Segmenter, out: Path, overwrite: bool):
    """Segment a SYNTHETIC phantom whose true mask is known, and score the result."""
    from medseg.data.synthetic import make_phantom

    phantom = make_phantom("ct", shape=(48, 48, 28), seed=4242, orientation="PIR")
    geometry = medseg.Geometry(phantom.label.shape, phantom.affine)
    reference = medseg.write_mask(phantom.label, geometry, out / "phantom_reference.nii.gz", overwrite=overwrite)
    prediction = segmenter.predict((phantom.image, phantom.affine))  # an (array, affine) pair works too
    mask = prediction.save(out / "phantom_mask.nii.gz", overwrite=overwrite)
    return medseg.evaluate(mask, reference, labels=segmenter.labels, metrics="dice,hd95,avd")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model, fold or run folder (default: train a tiny one)")
    parser.add_argument("--dicom", type=Path, default=DICOM_SERIES, help="DICOM series folder")
    parser.add_argument("--reference", type=Path, help="reference mask on the DICOM's grid, to score the result")
    parser.add_argument("--output", type=Path, default=Path("examples_output/python_api"), help="output folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --output")
    args = parser.parse_args(argv)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)

    # 1. the model ------------------------------------------------------------------
    model_dir = args.model
    if model_dir is None:
        print("no --model given: training a tiny model on SYNTHETIC phantoms (useless on real scans) ...")
        model_dir = train_tiny_model(out / "tiny_model")
    segmenter = medseg.Segmenter.load(model_dir, device=args.device)
    print(f"model {model_dir}: labels {segmenter.labels}, device {segmenter.device}")

    # 2. read and segment the DICOM series --------------------------------------------
    scan = medseg.read_volume(args.dicom)  # one series, checked (slice spacing, tilt, gaps)
    g = scan.geometry
    print(f"scan {args.dicom.name}: {g.shape} voxels, spacing {tuple(round(s, 3) for s in g.spacing)} mm, "
          f"{g.orientation} axes")
    prediction = segmenter.predict(scan)  # the mask lies on the scan's own grid (same shape and affine)

    # 3. volumes per label, from Prediction.statistics ---------------------------------
    print(f"\n{'label':<22}{'voxels':>10}{'volume (mL)':>14}")
    for row in prediction.statistics:
        print(f"{row['label']:>2} {row['name']:<19}{row['voxels']:>10}{row['volume_ml']:>14.2f}")

    # 4. save the mask (NIfTI, opens on top of the DICOM in 3D Slicer / ITK-SNAP) -----
    mask_path = prediction.save(out / f"{args.dicom.name}_mask.nii.gz", overwrite=args.overwrite)
    from medseg.inference.stats import write_statistics

    stats_path = write_statistics(prediction.statistics, out / f"{args.dicom.name}_stats.csv", overwrite=args.overwrite)
    print(f"\nmask: {mask_path}\nstatistics: {stats_path}")

    # 5. evaluate -----------------------------------------------------------------------
    if args.reference is not None:
        report = medseg.evaluate(mask_path, args.reference, labels=segmenter.labels, metrics="dice,hd95,avd")
        print(f"\nagainst {args.reference}:")
    elif args.model is None:
        report = evaluate_on_phantom(segmenter, out, args.overwrite)
        print("\nno --reference: scored on a SYNTHETIC phantom with a known reference instead:")
    else:
        print("\nno --reference given: nothing to evaluate against.")
        return 0
    print(report.format_table())
    dice = {name: values["dice"]["mean"] for name, values in report.summary.items() if name != "foreground_mean"}
    print("Dice:", ", ".join(f"{name} {d:.3f}" for name, d in dice.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
