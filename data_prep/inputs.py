"""The SHA-256 of a prep's input files (``inputs.sha256``), and which inputs changed since.

A prep's fingerprint sees input names and sizes, not contents, so audio rewritten in place at
the same size (re-normalised, re-encoded to the same length) would keep its old features. A
finished prep therefore keeps each input's SHA-256 next to its metadata (``sha256sum`` format,
paths relative to the corpus root or the manifest folder: content only, so the output bytes
still depend only on the inputs), and a later run compares against it, reading only the files
modified after the prep: a corpus copied or touched since costs one read of those files and is
not refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

INPUTS_FILE = "inputs.sha256"

__all__ = ["INPUTS_FILE", "changed", "file_sha256", "write_digests"]


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_digests(out_dir: str, utterances: Iterable) -> None:
    """Writes ``INPUTS_FILE``: one line per scanned input that can be read (skipped ones
    included: a file fixed later changes the run too)."""
    lines = []
    for u in utterances:
        try:
            lines.append(f"{file_sha256(u.path)}  {u.rel_path}\n")
        except OSError:
            continue
    with open(os.path.join(out_dir, INPUTS_FILE), "w", encoding="utf-8") as f:
        f.writelines(lines)


def changed(out_dir: str, marker: str, inputs: Iterable[tuple[str, str]]) -> list[str]:
    """The inputs ((shown path, path) pairs) whose bytes differ from those recorded in
    ``out_dir``. Only files modified after ``marker`` (the prep's metadata.json) are hashed; a
    prep without ``INPUTS_FILE`` (made by an earlier version) is taken as is. Raises
    ``PermissionError`` when ``INPUTS_FILE`` or an input cannot be read by this user."""
    try:
        with open(os.path.join(out_dir, INPUTS_FILE), encoding="utf-8") as f:
            digests = dict(reversed(line.rstrip("\n").split("  ", 1)) for line in f if line.strip())
        since = os.stat(marker).st_mtime_ns
    except PermissionError:
        raise  # the check cannot be made: not the same as a prep without the file
    except (OSError, ValueError):
        return []
    out = []
    for shown, path in inputs:
        try:
            if os.stat(path).st_mtime_ns > since and file_sha256(path) != digests.get(shown):
                out.append(shown)
        except PermissionError:
            raise  # unreadable, not changed: the caller names the file
        except OSError:
            out.append(shown)
    return out
