"""Grey/white matter segmentation on a real T1 MRI: train on one hemisphere, test on the other.

The image is the MNI152 T1 template (ICBM 2009a symmetric) that the nilearn
package ships inside its installation (``nilearn/datasets/data``): real MRI,
offline, nothing is downloaded. Labels come from the template's own tissue
probability maps (GM, WM):

* a voxel is **tissue** when ``P(GM) + P(WM) >= 0.5`` (else background: CSF,
  skull, air);
* a tissue voxel is **grey matter (1)** when ``P(GM) >= P(WM)``, else
  **white matter (2)**.

The left hemisphere (world x < 0, RAS) is cut into 4 crops (anterior/posterior x
inferior/superior) that form the training dataset (fold 0: 3 crops train, 1
validates); the right hemisphere (x > 0) is segmented as a whole and scored. The
midline column is in neither. The template is symmetric, so the right hemisphere
is close to a mirror image of the left: this tests that the model learned the
tissue contrast, not the two hemispheres' independence.

Run from the repository root::

    .venv/bin/python examples/brain_tissue/run.py --quick   # 3 mm voxels, a few epochs, ~1 min
    .venv/bin/python examples/brain_tissue/run.py           # 2 mm voxels, config.yaml's 40 x 25 steps
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
from nilearn import datasets

import medseg

HERE = Path(__file__).resolve().parent
MARKER = ".medseg-example"
LABELS = {0: "background", 1: "grey_matter", 2: "white_matter"}
TISSUE_THRESHOLD = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 mm voxels and a few epochs (~1 min)")
    parser.add_argument("--output", type=Path, default=Path("examples_output/brain_tissue"), help="output folder")
    parser.add_argument("--resolution", type=int, help="voxel size in mm of the template (default 2, --quick 3)")
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


def load_template(resolution: int) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The MNI152 T1 (float32, 0 outside the head) and its GM/WM label map, from nilearn's own files."""
    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=resolution).get_fdata()
    label = np.where(gm + wm >= TISSUE_THRESHOLD, np.where(gm >= wm, 1, 2), 0).astype(np.uint8)
    image = t1.get_fdata().astype(np.float32)
    image[image < 1e-3] = 0.0  # the resampled template has denormal specks outside the head
    return nib.Nifti1Image(image, t1.affine), nib.Nifti1Image(label, t1.affine)


def hemispheres(image: nib.Nifti1Image) -> tuple[slice, slice, slice, slice]:
    """Voxel ranges along x of the left (x < 0) and right (x > 0) hemispheres, and y/z of the head."""
    affine = image.affine
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or affine[0, 0] <= 0:
        sys.exit("expected the template on an axis-aligned RAS grid")
    x = affine[0, 0] * np.arange(image.shape[0]) + affine[0, 3]
    head = np.argwhere(np.asarray(image.dataobj) > 0)
    (y0, z0), (y1, z1) = head.min(0)[1:], head.max(0)[1:] + 1
    left = np.flatnonzero(x < -1e-6)
    right = np.flatnonzero(x > 1e-6)
    return slice(left[0], left[-1] + 1), slice(right[0], right[-1] + 1), slice(y0, y1), slice(z0, z1)


def write_dataset(out: Path, resolution: int) -> tuple[Path, Path, Path]:
    """Left-hemisphere crops as an MSD-layout dataset; the right hemisphere as the test case."""
    image, label = load_template(resolution)
    left, right, ys, zs = hemispheres(image)
    root = out / "dataset" / "Task00_MNI152Tissue"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    y_mid, z_mid = (ys.start + ys.stop) // 2, (zs.start + zs.stop) // 2
    crops = {
        "left_posterior_inferior": (slice(ys.start, y_mid), slice(zs.start, z_mid)),
        "left_posterior_superior": (slice(ys.start, y_mid), slice(z_mid, zs.stop)),
        "left_anterior_inferior": (slice(y_mid, ys.stop), slice(zs.start, z_mid)),
        "left_anterior_superior": (slice(y_mid, ys.stop), slice(z_mid, zs.stop)),
    }
    training = []
    for name, (y, z) in crops.items():
        nib.save(image.slicer[left, y, z], root / "imagesTr" / f"{name}.nii.gz")  # slicer keeps the affine exact
        nib.save(label.slicer[left, y, z], root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {
        "name": root.name,
        "description": "MNI152 2009a T1 template shipped with nilearn; GM/WM labels from its probability maps",
        "tensorImageSize": "3D",
        "modality": {"0": "T1w"},
        "labels": {str(v): n for v, n in LABELS.items()},
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    test_images, references = out / "test" / "images", out / "test" / "references"
    test_images.mkdir(parents=True)
    references.mkdir()
    scan = test_images / "right_hemisphere.nii.gz"
    nib.save(image.slicer[right, ys, zs], scan)
    nib.save(label.slicer[right, ys, zs], references / "right_hemisphere.nii.gz")
    return root, scan, references


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = prepare_output(args.output)
    resolution = args.resolution or (3 if args.quick else 2)
    overrides = [f"train.device={args.device}", f"train.seed={args.seed}"]
    if args.quick:
        # one thread is faster than two on a busy 2-core machine
        overrides += ["train.max_epochs=8", "train.iterations_per_epoch=12", "train.val_every=4",
                      "train.num_threads=1", "data.num_workers=0"]
    if args.epochs:
        overrides.append(f"train.max_epochs={args.epochs}")
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    clock = {}

    start = time.perf_counter()
    dataset, scan, references = write_dataset(out, resolution)
    clock["data"] = time.perf_counter() - start

    print(f"training on the left hemisphere ({resolution} mm) with config.yaml {' '.join(overrides)}")
    start = time.perf_counter()
    run = medseg.train(dataset, HERE / "config.yaml", output_dir=out / "run", fold=0, overrides=overrides)
    clock["train"] = time.perf_counter() - start
    if run.model_dir is None:
        sys.exit(f"training stopped before a model was saved; see {run.run_dir}")

    start = time.perf_counter()
    segmenter = medseg.Segmenter.load(run.model_dir, device=args.device)
    segmenter.predict_many([scan], out / "predictions", statistics=True, preview=True)
    clock["infer"] = time.perf_counter() - start

    report = medseg.evaluate(
        out / "predictions", references, labels=run.model_dir, metrics="dice,hd95,nsd,avd",
        tolerance_mm=float(resolution), output_dir=out / "report", num_workers=0,
    )
    print(f"\nRight hemisphere (never seen in training), {resolution} mm voxels:")
    print(report.format_table(["dice", "hd95", "nsd", "avd"]))
    val = ", ".join(f"{k} {v:.3f}" for k, v in run.metrics["val_dice"].items())
    print(f"validation crop of the left hemisphere (best epoch): {val}")
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()))
    print(f"model: {run.model_dir}\nmask: {out / 'predictions'}\nreport: {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
