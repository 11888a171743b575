"""Atomic files, JSON conversion, and the one-line form of an OS error (used by ``run_dir``,
the experiment runner, data_prep and the CLIs; no JAX, so the deploy path can use it too).

Every JSON file of a run or an experiment is written to a temporary file in the same directory
and renamed over the old one, so a process killed mid-write leaves the previous version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_json", "read_json_object", "to_jsonable", "write_json", "write_text"]


class JSONFileError(ValueError):
    """A JSON file that is missing or unreadable (the message names it)."""


def to_jsonable(obj: Any) -> Any:
    """Converts numpy scalars/arrays, paths, dataclasses and non-finite floats for ``json``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why a new file cannot be created in ``folder`` (its ``strerror``), None when one can.
    It tries: ``os.access`` says "Permission denied" on a read-only mount and checks the real
    user. The probe is an unnamed file where the OS has them (Linux: nothing left behind, even
    if the process dies)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".write_test"):
            return None
    except OSError as e:
        return e.strerror or str(e)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Makes ``path`` with ``write(temporary path)`` in the same directory, then a rename: a
    reader sees the old file or the whole new one, never a part (a full disk leaves no empty
    file behind). An error names the file meant (or its folder, when no file can be made
    there), not the temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename not in (None, str(tmp)):
            raise
        where = path.parent if isinstance(e, PermissionError) and unwritable(path.parent) else path
        raise type(e)(e.errno, e.strerror or str(e), str(where)) from None
    finally:
        with contextlib.suppress(OSError):  # a folder it may not search: the error above says
            tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """Writes ``obj`` as JSON atomically (numpy, paths, NaN → null handled)."""
    return write_text(path, json.dumps(to_jsonable(obj), indent=indent, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Reads a JSON file; JSONFileError naming it when it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise JSONFileError(f"{path}: missing {what}") from None
    except json.JSONDecodeError as e:
        raise JSONFileError(f"{path}: unreadable {what} ({e})") from None


def read_json_object(path: str | os.PathLike, *, hint: str = "") -> dict[str, Any]:
    """An existing JSON file that must hold an object; JSONFileError ``PATH: problem`` (plus
    ``; hint``) when it is not UTF-8, not JSON, or not an object."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{path}: not UTF-8 text (byte {e.start}){suffix}") from None
    except json.JSONDecodeError as e:
        raise JSONFileError(f"{path}: not valid JSON ({e}){suffix}") from None
    if not isinstance(obj, dict):
        raise JSONFileError(f"{path}: not a JSON object{suffix}")
    return obj


def describe_os_error(e: OSError) -> str:
    """``PATH: reason`` of an OSError (``PATH -> PATH2: reason`` for a rename; its message when
    it names no path)."""
    reason = e.strerror or str(e)
    if e.filename is None:
        return reason
    where = os.fspath(e.filename)
    if getattr(e, "filename2", None):
        where += f" -> {os.fspath(e.filename2)}"
    return f"{where}: {reason}"
