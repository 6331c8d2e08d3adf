"""Lazy re-exports: a package names its public objects in one table and imports each module on first use.

Keeps ``import medseg`` and ``medseg --help`` fast (no torch, MONAI or SimpleITK at import
time). Each package pairs its table with ``if TYPE_CHECKING:`` imports of the same names,
so IDEs and type checkers see the real objects::

    __getattr__, __dir__ = lazy_exports(__name__, {"Plan": "medseg.data.plan"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, table: Mapping[str, str], eager: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` for ``package``: name -> the module that defines it.

    ``eager`` lists names the package defines itself (they appear in ``dir()`` too).
    """
    names = sorted({*table, *eager})

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
