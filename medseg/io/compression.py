"""gzip for ``.nii.gz`` files: ISA-L (``python-isal``) when installed, else the standard library.

Both write and read the same gzip format (RFC 1952), so files stay valid for
every NIfTI reader. ISA-L read this project's CT volumes 2-3x and wrote its
masks ~3x faster than zlib (``benchmarks/infer.py --gzip``, docs/performance.md).
Its levels are 0-3: a requested zlib level is capped at 3.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import IO, BinaryIO

try:
    from isal import igzip as _gzip
    from isal import isal_zlib as _isal_zlib

    #: Exceptions a corrupt gzip stream raises (zlib's, and ISA-L's when in use).
    GZIP_ERRORS: tuple[type[BaseException], ...] = (zlib.error, _isal_zlib.error)
    HAVE_ISAL = True
except ImportError:  # pragma: no cover - isal is a dependency; the fallback keeps medseg usable without it
    _gzip = gzip
    GZIP_ERRORS = (zlib.error,)
    HAVE_ISAL = False

__all__ = ["GZIP_ERRORS", "HAVE_ISAL", "gzip_open", "gzip_writer"]


def gzip_open(path: str | os.PathLike, mode: str = "rb") -> IO[bytes]:
    """Open a gzip file for binary reading (or writing) with the fastest codec available."""
    return _gzip.open(path, mode)


def gzip_writer(fileobj: BinaryIO, *, compresslevel: int) -> IO[bytes]:
    """A gzip stream writing into ``fileobj`` (no file name, mtime 0: reproducible bytes)."""
    level = min(int(compresslevel), 3) if HAVE_ISAL else int(compresslevel)
    return _gzip.GzipFile(filename="", mode="wb", fileobj=fileobj, compresslevel=level, mtime=0)
