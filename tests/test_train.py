"""End-to-end tests of training on the tiny synthetic prep: runs, resume, refusals, CLI.

All runs use the "tiny" preset (tiny architectures, batch 8, 26x63 MFCC segments, 2 epochs),
loso fold 0 with one training speaker held out for validation. Compiled functions are cached
by train_lib, so the runs after the first of each kind compile nothing.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import train as train_cli
from dkd_jax import (
    checkpointing,
    distributed,
    eval_lib,
    input_pipeline,
    records,
    run_dir,
    train_lib,
    train_step,
)
from dkd_jax import config as config_lib

REPO = Path(__file__).resolve().parents[1]

TEACHER = {"model.role": "teacher", "optim.num_epochs": 3, "train.on_device": "on"}


def _config(prep_dir, **overrides):
    cfg = config_lib.get_config("tiny")
    base = {
        "data.prep_dir": str(prep_dir),
        "data.validation": "speaker",
        "data.validation_fraction": 0.5,
        "train.log_every_steps": 1,
    }
    base.update(overrides)
    return config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in base.items()])


def _events(workdir, drop_timing=True):
    out = []
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if drop_timing:
            rec.pop("timing", None)
            rec.pop("workdir", None)
        out.append(rec)
    return out


def _params(workdir):
    run = run_dir.restore_run(workdir)
    return run.variables


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def _digest(directory):
    h = hashlib.sha256()
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tiny_prep_dir, tmp_path_factory):
    """A teacher (3 epochs, on-device) and a DKD student trained on-device and streamed."""
    root = tmp_path_factory.mktemp("train_runs")
    train_step.clear_caches()
    cfg = _config(tiny_prep_dir, **TEACHER)
    teacher = train_lib.train_and_evaluate(cfg, root / "teacher")
    traces = {**train_step.TRACE_COUNTS, "predict": eval_lib.TRACE_COUNTS["predict"]}
    teacher_digest = _digest(root / "teacher" / run_dir.CHECKPOINT_DIR)
    out = {"root": root, "teacher": teacher, "teacher_traces": traces}
    for mode in ("on", "off"):
        scfg = _config(tiny_prep_dir, **{"train.on_device": mode})
        out[f"student_{mode}"] = train_lib.train_and_evaluate(
            scfg, root / f"student_{mode}", teacher_workdir=root / "teacher"
        )
    out["teacher_digest_after"] = _digest(root / "teacher" / run_dir.CHECKPOINT_DIR)
    out["teacher_digest"] = teacher_digest
    return out


def test_teacher_run_writes_the_workdir_and_compiles_once(runs):
    wd = runs["root"] / "teacher"
    for name in ("config.json", "split.json", "normalization.json", "metrics.jsonl"):
        assert (wd / name).is_file(), name
    assert (wd / "tensorboard").is_dir() and any((wd / "tensorboard").iterdir())
    assert (wd / "checkpoints_best").is_dir()  # a validation split exists
    # One trace of the epoch loop for 3 epochs: no epoch retraces.
    assert runs["teacher_traces"]["train_epoch"] == 1
    assert runs["teacher_traces"]["train_step"] == 1
    assert runs["teacher_traces"]["predict"] == 1
    events = _events(wd)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "final"
    assert kinds.count("epoch") == 3
    evals = [e for e in events if e["event"] == "eval"]
    assert {e["split"] for e in evals} == {"test", "validation"} and len(evals) == 6
    start = events[0]
    train = [e for e in events if e["event"] == "train"]
    assert len(train) == start["total_steps"] == 3 * start["steps_per_epoch"]
    assert all(np.isfinite(e["loss"]) and e["loss"] == pytest.approx(e["ce"]) for e in train)
    result = runs["teacher"]
    assert 0.0 <= result["test"]["ua"] <= 1.0 and result["test"]["num_utterances"] > 0
    assert result["best_validation"]["step"] in {e["step"] for e in evals}
    stored = json.loads((wd / run_dir.RESULTS_FILE).read_text())
    assert stored["best_validation"] == result["best_validation"]
    assert stored["step"] == result["step"] and stored["ua"] == result["test"]["ua"]
    split, info = run_dir.load_split(wd)
    assert not set(split.train_ids) & (set(split.test_ids) | set(split.validation_ids))
    assert info["label_names"] == ["neutral", "happy", "sad", "angry"]
    assert info["content_hash"] == records.load_metadata(_prep(runs))["content_hash"]


def _prep(runs):
    return config_lib.loads((runs["root"] / "teacher" / "config.json").read_text()).data.prep_dir


def _assert_events_close(a, b, rel=1e-5, abs_tol=5e-6, grad_norm_rel=1e-2):
    # abs_tol: a KL term near 0 (e.g. NCKD of a student that already matches its teacher) is a
    # difference of nearly equal sums, so its *relative* rounding error is large (measured: an
    # NCKD of 0.00436 differed by 8e-7 between the paths with jax 0.10.2 / flax 0.12.8).
    # grad_norm_rel: the gradient norm sums the elements whose updates differ most (see
    # test_on_device_and_streaming_paths_agree); measured 9.5e-4 relative at step 4 on a Zen 3
    # CPU, where the losses of the same steps differed by 1.1e-6 relative.
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                r = grad_norm_rel if k == "grad_norm" else rel
                assert x[k] == pytest.approx(y[k], rel=r, abs=abs_tol), (x["event"], k)
            elif k not in ("test", "validation", "best_validation", "train"):
                assert x[k] == y[k], (x["event"], k)


def _parameter_differences(a, b):
    """|a - b| of every parameter element, the conv biases that feed a BatchNorm left out:
    their true gradient is exactly 0 (BatchNorm subtracts them again), so Adam turns rounding
    noise into +-lr random steps that do not change the network's function."""
    from flax import traverse_util

    flat_a = traverse_util.flatten_dict(a["params"], sep="/")
    flat_b = traverse_util.flatten_dict(b["params"], sep="/")
    assert flat_a.keys() == flat_b.keys()
    kept = [k for k in flat_a if not (k.startswith("conv") and k.endswith("/bias"))]
    assert len(kept) >= len(flat_a) - 6
    return np.concatenate(
        [np.abs(np.asarray(flat_a[k]) - np.asarray(flat_b[k])).ravel() for k in kept]
    )


