"""Run the main job end to end on built-in SYNTHETIC data (or your own dataset folder).

Makes a small synthetic CT organ + tumour dataset, trains the default U-Net for a few
minutes on the CPU (progress bar), segments a held-out scan, evaluates it, and prints
where the model, mask, preview and report are, the per-class Dice and what to try next.
The phantoms are synthetic: a model trained on them is useless on real scans.
"""

from __future__ import annotations

import argparse

from medseg.commands import emit

HELP = "train, segment and evaluate end to end on built-in synthetic data (a few minutes on CPU)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="demo_output",
                        help="folder for all demo outputs (default: demo_output; a previous demo there is replaced)")
    parser.add_argument("--data", metavar="DATASET_DIR",
                        help="use your own dataset folder instead of the synthetic phantoms")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--max-epochs", type=int, help="override the demo's 60 epochs (e.g. 2 for a smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms and of training (default: 0)")


def run(args: argparse.Namespace) -> int:
    from medseg.demo import run_demo

    result = run_demo(args.output, data=args.data, device=args.device, max_epochs=args.max_epochs, seed=args.seed)
    what = "synthetic phantoms (not patient data)" if result.synthetic else str(result.dataset_dir)
    total = sum(result.seconds.values())
    emit()
    emit(f"medseg demo finished in {total / 60:.1f} min on {what}")
    emit(f"  {'dataset':<11}{result.dataset_dir}")
    emit(f"  {'run':<11}{result.run_dir}   (config, plan, splits, metrics.csv, TensorBoard events)")
    emit(f"  {'model':<11}{result.model_dir}")
    emit(f"  {'scan':<11}{result.scan}")
    for kind in ("mask", "preview", "statistics"):
        if kind in result.outputs:
            emit(f"  {kind:<11}{result.outputs[kind]}")
    emit(f"  {'report':<11}{result.report_dir}")
    emit()
    emit("Held-out scan vs its reference:")
    emit(f"  {'class':<20} {'Dice':>6} {'HD95 (mm)':>10}")
    for name, dice in result.dice.items():
        hd95 = result.hd95_mm.get(name, float("nan"))
        emit(f"  {name:<20} {dice:>6.3f} {hd95:>10.2f}")
    emit()
    emit("Next:")
    emit(f"  medseg infer YOUR_SCAN.nii.gz -m {result.model_dir} -o out/ --preview --stats")
    emit(f"  medseg evaluate out/ REFERENCE_MASKS/ --labels {result.model_dir}")
    emit("  medseg check YOUR_DATASET/ && medseg train YOUR_DATASET/ --time-budget 25m")
    emit(f"  tensorboard --logdir {result.run_dir}")
    return 0
