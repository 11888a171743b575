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

__all__ = [
    "cpu_description",
    "device_info",
    "environment_differences",
    "git_commit",
    "package_versions",
    "provenance",
]

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


#: Instruction-set extensions that change which kernels XLA, oneDNN and onnxruntime pick.
_ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU's model name, family and model numbers, and vector extensions, e.g.
    ``"AMD EPYC, family 25 model 17 (avx avx2 fma avx512f avx512_bf16 avx512_vnni)"``.

    XLA:CPU compiles for the CPU it runs on and NumPy picks its code by the vector extensions,
    so float32 rounding (and timings) differ between machines that share a model name: a
    virtual machine may report only "AMD EPYC" for two generations. Falls back to
    ``platform.processor()`` / ``machine()`` where there is no cpuinfo.
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f", family {fields['cpu family']} model {fields['model']}"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    isa = [f for f in _ISA_FLAGS if f in flags]
    return f"{name} ({' '.join(isa)})" if isa else name


def device_info() -> dict[str, Any]:
    """The JAX backend, device kind and device counts of this process, and the host's CPU
    (:func:`cpu_description`)."""
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
        "cpu": cpu_description(),
    }


def environment_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two :func:`provenance` records that can change a run's bits: the
    package versions, the device platform, kind and count, the CPU, the git commit and
    uncommitted changes. One line each, e.g. ``"jax 0.10.2 -> 0.11.2"``; a CPU the earlier
    record lacks (written by an older dkd-jax) is named as not recorded."""
    out = []
    pa, pb = before.get("packages") or {}, now.get("packages") or {}
    for name in sorted(set(pa) | set(pb)):
        if pa.get(name) != pb.get(name):
            out.append(f"{name} {pa.get(name)} -> {pb.get(name)}")
    da, db = before.get("device") or {}, now.get("device") or {}
    for key in ("platform", "device_kind", "device_count", "process_count"):
        if da.get(key) != db.get(key):
            out.append(f"{key} {da.get(key)} -> {db.get(key)}")
    if "cpu" not in da:
        out.append(f"CPU not recorded then (an older dkd-jax), now {db.get('cpu')}")
    elif da["cpu"] != db.get("cpu"):
        out.append(f"CPU {da['cpu']} -> {db.get('cpu')}")
    ga, gb = before.get("git") or {}, now.get("git") or {}
    if ga.get("commit") != gb.get("commit"):
        out.append(f"git commit {ga.get('commit')} -> {gb.get('commit')}")
    if ga.get("dirty") or gb.get("dirty"):
        out.append(
            f"uncommitted changes in the checkout {ga.get('dirty')} -> {gb.get('dirty')} (the "
            "code may differ from its commit)"
        )
    return out


def provenance() -> dict[str, Any]:
    """Everything that identifies the software and hardware behind a result."""
    return {"packages": package_versions(), "device": device_info(), "git": git_commit()}
