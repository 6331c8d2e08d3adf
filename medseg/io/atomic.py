"""Atomic writes: a reader (or a crash) sees the old file or the new one, never a torn one.

Every file medseg writes goes through here; :mod:`medseg.io.writers` adds its
NIfTI header check between writing and renaming. The steps:

1. Create a hidden temporary sibling in the target folder
   (``.<name>.<random>.tmp``; same folder, so the rename cannot cross file systems).
2. Write it, ``fsync`` it.
3. Rename it into place: ``os.replace`` when an existing file may be replaced,
   else ``os.link`` (which fails if the target appeared meanwhile), then
   ``fsync`` the folder.
4. Any error removes the temporary file; an ``OSError`` becomes an
   :class:`~medseg.errors.OutputWriteError` that names the target.

Folders (model folders, exports) are built the same way in a temporary sibling
folder and renamed into place by :func:`atomic_dir`.

Example::

    write_json_atomic({"epoch": 3}, run_dir / "state.json", overwrite=True)
    with atomic_path(run_dir / "last.pt", overwrite=True) as tmp:
        torch.save(state, tmp)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError, OutputExistsError, OutputWriteError

__all__ = [
    "atomic_dir",
    "atomic_path",
    "fsync_dir",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it is renamed onto ``path``.

    Args:
        path: the file to write. Its folder must exist.
        overwrite: replace an existing file; otherwise an existing (or meanwhile
            created) file raises :class:`OutputExistsError` and is kept.
        fsync: flush the file and the folder to disk (off only for rebuildable caches).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        OutputWriteError: the folder is missing or refuses new files, or writing failed.
    """
    target = Path(path)
    temp = _create_temp(target)
    try:
        yield temp
        if fsync:
            _fsync_file(temp)
        _commit(temp, target, overwrite=overwrite)
    except BaseException as err:
        temp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, MedsegError):
            raise OutputWriteError(f"writing {target} failed ({err}); nothing was written.") from err
        raise
    if fsync:
        fsync_dir(target.parent)


def write_bytes_atomic(data: bytes, path: str | os.PathLike, *, overwrite: bool = False, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path, overwrite=overwrite, fsync=fsync) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``text`` as UTF-8, exactly as given (no newline translation), atomically."""
    return write_bytes_atomic(text.encode("utf-8"), path, overwrite=overwrite)


def write_json_atomic(data: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``data`` as indented UTF-8 JSON with a final newline, atomically.

    numpy arrays and scalars are written as lists and numbers, paths as strings.
    """
    text = json.dumps(data, indent=2, default=_jsonable) + "\n"
    return write_text_atomic(text, path, overwrite=overwrite)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on a clean exit its files are fsync'ed and it replaces ``path``.

    An existing ``path`` is moved aside before the rename and deleted after it, so
    a crash leaves the old folder or the new one (plus a hidden leftover), never a mix.
    The parent folder is created if needed.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        OutputWriteError: the parent folder cannot be created or written.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as err:
        raise OutputWriteError(
            f"cannot write {target}: the folder {target.parent} cannot be created or does not accept new "
            f"files ({err.strerror or err}). Check its permissions, free space, or choose another folder."
        ) from err
    try:
        yield temp
        for file in temp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        os.chmod(temp, 0o755)  # mkdtemp makes it private
        _swap_dir(temp, target, overwrite=overwrite)
    except BaseException as err:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, MedsegError):
            raise OutputWriteError(f"writing {target} failed ({err}); nothing was written.") from err
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; best effort (some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- internals
def _create_temp(target: Path) -> Path:
    """Create the temporary file next to the target (this also proves the folder is writable)."""
    folder = target.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist; create it first"
        raise OutputWriteError(f"cannot write {target}: the folder {folder} {what}.")
    for _ in range(100):
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as err:
            raise OutputWriteError(
                f"cannot write {target}: the folder {folder} does not accept new files "
                f"({err.strerror or err}). Check its permissions, free space, or choose another folder."
            ) from err
        os.close(fd)
        return temp
    raise OutputWriteError(f"cannot write {target}: no free temporary name in {folder}; remove its .*.tmp files.")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _commit(temp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename the written temporary file into place (no-clobber unless ``overwrite``)."""
    if overwrite:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)  # fails if the target exists, even if it appeared meanwhile
    except FileExistsError as err:
        raise _exists(target) from err
    except OSError:  # no hard links on this file system
        if target.exists() or target.is_symlink():
            raise _exists(target) from None
        os.replace(temp, target)
    else:
        temp.unlink()


def _swap_dir(temp: Path, target: Path, *, overwrite: bool) -> None:
    old = None
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise _exists(target)
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.replace(target, old)
    try:
        os.replace(temp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the old folder back
        raise
    fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _exists(target: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it, or choose another name."
    )


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
