"""2D images end to end on real CT slices saved as PNG: check, train a 2D U-Net, segment PNGs, evaluate.

What it is, plainly: the 30 axial slices of the ONE real abdominal CT in
``../shared/data/ct_organs`` (TotalSegmentator's test scan; its organ masks are
TotalSegmentator predictions, not manual labels), written as 8-bit greyscale
PNGs the way a 2D dataset export would be:

* image: HU windowed to the abdominal window [-160, 240] HU and mapped linearly to
  0..255 (``round(255 * (clip(HU, -160, 240) + 160) / 400)``), one PNG per slice,
  122 x 101 pixels (width x height), rows = the scan's anterior-posterior axis;
* label: a greyscale PNG of integer classes, liver 1, spleen 2, kidneys 3 (left and
  right together), everything else 0.

They are stored in nnU-Net's 2D layout (``imagesTr/slice_ZZ_0000.png``,
``labelsTr/slice_ZZ.png``, ``dataset.json`` with ``"file_ending": ".png"``).
Slices 0-21 train, slices 24-29 are held out (23 is left out as a gap), so the
test slices are other positions in the same patient: neighbouring slices look
alike, and this shows the 2D pipeline on real anatomy; it is no benchmark.

Run from the repository root::

    .venv/bin/python examples/ct_slices_2d/run.py --quick     # < 1 min of training on a CPU
    .venv/bin/python examples/ct_slices_2d/run.py             # a longer schedule

Everything goes into ``--output`` (dataset, run folder, PNG masks, report).
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
from PIL import Image

import medseg

REPO = Path(__file__).resolve().parents[2]
SHARED_CT = REPO.parent / "shared" / "data" / "ct_organs"
MARKER = ".medseg_example"
WINDOW_HU = (-160.0, 240.0)
CLASSES = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
ORGANS = {5: 1, 1: 2, 2: 3, 3: 3}  # TotalSegmentator value -> class: liver, spleen, kidney right/left
TRAIN_SLICES = range(0, 22)
TEST_SLICES = range(24, 30)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test schedule (under a minute of training)")
    parser.add_argument("--output", type=Path, default=Path("examples_output/ct_slices_2d"), help="output folder")
    parser.add_argument("--ct", type=Path, default=SHARED_CT, help="folder with ct.nii.gz and organs.nii.gz")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
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


def write_slices(ct_dir: Path, out: Path) -> tuple[Path, Path, Path]:
    """The CT's axial slices as PNGs: nnU-Net 2D training set, test images and their reference labels."""
    if not (ct_dir / "ct.nii.gz").is_file():
        sys.exit(f"the real CT is not at {ct_dir} (it ships with the project's CI); pass --ct FOLDER.")
    hu = np.asarray(nib.load(ct_dir / "ct.nii.gz").dataobj, dtype=np.float32)  # (x, y, z), RAS
    organs = np.asarray(nib.load(ct_dir / "organs.nii.gz").dataobj)
    classes = np.zeros(organs.shape, np.uint8)
    for value, cls in ORGANS.items():
        classes[organs == value] = cls
    low, high = WINDOW_HU
    grey = np.round(255 * (np.clip(hu, low, high) - low) / (high - low)).astype(np.uint8)
    dataset, test, refs = out / "Dataset_CTslices", out / "test_images", out / "test_labels"
    for folder in (dataset / "imagesTr", dataset / "labelsTr", test, refs):
        folder.mkdir(parents=True)
    for z in (*TRAIN_SLICES, *TEST_SLICES):
        # PNG rows are the array's second axis (y), columns its first (x): the pixel array is the slice transposed
        image, label = Image.fromarray(grey[:, :, z].T), Image.fromarray(classes[:, :, z].T)
        if z in TRAIN_SLICES:
            image.save(dataset / "imagesTr" / f"slice_{z:02d}_0000.png")
            label.save(dataset / "labelsTr" / f"slice_{z:02d}.png")
        else:
            image.save(test / f"slice_{z:02d}.png")  # one file per case: the mask is slice_ZZ_mask.png
            label.save(refs / f"slice_{z:02d}.png")
    (dataset / "dataset.json").write_text(json.dumps({
        "name": "CT slices (one patient, TotalSegmentator test scan)",
        "channel_names": {"0": "CT window [-160, 240] HU as 0..255"},
        "labels": CLASSES,
        "numTraining": len(TRAIN_SLICES),
        "file_ending": ".png",
    }, indent=1))
    return dataset, test, refs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = prepare_output(args.output)
    dataset, test, refs = write_slices(args.ct, out)
    overrides = [f"train.device={args.device}", "data.num_folds=2", "infer.postprocess=largest"]
    if args.quick:
        overrides += ["train.max_epochs=6", "train.iterations_per_epoch=10", "train.val_every=3",
                      "train.num_threads=1", "data.num_workers=0"]
    overrides += args.set
    clock = {}

    start = time.perf_counter()
    run = medseg.train(dataset, "cpu_quick", output_dir=out / "run", fold="all", overrides=overrides)
    clock["train"] = time.perf_counter() - start
    if run.model_dir is None:
        sys.exit(f"training stopped before a model was saved; see {run.run_dir}")

    start = time.perf_counter()
    segmenter = medseg.Segmenter.load(run.model_dir, device=args.device)
    scans = sorted(test.glob("*.png"))
    segmenter.predict_many(scans, out / "predictions")
    clock["infer"] = time.perf_counter() - start
    for scan in scans:  # the masks are PNGs of the input's size
        case = scan.name.removesuffix(".png")
        with Image.open(out / "predictions" / f"{case}_mask.png") as mask, Image.open(scan) as image:
            assert mask.size == image.size, (mask.size, image.size)

    report = medseg.evaluate(out / "predictions", refs, labels=dataset / "dataset.json",
                             output_dir=out / "report", num_workers=0)
    print("\n" + report.format_table())
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()))
    print(f"model: {run.model_dir}\nmasks: {out / 'predictions'}\nreport: {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
