"""Tests of dkd_jax.run_dir: the workdir lock, file readers/writers, damaged checkpoints, OS errors.

The recovery tests train the "tiny" teacher on the session's tiny prep (streamed, 2 epochs, a
checkpoint every 2 steps) and compare every recovered run with one uninterrupted reference run
of the same config: same parameters bit for bit, same metrics.jsonl.
"""

import asyncio
import errno
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import eval as eval_cli  # the script at the repository root (pytest pythonpath)
import train as train_cli
from dkd_jax import checkpointing, jsonio, run_dir, train_lib
from dkd_jax import config as config_lib

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "model.role": "teacher",
    "data.validation": "none",
    "train.on_device": "off",
    "train.checkpoint_every_steps": 2,
    "train.keep_checkpoints": 10,
    "train.log_every_steps": 2,
}


def _config(prep_dir):
    items = {"data.prep_dir": str(prep_dir), **OVERRIDES}
    return config_lib.apply_overrides(
        config_lib.get_config("tiny"), [f"{k}={v}" for k, v in items.items()]
    )


def _cli_args(prep_dir, workdir):
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items() if k != "model.role"]
    data = ["--data", str(prep_dir), "--workdir", str(workdir)]
    return [*data, "--role", "teacher", "--preset=tiny", *overrides]


def _variables(workdir):
    return run_dir.restore_run(workdir).variables


def _assert_same_run(a, b):
    la = jax.tree_util.tree_flatten_with_path(_variables(a))[0]
    lb = dict(jax.tree_util.tree_flatten_with_path(_variables(b))[0])
    assert len(la) == len(lb)
    for path, x in la:
        assert np.asarray(x).tobytes() == np.asarray(lb[path]).tobytes(), path

    def events(wd):
        return [{k: v for k, v in r.items() if k != "timing"} for r in run_dir.read_metrics(wd)]

    assert events(a) == events(b)
    ra, rb = run_dir.read_results(a), run_dir.read_results(b)
    assert (ra["wa"], ra["ua"], ra["confusion_matrix"]) == (
        rb["wa"],
        rb["ua"],
        rb["confusion_matrix"],
    )


@pytest.fixture(scope="module")
def reference(tiny_prep_dir, tmp_path_factory):
    """One uninterrupted run; its checkpoint steps."""
    wd = tmp_path_factory.mktemp("rundir") / "reference"
    train_lib.train_and_evaluate(_config(tiny_prep_dir), wd)
    steps = checkpointing.Checkpointer(wd / run_dir.CHECKPOINT_DIR, max_to_keep=10).all_steps()
    assert len(steps) >= 3, steps
    return wd, steps


def _copy_run(reference, dest):
    shutil.copytree(reference, dest)
    return dest


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------


def _probe_lock(workdir) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom dkd_jax import run_dir\n"
        "try:\n"
        f"    with run_dir.locked({str(workdir)!r}, 'probe'):\n        print('acquired')\n"
        "except run_dir.WorkdirLockedError as e:\n    print('refused:', e)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_a_locked_workdir_refuses_a_second_process_and_names_the_holder(tmp_path):
    wd = tmp_path / "run"
    with run_dir.locked(wd, "train.py"):
        out = _probe_lock(wd)
        assert out.stdout.startswith("refused:"), out
        assert f"pid {os.getpid()}" in out.stdout and platform.node() in out.stdout
        assert "train.py" in out.stdout and "started" in out.stdout
        with run_dir.locked(wd, "nested"):  # re-entrant within the holding process
            pass
    assert not (wd / run_dir.LOCK_FILE).exists()
    assert _probe_lock(wd).stdout.strip() == "acquired"


