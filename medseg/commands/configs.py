"""List the built-in configs: one line each, its name and the first line of its description.

A built-in config is used by name: `medseg train DATASET_DIR -c cpu_quick`. To change
one, copy its YAML file (the folder is printed last) and pass the copy's path with -c.
Every key is described in docs/config.md.

example:
  medseg configs
"""

from __future__ import annotations

import argparse

from medseg.commands import emit

HELP = "list the built-in configs (use one with `medseg train DATASET_DIR -c NAME`)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    from medseg.config import BUILTIN_CONFIG_DIR, builtin_configs, describe_config

    configs = builtin_configs()
    width = max((len(name) for name in configs), default=0)
    for name, path in configs.items():
        emit(f"{name:<{width}}  {describe_config(path)}")
    emit(f"(YAML files in {BUILTIN_CONFIG_DIR}; use one with: medseg train DATASET_DIR -c NAME)")
    return 0
