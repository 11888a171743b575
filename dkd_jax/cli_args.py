"""Argument types and signal handling shared by the command lines (``train.py``, ``eval.py``,
``python -m dkd_jax.experiment``).

Imports nothing but the standard library: ``eval.py predict --model`` builds its parser with
these and must not import JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import threading


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1, or a one-line usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """An ``argparse`` type: a finite number >= 0, or a one-line usage error naming the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``scancel``, preemption, ``timeout``, ``docker stop``): the command
    stops as on Ctrl-C, releasing its workdir lock and keeping its last checkpoint, and exits
    with 143 (128 + SIGTERM) after saying how to resume."""

    exit_status = 128 + signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (a second
    SIGTERM ends the process at once). Without it the process died in silence with exit 143,
    leaving its lock file behind: a job requeued on another host was refused until someone
    deleted it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:  # None: a handler set outside Python (JAX's preemption notifier), not restorable
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def stopped_message(error: KeyboardInterrupt) -> tuple[str, int]:
    """("interrupted" or "terminated (SIGTERM)", the exit status) for a stopped command."""
    if isinstance(error, Terminated):
        return "terminated (SIGTERM)", Terminated.exit_status
    return "interrupted", 130
