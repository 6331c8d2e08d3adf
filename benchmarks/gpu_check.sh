#!/usr/bin/env bash
# The GPU check: medseg's CUDA paths (mixed-precision training, CUDA inference vs CPU, GPU-resident
# sliding-window accumulators, `medseg infer --device cuda:0`) and CUDA vs CPU inference timings, in one
# command, under 8 minutes on one GPU. Prints ONE table at the end (also $OUT/gpu_check.md).
#
# Prepare HERE (network, .venv), once:
#     bash benchmarks/make_gpu_wheelhouse.sh     # gpu_wheels/: missing wheels + the real CT (~57 MiB, ignored)
# Then, in a session lent a GPU, ONE device-tool call:
#     run(carry=["gpu_wheels"], command="bash benchmarks/gpu_check.sh", timeout_s=600)
# Anywhere else (a CPU machine, or --dry-run): it checks the plumbing (dependencies, wheels, test collection),
# says "no CUDA device: nothing to check" and exits 0.
#
# What it does:
#   1. uses the machine's own python3 and its CUDA torch (PYTHON=... to choose another; never installs torch);
#   2. puts the repository on PYTHONPATH and installs, from gpu_wheels/ only (no registry), the dependencies
#      of pyproject.toml that this python lacks, with `pip install --no-index --no-deps --target` into
#      $MEDSEG_GPU_SITE (not a venv: on the GPU image python3 is itself a venv, /opt/torch/.venv, and a
#      --system-site-packages venv made from it would see the base python's packages, not its torch);
#   3. runs `pytest tests/test_gpu.py -m gpu` (junit XML in $OUT);
#   4. times `medseg infer` on cuda vs cpu: the Segmenter in process (fastest of 2 after a warm-up) and the
#      CLI end to end, on patient A's real CT and on that CT resampled to 0.8 x 0.8 x 1 mm (clinical size);
#   5. prints the table. Exit status: 0 when every test passed (or nothing to check), else 1.
# Outputs: $OUT (default /tmp/medseg_gpu_check): gpu_check.md, env.txt, pytest.log, gpu_tests.xml,
# bench.log, bench.json.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/medseg_gpu_check}
WHEELS=$ROOT/gpu_wheels
SITE=${MEDSEG_GPU_SITE:-/tmp/medseg_gpu_site}
mkdir -p "$OUT" "$SITE"
T0=$SECONDS

if [ -d "$ROOT/../shared/data/ct_organs" ]; then
    DATA=$(cd "$ROOT/../shared/data" && pwd)
elif [ -d "$WHEELS/shared_data/ct_organs" ]; then
    DATA=$WHEELS/shared_data
else
    DATA=""
    echo "WARNING: no real CT (../shared/data or gpu_wheels/shared_data): the GPU tests will skip" >&2
fi
export MEDSEG_SHARED_DATA=$DATA
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "$PY has no torch (set PYTHON to the interpreter that holds it)"
    echo "no CUDA device: nothing to check"
    exit 0
fi

# ---------------------------------------------------------------- dependencies from gpu_wheels/ only
missing() {  # pyproject requirements (and pytest) this python does not satisfy, torch excluded
    "$PY" - "$ROOT" <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path

text = (Path(sys.argv[1]) / "pyproject.toml").read_text()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
reqs = [*re.findall(r'^\s*"([^"]+)"', block, re.M), "pytest>=8"]
try:
    from packaging.requirements import Requirement
except ImportError:  # no packaging: presence only
    Requirement = None
for spec in reqs:
    name = re.split(r"[<>=!~ ;\[]", spec, maxsplit=1)[0]
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        print(name)
        continue
    if Requirement is not None and not Requirement(spec).specifier.contains(version, prereleases=True):
        if name.lower() == "torch":
            print(f"WARNING: torch {version} does not satisfy {spec}; using it anyway", file=sys.stderr)
        else:
            print(name)
EOF
}

