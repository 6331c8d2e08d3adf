"""Benchmark (not a test): `medseg infer` end to end vs a MONAI tutorial pipeline, same weights.

Run::

    .venv/bin/python benchmarks/infer.py                 # real DICOM series + 512x512x300 CT-like volume
    .venv/bin/python benchmarks/infer.py --large         # plus a medseg-only 512x512x1000 memory run
    .venv/bin/python benchmarks/infer.py --cases dicom   # one case only
    .venv/bin/python benchmarks/infer.py --rounds 1      # one round (default 3, alternating, fastest counts)

Both pipelines run the same network with the same weights, the same window
(``plan.patch_size``), overlap 0.5, Gaussian blending, window batch and CT
normalisation, each in its own subprocess (so peak RSS, read from
``/proc/self/status`` VmHWM, is per pipeline), timed from reading the scan to
the mask file being written (model loading excluded):

* **medseg**: ``Segmenter.load(...).predict_many([scan], out)`` (read, preprocess
  as in training, sliding window with empty-window skipping, restore, write
  with geometry check, provenance).
* **MONAI reference** (spleen-tutorial style): ``LoadImaged -> EnsureChannelFirstd
  -> Orientationd(RAS) -> Spacingd(bilinear) -> ScaleIntensityRanged(clip)``,
  ``sliding_window_inference(mode="gaussian")``, ``Invertd(nearest_interp=False)
  -> AsDiscreted(argmax) -> SaveImaged(uint8)``.

The network is the medseg U-Net (8 base features, 5 stages, 3 classes) plus a
fixed head: logits = threshold(5x5x5 mean of the normalised intensity) +
0.05 x U-Net(x). The U-Net carries the compute of a real model (its FLOPs are
counted); the fixed head makes the output a meaningful, smooth segmentation
(class 1 soft tissue above 20 HU, class 2 bone above 300 HU) so that the two
pipelines' masks can be compared by Dice. It is not a trained model.

Cases: the real DICOM series in ``../shared/data/ct_dicom_series`` and a
SYNTHETIC CT-like phantom (:func:`ct_phantom`: 512 x 512 x 300 at 0.8 x 0.8 x 2 mm
with the body ~70 % of the field of view wide and air around it, as in clinical
CT; an earlier version filled 92 % of the field of view, which is unrealistic).
``--large`` adds a medseg-only 512 x 512 x 1000 run (the phantom mirror-tiled).
The pipelines alternate for ``--rounds`` rounds and each one's fastest counts.

Printed per case: wall time, peak RSS, the medseg/MONAI ratios, network
GFLOP and achieved GFLOP/s, the share of time spent outside the network, and
the per-class Dice between the two masks (compared in world space: MONAI's
mask is re-oriented onto medseg's grid when the axes differ).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

PATCH = (80, 80, 32)
TARGET_SPACING = (3.0, 3.0, 3.0)
BATCH = 2
OVERLAP = 0.5
MODEL_NAME = "bench_unet_head"
BODY_IN_PLANE = 392  # phantom grid before padding with air to 512 x 512 (body ~70 % of the field of view)


# --------------------------------------------------------------------------- the network


def _register() -> None:
    import torch
    from torch import nn

    from medseg.models import create_model, list_models, register_model

    class BenchNet(nn.Module):
        """U-Net compute plus a fixed smoothing/threshold head (see the module docstring)."""

        def __init__(self, *, spatial_dims, in_channels, num_classes, kernel_sizes, strides, base_features=8):
            super().__init__()
            self.unet = create_model(
                "unet", spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                kernel_sizes=kernel_sizes, strides=strides, base_features=base_features,
            )
            self.smooth = nn.AvgPool3d(5, stride=1, padding=2, count_include_pad=False)
            self.head = nn.Conv3d(in_channels, num_classes, 1)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in self.unet.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1 if p.ndim > 1 else p)
                self.head.weight.zero_()
                self.head.bias.zero_()
                gain = 4.0
                self.head.weight[1, 0] = gain  # soft tissue: > 20 HU
                self.head.bias[1] = -0.2 * gain
                self.head.weight[2, 0] = 2 * gain  # bone: > 300 HU (where it beats class 1)
                self.head.bias[2] = -3.2 * gain

        def forward(self, x):
            return self.head(self.smooth(x)) + 0.05 * self.unet(x)

    def plan_options(plan, _spacing):
        return {"kernel_sizes": plan.kernel_sizes, "strides": plan.strides}

    if MODEL_NAME not in list_models():
        register_model(MODEL_NAME, plan_options=plan_options)(BenchNet)


def _plan():
    from medseg.data.plan import ChannelNorm, Plan
    from medseg.topology import unet_topology

    kernels, strides = unet_topology(list(PATCH), list(TARGET_SPACING))
    return Plan(
        spatial_dims=3, data_dims=3, image_channels=1, in_channels=1, channel_names=["CT"],
        label_values=[0, 1, 2], label_names=["background", "soft_tissue", "bone"],
        target_spacing=list(TARGET_SPACING),
        normalization=[ChannelNorm(scheme="ct", clip=(-1000.0, 1000.0), mean=0.0, std=100.0)],
        patch_size=list(PATCH), batch_size=2, kernel_sizes=kernels, strides=strides,
        class_weights=[1.0] * 3, class_sampling_ratios=[1.0] * 3, modality="CT",
    )


def ct_phantom(slices: int):
    """SYNTHETIC CT-like 512 x 512 x ``slices`` scan (0.8 x 0.8 x 2 mm, LPS) with a realistic field of view.

    ``make_phantom``'s body ellipse spans 92 % x 80 % of its grid; made on a
    392 x 392 grid and padded with air (-1000 HU) to 512 x 512, the body is
    290 mm wide and 250 mm deep (70 % x 61 % of the 410 mm field of view), as
    in clinical abdominal CT (a ~350 mm patient in a ~500 mm field of view).
    """
    import nibabel as nib

    from medseg.data.synthetic import make_phantom

    phantom = make_phantom("ct", shape=(BODY_IN_PLANE, BODY_IN_PLANE, slices), spacing=(0.8, 0.8, 2.0),
                           orientation="LPS", seed=0)
    pad = (512 - BODY_IN_PLANE) // 2
    data = np.full((512, 512, slices), -1000, dtype=np.int16)
    data[pad : pad + BODY_IN_PLANE, pad : pad + BODY_IN_PLANE] = phantom.image[0].astype(np.int16)
    shift = np.eye(4)
    shift[:2, 3] = -pad
    return nib.Nifti1Image(data, phantom.affine @ shift)


def prepare(work: Path, cases: list[str], large: bool) -> dict[str, Path]:
    """Model folder and input scans (cached in ``work``)."""
    import nibabel as nib

    from medseg.config import InferConfig
    from medseg.model_folder import save_model_folder
    from medseg.models import create_model_from_plan

    _register()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    plan = _plan()
    if not (model_dir / "model.json").is_file():
        save_model_folder(
            model_dir, model=create_model_from_plan(MODEL_NAME, plan), model_name=MODEL_NAME, model_options={},
            plan=plan, infer_config=InferConfig(overlap=OVERLAP, batch_size=BATCH), fold=0,
            training_info={"note": "benchmark network: U-Net compute + fixed threshold head, not trained"},
        )
    inputs = {}
    if "dicom" in cases:
        inputs["dicom"] = SHARED_DATA / "ct_dicom_series"
    if "ct300" in cases or large:
        path = work / "ct300_body70.nii.gz"
        if not path.is_file():
            print(f"making SYNTHETIC ct300 (512x512x300, 0.8x0.8x2.0 mm, LPS, body {BODY_IN_PLANE} voxels "
                  "padded with air) ...", flush=True)
            nib.save(ct_phantom(300), path)
        inputs["ct300"] = path
    if large:
        path = work / "ct1000_body70.nii.gz"
        if not path.is_file():
            print("making SYNTHETIC ct1000 (ct300 mirror-tiled to 512x512x1000) ...", flush=True)
            small = nib.load(work / "ct300_body70.nii.gz")
            data = np.asarray(small.dataobj)
            period = np.concatenate([np.arange(300), np.arange(299, -1, -1)])
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data[..., period[np.arange(1000) % 600]]), small.affine), path)
            del data
        inputs["ct1000"] = path
    inputs["model"] = model_dir
    return inputs


# --------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def worker_medseg(scan: Path, model_dir: Path, out: Path) -> dict:
    from medseg.inference.segmenter import Segmenter

    _register()
    seg = Segmenter.load(model_dir, device="cpu", tta="off", overlap=OVERLAP, batch_size=BATCH)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    written = seg.predict_many([scan], out, overwrite=True, prefetch=False)[0]
    wall = time.perf_counter() - t0
    timings = json.loads(written["provenance"].read_text())["timings_s"]
    return {
        "wall_s": wall, "network_s": timings.get("network_s", 0.0), "windows": timings.get("windows", 0)
        - timings.get("skipped_windows", 0), "windows_total": timings.get("windows", 0),
        "stages": {k: round(v, 2) for k, v in timings.items() if k.endswith("_s")},
        "peak_rss_mb": _peak_rss_mb(), "mask": str(written["mask"]),
    }


def worker_monai(scan: Path, model_dir: Path, out: Path) -> dict:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from medseg.model_folder import load_model_folder

    _register()
    net = load_model_folder(model_dir, device="cpu").model.eval()
    out.mkdir(parents=True, exist_ok=True)
    pre = Compose([
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys="image", pixdim=TARGET_SPACING, mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=-10.0, b_max=10.0, clip=True),
    ])
    post = Compose([
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", argmax=True),
        SaveImaged(keys="pred", output_dir=str(out), output_postfix="mask", output_ext=".nii.gz",
                   output_dtype=np.uint8, separate_folder=False, resample=False, print_log=False),
    ])
    stats = {"network_s": 0.0, "windows": 0}

    def predictor(x):
        t = time.perf_counter()
        y = net(x)
        stats["network_s"] += time.perf_counter() - t
        stats["windows"] += int(x.shape[0])
        return y

    t0 = time.perf_counter()
    data = pre({"image": str(scan)})
    with torch.inference_mode():
        data["pred"] = sliding_window_inference(
            data["image"][None], roi_size=PATCH, sw_batch_size=BATCH, predictor=predictor, overlap=OVERLAP,
            mode="gaussian",
        )[0]
    data = post(data)
    wall = time.perf_counter() - t0
    masks = sorted(out.glob("*.nii.gz"), key=lambda p: p.stat().st_mtime)
    return {
        "wall_s": wall, "network_s": stats["network_s"], "windows": stats["windows"],
        "windows_total": stats["windows"], "peak_rss_mb": _peak_rss_mb(), "mask": str(masks[-1]),
    }


# --------------------------------------------------------------------------- driver


def _run_worker(kind: str, scan: Path, model_dir: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--scan", str(scan), "--model", str(model_dir), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _aligned(mask_path: str, like_path: str) -> np.ndarray:
    """Mask re-oriented (axis permutation/flips only) onto the grid of ``like_path``."""
    import nibabel as nib

    img, like = nib.load(mask_path), nib.load(like_path)
    data = np.asarray(img.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    if not np.allclose(img.affine, like.affine, atol=1e-3):
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(img.affine), nib.orientations.io_orientation(like.affine)
        )
        data = nib.orientations.apply_orientation(data, ornt)
        moved = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape[:3])
        if not np.allclose(moved, like.affine, atol=1e-2):
            raise RuntimeError(f"MONAI mask {mask_path} is not on the input grid, even after re-orienting.")
    return data


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def _flops_per_window() -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.models import create_model_from_plan

    _register()
    net = create_model_from_plan(MODEL_NAME, _plan()).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, *PATCH))
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_bench_infer"), help="cache/output folder")
    parser.add_argument("--cases", default="dicom,ct300", help="comma-separated: dicom, ct300")
    parser.add_argument("--large", action="store_true", help="also a medseg-only 512x512x1000 memory run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case; the fastest counts")
    parser.add_argument("--worker", choices=["medseg", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--scan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn = worker_medseg if args.worker == "medseg" else worker_monai
        print(json.dumps(fn(args.scan, args.model, args.out)))
        return 0

    import torch

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    inputs = prepare(args.work, cases, args.large)
    flops = _flops_per_window()
    print(f"network: {MODEL_NAME}, {flops / 1e9:.2f} GFLOP per {PATCH} window; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; overlap {OVERLAP}, batch {BATCH}, TTA off")
    rows = []
    for case in cases:
        scan = inputs[case]
        results: dict[str, dict] = {}
        walls: dict[str, list[float]] = {"medseg": [], "monai": []}
        for r in range(args.rounds):
            # alternate which pipeline goes first; keep each one's fastest round (shared CPU)
            for kind in ("medseg", "monai") if r % 2 == 0 else ("monai", "medseg"):
                out = args.work / f"out_{case}_{kind}"
                for old in out.glob("*") if out.is_dir() else []:
                    old.unlink()
                print(f"round {r + 1}/{args.rounds}: {kind} on {case} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
                res = _run_worker(kind, scan, inputs["model"], out)
                walls[kind].append(round(res["wall_s"], 1))
                if kind not in results or res["wall_s"] < results[kind]["wall_s"]:
                    results[kind] = res
        print(f"{case} wall per round: {walls}", flush=True)
        ms, mo = results["medseg"], results["monai"]
        a = np.asarray(__import__("nibabel").load(ms["mask"]).dataobj)
        b = _aligned(mo["mask"], ms["mask"])
        dice = [_dice(a == k, b == k) for k in (1, 2)]
        rows.append((case, ms, mo, dice))
        print(json.dumps({"case": case, "medseg": ms, "monai": mo, "dice": dice}), flush=True)
    if args.large:
        print("running medseg on ct1000 (512x512x1000) ...", flush=True)
        big = _run_worker("medseg", inputs["ct1000"], inputs["model"], args.work / "out_ct1000_medseg")
        print(json.dumps({"case": "ct1000", "medseg": big}), flush=True)
        rows.append(("ct1000", big, None, None))

    print()
    print("| case | pipeline | wall s | network s | outside network | windows run | GFLOP | GFLOP/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, ms, mo, _dice_values in rows:
        for name, r in (("medseg", ms), ("MONAI", mo)):
            if r is None:
                continue
            gflop = r["windows"] * flops / 1e9
            print(
                f"| {case} | {name} | {r['wall_s']:.1f} | {r['network_s']:.1f} | "
                f"{100 * (1 - r['network_s'] / r['wall_s']):.0f}% | {r['windows']}/{r['windows_total']} | "
                f"{gflop:.0f} | {gflop / max(r['network_s'], 1e-9):.1f} | {r['peak_rss_mb']:.0f} |"
            )
    print()
    print("| case | time medseg/MONAI | peak RSS medseg/MONAI | Dice soft tissue | Dice bone |")
    print("|---|---|---|---|---|")
    for case, ms, mo, dice in rows:
        if mo is None:
            continue
        print(
            f"| {case} | {ms['wall_s'] / mo['wall_s']:.2f} | {ms['peak_rss_mb'] / mo['peak_rss_mb']:.2f} | "
            f"{dice[0]:.4f} | {dice[1]:.4f} |"
        )
    for case, ms, _mo, _d in rows:
        if "stages" in ms:
            print(f"medseg stages {case}: {ms['stages']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