def test_on_device_and_streaming_paths_agree(runs):
    """Same data order, same math; XLA fuses the scanned step and the standalone step
    differently, so they agree to float rounding (each path alone is bit-reproducible).

    The rounding differences grow from step to step, and Adam divides each element's gradient by
    its own running size: an element whose gradient is mostly rounding noise moves by a good
    part of a step either way. So the parameters are compared over all their elements: the median
    within 2 % of one Adam step (lr 1e-3), 99 % within 20 %. Measured on a Zen 3 CPU (AVX2),
    4 steps: median 1.2e-6, 99th percentile 3.9e-5, largest 6.5e-4 (a conv4 kernel element);
    2 steps apart (the other path's step-2 checkpoint, in ``checkpoints/``): median 9.7e-4,
    99th percentile 1.9e-3. A different batch or a step more or less fails both bounds. Logged
    losses to 1e-5 relative or 5e-6 absolute (``_assert_events_close``).
    """
    root = runs["root"]
    diff = _parameter_differences(_params(root / "student_on"), _params(root / "student_off"))
    assert np.median(diff) <= 2e-5 and np.quantile(diff, 0.99) <= 2e-4, (
        np.median(diff),
        np.quantile(diff, 0.99),
        diff.max(),
    )
    # The bounds tell other training apart: the other path two steps earlier fails them.
    assert runs["student_off"]["step"] == 4
    earlier = run_dir.restore_run(root / "student_off", step=2)
    far = _parameter_differences(_params(root / "student_on"), earlier.variables)
    assert np.median(far) > 2e-5 and np.quantile(far, 0.99) > 2e-4
    on, off = _events(root / "student_on"), _events(root / "student_off")
    assert on[0]["on_device"] is True and off[0]["on_device"] is False
    for ev in on + off:
        ev.pop("on_device", None)
    _assert_events_close(on, off)
    for key in ("wa", "ua"):
        assert runs["student_on"]["test"][key] == pytest.approx(runs["student_off"]["test"][key])


def test_student_distils_from_a_frozen_unsaved_teacher(runs):
    root = runs["root"]
    assert runs["teacher_digest"] == runs["teacher_digest_after"]  # teacher files untouched
    student = run_dir.restore_run(root / "student_on")
    assert student.config.model.role == "student"
    teacher = run_dir.restore_run(root / "teacher")
    # The student's checkpoint holds exactly the student's variables (no teacher inside).
    shapes = jax.eval_shape(
        lambda: student.model.init(jax.random.PRNGKey(0), np.zeros((1, 26, 63, 1)), train=False)
    )
    assert jax.tree.structure(shapes["params"]) == jax.tree.structure(student.variables["params"])
    assert jax.tree.map(np.shape, shapes["params"]) == jax.tree.map(
        np.shape, student.variables["params"]
    )
    assert jax.tree.map(np.shape, teacher.variables["params"]) != jax.tree.map(
        np.shape, student.variables["params"]
    )
    record = json.loads((root / "student_on" / "teacher.json").read_text())
    assert record["mode"] == "precomputed" and record["step"] == teacher.step
    train = [e for e in _events(root / "student_on") if e["event"] == "train"]
    for e in train:  # tiny preset: warm-up 1 epoch, so the DKD weight is 1 from the start
        assert e["kd_weight"] == 1.0
        assert e["loss"] == pytest.approx(e["ce"] + 1.0 * e["tckd"] + 8.0 * e["nckd"], rel=1e-5)
        assert e["tckd"] > 0 and e["nckd"] > 0


def test_same_seed_gives_bit_identical_runs(runs, tiny_prep_dir):
    root = runs["root"]
    again = train_lib.train_and_evaluate(
        _config(tiny_prep_dir, **{"train.on_device": "on"}),
        root / "student_again",
        teacher_workdir=root / "teacher",
    )
    _assert_trees_equal(_params(root / "student_on"), _params(root / "student_again"))
    assert again["test"] == runs["student_on"]["test"]
    other = train_lib.train_and_evaluate(
        _config(tiny_prep_dir, **{"train.on_device": "on", "train.seed": 1}),
        root / "student_seed1",
        teacher_workdir=root / "teacher",
    )
    a, b = _params(root / "student_on"), _params(root / "student_seed1")
    assert not all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    assert other["step"] == again["step"]


