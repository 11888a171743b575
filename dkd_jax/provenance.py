"""Provenance: what produced a number (package versions, device, git commit, Python).

``eval_lib`` puts :func:`provenance` into every ``results.json`` and the experiment runner into
``reproduce.json``, so a result can be traced to the software and hardware behind it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["device_info", "git_commit", "package_versions", "provenance"]

# Distributions whose versions go into results.json (missing ones are recorded as None).
_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "librosa",
    "soundfile",
    "tensorflow-datasets",
    "matplotlib",
)


def git_commit(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The git commit of the checkout at ``path``, and whether its tree differs from it.

    ``dirty`` is True when tracked files are modified or files that are not ignored are
    untracked (the code that ran may not be the commit's).

    Returns None when ``path`` (default: this package's directory) is not in a git checkout or git
    is unavailable.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain"],  # untracked (not ignored) files count too
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {
        "commit": commit.stdout.strip(),
        "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
    }


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that determine the numbers (None if not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    from dkd_jax import __version__

    versions["dkd_jax"] = __version__
    return versions


def device_info() -> dict[str, Any]:
    """The JAX backend, device kind and device counts of this process."""
    import jax

    devices = jax.local_devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "local_device_count": len(devices),
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "host": platform.node(),
        "machine": platform.machine(),
    }


def provenance() -> dict[str, Any]:
    """Everything that identifies the software and hardware behind a result."""
    return {"packages": package_versions(), "device": device_info(), "git": git_commit()}
