"""The Python API for research scripts (the CLI is a thin layer over it).

::

    import medseg
    run = medseg.train("data/Task09_Spleen", "cpu_quick")   # progress lines on stderr
    seg = medseg.Segmenter.load(run.model_dir)
    pred = seg.predict("scan.nii.gz")          # Prediction: mask, geometry, statistics
    result = medseg.infer(["scans/"], medseg.OutputSpec("masks/", statistics=True), model_dir=run.model_dir)
    report = medseg.evaluate("preds/", "labels/")

Everything here runs in a plain script: nothing starts processes that re-import the
calling script, so no ``if __name__ == "__main__":`` guard is needed.

The names are resolved lazily so that importing medseg does not import torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg._lazy import lazy_exports

if TYPE_CHECKING:
    from medseg.config import Config, load_config
    from medseg.data.check import CheckReport
    from medseg.errors import MedsegError
    from medseg.evaluation import evaluate
    from medseg.inference.export import export_model
    from medseg.inference.jobs import CohortResult
    from medseg.inference.outputs import OutputSpec
    from medseg.inference.segmenter import Prediction, Segmenter
    from medseg.io.geometry import Geometry
    from medseg.io.readers import read_volume
    from medseg.io.volume import Volume
    from medseg.io.writers import write_mask
    from medseg.models.registry import create_model, list_models
    from medseg.training.run import Run

#: The front door: public name -> the module that defines it (imported on first use).
#: ``medseg`` re-exports these and the functions defined below.
EXPORTS = {
    "read_volume": "medseg.io.readers",
    "write_mask": "medseg.io.writers",
    "Volume": "medseg.io.volume",
    "Geometry": "medseg.io.geometry",
    "load_config": "medseg.config",
    "Config": "medseg.config",
    "MedsegError": "medseg.errors",
    "Run": "medseg.training.run",
    "Segmenter": "medseg.inference.segmenter",
    "Prediction": "medseg.inference.segmenter",
    "OutputSpec": "medseg.inference.outputs",
    "evaluate": "medseg.evaluation",
    "export_model": "medseg.inference.export",
    "create_model": "medseg.models.registry",
    "list_models": "medseg.models.registry",
}

#: Defined in this module.
FUNCTIONS = ("check_dataset", "console_progress", "infer", "train")

__all__ = [
    "Config",
    "Geometry",
    "MedsegError",
    "OutputSpec",
    "Prediction",
    "Run",
    "Segmenter",
    "Volume",
    "check_dataset",
    "console_progress",
    "create_model",
    "evaluate",
    "export_model",
    "infer",
    "list_models",
    "load_config",
    "read_volume",
    "train",
    "write_mask",
]

__getattr__, __dir__ = lazy_exports(__name__, EXPORTS, eager=FUNCTIONS)


@contextlib.contextmanager
def console_progress(verbose: bool = True) -> Iterator[None]:
    """Show medseg's progress log lines (logger ``"medseg"``, INFO) on stderr while the block runs.

    The lines are those ``medseg train`` prints. A handler is added only when logging has not
    been configured (no handler on ``"medseg"`` or the root logger, e.g. from
    ``logging.basicConfig``): a configured logging setup decides on its own. ``verbose=False``
    adds nothing (warnings still reach stderr).
    """
    logger = logging.getLogger("medseg")
    if not verbose or logger.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:  # a level the caller set on "medseg" is kept
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def train(dataset_dir: str | Path, config: Config | str | Path | None = None, *, verbose: bool = True,
          **options: Any) -> Run:
    """Train on a dataset folder, showing progress on stderr; see :func:`medseg.training.run.train`.

    Args:
        dataset_dir: the dataset (MSD, nnU-Net or plain layout).
        config: a :class:`~medseg.config.Config`, a YAML path, a built-in config's name
            (``"cpu_quick"``, see ``medseg configs``) or ``None`` for the defaults.
        verbose: print the progress lines of ``medseg train`` (data check, plan, one line
            per epoch and validation) on stderr when logging is not configured
            (:func:`console_progress`); ``False`` prints none.
        **options: ``output_dir``, ``fold``, ``folds``, ``resume``, ``init_from``,
            ``overrides``, ``runs_root`` as in :func:`medseg.training.run.train`.
    """
    from medseg.training.run import train as train_run

    with console_progress(verbose):
        return train_run(dataset_dir, config, **options)


def check_dataset(
    dataset_dir: str | Path, *, num_folds: int | None = 5, ignore_label: int | None = None,
    resample_tilt: bool = False,
) -> CheckReport:
    """Read every case of a dataset folder and report all problems (what ``medseg check`` prints).

    Args:
        dataset_dir: the dataset (MSD, nnU-Net, plain or list layout).
        num_folds: warn when there are too few cases for this many folds (``None``/1: no check).
        ignore_label: a label value marking unlabeled voxels, allowed although not declared.
        resample_tilt: read gantry-tilted DICOM series onto a regular grid instead of refusing them.

    Raises:
        DatasetError: the folder is not a dataset (no recognised layout).
    """
    from medseg.data.check import check_dataset as check_index
    from medseg.data.folders import scan_dataset

    index = scan_dataset(dataset_dir, collect_problems=True, resample_tilt=resample_tilt)
    return check_index(index, num_folds=num_folds, ignore_label=ignore_label)


def infer(
    inputs: Sequence[str | os.PathLike],
    outputs: OutputSpec | str | os.PathLike = ".",
    *,
    model_dir: str | os.PathLike | None = None,
    folds: Sequence[int | str] | None = None,
    series_uid: str | None = None,
    resample_tilt: bool = False,
    resume: bool = False,
    num_parts: int | None = None,
    part_id: int | None = None,
    verbose: bool = True,
    **load_options: Any,
) -> CohortResult:
    """Segment scan files into output files, as ``medseg infer`` does (cohorts, parts, manifest).

    Everything that can be refused without the model (inputs, channel files, output
    formats, existing outputs) is refused before the weights are loaded. One scan
    stops at its error; in a cohort a failed case is recorded and the run goes on
    (:func:`medseg.inference.jobs.run_cohort`).

    Args:
        inputs: scan files, DICOM series folders, folders of them
            (:func:`medseg.inference.jobs.collect_cases`; nnU-Net channel files form one case).
        outputs: an :class:`~medseg.inference.outputs.OutputSpec`, or ``-o``'s target: a
            folder, or a mask file name for one input (:meth:`OutputSpec.to`).
        model_dir: model, fold or run folder; ``None``: the newest run under ``./runs``.
        folds: folds of a run folder to ensemble (default: all).
        series_uid: the series of DICOM folders holding several.
        resample_tilt: segment gantry-tilted DICOM series on a corrected grid.
        resume: skip cases whose outputs are complete, redo the others (``--continue``).
        num_parts, part_id: segment part ``part_id`` of ``num_parts`` (both or neither).
        verbose: show the progress lines on stderr when logging is not configured.
        **load_options: :meth:`Segmenter.load` settings: ``device``, ``tta``, ``overlap``,
            ``batch_size``, ``postprocess``, ``skip_empty_windows``, ``backend``, ``build_model``.

    Returns:
        The :class:`~medseg.inference.jobs.CohortResult` (rows, failed, skipped, manifest, paths).

    Raises:
        ConfigError, ScanReadError, OutputExistsError, OutputWriteError: before any work, or the
            error of a single scan.
    """
    from medseg.errors import ConfigError
    from medseg.inference.jobs import (
        anonymize_cases,
        collect_cases,
        manifest_name,
        plan_of,
        run_cohort,
        select_part,
    )
    from medseg.inference.outputs import OutputSpec
    from medseg.inference.postprocess import parse_postprocess
    from medseg.inference.segmenter import Segmenter
    from medseg.model_folder import newest_run

    spec = outputs if isinstance(outputs, OutputSpec) else OutputSpec.to(outputs)
    if load_options.get("postprocess") is not None:
        parse_postprocess(load_options["postprocess"])  # fail before loading anything
    if (num_parts is None) != (part_id is None):
        raise ConfigError("--num-parts N and --part-id K go together (K in 0..N-1); pass both or neither.")
    model_dir = model_dir if model_dir is not None else newest_run(Path("runs"))
    plan = plan_of(model_dir, folds)  # model.json only: the channels group the input files
    cases = collect_cases(inputs, channels=plan.image_channels, channel_names=plan.channel_names, series_uid=series_uid)
    keep_going = len(cases) > 1  # a single scan stops at its error
    if num_parts is not None:
        cases = select_part(cases, num_parts, part_id or 0)
    spec.check_formats([(c.source, c.name) for c in cases])
    if spec.anonymize:
        cases = anonymize_cases(cases, series_uid=series_uid)
    if spec.mask_path is not None and len(cases) != 1:
        raise ConfigError(f"-o {spec.mask_path} names one file but there are {len(cases)} inputs; pass a folder.")
    if not resume:  # refuse existing outputs before the model is loaded
        spec.plan([(c.inputs, c.name) for c in cases])
    with console_progress(verbose):
        segmenter = Segmenter.load(model_dir, folds=folds, **load_options)
        window = segmenter.window
        logging.getLogger("medseg.infer").info(
            "model %s (%d fold(s)) on %s (backend %s), tta %s, overlap %.2f", model_dir, len(segmenter.models),
            segmenter.device, segmenter.backend, "on" if window.tta else "off", window.overlap,
        )
        return run_cohort(
            segmenter, cases, spec, resume=resume, keep_going=keep_going, series_uid=series_uid,
            resample_tilt=resample_tilt, manifest=manifest_name(num_parts or 1, part_id or 0),
        )
