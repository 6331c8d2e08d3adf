"""``medseg demo``: the whole job end to end in a few minutes on a laptop CPU.

1. Make a small SYNTHETIC CT dataset (organ + tumour phantoms, random
   anisotropic spacing and orientations) in the MSD layout, plus one held-out
   phantom with its reference mask -- or use the user's own dataset folder
   (``data=``), holding out the first validation case of fold 0.
2. Train the default U-Net with a short CPU schedule (progress bar).
3. Segment the held-out scan (mask on the scan's own grid, statistics, preview PNG).
4. Evaluate the mask against the reference (Dice, HD95, ...).

Everything goes into one output folder (default ``demo_output``), marked with a
``.medseg-demo`` file so that a later demo run may replace it; a folder without
that mark is never touched. The synthetic phantoms are not patient data and a
model trained on them is useless on real scans.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import DatasetError, OutputExistsError, TrainingError

__all__ = ["DEMO_OVERRIDES", "DemoResult", "run_demo"]

log = logging.getLogger(__name__)

MARKER = ".medseg-demo"

DEMO_OVERRIDES = (
    "data.memory_budget_gb=0.25",
    "data.batch_size=2",
    "augment.lowres_prob=0.0",
    "augment.blur_prob=0.0",
    "model.options={base_features: 8, max_features: 64}",
    "train.max_epochs=60",
    "train.iterations_per_epoch=25",
    "train.val_every=5",
    "loss.class_weights=auto",
    "infer.overlap=0.25",
    "infer.postprocess=largest",  # one organ and one tumour per phantom
)
"""The demo's schedule: about four minutes of training on 2 idle CPU cores."""


@dataclass
class DemoResult:
    """Where the demo put everything, and how well the model did."""

    output_dir: Path
    dataset_dir: Path
    run_dir: Path
    model_dir: Path
    scan: Path
    reference: Path
    outputs: dict[str, Path]
    report_dir: Path
    dice: dict[str, float]
    hd95_mm: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    synthetic: bool = True


def run_demo(
    output_dir: str | Path = "demo_output",
    *,
    data: str | Path | None = None,
    device: str = "auto",
    max_epochs: int | None = None,
    seed: int = 0,
) -> DemoResult:
    """Run the demo (see the module docstring) and return where its outputs are.

    Args:
        output_dir: folder for the dataset, run, mask, preview and report.
        data: a dataset folder of your own (MSD, nnU-Net or plain layout) instead
            of the synthetic phantoms.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        max_epochs: override the demo's 60 epochs (e.g. 2 for a smoke test).
        seed: seed of the phantoms and of training.

    Raises:
        OutputExistsError: ``output_dir`` exists, is not empty and is not a previous demo.
        DatasetError: ``data`` has problems (all listed).
    """
    from medseg.evaluation import evaluate
    from medseg.inference.segmenter import Segmenter
    from medseg.training.run import train

    out = _prepare_output(Path(output_dir))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if data is None:
        dataset_dir, scan, reference = _make_synthetic(out, seed=seed)
    else:
        dataset_dir, scan, reference = _hold_out_from(Path(data), seed=seed)
    seconds["data"] = time.perf_counter() - start

    overrides = [*DEMO_OVERRIDES, f"train.device={device}", f"train.seed={seed}"]
    if max_epochs is not None:
        overrides.append(f"train.max_epochs={max_epochs}")
    start = time.perf_counter()
    run = train(dataset_dir, None, output_dir=out / "run", fold=0, overrides=overrides)
    seconds["train"] = time.perf_counter() - start
    if run.status == "interrupted" or run.model_dir is None:
        raise TrainingError(
            f"training was interrupted, so the demo stops before segmenting; the run is in {run.run_dir} "
            "(run `medseg demo` again to start over)."
        )

    start = time.perf_counter()
    segmenter = Segmenter.load(run.model_dir, device=device)
    outputs = segmenter.predict_many([scan], out / "prediction", statistics=True, preview=True)[0]
    seconds["infer"] = time.perf_counter() - start

    start = time.perf_counter()
    report = evaluate(
        outputs["mask"], reference, labels=segmenter.labels, metrics="dice,iou,hd95,assd", output_dir=out / "report"
    )
    seconds["evaluate"] = time.perf_counter() - start
    summary = report.summary
    return DemoResult(
        output_dir=out,
        dataset_dir=dataset_dir,
        run_dir=run.run_dir,
        model_dir=run.model_dir,
        scan=scan,
        reference=reference,
        outputs=outputs,
        report_dir=out / "report",
        dice={name: values["dice"]["mean"] for name, values in summary.items() if "dice" in values},
        hd95_mm={name: values["hd95"]["mean"] for name, values in summary.items() if "hd95" in values},
        seconds=seconds,
        synthetic=data is None,
    )


def _prepare_output(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not a folder; pass another --output folder.")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise OutputExistsError(
                f"{out} exists and is not a previous medseg demo folder; pass another --output folder."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("created by `medseg demo`; a later demo run may replace this folder\n")
    return out


def _make_synthetic(out: Path, *, seed: int) -> tuple[Path, Path, Path]:
    """10 training phantoms in the MSD layout plus one held-out phantom with its reference."""
    from medseg.data.synthetic import make_phantom, write_synthetic_dataset
    from medseg.io.geometry import Geometry
    from medseg.io.writers import write_mask, write_volume

    dataset = write_synthetic_dataset(
        out / "dataset" / "SyntheticOrganCT", layout="msd", num_cases=10, kind="ct", seed=seed, shape=(56, 56, 36)
    )
    phantom = make_phantom("ct", shape=(56, 56, 36), seed=seed * 1000 + 999, orientation="LPS")
    geometry = Geometry(phantom.label.shape, phantom.affine, source="synthetic")
    held_out = out / "held_out"
    held_out.mkdir()
    scan = write_volume(phantom.image, geometry, held_out / "phantom_test.nii.gz")
    (held_out / "reference").mkdir()
    reference = write_mask(phantom.label, geometry, held_out / "reference" / "phantom_test.nii.gz")
    return dataset, scan, reference


def _hold_out_from(data: Path, *, seed: int) -> tuple[Path, Path, Path]:
    """Use the user's dataset; the first validation case of fold 0 is segmented and scored."""
    from medseg.data import make_splits, scan_dataset

    index = scan_dataset(data)
    labelled = [c for c in index.cases if c.label_path is not None]
    if len(labelled) < 2:
        raise DatasetError(f"{data} has {len(labelled)} labelled case(s); the demo needs at least 2 (train + held out).")
    split = make_splits(index, num_folds=5, seed=12345)[0]
    case = next(c for c in labelled if c.case_id == split["val"][0])
    if len(case.image_paths) != 1:
        raise DatasetError(
            f"case {case.case_id!r} has one file per channel; the demo segments single-file scans. "
            "Run `medseg train` and `medseg infer` directly on this dataset."
        )
    return data, case.image_paths[0], case.label_path
