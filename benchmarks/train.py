"""Benchmark (not a test): medseg's training loop vs the plain-loop floor and a MONAI tutorial-style loop.

Run::

    .venv/bin/python benchmarks/train.py                      # default 3D config, 10 timed steps each
    .venv/bin/python benchmarks/train.py --set data.spatial_dims=2     # the 2D (2.5D) plan of the same CT
    .venv/bin/python benchmarks/train.py --iterations 30 --workers 4
    .venv/bin/python benchmarks/train.py --set data.patch_size=[64,64,32]
    .venv/bin/python benchmarks/train.py --arms medseg,plain,plain-channels-last,plain-compile

Data: the real abdominal CT in ``../shared/data/ct_organs`` (122 x 101 x 30 at 3 mm) with seven
organs kept from its TotalSegmentator labels (spleen, kidneys, liver, stomach, pancreas, colon;
the rest background), written as a one-case MSD folder under ``--work``.

Both loops train the network of the config (default ``configs/unet3d.yaml``: nnU-Net U-Net,
deep supervision, Dice+CE, SGD Nesterov, gradient clipping 12) planned by medseg for this
machine (patch and batch size from the plan), with the same number of loader workers. Each
runs in its own subprocess (peak RSS from ``/proc/self/status`` VmHWM is per loop); the first
``--iterations`` steps (worker start, caching, allocator) are not timed. The loops run
alternately ``--rounds`` times and each loop's fastest round is reported, because other jobs
share this machine's CPU.

* **medseg**: ``medseg.train(..., fold="all")`` (check, plan, cache, balanced patch
  sampling with nnU-Net's augmentation, the trainer); the timings are the second epoch's row
  of ``metrics.csv``: time blocked on the loader vs time in the step.
* **MONAI reference** (spleen-tutorial style): ``LoadImaged -> EnsureChannelFirstd ->
  Orientationd(RAS) -> Spacingd -> ScaleIntensityRanged`` (the plan's CT window mapped to
  its z-scores) ``-> CropForegroundd -> SpatialPadd(patch)`` cached by ``CacheDataset``, then per sample
  ``RandCropByPosNegLabeld(pos=1, neg=2, num_samples=batch)`` plus the tutorial's flips,
  90-degree rotations and intensity shifts; the same step (forward, loss, backward, clip,
  SGD) timed the same way.

* **plain loop** (the floor): the same network, loss, optimizer and step (forward, loss,
  backward, clip, SGD) on ``--iterations`` batches of the plan's shape made in memory
  before the loop (image ~ N(0, 1), labels uniform over the classes: dense convolutions cost
  the same whatever the values), so nothing but the step is timed. medseg's share of time
  outside the network is ``1 - plain / medseg`` seconds per step.
* **medseg-compile**: the medseg arm with ``train.compile=true`` (its last epoch is timed,
  after the first one compiled).
* **plain-channels-last**, **plain-compile**: the plain loop with ``channels_last(_3d)``
  memory format, or with ``torch.compile`` (inductor; its compile time is reported apart,
  in the warm-up steps). Their losses are compared step by step with the plain loop's
  (same initial weights, same batches): the largest relative difference is printed.

Printed: iterations/s, patches/s, data-wait share, peak RSS, and the ratios to medseg.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

KEEP = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 4, "stomach": 5, "pancreas": 6, "colon": 7}


def prepare_dataset(work: Path) -> Path:
    """A one-case MSD folder with the real CT and seven organ labels."""
    import nibabel as nib
    import numpy as np

    root = work / "CTOrgans"
    if (root / "dataset.json").is_file():
        return root
    src = SHARED_DATA / "ct_organs"
    if not src.is_dir():
        raise SystemExit(f"real CT not found at {src}")
    names = {int(k): v for k, v in json.loads((src / "label_names.json").read_text())["total"].items()}
    label = nib.load(src / "organs.nii.gz")
    values = np.asarray(label.dataobj)
    out = np.zeros(values.shape, dtype=np.uint8)
    for value, name in names.items():
        if name in KEEP:
            out[values == value] = KEEP[name]
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    (root / "imagesTr" / "ct.nii.gz").write_bytes((src / "ct.nii.gz").read_bytes())
    nib.save(nib.Nifti1Image(out, label.affine), root / "labelsTr" / "ct.nii.gz")
    meta = {
        "name": "CTOrgans",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(v): k for k, v in KEEP.items()}},
        "numTraining": 1,
        "training": [{"image": "./imagesTr/ct.nii.gz", "label": "./labelsTr/ct.nii.gz"}],
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"train.iterations_per_epoch={args.iterations}",
        "train.max_epochs=2",
        "train.val_every=1000",
        f"data.num_workers={args.workers}",
        "data.num_folds=1",
        *args.set,
    ]


def worker_medseg(args: argparse.Namespace) -> dict:
    import csv
    import logging

    import medseg

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    run = medseg.train(
        work / "CTOrgans", args.config, output_dir=work / "runs" / f"{args.worker}_{args.round}", fold="all",
        overrides=_overrides(args),
    )
    with open(run.run_dir / "fold_all" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    timed = rows[-1]
    data_s, compute_s, epoch_s = float(timed["data_wait_s"]), float(timed["compute_s"]), float(timed["epoch_s"])
    (work / "plan.json").write_text((run.run_dir / "plan.json").read_text())
    return {
        "steps": args.iterations, "batch": run.plan.batch_size, "patch": run.plan.patch_size,
        "data_s": data_s, "compute_s": compute_s, "wall_s": epoch_s, "peak_rss_mb": _peak_rss_mb(),
    }


def _training_parts(cfg, plan):
    """The network (seed 0), loss and SGD optimizer of the config, the same for every arm."""
    import torch

    from medseg.losses import build_loss
    from medseg.models import create_model_from_plan

    torch.manual_seed(0)
    model = create_model_from_plan(cfg.model.name, plan, **cfg.model.options, deep_supervision=cfg.model.deep_supervision)
    t = cfg.train
    optimizer = torch.optim.SGD(model.parameters(), lr=t.learning_rate, momentum=t.momentum,
                                weight_decay=t.weight_decay, nesterov=True)
    return model, build_loss(cfg.loss, plan), optimizer


def worker_monai(args: argparse.Namespace) -> dict:
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandShiftIntensityd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )
    from torch.utils.data import RandomSampler

    from medseg.config import load_config
    from medseg.data.plan import load_plan

    work = Path(args.work)
    cfg = load_config(args.config, _overrides(args))
    plan = load_plan(work / "plan.json")
    torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
    norm = plan.normalization[0]
    lo, hi = norm.clip
    b_min = (lo - norm.mean) / norm.std
    steps = args.iterations
    transforms = Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Spacingd(keys=["image", "label"], pixdim=plan.target_spacing, mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys=["image"], a_min=lo, a_max=hi, b_min=b_min,
                             b_max=(hi - norm.mean) / norm.std, clip=True),
        CropForegroundd(keys=["image", "label"], source_key="image", select_fn=lambda x: x > b_min),
        SpatialPadd(keys=["image", "label"], spatial_size=plan.patch_size),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=plan.patch_size, pos=1,
                               neg=2, num_samples=plan.batch_size, image_key="image", image_threshold=-1e9),
        RandFlipd(keys=["image", "label"], spatial_axis=[0], prob=0.1),
        RandFlipd(keys=["image", "label"], spatial_axis=[1], prob=0.1),
        RandFlipd(keys=["image", "label"], spatial_axis=[2], prob=0.1),
        RandRotate90d(keys=["image", "label"], prob=0.1, max_k=3, spatial_axes=(0, 1)),
        RandShiftIntensityd(keys=["image"], offsets=0.1, prob=0.5),
        EnsureTyped(keys=["image", "label"], track_meta=False),
    ])
    root = work / "CTOrgans"
    files = [{"image": str(root / "imagesTr" / "ct.nii.gz"), "label": str(root / "labelsTr" / "ct.nii.gz")}]
    dataset = CacheDataset(files, transform=transforms, cache_rate=1.0, num_workers=1)
    sampler = RandomSampler(dataset, replacement=True, num_samples=2 * steps)
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=args.workers,
                        persistent_workers=args.workers > 0)
    model, loss_fn, optimizer = _training_parts(cfg, plan)
    t = cfg.train
    model.train()
    data_s = compute_s = 0.0
    it = iter(loader)
    start = None
    for step in range(2 * steps):
        if step == steps:  # first `steps` steps are warm-up, as medseg's first epoch
            data_s = compute_s = 0.0
            start = time.perf_counter()
        t0 = time.perf_counter()
        batch = next(it)
        x = batch["image"].float()
        y = batch["label"].long()
        if step == 0:
            layout = {"contiguous": bool(x.is_contiguous()), "type": type(batch["image"]).__name__}
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        float(loss)
        t2 = time.perf_counter()
        data_s += t1 - t0
        compute_s += t2 - t1
    wall = time.perf_counter() - start
    return {
        "steps": steps, "batch": int(x.shape[0]), "patch": list(x.shape[2:]),
        "data_s": data_s, "compute_s": compute_s, "wall_s": wall, "peak_rss_mb": _peak_rss_mb(), "layout": layout,
    }


PLAIN_VARIANTS = {"plain": "eager", "plain-channels-last": "channels_last", "plain-compile": "compile"}


def worker_plain(args: argparse.Namespace) -> dict:
    """The floor: medseg's network, loss and optimizer stepping over batches made in memory beforehand."""
    import torch

    from medseg.config import load_config
    from medseg.data.plan import load_plan

    variant = PLAIN_VARIANTS[args.worker]
    work = Path(args.work)
    cfg = load_config(args.config, _overrides(args))
    plan = load_plan(work / "plan.json")
    torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
    steps = args.iterations
    gen = torch.Generator().manual_seed(1)
    shape = (plan.batch_size, plan.in_channels, *plan.patch_size)
    batches = [
        (torch.randn(shape, generator=gen),
         torch.randint(0, plan.num_classes, (plan.batch_size, 1, *plan.patch_size), generator=gen))
        for _ in range(steps)
    ]
    model, loss_fn, optimizer = _training_parts(cfg, plan)
    t = cfg.train
    fmt = None
    if variant == "channels_last":
        fmt = torch.channels_last_3d if len(plan.patch_size) == 3 else torch.channels_last
        model = model.to(memory_format=fmt)
        batches = [(x.contiguous(memory_format=fmt), y) for x, y in batches]
    network = torch.compile(model) if variant == "compile" else model
    model.train()
    losses = []
    warmup_s = 0.0
    start = time.perf_counter()
    for step in range(2 * steps):  # the batches twice: warm-up (and compilation), then timed
        if step == steps:
            warmup_s = time.perf_counter() - start
            start = time.perf_counter()
        x, y = batches[step % steps]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        losses.append(float(loss))
    wall = time.perf_counter() - start
    return {
        "steps": steps, "batch": plan.batch_size, "patch": list(plan.patch_size), "data_s": 0.0,
        "compute_s": wall, "wall_s": wall, "warmup_s": warmup_s, "peak_rss_mb": _peak_rss_mb(), "losses": losses,
    }


