"""The run directory: every file of a training workdir, its readers and writers, and its lock.

One module owns the layout, so that no other module spells a file name::

    RUN/.lock                   held while a process trains or writes (see :func:`locked`)
    RUN/config.json             the resolved config (written once a run starts)
    RUN/split.json              the utterance lists and the data it was made from
    RUN/normalization.json      the feature normalisation applied to every input
    RUN/teacher.json            students: which teacher (workdir, step, mode)
    RUN/metrics.jsonl           one JSON record per event (start, train, epoch, eval, final)
    RUN/tensorboard/            the same scalars for TensorBoard
    RUN/checkpoints/<step>/     the last K training states (orbax, see ``checkpointing``)
    RUN/checkpoints_best/<step>/  the state with the best validation UA
    RUN/checkpoints_damaged/    unreadable checkpoints moved aside on resume (never deleted)
    RUN/results.json            scores of the evaluated checkpoint (``eval_lib``)
    RUN/utterance_scores.csv    one row per held-out utterance
    RUN/confusion.png           the confusion matrix

Every JSON file is written atomically (a temporary file renamed over the old one), so a process
killed mid-write leaves the previous version. ``metrics.jsonl`` is append-only; a line cut by a
kill is skipped by :func:`read_metrics`, the one reader of that file.

Errors are one line: :class:`RunDirError` (and its subclasses) name the file or directory and
what to do. OS errors (read-only workdir, permission denied, no space left) propagate as
``OSError`` with the path, and the command lines print them as ``<tool>: error: PATH: reason``
(``jsonio.describe_os_error``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dkd_jax import checkpointing, jsonio, protocols
from dkd_jax import config as config_lib

__all__ = [
    "CheckpointError",
    "MetricsWriter",
    "RestoredRun",
    "RunDirError",
    "WorkdirError",
    "WorkdirLockedError",
    "config_changes",
    "format_changes",
    "locked",
    "prepare_workdir",
    "read_metrics",
    "restore_run",
]

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
NORMALIZATION_FILE = "normalization.json"
TEACHER_FILE = "teacher.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
SCORES_FILE = "utterance_scores.csv"
CONFUSION_FILE = "confusion.png"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
DAMAGED_DIR = "checkpoints_damaged"
LOCK_FILE = ".lock"

# What a new run (or --overwrite) clears; results go too, so they never describe another run.
_RUN_FILES = (
    CONFIG_FILE,
    SPLIT_FILE,
    NORMALIZATION_FILE,
    TEACHER_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    SCORES_FILE,
    CONFUSION_FILE,
)
_RUN_DIRS = (CHECKPOINT_DIR, BEST_DIR, TENSORBOARD_DIR)
EXPORT_CARD_FILE = "model.json"  # export.CARD_FILE (export imports this module; tested equal)

RESUME_COMPATIBLE = frozenset(
    {
        "data.prep_dir",
        "data.eval_batch_size",
        "train.progress",
        "train.log_every_steps",
        "train.checkpoint_every_steps",
        "train.keep_checkpoints",
        "train.compilation_cache_dir",
        "train.debug_abort_after_steps",
        "train.num_devices",
    }
)
"""Config fields that may change between a run and its resumption."""


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (one line naming the path)."""


class WorkdirError(RunDirError):
    """The workdir holds a different run, or is unusable."""


class WorkdirLockedError(WorkdirError):
    """Another live process holds the workdir's lock."""


class CheckpointError(RunDirError):
    """No readable checkpoint where one is needed."""


def _read_json(path: Path, *, what: str) -> Any:
    try:
        return jsonio.read_json(path, what=what)
    except jsonio.JSONFileError as e:
        raise RunDirError(str(e)) from None


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: re-entrant within this process


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, /proc), to detect a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_text(holder: Mapping[str, Any]) -> str:
    """ "train.py (pid N on host H, started T)" for a lock record (:func:`lock_holder`)."""
    return (
        f"{holder.get('tool', 'a process')} (pid {holder.get('pid')} on host "
        f"{holder.get('host')}, started {holder.get('started')})"
    )


_PROBE_RETRIES = 20  # x 10 ms: outlasts a lock_holder probe (a shared flock held for microseconds)