@pytest.mark.parametrize("mode", ["off", "on"])
def test_killed_run_resumes_to_bit_identical_results(runs, tiny_prep_dir, mode):
    root = runs["root"]
    wd = root / f"resumed_{mode}"
    total = runs[f"student_{mode}"]["step"]
    # Streaming: checkpoints every step, killed at the last step before its checkpoint, so the
    # run resumes mid-epoch. On-device: checkpoints at epoch ends, killed after the last epoch's
    # loop, so the run resumes from the previous epoch end.
    abort = total if mode == "off" else total - 1
    cfg = _config(
        tiny_prep_dir,
        **{
            "train.on_device": mode,
            "train.checkpoint_every_steps": 1,
            "train.debug_abort_after_steps": abort,
        },
    )
    with pytest.raises(train_lib.SimulatedAbort):
        train_lib.train_and_evaluate(cfg, wd, teacher_workdir=root / "teacher")
    done = checkpointing.Checkpointer(wd / "checkpoints", max_to_keep=10).all_steps()
    spe = _events(wd)[0]["steps_per_epoch"]
    assert done and max(done) == (total - 1 if mode == "off" else total - spe)
    # Rerun the same command (the debug abort is off now): resumes from the last checkpoint.
    cfg = _config(tiny_prep_dir, **{"train.on_device": mode})
    result = train_lib.train_and_evaluate(cfg, wd, teacher_workdir=root / "teacher")
    _assert_trees_equal(_params(root / f"student_{mode}"), _params(wd))
    assert result["test"] == runs[f"student_{mode}"]["test"]
    assert result["best_validation"] == runs[f"student_{mode}"]["best_validation"]
    assert _events(wd) == _events(root / f"student_{mode}")


@pytest.mark.parametrize("loss", ["kd", "tckd", "nckd", "ce"])
def test_every_ablation_loss_trains(runs, tiny_prep_dir, loss):
    root = runs["root"]
    # The distillation losses reuse the fixture's on-device student program (the loss weights
    # are runtime values); the CE student (no teacher: another program) streams, which is the
    # demo test's compiled CE student step (tests/test_demo.py runs first).
    on_device = "off" if loss == "ce" else "on"
    cfg = _config(tiny_prep_dir, **{"kd.loss": loss, "train.on_device": on_device})
    result = train_lib.train_and_evaluate(
        cfg, root / f"abl_{loss}", teacher_workdir=root / "teacher"
    )
    events = _events(root / f"abl_{loss}")
    assert events[0]["loss"] == loss
    assert events[0]["teacher"] == ("none" if loss == "ce" else "precomputed")
    train = [e for e in events if e["event"] == "train"]
    for e in train:
        distill = {"kd": e["kd"], "tckd": e["tckd"], "nckd": 8.0 * e["nckd"], "ce": 0.0}[loss]
        assert e["loss"] == pytest.approx(e["ce"] + distill, rel=1e-5)
    assert np.isfinite(result["train"]["loss"]) and result["test"]["num_utterances"] > 0


def test_augmented_student_runs_the_teacher_live(runs, tiny_prep_dir):
    root = runs["root"]
    cfg = _config(
        tiny_prep_dir,
        **{
            "train.on_device": "off",
            "optim.num_epochs": 1,
            "augment.time_shift_frames": 4,
            "augment.freq_masks": 1,
            "augment.time_masks": 1,
            "augment.mixup_alpha": 0.4,
        },
    )
    result = train_lib.train_and_evaluate(cfg, root / "augmented", teacher_workdir=root / "teacher")
    assert result["teacher"] == "live"
    assert json.loads((root / "augmented" / "teacher.json").read_text())["mode"] == "live"
    train = [e for e in _events(root / "augmented") if e["event"] == "train"]
    assert train and all(np.isfinite(e["loss"]) and e["tckd"] > 0 for e in train)
    assert runs["teacher_digest"] == _digest(root / "teacher" / run_dir.CHECKPOINT_DIR)


def test_teacher_trained_on_other_data_is_refused(runs, tiny_prep_dir, tmp_path):
    root = runs["root"]
    with pytest.raises(train_lib.TeacherMismatchError, match="test leak"):
        train_lib.train_and_evaluate(
            _config(tiny_prep_dir, **{"data.fold": 1}),
            tmp_path / "s1",
            teacher_workdir=root / "teacher",
        )
    hint = "train the student with the teacher's --preset, or --config.data.normalization=none"
    with pytest.raises(train_lib.TeacherMismatchError, match=f"feature normalisation.*; {hint}"):
        train_lib.train_and_evaluate(
            _config(tiny_prep_dir, **{"data.normalization": "utterance"}),
            tmp_path / "s2",
            teacher_workdir=root / "teacher",
        )
    with pytest.raises(train_lib.TeacherMismatchError, match="different split"):
        train_lib.train_and_evaluate(
            _config(tiny_prep_dir, **{"data.validation": "none"}),
            tmp_path / "s3",
            teacher_workdir=root / "teacher",
        )
    with pytest.raises(train_lib.TeacherMismatchError, match="cannot use teacher"):
        train_lib.train_and_evaluate(
            _config(tiny_prep_dir), tmp_path / "s4", teacher_workdir=tmp_path
        )
    with pytest.raises(train_lib.TrainingError, match="needs a teacher"):
        train_lib.train_and_evaluate(_config(tiny_prep_dir), tmp_path / "s5")


def test_finished_student_without_its_teacher_points_at_eval(runs, tiny_prep_dir, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(runs["root"] / "student_off", student, ignore=shutil.ignore_patterns(".lock"))
    cfg = _config(tiny_prep_dir, **{"train.on_device": "off"})
    hint = f"{student} finished training, and only training needs its teacher: score it with"
    with pytest.raises(train_lib.TeacherMismatchError, match="cannot use teacher") as e:
        train_lib.train_and_evaluate(cfg, student, teacher_workdir=tmp_path / "moved")
    assert f"{hint} python eval.py --workdir {student}" in str(e.value)
    partly = tmp_path / "partly"  # a run that still has steps to go needs the teacher: no hint
    shutil.copytree(student, partly)
    (partly / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (student / "metrics.jsonl").read_text().splitlines()
                if '"final"' not in line)
    )  # fmt: skip
    with pytest.raises(train_lib.TeacherMismatchError, match="cannot use teacher") as e:
        train_lib.train_and_evaluate(cfg, partly, teacher_workdir=tmp_path / "moved")
    assert "eval.py" not in str(e.value)


