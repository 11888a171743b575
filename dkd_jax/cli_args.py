"""Argument types shared by the command lines (``train.py``, ``eval.py``).

Imports nothing but the standard library: ``eval.py predict --model`` builds its parser with
these and must not import JAX.
"""

from __future__ import annotations

import argparse
import math


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