def _run_worker(kind: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, *argv], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "unet3d.yaml"))
    parser.add_argument("--iterations", type=int, default=10, help="timed steps (and as many warm-up steps)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: medseg's choice)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each loop (best one kept)")
    parser.add_argument("--work", default="/tmp/medseg_bench_train")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for both loops")
    parser.add_argument("--arms", default="medseg,plain,monai,plain-channels-last,plain-compile",
                        help="loops to run (medseg always runs: it writes the plan)")
    parser.add_argument("--worker", choices=["medseg", "medseg-compile", "monai", *PLAIN_VARIANTS],
                        help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers is None:
        from medseg.data.loaders import default_num_workers

        args.workers = default_num_workers()
    if args.worker:
        if args.worker in ("medseg", "medseg-compile"):
            if args.worker == "medseg-compile":  # the opt-in train.compile through medseg.train
                args.set = [*args.set, "train.compile=true"]
            result = worker_medseg(args)
        elif args.worker == "monai":
            result = worker_monai(args)
        else:
            result = worker_plain(args)
        print(json.dumps(result))
        return 0
    work = Path(args.work)
    prepare_dataset(work)
    import shutil

    shutil.rmtree(work / "runs", ignore_errors=True)
    argv = ["--config", args.config, "--iterations", str(args.iterations), "--workers", str(args.workers),
            "--work", str(work), "--set", *args.set]
    load_before = f"{os.getloadavg()[0]:.1f}"
    arms = ["medseg", *[a for a in args.arms.split(",") if a and a != "medseg"]]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for k in range(args.rounds):  # alternate, keep each loop's best round: other jobs share this CPU
        for arm in (arms if k % 2 == 0 else arms[::-1]):  # medseg first in the first round: it writes the plan
            runs[arm].append(_run_worker(arm, [*argv, "--round", str(k)]))
            print(f"round {k + 1}: {arm} {runs[arm][-1]['wall_s'] / args.iterations:.2f} s/step "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    results = {name: min(rs, key=lambda r: r["wall_s"]) for name, rs in runs.items()}
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {args.workers} loader workers, "
          f"patch {results['medseg']['patch']} x batch {results['medseg']['batch']}, {args.iterations} timed steps")
    print(f"load average before: {load_before}, after: {os.getloadavg()[0]:.1f} (other jobs share this CPU); "
          f"best of {args.rounds} alternating rounds")
    labels = {"medseg": "medseg", "medseg-compile": "medseg, train.compile", "monai": "MONAI tutorial", "plain": "plain loop", **{
        a: a for a in PLAIN_VARIANTS if a != "plain"}}
    print("| loop | s/step | patches/s | data wait | step compute s | peak RSS MB | x medseg speed | "
          "max rel. loss diff vs plain | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rate = {}
    medseg_step = results["medseg"]["wall_s"] / results["medseg"]["steps"]
    plain_losses = results.get("plain", {}).get("losses")
    for name, r in results.items():
        its = r["steps"] / r["wall_s"]
        rate[name] = its * r["batch"]
        wait = r["data_s"] / max(r["data_s"] + r["compute_s"], 1e-9)
        step = r["compute_s"] / r["steps"]
        diff = "-"
        if plain_losses and "losses" in r and name != "plain":
            diff = f"{max(abs(a - b) / abs(b) for a, b in zip(r['losses'], plain_losses)):.1e}"
        warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else "-"
        print(f"| {labels[name]} | {1 / its:.2f} | {rate[name]:.3f} | {100 * wait:.1f}% | {step:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {medseg_step * its:.2f} | {diff} | {warm} |")
    if "plain" in results:
        plain_step = results["plain"]["wall_s"] / results["plain"]["steps"]
        print(f"medseg outside the network: {100 * (1 - plain_step / medseg_step):.1f}% of its step time "
              f"(medseg {medseg_step:.2f} s/step vs plain loop {plain_step:.2f} s/step); target < 5%")
    if "monai" in results:
        print(f"medseg / MONAI patches/s: {rate['medseg'] / rate['monai']:.2f}x  "
              f"(peak RSS {results['medseg']['peak_rss_mb'] / results['monai']['peak_rss_mb']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
