"""Benchmark (not a test): accuracy on held-out anatomy within a training time budget, and under a contrast shift.

Run (about 1 hour on a 2-core CPU: two arms of 25 minutes each, then scoring)::

    .venv/bin/python benchmarks/accuracy.py                       # --budget 25m, both arms
    .venv/bin/python benchmarks/accuracy.py --budget 5m --arms medseg
    .venv/bin/python benchmarks/accuracy.py --score-only          # re-score the trained runs

Data: the real non-contrast abdominal CT of patient A in ``../shared/data/ct_organs``
(122 x 101 x 30 voxels at 3 mm; labels are TotalSegmentator's) with six structures kept:
spleen (1), kidneys (2 + 3), liver (5), stomach (6), aorta (52), pancreas (7); every other
label is background. The slab is cut into thirds along the body axis: the lower and upper
thirds (10 slices each) are the two training cases, the middle third is the held-out test
case (other slices of the same patient: a proxy for a new patient, not a substitute).

Contrast shift: the held-out third again, with each labelled structure raised by the
enhancement of a portal-venous and of a late-arterial phase (HU added to the non-contrast
values; approximate literature values, e.g. Bae, Radiology 2010;256:32-61, and the aorta of
patient C in ``../shared/data/ct_contrast_C``, median 354 HU in arterial phase against A's
43 HU)::

                 portal-venous   arterial
    liver            +60           +20
    spleen           +70           +60
    kidneys         +120          +110
    stomach          +20           +15      (wall only enhances; the label includes contents)
    aorta           +130          +300
    pancreas         +60           +70

These exact offsets are used only here; medseg's augmentation draws per-structure offsets
from a general range (``augment.label_intensity_range``, docs/plan.md), not these numbers.

Arms, each trained with ``medseg train --fold all --time-budget BUDGET`` in its own process:

* **medseg**: the default recipe (contrast-robust CT window, HU-scale and per-structure
  intensity augmentation, uniform class sampling, the budget's 3D/2.5D choice).
* **nnunet_recipe**: the same budget with nnU-Net's choices: the clip window at the
  training foreground's 0.5/99.5 percentiles, no HU-scale or per-structure augmentation,
  and the 3D configuration nnU-Net plans for this data (no budget-driven choice).
* **nnunet_intensity** (optional, ``--arms``): medseg's budget-driven configuration with
  nnU-Net's intensity handling (percentile clip, no HU-scale or per-structure augmentation):
  isolates what the contrast-robust window and augmentation do under a contrast shift.

Printed: per class Dice and HD95 (mm) on the held-out third, Dice under each contrast
shift, Dice on the training thirds (resubstitution), plus each arm's steps and configuration.
Results are also written to ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ct_organs"

CLASSES = {1: ("spleen", [1]), 2: ("kidneys", [2, 3]), 3: ("liver", [5]), 4: ("stomach", [6]),
           5: ("aorta", [52]), 6: ("pancreas", [7])}
PHASES = {
    "portal-venous": {"liver": 60, "spleen": 70, "kidneys": 120, "stomach": 20, "aorta": 130, "pancreas": 60},
    "arterial": {"liver": 20, "spleen": 60, "kidneys": 110, "stomach": 15, "aorta": 300, "pancreas": 70},
}
ARMS = {
    "medseg": [],
    "nnunet_recipe": [
        "data.ct_clip=foreground_percentiles",
        "augment.ct_intensity_prob=0",
        "augment.label_intensity_prob=0",
        "data.spatial_dims=3",
    ],
    "nnunet_intensity": [  # medseg's configuration choice, nnU-Net's intensity handling: isolates section 3
        "data.ct_clip=foreground_percentiles",
        "augment.ct_intensity_prob=0",
        "augment.label_intensity_prob=0",
    ],
}
THIRDS = {"lower": (0, 10), "middle": (10, 20), "upper": (20, 30)}


def make_dataset(work: Path) -> tuple[Path, dict[str, Path]]:
    """Training folder (lower + upper thirds) and the test images (middle third, as is and contrast-shifted)."""
    import nibabel as nib

    ct = nib.load(DATA / "ct.nii.gz")
    organs = nib.load(DATA / "organs.nii.gz")
    image = np.asarray(ct.dataobj).astype(np.int16)
    raw = np.asarray(organs.dataobj)
    label = np.zeros(raw.shape, np.uint8)
    for k, (_, values) in CLASSES.items():
        label[np.isin(raw, values)] = k
    dataset = work / "PatientA_thirds"
    tests = work / "test"
    for d in (dataset / "imagesTr", dataset / "labelsTr", tests):
        d.mkdir(parents=True, exist_ok=True)

    def slab(array: np.ndarray, z0: int, z1: int, like) -> nib.Nifti1Image:
        affine = like.affine.copy()
        affine[:3, 3] = like.affine[:3, :3] @ np.array([0, 0, z0]) + like.affine[:3, 3]
        out = nib.Nifti1Image(np.ascontiguousarray(array[..., z0:z1]), affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        return out

    for name in ("lower", "upper"):
        z0, z1 = THIRDS[name]
        nib.save(slab(image, z0, z1, ct), dataset / "imagesTr" / f"A_{name}_0000.nii.gz")
        nib.save(slab(label, z0, z1, ct), dataset / "labelsTr" / f"A_{name}.nii.gz")
    (dataset / "dataset.json").write_text(json.dumps({
        "name": "PatientA_thirds",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: k for k, (name, _) in CLASSES.items()}},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }, indent=2))
    z0, z1 = THIRDS["middle"]
    paths = {"none": tests / "A_middle.nii.gz"}
    nib.save(slab(image, z0, z1, ct), paths["none"])
    nib.save(slab(label, z0, z1, ct), tests / "A_middle_label.nii.gz")
    for phase, offsets in PHASES.items():
        shifted = image[..., z0:z1].astype(np.int32)
        for k, (name, _) in CLASSES.items():
            shifted[label[..., z0:z1] == k] += offsets[name]
        full = image.copy()
        full[..., z0:z1] = np.clip(shifted, -1024, 3071).astype(np.int16)
        paths[phase] = tests / f"A_middle_{phase}.nii.gz"
        nib.save(slab(full, z0, z1, ct), paths[phase])
    return dataset, paths


def train_arm(arm: str, dataset: Path, work: Path, budget: str) -> dict:
    run_dir = work / "runs" / arm
    log = work / f"train_{arm}.log"
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: pass another --work, or --score-only to score it")
    cmd = [str(ROOT / ".venv" / "bin" / "medseg"), "train", str(dataset), "-o", str(run_dir), "--fold", "all",
           "--time-budget", budget, "--device", "cpu"]
    if ARMS[arm]:
        cmd += ["--set", *ARMS[arm]]
    t0 = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        sys.exit(f"{arm}: medseg train exited {code}; see {log}")
    return {"train_wall_s": time.perf_counter() - t0}


def score_arm(arm: str, dataset: Path, work: Path, tests: dict[str, Path]) -> dict:
    import nibabel as nib

    from medseg.inference.segmenter import Segmenter
    from medseg.metrics import compute_scores
    from medseg.training.checkpoint import load_checkpoint

    run_dir = work / "runs" / arm
    model_dir = run_dir / "fold_all" / "model"
    seg = Segmenter.load(model_dir, device="cpu")
    plan = json.loads((run_dir / "plan.json").read_text())
    labels = {k: name for k, (name, _) in CLASSES.items()}
    spacing = (3.0, 3.0, 3.0)
    gt = np.asarray(nib.load(tests["none"].parent / "A_middle_label.nii.gz").dataobj)
    result: dict = {"configuration": plan.get("configuration") or f"{plan['spatial_dims']}D (pinned)",
                    "spatial_dims": plan["spatial_dims"], "slice_context": plan["slice_context"],
                    "clip": plan["normalization"][0].get("clip")}
    for shift, path in tests.items():
        pred = seg.predict(path).mask
        result[shift] = compute_scores(pred, gt, spacing=spacing, labels=labels, metrics=["dice", "hd95"],
                                       empty="nan")
    resub = {}
    for name in ("lower", "upper"):
        pred = seg.predict(dataset / "imagesTr" / f"A_{name}_0000.nii.gz").mask
        ref = np.asarray(nib.load(dataset / "labelsTr" / f"A_{name}.nii.gz").dataobj)
        resub[name] = compute_scores(pred, ref, spacing=spacing, labels=labels, metrics=["dice"], empty="nan")
    result["resubstitution"] = {
        c: float(np.nanmean([resub[t][c]["dice"] for t in resub])) for c in labels.values()
    }
    state = load_checkpoint(run_dir / "fold_all" / "checkpoint_last.pt", map_location="cpu")["trainer"]
    result["steps"] = state["epoch"] * max(1, state.get("budget_chunk_steps") or 0) + state["iteration"]
    result["elapsed_s"] = state["elapsed_s"]
    return result


def print_table(results: dict, budget: str) -> None:
    arms = list(results)
    print(f"\nAccuracy after training for --time-budget {budget} (held-out middle third of patient A)")
    for arm in arms:
        r = results[arm]
        print(f"  {arm}: {r['configuration']}; {r['steps']} steps in {r['elapsed_s'] / 60:.1f} min; "
              f"CT clip {r['clip']}")
    head = f"{'class':10s}" + "".join(
        f" | {arm[:13]:>13s} Dice  HD95  PV   art  resub" for arm in arms
    )
    print(head)
    print("-" * len(head))
    for name in [n for n, _ in CLASSES.values()]:
        row = f"{name:10s}"
        for arm in arms:
            r = results[arm]
            row += (f" | {r['none'][name]['dice']:19.3f} {r['none'][name]['hd95']:5.1f} "
                    f"{r['portal-venous'][name]['dice']:.3f} {r['arterial'][name]['dice']:.3f} "
                    f"{r['resubstitution'][name]:.3f}")
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="25m", help="training budget per arm (default 25m)")
    parser.add_argument("--arms", default="medseg,nnunet_recipe", help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--work", default=str(ROOT / "benchmarks_output" / "accuracy"), help="work folder")
    parser.add_argument("--score-only", action="store_true", help="score runs already trained in --work")
    args = parser.parse_args()
    work = Path(args.work)
    arms = [a for a in args.arms.split(",") if a]
    dataset, tests = make_dataset(work)
    results = {}
    for arm in arms:
        info = {} if args.score_only else train_arm(arm, dataset, work, args.budget)
        results[arm] = {**score_arm(arm, dataset, work, tests), **info}
    (work / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print_table(results, args.budget)


if __name__ == "__main__":
    main()
