"""The ``medseg`` command line: thin wrappers over the Python API.

Each sub-command lives in ``medseg/commands/<name>.py`` with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; modules there must not
import torch at import time, so ``medseg --help`` and ``--version`` start fast.
A :class:`~medseg.errors.MedsegError`, and a ``PermissionError`` (a file of
another user), is printed as one line naming the file and exits 2 (``--debug``
shows the traceback).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from medseg import __version__
from medseg.errors import MedsegError

# the order in `medseg --help`; commands not listed here follow alphabetically
ORDER = ["demo", "train", "infer", "evaluate", "check", "info", "export", "configs"]


def command_names() -> list[str]:
    import medseg.commands

    found = {m.name for m in pkgutil.iter_modules(medseg.commands.__path__) if not m.name.startswith("_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Medical image segmentation: train on a dataset folder, segment scans, evaluate masks.",
        epilog="Run `medseg COMMAND --help` for a command's options. Docs: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_names():
        module = importlib.import_module(f"medseg.commands.{name}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=(module.__doc__ or module.HELP).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def unknown_command(argv: Sequence[str]) -> str | None:
    """The one-line refusal of an unknown command in ``argv`` (with the closest command), or ``None``.

    The command is the first argument that is not an option; ``medseg`` has no option that takes a value.
    """
    word = next((a for a in argv if not a.startswith("-")), None)
    names = command_names()
    if word is None or word in names:
        return None
    close = difflib.get_close_matches(word, names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"commands: {', '.join(names)}"
    return f"medseg: unknown command {word!r}; {hint}"


def main(argv: list[str] | None = None) -> int:
    refusal = unknown_command(sys.argv[1:] if argv is None else argv)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    try:
        return int(args._module.run(args) or 0)
    except MedsegError as err:
        if args.debug:
            raise
        lines = str(err).strip().splitlines() or [""]
        more = f" (+{len(lines) - 1} lines: rerun with --debug)" if len(lines) > 1 else ""
        print(f"medseg {args.command}: {type(err).__name__}: {lines[0]}{more}", file=sys.stderr)
        return 2
    except PermissionError as err:  # a file or folder of another user: one line naming it, not a traceback
        if args.debug:
            raise
        print(f"medseg {args.command}: {permission_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130


def permission_message(err: PermissionError) -> str:
    """One line for a :class:`PermissionError` that no medseg check turned into a :class:`MedsegError`."""
    name = err.filename if err.filename is not None else "a file or folder"
    return (
        f"PermissionError: cannot access {name}: permission denied. Check its owner and mode (ls -l), "
        "make it readable/writable for you, or choose another file or folder."
    )


if __name__ == "__main__":
    sys.exit(main())
