"""The one way a benchmark reports: its JSON on stdout, and in a file only with ``--out``;
and the one way a benchmark reads an input shape (``--shape FREQxTIME``)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any


def out_problem(out: str | None) -> str | None:
    """Why ``--out`` could not be written (None: it can), checked before a benchmark runs: a
    run of minutes or hours used to end in a traceback at its last line, its numbers lost."""
    if not out:
        return None
    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        return f"--out {out}: is a folder, not a file"
    if path.exists() and not os.access(path, os.W_OK):
        return f"--out {out}: cannot write it (read-only)"
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        return f"--out {out}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: cannot write into {parent}"
    return None


def check_out(parser: argparse.ArgumentParser, out: str | None) -> None:
    """``parser.error`` (exit 2, one line) when :func:`out_problem` finds one."""
    problem = out_problem(out)
    if problem:
        parser.error(problem)


def command_line(script: str, argv: list[str] | None) -> str:
    """``python bench/SCRIPT ARGS``: the command a JSON file records (``argv`` None: this
    process's own arguments)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"bench/{script}", *(shlex.quote(a) for a in args)])


def emit(report: Any, out: str | None, *, command: str | None = None) -> int:
    """Prints ``report`` as indented JSON; writes it to ``out`` too (parents created) when given.
    ``command`` (:func:`command_line`) is recorded as ``report["command"]`` unless the report
    has one, and the load average at the end as ``loadavg_at_end`` unless it has one. Returns 0,
    the benchmark's exit status."""
    if isinstance(report, dict):
        if command is not None:
            report.setdefault("command", command)
        report.setdefault("loadavg_at_end", list(os.getloadavg()))
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


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, family and model, and its vector extensions
    (``dkd_jax.provenance.cpu_description``, also in every results.json): machines of one kind
    differ, and timings and float32 rounding with them."""
    from dkd_jax import provenance

    return provenance.cpu_description(cpuinfo)
