"""Organ segmentation in CT, Medical Segmentation Decathlon layout: train, segment, evaluate.

Data (pick one):

* default: SYNTHETIC CT phantoms (one liver-like organ with a tumour, random
  orientations and anisotropic spacing) written in the MSD layout, plus held-out
  phantoms with their reference masks. Not patient data.
* ``--real-ct``: the real abdominal CT in ``../shared/data/ct_organs`` cut into
  three 10-slice slabs; labels reduced to liver (1), spleen (2), right (3) and left (4) kidney.
  The upper and lower slabs train, the middle slab is the held-out test case.
  One patient only: this shows the pipeline on real anatomy, it is no benchmark.
* ``--data DIR``: a real MSD task folder (e.g. ``Task09_Spleen``); trains fold 0
  with ``config.yaml`` (nnU-Net's full schedule: use a GPU) and evaluates on the
  fold's validation cases.

Run from the repository root::

    .venv/bin/python examples/organ_ct/run.py --quick              # ~1 min on a CPU
    .venv/bin/python examples/organ_ct/run.py --real-ct
    .venv/bin/python examples/organ_ct/run.py --data data/Task09_Spleen --output runs/spleen_example

Everything goes into ``--output`` (dataset, run folder, masks, report).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import medseg
from medseg.data import scan_dataset
from medseg.data.synthetic import ORIENTATIONS, make_phantom, write_synthetic_dataset
from medseg.io import write_volume

HERE = Path(__file__).resolve().parent
SHARED_CT = HERE.parents[2] / "shared" / "data" / "ct_organs"
MARKER = ".medseg-example"

# TotalSegmentator label values in ct_organs/organs.nii.gz -> our labels
# (one label per kidney: each organ is one connected component, as `infer.postprocess: largest` assumes)
REAL_CT_LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
REAL_CT_MAP = {5: 1, 1: 2, 2: 3, 3: 4}
REAL_CT_SLABS = {"slab_upper": (20, 30), "slab_middle": (10, 20), "slab_lower": (0, 10)}
REAL_CT_TEST = "slab_middle"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="a real MSD task folder (dataset.json, imagesTr, labelsTr)")
    source.add_argument("--real-ct", action="store_true", help=f"use the real CT in {SHARED_CT}")
    parser.add_argument("--quick", action="store_true", help="smoke-test size: tiny data, a few epochs (~1 min)")
    parser.add_argument("--output", type=Path, default=Path("examples_output/organ_ct"), help="output folder")
    parser.add_argument("--config", type=Path, help="config file (default: config.yaml with --data, else config_quick.yaml)")
    parser.add_argument("--epochs", type=int, help="override train.max_epochs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores; --quick: 1)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
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


# --------------------------------------------------------------------------- data


def synthetic_data(out: Path, *, quick: bool, seed: int) -> tuple[Path, list[Path], Path]:
    """SYNTHETIC phantoms in the MSD layout + held-out phantoms with references."""
    shape = (40, 40, 24) if quick else (56, 56, 36)
    dataset = write_synthetic_dataset(
        out / "dataset" / "Task00_SyntheticOrgan", layout="msd", kind="ct", seed=seed,
        num_cases=6 if quick else 12, shape=shape,
    )
    scans, references = out / "test" / "images", out / "test" / "references"
    scans.mkdir(parents=True)
    references.mkdir()
    paths = []
    for i in range(2 if quick else 4):
        # a different axis order each; not oblique: the mask writer refuses some oblique grids (a known medseg bug)
        phantom = make_phantom("ct", shape=shape, seed=seed * 1000 + 900 + i, orientation=ORIENTATIONS[i % 6])
        geometry = medseg.Geometry(phantom.label.shape, phantom.affine, source="synthetic")
        paths.append(write_volume(phantom.image, geometry, scans / f"test_{i:02d}.nii.gz"))
        medseg.write_mask(phantom.label, geometry, references / f"test_{i:02d}.nii.gz")
    return dataset, paths, references


def real_ct_data(out: Path) -> tuple[Path, list[Path], Path]:
    """The real CT cut into slabs along z, as an MSD-layout dataset (train) + one held-out slab (test)."""
    if not SHARED_CT.is_dir():
        sys.exit(f"--real-ct: {SHARED_CT} not found (it ships with the project's CI, not with the package).")
    ct = nib.load(SHARED_CT / "ct.nii.gz")
    organs = np.asarray(nib.load(SHARED_CT / "organs.nii.gz").dataobj)
    label = np.zeros(organs.shape, dtype=np.uint8)
    for source, target in REAL_CT_MAP.items():
        label[organs == source] = target
    label_img = nib.Nifti1Image(label, ct.affine, ct.header)
    label_img.set_data_dtype(np.uint8)

    root = out / "dataset" / "Task00_RealCTSlabs"
    test_images, references = out / "test" / "images", out / "test" / "references"
    for folder in (root / "imagesTr", root / "labelsTr", test_images, references):
        folder.mkdir(parents=True)
    training = []
    for name, (z0, z1) in REAL_CT_SLABS.items():
        image_dir, label_dir = (test_images, references) if name == REAL_CT_TEST else (root / "imagesTr", root / "labelsTr")
        nib.save(ct.slicer[:, :, z0:z1], image_dir / f"{name}.nii.gz")  # slicer keeps the affine exact
        nib.save(label_img.slicer[:, :, z0:z1], label_dir / f"{name}.nii.gz")
        if name != REAL_CT_TEST:
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {
        "name": root.name,
        "description": "slabs of the real CT in shared/data/ct_organs (TotalSegmentator test data, Apache-2.0)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(v): n for v, n in REAL_CT_LABELS.items()},
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root, [test_images / f"{REAL_CT_TEST}.nii.gz"], references


def validation_cases(data: Path, run_dir: Path, out: Path) -> tuple[list[Path], Path]:
    """Fold 0's validation images of a real MSD task, and their labels copied to one folder."""
    val_ids = set(json.loads((run_dir / "splits.json").read_text())[0]["val"])
    references = out / "test" / "references"
    references.mkdir(parents=True)
    scans = []
    for case in scan_dataset(data).cases:
        if case.case_id in val_ids:
            scans.append(case.image_paths[0])
            shutil.copy(case.label_path, references / f"{case.case_id}.nii.gz")
    return scans, references


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = prepare_output(args.output)
    config = args.config or HERE / ("config.yaml" if args.data else "config_quick.yaml")
    overrides = [f"train.device={args.device}", f"train.seed={args.seed}"]
    if args.quick:
        # smoke-test schedule; one thread is faster than two on a busy 2-core machine
        overrides += ["train.max_epochs=8", "train.iterations_per_epoch=12", "train.val_every=4",
                      "train.num_threads=1", "data.num_workers=0"]
    if args.epochs:
        overrides.append(f"train.max_epochs={args.epochs}")
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    overrides += args.set  # last: they win
    clock = {}

    start = time.perf_counter()
    if args.data:
        dataset, scans, references = args.data, None, None
    elif args.real_ct:
        dataset, scans, references = real_ct_data(out)
        overrides.insert(0, "data.num_folds=2")  # two training slabs (before --set, which wins)
    else:
        dataset, scans, references = synthetic_data(out, quick=args.quick, seed=args.seed)
    clock["data"] = time.perf_counter() - start

    print(f"training on {dataset} with {config.name} {' '.join(overrides)}")
    start = time.perf_counter()
    # the real-CT slabs are only two training cases: train on both ("all") and test on the held-out slab
    run = medseg.train(dataset, config, output_dir=out / "run", fold="all" if args.real_ct else 0, overrides=overrides)
    clock["train"] = time.perf_counter() - start
    if run.model_dir is None:
        sys.exit(f"training stopped before a model was saved; see {run.run_dir}")
    if scans is None:
        scans, references = validation_cases(args.data, run.run_dir, out)

    start = time.perf_counter()
    segmenter = medseg.Segmenter.load(run.model_dir, device=args.device)
    segmenter.predict_many(scans, out / "predictions", statistics=True, preview=True)
    clock["infer"] = time.perf_counter() - start

    start = time.perf_counter()
    report = medseg.evaluate(
        out / "predictions", references, labels=run.model_dir, metrics="dice,hd95,nsd",
        tolerance_mm=2.0, output_dir=out / "report", num_workers=0,
    )
    clock["evaluate"] = time.perf_counter() - start

    classes = [name for value, name in sorted(segmenter.labels.items()) if value != 0]
    print("\nDice per held-out case")
    print("case".ljust(16) + "".join(c.rjust(14) for c in classes))
    for case in report.cases:
        print(case.name.ljust(16) + "".join(f"{case.scores[c]['dice']:14.3f}" for c in classes))
    print("\n" + report.format_table(["dice", "hd95", "nsd"]))
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()))
    print(f"model: {run.model_dir}\nmasks: {out / 'predictions'}\nreport: {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
