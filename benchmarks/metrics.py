"""Speed of medseg.metrics against its two references on one large multi-class case.

Scores a 512 x 512 x 200 pair (5 foreground classes, smooth random blobs, and a
perturbed copy as the "prediction") at spacing (0.8, 0.8, 2.5) mm with Dice,
IoU, HD95, ASSD and NSD@1mm:

* medseg's default surfaces (``surface="surfel"``, area-weighted surface
  elements) against DeepMind's ``surface-distance`` (``compute_surface_distances``
  once per class, then ``compute_robust_hausdorff``, the area-weighted ASSD and
  ``compute_surface_dice_at_tolerance``; slow on large surfaces: it sorts the
  surfels in Python);
* medseg's ``surface="voxel"`` and overlap metrics against MONAI configured to
  the same definitions (``include_background=False``, ``ignore_empty=False``,
  ``spacing`` given, ``SurfaceDistanceMetric(symmetric=True)``,
  ``SurfaceDiceMetric(use_subvoxels=False)``).

Prints a markdown table: time per metric group, the ratio, and the largest
absolute difference between medseg's and the reference's values.

Run: ``.venv/bin/python benchmarks/metrics.py [--shape 512 512 200] [--repeat 1] [--reference both]``
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy import ndimage

SPACING = (0.8, 0.8, 2.5)
NUM_CLASSES = 5
TOLERANCE_MM = 1.0


def make_pair(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference: smooth random blobs of 5 classes; prediction: the same field, perturbed and shifted."""
    rng = np.random.default_rng(seed)
    coarse = tuple(max(4, s // 32) for s in shape)  # organ-sized blobs (tens of voxels across)
    factors = [s / c for s, c in zip(shape, coarse)]

    def field(noise: np.ndarray) -> np.ndarray:
        smooth = ndimage.gaussian_filter(noise, sigma=(0, 1, 1, 1))
        return np.stack(
            [ndimage.zoom(ch, factors, order=1)[tuple(slice(0, s) for s in shape)] for ch in smooth]
        )

    base = rng.standard_normal((NUM_CLASSES + 1, *coarse)).astype(np.float32)
    noise = 0.15 * rng.standard_normal(base.shape).astype(np.float32)
    gt = np.argmax(field(base), axis=0).astype(np.uint8)
    pred = np.argmax(field(base + noise), axis=0).astype(np.uint8)
    pred = np.roll(pred, 2, axis=0)
    return pred, gt


def run_medseg(
    pred: np.ndarray, gt: np.ndarray, surface: str
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Time each metric group, and all five in one call, with the given surface definition."""
    from medseg.metrics import compute_scores

    groups = {"dice+iou": "dice,iou", "hd95": "hd95", "assd": "assd", "nsd": "nsd"}
    times, values = {}, {}
    labels = list(range(1, NUM_CLASSES + 1))
    kwargs = {"spacing": SPACING, "labels": labels, "tolerance_mm": TOLERANCE_MM, "surface": surface}
    for group, metrics in groups.items():
        start = time.perf_counter()
        scores = compute_scores(pred, gt, metrics=metrics, **kwargs)
        times[group] = time.perf_counter() - start
        for m in metrics.split(","):
            values[m] = np.array([scores[str(c)][m] for c in labels])
    start = time.perf_counter()
    compute_scores(pred, gt, metrics="dice,iou,hd95,assd,nsd", **kwargs)
    times["all five, one call"] = time.perf_counter() - start
    start = time.perf_counter()
    compute_scores(pred, gt, metrics="hd95,assd,nsd", **kwargs)
    times["hd95+assd+nsd"] = time.perf_counter() - start
    return times, values


def run_surface_distance(pred: np.ndarray, gt: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """DeepMind's surface-distance: distances once per class, then HD95, area-weighted ASSD and NSD."""
    import surface_distance

    values: dict[str, list[float]] = {"hd95": [], "assd": [], "nsd": []}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in range(1, NUM_CLASSES + 1):
            if not ((gt == c).any() and (pred == c).any()):  # undefined there (and np.Inf fails on NumPy 2)
                for name in values:
                    values[name].append(float("nan"))
                continue
            dm = surface_distance.compute_surface_distances(gt == c, pred == c, SPACING)
            area_g, area_p = dm["surfel_areas_gt"], dm["surfel_areas_pred"]
            values["hd95"].append(surface_distance.compute_robust_hausdorff(dm, 95))
            values["assd"].append(
                (np.sum(dm["distances_gt_to_pred"] * area_g) + np.sum(dm["distances_pred_to_gt"] * area_p))
                / (np.sum(area_g) + np.sum(area_p))
            )
            values["nsd"].append(surface_distance.compute_surface_dice_at_tolerance(dm, TOLERANCE_MM))
    return {"hd95+assd+nsd": time.perf_counter() - start}, {k: np.array(v) for k, v in values.items()}


def run_monai(pred: np.ndarray, gt: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    import torch
    from monai.metrics import (
        DiceMetric,
        HausdorffDistanceMetric,
        MeanIoU,
        SurfaceDiceMetric,
        SurfaceDistanceMetric,
    )

    def one_hot(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a.astype(np.int64))
        return torch.nn.functional.one_hot(t, NUM_CLASSES + 1).movedim(-1, 0)[None].to(torch.uint8)

    times, values = {}, {}
    start = time.perf_counter()
    p, g = one_hot(pred), one_hot(gt)
    times["one-hot"] = time.perf_counter() - start
    spacing = list(SPACING)
    metrics = {
        "dice+iou": [
            ("dice", DiceMetric(include_background=False, ignore_empty=False), {}),
            ("iou", MeanIoU(include_background=False, ignore_empty=False), {}),
        ],
        "hd95": [
            ("hd95", HausdorffDistanceMetric(include_background=False, percentile=95), {"spacing": spacing})
        ],
        "assd": [
            ("assd", SurfaceDistanceMetric(include_background=False, symmetric=True), {"spacing": spacing})
        ],
        "nsd": [
            (
                "nsd",
                SurfaceDiceMetric([TOLERANCE_MM] * NUM_CLASSES, include_background=False),
                {"spacing": spacing},
            )
        ],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group, items in metrics.items():
            start = time.perf_counter()
            for name, metric, kwargs in items:
                values[name] = metric(p, g, **kwargs).numpy().ravel().astype(np.float64)
            times[group] = time.perf_counter() - start
    times["all five, one call"] = sum(times[k] for k in metrics) + times["one-hot"]
    return times, values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs="+", default=[512, 512, 200])
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs")
    parser.add_argument(
        "--reference",
        choices=["both", "monai", "surface-distance"],
        default="both",
        help="which reference to run (surface-distance is slow on large surfaces)",
    )
    args = parser.parse_args()
    shape = tuple(args.shape)
    start = time.perf_counter()
    pred, gt = make_pair(shape)
    made = time.perf_counter() - start
    agree = float(np.mean(pred == gt))
    print(
        f"pair {shape}, {NUM_CLASSES} classes, spacing {SPACING} mm, voxel agreement {agree:.3f} (made in {made:.1f} s)"
    )

    rows: list[tuple[str, float, float, float]] = []
    if args.reference in ("both", "surface-distance"):
        best_m: dict[str, float] = {}
        best_r: dict[str, float] = {}
        for _ in range(args.repeat):
            tm, vm = run_medseg(pred, gt, "surfel")
            tr, vr = run_surface_distance(pred, gt)
            best_m = {k: min(v, best_m.get(k, v)) for k, v in tm.items()}
            best_r = {k: min(v, best_r.get(k, v)) for k, v in tr.items()}
        both = ~np.isnan(vr["hd95"])  # classes present in both masks
        diff = max(float(np.max(np.abs(vm[n] - vr[n])[both], initial=0.0)) for n in ("hd95", "assd", "nsd"))
        key = "hd95+assd+nsd"
        rows.append(
            (f"{key} (one call), surfel (default) vs surface-distance", best_m[key], best_r[key], diff)
        )
        key = "all five, one call"
        rows.append((f"{key}, surfel (default)", best_m[key], float("nan"), float("nan")))
    if args.reference in ("both", "monai"):
        best_m = {}
        best_r = {}
        for _ in range(args.repeat):
            tm, vm = run_medseg(pred, gt, "voxel")
            tr, vr = run_monai(pred, gt)
            best_m = {k: min(v, best_m.get(k, v)) for k, v in tm.items()}
            best_r = {k: min(v, best_r.get(k, v)) for k, v in tr.items()}
        groups = {"dice+iou": ["dice", "iou"], "hd95": ["hd95"], "assd": ["assd"], "nsd": ["nsd"]}
        for group, names in groups.items():
            # classes empty in one mask: medseg inf (its policy), MONAI inf or NaN; compare the rest
            diff = max(
                float(np.max(np.abs(vm[n] - vr[n])[np.isfinite(vm[n]) & np.isfinite(vr[n])], initial=0.0))
                for n in names
            )
            label = group if group == "dice+iou" else f"{group}, surface='voxel'"
            rows.append((f"{label} vs MONAI", best_m[group], best_r[group], diff))
        key = "all five, one call"
        rows.append(
            (
                f"{key}, surface='voxel' vs MONAI (+ one-hot {best_r['one-hot']:.2f} s)",
                best_m[key],
                best_r[key],
                float("nan"),
            )
        )

    print()
    print("| metrics | medseg (s) | reference (s) | reference / medseg | max abs difference |")
    print("|---|---:|---:|---:|---:|")
    for label, mine, theirs, diff in rows:
        ref = f"{theirs:.2f}" if theirs == theirs else ""
        ratio = f"{theirs / mine:.1f}x" if theirs == theirs else ""
        print(f"| {label} | {mine:.2f} | {ref} | {ratio} | {f'{diff:.1e}' if diff == diff else ''} |")


if __name__ == "__main__":
    main()
