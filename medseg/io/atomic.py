"""Atomic writes: a reader (or a crash) sees the old file or the new one, never a torn one.

Every file medseg writes goes through here; :mod:`medseg.io.writers` adds its
NIfTI header check between writing and renaming. The steps:

1. Create a hidden temporary sibling in the target folder
   (``.<name>.<pid>-<random>.tmp``; same folder, so the rename cannot cross file
   systems; the writer's process id lets a later run tell a dead writer's
   leftover from a live one).
2. Write it, ``fsync`` it, give it the permissions of a normally created file
   (``0o666 & ~umask``, e.g. ``0644``; also when a library wrote it privately).
3. Rename it into place: ``os.replace`` when an existing file may be replaced,
   else ``os.link`` (which fails if the target appeared meanwhile; where hard
   links are unavailable, Linux ``renameat2(RENAME_NOREPLACE)``), then ``fsync``
   the folder.
4. Any error removes the temporary file; an ``OSError`` becomes an
   :class:`~medseg.errors.OutputWriteError` that names the target.

Folders (model folders, exports) are built the same way in a temporary sibling
folder and renamed into place by :func:`atomic_dir`. ``overwrite`` replaces an
existing folder only when it holds nothing but entries the new folder also
has: a folder with other contents is refused, never emptied.

Leftovers of a killed writer (``kill -9``, power loss) are removed by
:func:`clean_stale_temps`, which every atomic write runs once per process on
its target folder, and which ``medseg train`` runs on its run and fold folders.
:func:`refuse_output_over_inputs` keeps outputs off a command's inputs.

Example::

    write_json_atomic({"epoch": 3}, run_dir / "state.json", overwrite=True)
    with atomic_path(run_dir / "last.pt", overwrite=True) as tmp:
        torch.save(state, tmp)
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError, OutputExistsError, OutputWriteError

__all__ = [
    "STALE_TEMP_SECONDS",
    "atomic_dir",
    "atomic_path",
    "check_folder_replaceable",
    "clean_stale_temps",
    "dir_mode",
    "file_mode",
    "fsync_dir",
    "make_folder",
    "refuse_output_over_inputs",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

log = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 60.0
"""A temporary of a writer that is no longer running here is removed once it is this old (seconds)."""
_ORPHAN_SECONDS = 24 * 3600.0  # any medseg temporary this old is removed (writer on another host, reused pid)
_LEGACY_SECONDS = 3600.0  # names without a pid (medseg <= 0.1.0)

# medseg's own temporary names: files ".NAME.PID-HEX.tmp", folders ".NAME.PID-HEX.tmpdir", a replaced
# folder moved aside ".NAME.PID-HEX.old"; and the names of earlier versions (no pid)
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d{1,10})-[0-9a-f]{8}\.(?P<kind>tmp|tmpdir|old)$")
_LEGACY_NAMES = (
    (re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$"), "tmp"),
    (re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$"), "tmpdir"),
    (re.compile(r"^\.(?P<name>.+)\.old-[0-9a-f]{8}$"), "old"),
)
_cleaned: set[str] = set()  # folders already cleaned by this process

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it is renamed onto ``path``.

    The file gets mode ``0o666 & ~umask`` (as ``open(path, "w")`` would give a new file).

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
    _clean_once(target.parent)
    temp = _create_temp(target)
    try:
        yield temp
        if fsync:
            _fsync_file(temp)
        os.chmod(temp, file_mode())
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


def make_folder(path: str | os.PathLike, what: str) -> Path:
    """Create the output folder ``path`` (and its parents) if it is missing.

    Raises:
        OutputWriteError: it cannot be created, naming ``what`` (e.g. ``"run folder"``) and the path.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputWriteError(
            f"cannot create the {what} {path}: {err.strerror or err}; pass another -o/--output folder."
        ) from err
    return path


