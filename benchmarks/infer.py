"""Benchmark (not a test): `medseg infer` end to end vs the MONAI spleen tutorial's pipeline, same TRAINED weights.

Run::

    .venv/bin/python benchmarks/infer.py                      # 3 scans x 4 pipelines x 2 rounds (~12 min)
    .venv/bin/python benchmarks/infer.py --gzip               # zlib vs ISA-L on the scans and the masks written
    .venv/bin/python benchmarks/infer.py --cases dicom --rounds 1
    .venv/bin/python benchmarks/infer.py --model-dir RUN/fold_all/model   # another trained model folder

Model: :func:`common.trained_ct_model` (``benchmarks/common.py``): the default
3D U-Net trained with ``medseg train --time-budget 25m`` on the real abdominal
CT of patient A (seven organs, TotalSegmentator labels), trained once and
cached under ``benchmarks_output/``. Never a random or hand-made network.

Scans:

* ``dicom``: the real DICOM series ``../shared/data/ct_dicom_series`` (patient B,
  512 x 512 x 20, 0.98 x 0.98 x 2 mm).
* ``chest_C``: the real thoracic CT angiography ``../shared/data/ct_contrast_C/ct.nii.gz``
  (patient C, 120 x 126 x 164, 1.5 mm; a field of view the model never saw).
* ``A_0.8mm``: DERIVED from real data: patient A's CT resampled (SimpleITK,
  linear) to 0.8 x 0.8 x 1.0 mm, 458 x 379 x 90 voxels, a clinical voxel size
  (the model was trained on A at 3 mm, so agreement here is on a scan it knows).

Pipelines, each in its own subprocess (peak RSS is ``VmHWM`` of that process,
model loading and imports included), timed from reading the scan to the mask
file being written (model loading excluded); the pipelines alternate order
every round and each one's fastest round counts:

* ``medseg``: ``Segmenter.load(model).predict_many([scan], out)`` -- what
  ``medseg infer`` runs (read, preprocess as in training, sliding window with
  empty-window skipping, restore, write with geometry check, provenance).
  The network runs in PyTorch eager (``--backend torch``), the engine MONAI uses.
* ``medseg_openvino``: the same through OpenVINO (``--backend openvino``), what
  ``--backend auto`` picks with ``pip install 'medseg[cpu-fast]'``; its set-up
  (export, compile, check) happens at load and is not timed, like model loading.
* ``medseg_noskip``: the same as ``medseg`` with ``skip_empty_windows=False``.
* ``monai_nocrop``: the MONAI pipeline below without ``CropForegroundd`` (windows
  over the whole image, as medseg lays them): separates the window layout from
  the other differences in the agreement.
* ``monai``: the MONAI spleen tutorial's test-time pipeline (Project-MONAI/tutorials
  ``3d_segmentation/spleen_segmentation_3d``, "Evaluation on original image
  spacings" / inference): ``LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS)
  -> Spacingd(bilinear) -> ScaleIntensityRanged(clip) -> CropForegroundd``,
  ``sliding_window_inference``, ``Invertd(nearest_interp=False) -> AsDiscreted(argmax)
  -> SaveImaged``. Changed from the tutorial only where the model requires it:
  the target spacing is the plan's; ScaleIntensityRanged maps the plan's CT
  clip window to the plan's normalised values (the same normalisation the
  model was trained with); CropForegroundd keeps the tutorial's rule "above
  the lower end of the intensity window" (its ``x > 0`` after scaling to
  [0, 1]); the window is the plan's patch, with medseg's overlap, Gaussian
  blending and window batch; the mask is saved as one uint8 label map (the
  tutorial one-hot encodes it first).

Printed per scan and pipeline: wall time, peak RSS, windows run, network time
and the share of time outside the network, medseg's stage times, and the
per-class Dice of medseg's mask against MONAI's mask (with and without the crop) and against medseg with
window skipping off (whole image, and inside the body: voxels above -500 HU).
Results also go to ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import io
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
sys.path.insert(0, str(ROOT / "benchmarks"))

KINDS = ("medseg", "medseg_openvino", "medseg_noskip", "monai", "monai_nocrop")
CASES = ("dicom", "chest_C", "A_0.8mm")
DERIVED_SPACING = (0.8, 0.8, 1.0)


# --------------------------------------------------------------------------- inputs


def derived_clinical_ct(work: Path) -> Path:
    """Patient A's real CT resampled (linear) to 0.8 x 0.8 x 1.0 mm: a clinical-size voxel grid (cached)."""
    import SimpleITK as sitk

    path = work / "A_ct_0.8x0.8x1.0mm.nii.gz"
    if path.is_file():
        return path
    src = sitk.ReadImage(str(SHARED_DATA / "ct_organs" / "ct.nii.gz"))
    size = [round(n * s / t) for n, s, t in zip(src.GetSize(), src.GetSpacing(), DERIVED_SPACING)]
    out = sitk.Resample(src, size, sitk.Transform(), sitk.sitkLinear, src.GetOrigin(), DERIVED_SPACING,
                        src.GetDirection(), -1024.0, sitk.sitkInt16)
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("tmp_" + path.name)
    sitk.WriteImage(out, str(tmp), useCompression=True)
    tmp.replace(path)
    return path


