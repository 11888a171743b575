"""The one way a benchmark reports: its JSON on stdout, and in a file only with ``--out``;
and the one way a benchmark reads an input shape (``--shape FREQxTIME``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def emit(report: Any, out: str | None) -> int:
    """Prints ``report`` as indented JSON; writes it to ``out`` too (parents created) when given.
    Returns 0, the benchmark's exit status."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return 0


def shape_arg(text: str) -> tuple[int, int]:
    """``argparse`` type of ``--shape``: ``"26x63"`` → ``(26, 63)``, both ≥ 16 (the network's
    smallest input is smaller, but the benchmarks time realistic maps)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
        if len(shape) == 2 and min(shape) >= 16:
            return shape
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected FREQxTIME with both >= 16, got {text!r}")
