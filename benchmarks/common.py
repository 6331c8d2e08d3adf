"""Shared by the benchmarks: a model TRAINED on the real CT of patient A, cached between runs.

Benchmarks that time inference need a real trained network (a random or
hand-made one cannot show that a speed-up leaves a trained model's answer
unchanged). :func:`trained_ct_model` trains one once with ``medseg train``
on the one-case MSD folder that ``benchmarks/train.py`` builds from
``../shared/data/ct_organs`` (seven organs) and returns the model folder;
later calls return the cached folder at once.

Run on its own (prints the model folder)::

    .venv/bin/python benchmarks/common.py                # default 3D U-Net (unet3d), --time-budget 25m
    .venv/bin/python benchmarks/common.py --config cpu_quick --budget 30m

Used by ``benchmarks/infer.py``. The cache lives under ``benchmarks_output/``
(git-ignored) of the checkout that runs it unless ``work`` is given.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: Default cache folder of :func:`trained_ct_model`.
DEFAULT_WORK = ROOT / "benchmarks_output" / "trained_ct"
#: Default training config: medseg's default 3D U-Net recipe (what a user gets). 12 minutes on
#: the shared 2-core CPU at load 6-9 were 21 steps (~20 s/step): it learned only the liver.
#: Default budget: the 25 CPU minutes medseg is judged by (docs/performance.md gives the
#: steps and validation Dice of the cached model the figures come from).
DEFAULT_CONFIG = "unet3d"
#: Default training time budget (``medseg train --time-budget``).
DEFAULT_BUDGET = "25m"


def trained_ct_model(work: str | os.PathLike | None = None, *, config: str = DEFAULT_CONFIG,
                     budget: str = DEFAULT_BUDGET, spatial_dims: int = 3) -> Path:
    """Model folder of a 3D (or 2.5D) U-Net trained on the real abdominal CT of patient A (trained once, then cached).

    Trains with ``medseg train CTOrgans -c CONFIG --fold all --time-budget BUDGET
    --device cpu --seed 0 --set data.spatial_dims=SPATIAL_DIMS`` (seven organs: spleen,
    kidneys, liver, stomach, pancreas, colon) in a subprocess, logging to
    ``WORK/train_<dims>d_<config>_<budget>.log`` (one cache per dims, config and budget). A finished run is recognised by its
    ``fold_all/model/model.json``; a run left unfinished stops with a message
    (delete its folder and call again).

    Args:
        work: cache folder (default ``benchmarks_output/trained_ct`` in this checkout).
        config: ``medseg train -c`` config (a name in ``configs/`` or a YAML path).
        budget: training time budget, e.g. ``"12m"``.
        spatial_dims: 3 (volumes) or 2 (2.5D slices).

    Returns:
        Path of the model folder (``Segmenter.load`` / ``medseg infer -m`` take it).
    """
    from train import prepare_dataset  # benchmarks/train.py: the one-case MSD folder

    work = Path(work) if work is not None else DEFAULT_WORK
    run_dir = work / f"run_{spatial_dims}d_{config}_{budget}"
    model_dir = run_dir / "fold_all" / "model"
    if (model_dir / "model.json").is_file():
        return model_dir
    if run_dir.exists():
        raise SystemExit(f"{run_dir} holds an unfinished training run: delete it and run again.")
    work.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset(work)
    log = work / f"train_{spatial_dims}d_{config}_{budget}.log"
    cmd = [sys.executable, "-m", "medseg", "train", str(dataset), "-c", config, "-o", str(run_dir), "--fold", "all",
           "--time-budget", budget, "--device", "cpu", "--seed", "0", "--set", f"data.spatial_dims={spatial_dims}"]
    print(f"training the benchmark model ({config}, {budget}, {spatial_dims}D; log {log}) ...", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0 or not (model_dir / "model.json").is_file():
        raise SystemExit(f"medseg train exited {code} without a model folder; see {log}")
    (work / f"train_{spatial_dims}d_{config}_{budget}.json").write_text(json.dumps(
        {"command": cmd, "config": config, "budget": budget, "wall_s": round(time.perf_counter() - t0, 1)}, indent=1))
    return model_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache folder")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="medseg train -c config")
    parser.add_argument("--budget", default=DEFAULT_BUDGET, help="training time budget (e.g. 12m)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=3)
    args = parser.parse_args()
    print(trained_ct_model(args.work, config=args.config, budget=args.budget, spatial_dims=args.spatial_dims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
