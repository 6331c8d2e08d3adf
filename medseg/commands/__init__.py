"""One module per ``medseg`` sub-command (see ``medseg.cli``).

A command's result (paths written, reports, tables) goes to standard output through
:func:`emit`, the one place the CLI writes it; progress and warnings go through
logging (stderr), which ``medseg.cli`` configures. Library modules never write to
the terminal themselves.
"""

from __future__ import annotations

import sys
from typing import IO


def emit(text: object = "", *, file: IO[str] | None = None) -> None:
    """Write one line of a command's output (standard output unless ``file`` is given)."""
    stream = sys.stdout if file is None else file
    stream.write(f"{text}\n")
    stream.flush()
