"""Tests for scoring a trained run (eval_lib.evaluate_run, eval.py) and predicting audio files.

Uses the session's tiny experiment (tests/helpers_eval.py), trained with global feature
normalisation, so the references below must apply the stored training statistics themselves.
"""

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import helpers_eval
import jax
import numpy as np
import pytest
import soundfile as sf

import eval as eval_cli  # the script at the repository root (pytest pythonpath)
from dkd_jax import audio, eval_lib, predict, records, run_dir

RUN = "fold0-seed0/student_dkd"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_path(tiny_prep_dir, tmp_path_factory):
    exp_dir, _, _ = helpers_eval.shared_experiment(tiny_prep_dir, tmp_path_factory)
    return exp_dir / RUN


@pytest.fixture(scope="module")
def restored(run_path):
    return run_dir.restore_run(run_path)


def _normalise(features, norm):
    assert norm["mode"] == "global"
    mean = np.asarray(norm["mean"], np.float32)[:, None]
    std = np.asarray(norm["std"], np.float32)[:, None]
    return ((features - mean) / std).astype(np.float32)


@functools.cache
def _jitted_forward(model):
    """The model's eval-mode forward, jitted once per model (eager ``apply`` would compile
    every layer's operations one by one)."""
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def _forward(restored, x):
    """The restored model's logits of one unpadded batch."""
    return np.asarray(_jitted_forward(restored.model)(restored.variables, x))


def _reference_logits(restored, features):
    """Model logits of one unpadded batch (no masking, no pmap): the lineage's per-utterance way."""
    x = _normalise(features, restored.normalization)[..., None]
    return np.asarray(_forward(restored, x), np.float64)


def test_evaluate_run_matches_per_utterance_reference(run_path, restored, tiny_prep_dir):
    res = json.loads((run_path / run_dir.RESULTS_FILE).read_text())
    rows = run_dir.read_scores(run_path)
    split = json.loads((run_path / "split.json").read_text())
    arrays = records.load_split(tiny_prep_dir, "eval")
    names = records.load_metadata(tiny_prep_dir)["label_names"]
    test = np.isin(arrays.utterance_ids, split["test_ids"])
    logits = _reference_logits(restored, arrays.features[test])  # one unpadded batch
    ids, labels = arrays.utterance_ids[test], arrays.labels[test]
    cm = np.zeros((4, 4), int)
    assert sorted(rows) == sorted(split["test_ids"])
    for utt in split["test_ids"]:  # mean logits per utterance, then argmax (lineage rule)
        sel = ids == utt
        mean = logits[sel].mean(axis=0)
        cm[labels[sel][0], int(np.argmax(mean))] += 1
        np.testing.assert_allclose(rows[utt]["scores"], mean, rtol=1e-5, atol=1e-5)
        assert rows[utt]["num_segments"] == int(sel.sum())
        assert rows[utt]["prediction"] == names[int(np.argmax(mean))]
        assert rows[utt]["label"] == names[labels[sel][0]]
    segments = int(test.sum())
    assert res["confusion_matrix"] == cm.tolist()
    assert res["num_segments"] == segments and res["num_utterances"] == len(split["test_ids"])
    assert res["wa"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-12)
    recalls = np.diag(cm) / cm.sum(1)
    assert res["ua"] == pytest.approx(recalls[cm.sum(1) > 0].mean(), abs=1e-12)
    assert res["label_names"] == names
    assert res["step"] == restored.step


def test_evaluate_run_probs_mode_and_step(run_path, restored):
    res = eval_lib.evaluate_run(run_path, write=False, verbose=False, mode="probs", step=None)
    assert res["aggregation"].startswith("mean of segment probs")
    logits_mode = json.loads((run_path / run_dir.RESULTS_FILE).read_text())
    assert res["num_utterances"] == logits_mode["num_utterances"]
    with pytest.raises(eval_lib.EvalError, match="no checkpoint at step 999"):
        eval_lib.evaluate_run(run_path, step=999, write=False, verbose=False)
    assert res["checkpoint"] == logits_mode["checkpoint"] == "latest"
    steps = sorted(int(p.name) for p in (run_path / run_dir.CHECKPOINT_DIR).iterdir())
    again = eval_lib.evaluate_run(run_path, step=steps[-1], write=False, verbose=False)
    assert again["checkpoint"] == "latest"  # --step of the newest checkpoint is the latest
    assert len(steps) > 1  # an older one is named by its step (it used to say "latest")
    older = eval_lib.evaluate_run(run_path, step=steps[0], write=False, verbose=False)
    assert older["checkpoint"] == f"step {steps[0]}" and older["step"] == steps[0]


