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

import os
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
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror or str(e), str(self.directory)) from e
            raise
        except Exception as e:  # orbax may wrap the OSError of a failed write
            cause = _os_error_in(e)
            if cause is None:
                raise
            raise OSError(
                cause.errno, cause.strerror or str(cause), cause.filename or str(self.directory)
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
    """Silences the reads a failed restore abandons (installed once, before a first restore).

    orbax restores on an asyncio loop that it closes as soon as one read fails; tensorstore
    still completes the other reads it had started, and each completion then tries to schedule
    a callback on the closed loop. Python reports every such attempt as an unraisable
    ``RuntimeError: Event loop is closed`` traceback on stderr, after the caller's one-line error
    (three of them for a truncated state file), and some may come before the error reaches
    the caller: hence before, not after, the restore. Only exactly those reports are dropped:
    that error, raised inside ``call_soon_threadsafe``; everything else reaches the previous
    hook.
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
        _late_reads_hook_installed = True


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


def _os_error_in(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def describe_error(e: BaseException) -> str:
    """One line for whatever a damaged checkpoint raised (type and first line, clipped)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__