def _acquire(path: Path, tool: str) -> int:
    import fcntl

    tries = 0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            tries += 1
            if tries < _PROBE_RETRIES:  # perhaps only lock_holder looking: try again shortly
                time.sleep(0.01)
                continue
            raise WorkdirLockedError(
                f"{path.parent}: in use by {holder_text(holder)}; wait for it to finish or "
                "stop it, or use another workdir"
            ) from None
        try:  # the file may have been removed by its last holder between open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    holder = _read_holder(fd)
    if holder and holder.get("pid") != os.getpid():
        if holder.get("host") != platform.node():  # its process cannot be checked from here
            os.close(fd)
            raise WorkdirLockedError(
                f"{path.parent}: locked by {holder_text(holder)} on another host; if that "
                f"process has ended, delete {path} and rerun"
            )
        print(
            f"warning: {path.parent}: taking over the lock of {holder_text(holder)}, "
            "which is no longer running",
            file=sys.stderr,
        )
    me = {
        "tool": tool,
        "pid": os.getpid(),
        "host": platform.node(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "proc_start": _proc_start(os.getpid()),
        "argv": sys.argv,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 65536, 0)
        holder = json.loads(data.decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holder(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds the workdir's lock now (its record: tool, pid, host, started), or None when
    nobody does or this process does. Looks without waiting and without taking it."""
    import fcntl

    path = (Path(workdir) / LOCK_FILE).absolute()
    if str(path) in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file (or not readable): nobody to name
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {"tool": "a process"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def release_held_locks() -> None:
    """Removes every lock file this process holds, before it exits without unwinding (the
    experiment runner's ``os._exit`` on Ctrl-C or SIGTERM leaves the runs of its other threads
    mid-block: their lock files, naming this host, would refuse a job requeued elsewhere)."""
    for key in list(_HELD):
        _release(key)


def _release(key: str) -> None:
    """Empties and removes a held lock file, then closes it (once: a second call does nothing)."""
    held = _HELD.pop(key, None)
    if held is None:
        return
    fd = held[0]
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.unlink(key)
    os.close(fd)


@contextlib.contextmanager
def locked(workdir: str | os.PathLike, tool: str, *, enabled: bool = True) -> Iterator[None]:
    """Holds the workdir's lock for the duration of the block (creating the workdir).

    The lock is an ``flock`` on ``RUN/.lock``, whose content names the holder (tool, host, pid,
    start time). A second process is refused with :class:`WorkdirLockedError` naming the
    holder. A lock file left by a process that died (the kernel released its flock) is taken
    over with a warning; one naming another host is refused (its holder cannot be checked from
    here) and the message says which file to delete. Re-entrant within a process (the
    experiment runner holds a run's lock while training and evaluation take it again).

    Args:
      workdir: the run directory.
      tool: who holds it (shown to the refused process), e.g. "train.py".
      enabled: False makes this a no-op (processes other than 0 of a multi-host run).

    Raises:
      WorkdirLockedError: the workdir is in use.
      OSError: the workdir cannot be created or written (read-only, full, permissions).
    """
    if not enabled:
        yield
        return
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"{workdir}: exists and is not a directory")
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    path = (workdir / LOCK_FILE).absolute()
    key = str(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    fd = _acquire(path, tool)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        _release(key)  # (a no-op when release_held_locks did it already)
        if created:  # e.g. a bad --config.data.fold refused before any file: leave no empty dir
            with contextlib.suppress(OSError):
                workdir.rmdir()  # only when empty


# --------------------------------------------------------------------------------------------
# Config, split, normalisation, teacher
# --------------------------------------------------------------------------------------------


def load_config(workdir: str | os.PathLike) -> config_lib.Config:
    """The resolved config of a workdir (RunDirError naming the file when missing or bad)."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        if (Path(workdir) / EXPORT_CARD_FILE).is_file():
            raise RunDirError(
                f"{path}: missing ({workdir} is an exported folder, not a training run: "
                f"`eval.py predict --model {workdir}` predicts with it)"
            )
        raise RunDirError(f"{path}: missing (not a training workdir, or the run never started)")
    try:
        return config_lib.loads(path.read_text(), source=str(path))
    except config_lib.ConfigError as e:
        raise RunDirError(str(e)) from None


def write_config(workdir: str | os.PathLike, cfg: config_lib.Config) -> Path:
    """Writes ``config.json``."""
    return jsonio.write_text(Path(workdir) / CONFIG_FILE, config_lib.dumps(cfg))


def prepare_workdir(
    workdir: str | os.PathLike, cfg: config_lib.Config, *, overwrite: bool, clear: bool = True
) -> bool:
    """Checks a workdir before training: True when it holds this run to resume.

    A workdir with a ``config.json`` of another config (apart from the
    :data:`RESUME_COMPATIBLE` fields) is refused; with ``overwrite`` its run files are deleted
    first (only when ``clear``: process 0 of a multi-host run). Checkpoints without a config
    are refused too (whose would they be?), and so is a folder holding files that are not a
    run's (hidden ones aside) unless ``overwrite``: the run's files would land among them.

    Raises:
      WorkdirError: the workdir holds another run, or other files.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"{workdir}: exists and is not a directory")
    cfg_path = workdir / CONFIG_FILE
    if overwrite or (not cfg_path.exists() and (workdir / CHECKPOINT_DIR).exists()):
        foreign = _foreign_run_names(workdir)
        if foreign:  # --overwrite deletes a run's names: not another project's files of them
            raise WorkdirError(
                f"{workdir}: {'; '.join(foreign)}: not a dkd-jax run's, and --overwrite would "
                "delete it; use another --workdir"
            )
    if overwrite:
        if clear:
            clear_run(workdir)
        return False
    if cfg_path.exists():
        changed = config_changes(workdir, cfg)
        if changed:
            raise WorkdirError(
                f"{workdir} holds a run with a different config ({format_changes(changed)}); "
                "use another --workdir, or --overwrite to replace it"
            )
        return True
    if (workdir / CHECKPOINT_DIR).exists():
        raise WorkdirError(
            f"{workdir} has checkpoints but no config.json; use --overwrite to replace them"
        )
    run_names = {*_RUN_FILES, *_RUN_DIRS, DAMAGED_DIR}
    foreign = sorted(
        name
        for name in (os.listdir(workdir) if workdir.is_dir() else [])
        if name not in run_names and not name.startswith(".")  # .lock, .DS_Store, ...
    )
    if foreign:  # e.g. --workdir . in a source tree: the run's files would land among them
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise WorkdirError(
            f"{workdir} is not empty and holds no run ({listed}); use a new or empty "
            "--workdir, or --overwrite to train there anyway (files that are not a run's are kept)"
        )
    return False


_CONFIG_SECTIONS = frozenset(f.name for f in dataclasses.fields(config_lib.Config))


def _foreign_run_names(workdir: Path) -> list[str]:
    """What in ``workdir`` carries a run's name but was not written by a run (another ML
    project's ``checkpoints/resnet/`` or ``config.json``): ``--overwrite`` must not delete it."""
    out = []
    for name in (CHECKPOINT_DIR, BEST_DIR):
        folder = workdir / name
        if folder.is_dir() and not folder.is_symlink():
            # orbax writes step folders (``15``, and ``15.orbax-checkpoint-tmp-…`` while saving)
            other = sorted(
                p.name for p in folder.iterdir() if not (p.name[:1].isdigit() or p.name[:1] == ".")
            )
            if other:
                shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
                out.append(f"{name}/ holds {shown}")
    path = workdir / CONFIG_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None  # unreadable or damaged: judged by config_changes
        if stored is not None and not (
            isinstance(stored, dict) and (not stored or _CONFIG_SECTIONS & set(stored))
        ):
            out.append(f"{CONFIG_FILE} holds none of a run config's sections")
    return out


def config_changes(workdir: str | os.PathLike, cfg: config_lib.Config) -> dict[str, tuple]:
    """{field: (stored, new)} for each field, apart from the :data:`RESUME_COMPATIBLE` ones, in
    which ``workdir``'s ``config.json`` differs from ``cfg`` (empty when it has none).

    Raises:
      WorkdirError: the stored ``config.json`` cannot be read as a config.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        old = config_lib.loads(path.read_text(), source=str(path))
    except config_lib.ConfigError as e:
        raise WorkdirError(f"{e}; use --overwrite to start a new run there") from None
    return {k: v for k, v in config_lib.diff(old, cfg).items() if k not in RESUME_COMPATIBLE}


def format_changes(changed: Mapping[str, tuple]) -> str:
    """``"a.b: 1 -> 2, c.d: 'x' -> 'y'"`` for :func:`config_changes` output (sorted)."""
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))


def clear_run(workdir: str | os.PathLike) -> None:
    """Deletes a run's files (``--overwrite``); other files in the directory are kept.

    Raises:
      OSError: a file or folder of the run cannot be deleted (permissions), naming it: a run
        left half cleared must not be trained into as if it were empty.
    """
    workdir = Path(workdir)
    for name in _RUN_FILES:
        (workdir / name).unlink(missing_ok=True)
    for name in _RUN_DIRS:
        remove_tree(workdir / name)


class _RemoveFailed(Exception):
    """Carries the first failure of :func:`remove_tree` out of ``shutil.rmtree`` (an
    ``OSError`` raised in its handler would be caught and renamed by rmtree itself, 3.13)."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


def remove_tree(path: str | os.PathLike) -> None:
    """``shutil.rmtree`` of ``path`` if it exists (a symbolic link: the link, not its target);
    an ``OSError`` names the full path of what could not be deleted (shutil's own names only
    the last component)."""

    def fail(function, name, error):
        if isinstance(error, FileNotFoundError):
            return
        raise _RemoveFailed(type(error)(error.errno, error.strerror or str(error), name))

    if os.path.islink(path):
        os.unlink(path)
        return
    if not os.path.lexists(path):
        return
    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=fail)
        else:
            shutil.rmtree(path, onerror=lambda function, name, info: fail(function, name, info[1]))
    except _RemoveFailed as e:
        raise e.error from None


def write_split(workdir: str | os.PathLike, split: protocols.Split, data_info: Mapping) -> Path:
    """Writes ``split.json``: the split plus ``data_info`` (content hash, features, labels)."""
    payload = {**split.to_dict(), "data": dict(data_info)}
    return jsonio.write_text(
        Path(workdir) / SPLIT_FILE, json.dumps(payload, indent=1, sort_keys=True) + "\n"
    )


def load_split(workdir: str | os.PathLike) -> tuple[protocols.Split, dict[str, Any]]:
    """Reads ``split.json`` → (Split, data_info); RunDirError naming the file when unreadable."""
    path = Path(workdir) / SPLIT_FILE
    d = _read_json(path, what="split file (is this a training workdir?)")
    try:
        return protocols.Split.from_dict(d), dict(d.get("data", {}))
    except (KeyError, TypeError, AttributeError) as e:
        raise RunDirError(f"{path}: unreadable split file ({e!r})") from None


def write_normalization(workdir: str | os.PathLike, normalization: Mapping) -> Path:
    """Writes ``normalization.json`` (the statistics every input of the run is normalised by)."""
    return jsonio.write_text(Path(workdir) / NORMALIZATION_FILE, json.dumps(normalization) + "\n")


def normalization_problem(
    normalization: Any, *, mode: str | None = None, num_bins: int | None = None
) -> str | None:
    """What makes a stored normalisation unusable (None when nothing does). Pure.

    Checks that it is an object whose ``mode`` is ``mode`` (what the run's config says, when
    given), and that every stored pair of statistics (the "global" ones, each training speaker's
    with "speaker") holds one finite mean and one finite, positive std per band: ``num_bins``
    bands when given. ("utterance" stores none: each input's own statistics are used.)
    """
    if not isinstance(normalization, Mapping):
        return "not a JSON object"
    stored = normalization.get("mode")
    if mode is not None and stored != mode:
        return f"mode {stored!r}, but the run's config.json says data.normalization={mode!r}"
    if stored == "global":
        stats: Mapping[str, Any] = {"": normalization}
    elif stored == "speaker":
        stats = normalization.get("groups")
        if not isinstance(stats, Mapping):
            return "mode 'speaker' without the training speakers' statistics ('groups')"
    else:
        return None
    for name, entry in stats.items():
        where = f"speaker {name!r}: " if name else ""
        if not isinstance(entry, Mapping):
            return f"{where}not an object"
        bands = num_bins
        for key in ("mean", "std"):
            try:
                values = np.asarray(entry[key], np.float64)
            except KeyError:
                return f"{where}no {key!r}"
            except (TypeError, ValueError):
                return f"{where}{key!r} is not a list of numbers"
            bands = values.size if bands is None else bands
            if values.shape != (bands,) or bands == 0:
                return f"{where}{key!r} has shape {list(values.shape)}, expected [{bands}] (bands)"
            if not np.isfinite(values).all() or (key == "std" and (values <= 0).any()):
                what = "finite" if key == "mean" else "finite and positive"
                return f"{where}{key!r} holds values that are not {what}"
    return None


def load_normalization(
    workdir: str | os.PathLike, *, mode: str | None = None, num_bins: int | None = None
) -> dict[str, Any]:
    """The run's normalisation (``normalization.json``), checked by :func:`normalization_problem`.

    ``mode``: what the run's config says. A missing file means "none" only when the config
    says so (or ``mode`` is not given); a run trained with normalisation cannot be scored
    without its statistics, so RunDirError names the file instead, as it does for a
    file that is unreadable or fails the checks.
    """
    path = Path(workdir) / NORMALIZATION_FILE
    if not path.exists():
        if mode in (None, "none"):
            return {"mode": "none"}
        raise RunDirError(
            f"{path}: missing, but the run's config.json says data.normalization={mode!r}; "
            "without the training statistics every input would be scored unnormalised "
            "(restore the file, or retrain the run)"
        )
    normalization = _read_json(path, what="normalisation file")
    problem = normalization_problem(normalization, mode=mode, num_bins=num_bins)
    if problem:
        raise RunDirError(f"{path}: {problem} (restore the file, or retrain the run)")
    return normalization


def write_teacher(workdir: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Writes ``teacher.json`` (a student's teacher: workdir, step, weights digest, model,
    mode)."""
    return jsonio.write_json(Path(workdir) / TEACHER_FILE, dict(record))


def variables_digest(variables: Mapping[str, Any]) -> str:
    """``sha256:`` of a model's variables (every array's path, dtype, shape and bytes): who a
    teacher is, wherever its folder lies and whatever version wrote its files."""
    import jax

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        array = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}\n".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return "sha256:" + h.hexdigest()


def load_teacher(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """A student's ``teacher.json`` (None when it has none: a teacher, a CE student, or a run
    killed before its first write)."""
    path = Path(workdir) / TEACHER_FILE
    if not path.exists():
        return None
    record = _read_json(path, what="teacher record")
    if not isinstance(record, dict):
        raise RunDirError(f"{path}: not a JSON object")
    return record


# --------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard
# --------------------------------------------------------------------------------------------


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` ([] when missing); a line cut by a killed run
    (or anything else that is not a JSON object) is skipped."""
    path = Path(workdir) / METRICS_FILE
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _why_none(workdir: Path, best: bool) -> str:
    """Why a run's checkpoint folder holds no checkpoint, and what to do."""
    damaged = workdir / DAMAGED_DIR
    if damaged.is_dir() and any(damaged.iterdir()):
        return f"the damaged ones were moved to {damaged}; retrain with --overwrite"
    holder = lock_holder(workdir)
    if holder:
        return f"{holder_text(holder)} is training it and has not saved one yet; wait"
    if training_progress(workdir)["finished"]:
        kept = f"; {RESULTS_FILE} keeps its scores" if (workdir / RESULTS_FILE).is_file() else ""
        return f"training finished, so they were deleted afterwards{kept}; retrain with --overwrite"
    if best:
        return "the folder is empty (deleted?); score the last checkpoint without --best"
    return "training stopped before its first save: run its train.py command again"


def training_progress(workdir: str | os.PathLike) -> dict[str, Any]:
    """How far a run's training got, from ``metrics.jsonl``: ``{"finished", "step",
    "total_steps"}``. ``finished`` is True once training logged its "final" record (after its
    last "start"), False before, and None when the file is missing (nothing is known);
    ``step`` is the last step logged, ``total_steps`` the one the last "start" planned."""
    records = read_metrics(workdir)
    if not records:
        return {"finished": None, "step": None, "total_steps": None}
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    tail = records[starts[-1] :] if starts else records
    steps = [r["step"] for r in tail if isinstance(r.get("step"), int)]
    total = tail[0].get("total_steps") if starts else None
    return {
        "finished": any(r.get("event") == "final" for r in tail),
        "step": max(steps) if steps else None,
        "total_steps": total if isinstance(total, int) else None,
    }


def unfinished_warning(
    workdir: str | os.PathLike, progress: Mapping[str, Any] | None = None
) -> str | None:
    """A one-line warning when the run's training did not finish (killed, or still running):
    its checkpoints are then those of a partly trained model. None for a finished run, or when
    ``metrics.jsonl`` says nothing. ``progress``: :func:`training_progress`, when already read."""
    progress = training_progress(workdir) if progress is None else progress
    if progress["finished"] is not False:
        return None
    step, total = progress["step"], progress["total_steps"]
    holder = lock_holder(workdir)
    if holder and holder.get("tool") in ("training", "train.py", "the experiment runner"):
        where = f"step {step} of {total}" if step is not None and total else "its start"
        return (
            f"{workdir}: still training ({holder_text(holder)}), at {where}: this is its "
            "newest checkpoint, a partly trained model"
        )
    if step is not None and total and step >= total:
        return (
            f"{workdir}: training reached its last step ({total}) but did not log its end "
            "(stopped during the final evaluation?); run the same train.py command again to "
            "complete it"
        )
    where = f"at step {step} of {total}" if step is not None and total else "before its end"
    return (
        f"{workdir}: training stopped {where} (metrics.jsonl has no final record): this is a "
        "partly trained model (unless it is still training); resume it by running the same "
        "train.py command again"
    )


def not_final_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> str | None:
    """Why a run's ``results.json`` does not score its finished, last model (None when it
    does, or when the files say nothing): ``eval.py`` on a partly trained run, or with
    ``--step`` / ``--best``. The experiment runner retrains (resumes) such a run; summaries
    refuse it."""
    checkpoint = results.get("checkpoint", "latest")
    if checkpoint != "latest":
        return f"results.json scores the {checkpoint} checkpoint, not the last one"
    if results.get("training_finished") is False or training_progress(workdir)["finished"] is False:
        return "results.json scores a partly trained model (training did not finish)"
    return None


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and scalars to TensorBoard (process 0 only).

    On resumption from step S, records after S (and a previous "final" record) are dropped
    first, so the file of a resumed run equals that of an uninterrupted one.

    Args:
      workdir: the run directory.
      enabled: False on processes other than 0 (then every call is a no-op).
      resume_step: the step training resumes from (0: a new run, the file is emptied).
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = Path(workdir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        kept = []
        if resume_step > 0:
            for rec in read_metrics(workdir):
                if rec.get("step", 0) <= resume_step and rec.get("event") != "final":
                    kept.append(json.dumps(rec, sort_keys=True))
        jsonio.write_text(self.path, "".join(k + "\n" for k in kept))
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / TENSORBOARD_DIR))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None

    def log(self, record: Mapping[str, Any], scalars: Mapping[str, float] | None = None) -> None:
        """Appends one record (and its scalars at ``record["step"]``)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None and scalars:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flushes TensorBoard."""
        if self._tb is not None:
            with contextlib.suppress(OSError):
                self._tb.flush()
                self._tb.close()
            self._tb = None


# --------------------------------------------------------------------------------------------
# Results and per-utterance scores
# --------------------------------------------------------------------------------------------


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Writes ``results.json``."""
    return jsonio.write_json(Path(workdir) / RESULTS_FILE, dict(results))


#: Keys every ``results.json`` that eval_lib writes has (what summaries and exports read).
RESULT_KEYS = ("wa", "ua", "num_utterances", "confusion_matrix", "label_names")


def load_results(
    workdir: str | os.PathLike, *, remedy: str = "re-run eval.py on the run"
) -> dict[str, Any] | None:
    """``results.json`` of a run; None when it is missing (the run is not finished), and
    RunDirError naming the file when it is there but unreadable, not a JSON object, or lacks
    one of RESULT_KEYS (a summary must not drop such a run in silence). ``remedy``: what the
    error tells the caller's user to do (the experiment runner re-scores the run itself)."""
    path = Path(workdir) / RESULTS_FILE
    if not path.exists():
        return None
    try:
        results = jsonio.read_json_object(path, hint=remedy)
    except jsonio.JSONFileError as e:
        raise RunDirError(str(e)) from None
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise RunDirError(f"{path}: missing {', '.join(missing)}; {remedy}")
    return results


def split_name(results: dict[str, Any]) -> str | None:
    """The held-out split's name recorded in a results dict (None when absent or malformed)."""
    split = results.get("split")
    return split.get("name") if isinstance(split, dict) else None


def read_results(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """``results.json`` of a run, or None when it is missing or damaged (not finished: the
    runner retrains it). Readers that report results use :func:`load_results`.

    Raises:
      OSError: the file exists but cannot be read (permissions): a finished run must not be
        retrained, nor reported as different, because this user may not read its results.
    """
    try:
        return load_results(workdir)
    except (RunDirError, FileNotFoundError, NotADirectoryError):
        return None


def write_scores(
    workdir: str | os.PathLike,
    *,
    utterance_ids: Sequence[str],
    labels: Sequence[int],
    predictions: Sequence[int],
    num_segments: Sequence[int],
    scores: np.ndarray,
    label_names: Sequence[str],
    mode: str,
) -> Path:
    """Writes ``utterance_scores.csv``: id, true and predicted label, segments, mean scores.

    Args:
      workdir: the run directory.
      utterance_ids, labels, predictions, num_segments: one entry per utterance.
      scores: [U, C] per-utterance mean logits ("logits") or probabilities ("probs").
      label_names: class names (column suffixes).
      mode: "logits" or "probs" (what the score columns hold).
    """
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(
        ["utterance_id", "label", "prediction", "num_segments"]
        + [f"{mode}_{n}" for n in label_names]
    )
    for i, utt in enumerate(utterance_ids):
        w.writerow(
            [utt, label_names[labels[i]], label_names[predictions[i]]]
            + [int(num_segments[i])]
            + [repr(float(v)) for v in scores[i]]
        )
    return jsonio.write_text(Path(workdir) / SCORES_FILE, buf.getvalue())


def read_scores(workdir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Reads ``utterance_scores.csv``: {utterance id: {label, prediction, num_segments,
    scores [C] float32}} ({} when missing)."""
    path = Path(workdir) / SCORES_FILE
    if not path.exists():
        return {}
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            cols = [k for k in row if k.startswith(("logits_", "probs_"))]
            out[row["utterance_id"]] = {
                "label": row["label"],
                "prediction": row["prediction"],
                "num_segments": int(row["num_segments"]),
                "scores": np.array([float(row[k]) for k in cols], np.float32),
            }
    return out


def confusion_plot_path(workdir: str | os.PathLike) -> Path:
    """Where the run's confusion-matrix plot goes."""
    return Path(workdir) / CONFUSION_FILE


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpointer(
    workdir: str | os.PathLike, *, best: bool = False, max_to_keep: int = 1, read_only: bool = False
) -> checkpointing.Checkpointer:
    """The run's training (or best-by-validation) checkpoints."""
    return checkpointing.Checkpointer(
        Path(workdir) / (BEST_DIR if best else CHECKPOINT_DIR),
        max_to_keep=max_to_keep,
        read_only=read_only,
    )


def restore_for_resume(
    workdir: str | os.PathLike,
    ckpt: checkpointing.Checkpointer,
    target: Any,
    *,
    move_aside: bool = True,
) -> tuple[Any, dict[str, Any]] | None:
    """The newest *readable* training checkpoint, for resuming; None when there is none yet.

    A checkpoint that cannot be read (a truncated state or metadata file, say) is moved aside
    to ``RUN/checkpoints_damaged/<step>`` with a warning that names it and why, and the next
    older one is tried (``move_aside=False``, on processes other than 0 of a multi-host run:
    skipped without moving).

    Raises:
      CheckpointError: checkpoints exist but none is readable (the message names the directory
        and each step's problem), or the newest one may not be read by this user (permissions:
        nothing is moved).
    """
    problems = []
    for step in reversed(ckpt.all_steps()):
        try:
            return ckpt.restore(step, target=target)
        except Exception as e:  # orbax/tensorstore raise many types for a damaged file
            reason = checkpointing.describe_error(e)
            if checkpointing.permission_denied(e):  # intact: never moved aside as damaged
                raise CheckpointError(
                    f"{ckpt.directory / str(step)}: this user may not read the checkpoint "
                    f"({reason}); fix its permissions, or resume as the user who wrote it"
                ) from None
            problems.append(f"step {step}: {reason}")
            where = ckpt.directory / str(step)
            if move_aside:
                where = _move_aside(Path(workdir), ckpt, step)
                print(
                    f"warning: checkpoint {ckpt.directory / str(step)} is unreadable ({reason}); "
                    f"moved to {where}; resuming from an earlier checkpoint if one is readable",
                    file=sys.stderr,
                )
    if problems:
        raise CheckpointError(
            f"{ckpt.directory}: no readable checkpoint ({'; '.join(problems)}); the damaged ones "
            f"are in {Path(workdir) / DAMAGED_DIR}. Rerun with --overwrite to start again"
        )
    return None


def _move_aside(workdir: Path, ckpt: checkpointing.Checkpointer, step: int) -> Path:
    dest_root = workdir / DAMAGED_DIR
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / str(step)
    k = 1
    while dest.exists():
        dest = dest_root / f"{step}.{k}"
        k += 1
    shutil.move(str(ckpt.directory / str(step)), dest)
    ckpt.reload()
    return dest


@dataclasses.dataclass
class RestoredRun:
    """A trained run, ready for evaluation.

    Attributes:
      config: the run's resolved Config.
      model: the Flax MACNN that was trained (teacher or student, per config.model.role).
      variables: {"params", "batch_stats"} (numpy, host).
      step: the restored step.
      normalization: the run's feature normalisation (``input_pipeline.normalize_arrays``).
      data_info: content hash, feature config, label names of the training data (split.json).
      checkpoint: the checkpoint directory that was read.
      split: the run's train/validation/test utterances (split.json), when read from a workdir.
      is_latest: the restored checkpoint is the newest of its directory (what ``results.json``
        and ``model.json`` call "latest"; ``--step`` of an older one: False).
      training: :func:`training_progress` of the run (``training["finished"]``).
      warning: :func:`unfinished_warning` (None for a finished run), for the caller to print.
    """

    config: config_lib.Config
    model: Any
    variables: dict[str, Any]
    step: int
    normalization: dict[str, Any] = dataclasses.field(default_factory=lambda: {"mode": "none"})
    data_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: str = ""
    split: protocols.Split | None = None
    is_latest: bool = True
    training: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"finished": None, "step": None, "total_steps": None}
    )
    warning: str | None = None

    def checkpoint_label(self, *, best: bool) -> str:
        """ "best-by-validation", "latest", or "step N" (an older checkpoint)."""
        if best:
            return "best-by-validation"
        return "latest" if self.is_latest else f"step {self.step}"


def _variables_mismatch(model: Any, variables: dict, data_info: Mapping[str, Any]) -> str | None:
    """The first parameter or statistic whose name or shape differs between restored
    ``variables`` and what ``model`` builds for the run's segments (None: they fit; also when
    split.json records no segment shape). Shapes only: ``jax.eval_shape`` runs no computation."""
    import jax
    from flax import traverse_util

    shape = _segment_shape(data_info)
    if shape is None:
        return None
    x = jax.ShapeDtypeStruct((1, *shape, 1), np.float32)
    expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    want = traverse_util.flatten_dict({k: expected.get(k, {}) for k in variables}, sep="/")
    have = traverse_util.flatten_dict(variables, sep="/")
    for name in sorted(want.keys() | have.keys()):
        if name not in have:
            return f"{name} is missing from the checkpoint"
        if name not in want:
            return f"the checkpoint holds {name}, which the model has not"
        if tuple(np.shape(have[name])) != tuple(want[name].shape):
            return (
                f"{name} has shape {tuple(np.shape(have[name]))}, the model expects "
                f"{tuple(want[name].shape)}"
            )
    return None


def _segment_shape(data_info: Mapping[str, Any]) -> tuple[int, int] | None:
    """split.json's ``[bands, frames]`` of the run's segments (None when not recorded)."""
    shape = data_info.get("segment_shape")
    ok = isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) for n in shape)
    return (shape[0], shape[1]) if ok else None