def test_teacher_with_another_feature_config_is_refused(runs, tiny_prep_dir, tmp_path):
    import shutil

    fake = tmp_path / "teacher_copy"
    shutil.copytree(runs["root"] / "teacher", fake)
    split_file = fake / "split.json"
    d = json.loads(split_file.read_text())
    d["data"]["feature_config"]["n_mfcc"] = 40
    split_file.write_text(json.dumps(d))
    with pytest.raises(train_lib.TeacherMismatchError, match="different feature config"):
        train_lib.train_and_evaluate(_config(tiny_prep_dir), tmp_path / "s", teacher_workdir=fake)


def test_workdir_with_another_config_is_refused_and_compatible_changes_resume(runs, tiny_prep_dir):
    wd = runs["root"] / "teacher"
    cfg = _config(tiny_prep_dir, **TEACHER)
    bad = config_lib.apply_overrides(cfg, ["optim.learning_rate=0.01"])
    with pytest.raises(run_dir.WorkdirError, match=r"optim.learning_rate: 0.001 -> 0.01"):
        train_lib.train_and_evaluate(bad, wd)
    # A resume-compatible change on a finished run: nothing retrains, same final numbers.
    ok = config_lib.apply_overrides(cfg, ["train.progress=true", "train.keep_checkpoints=3"])
    before = _digest(wd / "checkpoints")
    result = train_lib.train_and_evaluate(ok, wd)
    assert _digest(wd / "checkpoints") == before
    assert result["test"] == runs["teacher"]["test"]


def test_nonfinite_loss_stops_with_step_batch_and_last_good_checkpoint(
    runs, tiny_prep_dir, tmp_path, monkeypatch
):
    cfg = _config(tiny_prep_dir, **TEACHER)
    real = input_pipeline.load_segments
    poisoned = {}

    def load_segments(prep_dir, layout, ids, **kw):
        arrays = real(prep_dir, layout, ids, **kw)
        if layout == "train":
            arrays.features[3, 0, 0] = np.nan
            poisoned["n"] = len(arrays)
        return arrays

    monkeypatch.setattr(input_pipeline, "load_segments", load_segments)
    wd = tmp_path / "nan"
    with pytest.raises(train_lib.NonFiniteLossError) as e:
        train_lib.train_and_evaluate(cfg, wd)
    # The first batch of epoch 0 that holds segment 3 (same order as the run: seed 0 data key).
    n, batch = poisoned["n"], cfg.optim.batch_size
    steps = input_pipeline.steps_per_epoch(n, batch)
    data_key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1)
    idx, mask = input_pipeline.host_epoch_order(data_key, 0, n, steps, batch)
    expected = next(s for s in range(steps) if np.any((idx[s] == 3) & mask[s]))
    assert (e.value.step, e.value.epoch, e.value.batch) == (expected, 1, expected)
    kept = "last good state" if expected > 0 else "no good state exists yet"
    assert f"step {expected}" in str(e.value) and kept in str(e.value)
    state, meta = checkpointing.Checkpointer(wd / "checkpoints", max_to_keep=5).restore()
    assert int(state["step"]) == expected and meta["step"] == expected
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    assert any(ev["event"] == "nonfinite" for ev in _events(wd))


@pytest.mark.parametrize("mode", ["global", "speaker"])
def test_normalization_statistics_come_from_training_data(runs, tiny_prep_dir, mode, capsys):
    wd = runs["root"] / f"norm_{mode}"
    cfg = _config(
        tiny_prep_dir,
        **{**TEACHER, "data.normalization": mode, "optim.num_epochs": 1},
    )
    capsys.readouterr()
    train_lib.train_and_evaluate(cfg, wd)
    # every class trains and no confound here (a 1-epoch tiny model may predict one class:
    # that warning is about its scores, not its data)
    err = capsys.readouterr().err.splitlines()
    assert not [ln for ln in err if "warning" in ln and "on its test set" not in ln], err
    assert json.loads((wd / "results.json").read_text())["untrained_classes"] == []
    norm = json.loads((wd / "normalization.json").read_text())
    split, _ = run_dir.load_split(wd)
    train = input_pipeline.load_segments(_prep(runs), "train", split.train_ids)
    assert norm["mode"] == mode
    if mode == "global":
        ref = input_pipeline.fit_normalization(train, "global")
        np.testing.assert_allclose(norm["mean"], ref["mean"], rtol=1e-6)
        assert len(norm["std"]) == 26
    else:  # the training speakers only: no test or validation speaker
        assert set(norm["groups"]) == set(train.speakers.tolist())
    assert run_dir.restore_run(wd).normalization == norm