def scan_path(case: str, work: Path) -> Path:
    if case == "dicom":
        return SHARED_DATA / "ct_dicom_series"
    if case == "chest_C":
        return SHARED_DATA / "ct_contrast_C" / "ct.nii.gz"
    return derived_clinical_ct(work)


# --------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def worker_medseg(scan: Path, model_dir: Path, out: Path, *, skip: bool, backend: str = "torch") -> dict:
    from medseg.inference.segmenter import Segmenter

    seg = Segmenter.load(model_dir, device="cpu", tta="off", skip_empty_windows=skip, backend=backend)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    written = seg.predict_many([scan], out, overwrite=True, prefetch=False)[0]
    wall = time.perf_counter() - t0
    timings = json.loads(written["provenance"].read_text())["timings_s"]
    return {
        "wall_s": wall, "network_s": timings.get("network_s", 0.0),
        "windows": timings.get("windows", 0) - timings.get("skipped_windows", 0),
        "windows_total": timings.get("windows", 0),
        "stages": {k: round(v, 2) for k, v in timings.items() if k.endswith("_s")},
        "peak_rss_mb": _peak_rss_mb(), "mask": str(written["mask"]),
        "settings": {"overlap": seg.window.overlap, "batch_size": seg.window.batch_size, "backend": seg.backend},
    }


def worker_monai(scan: Path, model_dir: Path, out: Path, *, crop: bool = True) -> dict:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from medseg.inference.segmenter import Segmenter

    seg = Segmenter.load(model_dir, device="cpu", tta="off")  # the model folder's network, overlap and batch
    net, plan = seg.models[0].model.eval(), seg.plan
    overlap, batch = seg.window.overlap, seg.window.batch_size
    norm = plan.normalization[0]
    lo, hi = norm.clip
    b_lo, b_hi = (lo - norm.mean) / norm.std, (hi - norm.mean) / norm.std
    out.mkdir(parents=True, exist_ok=True)
    steps = [
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys="image", pixdim=tuple(plan.target_spacing), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=b_lo, b_max=b_hi, clip=True),
        # the tutorial's foreground: above the lower end of the intensity window (its x > 0 on [0, 1])
        CropForegroundd(keys="image", source_key="image", select_fn=lambda x: x > b_lo),
    ]
    pre = Compose(steps if crop else steps[:-1])
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
        if isinstance(y, (list, tuple)):  # deep supervision: full resolution first
            y = y[0]
        stats["network_s"] += time.perf_counter() - t
        stats["windows"] += int(x.shape[0])
        return y

    t0 = time.perf_counter()
    data = pre({"image": str(scan)})
    t1 = time.perf_counter()
    with torch.inference_mode():
        data["pred"] = sliding_window_inference(
            data["image"][None], roi_size=tuple(plan.patch_size), sw_batch_size=batch, predictor=predictor,
            overlap=overlap, mode="gaussian",
        )[0]
    t2 = time.perf_counter()
    post(data)
    wall = time.perf_counter() - t0
    masks = sorted(out.glob("*.nii.gz"), key=lambda p: p.stat().st_mtime)
    return {
        "wall_s": wall, "network_s": stats["network_s"], "windows": stats["windows"],
        "windows_total": stats["windows"], "peak_rss_mb": _peak_rss_mb(), "mask": str(masks[-1]),
        "stages": {"load_pre_s": round(t1 - t0, 2), "sliding_window_s": round(t2 - t1, 2),
                   "invert_save_s": round(time.perf_counter() - t2, 2)},
        "settings": {"overlap": overlap, "batch_size": batch},
    }


