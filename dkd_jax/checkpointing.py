"""A thin orbax wrapper: save and restore (state pytree, JSON meta) pairs by step.

Each orbax step directory holds two items: ``state`` (a ``TrainState``: step, params,
batch_stats, optimiser state, bad_step; never a frozen teacher) and ``meta`` (JSON: epoch, step,
best validation UA so far, metric accumulators). Saving is synchronous: a process killed (or a
disk that fills up) mid-save leaves orbax's temporary directory, which is ignored on restore,
so the last *complete* checkpoint is always the one that resumes.

Where the checkpoint directories of a run live, what happens with an unreadable one, and how a
run is restored for evaluation belong to ``run_dir``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "describe_error"]


class Checkpointer:
    """Saves and restores (state pytree, JSON meta) pairs under one directory.

    Args:
      directory: where the step directories go (created on first save).
      max_to_keep: how many of the most recent steps to keep.
      read_only: only restore (evaluation while training may still be writing).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            enable_async_checkpointing=False,
            # A reader must never delete the temporary directory of a save in progress.
            cleanup_tmp_directories=not read_only,
        )
        _drop_late_reads_into_closed_loops()  # and orbax's missing-metadata warnings
        if self.directory.is_dir():
            # Fails in one line (PermissionError naming the folder) where orbax's own listing,
            # in a cleanup thread when not read-only, would log tracebacks after the error.
            os.listdir(self.directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All complete steps, ascending."""
        return sorted(self._manager.all_steps())

    def reload(self) -> None:
        """Re-reads the directory (after step directories were moved by someone else)."""
        self._manager.reload()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` (a pytree of host or single-device arrays) and ``meta`` at ``step``;
        overwrites an existing checkpoint of the same step.

        Raises:
          OSError: the directory cannot be written (read-only, no space left, ...), with the
            path; the previous checkpoints are untouched.
        """
        if self.read_only:
            raise ValueError(f"{self.directory}: opened read-only")
        state = jax.device_get(state)
        if step in self._manager.all_steps():
            self._manager.delete(step)
        _drop_late_reads_into_closed_loops()
        with _orbax_errors_held() as held:
            try:
                self._manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
                    ),
                    force=True,
                )
                self._manager.wait_until_finished()
            except Exception as e:  # orbax wraps tensorstore's failed writes in a ValueError
                cause = _os_error_in(e)
                if cause is None:
                    raise
                held.drop()  # the OSError below says it; orbax logged it with tracebacks
                if isinstance(e, OSError) and e.filename is not None:
                    raise
                raise OSError(
                    cause.errno,
                    cause.strerror or str(cause),
                    cause.filename or str(self.directory),
                ) from e

    def restore(self, step: int | None = None, *, target: Any = None) -> tuple[Any, dict]:
        """Restores (state, meta) of ``step`` (default the latest).

        Args:
          step: which step; None = latest.
          target: a pytree of arrays or ShapeDtypeStructs with the saved structure (exact types
            come back); None restores nested dicts of numpy arrays.

        Raises:
          FileNotFoundError: no such checkpoint (the message lists the available steps).
          Exception: whatever orbax raises for an unreadable checkpoint (see
            :func:`describe_error`).
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{self.directory}: no checkpoints")
            step = steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}; have {steps}")
        if target is None:
            state_args = ocp.args.StandardRestore()
        else:
            state_args = ocp.args.StandardRestore(jax.tree.map(_abstract, target))
        _drop_late_reads_into_closed_loops()
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
        )
        meta = out["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"meta is {type(meta).__name__}, not a JSON object")
        return jax.device_get(out["state"]), dict(meta)

    def close(self) -> None:
        """Releases orbax resources."""
        self._manager.close()


def _drop_late_reads_into_closed_loops() -> None:
    """Silences the I/O a failed restore or save abandons (installed once, before the first).

    orbax reads and writes on an asyncio loop that it closes as soon as one operation fails;
    tensorstore still completes the others it had started, and each completion then tries to
    schedule a callback on the closed loop. Python reports every such attempt as an unraisable
    ``RuntimeError: Event loop is closed`` traceback on stderr, after the caller's one-line error
    (three of them for a truncated state file, more for a save on a full disk), and some may
    come before the error reaches the caller: hence before, not after, the operation. A failed
    write also leaves tasks whose error nobody retrieved, which asyncio logs ("Task exception
    was never retrieved", with a traceback) when they are collected, often at exit. Only
    exactly those reports are dropped: that RuntimeError raised inside
    ``call_soon_threadsafe``, and never-retrieved task errors raised in orbax that carry an OS
    error code (the save reported it as an ``OSError``); everything else is reported as before.
    Installed with it: :func:`_missing_metadata_filter`.
    """
    global _late_reads_hook_installed
    with _late_reads_lock:
        if _late_reads_hook_installed:
            return
        previous = sys.unraisablehook

        def hook(unraisable):
            if not _is_late_read(unraisable.exc_value, unraisable.exc_traceback):
                previous(unraisable)

        sys.unraisablehook = hook
        logging.getLogger("asyncio").addFilter(_abandoned_write_filter)
        logging.getLogger(_ORBAX_LOGGER).addFilter(_missing_metadata_filter)
        _late_reads_hook_installed = True


def _missing_metadata_filter(record: logging.LogRecord) -> bool:
    """False for orbax's "Metadata file does not exist" warning about a step folder without
    its metadata (a save still being written by a training process, or a folder this user may
    not read): the steps listed and the errors raised here say what matters, in one line."""
    return not (
        record.levelno == logging.WARNING
        and "orbax" in record.pathname
        and "Metadata file does not exist" in str(record.msg)
    )


def _abandoned_write_filter(record: logging.LogRecord) -> bool:
    """False for asyncio's report of an orbax write task whose OS error was never retrieved."""
    if not str(record.msg).startswith("Task exception was never retrieved"):
        return True
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or not _OS_ERROR_CODE.search(str(exc)):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return True


_late_reads_hook_installed = False
_late_reads_lock = threading.Lock()


def _is_late_read(exc: BaseException | None, tb) -> bool:
    if not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed":
        return False
    names = set()
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "call_soon_threadsafe" in names


def _abstract(x):
    x = np.asarray(x) if not isinstance(x, jax.ShapeDtypeStruct) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


def _os_error_in(e: BaseException) -> OSError | None:
    """The OS error behind a failed save: an ``OSError`` in the exception chain, or the
    ``[os_error_code='N']`` of a tensorstore error (a ``ValueError`` such as
    ``RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']``) as an
    ``OSError`` without a file name."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        code = _OS_ERROR_CODE.search(str(e))
        if code:
            number = int(code.group(1))
            return OSError(number, os.strerror(number))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class _HeldOrbaxErrors(logging.Filter):
    """Holds back the ERROR records that orbax's writer threads log (with a traceback each)
    while a save is in progress: when the save fails with an OS error, :meth:`Checkpointer.save`
    raises that error in one line and the held records are dropped; otherwise they are logged
    as they would have been. Shared by concurrent saves (``experiment --jobs``)."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.saves = 0
        self.records: list[logging.LogRecord] = []
        self.dropping = False

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_dkd_released", False):
            return True
        if record.levelno < logging.ERROR or "orbax" not in record.pathname:
            return True
        with self.lock:
            self.records.append(record)
        return False

    def drop(self) -> None:
        with self.lock:
            self.dropping = True


_HELD_ORBAX_ERRORS = _HeldOrbaxErrors()
_ORBAX_LOGGER = "absl"  # orbax logs through absl.logging, whose Python logger is "absl"


@contextlib.contextmanager
def _orbax_errors_held():
    held = _HELD_ORBAX_ERRORS
    logger = logging.getLogger(_ORBAX_LOGGER)
    with held.lock:
        if held.saves == 0:
            logger.addFilter(held)
        held.saves += 1
    try:
        yield held
    finally:
        with held.lock:
            held.saves -= 1
            if held.dropping:
                held.records.clear()
                held.dropping = False
            release = []
            if held.saves == 0:  # the last save out logs what no failed save accounted for
                release, held.records = held.records, []
                logger.removeFilter(held)
        for record in release:
            record._dkd_released = True
            logger.handle(record)


#: Where a tensorstore error's own text ends: its spec and source locations follow.
_TENSORSTORE_TAIL = re.compile(r" \[(?:os_error_code|tensorstore_spec|source locations)=")
#: The last absolute file path quoted in a tensorstore error chain, and what follows it:
#: ``... local file "/run/checkpoints/4/state/": Error reading Byte range [0, 205) of local file
#: "/run/checkpoints/4/state/d/ab12": Failed to open: "/run/checkpoints/4/state/d/ab12":
#: Permission denied`` names the chunk and "Permission denied".
_TENSORSTORE_FILE = re.compile(r'"(/[^"]*)": ')
_TENSORSTORE_STATUS = re.compile(r"^([A-Z_]+): ")
#: Characters of an error's first line (or of a tensorstore reason) that
#: :func:`describe_error` keeps.
_DESCRIBED_CHARS = 300


def describe_error(e: BaseException) -> str:
    """One line for whatever a damaged checkpoint raised: the type and the first line, or, for
    a tensorstore error, its status, the last file it names and what it says about that file
    (the whole chain, with its JSON spec, runs to thousands of characters and buries the file)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if not first:
        return type(e).__name__
    status = _TENSORSTORE_STATUS.match(first)
    if status:
        own = _TENSORSTORE_TAIL.split(first, maxsplit=1)[0]
        files = list(_TENSORSTORE_FILE.finditer(own))
        if files:
            reason = _clip(own[files[-1].end() :].strip())
            return f"{type(e).__name__}: {status.group(1)}: {files[-1].group(1)}: {reason}"
    return f"{type(e).__name__}: {_clip(first)}"


def _clip(text: str) -> str:
    return text if len(text) <= _DESCRIBED_CHARS else text[:_DESCRIBED_CHARS] + "..."


def permission_denied(e: BaseException) -> bool:
    """Whether a failed read or write was refused by the file's permissions (a
    ``PermissionError`` in the chain, or tensorstore's ``PERMISSION_DENIED`` / error code 13):
    the checkpoint is then intact, only not readable by this user."""
    cause = _os_error_in(e)
    if cause is not None and (
        isinstance(cause, PermissionError) or cause.errno in (errno.EACCES, errno.EPERM)
    ):
        return True
    return str(e).startswith("PERMISSION_DENIED")
