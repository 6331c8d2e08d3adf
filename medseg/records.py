"""Saved records: the checks shared by every versioned file medseg writes and reads back.

``plan.json``, ``fingerprint.json``, ``model.json``, the training checkpoint and the
preprocessing cache entries are dataclass records saved as plain data. Reading one back
goes through here: :func:`read_json` (the file, or a clear error), :func:`check_record`
(format version and unknown fields), :func:`field_problems` (missing fields and wrong
types, recursively), so a damaged or foreign file is refused with one message that names
it. :func:`json_safe` and :func:`file_sha256` serve the writing side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from medseg.errors import ConfigError, MedsegError

__all__ = ["check_record", "field_problems", "file_sha256", "json_safe", "match_type", "read_json", "type_name"]


def read_json(path: str | Path, error: type[MedsegError], what: str, remedy: str = "", *,
              max_bytes: int | None = None) -> Any:
    """The JSON value in ``path``, or ``error`` naming ``what``, ``path``, the reason and ``remedy``.

    Args:
        path: the file.
        error: the :class:`MedsegError` subclass to raise (the caller's domain).
        what: what the file is, e.g. ``"plan"``, ``"splits file"``.
        remedy: how to fix it, appended to the message.
        max_bytes: refuse larger files before reading them (a JSON record is never huge).
    """
    path = Path(path)
    tail = f" {remedy}" if remedy else ""
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise error(f"{what} {path} is larger than {max_bytes // 2**20} MiB; is it really a {what}?{tail}")
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(
            f"{what} {path} is unreadable: {path.name} is not valid JSON: {err.msg} at line {err.lineno}, "
            f"column {err.colno}.{tail}"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} is unreadable: {err}.{tail}") from err


def json_safe(value: Any) -> Any:
    """Plain JSON data from ``value``: NaN -> null, +-inf -> "inf"/"-inf", NumPy scalars, paths as strings."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (``OSError`` passes through)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def match_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether plain data ``value`` fits the annotation ``tp`` (ints widen to floats); ``(ok, converted)``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, converted = match_type(value, arg)
            if ok:
                return True, converted
        return False, None
    if tp is type(None):
        return value is None, None
    if origin is Literal:
        return value in args, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, None
        out = []
        for item in value:
            ok, converted = match_type(item, args[0])
            if not ok:
                return False, None
            out.append(converted)
        return True, out
    if origin is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else None
    return isinstance(value, tp), value


def type_name(tp: Any) -> str:
    """Readable name of an annotation for error messages (e.g. 'a list of integers or null')."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], type_name(args[0]))
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def field_problems(
    cls: type,
    data: Any,
    *,
    skip: set[str] = frozenset(),
    strict: bool = False,
    localns: dict[str, Any] | None = None,
) -> list[str]:
    """Problems of plain ``data`` as a record of dataclass ``cls``: missing required fields and wrong types.

    A field annotated with another dataclass is checked recursively (its problems are
    prefixed ``field.``). ``strict`` also reports fields ``cls`` does not declare;
    ``localns`` resolves annotations of names the record's module imports lazily
    (e.g. ``{"torch": torch}`` for ``torch.Tensor``). An empty list means ``cls(**data)``
    gets what it declares.
    """
    if not isinstance(data, dict):
        return [f"expected a mapping, got {_kind(data)}"]
    hints = typing.get_type_hints(cls, localns=localns)
    problems = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{f.name} is missing")
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(data[f.name], dict):
            problems += [f"{f.name}.{p}" for p in field_problems(tp, data[f.name], strict=strict, localns=localns)]
            continue
        ok, _ = match_type(data[f.name], tp)
        if not ok:
            problems.append(f"{f.name}={_short(data[f.name])} (expected {type_name(tp)})")
    if strict:
        known = {f.name for f in dataclasses.fields(cls)}
        problems += [f"{k} is not a known field" for k in sorted(set(data) - known, key=str)]
    return problems


def _kind(value: Any) -> str:
    """What a value is, for messages about records (a type name, never a huge repr)."""
    return "null" if value is None else type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a value, cut to ``limit`` characters (records may hold tensors or long lists)."""
    text = repr(value) if isinstance(value, (bool, int, float, str, type(None), list, dict)) else f"<{_kind(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_record(cls: type, data: dict[str, Any], *, version: int, what: str, remedy: str) -> None:
    """Refuse a saved record (plan.json, fingerprint.json) of another format version or with unknown fields.

    Raises:
        ConfigError: naming ``what``, the version found and expected, or the unknown fields, and ``remedy``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{what} is not a record: expected a JSON object, got {_kind(data)}. {remedy}")
    found = data.get("format_version")
    if found != version:
        raise ConfigError(f"{what} format_version {found!r} is not supported by this medseg (expects {version}); {remedy}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{what} has unknown fields {unknown}; it was made by another medseg version. {remedy}")
