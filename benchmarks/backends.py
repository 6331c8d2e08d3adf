"""Benchmark (not a test): CPU inference backends (``--backend``) on a trained model and real scans.

Run::

    .venv/bin/python benchmarks/backends.py                       # trained_ct_model(), all backends
    .venv/bin/python benchmarks/backends.py --model runs/x/fold_all/model --backends torch,openvino
    .venv/bin/python benchmarks/backends.py --rounds 1

For each backend (``medseg.inference.backends``) the same TRAINED model folder
(default: :func:`common.trained_ct_model`, a U-Net trained on the real CT of
patient A) is loaded with ``Segmenter.load(model, device="cpu", backend=NAME)``
(the set-up time printed includes loading, the ONNX export or compilation, and
the check against eager logits) and segments each real scan with
``Segmenter.predict`` (read, preprocess, sliding window, restore; no file
written). Backends alternate for ``--rounds`` rounds; the fastest round counts.

Printed per backend and scan: network seconds (forward passes only), end-to-end
seconds, the speed-up of both over torch eager, the largest |logit difference|
from torch eager on the plan grid (``Segmenter.predict_scores``, the whole scan;
also divided by the largest |logit|, the scale of the set-up check's tolerance),
and the Dice between the backend's mask and eager's mask per label present in
either (mean and minimum), with the count of voxels whose label differs.

Scans: the real DICOM series ``../shared/data/ct_dicom_series`` (patient B),
``../shared/data/ct_contrast_C/ct.nii.gz`` (patient C) and the training scan
``../shared/data/ct_organs/ct.nii.gz`` (patient A: the one scan on which the
model segments organs, so where the Dice agreement is about real masks).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CASES = {
    "dicom_B": SHARED_DATA / "ct_dicom_series",
    "contrast_C": SHARED_DATA / "ct_contrast_C" / "ct.nii.gz",
    "organs_A": SHARED_DATA / "ct_organs" / "ct.nii.gz",
}
ALL_BACKENDS = ("torch", "channels-last", "compile", "onnxruntime", "openvino")


def mask_agreement(mask: np.ndarray, reference: np.ndarray) -> tuple[float, float, int]:
    """(mean Dice, min Dice) over labels > 0 present in either mask, and the number of differing voxels."""
    labels = sorted(set(np.unique(mask).tolist()) | set(np.unique(reference).tolist()) - {0})
    dices = []
    for v in labels:
        a, b = mask == v, reference == v
        dices.append(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))
    if not dices:
        return 1.0, 1.0, int(np.count_nonzero(mask != reference))
    return float(np.mean(dices)), float(np.min(dices)), int(np.count_nonzero(mask != reference))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a trained model folder (default: common.trained_ct_model())")
    parser.add_argument("--work", type=Path, help="cache folder of common.trained_ct_model()")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS), help="comma-separated backends")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per backend (fastest counts)")
    args = parser.parse_args()

    import torch

    from medseg.inference.backends import backend_unavailable
    from medseg.inference.segmenter import Segmenter
    from medseg.model_folder import read_model_json

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.model is not None:
        model = args.model
    else:
        from common import trained_ct_model

        model = trained_ct_model(args.work) if args.work is not None else trained_ct_model()
    meta = read_model_json(model)
    backends = [b for b in args.backends.split(",") if b]
    if backends[0] != "torch":
        backends = ["torch", *[b for b in backends if b != "torch"]]  # the reference comes first
    cases = {name: CASES[name] for name in args.cases.split(",")}
    for name in list(backends):
        reason = backend_unavailable(name)
        if reason is not None:
            print(f"skipping {name}: {reason}")
            backends.remove(name)

    print(f"model: {model} ({meta['model']['name']} {meta['model']['options']}, patch {meta['plan']['patch_size']}, "
          f"trained {meta['training'].get('epoch')} epochs, val Dice {meta['training'].get('val_dice')})")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average before {os.getloadavg()[0]:.1f}")

    segmenters: dict[str, Segmenter] = {}
    setup_s: dict[str, float] = {}
    for name in backends:
        t0 = time.perf_counter()
        segmenters[name] = Segmenter.load(model, device="cpu", backend=name, tta="off")
        setup_s[name] = time.perf_counter() - t0
        print(f"set up {name}: {setup_s[name]:.1f} s (backend {segmenters[name].backend})", flush=True)

    # plan-grid logits of every backend on every scan (untimed), compared with eager's
    logit_diff: dict[tuple[str, str], float] = {}
    logit_max: dict[str, float] = {}
    for case, path in cases.items():
        prepared = segmenters["torch"].prepare(path)
        image = prepared.case.image
        reference, _ = segmenters["torch"].predict_scores(image)
        logit_max[case] = float(reference.float().abs().max())
        for name in backends:
            scores, _ = segmenters[name].predict_scores(image)
            logit_diff[name, case] = float((scores.float() - reference.float()).abs().max())
        del prepared, image, reference
        gc.collect()

    best: dict[tuple[str, str], tuple[float, float]] = {}
    masks: dict[tuple[str, str], np.ndarray] = {}
    for r in range(args.rounds):
        order = backends if r % 2 == 0 else backends[::-1]
        for name in order:
            for case, path in cases.items():
                t0 = time.perf_counter()
                pred = segmenters[name].predict(path)
                wall = time.perf_counter() - t0
                net = pred.timings.get("network_s", float("nan"))
                old = best.get((name, case))
                if old is None or wall < old[1]:
                    best[name, case] = (net, wall)
                masks[name, case] = pred.mask
                print(f"round {r + 1}: {name:13s} {case:10s} network {net:6.2f} s, end to end {wall:6.2f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)

    print()
    print(f"load average after: {os.getloadavg()[0]:.1f}; fastest of {args.rounds} round(s)")
    header = ("| backend | scan | set-up s | network s | x eager | end-to-end s | x eager | max abs logit diff "
              "| / max abs logit | Dice vs eager (mean / min) | voxels differing (of all) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in backends:
        for case in cases:
            net, wall = best[name, case]
            ref_net, ref_wall = best["torch", case]
            mean_d, min_d, ndiff = mask_agreement(masks[name, case], masks["torch", case])
            print(f"| {name} | {case} | {setup_s[name]:.1f} | {net:.2f} | {ref_net / net:.2f} | {wall:.2f} | "
                  f"{ref_wall / wall:.2f} | {logit_diff[name, case]:.1e} | {logit_diff[name, case] / logit_max[case]:.1e} "
                  f"| {mean_d:.4f} / {min_d:.4f} | {ndiff} ({masks[name, case].size}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