def test_train_cli_on_a_locked_workdir_is_one_line(tmp_path, tiny_prep_dir, capsys):
    wd = tmp_path / "run"
    code = (
        "import sys\nfrom dkd_jax import run_dir\n"
        f"with run_dir.locked({str(wd)!r}, 'another train.py'):\n"
        "    print('held', flush=True)\n    sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        rc = train_cli.main(_cli_args(tiny_prep_dir, wd))
    finally:
        holder.communicate(b"", timeout=60)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("train.py: error: ") and "in use by another train.py" in err
    assert f"pid {holder.pid}" in err
    assert not (wd / run_dir.CONFIG_FILE).exists()  # nothing was written into the held workdir


def test_a_workdir_the_lock_created_is_removed_again_when_nothing_was_written(
    tmp_path, tiny_prep_dir, capsys
):
    """A run refused before writing anything (a fold out of range) used to leave an empty
    workdir behind; a workdir that existed before, or got files, stays."""
    with run_dir.locked(tmp_path / "new", "probe"):
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()
    with run_dir.locked(tmp_path / "written", "probe"):
        (tmp_path / "written" / "config.json").write_text("{}")
    assert (tmp_path / "written" / "config.json").is_file()
    (tmp_path / "mine").mkdir()
    with run_dir.locked(tmp_path / "mine", "probe"):
        pass
    assert (tmp_path / "mine").is_dir()
    workdir = tmp_path / "bad_fold"
    rc = train_cli.main([*_cli_args(tiny_prep_dir, workdir), "--config.data.fold=7"])
    assert rc == 2 and "fold 7 out of range" in capsys.readouterr().err
    assert not workdir.exists()


def test_a_folder_of_other_files_is_refused_unless_overwrite(tmp_path, tiny_prep_dir, capsys):
    """--workdir . in a source tree used to train into it without a word."""
    workdir = tmp_path / "src"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    (workdir / ".hidden").write_text("")  # hidden files do not count
    cfg = _config(tiny_prep_dir)
    with pytest.raises(run_dir.WorkdirError, match=r"is not empty and holds no run \(notes\.txt\)"):
        run_dir.prepare_workdir(workdir, cfg, overwrite=False)
    assert run_dir.prepare_workdir(workdir, cfg, overwrite=True) is False
    assert (workdir / "notes.txt").read_text() == "mine"  # --overwrite keeps it
    (workdir / "notes.txt").unlink()
    for name in (run_dir.TENSORBOARD_DIR, run_dir.DAMAGED_DIR):  # what a run leaves: fine
        (workdir / name).mkdir()
    assert run_dir.prepare_workdir(workdir, cfg, overwrite=False) is False
    (workdir / "notes.txt").write_text("mine")
    rc = train_cli.main(_cli_args(tiny_prep_dir, workdir))
    err = capsys.readouterr().err
    assert rc == 2 and "is not empty and holds no run (notes.txt)" in err


def test_another_projects_files_of_a_runs_names_are_never_overwritten(tmp_path, tiny_prep_dir):
    """An audit: an ML project folder holding `checkpoints/resnet/model.pt` or its own
    `config.json` was refused with "use --overwrite", and --overwrite then deleted them."""
    cfg = _config(tiny_prep_dir)
    project = tmp_path / "project"
    (project / run_dir.CHECKPOINT_DIR / "resnet").mkdir(parents=True)
    (project / run_dir.CHECKPOINT_DIR / "resnet" / "model.pt").write_bytes(b"weights")
    for overwrite in (False, True):
        with pytest.raises(run_dir.WorkdirError) as e:
            run_dir.prepare_workdir(project, cfg, overwrite=overwrite)
        assert str(e.value) == (
            f"{project}: checkpoints/ holds resnet: not a dkd-jax run's, and --overwrite would "
            "delete it; use another --workdir"
        )
    assert (project / run_dir.CHECKPOINT_DIR / "resnet" / "model.pt").read_bytes() == b"weights"
    shutil.rmtree(project / run_dir.CHECKPOINT_DIR)
    for text in ('{"model_type": "bert", "hidden_size": 768}', "[1, 2]"):
        (project / run_dir.CONFIG_FILE).write_text(text)
        with pytest.raises(run_dir.WorkdirError, match=r"config\.json holds none of a run config"):
            run_dir.prepare_workdir(project, cfg, overwrite=True)
        assert (project / run_dir.CONFIG_FILE).read_text() == text
    # A hidden file in a run's checkpoints/ (.DS_Store) blocks neither a resume nor --overwrite.
    shutil.rmtree(project)
    run = tmp_path / "run"
    (run / run_dir.CHECKPOINT_DIR / "7").mkdir(parents=True)
    (run / run_dir.CHECKPOINT_DIR / ".DS_Store").write_bytes(b"")
    run_dir.write_config(run, cfg)
    assert run_dir.prepare_workdir(run, cfg, overwrite=False) is True
    assert run_dir.prepare_workdir(run, cfg, overwrite=True, clear=False) is False
    # Another project's checkpoints/ without a config.json: refused without --overwrite too,
    # never with the advice to use it.
    shutil.rmtree(run)
    (project / run_dir.CHECKPOINT_DIR / "resnet").mkdir(parents=True)
    with pytest.raises(run_dir.WorkdirError, match="checkpoints/ holds resnet: not a dkd-jax"):
        run_dir.prepare_workdir(project, cfg, overwrite=False)
    shutil.rmtree(project / run_dir.CHECKPOINT_DIR)
    # A run's own damaged config.json and its step folders (one being saved) stay replaceable.
    (project / run_dir.CONFIG_FILE).write_text('{"data": {"fold": ')
    (project / run_dir.CHECKPOINT_DIR / "15.orbax-checkpoint-tmp-3").mkdir(parents=True)
    (project / run_dir.CHECKPOINT_DIR / "10").mkdir()
    with pytest.raises(run_dir.WorkdirError, match="use --overwrite to start a new run there"):
        run_dir.prepare_workdir(project, cfg, overwrite=False)
    assert run_dir.prepare_workdir(project, cfg, overwrite=True, clear=True) is False
    assert not (project / run_dir.CHECKPOINT_DIR).exists()


def test_held_locks_are_released_before_an_exit_without_unwinding(tmp_path):
    """The experiment runner's os._exit on Ctrl-C or SIGTERM (--jobs: runs on other threads)
    left their lock files behind, naming this host: a job requeued elsewhere was refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    with run_dir.locked(a, "training"), run_dir.locked(b, "training"):
        assert (a / run_dir.LOCK_FILE).exists() and (b / run_dir.LOCK_FILE).exists()
        run_dir.release_held_locks()
        assert not (a / run_dir.LOCK_FILE).exists() and not (b / run_dir.LOCK_FILE).exists()
    # the blocks then end without an error (the lock is gone already)
    with run_dir.locked(a, "training"):  # and the folder can be locked again
        assert (a / run_dir.LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    wd = tmp_path / "run"
    wd.mkdir()
    holder = {"tool": "train.py", "pid": dead.pid, "host": platform.node(), "started": "x"}
    (wd / run_dir.LOCK_FILE).write_text(json.dumps(holder))
    with run_dir.locked(wd, "train.py"):
        mine = json.loads((wd / run_dir.LOCK_FILE).read_text())
        assert mine["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "taking over the lock" in err and f"pid {dead.pid}" in err


def test_a_lock_left_on_another_host_is_refused_with_the_file_to_delete(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    holder = {"tool": "train.py", "pid": 1, "host": "some-other-host", "started": "x"}
    (wd / run_dir.LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(run_dir.WorkdirLockedError, match="some-other-host") as e:
        with run_dir.locked(wd, "train.py"):
            pass
    assert str(wd / run_dir.LOCK_FILE) in str(e.value)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_read_metrics_skips_cut_lines_and_writer_drops_records_after_resume(tmp_path):
    w = run_dir.MetricsWriter(tmp_path, enabled=True, resume_step=0)
    for step in (1, 2, 3):
        w.log({"event": "train", "step": step})
    w.log({"event": "final", "step": 3})
    w.close()
    with open(tmp_path / run_dir.METRICS_FILE, "a") as f:
        f.write('{"event": "train", "st')  # a line cut by a kill
    assert [r["step"] for r in run_dir.read_metrics(tmp_path)] == [1, 2, 3, 3]
    run_dir.MetricsWriter(tmp_path, enabled=True, resume_step=2).close()
    assert run_dir.read_metrics(tmp_path) == [
        {"event": "train", "step": 1},
        {"event": "train", "step": 2},
    ]
    assert run_dir.read_metrics(tmp_path / "nothing") == []


def test_training_progress_reads_the_last_start_and_the_final_record(tmp_path):
    assert run_dir.training_progress(tmp_path) == {
        "finished": None, "step": None, "total_steps": None
    }  # fmt: skip
    assert run_dir.unfinished_warning(tmp_path) is None  # nothing known: no warning
    w = run_dir.MetricsWriter(tmp_path, enabled=True, resume_step=0)
    w.log({"event": "start", "step": 0, "total_steps": 12})
    for step in (1, 2, 3, 4):
        w.log({"event": "train", "step": step})
    w.log({"event": "eval", "step": 4, "split": "test"})
    w.close()
    progress = run_dir.training_progress(tmp_path)
    assert progress == {"finished": False, "step": 4, "total_steps": 12}
    warning = run_dir.unfinished_warning(tmp_path)
    assert "training stopped at step 4 of 12" in warning and str(tmp_path) in warning
    w = run_dir.MetricsWriter(tmp_path, enabled=True, resume_step=4)  # resumed to the end
    w.log({"event": "train", "step": 12})
    w.log({"event": "final", "step": 12})
    w.close()
    assert run_dir.training_progress(tmp_path) == {
        "finished": True, "step": 12, "total_steps": 12
    }  # fmt: skip
    assert run_dir.unfinished_warning(tmp_path) is None


def _stats(bands, **changes):
    return {"mode": "global", "mean": [0.5] * bands, "std": [2.0] * bands, **changes}


@pytest.mark.parametrize(
    "normalization, kwargs, message",
    [
        (_stats(3), {"mode": "global", "num_bins": 3}, None),
        ({"mode": "utterance"}, {"mode": "utterance"}, None),
        ({"mode": "speaker", "groups": {"s1": _stats(2)}}, {"num_bins": 2}, None),
        ([1, 2], {}, "not a JSON object"),
        (_stats(3), {"mode": "speaker"}, "the run's config.json says data.normalization='speaker'"),
        ({"mode": "global", "std": [1.0]}, {}, "no 'mean'"),
        (_stats(3, mean="abc"), {}, "'mean' is not a list of numbers"),
        (_stats(5), {"num_bins": 26}, "'mean' has shape [5], expected [26]"),
        (_stats(3, std=[1.0, 1.0]), {}, "'std' has shape [2], expected [3]"),
        (_stats(2, std=[1.0, 0.0]), {}, "'std' holds values that are not finite and positive"),
        (_stats(2, std=[1.0, -1.0]), {}, "not finite and positive"),
        (_stats(2, mean=[0.0, float("nan")]), {}, "'mean' holds values that are not finite"),
        ({"mode": "global", "mean": [], "std": []}, {}, "expected [0]"),
        ({"mode": "speaker"}, {}, "without the training speakers' statistics"),
        ({"mode": "speaker", "groups": {"s1": _stats(2, std=[1, 0])}}, {}, "speaker 's1': 'std'"),
    ],
)
def test_normalization_problem_names_what_is_wrong(normalization, kwargs, message):
    problem = run_dir.normalization_problem(normalization, **kwargs)
    assert problem is None if message is None else message in problem


def test_a_missing_normalization_file_is_none_only_when_the_config_says_so(tmp_path):
    assert run_dir.load_normalization(tmp_path) == {"mode": "none"}
    assert run_dir.load_normalization(tmp_path, mode="none") == {"mode": "none"}
    with pytest.raises(run_dir.RunDirError, match=r"normalization\.json: missing, but the run's"):
        run_dir.load_normalization(tmp_path, mode="global")
    (tmp_path / run_dir.NORMALIZATION_FILE).write_text(json.dumps(_stats(4)))
    assert run_dir.load_normalization(tmp_path, mode="global", num_bins=4) == _stats(4)
    with pytest.raises(run_dir.RunDirError, match=r"'mean' has shape \[4\], expected \[26\]"):
        run_dir.load_normalization(tmp_path, mode="global", num_bins=26)


def test_json_files_are_written_atomically_and_converted(tmp_path):
    path = jsonio.write_json(
        tmp_path / "x.json", {"a": np.float32(1.5), "b": np.arange(2), "c": float("nan")}
    )
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1], "c": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temporary left
    assert run_dir.read_results(tmp_path) is None
    (tmp_path / run_dir.RESULTS_FILE).write_text("{cut")
    assert run_dir.read_results(tmp_path) is None
    with pytest.raises(run_dir.RunDirError, match=r"config\.json: missing"):
        run_dir.load_config(tmp_path)


def test_overwrite_clears_results_so_they_never_describe_another_run(tmp_path):
    cfg = config_lib.get_config("tiny")
    run_dir.write_config(tmp_path, cfg)
    for name in (run_dir.RESULTS_FILE, run_dir.SCORES_FILE, run_dir.CONFUSION_FILE):
        (tmp_path / name).write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    other = config_lib.apply_overrides(cfg, ["optim.num_epochs=7"])
    with pytest.raises(run_dir.WorkdirError, match=r"optim\.num_epochs: 2 -> 7"):
        run_dir.prepare_workdir(tmp_path, other, overwrite=False)
    assert run_dir.prepare_workdir(tmp_path, cfg, overwrite=False) is True
    assert run_dir.prepare_workdir(tmp_path, other, overwrite=True) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------------------------
# Damaged checkpoints
# --------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _state_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)  # the array data


@pytest.mark.parametrize("damage", ["meta", "state"])
def test_truncated_newest_checkpoint_resumes_from_the_previous_one(
    reference, tiny_prep_dir, tmp_path, capsys, damage
):
    ref, steps = reference
    wd = _copy_run(ref, tmp_path / "run")
    newest = wd / run_dir.CHECKPOINT_DIR / str(steps[-1])
    _truncate(newest / "meta" / "metadata" if damage == "meta" else _state_file(newest))
    (wd / run_dir.RESULTS_FILE).unlink()
    train_lib.train_and_evaluate(_config(tiny_prep_dir), wd)
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is unreadable" in err and "moved to" in err
    assert (wd / run_dir.DAMAGED_DIR / str(steps[-1])).is_dir()  # kept for inspection
    _assert_same_run(ref, wd)


def test_a_checkpoint_this_user_may_not_read_is_not_moved_aside_as_damaged(
    reference, tiny_prep_dir, tmp_path, capsys, monkeypatch
):
    """It was moved to checkpoints_damaged/ and the user told to retrain with --overwrite."""
    ref, steps = reference
    wd = _copy_run(ref, tmp_path / "run")
    newest = wd / run_dir.CHECKPOINT_DIR / str(steps[-1])
    denied = (
        f'PERMISSION_DENIED: Error reading local file "{newest}/state/manifest.ocdbt": Failed to '
        f"open: \"{newest}/state/manifest.ocdbt\": Permission denied [os_error_code='13']"
    )

    def restore(self, step, target=None):
        raise ValueError(denied)

    monkeypatch.setattr(checkpointing.Checkpointer, "restore", restore)
    rc = train_cli.main(_cli_args(tiny_prep_dir, wd))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        f"train.py: error: {newest}: this user may not read the checkpoint (ValueError: "
        f"PERMISSION_DENIED: {newest}/state/manifest.ocdbt: Permission denied); fix its "
        "permissions, or resume as the user who wrote it"
    ]
    assert newest.is_dir() and not (wd / run_dir.DAMAGED_DIR).exists()


def test_no_readable_checkpoint_is_one_line_naming_the_directory(
    reference, tiny_prep_dir, tmp_path, capsys
):
    ref, steps = reference
    wd = _copy_run(ref, tmp_path / "run")
    for step in steps:
        _truncate(wd / run_dir.CHECKPOINT_DIR / str(step) / "meta" / "metadata")
    rc = train_cli.main(_cli_args(tiny_prep_dir, wd))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"train.py: error: {wd / run_dir.CHECKPOINT_DIR}: no readable")


def test_a_run_killed_before_its_first_save_says_so(reference, tmp_path, capsys):
    ref, _ = reference
    wd = _copy_run(ref, tmp_path / "run")
    for step_dir in (wd / run_dir.CHECKPOINT_DIR).iterdir():
        shutil.rmtree(step_dir)
    started = [r for r in run_dir.read_metrics(wd) if r["event"] == "start"]  # killed then
    (wd / run_dir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in started))
    assert eval_cli.main(["--workdir", str(wd), "--no-write"]) == 2
    err = capsys.readouterr().err
    assert f"{wd / run_dir.CHECKPOINT_DIR}: no checkpoint; training stopped before its" in err
    assert "run its train.py command again" in err and len(err.strip().splitlines()) == 1


def test_eval_names_a_damaged_checkpoint_and_suggests_another_step(reference, tmp_path, capsys):
    ref, steps = reference
    wd = _copy_run(ref, tmp_path / "run")
    newest = wd / run_dir.CHECKPOINT_DIR / str(steps[-1])
    _truncate(_state_file(newest))
    assert eval_cli.main(["--workdir", str(wd)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"eval.py: error: {newest}: unreadable checkpoint")
    assert f"--step {steps[-2]}" in err
    assert newest.is_dir()  # eval never moves anything
    assert eval_cli.main(["--workdir", str(wd), "--step", str(steps[-2]), "--no-write"]) == 0
    # As a command: nothing after the one line (orbax's abandoned reads used to print three
    # "Event loop is closed" tracebacks once its loop had closed).
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--workdir", str(wd)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"eval.py: error: {newest}: unreadable checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_damaged_teacher_checkpoint_suggests_no_option_train_py_lacks(reference, tmp_path):
    """An audit: a student's --teacher with a damaged newest checkpoint said "try --step 4";
    train.py has no --step."""
    ref, steps = reference
    wd = _copy_run(ref, tmp_path / "run")
    newest = wd / run_dir.CHECKPOINT_DIR / str(steps[-1])
    _truncate(_state_file(newest))
    with pytest.raises(run_dir.CheckpointError) as e:
        run_dir.restore_run(wd, step_option=False)
    assert "--step" not in str(e.value)
    assert str(e.value).endswith(
        f"; move {newest} aside to use step {steps[-2]}, or retrain the run"
    )


def test_only_the_abandoned_reads_of_a_failed_restore_are_silenced(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(checkpointing, "_late_reads_hook_installed", False)

    def raised(fn):
        try:
            fn()
        except Exception as e:
            return types.SimpleNamespace(
                exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__, object=None
            )

    loop = asyncio.new_event_loop()
    loop.close()
    late = raised(lambda: loop.call_soon_threadsafe(print))  # what tensorstore's thread hits
    elsewhere = raised(lambda: (_ for _ in ()).throw(RuntimeError("Event loop is closed")))
    other = raised(lambda: 1 / 0)
    checkpointing._drop_late_reads_into_closed_loops()
    checkpointing._drop_late_reads_into_closed_loops()  # installed once
    for u in (late, elsewhere, other):
        sys.unraisablehook(u)
    # Only these three: a restore that failed in an earlier test may still have late reads
    # arriving from tensorstore's threads, which the monkeypatched hook collects too.
    assert [u for u in seen if any(u is x for x in (late, elsewhere, other))] == [elsewhere, other]


_FAILING_SAVE = """
import resource, signal, sys
import numpy as np
from dkd_jax import checkpointing

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
ckpt = checkpointing.Checkpointer(sys.argv[1], max_to_keep=2)
ckpt.save(1, {"w": np.zeros(3, np.float32)}, {"epoch": 0})
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
rng = np.random.default_rng(0)
state = {f"w{i}": rng.standard_normal((64, 1024)).astype(np.float32) for i in range(4)}
try:
    ckpt.save(2, state, {"epoch": 1})
except OSError as e:
    print(f"{e.errno} {e.filename} {e.strerror}")
print(ckpt.all_steps())
"""


def test_a_failed_write_in_a_save_is_one_os_error_and_nothing_else(tmp_path):
    # A real failure inside tensorstore (a file size limit stands in for a full disk: both are
    # a write(2) error, ENOSPC or EFBIG). orbax wraps it in a ValueError and logs it, with
    # tracebacks, from its writer threads; abandoned writes print "Event loop is closed"
    # tracebacks and, at exit, "Task exception was never retrieved" (hundreds of lines before
    # and after the command line's one-line error, on a full disk in the demo).
    directory = tmp_path / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", _FAILING_SAVE, str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{errno.EFBIG} {directory} {os.strerror(errno.EFBIG)}",
        "[1]",  # the complete checkpoint is kept; the failed one is not a step
    ]
    assert proc.stderr == ""


def test_orbax_errors_held_during_a_save_are_dropped_only_when_it_fails(monkeypatch):
    logger = logging.getLogger("absl")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "propagate", False)

    def record(msg, path="/site-packages/orbax/checkpoint/_src/futures/future.py"):
        return logger.makeRecord("absl", logging.ERROR, path, 1, msg, (), None)

    try:
        with checkpointing._orbax_errors_held():  # a save that succeeds: logged as before
            logger.handle(record("kept"))
            logger.handle(record("not orbax", path="/elsewhere/mine.py"))
            assert [r.msg for r in seen] == ["not orbax"]
        assert [r.msg for r in seen] == ["not orbax", "kept"]
        seen.clear()
        with checkpointing._orbax_errors_held() as outer:  # two concurrent saves
            with checkpointing._orbax_errors_held() as inner:
                logger.handle(record("the failed save's"))
                inner.drop()  # it raised an OSError that says it
            logger.handle(record("the other save's"))
            assert seen == []
        assert [r.msg for r in seen] == ["the other save's"]
        assert outer.saves == 0 and checkpointing._HELD_ORBAX_ERRORS not in logger.filters
    finally:
        logger.removeHandler(handler)


def test_abandoned_write_reports_are_the_only_asyncio_records_dropped():
    def report(exc_text, path):
        try:
            exec(compile("raise ValueError(text)", path, "exec"), {"text": exc_text})
        except ValueError as e:
            exc = e
        return logging.LogRecord(
            "asyncio",
            logging.ERROR,
            path,
            1,
            "Task exception was never retrieved\nfuture: x",
            (),
            (ValueError, exc, exc.__traceback__),
        )

    code = "RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']"
    orbax = "/site-packages/orbax/checkpoint/_src/serialization/type_handlers.py"
    assert not checkpointing._abandoned_write_filter(report(code, orbax))
    assert checkpointing._abandoned_write_filter(report(code, "/elsewhere/mine.py"))
    assert checkpointing._abandoned_write_filter(report("another error", orbax))
    other = logging.LogRecord("asyncio", logging.ERROR, orbax, 1, "slow callback", (), None)
    assert checkpointing._abandoned_write_filter(other)


# --------------------------------------------------------------------------------------------
# OS errors
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not Path("/sys").is_dir(), reason="needs Linux /sys (not writable, even as root)"
)
def test_unwritable_workdir_is_one_line_with_the_path(tiny_prep_dir, capsys):
    wd = Path("/sys/dkd_jax_not_writable/run")
    assert train_cli.main(_cli_args(tiny_prep_dir, wd)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("train.py: error: /sys/dkd_jax_not_writable")
    assert "not permitted" in err or "denied" in err or "Read-only" in err


def test_read_only_workdir_as_an_unprivileged_user(tiny_prep_dir):
    """chmod cannot stop root: run train.py as a user that may not write (nobody as root)."""
    base = Path(tempfile.mkdtemp(prefix="dkd_jax_ro_"))
    try:
        base.chmod(0o755)
        wd = base / "ro"
        wd.mkdir(mode=0o555)
        run_as = 65534 if os.geteuid() == 0 else None  # nobody
        if run_as is not None:
            for p in (base, REPO, Path(sys.executable).resolve()):
                for q in (p, *p.parents):
                    if q.exists() and not q.stat().st_mode & 0o001:
                        pytest.skip(f"{q} is not traversable by an unprivileged user")
        out = subprocess.run(
            [sys.executable, "train.py", *_cli_args(tiny_prep_dir, wd)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
            user=run_as,
        )
    finally:
        shutil.rmtree(base)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert err[-1] == f"train.py: error: {wd / run_dir.LOCK_FILE}: Permission denied"


def _failing_on_call(n, real, exc):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)

    return wrapper


def test_disk_full_during_a_checkpoint_save_leaves_a_resumable_run(
    reference, tiny_prep_dir, tmp_path, monkeypatch, capsys
):
    ref, steps = reference
    wd = tmp_path / "run"
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):  # a save that fills the disk half way
        if step == steps[1]:
            tmp = Path(self.directory) / f"{step}.orbax-checkpoint-tmp-1234"
            (tmp / "state").mkdir(parents=True)
            (tmp / "state" / "part").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "state" / "part"))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert train_cli.main(_cli_args(tiny_prep_dir, wd)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("train.py: error: ") and "No space left on device" in err
    assert str(wd / run_dir.CHECKPOINT_DIR) in err
    kept = checkpointing.Checkpointer(wd / run_dir.CHECKPOINT_DIR, max_to_keep=10).all_steps()
    assert kept == steps[:1]
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    assert train_cli.main(_cli_args(tiny_prep_dir, wd)) == 0  # the space is back: resume
    _assert_same_run(ref, wd)


def test_disk_full_in_the_metrics_writer_is_one_line_and_resumable(
    reference, tiny_prep_dir, tmp_path, monkeypatch, capsys
):
    ref, _ = reference
    wd = tmp_path / "run"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(wd / run_dir.METRICS_FILE))
    real_log = run_dir.MetricsWriter.log
    monkeypatch.setattr(run_dir.MetricsWriter, "log", _failing_on_call(7, real_log, full))
    assert train_cli.main(_cli_args(tiny_prep_dir, wd)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"train.py: error: {wd / run_dir.METRICS_FILE}: No space left on device"
    monkeypatch.setattr(run_dir.MetricsWriter, "log", real_log)
    assert train_cli.main(_cli_args(tiny_prep_dir, wd)) == 0
    _assert_same_run(ref, wd)


@pytest.mark.parametrize(
    "text, message",
    [
        (b'{"wa":', "not valid JSON"),
        (b"\xff", "not UTF-8 text (byte 0)"),
        (b"[1]", "not a JSON object"),
        (b'{"wa": 0.5, "ua": 0.5}', "missing num_utterances, confusion_matrix, label_names"),
    ],
)
def test_load_results_names_a_damaged_results_file(tmp_path, text, message):
    assert run_dir.load_results(tmp_path) is None  # missing: the run is not finished
    (tmp_path / run_dir.RESULTS_FILE).write_bytes(text)
    with pytest.raises(run_dir.RunDirError) as e:
        run_dir.load_results(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / run_dir.RESULTS_FILE}: {message}")
    assert run_dir.read_results(tmp_path) is None  # the runner's view: not finished, retrain
    good = {k: 1 for k in run_dir.RESULT_KEYS}
    (tmp_path / run_dir.RESULTS_FILE).write_text(json.dumps(good))
    assert run_dir.load_results(tmp_path) == good


def test_a_lock_probe_does_not_make_a_starting_run_fail(tmp_path):
    """lock_holder looks by taking a shared flock for an instant: a run starting then must wait
    for it, not be refused as "in use by a process (pid None ...)"."""
    import fcntl
    import threading

    wd = tmp_path / "run"
    wd.mkdir()
    fd = os.open(wd / run_dir.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a probe, caught in the act
    release = threading.Timer(0.05, lambda: fcntl.flock(fd, fcntl.LOCK_UN))
    release.start()
    try:
        with run_dir.locked(wd, "train.py"):
            assert run_dir.lock_holder(wd) is None  # held by this process: nobody else
    finally:
        release.join()
        os.close(fd)
