"""Provenance of a prediction, and the small atomic writers for side outputs.

Every ``medseg infer`` output can be traced back: :func:`make_provenance`
records the medseg version, the model folder(s) with their weights' sha256,
the input's sha256 (a DICOM folder hashes its files in name order) and every
setting that changed the result. It holds no patient data: no DICOM tags, and
paths only as the user passed them; with ``anonymize`` (:func:`anonymize_provenance`)
no paths at all.

Anonymous case names (``--anonymize`` of ``medseg infer`` and ``medseg evaluate``)
come from :func:`anonymous_case_name`, the one naming rule both commands use.

Side outputs (JSON, CSV, PNG) are written like masks, with
:mod:`medseg.io.atomic`: into a hidden temporary file in the target folder,
then renamed into place; an existing file is kept unless ``overwrite=True``.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

from medseg.errors import OutputExistsError, OutputWriteError
from medseg.io.atomic import (  # write_*: re-exported
    refuse_output_over_inputs,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = [
    "ANONYMOUS_HASH_DIGITS",
    "anonymize_provenance",
    "anonymous_case_name",
    "check_output_path",
    "hash_input",
    "make_provenance",
    "write_bytes_atomic",
    "write_json_atomic",
]

#: Hex digits of the content sha256 in an anonymous case name (48 bits: two different
#: scans among a million share a name with probability ~0.2%; a clash is refused, never
#: overwritten).
ANONYMOUS_HASH_DIGITS = 12


def hash_input(path: str | os.PathLike) -> str:
    """sha256 of a file, or of every file in a folder (sorted by name; names included).

    Remembered per file path, size and modification time within a process: a cohort
    run names, predicts and records each input, and reads it for hashing only once.
    """
    path = Path(path)
    is_dir = path.is_dir()
    files = sorted(p for p in path.iterdir() if p.is_file()) if is_dir else [path]
    stamps = []
    for f in files:
        st = f.stat()
        stamps.append((str(f), st.st_size, st.st_mtime_ns))
    return _hash_files(tuple(stamps), is_dir)


@functools.lru_cache(maxsize=4096)
def _hash_files(stamps: tuple[tuple[str, int, int], ...], named: bool) -> str:
    h = hashlib.sha256()
    for name, _size, _mtime in stamps:
        f = Path(name)
        if named:
            h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def anonymous_case_name(path: str | os.PathLike) -> str:
    """Case name that does not reveal the input's name: ``case_`` + 12 hex digits of its content's sha256.

    The hash is :func:`hash_input` of the file (or of a DICOM folder's files), the
    same sha256 that the provenance records, so the name is stable across runs,
    machines, copies and renames, and two inputs share a name only when their
    content is identical. The path is deliberately not hashed: a path holds the
    patient's name or ID, and a hash of a guessable name can be found by trying
    names; a hash of the voxel data cannot be reversed without the scan itself.
    """
    return "case_" + hash_input(path)[:ANONYMOUS_HASH_DIGITS]


def anonymize_provenance(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of a provenance record without any path: input and model folders become ``None``.

    The input and models stay identified by their sha256; ``"anonymized": true`` says so.
    """
    record = dict(record)
    record["input"] = {**record.get("input", {}), "path": None}
    record["models"] = [{**m, "path": None} for m in record.get("models", [])]
    record["anonymized"] = True
    return record


def make_provenance(
    *,
    models: list[dict[str, Any]],
    settings: dict[str, Any],
    input_path: str | os.PathLike | None,
    input_sha256: str | None,
    device: str,
    outputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The provenance record written as ``<case>_provenance.json``.

    Args:
        models: one ``{"path", "fold", "weights_sha256", "name"}`` per ensemble member.
        settings: overlap, tta, batch size, postprocess, folds ... as used.
        input_path: the scan as the user named it (``None`` for in-memory arrays).
        input_sha256: see :func:`hash_input`.
        device: where the network ran.
        outputs: output kind -> file name.
    """
    import numpy as np
    import torch

    from medseg.version import __version__

    return {
        "medseg_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": {"path": None if input_path is None else str(input_path), "sha256": input_sha256},
        "models": models,
        "settings": settings,
        "device": device,
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "outputs": outputs or {},
    }


def check_output_path(
    path: Path, *, overwrite: bool, inputs: tuple[Path, ...] = (), need_folder: bool = True
) -> Path:
    """Refuse to replace an input, or an existing file without ``overwrite``; the folder must exist.

    ``need_folder=False`` checks a planned output whose folder is created later.

    Raises:
        OutputExistsError: the file exists (and ``overwrite`` is False) or is one of ``inputs``
            (or lies inside an input folder).
        OutputWriteError: the folder is missing (with ``need_folder``).
    """
    path = Path(path)
    for source in inputs:
        refuse_output_over_inputs(path, {"input": source}, what="output", around=False)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} exists; pass --overwrite (overwrite=True) to replace it.")
    if need_folder and not path.parent.is_dir():
        raise OutputWriteError(f"output folder {path.parent} does not exist; create it or pass another -o.")
    return path