# --------------------------------------------------------------------------- driver


def _run_worker(kind: str, scan: Path, model_dir: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--scan", str(scan), "--model-dir", str(model_dir),
           "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
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
            raise RuntimeError(f"mask {mask_path} is not on the grid of {like_path}, even after re-orienting.")
    return data


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty (nothing to agree on)."""
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return None if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def _body(scan: Path) -> np.ndarray:
    """Voxels above -500 HU on the scan's own grid (the grid medseg writes its mask on)."""
    from medseg.io.readers import read_volume

    return read_volume(scan).array[0] > -500


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _read_gz(module, path: Path) -> bytes:
    with module.open(path, "rb") as fh:
        return fh.read()


def _write_gz(module, data: bytes, level: int) -> int:
    buf = io.BytesIO()
    with module.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=level, mtime=0) as fh:
        fh.write(data)
    return buf.getbuffer().nbytes


def _fastest(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gzip_codecs(work: Path, cases: list[str], repeats: int = 3) -> None:
    """Time zlib (``gzip``) vs ISA-L (``isal.igzip``) on the bytes medseg reads and writes (fastest of ``repeats``).

    Reads: each NIfTI scan. Writes: the mask medseg wrote in a previous run
    (``WORK/out_<case>_medseg``), at the writer's levels (zlib 6; ISA-L capped at 3).
    """
    import gzip

    from isal import igzip

    print("| file | MB raw | zlib s | ISA-L s | ISA-L/zlib | MB gz zlib | MB gz ISA-L |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        scan = scan_path(case, work)
        if scan.name.endswith(".nii.gz"):
            size = len(_read_gz(gzip, scan))
            t_z = _fastest(lambda scan=scan: _read_gz(gzip, scan), repeats)
            t_i = _fastest(lambda scan=scan: _read_gz(igzip, scan), repeats)
            gz = scan.stat().st_size / 2**20
            print(f"| {case} scan: read | {size / 2**20:.1f} | {t_z:.3f} | {t_i:.3f} | {t_i / t_z:.2f} | "
                  f"{gz:.2f} | {gz:.2f} |")
        mask = next((work / f"out_{case}_medseg").glob("*.nii.gz"), None)
        if mask is not None:
            raw = _read_gz(gzip, mask)
            t_z = _fastest(lambda raw=raw: _write_gz(gzip, raw, 6), repeats)
            t_i = _fastest(lambda raw=raw: _write_gz(igzip, raw, 3), repeats)
            gz_z, gz_i = _write_gz(gzip, raw, 6) / 2**20, _write_gz(igzip, raw, 3) / 2**20
            print(f"| {case} mask: write | {len(raw) / 2**20:.1f} | {t_z:.3f} | {t_i:.3f} | {t_i / t_z:.2f} | "
                  f"{gz_z:.2f} | {gz_i:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks_output" / "infer", help="output folder")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per scan; the fastest counts")
    parser.add_argument("--model-dir", type=Path, help="trained model folder (default: common.trained_ct_model())")
    parser.add_argument("--gzip", action="store_true",
                        help="only time zlib vs ISA-L gzip on the scans and the masks of a previous run")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--scan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker.startswith("monai"):
            res = worker_monai(args.scan, args.model_dir, args.out, crop=args.worker == "monai")
        else:
            res = worker_medseg(args.scan, args.model_dir, args.out, skip=args.worker != "medseg_noskip",
                                backend="openvino" if args.worker == "medseg_openvino" else "torch")
        print(json.dumps(res))
        return 0

    import nibabel as nib
    import torch
    from common import trained_ct_model

    from medseg.inference.segmenter import Segmenter

    model_dir = args.model_dir or trained_ct_model()
    seg = Segmenter.load(model_dir, device="cpu", tta="off")
    plan = seg.plan
    classes = list(zip(plan.label_values[1:], plan.label_names[1:]))
    print(f"model: {model_dir} ({seg.models[0].model_name}, patch {plan.patch_size}, spacing "
          f"{plan.target_spacing} mm, {len(classes)} classes; overlap {seg.window.overlap}, batch {seg.window.batch_size}, "
          f"TTA off); torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    del seg
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.gzip:
        gzip_codecs(args.work, cases)
        return 0
    results: dict = {}
    for case in cases:
        scan = scan_path(case, args.work)
        best: dict[str, dict] = {}
        walls: dict[str, list[float]] = {k: [] for k in KINDS}
        for r in range(args.rounds):
            order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                out = args.work / f"out_{case}_{kind}"
                for old in out.glob("*") if out.is_dir() else []:
                    old.unlink()
                print(f"round {r + 1}/{args.rounds}: {kind} on {case} (load {os.getloadavg()[0]:.1f}) ...",
                      flush=True)
                res = _run_worker(kind, scan, model_dir, out)
                walls[kind].append(round(res["wall_s"], 1))
                if kind not in best or res["wall_s"] < best[kind]["wall_s"]:
                    best[kind] = res
        print(f"{case}: wall per round {walls}", flush=True)
        ref = best["medseg"]["mask"]
        ms = np.asarray(nib.load(ref).dataobj)
        noskip = np.asarray(nib.load(best["medseg_noskip"]["mask"]).dataobj)
        fast = np.asarray(nib.load(best["medseg_openvino"]["mask"]).dataobj)
        monai = _aligned(best["monai"]["mask"], ref)
        nocrop = _aligned(best["monai_nocrop"]["mask"], ref)
        body = _body(scan)
        if body.shape != ms.shape:
            raise RuntimeError(f"body mask {body.shape} and medseg's mask {ms.shape} differ for {case}")
        agree = {}
        for value, name in classes:
            a = ms == value
            agree[name] = {
                "vs_monai": _dice(a, monai == value),
                "vs_monai_nocrop": _dice(a, nocrop == value),
                "vs_noskip": _dice(a, noskip == value),
                "vs_noskip_body": _dice(a & body, (noskip == value) & body),
                "vs_openvino": _dice(a, fast == value),
                "voxels": int(np.count_nonzero(a)),
            }
        results[case] = {"scan": str(scan), "shape": list(ms.shape), "runs": best, "walls": walls, "dice": agree}
        print(json.dumps({"case": case, **results[case]}), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))

    print()
    print("| scan | pipeline | wall s | network s | outside network | windows run | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for case, res in results.items():
        for kind in KINDS:
            r = res["runs"][kind]
            print(f"| {case} | {kind} | {r['wall_s']:.1f} | {r['network_s']:.1f} | "
                  f"{100 * (1 - r['network_s'] / r['wall_s']):.0f}% | {r['windows']}/{r['windows_total']} | "
                  f"{r['peak_rss_mb']:.0f} |")
    print()
    print("| scan | time medseg/MONAI | time medseg openvino/MONAI | peak RSS medseg/MONAI | time medseg/no-skip |")
    print("|---|---|---|---|---|")
    for case, res in results.items():
        ms, fa, ns, mo = (res["runs"][k] for k in ("medseg", "medseg_openvino", "medseg_noskip", "monai"))
        print(f"| {case} | {ms['wall_s'] / mo['wall_s']:.2f} | {fa['wall_s'] / mo['wall_s']:.2f} | "
              f"{ms['peak_rss_mb'] / mo['peak_rss_mb']:.2f} | {ms['wall_s'] / ns['wall_s']:.2f} |")
    print()
    print("Dice of medseg's mask vs MONAI's | vs MONAI's without CropForegroundd | vs medseg without skipping "
          "(whole image) | same, inside the body | vs medseg through OpenVINO ('-': class absent from both)")
    print("| scan | " + " | ".join(name for _, name in classes) + " |")
    print("|---|" + "---|" * len(classes))
    for case, res in results.items():
        cells = [f"{_fmt(d['vs_monai'])} / {_fmt(d['vs_monai_nocrop'])} / {_fmt(d['vs_noskip'])} / "
                 f"{_fmt(d['vs_noskip_body'])} / {_fmt(d['vs_openvino'])}"
                 for d in res["dice"].values()]
        print(f"| {case} | " + " | ".join(cells) + " |")
    print()
    for case, res in results.items():
        for kind in KINDS:
            print(f"stages {case} {kind}: {res['runs'][kind]['stages']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