def restore_run(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    best: bool = False,
    step_option: bool = True,
) -> RestoredRun:
    """Loads a run for evaluation: config, model, variables, step.

    Never modifies the workdir (a damaged checkpoint is reported, not moved).

    Args:
      workdir: a training workdir.
      step: which checkpoint (default: the latest, i.e. the end of training).
      best: restore the best-by-validation-UA checkpoint instead (needs a validation split).
      step_option: whether the caller has a ``--step`` to suggest for a damaged checkpoint
        (``eval.py``, export) or not (a student's ``--teacher``: move the damaged one aside).

    Raises:
      RunDirError: not a workdir, no such checkpoint (the message says what exists), or an
        unreadable checkpoint (the message names its path and suggests ``--step``).
    """
    from dkd_jax import models

    workdir = Path(workdir)
    if not workdir.is_dir():
        what = "a file, not a run directory" if workdir.exists() else "no such run directory"
        raise RunDirError(f"{workdir}: {what}")
    cfg = load_config(workdir)
    split, data_info = load_split(workdir)
    shape = _segment_shape(data_info)
    normalization = load_normalization(
        workdir, mode=cfg.data.normalization, num_bins=shape[0] if shape else None
    )
    num_classes = len(data_info.get("label_names", [])) or 4
    role = cfg.model.role
    model = models.create_model(getattr(cfg.model, role), num_classes=num_classes)
    directory = workdir / (BEST_DIR if best else CHECKPOINT_DIR)
    if not directory.exists():
        what = "best-by-validation checkpoint (no validation split?)" if best else "checkpoints"
        raise CheckpointError(f"{directory}: no {what}")
    ckpt = checkpointing.Checkpointer(directory, max_to_keep=1, read_only=True)
    try:
        steps = ckpt.all_steps()
        chosen = step if step is not None else (steps[-1] if steps else None)
        if chosen is None or chosen not in steps:
            want = "" if step is None else f" at step {step}"
            if not steps:  # killed before its first save, or every one moved aside
                raise CheckpointError(f"{directory}: no checkpoint; {_why_none(workdir, best)}")
            raise CheckpointError(f"{directory}: no checkpoint{want}; have {steps}")
        try:
            state, meta = ckpt.restore(chosen)
        except Exception as e:
            others = [s for s in steps if s != chosen]
            hint = ""
            if others and step_option:
                hint = f"; try --step {others[-1]} (steps: {others})"
            elif others:
                hint = (
                    f"; move {directory / str(chosen)} aside to use step {others[-1]}, or "
                    "retrain the run"
                )
            raise CheckpointError(
                f"{directory / str(chosen)}: unreadable checkpoint "
                f"({checkpointing.describe_error(e)}){hint}"
            ) from None
    finally:
        ckpt.close()
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    progress = training_progress(workdir)
    mismatch = _variables_mismatch(model, variables, data_info)
    if mismatch:
        raise CheckpointError(
            f"{directory / str(chosen)}: the checkpoint does not fit the model that "
            f"{workdir / CONFIG_FILE} describes ({mismatch}); was config.json edited?"
        )
    return RestoredRun(
        config=cfg,
        model=model,
        variables=variables,
        step=int(meta.get("step", state["step"])),
        normalization=normalization,
        data_info=data_info,
        checkpoint=str(directory / str(chosen)),
        split=split,
        is_latest=chosen == steps[-1],
        training=progress,
        warning=unfinished_warning(workdir, progress),
    )