need=$(missing | grep -vix torch)
wheels=()
absent=()
for name in $need; do
    norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
    found=""
    for w in "$WHEELS"/*.whl; do
        [ -e "$w" ] || continue
        base=$(basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
        if [ "$base" = "$norm" ]; then found=$w; fi
    done
    if [ -n "$found" ]; then wheels+=("$found"); else absent+=("$name"); fi
done
if [ ${#absent[@]} -gt 0 ]; then
    echo "ERROR: missing here and not in gpu_wheels/: ${absent[*]}" >&2
    echo "  run 'bash benchmarks/make_gpu_wheelhouse.sh' on a machine with network and carry gpu_wheels" >&2
    exit 1
fi
if [ ${#wheels[@]} -gt 0 ]; then
    echo "installing from gpu_wheels/ into $SITE: $(for w in "${wheels[@]}"; do basename "$w"; done | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" || { echo "ERROR: pip install from gpu_wheels/ failed" >&2; exit 1; }
else
    echo "every dependency is already installed for $PY"
fi
still=$(missing | grep -vix torch)
if [ -n "$still" ]; then
    echo "ERROR: still missing after the install: $still" >&2
    exit 1
fi

# ---------------------------------------------------------------- environment
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib.metadata as md
import os
import platform
import sys

import torch

print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"CPU threads {torch.get_num_threads()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("GPU none")
print(", ".join(f"{n} {md.version(n)}" for n in ("monai", "nibabel", "SimpleITK", "pydicom", "numpy", "pytest")))
import medseg  # noqa: E402

print(f"medseg {medseg.__version__} from {os.path.dirname(medseg.__file__)}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "ERROR: the environment does not import" >&2; exit 1; }

PYTEST=("$PY" -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider)
if [ "$DRY" = 1 ] || ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "${PYTEST[@]}" --collect-only -q 2>&1 | tail -1
    [ "$DRY" = 1 ] && echo "dry run: the check would now run '${PYTEST[*]}' and the CUDA timings"
    echo "no CUDA device: nothing to check ($((SECONDS - T0)) s)"
    exit 0
fi

# ---------------------------------------------------------------- the tests marked gpu
timeout 300 "${PYTEST[@]}" -q -rA --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/pytest.log" | grep -v "^INFO"
tests_rc=${PIPESTATUS[0]}

# ---------------------------------------------------------------- CUDA vs CPU timings
timeout 150 "$PY" - "$OUT/bench.json" <<'EOF' 2>&1 | tee "$OUT/bench.log"
"""Train a small model on CUDA, then time medseg inference on cuda vs cpu on real (and derived) CT."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, "tests")
import medseg  # noqa: E402
from medseg.inference.segmenter import Segmenter  # noqa: E402
from test_gpu import EPOCHS, TRAIN, write_ct_organs_dataset  # noqa: E402

out_json = Path(sys.argv[1])
data = Path(os.environ["MEDSEG_SHARED_DATA"]) / "ct_organs"
work = Path(tempfile.mkdtemp(prefix="medseg_gpu_bench_"))
rows = []


def save() -> None:
    out_json.write_text(json.dumps(rows, indent=1))


t0 = time.perf_counter()
run = medseg.train(write_ct_organs_dataset(data, work), "cpu_quick", output_dir=work / "run", fold="all",
                   overrides=TRAIN)
steps = EPOCHS * run.config.train.iterations_per_epoch
rows.append({"what": f"medseg.train: {steps} steps, fp16 autocast, planning + validation included",
             "cuda_s": time.perf_counter() - t0, "cpu_s": None, "agreement": ""})
save()

ct = nib.load(data / "ct.nii.gz")
image = np.asarray(ct.dataobj).astype(np.float32)
zoom = np.array(ct.header.get_zooms()[:3]) / np.array([0.8, 0.8, 1.0])
big = np.rint(ndimage.zoom(image, zoom, order=1)).astype(np.int16)
affine = ct.affine.copy()
affine[:3, :3] = ct.affine[:3, :3] / zoom  # same field of view, finer voxels (corner-aligned, as stated)
nib.save(nib.Nifti1Image(big, affine), work / "A_0.8x0.8x1mm.nii.gz")
scans = {f"patient A real CT {ct.shape} at 3 mm": data / "ct.nii.gz",
         f"A resampled to 0.8x0.8x1 mm {big.shape} (derived)": work / "A_0.8x0.8x1mm.nii.gz"}

for label, scan in scans.items():
    best, masks, net = {}, {}, {}
    for device in ("cuda", "cpu"):
        seg = Segmenter.load(run.model_dir, device=device, tta="off")
        times = []
        for i in range(3):  # a warm-up, then the fastest of 2
            t = time.perf_counter()
            pred = seg.predict(scan)
            pred.save(work / f"mask_{device}.nii.gz", overwrite=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
        best[device], masks[device] = min(times), pred.mask
        net[device] = pred.timings.get("network_s")
    dice = []
    for v in run.plan.label_values[1:]:
        a, b = masks["cpu"] == v, masks["cuda"] == v
        if a.any() or b.any():
            dice.append(2 * int((a & b).sum()) / (int(a.sum()) + int(b.sum())))
    rows.append({"what": f"Segmenter.predict + save, {label}", "cuda_s": best["cuda"], "cpu_s": best["cpu"],
                 "agreement": f"min Dice cuda vs cpu {min(dice):.4f}" if dice else "both empty",
                 "network_s": net})
    save()

scan = data / "ct.nii.gz"
cli = {}
for device in ("cuda:0", "cpu"):
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medseg", "-q", "infer", str(scan), "-m", str(run.model_dir),
                    "-o", str(work / f"cli_{device[:4]}.nii.gz"), "--device", device, "--no-tta", "--overwrite"],
                   check=True)
    cli[device] = time.perf_counter() - t
rows.append({"what": "`medseg infer --device cuda:0` vs `--device cpu`, CLI end to end (process start, model "
             "load), A real CT", "cuda_s": cli["cuda:0"], "cpu_s": cli["cpu"], "agreement": ""})
save()
EOF
bench_rc=${PIPESTATUS[0]}

# ---------------------------------------------------------------- the table
"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$((SECONDS - T0))" <<'EOF' | tee "$OUT/gpu_check.md"
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, tests_rc, bench_rc, wall = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
env = (out / "env.txt").read_text().strip().splitlines() if (out / "env.txt").exists() else []
print(f"\n## medseg GPU check ({wall} s)\n")
for line in env:
    print(f"- {line}")
print("\n| check | result | cuda (speed-up vs cpu) | cpu |\n| --- | --- | --- | --- |")
xml = out / "gpu_tests.xml"
if xml.exists():
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag.upper()}: {(node.get('message') or '').splitlines()[0][:90] if node.get('message') else ''}"
                break
        print(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.1f} s | |")
else:
    print(f"| tests marked gpu | no results (pytest exit {tests_rc}) | | |")
bench = out / "bench.json"
for row in json.loads(bench.read_text()) if bench.exists() else []:
    cells = {}
    for device in ("cuda", "cpu"):
        seconds, net = row.get(f"{device}_s"), (row.get("network_s") or {}).get(device)
        cells[device] = "" if seconds is None else f"{seconds:.2f} s" + (f" (network {net:.2f} s)" if net else "")
    if row.get("cuda_s") and row.get("cpu_s"):
        cells["cuda"] += f"; {row['cpu_s'] / row['cuda_s']:.1f}x"
    print(f"| {row['what']} | {row.get('agreement', '')} | {cells['cuda']} | {cells['cpu']} |")
if bench_rc:
    print(f"| timings | INCOMPLETE (exit {bench_rc}, see bench.log) | | |")
EOF

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
