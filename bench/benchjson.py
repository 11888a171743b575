"""The one way a benchmark reports: its JSON on stdout, and in a file only with ``--out``."""

from __future__ import annotations

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
