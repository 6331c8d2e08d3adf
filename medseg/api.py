"""The Python API for research scripts (the CLI is a thin layer over it).

::

    import medseg
    run = medseg.train("data/Task09_Spleen", "cpu_quick")   # progress lines on stderr
    seg = medseg.Segmenter.load(run.model_dir)
    pred = seg.predict("scan.nii.gz")          # Prediction: mask, geometry, statistics
    report = medseg.evaluate("preds/", "labels/")

Everything here runs in a plain script: nothing starts processes that re-import the
calling script, so no ``if __name__ == "__main__":`` guard is needed.

The names are resolved lazily so that importing medseg does not import torch.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medseg.config import Config
    from medseg.training.run import Run

_WHERE = {
    "Run": "medseg.training.run",
    "Segmenter": "medseg.inference.segmenter",
    "Prediction": "medseg.inference.segmenter",
    "evaluate": "medseg.evaluation",
}

__all__ = ["console_progress", "train", *_WHERE]


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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg.api' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
