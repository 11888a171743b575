"""Shared fixtures of the EVAL tests: one small experiment trained once per test session.

``shared_experiment`` runs ``dkd_jax.experiment`` on the conftest ``tiny_prep_dir`` (2 loso
folds, "tiny" preset, teacher + DKD student, global feature normalisation so that evaluation and
prediction must apply the stored training statistics). test_experiment.py and test_eval_run.py
both use it; it is built by whichever asks first and cached for the session.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

EXP_OVERRIDES = ("data.normalization=global",)
STUDENTS = ("dkd",)

_CACHE: dict[str, tuple[Path, dict, list]] = {}


def shared_spec(prep_dir: Path):
    """The spec of the session's tiny experiment: two LOSO folds, the tiny preset, STUDENTS."""
    from dkd_jax import experiment

    return experiment.make_spec(
        data=prep_dir,
        protocol="loso",
        folds=(0, 1),
        preset="tiny",
        students=STUDENTS,
        overrides=EXP_OVERRIDES,
    )


def shared_experiment(prep_dir: Path, tmp_path_factory) -> tuple[Path, dict, list]:
    """(experiment dir, summary, [(run key, status)]) of the session's tiny experiment."""
    key = str(prep_dir)
    if key not in _CACHE:
        from dkd_jax import experiment

        exp_dir = tmp_path_factory.getbasetemp() / "eval_shared_experiment"
        events: list = []
        summary = experiment.run_experiment(
            exp_dir,
            shared_spec(prep_dir),
            progress=False,
            quiet=True,
            on_run=lambda plan, status: events.append((plan.key, status)),
        )
        _CACHE[key] = (exp_dir, summary, events)
    return _CACHE[key]


def speaker_normalised_copy(run_path: Path, tmp_path: Path) -> Path:
    """A copy of a run with its normalisation switched to per-speaker (no stored speaker): the
    weights do not matter to which statistics normalise which windows."""
    import json
    import shutil

    from dkd_jax import run_dir

    copy = tmp_path / "speaker_run"
    shutil.copytree(run_path, copy)
    (copy / run_dir.NORMALIZATION_FILE).write_text(json.dumps({"mode": "speaker", "groups": {}}))
    config = json.loads((copy / run_dir.CONFIG_FILE).read_text())
    config["data"]["normalization"] = "speaker"  # the file and the config agree (restore_run)
    (copy / run_dir.CONFIG_FILE).write_text(json.dumps(config))
    return copy


@contextlib.contextmanager
def lock_held_elsewhere(workdir: Path, tool: str) -> Iterator[int]:
    """Another process holding ``run_dir.locked(workdir, tool)`` for the block (a training or
    a runner in it); yields that process's pid."""
    # What run_dir.locked does (an flock on RUN/.lock naming its holder), without importing
    # dkd_jax (and JAX: seconds per test): the code under test reads it as any holder's.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, json, os, platform, sys, time\n"
         "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT, 0o644)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, json.dumps({'tool': sys.argv[2], 'pid': os.getpid(), 'host': "
         "platform.node(), 'started': 'now'}).encode())\n"
         "print('held', flush=True); time.sleep(120)", str(workdir), tool],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