@contextmanager
def atomic_dir(
    path: str | os.PathLike, *, overwrite: bool = False, also_replaces: Iterable[str] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on a clean exit its files are fsync'ed and it replaces ``path``.

    Files get mode ``0o666 & ~umask`` and folders ``0o777 & ~umask``, whatever
    the library that wrote them chose. The parent folder is created if needed.

    With ``overwrite=True`` an existing folder is replaced only if every entry in
    it (recursively) is also in the new folder, i.e. it holds nothing but what
    this write produces again; anything else (a file the user put there, another
    run) makes it an :class:`OutputExistsError` and the folder is left as it is.
    ``also_replaces`` names further entries (relative paths) that the writer
    owns in that folder although this write does not produce them (an export of
    another format). A file or symbolic link at ``path`` is never replaced by a folder.

    The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux file systems that
    support it (ext4, xfs, btrfs, tmpfs): a reader sees the complete old or the
    complete new folder, never neither. Elsewhere the old folder is renamed
    aside (``.NAME.PID-HEX.old``), the new one renamed in, then the old one
    deleted; a crash between the two renames leaves the old folder aside, and
    the next write into the parent folder (:func:`clean_stale_temps`) renames
    it back.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False, or it holds
            entries this write does not produce.
        OutputWriteError: the parent folder cannot be created or written.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(target.parent)
        temp = _create_temp(target, kind="tmpdir")
    except OSError as err:
        if isinstance(err, MedsegError):
            raise
        raise OutputWriteError(
            f"cannot write {target}: the folder {target.parent} cannot be created or does not accept new "
            f"files ({err.strerror or err}). Check its permissions, free space, or choose another folder."
        ) from err
    try:
        yield temp
        for root, dirs, files in os.walk(temp):
            for name in files:
                file = Path(root, name)
                if not file.is_symlink():
                    _fsync_file(file)
                    os.chmod(file, file_mode())
            for name in dirs:
                if not Path(root, name).is_symlink():
                    os.chmod(Path(root, name), dir_mode())
        os.chmod(temp, dir_mode())
        _swap_dir(temp, target, overwrite=overwrite, also_replaces=also_replaces)
    except BaseException as err:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, MedsegError):
            raise OutputWriteError(f"writing {target} failed ({err}); nothing was written.") from err
        raise


