"""Argument types and options shared by several sub-commands (one syntax for each)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_folds_argument", "parse_fold", "parse_fold_list"]


def parse_fold(text: str) -> int | str:
    """One fold: a number ``>= 0`` or ``all`` (argparse type of ``--fold``)."""
    text = text.strip()
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"fold must be a number >= 0 or 'all', got {text!r}")
    return int(text)


def parse_fold_list(text: str) -> list[int | str]:
    """Folds separated by commas (``0,1,2``); with ``nargs="+"`` also by spaces (``0 1 2``)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected fold numbers or 'all', e.g. 0,1,2 or 0 1 2, got {text!r}")
    return [parse_fold(p) for p in parts]


class _FoldList(argparse.Action):
    """Flattens ``--folds 0,1 2`` into ``[0, 1, 2]`` and refuses a fold given twice."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        folds = [f for group in values for f in group]
        repeated = sorted({str(f) for f in folds if folds.count(f) > 1})
        if repeated:
            parser.error(f"argument {option_string}: fold {', '.join(repeated)} given more than once")
        setattr(namespace, self.dest, folds)


def add_folds_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--folds``: the one fold-list syntax of every command (``0,1,2`` or ``0 1 2``, ``all``)."""
    parser.add_argument(
        "--folds", nargs="+", type=parse_fold_list, action=_FoldList, metavar="K",
        help=f"{help}: fold numbers separated by commas or spaces (0,1,2 or 0 1 2), 'all' for the fold "
        "trained on every case",
    )
