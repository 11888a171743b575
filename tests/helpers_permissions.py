"""Files this user may not read, simulated: chmod cannot stop root (the tests often run as root),
so a module's ``open`` (or ``os.listdir``) is replaced by one that raises the ``PermissionError``
the kernel would give for the chosen paths and behaves normally for every other path.

``tests/test_run_dir.py::test_read_only_workdir_as_an_unprivileged_user`` runs a real command as
an unprivileged user where the machine allows it; the simulation covers the rest everywhere.
"""

from __future__ import annotations

import builtins
import errno
import os


def permission_error(path) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))


def deny_open(monkeypatch, module, *paths) -> None:
    """``open`` in ``module`` raises ``PermissionError`` for ``paths`` (any mode)."""
    denied = {os.path.abspath(p) for p in paths}
    real = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and os.path.abspath(file) in denied:
            raise permission_error(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", guarded, raising=False)


def deny_listdir(monkeypatch, *folders) -> None:
    """``os.listdir`` raises ``PermissionError`` for ``folders`` (a folder of mode 311)."""
    denied = {os.path.abspath(p) for p in folders}
    real = os.listdir

    def guarded(path="."):
        if os.path.abspath(path) in denied:
            raise permission_error(path)
        return real(path)

    monkeypatch.setattr(os, "listdir", guarded)


def deny_path_reads(monkeypatch, *paths) -> None:
    """``Path.read_bytes`` / ``Path.read_text`` raise ``PermissionError`` for ``paths``."""
    import pathlib

    denied = {os.path.abspath(p) for p in paths}
    for name in ("read_bytes", "read_text"):
        real = getattr(pathlib.Path, name)

        def guarded(self, *args, _real=real, **kwargs):
            if os.path.abspath(self) in denied:
                raise permission_error(self)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, name, guarded)
