"""Cost of every registered model on this CPU: parameters, FLOPs, forward / forward+backward time, peak memory.

Usage::

    .venv/bin/python benchmarks/models.py                 # every model, 2D and 3D, Markdown table
    .venv/bin/python benchmarks/models.py --models unet deeplabv3 --dims 3

Each (model, dims) runs in its own subprocess so that its peak resident memory
(``ru_maxrss``) can be measured: the reported memory is the growth of the peak
RSS from just after the model is built to the end of the timed
forward+backward passes (activations, gradients, workspaces; the weights are
counted in "params"). FLOPs are counted for one forward pass by
``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add, convolutions
and matrix products only). Times are the best of ``--repeats`` runs after one
warm-up, with ``torch.set_num_threads(2)`` (``--threads``), batch 1, fp32; the CPU columns
are the process CPU time of the same runs (both threads together). On a shared,
loaded machine both are upper bounds: when the other core is busy, a 2-thread
op waits for its descheduled half at every barrier (CPU time == wall time is
the sign), which can slow small ops 10x. Parameters, FLOPs and memory do not
depend on the load. Models use their
default options; the U-Net's topology is computed from the patch
(``unet_topology(patch, isotropic spacing)``) and trains with deep supervision,
UNETR gets ``img_size = patch``.

Default patches: 64^3 in 3D and 256^2 in 2D, the size of a CPU-budget plan
(nnU-Net's 128^3 / 512^2 GPU patches cost ~8x / 4x more).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_PATCH = {2: (256, 256), 3: (64, 64, 64)}


def _options(name: str, patch: tuple[int, ...]) -> dict:
    if name == "unet":
        return {"patch_size": list(patch), "deep_supervision": True}
    if name == "unetr":
        return {"img_size": list(patch)}
    return {}


def measure(name: str, dims: int, patch: tuple[int, ...], repeats: int, threads: int = 2) -> dict:
    """Measure one model in this process (call it in a fresh subprocess for the memory figure)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=dims, in_channels=1, num_classes=3, **_options(name, patch))
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 1, *patch)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    model.eval()
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
        flops = counter.get_total_flops()
        forward, forward_cpu = [], []
        for _ in range(repeats + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            model(x)
            forward.append(time.perf_counter() - start)
            forward_cpu.append(time.process_time() - start_cpu)

    model.train()
    backward, backward_cpu = [], []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start, start_cpu = time.perf_counter(), time.process_time()
        out = model(x)
        outputs = out if isinstance(out, (list, tuple)) else [out]
        sum(o.float().mean() for o in outputs).backward()
        backward.append(time.perf_counter() - start)
        backward_cpu.append(time.process_time() - start_cpu)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": name,
        "dims": dims,
        "patch": "x".join(map(str, patch)),
        "params_m": params / 1e6,
        "gflops": flops / 1e9,
        "forward_ms": 1000 * min(forward[1:]),
        "train_ms": 1000 * min(backward[1:]),
        "forward_cpu_ms": 1000 * min(forward_cpu[1:]),
        "train_cpu_ms": 1000 * min(backward_cpu[1:]),
        "peak_mb": (peak_rss - base_rss) / 1024,  # ru_maxrss is in KiB on Linux
    }


def run_all(
    models: list[str], dims: list[int], patches: dict[int, tuple[int, ...]], repeats: int, threads: int
) -> list[dict]:
    rows = []
    for d in dims:
        for name in models:
            cmd = [sys.executable, __file__, "--one", name, str(d), "--repeats", str(repeats),
                   "--threads", str(threads), "--patch", *map(str, patches[d])]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                tail = (result.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"model": name, "dims": d, "patch": "x".join(map(str, patches[d])), "error": tail})
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"done {name} {d}D", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | dims | patch | params (M) | GFLOP / patch (fwd) | forward (ms) | fwd+bwd (ms) "
        "| forward CPU (ms) | fwd+bwd CPU (ms) | GFLOP/s (fwd) | peak memory (MB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dims']}D | {r['patch']} | failed: {r['error']} | | | | | | | |")
            continue
        rate = r["gflops"] / (r["forward_ms"] / 1000)
        lines.append(
            f"| {r['model']} | {r['dims']}D | {r['patch']} | {r['params_m']:.2f} | {r['gflops']:.1f} "
            f"| {r['forward_ms']:.0f} | {r['train_ms']:.0f} | {r['forward_cpu_ms']:.0f} | {r['train_cpu_ms']:.0f} "
            f"| {rate:.0f} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model names (default: every registered model)")
    parser.add_argument("--dims", nargs="*", type=int, default=[2, 3])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (best is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--patch-2d", nargs=2, type=int, default=list(DEFAULT_PATCH[2]))
    parser.add_argument("--patch-3d", nargs=3, type=int, default=list(DEFAULT_PATCH[3]))
    parser.add_argument("--one", nargs=2, metavar=("NAME", "DIMS"), help=argparse.SUPPRESS)
    parser.add_argument("--patch", nargs="*", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, dims = args.one[0], int(args.one[1])
        print(json.dumps(measure(name, dims, tuple(args.patch), args.repeats, args.threads)))
        return
    from medseg.models import list_models

    models = args.models or list_models()
    patches = {2: tuple(args.patch_2d), 3: tuple(args.patch_3d)}
    start = time.perf_counter()
    rows = run_all(models, args.dims, patches, args.repeats, args.threads)
    load = os.getloadavg()[0]
    print(markdown(rows))
    print(
        f"\ntorch threads {args.threads}, batch 1, fp32, best of {args.repeats} after a warm-up; "
        f"load average at the end {load:.1f} on {os.cpu_count()} cores; "
        f"total {time.perf_counter() - start:.0f} s; median fwd+bwd "
        f"{statistics.median(r['train_ms'] for r in rows if 'train_ms' in r):.0f} ms."
    )


if __name__ == "__main__":
    main()
