#!/usr/bin/env bash
# Build gpu_wheels/: what benchmarks/gpu_check.sh needs on a GPU machine that reaches no package registry.
#
# Run HERE (a machine with network and the project's .venv), from the repository root:
#
#     bash benchmarks/make_gpu_wheelhouse.sh            # -> gpu_wheels/ (ignored by git)
#
# It holds:
#   * wheels (Linux x86_64, CPython ${GPU_PYTHON_VERSION:-3.12}) of medseg's dependencies from pyproject.toml that
#     the GPU machine's image lacks (never torch: the machine's own CUDA torch is used), at the versions
#     installed in .venv (tested here), plus the requirements of those wheels that the image lacks too;
#   * shared_data/ct_organs/: the real CT the GPU tests and timings read (../shared/data does not travel).
#
# Which packages the GPU image already has is listed in IMAGE_HAS below (read from the device tool's
# KINDS.md, 2026-11-17: its python3 is 3.12.3 with torch 2.11.0+cu130, numpy, scipy, scikit-image, ...).
# gpu_check.sh checks again on the machine and installs only what is really missing there.
# The total must stay under 60 MiB: the device tool carries at most 64 MiB with the working tree.
#
# Then, with a GPU lent, ONE device-tool call:
#     run(carry=["gpu_wheels"], command="bash benchmarks/gpu_check.sh", timeout_s=600)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/gpu_wheels}
PY=${PYTHON:-$ROOT/.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
DATA=${MEDSEG_SHARED_DATA:-$ROOT/../shared/data}
LIMIT_MIB=60

# Distributions in the GPU image (normalised names); torch is never carried.
IMAGE_HAS="torch numpy scipy scikit-image tensorboard pyyaml safetensors tqdm matplotlib einops pytest
pytest-xdist packaging typing-extensions pillow filelock networkx jinja2 sympy fsspec imageio tifffile
lazy-loader onnx onnxruntime protobuf six python-dateutil contourpy cycler fonttools kiwisolver pyparsing
grpcio markdown werkzeug absl-py tensorboard-data-server setuptools pluggy iniconfig execnet"

mkdir -p "$DEST"
"$PY" - "$ROOT" "$DEST" "$PYVER" "$IMAGE_HAS" <<'EOF'
"""Download the missing wheels (no deps), then the missing requirements of those wheels, until closed."""
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

root, dest, pyver, image_has = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4].split()
have = {canonicalize_name(n) for n in image_has}
env = {**default_environment(), "python_version": pyver, "python_full_version": f"{pyver}.0",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
       "--python-version", pyver, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
       "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(dest)]


def pinned(req: Requirement) -> str:
    """``name==<version in this environment>`` when that version satisfies ``req``, else ``req`` as written."""
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        return str(req.name) + str(req.specifier)
    return f"{req.name}=={version}" if req.specifier.contains(version, prereleases=True) else f"{req.name}{req.specifier}"


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def wheel_name(wheel: Path) -> str:
    return canonicalize_name(re.split(r"-\d", wheel.name, maxsplit=1)[0])


deps = [Requirement(d) for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]]
todo = [r for r in deps if canonicalize_name(r.name) not in have]
done: set[str] = {wheel_name(w) for w in dest.glob("*.whl")}
while todo:
    req = todo.pop(0)
    name = canonicalize_name(req.name)
    if name in have or name in done:
        continue
    spec = pinned(req)
    print(f"  wheel: {spec}", flush=True)
    subprocess.run([*pip, spec], check=True)
    done.add(name)
    wheel = next(w for w in dest.glob("*.whl") if wheel_name(w) == name)
    todo += [r for r in wheel_requirements(wheel) if canonicalize_name(r.name) not in have]
EOF

mkdir -p "$DEST/shared_data/ct_organs"
for f in ct.nii.gz organs.nii.gz label_names.json; do
    cp "$DATA/ct_organs/$f" "$DEST/shared_data/ct_organs/$f"
done

total=$(du -sk "$DEST" | cut -f1)
echo "gpu_wheels: $DEST"
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f MiB  %s\n", $5 / 1048576, $9}'
echo "  total $((total / 1024)) MiB (limit ${LIMIT_MIB} MiB; the device tool carries 64 MiB with the working tree)"
if [ "$total" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "ERROR: gpu_wheels is over ${LIMIT_MIB} MiB; carry fewer wheels (see IMAGE_HAS)" >&2
    exit 1
fi
echo 'next, on a GPU: run(carry=["gpu_wheels"], command="bash benchmarks/gpu_check.sh", timeout_s=600)'