def test_a_fold_that_trains_without_a_class_says_so(tmp_path, capsys):
    """A class recorded by one speaker only: the loso fold holding that speaker out trains
    without it (it used to score a recall of 0 for it without a word)."""
    import helpers_prep
    import soundfile as sf

    import data_prep

    corpus, rows = tmp_path / "corpus", ["path,label,speaker"]
    corpus.mkdir()
    for s, speaker in enumerate(("s1", "s2", "s3")):
        for c, label in enumerate(("neutral", "happy", "sad", "angry")):
            if label != "angry" or speaker == "s1":  # angry: s1 only
                name = f"{speaker}_{label}.wav"
                sf.write(corpus / name, helpers_prep.tone(2.2, freq=150 + 40 * c, seed=s), 16000)
                rows.append(f"{name},{label},{speaker}")
    (corpus / "m.csv").write_text("\n".join(rows) + "\n")
    prep = tmp_path / "prep"
    data_prep.prepare(
        "csv", manifest=corpus / "m.csv", out_dir=prep, feature_config="mfcc26", progress=False
    )
    argv = ["--data", str(prep), "--workdir", str(tmp_path / "run"), "--role", "teacher"]
    argv += ["--preset", "tiny", "--config.optim.num_epochs=1"]
    assert train_cli.main(argv) == 0
    expected = (
        "warning: loso-fold0-s1 trains on no utterance of angry (1 in the test set): the model "
        "cannot predict what it never saw and UA counts a recall of 0 for each one tested (a "
        "class from one speaker or session only?)"
    )
    assert expected in capsys.readouterr().err.splitlines()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["untrained_classes"] == ["angry"] and results["absent_classes"] == []
    assert results["per_class"]["angry"]["recall"] == 0.0


def test_a_batch_larger_than_the_training_split_is_warned_about(tiny_prep_dir, tmp_path, capsys):
    """batch 4096 on a 60-segment split used to train (or run out of memory allocating 30 GB)
    without a word: one step an epoch, padded with 4,000 masked copies of the segments."""
    cfg = _config(tiny_prep_dir, **{**TEACHER, "optim.batch_size": 512})
    capsys.readouterr()
    run = train_lib._resolve_run(cfg, tmp_path / "big", overwrite=False, warn=True)
    n = len(run.data.train)
    assert run.spe == 1 and run.local_batch == 512 > n
    err = [ln for ln in capsys.readouterr().err.splitlines() if "optim.batch_size" in ln]
    assert err == [train_lib.oversized_batch_warning(512, n, 512, len(run.devices), 1)]
    assert f"larger than the training split ({n} segment(s))" in err[0]
    fitting = _config(tiny_prep_dir, **{**TEACHER, "optim.batch_size": 8})
    train_lib._resolve_run(fitting, tmp_path / "fits", overwrite=False, warn=True)
    assert "optim.batch_size" not in capsys.readouterr().err


def test_oversized_batch_warning_numbers():
    assert train_lib.oversized_batch_warning(32, 32, 32, 1, 1) is None  # fits exactly
    text = train_lib.oversized_batch_warning(4096, 60, 4096, 1, 1)
    assert "(60 segment(s))" in text and "4036 masked copies, 68.3x" in text
    assert text.endswith("optim.batch_size=60 or less pads little or nothing")
    # 2 processes x 2 devices, 4096 global = 2048 per process; 61 segments on the busiest one:
    # per device at most 30, so 30 x 2 devices x 2 processes
    text = train_lib.oversized_batch_warning(4096, 61, 2048, 2, 2)
    assert "on the process with the most" in text and "optim.batch_size=120 or less" in text
    assert "1987 masked copies, 33.6x" in text