def test_eval_cli_writes_results_and_plot(run_path, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(run_path, work)
    (work / run_dir.RESULTS_FILE).unlink()
    (work / run_dir.CONFUSION_FILE).unlink()
    (work / run_dir.SCORES_FILE).unlink()
    assert eval_cli.main(["--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    res = json.loads((work / run_dir.RESULTS_FILE).read_text())
    assert f"WA {100 * res['wa']:.2f} %" in out and "confusion matrix" in out
    assert (work / run_dir.CONFUSION_FILE).read_bytes()[:4] == b"\x89PNG"
    assert len(run_dir.read_scores(work)) == res["num_utterances"]
    for key in ("packages", "device", "git"):
        assert key in res["provenance"]
    assert res["data"]["content_hash"].startswith("sha256:")


def test_eval_cli_splits_the_cpu_into_devices(run_path, tmp_path, capsys):
    """--cpu-devices N scores over N JAX CPU devices (a fresh process: the device count must be
    chosen before JAX starts) with the one-device numbers, and is refused once JAX runs."""
    work = tmp_path / "run"
    shutil.copytree(run_path, work)
    before = json.loads((work / run_dir.RESULTS_FILE).read_text())
    scores = run_dir.read_scores(work)
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--workdir", str(work), "--cpu-devices", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((work / run_dir.RESULTS_FILE).read_text())
    assert after["provenance"]["device"]["local_device_count"] == 3  # over the suite's 2
    assert (after["wa"], after["ua"]) == (before["wa"], before["ua"])
    split = run_dir.read_scores(work)
    assert split.keys() == scores.keys() and scores
    for key, row in scores.items():
        assert split[key]["prediction"] == row["prediction"]
        np.testing.assert_allclose(split[key]["scores"], row["scores"], atol=1e-5)
    # In this process JAX already runs: a one-line refusal, not a silently ignored setting.
    assert eval_cli.main(["--workdir", str(work), "--cpu-devices", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "JAX has already started its backends" in err
    assert eval_cli.main(["--workdir", str(work), "--cpu-devices", str(2**31)]) == 2
    err = capsys.readouterr().err.strip()  # JAX itself would overflow: refused before it
    assert err.count("\n") == 0 and f"--cpu-devices {2**31}: at most 4096" in err
    argv = ["predict", "--workdir", str(work), "a.wav", "--cpu-devices", "3"]
    assert eval_cli.main(argv) == 2
    assert "JAX has already started its backends" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["predict", "--model", str(work), "a.wav", "--cpu-devices", "2"])
    assert "with --model use --threads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["predict", "--model", str(work), "--stream", "a.wav", "--cpu-devices", "2"])
    assert "with --model use --threads" in capsys.readouterr().err


def test_eval_cli_errors_are_one_line(run_path, tiny_prep_dir, tmp_path, capsys):
    rc = eval_cli.main(["--workdir", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("eval.py: error: ") and "no such run directory" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "a_file").write_text("")
    assert eval_cli.main(["--workdir", str(tmp_path / "a_file")]) == 2
    assert "a_file: a file, not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a batch size of 0 used to fall back to the config's
        eval_cli.main(["--workdir", str(run_path), "--batch-size", "0"])
    assert "--batch-size" in capsys.readouterr().err
    # a prep dir with other content than the run was trained on
    other = tmp_path / "other_prep"
    shutil.copytree(tiny_prep_dir, other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["content_hash"] = "sha256:" + "0" * 64
    (other / "metadata.json").write_text(json.dumps(meta))
    rc = eval_cli.main(["--workdir", str(run_path), "--data", str(other), "--no-write"])
    err = capsys.readouterr().err
    assert rc == 2 and "content hash" in err and "Traceback" not in err
    assert "the same classes and feature settings, other utterances, labels or feature bits;" in err
    # a prep made again by a later front end (same audio, a few values one ulp apart): said so
    split = json.loads((run_path / "split.json").read_text())
    assert split["data"]["front_end"] == 2  # recorded by training
    meta["front_end"] = 3
    (other / "metadata.json").write_text(json.dumps(meta))
    assert eval_cli.main(["--workdir", str(run_path), "--data", str(other), "--no-write"]) == 2
    assert "front end version 2, this prep holds version 3" in capsys.readouterr().err
    del meta["front_end"]
    # other classes or other features: named (the content hash differs too, and said nothing)
    meta["label_names"] = ["neutral", "sad", "angry"]
    (other / "metadata.json").write_text(json.dumps(meta))
    assert eval_cli.main(["--workdir", str(run_path), "--data", str(other), "--no-write"]) == 2
    assert (
        f"{other}: its classes ['neutral', 'sad', 'angry'] differ from the run's ['neutral', "
        "'happy', 'sad', 'angry']; pass the run's own prep dir with --data"
    ) in capsys.readouterr().err
    meta["label_names"] = ["neutral", "happy", "sad", "angry"]
    meta["feature_config"] = dict(meta["feature_config"], n_mfcc=40)
    (other / "metadata.json").write_text(json.dumps(meta))
    assert eval_cli.main(["--workdir", str(run_path), "--data", str(other), "--no-write"]) == 2
    assert "its features differ from the run's: n_mfcc 40 (run: 26)" in capsys.readouterr().err


def test_a_run_trained_with_a_relative_data_path_is_scored_from_anywhere(
    run_path, tiny_prep_dir, tmp_path, monkeypatch, capsys
):
    from dkd_jax import config as config_lib
    from dkd_jax import train_lib

    cfg = run_dir.load_config(run_path)
    monkeypatch.chdir(tiny_prep_dir.parent)  # train.py --data tiny_prep0, from its parent
    cfg.data.prep_dir = tiny_prep_dir.name
    cfg.optim.num_epochs = 1
    cfg.model.role, cfg.kd.loss = "teacher", "ce"
    train_lib.train_and_evaluate(config_lib.from_dict(config_lib.to_dict(cfg)), tmp_path / "rel")
    assert run_dir.load_config(tmp_path / "rel").data.prep_dir == str(tiny_prep_dir)  # absolute
    monkeypatch.chdir(tmp_path)
    assert eval_cli.main(["--workdir", "rel", "--no-write"]) == 0
    moved = tmp_path / "moved"  # a run whose prep is not where it was: the way out is named
    shutil.copytree(tmp_path / "rel", moved)
    config = json.loads((moved / run_dir.CONFIG_FILE).read_text())
    config["data"]["prep_dir"] = str(tmp_path / "gone")
    (moved / run_dir.CONFIG_FILE).write_text(json.dumps(config))
    capsys.readouterr()
    assert eval_cli.main(["--workdir", str(moved), "--no-write"]) == 2
    assert capsys.readouterr().err == (
        f"eval.py: error: {moved}: the prep dir the run recorded, {tmp_path / 'gone'}, is not "
        "there (moved, or another machine?); pass the run's prep dir with --data\n"
    )
    assert eval_cli.main(["--workdir", str(moved), "--data", str(tiny_prep_dir), "--no-write"]) == 0


def test_a_run_in_use_is_refused_before_scoring_and_no_write_says_it_is_training(
    run_path, tmp_path, capsys
):
    work = tmp_path / "run"
    shutil.copytree(run_path, work)
    records_ = run_dir.read_metrics(work)
    kept = [r for r in records_ if r["event"] != "final"]
    (work / run_dir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    with helpers_eval.lock_held_elsewhere(work, "training") as pid:  # training in it
        scored = []
        real = eval_lib.score_eval_set
        try:
            eval_lib.score_eval_set = lambda *a, **k: scored.append(1) or real(*a, **k)
            assert eval_cli.main(["--workdir", str(work)]) == 2
        finally:
            eval_lib.score_eval_set = real
        err = capsys.readouterr().err
        assert scored == [] and f"in use by training (pid {pid}" in err  # refused first
        assert "pass --no-write to score its newest checkpoint" in err
        assert eval_cli.main(["--workdir", str(work), "--no-write"]) == 0
        err = capsys.readouterr().err
        assert f"{work}: still training (training (pid {pid}" in err
        assert "run the same train.py command again" not in err  # it is running: no resume


def test_missing_checkpoints_are_explained_by_what_the_run_did(run_path, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(run_path, work)
    for step in (work / run_dir.CHECKPOINT_DIR).iterdir():
        shutil.rmtree(step)
    assert eval_cli.main(["--workdir", str(work), "--no-write"]) == 2
    err = capsys.readouterr().err
    assert (
        "training finished, so they were deleted afterwards; results.json keeps its scores" in err
    )
    assert "run its train.py command again" not in err  # it would do nothing: finished


def test_a_run_without_its_normalisation_statistics_is_refused(run_path, tmp_path, capsys):
    """Deleted or damaged normalization.json of a run trained with "global": one line naming
    the file (it used to score unnormalised features, or end in a KeyError / broadcast error)."""
    from dkd_jax import export

    work = tmp_path / "run"
    shutil.copytree(run_path, work)
    norm_file = work / run_dir.NORMALIZATION_FILE
    stats = json.loads(norm_file.read_text())
    bands = len(stats["mean"])
    damaged = {
        "missing": None,
        "no 'mean'": {"mode": "global", "std": stats["std"]},
        f"'mean' has shape [5], expected [{bands}]": {**stats, "mean": [0.0] * 5},
        "'std' holds values that are not finite and positive": {**stats, "std": [0.0] * bands},
    }
    for message, content in damaged.items():
        if content is None:
            norm_file.unlink()
        else:
            norm_file.write_text(json.dumps(content))
        rc = eval_cli.main(["--workdir", str(work), "--no-write"])
        err = capsys.readouterr().err
        assert rc == 2 and str(norm_file) in err and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        with pytest.raises(export.ExportError, match=re.escape(message)):
            export.restore(work)


def test_a_config_that_no_longer_fits_the_checkpoint_is_one_line(run_path, tmp_path, capsys):
    """config.json edited after training (here the student's attention width): the restore
    names the checkpoint and the first differing parameter (it used to end in a traceback of
    flax's ScopeParamShapeError when the model was applied)."""
    work = tmp_path / "run"
    shutil.copytree(run_path, work)
    config = json.loads((work / run_dir.CONFIG_FILE).read_text())
    role = config["model"]["role"]
    config["model"][role]["attention_hidden"] *= 2
    (work / run_dir.CONFIG_FILE).write_text(json.dumps(config))
    rc = eval_cli.main(["--workdir", str(work), "--no-write"])
    err = capsys.readouterr().err
    assert rc == 2 and "the checkpoint does not fit the model" in err and "has shape" in err
    assert "params/classifier/kernel has shape (4, 4), the model expects (8, 4)" in err, err
    assert "was config.json edited?" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    config["model"][role]["attention_hidden"] //= 2  # back as trained: restores
    (work / run_dir.CONFIG_FILE).write_text(json.dumps(config))
    assert run_dir.restore_run(work).step > 0


def test_scoring_an_unfinished_run_warns_and_the_runner_trains_it_on(run_path, tmp_path, capsys):
    """A run killed mid-training (metrics.jsonl without its final record): eval.py scores it
    with a warning and records training_finished: false, and the experiment runner no longer
    counts such a run as finished (it used to skip it, reporting the partly trained model)."""
    from dkd_jax.experiment import spec as experiment_spec

    cfg = run_dir.load_config(run_path)
    assert experiment_spec.is_finished(run_path, cfg)
    work = tmp_path / "run"
    shutil.copytree(run_path, work)
    records_ = run_dir.read_metrics(work)
    total = records_[0]["total_steps"]
    kept = [r for r in records_ if r["event"] != "final" and r.get("step", 0) <= total // 2]
    (work / run_dir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert eval_cli.main(["--workdir", str(work)]) == 0
    err = capsys.readouterr().err
    assert f"eval.py: warning: {work}: training stopped at step {total // 2} of {total}" in err
    results = json.loads((work / run_dir.RESULTS_FILE).read_text())
    assert results["training_finished"] is False
    assert not experiment_spec.is_finished(work, cfg)
    finished = json.loads((run_path / run_dir.RESULTS_FILE).read_text())
    assert finished["training_finished"] is True
    assert run_dir.not_final_results(run_path, finished) is None
    assert "partly trained" in run_dir.not_final_results(work, results)
    for checkpoint in ("best-by-validation", "step 4"):  # eval.py --best / --step 4
        problem = run_dir.not_final_results(run_path, {**finished, "checkpoint": checkpoint})
        assert problem == f"results.json scores the {checkpoint} checkpoint, not the last one"
    # A run killed during its final evaluation: every step done, no "final" record.
    done = [r for r in records_ if r["event"] != "final"]
    (work / run_dir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in done))
    assert f"training reached its last step ({total}) but" in run_dir.unfinished_warning(work)


@pytest.fixture(scope="module")
def wav_files(tiny_corpus_dir, tiny_prep_dir, tmp_path_factory):
    """Odd-format copies of one real corpus utterance, plus broken files."""
    meta = records.load_metadata(tiny_prep_dir)
    utt = max(meta["utterances"], key=lambda u: u["duration_s"])  # several windows
    src = tiny_corpus_dir / utt["path"]
    wave, rate = sf.read(src, dtype="float32")
    assert rate == 16000
    out = tmp_path_factory.mktemp("wavs")
    files = {"orig": src}
    files["8k"] = out / "a_8k.wav"
    sf.write(files["8k"], audio.resample(wave, orig_sr=16000, target_sr=8000), 8000)
    files["stereo44"] = out / "b_44k_stereo.wav"
    w44 = audio.resample(wave, orig_sr=16000, target_sr=44100)
    sf.write(files["stereo44"], np.stack([w44, 0.5 * w44], axis=1), 44100, subtype="FLOAT")
    files["u8"] = out / "c_u8.wav"
    sf.write(files["u8"], wave, 16000, subtype="PCM_U8")
    files["short"] = out / "d_short.wav"
    sf.write(files["short"], wave[:8000], 16000)
    files["text"] = out / "e_not_audio.wav"
    files["text"].write_text("this is not a wav file\n")
    files["empty"] = out / "f_empty.wav"
    files["empty"].write_bytes(b"")
    return files, utt


def test_predict_matches_the_prep_and_training_pipeline(
    run_path, restored, wav_files, tiny_prep_dir
):
    files, utt = wav_files
    pred = predict.predict_files(run_path, [files["orig"]], segments=True)
    (entry,) = pred["files"]
    # Reference: the prep's own eval-layout segments of this utterance, normalised, scored.
    arrays = records.load_split(tiny_prep_dir, "eval")
    sel = arrays.utterance_ids == utt["utterance_id"]
    logits = _reference_logits(restored, arrays.features[sel])
    mean = logits.mean(axis=0)
    expected = np.exp(mean - mean.max()) / np.exp(mean - mean.max()).sum()
    got = np.array([entry["probabilities"][n] for n in pred["label_names"]])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert entry["num_segments"] == int(sel.sum()) == len(entry["segments"])
    seg0 = np.array([entry["segments"][0]["probabilities"][n] for n in pred["label_names"]])
    np.testing.assert_allclose(seg0, jax.nn.softmax(logits[0]), rtol=1e-4, atol=1e-6)
    starts = [s["start_s"] for s in entry["segments"]]
    assert starts[0] == 0.0 and np.allclose(np.diff(starts), 0.4, atol=0.02)
    assert entry["prediction"] == pred["label_names"][int(np.argmax(expected))]


def test_predict_odd_formats_and_errors(run_path, wav_files):
    files, utt = wav_files
    order = ["8k", "stereo44", "u8", "short", "text", "empty"]
    traces = eval_lib.TRACE_COUNTS["predict"]
    pred = predict.predict_files(run_path, [files[k] for k in order])
    # files of different lengths share one compiled prediction function (at most one new trace)
    assert eval_lib.TRACE_COUNTS["predict"] - traces <= 1
    traces = eval_lib.TRACE_COUNTS["predict"]
    predict.predict_files(run_path, [files["short"]])
    eval_lib.evaluate_run(run_path, write=False, verbose=False)
    assert eval_lib.TRACE_COUNTS["predict"] == traces
    assert [e["path"] for e in pred["errors"]] == [str(files["text"]), str(files["empty"])]
    assert "not a readable audio file" in pred["errors"][0]["error"]
    assert "empty" in pred["errors"][1]["error"]
    got = {e["path"]: e for e in pred["files"]}
    assert len(got) == 4
    for entry in got.values():
        assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert entry["prediction"] in pred["label_names"]
    short = got[str(files["short"])]
    assert short["padded"] and short["num_segments"] == 1 and short["duration_s"] == 0.5
    for key in ("8k", "stereo44", "u8"):  # same audio, other formats: same length, windows
        e = got[str(files[key])]
        assert e["duration_s"] == pytest.approx(utt["duration_s"], abs=1e-3)
        assert e["num_segments"] == utt["num_eval_segments"]
    # 8-bit quantisation changes the features a little, not the shape of the answer
    assert not got[str(files["u8"])]["padded"]
    # 8 kHz audio is predicted, with a warning: its upper bands reach the model empty
    assert pred["warnings"] == [
        f"{files['8k']}: recorded at 8000 Hz: nothing above 4000 Hz reaches the model (trained "
        "on 16000-Hz audio), so its prediction may suffer"
    ]


def test_predict_cli(run_path, wav_files, tmp_path, capsys):
    files, _ = wav_files
    out_json = tmp_path / "pred.json"
    argv = ["predict", "--workdir", str(run_path), str(files["short"]), str(files["text"])]
    rc = eval_cli.main([*argv, "--segments", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 2
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"eval.py: error: {files['text']}: not a readable audio file")
    assert "Traceback" not in captured.err
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["file", "seconds", "windows"]
    assert "padded" in lines[1] and "0.00-2.00 s" in lines[2]
    saved = json.loads(out_json.read_text())
    assert len(saved["files"]) == 1 and len(saved["errors"]) == 1
    assert eval_cli.main(["predict", "--workdir", str(run_path), str(files["8k"])]) == 0


def test_predict_groups_normalise_one_speakers_files_together(
    run_path, restored, wav_files, tmp_path, capsys
):
    files, _ = wav_files
    copy = helpers_eval.speaker_normalised_copy(run_path, tmp_path)
    pair = [files["orig"], files["short"]]
    grouped = predict.predict_files(copy, pair, groups=["spk", "spk"])
    alone = predict.predict_files(copy, pair)
    assert [f["group"] for f in grouped["files"]] == ["spk", "spk"] and not grouped["warnings"]
    assert "per-speaker normalisation" in alone["warnings"][0] and "--group" in alone["warnings"][0]
    # Reference: one mean/std per band over the real frames of both files' windows.
    fc = audio.FeatureConfig.from_dict(restored.data_info["feature_config"])
    segs = [predict.file_segments(f, fc) for f in pair]
    feats = np.concatenate([s["segments"] for s in segs])
    valid = np.concatenate([s["valid_frames"] for s in segs])
    mask = np.arange(feats.shape[2])[None, :] < valid[:, None]
    x = np.where(mask[:, None, :], feats, np.nan).astype(np.float64)
    mean, std = np.nanmean(x, axis=(0, 2)), np.sqrt(np.nanvar(x, axis=(0, 2)) + 1e-6)
    norm = ((feats - mean[None, :, None]) / std[None, :, None]).astype(np.float32)
    logits = _forward(restored, norm[..., None])
    start = 0
    for s, entry in zip(segs, grouped["files"], strict=True):
        m = logits[start : start + len(s["segments"])].mean(axis=0)
        start += len(s["segments"])
        expected = np.exp(m - m.max()) / np.exp(m - m.max()).sum()
        got = np.array([entry["probabilities"][n] for n in grouped["label_names"]])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    short_alone = alone["files"][1]["probabilities"]
    assert short_alone != grouped["files"][1]["probabilities"]
    # The command line: --group NAME FILE..., a warning once without groups.
    argv = ["predict", "--workdir", str(copy)]
    assert eval_cli.main([*argv, "--group", "spk", *map(str, pair)]) == 0
    out = capsys.readouterr()
    assert "group" in out.out.splitlines()[0] and "warning" not in out.err
    assert eval_cli.main([*argv, *map(str, pair)]) == 0
    assert capsys.readouterr().err.count("eval.py: warning:") == 1
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text(f"path,speaker\n{pair[0]},spk\n{pair[1]},spk\n")
    assert (
        eval_cli.main([*argv, "--groups", str(csv_path), "--json", str(tmp_path / "p.json")]) == 0
    )
    via_csv = json.loads((tmp_path / "p.json").read_text())
    assert [f["probabilities"] for f in via_csv["files"]] == [
        f["probabilities"] for f in grouped["files"]
    ]
    # Paths relative to the CSV's own folder (as in data_prep manifests), not the current one
    folder = tmp_path / "listed"
    folder.mkdir()
    for name, src in zip(("a.wav", "b.wav"), pair, strict=True):
        shutil.copy(src, folder / name)
    (folder / "groups.csv").write_text("path,speaker\na.wav,spk\nb.wav,spk\n")
    json_out = tmp_path / "rel.json"
    assert (
        eval_cli.main([*argv, "--groups", str(folder / "groups.csv"), "--json", str(json_out)]) == 0
    )
    relative = json.loads(json_out.read_text())
    assert [f["probabilities"] for f in relative["files"]] == [
        f["probabilities"] for f in grouped["files"]
    ]
    with pytest.raises(SystemExit):
        eval_cli.main([*argv, "--group", "lonely"])
