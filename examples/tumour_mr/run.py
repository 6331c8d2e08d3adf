"""Multi-modal MR tumour segmentation (BraTS-style) with region and lesion-wise evaluation.

1. Write SYNTHETIC 4-channel MR phantoms (FLAIR, T1w, T1gd, T2w in one 4D NIfTI
   per case, MSD Task01 layout) with two tumour sites each: label 1 edema,
   2 non-enhancing core, 3 enhancing tumour, nested as in gliomas. Not patient data.
2. Train a 3D U-Net with ``config.yaml`` (configs/tumour_mr.yaml) and a CPU schedule.
3. Segment held-out phantoms (``Segmenter.predict_many``).
4. Evaluate the nested regions WT = {1,2,3}, TC = {2,3}, ET = {3} (Dice, HD95) and
   lesion-wise (connected components: detection sensitivity, false positives per case).

Run from the repository root::

    .venv/bin/python examples/tumour_mr/run.py --quick     # ~1 min on a CPU
    .venv/bin/python examples/tumour_mr/run.py             # more data and epochs, a few minutes
    .venv/bin/python examples/tumour_mr/run.py --data data/Task01_BrainTumour   # a real MSD task (GPU)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import medseg
from medseg.data import scan_dataset
from medseg.data.synthetic import ORIENTATIONS, make_phantom, write_synthetic_dataset
from medseg.io import write_volume

HERE = Path(__file__).resolve().parent
MARKER = ".medseg-example"
REGIONS = {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}  # MSD Task01 label values

# the CPU schedule for the synthetic phantoms (config.yaml is nnU-Net's full 1000 x 250)
CPU_OVERRIDES = [
    "data.memory_budget_gb=0.25",
    "data.batch_size=2",
    "augment.lowres_prob=0.0",
    "augment.blur_prob=0.0",
    "model.options={base_features: 8, max_features: 64}",
    "loss.class_weights=auto",
    "train.max_epochs=40",
    "train.iterations_per_epoch=25",
    "infer.overlap=0.25",
]
QUICK_OVERRIDES = [
    "train.max_epochs=8",
    "train.iterations_per_epoch=12",
    "train.val_every=4",
    "train.num_threads=1",  # faster than two threads on a busy 2-core machine
    "data.num_workers=0",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test size: tiny data, a few epochs (~1 min)")
    parser.add_argument("--output", type=Path, default=Path("examples_output/tumour_mr"), help="output folder")
    parser.add_argument("--data", type=Path, help="a real MSD-layout tumour dataset (4D images); full config.yaml")
    parser.add_argument("--epochs", type=int, help="override train.max_epochs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores; --quick: 1)")
    return parser.parse_args(argv)


def prepare_output(out: Path) -> Path:
    """Create the output folder; replace it only if a previous run of an example made it."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            sys.exit(f"{out} exists and was not made by an example; pass another --output folder.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by a medseg example; a later run may replace this folder\n")
    return out


def synthetic_data(out: Path, *, quick: bool, seed: int) -> tuple[Path, list[Path], Path]:
    """SYNTHETIC 4-channel phantoms (MSD layout) + held-out phantoms with reference masks."""
    shape = (40, 40, 28) if quick else (48, 48, 32)
    dataset = write_synthetic_dataset(
        out / "dataset" / "Task00_SyntheticBrainTumour", layout="msd", kind="mr", channels=4, num_tumours=2,
        num_cases=6 if quick else 12, shape=shape, seed=seed,
    )
    scans, references = out / "test" / "images", out / "test" / "references"
    scans.mkdir(parents=True)
    references.mkdir()
    paths = []
    for i in range(3 if quick else 6):
        # a different axis order each; not oblique: the mask writer refuses some oblique grids (a known medseg bug)
        phantom = make_phantom(
            "mr", channels=4, num_tumours=2, shape=shape, seed=seed * 1000 + 900 + i, orientation=ORIENTATIONS[i % 6]
        )
        geometry = medseg.Geometry(phantom.label.shape, phantom.affine, source="synthetic")
        paths.append(write_volume(phantom.image, geometry, scans / f"test_{i:02d}.nii.gz"))  # 4D: 4 channels
        medseg.write_mask(phantom.label, geometry, references / f"test_{i:02d}.nii.gz")
    return dataset, paths, references


def validation_cases(data: Path, run_dir: Path, out: Path) -> tuple[list[Path], Path]:
    """Fold 0's validation images of a real dataset, and their labels copied to one folder."""
    val_ids = set(json.loads((run_dir / "splits.json").read_text())[0]["val"])
    references = out / "test" / "references"
    references.mkdir(parents=True)
    scans = []
    for case in scan_dataset(data).cases:
        if case.case_id in val_ids:
            if len(case.image_paths) != 1:
                sys.exit(f"case {case.case_id} has one file per channel; this example segments 4D files.")
            scans.append(case.image_paths[0])
            shutil.copy(case.label_path, references / f"{case.case_id}.nii.gz")
    return scans, references


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = prepare_output(args.output)
    overrides = [f"train.device={args.device}", f"train.seed={args.seed}"]
    if args.data is None:
        overrides += CPU_OVERRIDES
    if args.quick:
        overrides += QUICK_OVERRIDES
    if args.epochs:
        overrides.append(f"train.max_epochs={args.epochs}")
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    clock = {}

    start = time.perf_counter()
    if args.data:
        dataset, scans, references = args.data, None, None
    else:
        dataset, scans, references = synthetic_data(out, quick=args.quick, seed=args.seed)
    clock["data"] = time.perf_counter() - start

    print(f"training on {dataset} with config.yaml {' '.join(overrides)}")
    start = time.perf_counter()
    run = medseg.train(dataset, HERE / "config.yaml", output_dir=out / "run", fold=0, overrides=overrides)
    clock["train"] = time.perf_counter() - start
    if run.model_dir is None:
        sys.exit(f"training stopped before a model was saved; see {run.run_dir}")
    if scans is None:
        scans, references = validation_cases(args.data, run.run_dir, out)

    start = time.perf_counter()
    segmenter = medseg.Segmenter.load(run.model_dir, device=args.device)
    segmenter.predict_many(scans, out / "predictions", statistics=True)
    clock["infer"] = time.perf_counter() - start

    start = time.perf_counter()
    report = medseg.evaluate(
        out / "predictions", references, labels=run.model_dir, regions=REGIONS, metrics="dice,hd95",
        lesion=True, output_dir=out / "report", num_workers=0,
    )
    clock["evaluate"] = time.perf_counter() - start

    print("\nPer held-out case: region Dice, and lesion-wise detection (reference lesions found / all, FP = false")
    print("positive components). Lesions are connected components of the region's mask.")
    header = "case".ljust(10) + "".join(f"{r} dice".rjust(9) for r in REGIONS)
    header += "".join(f"{r} found".rjust(10) + f"{r} FP".rjust(7) for r in REGIONS)
    print(header)
    for case in report.cases:
        row = case.name.ljust(10) + "".join(f"{case.scores[r]['dice']:9.3f}" for r in REGIONS)
        for r in REGIONS:
            s = case.scores[r]
            tp, fn = int(s["lesion_tp"]), int(s["lesion_fn"])
            row += f"{tp}/{tp + fn}".rjust(10) + f"{int(s['lesion_fp'])}".rjust(7)
        print(row)
    print("\n" + report.format_table(["dice", "hd95", "detection_sensitivity", "lesion_fp", "lesion_dice"]))
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()))
    print(f"model: {run.model_dir}\nmasks: {out / 'predictions'}\nreport: {out / 'report'} (lesions.csv: every lesion)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