def test_oom_errors_get_a_hint():
    hint = train_lib._oom_hint(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1GB"))
    assert "optim.batch_size" in str(hint) and "train.on_device=off" in str(hint)
    assert train_lib._oom_hint(RuntimeError("something else")) is None


def test_restore_run_gives_the_final_model(runs):
    wd = runs["root"] / "student_on"
    run = run_dir.restore_run(wd)
    assert run.step == runs["student_on"]["step"]
    assert run.normalization == {"mode": "none"}
    assert run.data_info["label_names"] == ["neutral", "happy", "sad", "angry"]
    split, _ = run_dir.load_split(wd)
    eval_set = input_pipeline.load_eval_set(_prep(runs), "test", split.test_ids, run.normalization)
    scores = eval_lib.score_eval_set(run.model, run.variables, eval_set, batch_size=16)
    again = eval_lib.eval_summary(scores, eval_set, num_classes=4)
    assert again == runs["student_on"]["test"]
    # Training wrote results.json from the same scores (no second evaluation needed).
    results = run_dir.read_results(wd)
    assert (results["wa"], results["ua"]) == (again["wa"], again["ua"])
    assert results["confusion_matrix"] == again["confusion_matrix"]
    assert len(run_dir.read_scores(wd)) == again["num_utterances"]
    best = run_dir.restore_run(wd, best=True)
    assert best.step == runs["student_on"]["best_validation"]["step"]
    with pytest.raises(ValueError, match="no checkpoint at step 999"):
        run_dir.restore_run(wd, step=999)


def test_cli_errors_are_one_line(tmp_path, capsys, tiny_prep_dir, runs):
    rc = train_cli.main(["--data", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = train_cli.main(["--data", str(empty), "--workdir", str(tmp_path / "w")])
    assert rc == 2 and "data directory is empty" in capsys.readouterr().err
    rc = train_cli.main(
        ["--data", str(tiny_prep_dir), "--workdir", str(tmp_path / "w"), "--config.kd.betta=3"]
    )
    assert rc == 2 and "kd has no 'betta'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--data", str(tiny_prep_dir), "--workdir", "w", "--bogus"])
    # Options that an override would silently beat, or that the role does not use (all before
    # any data is read: argparse's exit 2 with the usage line).
    base = ["--data", str(tiny_prep_dir), "--workdir", str(tmp_path / "w")]
    for extra, message in (
        (["--config.data.prep_dir=/elsewhere"], "--config.data.prep_dir conflicts with --data"),
        (["--role", "teacher", "--config.model.role=student"], "model.role conflicts with --role"),
        (["--loss", "ce", "--config.kd.loss=dkd"], "--config.kd.loss conflicts with --loss"),
        (["--role", "teacher", "--loss", "kd"], "--loss: not used with --role teacher"),
        (["--role", "teacher", "--teacher", "t"], "--teacher: not used with --role teacher"),
        (["--loss", "ce", "--config.kd.loss =dkd"], "--config.kd.loss conflicts with --loss"),
    ):
        with pytest.raises(SystemExit) as e:
            train_cli.main(base + extra)
        assert e.value.code == 2 and message in capsys.readouterr().err
    rc = train_cli.main([*base, "--preset", "tiny", "--loss", "ce", "--teacher", "t"])
    err = capsys.readouterr().err
    assert rc == 2 and "--teacher t: a student trained with kd.loss='ce' uses no teacher" in err
    rc = train_cli.main([*base, "--preset", "tiny", "--num-processes", "4", "--process-id", "2"])
    assert rc == 2 and "without a coordinator" in capsys.readouterr().err
    # More steps than int32 counts: was an OverflowError traceback at the first step.
    huge = ["--config.optim.num_epochs=2147483647", "--config.optim.batch_size=2"]  # >1 step each
    rc = train_cli.main([*base, "--role", "teacher", *huge])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("train.py: error: optim.num_epochs=2147483647 × ")
    assert "more steps than JAX counts in int32" in err and err.count("\n") == 1
    # Rerunning the teacher's command resumes the finished run and prints its summary.
    argv = [
        "--data",
        str(tiny_prep_dir),
        "--workdir",
        str(runs["root"] / "teacher"),
        "--role",
        "teacher",
        "--preset",
        "tiny",
        "--config.data.validation=speaker",
        "--config.data.validation_fraction=0.5",
        "--config.train.log_every_steps=1",
        "--config.optim.num_epochs=3",
        "--config.train.on_device=on",
    ]
    assert train_cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["test"]["ua"] == runs["teacher"]["test"]["ua"]


def test_cpu_devices_split_the_batch_and_are_refused_once_jax_runs(tmp_path, capsys, tiny_prep_dir):
    argv = ["--data", str(tiny_prep_dir), "--workdir", str(tmp_path / "w"), "--preset", "tiny"]
    argv += ["--role", "teacher"]

    def fresh_process(*extra):
        proc = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *argv, *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr

    # --cpu-devices 3 reaches the run (over the suite's XLA flag of 2 host devices), which
    # refuses the tiny preset's batch of 8 as not divisible by 3 devices.
    err = fresh_process("--cpu-devices", "3")
    assert "optim.batch_size=8 is not divisible by the 3 device(s)" in err
    # A train.num_devices that contradicts it is named before the run uses it.
    err = fresh_process("--cpu-devices", "3", "--config.train.num_devices=4")
    assert "--cpu-devices 3 but train.num_devices=4: this run uses 4 of them" in err
    assert "train.num_devices=4 but only 3 local device(s)" in err
    # In this process JAX already runs: a clear refusal, not a silently ignored setting.
    assert len(jax.devices()) == 2  # the suite's two host devices, now fixed
    assert train_cli.main([*argv, "--cpu-devices", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "JAX has already started its backends" in err
    with pytest.raises(SystemExit):
        train_cli.main([*argv, "--cpu-devices", "0"])
    assert "--cpu-devices: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(distributed.DistributedError, match="integer >= 1, got 0"):
        distributed.use_cpu_devices(0)
    with pytest.raises(distributed.DistributedError, match="at most 4096"):
        distributed.use_cpu_devices(distributed.MAX_CPU_DEVICES + 1)
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_area_attention_teacher_distils_a_head_fusion_student(tiny_prep_dir, tmp_path):
    """Spec §2.3 option 2: an area-attention teacher (dropout on) distilled into MACNN."""
    arch = {
        "model.teacher.preset": "area_teacher",
        "model.teacher.attention_heads": 1,
        "model.teacher.attention_hidden": 4,
    }
    cfg = _config(tiny_prep_dir, **{**TEACHER, **arch, "optim.num_epochs": 1})
    train_lib.train_and_evaluate(cfg, tmp_path / "area_teacher")
    teacher = run_dir.restore_run(tmp_path / "area_teacher")
    assert teacher.model.attention == "area"
    assert "area_attention" in str(jax.tree_util.tree_structure(teacher.variables["params"]))

    scfg = _config(tiny_prep_dir, **arch, **{"optim.num_epochs": 1, "train.on_device": "off"})
    result = train_lib.train_and_evaluate(
        scfg, tmp_path / "student", teacher_workdir=tmp_path / "area_teacher"
    )
    student = run_dir.restore_run(tmp_path / "student")
    assert student.model.attention == "head_fusion"
    events = _events(tmp_path / "student")
    assert events[0]["teacher"] == "precomputed"
    train = [e for e in events if e["event"] == "train"]
    assert train and all(np.isfinite(e["tckd"]) and np.isfinite(e["nckd"]) for e in train)
    assert any(e["nckd"] > 0 for e in train)
    assert np.isfinite(result["train"]["loss"]) and result["test"]["num_utterances"] > 0


def test_out_of_host_memory_is_one_line(tmp_path, capsys, monkeypatch, tiny_prep_dir):
    from dkd_jax import train_lib

    def huge(*args, **kwargs):  # what numpy raises for --config.optim.batch_size=1000000000
        raise MemoryError("Unable to allocate 5.96 TiB for an array with shape (1000000000, 1)")

    monkeypatch.setattr(train_lib, "train_and_evaluate", huge)
    rc = train_cli.main(["--data", str(tiny_prep_dir), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("train.py: error: out of host memory (Unable to allocate 5.96 TiB")
    assert "a smaller optim.batch_size" in err


def _teacher_argv(prep_dir, workdir):
    """train.py's command of the fixture's teacher (rerunning it resumes the finished run)."""
    overrides = {k: v for k, v in TEACHER.items() if k != "model.role"}
    return [
        "--data", str(prep_dir), "--workdir", str(workdir), "--role", "teacher",
        "--preset", "tiny", "--config.data.validation=speaker",
        "--config.data.validation_fraction=0.5", "--config.train.log_every_steps=1",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]  # fmt: skip


def test_overwrite_keeps_the_old_run_until_the_new_one_passes_its_checks(runs, tmp_path, capsys):
    """An audit: `--overwrite` deleted a finished run, then refused the new one (a student
    without --teacher, or a teacher of other labels): the user lost both."""
    student = tmp_path / "student"
    shutil.copytree(runs["root"] / "student_on", student)
    before = _digest(student)
    config = json.loads((student / run_dir.CONFIG_FILE).read_text())
    argv = [
        "--data", config["data"]["prep_dir"], "--workdir", str(student), "--preset", "tiny",
        "--overwrite", "--config.kd.beta=2",
    ]  # fmt: skip
    rc = train_cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "needs a teacher: pass --teacher" in err
    assert _digest(student) == before  # was: an empty folder


def test_a_log_gets_heartbeat_lines_and_sigterm_stops_like_ctrl_c(
    runs, tiny_prep_dir, tmp_path, capsys, monkeypatch
):
    """An audit: with stderr not a terminal (nohup, SLURM, `2> log`) train.py printed nothing
    until its summary; SIGTERM (scancel, preemption) ended it in silence with its lock left
    behind (a job requeued on another host was refused until the lock was deleted by hand)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(runs["root"] / "teacher", teacher)
    argv = _teacher_argv(tiny_prep_dir, teacher)
    monkeypatch.setattr(train_cli, "HEARTBEAT_SECONDS", 0.01)
    assert train_cli.main([*argv, "--config.train.progress=true"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["test"]["ua"] == runs["teacher"]["test"]["ua"]
    assert f"      ... {teacher}: " in err  # the heartbeat, on stderr: stdout stays the JSON
    assert f"train.py: wrote {teacher / run_dir.RESULTS_FILE}, {teacher / 'confusion.png'}" in err
    results = json.loads((teacher / run_dir.RESULTS_FILE).read_text())
    note = eval_lib.collapse_note(results["confusion_matrix"], results["label_names"])
    said = f"warning: {teacher}: on its test set the model {note}; check the training length"
    assert note is not None and said in err, err  # the tiny teacher: all one class
    assert all(line.startswith("{") for line in out.strip().splitlines()), out

    def terminated(*args, **kwargs):
        assert (teacher / run_dir.LOCK_FILE).exists()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises here
        raise AssertionError("SIGTERM did not stop the run")

    # Where it stops decides the way to resume: with --overwrite, stopped before the old run
    # was replaced (here: loading the data), --overwrite is still needed; once the new run
    # wrote its config (here: its epochs), rerunning with --overwrite would delete it.
    config = (teacher / run_dir.CONFIG_FILE).read_text()
    lr = ["--config.optim.learning_rate=0.005"]
    for where, extra, how in (
        ((train_lib, "_build_state"), [], ""),
        ((train_lib.input_pipeline, "load_run_data"), ["--overwrite", *lr], ""),
        ((train_lib, "_run_epochs"), ["--overwrite"], " without --overwrite"),
    ):
        with monkeypatch.context() as m:
            m.setattr(*where, terminated)
            rc = train_cli.main([*argv, *extra])
        err = capsys.readouterr().err
        assert rc == 128 + signal.SIGTERM
        last = err.strip().splitlines()[-1]
        assert last == f"train.py: terminated (SIGTERM); rerun the same command{how} to resume"
        assert not (teacher / run_dir.LOCK_FILE).exists()  # released
        if extra[1:] == lr:
            assert (teacher / run_dir.CONFIG_FILE).read_text() == config  # not replaced yet
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again


def test_a_resumed_student_keeps_the_teacher_it_started_with(runs, tiny_prep_dir, tmp_path, capsys):
    """An audit: a student resumed (or rerun) with another --teacher went on in silence, and
    its teacher.json then named only the second teacher."""
    student = tmp_path / "student"
    shutil.copytree(runs["root"] / "student_on", student)
    recorded = json.loads((student / run_dir.TEACHER_FILE).read_text())
    teacher = run_dir.restore_run(runs["root"] / "teacher")
    assert recorded["weights_digest"] == run_dir.variables_digest(teacher.variables)
    moved = tmp_path / "moved_teacher"  # the same teacher elsewhere: accepted
    shutil.copytree(runs["root"] / "teacher", moved)
    train_lib._check_same_teacher(student, moved, run_dir.restore_run(moved))
    earlier = tmp_path / "earlier_teacher"  # the teacher one checkpoint back: another one
    shutil.copytree(runs["root"] / "teacher", earlier)
    steps = sorted(int(p.name) for p in (earlier / run_dir.CHECKPOINT_DIR).iterdir())
    shutil.rmtree(earlier / run_dir.CHECKPOINT_DIR / str(steps[-1]))
    cfg = _config(tiny_prep_dir, **{"train.on_device": "on"})
    with pytest.raises(train_lib.TeacherMismatchError) as e:
        train_lib.train_and_evaluate(cfg, student, teacher_workdir=earlier)
    assert str(e.value).startswith(
        f"{student} was distilled from the teacher {recorded['workdir']} (step {steps[-1]}); "
        f"--teacher {earlier} (step {steps[-2]}) has other weights: resume with the teacher "
        "it started with"
    )
    assert json.loads((student / run_dir.TEACHER_FILE).read_text()) == recorded  # untouched
    # A teacher.json of an earlier version (no digest): the step decides.
    legacy = {k: v for k, v in recorded.items() if k != "weights_digest"}
    (student / run_dir.TEACHER_FILE).write_text(json.dumps(legacy))
    train_lib._check_same_teacher(student, moved, run_dir.restore_run(moved))
    with pytest.raises(train_lib.TeacherMismatchError, match="has other weights"):
        train_lib._check_same_teacher(student, earlier, run_dir.restore_run(earlier))
    (student / run_dir.TEACHER_FILE).write_text(json.dumps(recorded))
    # The damaged newest checkpoint of a teacher: train.py has no --step to suggest.
    damaged = tmp_path / "damaged_teacher"
    shutil.copytree(runs["root"] / "teacher", damaged)
    for f in (damaged / run_dir.CHECKPOINT_DIR / str(steps[-1])).rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(train_lib.TeacherMismatchError) as e:
        train_lib.train_and_evaluate(cfg, tmp_path / "new_student", teacher_workdir=damaged)
    assert "unreadable checkpoint" in str(e.value) and "--step" not in str(e.value)
    assert f"aside to use step {steps[-2]}, or retrain the run" in str(e.value)
    # The moved teacher, as if killed before its end: which checkpoint it gives is said.
    metrics = moved / run_dir.METRICS_FILE
    kept = [ln for ln in metrics.read_text().splitlines() if '"final"' not in ln]
    metrics.write_text("\n".join(kept) + "\n")
    capsys.readouterr()
    train_lib.train_and_evaluate(cfg, student, teacher_workdir=moved)
    err = capsys.readouterr().err
    assert f"warning: the teacher {moved}: training reached its last step" in err
    assert f"; distilling from its checkpoint at step {steps[-1]}" in err
    res = json.loads((moved / run_dir.RESULTS_FILE).read_text())
    note = eval_lib.collapse_note(res["confusion_matrix"], res["label_names"])
    assert note is not None  # the tiny teacher predicts one class: the warning is exercised
    assert f"warning: the teacher {moved}: on its test set it {note}; a student distils" in err


def test_settings_the_run_never_reads_get_a_note(tiny_prep_dir, capsys):
    """An audit: `--loss kd --config.kd.beta=2` (train.py's own --help example), kd.* for a
    teacher and model.teacher.* for a student were accepted without a word; a missing '='
    (`--config.optim.num_epochs 3`) was "unrecognized arguments: 3"."""

    def notes(role, loss, *fields):
        cfg = config_lib.apply_overrides(
            config_lib.get_config("tiny"), [f"model.role={role}", f"kd.loss={loss}"]
        )
        return train_cli._unused_override_notes(cfg, [f"--config.{f}=1" for f in fields])

    every_kd = ("kd.alpha", "kd.beta", "kd.kd_weight", "kd.temperature", "kd.ce_weight")
    assert notes("student", "dkd", *every_kd) == [
        "--config.kd.kd_weight: not used (kd.loss='dkd' does not use it)"
    ]
    assert [n.split(":")[0] for n in notes("student", "kd", *every_kd)] == [
        "--config.kd.alpha",
        "--config.kd.beta",
    ]
    assert len(notes("student", "tckd", *every_kd)) == 2  # beta, kd_weight
    assert len(notes("student", "ce", *every_kd, "kd.warmup_epochs")) == 6
    assert notes("teacher", "dkd", "kd.beta", "model.student.attention_heads", "optim.seed") == [
        "--config.kd.beta: not used (a teacher trains on CE alone)",
        "--config.model.student.attention_heads: not used (a teacher trains model.teacher)",
    ]
    (note,) = notes("student", "dkd", "model.teacher.attention_heads", "model.student.preset")
    assert note.startswith("--config.model.teacher.attention_heads: not used (a student distils")
    with pytest.raises(SystemExit):
        train_cli.main(["--data", str(tiny_prep_dir), "--workdir", "w",
                        "--config.optim.num_epochs", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert "--config.optim.num_epochs 3: write --config.optim.num_epochs=3 (with '=')" in err


def test_a_run_without_a_test_set_says_why_it_has_no_scores(
    tiny_prep_dir, tmp_path, capsys, monkeypatch
):
    """An audit: `--config.data.protocol=none` printed `"test": null` and wrote no
    results.json without a word (the training itself is train_lib's, tested elsewhere)."""
    seen = {}

    def trained(cfg, workdir, **kwargs):
        seen["protocol"] = cfg.data.protocol
        return {"step": 4, "epoch": 2, "test": None, "best_validation": None}

    monkeypatch.setattr(train_lib, "train_and_evaluate", trained)
    argv = ["--data", str(tiny_prep_dir), "--workdir", str(tmp_path / "w"), "--preset", "tiny"]
    assert train_cli.main([*argv, "--role", "teacher", "--config.data.protocol=none"]) == 0
    out, err = capsys.readouterr()
    assert seen["protocol"] == "none" and json.loads(out)["test"] is None
    assert "note: data.protocol='none' holds out nothing, so there are no test scores" in err
