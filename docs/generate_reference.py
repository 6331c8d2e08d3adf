"""Regenerate docs/config.md and docs/cli.md from the code (the single source of truth).

Run: .venv/bin/python docs/generate_reference.py
tests/test_docs.py fails when the committed files are out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def config_markdown() -> str:
    from medseg.config import field_docs

    lines = [
        "# Config reference",
        "",
        "Every field of a medseg config, with its default. A config file is YAML with these",
        "sections; unknown keys are refused with the closest valid key suggested. Override any",
        "field on the command line with `--set section.key=value` (the value is parsed as YAML).",
        "`null` fields are planned from the data (see [plan.md](plan.md)).",
        "",
        "```yaml",
        "# example: configs/cpu_quick.yaml",
        "model: {name: unet}",
        "train: {max_epochs: 20, iterations_per_epoch: 50}",
        "```",
        "",
    ]
    section = None
    for key, type_name, default, doc in field_docs():
        name = key.split(".")[0]
        if name != section:
            section = name
            lines += ["", f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        shown = "null" if default is None else repr(default).replace("'", "")
        lines.append(f"| `{key}` | {type_name} | `{shown}` | {doc} |")
    return "\n".join(lines) + "\n"


def cli_markdown() -> str:
    from medseg.cli import build_parser, command_names

    parser = build_parser()
    lines = [
        "# Command-line reference",
        "",
        "Generated from `medseg --help` and `medseg COMMAND --help`. Errors for bad input are printed",
        "as one line and exit with status 2 (`--debug` shows the traceback).",
        "",
        "```text",
        _help(parser),
        "```",
    ]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in command_names():
        lines += ["", f"## `medseg {name}`", "", "```text", _help(sub.choices[name]), "```"]
    return "\n".join(lines) + "\n"


def _help(parser: argparse.ArgumentParser) -> str:
    import os

    os.environ["COLUMNS"] = "100"
    return parser.format_help().rstrip()


def main() -> int:
    (DOCS / "config.md").write_text(config_markdown(), encoding="utf-8")
    (DOCS / "cli.md").write_text(cli_markdown(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