def refuse_output_over_inputs(
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike],
    *,
    what: str = "output",
    around: bool = True,
) -> None:
    """Refuse an output path that is an input, lies inside one, or (``around``) holds one.

    Paths are compared after resolving symbolic links and ``..``; the output need
    not exist yet. Use it before anything is written.

    Args:
        output: the file or folder a command will write (or replace).
        inputs: ``{description: path}`` of everything the command reads,
            e.g. ``{"model folder": model_dir, "dataset folder": dataset_dir}``.
        what: how the message names the output (``"export folder"``, ``"run folder"``).
        around: also refuse an output folder that contains an input (True for an
            output that may be replaced as a whole; False for a folder that files
            are only added to).

    Raises:
        OutputExistsError: naming the output, the input and how they overlap.
    """
    out = Path(os.path.realpath(output))
    for label, path in inputs.items():
        source = Path(os.path.realpath(path))
        if out == source:
            relation = "is"
        elif out.is_relative_to(source):
            relation = "is inside"
        elif around and source.is_relative_to(out):
            relation = "contains"
        else:
            continue
        raise OutputExistsError(
            f"{what} {output} {relation} the {label} {path}: it would write onto the input; medseg never writes "
            f"over or into its inputs (not even with --overwrite). Choose another {what} outside {source}."
        )


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of killed medseg writes in ``folder``; return what was removed or restored.

    Only names that medseg's own atomic writes create are touched (see the module
    docstring): a temporary file or folder is removed when its writer's process
    is no longer running on this machine and it is older than
    :data:`STALE_TEMP_SECONDS`, or when it is older than a day. A folder that
    was moved aside to be replaced is renamed back if the folder it replaced is
    missing (the crash came between the two renames), and removed otherwise.
    Best effort: errors are ignored. Never raises.
    """
    folder = Path(folder)
    try:
        entries = sorted(os.scandir(folder), key=_mtime, reverse=True)  # newest first: restore the newest
    except OSError:
        return []
    done = []
    now = time.time()
    for entry in entries:
        parsed = _parse_temp_name(entry.name)
        if parsed is None:
            continue
        name, pid, kind = parsed
        try:
            info = entry.stat(follow_symlinks=False)
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if is_dir != (kind != "tmp") or entry.is_symlink():
            continue
        age = now - info.st_mtime
        if pid is None:
            stale = age > _LEGACY_SECONDS
        else:
            stale = age > _ORPHAN_SECONDS or (age > STALE_TEMP_SECONDS and not _pid_running(pid))
        if not stale:
            continue
        path = Path(entry.path)
        try:
            if kind == "old" and not os.path.lexists(folder / name):
                os.rename(path, folder / name)
                log.warning("restored %s, which an interrupted write had moved aside to %s", folder / name, path.name)
            elif is_dir:
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        done.append(path)
    if done:
        log.info("removed %d stale temporary file(s) of interrupted writes in %s", len(done), folder)
    return done


def file_mode() -> int:
    """The mode of a file medseg writes: ``0o666 & ~umask`` (``0o644`` with the usual umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode of a folder medseg writes: ``0o777 & ~umask``."""
    return 0o777 & ~_umask()


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
def _create_temp(target: Path, *, kind: str = "tmp") -> Path:
    """Create the temporary file (or folder, ``kind="tmpdir"``) next to the target (this also proves the folder is writable)."""
    folder = target.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist; create it first"
        raise OutputWriteError(f"cannot write {target}: the folder {folder} {what}.")
    for _ in range(100):
        temp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")
        try:
            if kind == "tmpdir":
                os.mkdir(temp, 0o700)
            else:
                os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as err:
            raise OutputWriteError(
                f"cannot write {target}: the folder {folder} does not accept new files "
                f"({err.strerror or err}). Check its permissions, free space, or choose another folder."
            ) from err
        return temp
    raise OutputWriteError(f"cannot write {target}: no free temporary name in {folder}; remove its .*.tmp files.")


def _clean_once(folder: Path) -> None:
    """:func:`clean_stale_temps` on ``folder`` the first time this process writes there."""
    key = os.path.realpath(folder)
    if key not in _cleaned and os.path.isdir(key):
        _cleaned.add(key)
        clean_stale_temps(folder)


def _parse_temp_name(name: str) -> tuple[str, int | None, str] | None:
    m = _TEMP_NAME.match(name)
    if m:
        return m.group("name"), int(m.group("pid")), m.group("kind")
    for pattern, kind in _LEGACY_NAMES:
        m = pattern.match(name)
        if m:
            return m.group("name"), None, kind
    return None


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or an odd number): keep its files
    except OSError:
        return True
    return True


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@functools.cache
def _libc_renameat2() -> Any:
    """glibc's ``renameat2`` (2.28+), or None (another system, musl, older glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the system or file system lacks it (or these flags)."""
    func = _libc_renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


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
        _rename_no_clobber(temp, target)
    else:
        temp.unlink()


def _rename_no_clobber(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target`` unless ``target`` exists, atomically where the system can."""
    try:
        if _renameat2(temp, target, _RENAME_NOREPLACE):
            return
    except FileExistsError as err:
        raise _exists(target) from err
    # no renameat2 here: check, then rename (a target created in between is replaced)
    if os.path.lexists(target):
        raise _exists(target)
    os.rename(temp, target)


def _swap_dir(temp: Path, target: Path, *, overwrite: bool, also_replaces: Iterable[str] = ()) -> None:
    """Put the built folder ``temp`` at ``target`` (see :func:`atomic_dir` for the guarantees)."""
    if not os.path.lexists(target):
        try:
            _rename_no_clobber(temp, target)
            fsync_dir(target.parent)
            return
        except OutputExistsError:
            if not overwrite:
                raise  # else: it appeared meanwhile; replace it below if it may be
    if not overwrite:
        raise _exists(target)
    _check_replaceable(target, temp, also_replaces)
    if _renameat2(temp, target, _RENAME_EXCHANGE):
        fsync_dir(target.parent)
        shutil.rmtree(temp, ignore_errors=True)  # temp now holds the old folder
        return
    old = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
    os.rename(target, old)
    try:
        os.rename(temp, target)
    except BaseException:
        os.rename(old, target)  # put the old folder back
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(target: Path, temp: Path, also_replaces: Iterable[str] = ()) -> None:
    """Refuse to replace ``target`` unless it holds only entries the new folder ``temp`` also has."""
    check_folder_replaceable(target, [*_entries(temp), *also_replaces])


def check_folder_replaceable(target: str | os.PathLike, owned: Iterable[str]) -> None:
    """Refuse to replace an existing ``target`` folder that holds entries other than ``owned`` (relative paths).

    :func:`atomic_dir` runs this just before its swap; a command may run it first
    to fail before its work. A missing ``target`` passes.

    Raises:
        OutputExistsError: ``target`` is a file or link, or holds other entries (a few are named).
    """
    target = Path(target)
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputExistsError(
            f"{target} exists and is a {'symbolic link' if target.is_symlink() else 'file'}, not a folder medseg "
            "wrote; it was left as it is. Remove it yourself or choose another name."
        )
    unrelated = sorted(_entries(target) - {Path(p).as_posix() for p in owned})
    if unrelated:
        shown = ", ".join(unrelated[:5]) + (f", ... (+{len(unrelated) - 5} more)" if len(unrelated) > 5 else "")
        raise OutputExistsError(
            f"{target} holds {len(unrelated)} entr{'y' if len(unrelated) == 1 else 'ies'} that this write does not "
            f"produce ({shown}); --overwrite replaces only the files medseg writes there, so the folder was left as "
            "it is. Move those entries elsewhere, or choose another folder."
        )


def _entries(folder: Path) -> set[str]:
    """Relative paths of everything under ``folder`` (symbolic links not followed)."""
    found = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found.update((rel / name).as_posix() for name in [*dirs, *files])
    return found


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
