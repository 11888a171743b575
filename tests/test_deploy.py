"""Tests for prediction without JAX: dkd_jax.deploy, eval.py predict --model / --stream.

The exported model is the tiny trained run of tests/helpers_export.py (global normalisation).
References: ``eval.py predict --workdir`` (the Flax model through JAX), and
``input_pipeline.normalize_arrays`` for the per-utterance rule. The JAX-free claims are checked
in subprocesses in which ``import jax`` (and flax, optax, orbax) fails.
"""

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import unicodedata
from contextlib import redirect_stdout
from pathlib import Path

import helpers_eval
import helpers_export
import helpers_permissions
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("jax2onnx", reason="needs the export extra: pip install -e '.[export]'")
pytest.importorskip("onnxruntime", reason="needs the export extra")

import eval as eval_cli  # the script at the repository root (pytest pythonpath)
from dkd_jax import (
    audio,
    deploy,
    export,
    file_damage,
    input_pipeline,
    jsonio,
    predict,
    records,
    streaming,
)

REPO = Path(__file__).resolve().parents[1]

PROB_TOL = 1e-4
NO_JAX = """
import runpy, sys
BANNED = ("jax", "jaxlib", "flax", "optax", "orbax", "orbax.checkpoint", "chex")
for name in BANNED:
    sys.modules[name] = None  # any `import jax` now raises ImportError
sys.argv = ["eval.py", *sys.argv[1:]]
try:
    runpy.run_path("eval.py", run_name="__main__")
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BANNED and sys.modules[m])
    print("LOADED:" + ",".join(loaded), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def run_dir(tiny_prep_dir, tmp_path_factory):
    return helpers_export.tiny_run(tiny_prep_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def model_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "student"
    export.export_run(run_dir, out, formats=["onnx"])
    return out


@pytest.fixture(scope="module")
def audio_files(tiny_corpus_dir, tmp_path_factory):
    """Corpus WAVs, a short 44.1-kHz stereo file (resampled, mixed down, padded), a broken one."""
    wavs = sorted(Path(tiny_corpus_dir).rglob("*.wav"))
    wavs = [w for w in wavs if not w.name.startswith("._")][:4]
    d = tmp_path_factory.mktemp("audio")
    t = np.arange(round(1.2 * 44100)) / 44100
    left = 0.3 * np.sin(2 * np.pi * 220 * t)
    sf.write(d / "short_stereo.wav", np.stack([left, 0.5 * left], axis=1), 44100)
    (d / "broken.wav").write_bytes(b"RIFF\x00\x00not audio")
    return [str(w) for w in wavs] + [str(d / "short_stereo.wav"), str(d / "broken.wav")]


def _no_jax_run(args, *, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", NO_JAX, *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=300,
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert err.strip().splitlines()[-1] == "LOADED:", err  # nothing of JAX was imported
    return proc.returncode, out, err


def _cli(argv):
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = eval_cli.main(argv)
    return rc, buf.getvalue()


def _main_with_stdin(data: bytes, argv):
    """eval.py's main with ``data`` on stdin (a pipe, as `... | eval.py predict --stream -`)."""
    read, write = os.pipe()
    os.write(write, data)  # small: fits in the pipe's buffer
    os.close(write)
    with open(read, "rb") as stdin:
        real = sys.stdin
        sys.stdin = io.TextIOWrapper(stdin)
        try:
            return eval_cli.main(argv)
        finally:
            sys.stdin = real


def _assert_same_predictions(a, b, tol=PROB_TOL):
    assert a["label_names"] == b["label_names"] and a["errors"] == b["errors"]
    assert len(a["files"]) == len(b["files"])
    for fa, fb in zip(a["files"], b["files"], strict=True):
        for key in ("path", "duration_s", "num_segments", "padded"):
            assert fa[key] == fb[key], key
        pa, pb = (np.array(list(f["probabilities"].values())) for f in (fa, fb))
        np.testing.assert_allclose(pa, pb, rtol=0, atol=tol)
        for sa, sb in zip(fa.get("segments", []), fb.get("segments", []), strict=True):
            assert (sa["start_s"], sa["end_s"]) == (sb["start_s"], sb["end_s"])
            pa, pb = (np.array(list(s["probabilities"].values())) for s in (sa, sb))
            np.testing.assert_allclose(pa, pb, rtol=0, atol=tol)


def test_predict_model_matches_predict_workdir(run_dir, model_dir, audio_files):
    ref = predict.predict_files(run_dir, audio_files, segments=True)
    got = deploy.predict_files(model_dir, audio_files, segments=True)
    _assert_same_predictions(got, ref)
    probs = np.array([list(f["probabilities"].values()) for f in got["files"]])
    assert probs.max(axis=1).min() < 0.9 and np.ptp(probs, axis=0).max() > 0.2  # not constant
    assert len(got["errors"]) == 1 and got["errors"][0]["path"].endswith("broken.wav")
    assert got["files"][-1]["padded"] and got["files"][-1]["num_segments"] == 1


def test_eval_cli_model_prints_the_workdir_table_without_jax(run_dir, model_dir, audio_files):
    rc_ref, table_ref = _cli(["predict", "--workdir", str(run_dir), *audio_files, "--segments"])
    rc, out, err = _no_jax_run(["predict", "--model", str(model_dir), *audio_files, "--segments"])
    assert rc == rc_ref == 2  # the broken file
    assert "error: " in err and "broken.wav" in err
    assert out.splitlines()[0] == table_ref.splitlines()[0]  # same header
    rows, rows_ref = out.splitlines()[1:], table_ref.splitlines()[1:]
    assert len(rows) == len(rows_ref) > len(audio_files)
    for row, row_ref in zip(rows, rows_ref, strict=True):  # same text, numbers within rounding
        words, words_ref = row.split(), row_ref.split()
        assert len(words) == len(words_ref)
        for w, w_ref in zip(words, words_ref, strict=True):
            try:
                assert abs(float(w) - float(w_ref)) <= 1.5e-3
            except ValueError:
                assert w == w_ref


def test_per_utterance_normalisation_matches_input_pipeline(tiny_prep_dir, model_dir, tmp_path):
    arrays = records.load_split(tiny_prep_dir, "eval")
    short = int(np.argmin(arrays.valid_frames))
    assert arrays.valid_frames[short] < arrays.features.shape[2]  # a padded window is included
    utt = arrays.utterance_ids[short]
    one = arrays.select(arrays.utterance_ids == utt)
    ref = input_pipeline.normalize_arrays(one, {"mode": "utterance"}).features
    got = deploy.normalize_segments(one.features, one.valid_frames, {"mode": "utterance"})
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    norm = {"mode": "global", "mean": list(np.arange(26.0)), "std": list(np.arange(1.0, 27.0))}
    ref = input_pipeline.normalize_arrays(one, norm).features
    got = deploy.normalize_segments(one.features, one.valid_frames, norm)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(deploy.DeployError, match="unknown normalization"):
        deploy.normalize_segments(one.features, one.valid_frames, {"mode": "speaker"})


def _with_normalization(model_dir, tmp_path, normalization):
    copy = tmp_path / "model_copy"
    shutil.copytree(model_dir, copy)
    card = json.loads((copy / "model.json").read_text())
    card["normalization"] = normalization
    (copy / "model.json").write_text(json.dumps(card))
    return copy


def test_speaker_groups_normalise_together_like_predict_workdir(
    run_dir, model_dir, audio_files, tmp_path
):
    """A per-speaker run: --model and --workdir normalise one group's files together alike."""
    run_copy = helpers_eval.speaker_normalised_copy(run_dir, tmp_path)
    card = {"mode": "utterance", "trained_with": "speaker", "variance_epsilon": 1e-6}
    model_copy = _with_normalization(model_dir, tmp_path, card)
    files = audio_files[:3]
    groups = ["spk_a", "spk_a", None]
    ref = predict.predict_files(run_copy, files, groups=groups)
    got = deploy.predict_files(model_copy, files, groups=groups)
    _assert_same_predictions(got, ref)
    assert [f["group"] for f in got["files"]] == groups
    for pred in (got, ref):  # the file of no group is said (was: only when no file had one)
        (warning,) = pred["warnings"]
        assert f"1 of 3 files have no speaker group ({files[2]})" in warning
    alone = deploy.predict_files(model_copy, files)
    assert "per-speaker normalisation" in alone["warnings"][0]
    first = np.array(list(alone["files"][0]["probabilities"].values()))
    grouped = np.array(list(got["files"][0]["probabilities"].values()))
    assert np.abs(first - grouped).max() > 1e-4  # the group's statistics made a difference


def test_a_group_named_like_a_training_speaker_is_normalised_by_its_own_files(
    run_dir, model_dir, audio_files, tmp_path
):
    """--workdir normalised a group named like a training speaker with that speaker's stored
    statistics, which an export does not carry: --model answered differently (0.7-2.3 %
    probability in an audit, where 1e-4 is promised) and neither said so."""
    from dkd_jax import run_dir as run_dir_lib

    run_copy = helpers_eval.speaker_normalised_copy(run_dir, tmp_path)
    bands = deploy.feature_config(deploy.load_card(model_dir)).segment_shape[0]
    rng = np.random.default_rng(0)
    norm = {
        "mode": "speaker",
        "groups": {"Ses02F": {"mean": rng.normal(size=bands).tolist(), "std": [2.0] * bands}},
    }
    (run_copy / run_dir_lib.NORMALIZATION_FILE).write_text(json.dumps(norm))
    card = export._normalization_card(norm, bands)
    assert "Ses02F" not in json.dumps(card)  # training speakers are not shipped
    model_copy = _with_normalization(model_dir, tmp_path, card)
    files = audio_files[:3]
    named = predict.predict_files(run_copy, files, groups=["Ses02F", "Ses02F", "spk_a"])
    renamed = predict.predict_files(run_copy, files, groups=["mine", "mine", "spk_a"])
    got = deploy.predict_files(model_copy, files, groups=["Ses02F", "Ses02F", "spk_a"])
    _assert_same_predictions(got, named)
    _assert_same_predictions(named, renamed, tol=0.0)  # the name does not matter


def test_predict_files_per_utterance_mode(model_dir, audio_files, tmp_path):
    copy = _with_normalization(model_dir, tmp_path, {"mode": "utterance"})
    got = deploy.predict_files(copy, audio_files[:3])
    fc = deploy.feature_config(deploy.load_card(copy))
    for path, entry in zip(audio_files[:3], got["files"], strict=True):
        seg = predict.file_segments(path, fc)
        n = len(seg["valid_frames"])
        arrays = records.SegmentArrays(
            features=seg["segments"],
            labels=np.zeros(n, np.int32),
            utterance_ids=np.full(n, "f"),
            segment_index=np.arange(n, dtype=np.int32),
            valid_frames=seg["valid_frames"],
            speakers=np.full(n, "f"),
            sessions=np.full(n, ""),
            genders=np.full(n, ""),
        )
        x = input_pipeline.normalize_arrays(arrays, {"mode": "utterance"}).features
        logits = export.onnx_logits(copy / "model.onnx", x[..., None])
        ref = deploy.softmax(logits.mean(axis=0))
        np.testing.assert_allclose(list(entry["probabilities"].values()), ref, atol=1e-6)


def _long_file(audio_files, tmp_path):
    waves = [audio.load_audio(p, sample_rate=16000) for p in audio_files[:4]]
    path = tmp_path / "long.wav"
    sf.write(path, np.concatenate(waves), 16000, subtype="FLOAT")
    return path


def test_stream_matches_file_prediction(model_dir, audio_files, tmp_path):
    path = _long_file(audio_files, tmp_path)
    model = deploy.OnnxClassifier(model_dir)
    file_pred = deploy.predict_files(model, [path], segments=True)["files"][0]["segments"]
    blocks = streaming.file_blocks(path, sample_rate=16000)
    rows = list(streaming.stream_rows(model, blocks, smoothing_seconds=0.0))
    assert len(rows) == len(file_pred) > 10
    for r, s in zip(rows, file_pred, strict=True):
        assert r["start_s"] == s["start_s"] and r["end_s"] == s["end_s"]
        got, ref = (np.array(list(x["probabilities"].values())) for x in (r, s))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # per-utterance mode: statistics of the stream so far; the last window sees the file's
    copy = _with_normalization(model_dir, tmp_path, {"mode": "utterance"})
    umodel = deploy.OnnxClassifier(copy)
    file_pred = deploy.predict_files(umodel, [path], segments=True)["files"][0]["segments"]
    rows = list(streaming.stream_rows(umodel, streaming.file_blocks(path, sample_rate=16000)))
    last, ref = (np.array(list(x["probabilities"].values())) for x in (rows[-1], file_pred[-1]))
    np.testing.assert_allclose(last, ref, rtol=0, atol=1e-5)
    first, ref = (np.array(list(x["probabilities"].values())) for x in (rows[0], file_pred[0]))
    assert np.abs(first - ref).max() > 1e-3  # the first window saw only itself


def test_cli_stream_file_and_stdin_without_jax(tmp_path):
    model = helpers_export.band_model_folder(tmp_path / "band")
    wave, _ = helpers_export.tone_sequence((1, 3, 0), (2.9, 3.3, 2.6))
    pcm = np.round(wave * 32767).astype("<i2")
    path = tmp_path / "tones.wav"
    sf.write(path, pcm, 16000, subtype="PCM_16")
    rc, table, _ = _no_jax_run(["predict", "--model", str(model), "--stream", str(path)])
    assert rc == 0
    lines = table.splitlines()
    assert lines[0].split() == ["start", "end", *helpers_export.BAND_LABELS, "window", "smoothed"]
    rc, jsonl, _ = _no_jax_run(
        ["predict", "--model", str(model), "--stream", "-", "--rate", "16000", "--jsonl"],
        stdin=pcm.tobytes(),
    )
    assert rc == 0
    rows = [json.loads(line) for line in jsonl.splitlines()]
    assert len(rows) == len(lines) - 1 == round((8.8 - 2.0) / 0.4) + 1
    for row, line in zip(rows, lines[1:], strict=True):  # stdin PCM == the same file
        assert line.split()[-2:] == [row["prediction"], row["smoothed_prediction"]]
        assert float(line.split()[0]) == row["start_s"]
    # another rate on stdin is resampled: the labels away from the boundaries are unchanged
    wave44 = audio.resample(wave, orig_sr=16000, target_sr=22050)
    rc, out, _ = _no_jax_run(
        ["predict", "--model", str(model), "--stream", "-", "--rate", "22050", "--jsonl"],
        stdin=np.round(wave44 * 32767).astype("<i2").tobytes(),
    )
    rows22 = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and abs(len(rows22) - len(rows)) <= 1
    for a, b in zip(rows, rows22, strict=False):
        centre = (a["start_s"] + a["end_s"]) / 2
        if min(abs(centre - 2.9), abs(centre - 6.2)) > 0.3:
            assert a["prediction"] == b["prediction"]


def test_cli_model_errors_are_one_line(run_dir, model_dir, tmp_path, capsys):
    rc = eval_cli.main(["predict", "--model", str(tmp_path / "nope"), "a.wav"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("eval.py: error: ") and "nope: no such folder" in err
    assert len(err.strip().splitlines()) == 1
    rc = eval_cli.main(["predict", "--model", str(model_dir), "--stream", str(tmp_path / "x.wav")])
    err = capsys.readouterr().err
    assert rc == 2 and "x.wav" in err and len(err.strip().splitlines()) == 1
    rc = eval_cli.main(["predict", "--model", str(model_dir)])
    assert rc == 2 and "no audio files" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --workdir and --model are exclusive
        eval_cli.main(["predict", "--model", str(model_dir), "--workdir", "w", "a.wav"])
    with pytest.raises(SystemExit):
        eval_cli.main(["predict", "--workdir", "w", "--stream", "-"])
    rc = eval_cli.main(["predict", "--model", str(run_dir), "a.wav"])  # a run, not an export
    err = capsys.readouterr().err
    assert rc == 2 and "it is a training run: use --workdir, or export it first" in err


def _card_variants(model):
    card = json.loads((model / "model.json").read_text())
    f = card["features"]
    yield "not an object", "null", "a JSON object expected, got NoneType"
    yield "not UTF-8", b"\xff\xfe{}", "not valid JSON"
    yield "features", {**card, "features": {**f, "kind": "wavelet"}}, "features: invalid"
    yield "files", {**card, "files": {"onnx": {}}}, 'files must map each format to {"path"'
    yield "mode", {**card, "normalization": {"mode": "speaker"}}, "normalization.mode must be"
    bad_norm = {"mode": "global", "mean": [0.0] * 3, "std": [1.0] * 40}
    yield "mean", {**card, "normalization": bad_norm}, "normalization.mean must hold 40 finite"
    bad_norm = {"mode": "global", "mean": [0.0] * 40, "std": [1.0] * 39 + [0.0]}
    yield "std", {**card, "normalization": bad_norm}, "normalization.std must hold 40 positive"
    yield "labels", {**card, "label_names": ["a", "b", "c"]}, "gives 4 logits, but"
    yield "bands", {**card, "features": {**f, "n_mels": 64}}, "[N, 40, 200, 1] and gives 4"


def test_bad_model_cards_are_one_line_errors_before_any_audio(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    base = helpers_export.band_model_folder(tmp_path / "band")
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, np.float32), 16000)
    for name, card, message in _card_variants(base):
        model = tmp_path / name
        shutil.copytree(base, model)
        raw = card if isinstance(card, str | bytes) else json.dumps(card)
        (model / "model.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        rc = eval_cli.main(["predict", "--model", str(model), str(wav)])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "", name  # was: tracebacks, some after the model loaded
        assert err.startswith(f"eval.py: error: {model}{os.sep}model.") and message in err, err
        assert len(err.strip().splitlines()) == 1
    helpers_permissions.deny_open(monkeypatch, deploy, base / "model.onnx")
    rc = eval_cli.main(["predict", "--model", str(base), str(wav)])
    out, err = capsys.readouterr()  # was: "onnxruntime cannot load it (... error number 13)"
    assert rc == 2 and out == ""
    assert err == f"eval.py: error: {base / 'model.onnx'}: cannot read it (Permission denied)\n"


def test_predict_refuses_unused_options_bad_groups_and_unwritable_json(
    tmp_path, capsys, monkeypatch
):
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    wav = tmp_path / "a.wav"
    sf.write(wav, 0.1 * np.random.default_rng(0).standard_normal(16000), 16000)
    for extra, message in (
        (["--stream", str(wav), "--json", "s.json"], "--json: not used with --stream"),
        (["--stream", str(wav), "--segments", "--best"], "--segments, --best: not used with"),
        ([str(wav), "--step", "3"], "--step: not used here"),
        ([str(wav), "--smooth", "2", "--jsonl"], "--smooth, --jsonl: not used here"),
        (["--stream", str(wav), "--rate", "8000"], "--rate: not used with --stream FILE"),
    ):
        with pytest.raises(SystemExit):
            eval_cli.main(["predict", "--model", model, *extra])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["predict", "--workdir", str(tmp_path), str(wav), "--threads", "2"])
    assert "--threads: not used with --workdir" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # used to take the best checkpoint in silence
        eval_cli.main(["predict", "--workdir", str(tmp_path), str(wav), "--step", "4", "--best"])
    assert "--step and --best: choose one checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["--workdir", str(tmp_path), "--step", "4", "--best"])
    assert "--step and --best: choose one checkpoint" in capsys.readouterr().err
    groups = tmp_path / "groups.csv"
    groups.write_text(f"path,speaker\n{wav},s1\n,s2\n")
    with pytest.raises(SystemExit):  # was: ": cannot open file", no CSV or row named
        eval_cli.main(["predict", "--model", model, "--groups", str(groups)])
    assert f"--groups {groups}:3: the row names no path" in capsys.readouterr().err
    groups.write_bytes(b"path,speaker\nJ\xfcrgen.wav,s1\n")
    with pytest.raises(SystemExit):
        eval_cli.main(["predict", "--model", model, "--groups", str(groups)])
    assert f"--groups {groups}:2: not UTF-8 text" in capsys.readouterr().err
    for text, problem in (
        ("path,speaker\n", "no rows under its header"),
        ("a,b\nx,y\n", "missing column(s) ['path', 'speaker']; the header must name path, speaker"),
    ):
        groups.write_text(text)  # the header alone was "needs a header with columns path,speaker"
        with pytest.raises(SystemExit):
            eval_cli.main(["predict", "--model", model, "--groups", str(groups)])
        assert f"--groups {groups}: {problem}" in capsys.readouterr().err
    for target, problem in ((tmp_path, "is a folder"), (wav / "x.json", "not a folder")):
        rc = eval_cli.main(["predict", "--model", model, str(wav), "--json", str(target)])
        out, err = capsys.readouterr()  # was: the table, then a traceback
        assert rc == 2 and out == "" and err.strip().endswith(problem), err

    def no_new_file(dir=None, prefix=None):  # a folder of mode 555
        raise helpers_permissions.permission_error(os.path.join(dir, "tmpx"))

    monkeypatch.setattr(jsonio.tempfile, "TemporaryFile", no_new_file)
    rc = eval_cli.main(["predict", "--model", model, str(wav), "--json", str(tmp_path / "p.json")])
    out, err = capsys.readouterr()  # was: scored, then an error naming a temporary file
    assert rc == 2 and out == ""
    assert err.strip().endswith(f"{tmp_path}: cannot write into it (Permission denied)")
    monkeypatch.undo()
    # a target that fails only when written: the table stays, the error is one line
    pred = deploy.predict_files(model, [wav])
    blocker = tmp_path / "ro"
    blocker.write_text("")
    assert predict.report_predictions(pred, json_out=str(blocker / "p.json")) == 2
    out, err = capsys.readouterr()
    assert out.startswith("file") and err.startswith(f"eval.py: error: {blocker}")
    # stdout closed by its reader (`| head`): the JSON and the errors still follow
    script = (
        "import json, sys; from dkd_jax import predict; "
        "pred = json.load(open(sys.argv[1])); pred['errors'] = [{'path': 'x', 'error': 'x: bad'}]; "
        "sys.exit(predict.report_predictions(pred, json_out=sys.argv[2]))"
    )
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    r, w = os.pipe()
    os.close(r)  # a reader that has gone away
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "pred.json"), str(tmp_path / "out.json")],
        stdout=w, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    os.close(w)
    assert proc.returncode == 2 and proc.stderr == "eval.py: error: x: bad\n"  # was: 0, nothing
    assert json.loads((tmp_path / "out.json").read_text())["files"] == pred["files"]


def test_nan_stream_and_corrupt_rate_header_are_one_line_errors(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    wave = np.zeros(6 * 16000, np.float32)
    wave[5 * 16000] = np.inf
    path = tmp_path / "inf.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    rc = eval_cli.main(["predict", "--model", model, "--stream", str(path)])
    out, err = capsys.readouterr()  # was: clipped to 1.0 (inf) or NaN rows (NaN), exit 0
    assert rc == 2 and "nan" not in out
    assert err == f"eval.py: error: {path}: audio contains NaN/inf samples (the first at 5.00 s)\n"
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        eval_cli.main(["predict", "--model", model, "--stream", "-", "--rate", "0"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "--rate: expected an integer >= 1, got 0" in err
    assert out == ""  # was: the table header, then the error
    for option, value in (("--rate", "100000000000"), ("--channels", "100000000")):
        rc = eval_cli.main(["predict", "--model", model, "--stream", "-", option, value])
        out, err = capsys.readouterr()  # was: MemoryError traceback
        assert rc == 2 and out == "" and "raw PCM input takes at most 768000 Hz and 256" in err
    for option, value in (("--smooth", "nan"), ("--smooth", "-1"), ("--threads", "0")):
        with pytest.raises(SystemExit) as e:
            eval_cli.main(["predict", "--model", model, "--stream", str(path), option, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"{option}: expected" in err and str(path) not in err.splitlines()[-1], err
    slow = tmp_path / "rate1.wav"
    sf.write(slow, np.zeros(400, np.float32), 1000)
    data = bytearray(slow.read_bytes())
    data[24:28] = (1).to_bytes(4, "little")  # the header's sample rate: 1 Hz
    slow.write_bytes(bytes(data))
    for extra in ([str(slow)], ["--stream", str(slow)]):  # was: 13 GB resampling for 400 kB
        rc = eval_cli.main(["predict", "--model", model, *extra])
        assert rc == 2 and "implausible sample rate 1 Hz" in capsys.readouterr().err
    with pytest.raises(audio.AudioError, match="implausible sample rate 1 Hz") as info:
        audio.load_audio(slow, sample_rate=16000)
    assert info.value.kind == "bad_rate"


def test_stream_reads_a_pipe_given_by_path(tmp_path, capsys):
    """``--stream /dev/stdin`` or ``<(...)``: the cut-WAV check read the pipe's header first, so
    the stream then failed with "Format not recognised"."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    wav = tmp_path / "a.wav"
    sf.write(wav, 0.1 * np.random.default_rng(0).standard_normal(16000), 16000, subtype="PCM_16")
    assert eval_cli.main(["predict", "--model", model, "--stream", str(wav)]) == 0
    expected = capsys.readouterr()
    read, write = os.pipe()
    try:
        os.write(write, wav.read_bytes())  # 32 kB: fits in the pipe's buffer
        os.close(write)
        rc = eval_cli.main(["predict", "--model", model, "--stream", f"/dev/fd/{read}"])
    finally:
        os.close(read)
    got = capsys.readouterr()
    assert rc == 0 and got.out == expected.out and got.err == "", got.err


def test_audio_below_the_models_rate_is_predicted_with_a_warning(tmp_path, capsys):
    """Telephone audio (8 kHz) for a 16-kHz model: a quarter of its mel bands reach it empty;
    the prediction was printed without a word."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    wav = tmp_path / "phone.wav"
    wave = 0.1 * np.random.default_rng(0).standard_normal(2 * 8000)
    sf.write(wav, wave, 8000, subtype="PCM_16")
    warning = (
        "eval.py: warning: {}: recorded at 8000 Hz: nothing above 4000 Hz reaches the model "
        "(trained on 16000-Hz audio), so its prediction may suffer"
    )
    assert eval_cli.main(["predict", "--model", model, str(wav)]) == 0
    assert capsys.readouterr().err.splitlines() == [warning.format(wav)]
    assert eval_cli.main(["predict", "--model", model, "--stream", str(wav)]) == 0
    assert capsys.readouterr().err.splitlines() == [warning.format(wav)]
    raw = (wave * 20000).astype("<i2").tobytes()
    rc = _main_with_stdin(raw, ["predict", "--model", model, "--stream", "-", "--rate", "8000"])
    assert rc == 0 and capsys.readouterr().err.splitlines() == [warning.format("<stdin>")]


def test_a_float_file_beyond_full_scale_is_predicted_with_a_warning(tmp_path, capsys):
    """A float WAV louder than 1.0 was clipped to ±1 before its features without a word (data_prep
    now records and warns about it; predict says it too)."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    wav = tmp_path / "hot.wav"
    wave = (3.0 * np.random.default_rng(0).standard_normal(2 * 16000)).astype(np.float32)
    sf.write(wav, wave, 16000, subtype="FLOAT")
    n, peak = int(np.count_nonzero(np.abs(wave) > 1.0)), float(np.abs(wave).max())
    assert eval_cli.main(["predict", "--model", model, str(wav)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"eval.py: warning: {wav}: {n} samples beyond full scale (peak {peak:g}) were clipped "
        "to ±1: predicted from the distorted audio (scale the file down)"
    ]


def test_very_short_silent_and_cut_audio_get_a_warning(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    rng = np.random.default_rng(0)
    files = {
        "click.wav": 0.1 * rng.standard_normal(160).astype(np.float32),  # 10 ms
        "silent.wav": np.zeros(3 * 16000, np.float32),
        "speechlike.wav": 0.1 * rng.standard_normal(16000).astype(np.float32),
    }
    for name, wave in files.items():
        sf.write(tmp_path / name, wave, 16000)
    paths = [str(tmp_path / n) for n in files]
    pred = deploy.predict_files(model, paths)
    assert [f["path"] for f in pred["files"]] == paths  # warned about, still predicted
    assert pred["warnings"] == [
        f"{paths[0]}: only 0.010 s of audio (under 0.25 s): its prediction says little",
        f"{paths[1]}: {audio.SILENT_REASON}: its prediction says nothing",
    ]
    assert eval_cli.main(["predict", "--model", model, *paths]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"eval.py: warning: {w}" for w in pred["warnings"]]
    dc = tmp_path / "dc.wav"  # a constant level: --stream called it silent, a file was not
    sf.write(dc, np.full(2 * 16000, 0.25, np.float32), 16000, subtype="FLOAT")
    assert deploy.predict_files(model, [dc])["warnings"] == [
        f"{dc}: silent: every sample the same (a constant level): its prediction says nothing"
    ]
    # --stream warns alike (it used to say nothing): at its end, and a cut file at its start
    expected = {
        paths[0]: [f"{paths[0]}: only 0.010 s of audio (under 0.25 s): its predictions say little"],
        paths[1]: [f"{paths[1]}: silent: every sample the same (digital silence): its "
                   "predictions say nothing"],
        paths[2]: [],
    }  # fmt: skip
    for path, warnings in expected.items():
        assert eval_cli.main(["predict", "--model", model, "--stream", path]) == 0
        err = capsys.readouterr().err.splitlines()
        assert err == [f"eval.py: warning: {w}" for w in warnings]
    cut = tmp_path / "cut.wav"  # a copy cut short: 1 s declared, 0.25 s present
    sf.write(cut, files["speechlike.wav"], 16000, subtype="PCM_16")
    cut.write_bytes(cut.read_bytes()[: 44 + 2 * 4000])
    pred = deploy.predict_files(model, [cut])
    assert pred["files"][0]["duration_s"] == 0.25 and pred["warnings"] == [
        f"{cut}: the header declares 1.00 s of audio but the file holds 0.25 s (cut short?): "
        "predicted from what is there"
    ]
    assert eval_cli.main(["predict", "--model", model, "--stream", str(cut)]) == 0
    assert capsys.readouterr().err.splitlines() == [f"eval.py: warning: {pred['warnings'][0]}"]
    assert file_damage.damage_note(tmp_path / "speechlike.wav") is None
    data = bytearray(cut.read_bytes())
    data[40:44] = (0xFFFFFFFF).to_bytes(4, "little")  # a WAV streamed to a pipe: size unknown
    cut.write_bytes(bytes(data))
    assert file_damage.damage_note(cut) is None


def test_an_mp3_cut_short_is_warned_about_in_file_and_stream_mode(tmp_path, capsys):
    """libsndfile decodes a cut MP3 short without a word; its Xing header has the length."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    wave = 0.1 * np.random.default_rng(0).standard_normal(6 * 16000).astype(np.float32)
    whole, cut = tmp_path / "whole.mp3", tmp_path / "cut.mp3"
    sf.write(whole, wave, 16000, format="MP3", subtype="MPEG_LAYER_III")
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert deploy.predict_files(model, [whole])["warnings"] == []
    pred = deploy.predict_files(model, [cut])
    seconds = pred["files"][0]["duration_s"]
    expected = (
        f"{cut}: the header declares 6.00 s of audio but {seconds:.2f} s decode "
        "(cut short or damaged?): predicted from what is there"
    )
    assert 2.0 < seconds < 4.0 and pred["warnings"] == [expected]
    capsys.readouterr()
    assert eval_cli.main(["predict", "--model", model, "--stream", str(whole)]) == 0
    assert [w for w in capsys.readouterr().err.splitlines() if "eval.py" in w] == []
    assert eval_cli.main(["predict", "--model", model, "--stream", str(cut)]) == 0
    err = [w for w in capsys.readouterr().err.splitlines() if "eval.py" in w]  # not mpg123's
    assert err == [f"eval.py: warning: {expected}"]  # once the stream has ended


def _readme_snippet():
    text = (REPO / "README.md").read_text()
    section = text.split("## Deploying a student", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("mode", ["global", "utterance"])
def test_readme_snippet_runs_with_onnxruntime_and_numpy_alone(
    mode, model_dir, audio_files, tmp_path
):
    folder = model_dir
    if mode == "utterance":  # what an export of a per-utterance/per-speaker run writes
        norm = export._normalization_card({"mode": "speaker"}, 26)
        folder = _with_normalization(model_dir, tmp_path, norm)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(folder, work / "student_onnx")
    path = audio_files[0]  # longer than one window: every frame is real
    fc = deploy.feature_config(deploy.load_card(folder))
    np.save(work / "windows.npy", predict.file_segments(path, fc)["segments"])
    banned = "import sys\nfor m in ('jax', 'flax', 'optax', 'dkd_jax', 'librosa'):\n"
    script = banned + "    sys.modules[m] = None\n" + _readme_snippet()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    printed = ast.literal_eval(proc.stdout.strip())  # {label: probability}
    ref = deploy.predict_files(folder, [path])["files"][0]["probabilities"]
    assert list(printed) == list(ref)
    np.testing.assert_allclose(list(printed.values()), list(ref.values()), atol=1e-3)
    assert len(_readme_snippet().strip().splitlines()) <= 16


def _speaker_band_model(tmp_path):
    """The band model, as if trained with per-speaker normalisation."""
    model = helpers_export.band_model_folder(tmp_path / "band")
    card = json.loads((model / "model.json").read_text())
    card["normalization"] = {"mode": "utterance", "trained_with": "speaker"}
    (model / "model.json").write_text(json.dumps(card))
    return str(model)


def _tone_files(tmp_path, count):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        wav = tmp_path / f"t{k}.wav"
        t = np.arange(16000) / 16000
        tone = 0.2 * np.sin(2 * np.pi * helpers_export.BAND_TONES_HZ[k % 4] * t)
        sf.write(wav, tone + 0.01 * rng.standard_normal(16000), 16000)
        paths.append(str(wav))
    return paths


def test_group_usage_files_anywhere_and_a_group_member_that_is_no_file(
    tmp_path, capsys, monkeypatch
):
    """An audit: the usage read `--group NAME FILE [NAME FILE ...]`, and following it (--group
    s1 a.wav s2 b.wav) put b.wav into s1's statistics before s2 failed as a file; a file after
    another option (a.wav --json o.json b.wav) was "unrecognized arguments"."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = _speaker_band_model(tmp_path)
    a, b = _tone_files(tmp_path, 2)
    usage = eval_cli._predict_parser().format_usage()
    assert "[--group SPEAKER [FILE ...]]" in usage and "NAME FILE [NAME FILE" not in usage
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["predict", "--model", model, "--group", "s1", a, "s2", b])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert "--group s1: s2: no such file (one --group per speaker" in err
    out_json = tmp_path / "o.json"
    rc = eval_cli.main(["predict", "--model", model, a, "--json", str(out_json), b])
    out, err = capsys.readouterr()
    assert rc == 0 and [f["path"] for f in json.loads(out_json.read_text())["files"]] == [a, b]
    shutil.copy(a, tmp_path / "-x.wav")  # a file named like an option still comes after `--`
    monkeypatch.chdir(tmp_path)
    rc = eval_cli.main(["predict", "--model", model, "--json", str(out_json), "--", "-x.wav"])
    assert rc == 0 and json.loads(out_json.read_text())["files"][0]["path"] == "-x.wav"


def test_files_without_a_group_and_repeated_files_are_said(tmp_path, capsys):
    """An audit: in a per-speaker run, a file left out of the groups was normalised on its own
    without a word once any file had a group (the README promises a warning); a file listed
    twice counted twice in its group's statistics (moving its neighbours' numbers) and was
    printed twice."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = _speaker_band_model(tmp_path)
    a, b, c = _tone_files(tmp_path, 3)
    got = deploy.predict_files(model, [a, b, c], groups=[None, "s1", "s1"])
    (warning,) = got["warnings"]
    assert "but 1 of 3 files have no speaker group (" + a + "): each of them" in warning
    assert "--group SPEAKER FILE" in warning
    grouped = deploy.predict_files(model, [a, b, c], groups=["s0", "s1", "s1"])
    assert grouped["warnings"] == []
    once = deploy.predict_files(model, [b, c], groups=["s1", "s1"])
    same_c = os.path.join(os.path.dirname(c), ".", os.path.basename(c))  # spelt otherwise
    twice = deploy.predict_files(model, [b, c, c, same_c], groups=["s1"] * 4)
    assert [f["path"] for f in twice["files"]] == [b, c]
    assert twice["warnings"] == [f"listed more than once, scored once: {c}, {same_c} (= {c})"]
    _assert_same_predictions(twice, once, tol=0.0)  # the repeat did not weigh in the group
    with pytest.raises(deploy.DeployError) as e:
        deploy.predict_files(model, [b, c, c], groups=["s1", "s1", "s2"])
    assert str(e.value) == (
        f"{c}: listed in speaker group s1 (as {c}) and in speaker group s2: a file can be "
        "normalised as one speaker only"
    )
    rc = eval_cli.main(["predict", "--model", model, b, "--group", "s1", b])
    err = capsys.readouterr().err
    assert (
        rc == 2 and f"{b}: listed without a speaker group (as {b}) and in speaker group s1" in err
    )
    names = [f"f{k}.wav" for k in range(7)]
    many = predict.ungrouped_warning("the run was trained", names, [None] * 6 + ["s"])
    assert (
        "6 of 7 files have no speaker group (f0.wav, f1.wav, f2.wav, f3.wav, f4.wav and 1 more)"
        in many
    )
    assert predict.ungrouped_warning("x", names[:1], ["s"]) is None


def test_warnings_about_a_stream_come_only_once_it_is_accepted(tmp_path, capsys):
    """An audit: `--stream - --rate 16` warned that nothing above 8 Hz reaches the model, then
    refused the rate; a WAV holding only its header was "cut short?: predicted from what is
    there", then "the stream has no samples"."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    rc = _main_with_stdin(b"\x00\x01" * 800, ["predict", "--model", model, "--stream", "-",
                                               "--rate", "16"])  # fmt: skip
    out, err = capsys.readouterr()
    assert (
        rc == 2
        and out == ""
        and err.splitlines()
        == ["eval.py: error: <stdin>: --rate 16: below 1000 Hz (in Hz: 16000, not 16?)"]
    )
    header_only = tmp_path / "empty.wav"
    sf.write(header_only, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    data = bytearray(header_only.read_bytes())
    data[40:44] = (32000).to_bytes(4, "little")  # the header declares a second of samples
    header_only.write_bytes(bytes(data))
    rc = eval_cli.main(["predict", "--model", model, "--stream", str(header_only)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.splitlines() == [f"eval.py: error: {header_only}: the stream has no samples"]


def test_streaming_an_mp3_reads_its_samples_and_prints_no_decoder_noise(tmp_path, capfd):
    """An audit: `--stream x.mp3` printed 70 libmpg123 "part2_3_length too large" lines for a
    55-s file (libsndfile reading in 0.4-s blocks; a whole-file read prints none). Looking
    into it: reads that end inside an MP3 frame also decoded some samples otherwise (here,
    mono 22.05 kHz, 7,122 of 551,250 by up to 0.16). Other lines on file descriptor 2 pass."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    rate = 22050
    wave = 0.1 * np.random.default_rng(1).standard_normal(rate * 25).astype(np.float32)
    mp3 = tmp_path / "noise.mp3"
    sf.write(mp3, wave, rate, format="MP3")
    rc = eval_cli.main(["predict", "--model", model, "--stream", str(mp3)])
    out, err = capfd.readouterr()
    assert rc == 0 and len(out.splitlines()) > 50 and "part2_3_length" not in err, err
    blocks = np.concatenate(list(streaming.file_blocks(mp3, sample_rate=rate)))
    whole, _ = sf.read(mp3, dtype="float32")
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=1e-6)  # the file's samples
    noise = (
        b"[src/libmpg123/layer3.c:INT123_do_layer3():1774] error: part2_3_length (928) too "
        b"large for available bit count (760)\n"
    )
    with streaming._Mpg123Noise():
        os.write(2, noise + b"a real message\n" + noise)
    assert capfd.readouterr().err == "a real message\n"


def test_a_model_folder_that_is_missing_and_an_export_given_as_a_workdir(tmp_path, capsys):
    """An audit: `--model nothere` said "nothere/model.json: missing"; `--workdir EXPORT` said
    "config.json: missing" without the --model hint that the reverse mistake gets."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = str(helpers_export.band_model_folder(tmp_path / "band"))
    wav = tmp_path / "a.wav"
    sf.write(wav, 0.1 * np.random.default_rng(0).standard_normal(16000), 16000)
    nothere = tmp_path / "nothere"
    assert eval_cli.main(["predict", "--model", str(nothere), str(wav)]) == 2
    assert capsys.readouterr().err == (
        f"eval.py: error: {nothere}: no such folder (an exported folder: python -m "
        "dkd_jax.export)\n"
    )
    assert eval_cli.main(["predict", "--model", str(wav), str(wav)]) == 2
    assert f"{wav}: not a folder" in capsys.readouterr().err
    assert eval_cli.main(["predict", "--workdir", model, str(wav)]) == 2
    err = capsys.readouterr().err
    assert f"({model} is an exported folder, not a training run: `eval.py predict --model " in err
    from dkd_jax import run_dir as run_dir_lib

    assert run_dir_lib.EXPORT_CARD_FILE == export.CARD_FILE


def test_a_card_with_repeated_labels_or_a_changed_model_file_is_refused(tmp_path, capsys):
    """An audit: repeated label names were accepted (the repeat's probability column hid the
    other class), and the sha256 each export records was never compared."""
    import hashlib

    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = helpers_export.band_model_folder(tmp_path / "band")
    card_path = model / "model.json"
    card = json.loads(card_path.read_text())
    onnx_bytes = (model / "model.onnx").read_bytes()
    card["files"]["onnx"]["sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
    card_path.write_text(json.dumps(card))
    deploy.OnnxClassifier(model)  # the recorded digest: fine
    (model / "model.onnx").write_bytes(onnx_bytes + b"\0")
    with pytest.raises(deploy.DeployError, match=r"its sha256 is not the one model\.json records"):
        deploy.OnnxClassifier(model)
    (model / "model.onnx").write_bytes(onnx_bytes)
    card["label_names"] = ["low", "mid", "low", "top"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(deploy.DeployError, match="label_names repeats 'low'"):
        deploy.load_card(model)


def test_a_stream_of_a_per_speaker_model_is_warned_about(tmp_path, capsys):
    """A journey on EmoDB: a per-speaker student streamed every recording as 'happy' and
    --stream said nothing (file mode warns about the missing speaker groups)."""
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    model = _speaker_band_model(tmp_path)
    (wav,) = _tone_files(tmp_path, 1)
    assert eval_cli.main(["predict", "--model", model, "--stream", wav]) == 0
    err = capsys.readouterr().err
    assert err == f"eval.py: warning: {streaming.SPEAKER_STREAM_WARNING}\n"
    plain = str(helpers_export.band_model_folder(tmp_path / "plain"))
    assert eval_cli.main(["predict", "--model", plain, "--stream", wav]) == 0
    assert capsys.readouterr().err == ""


def test_groups_csv_reads_like_a_data_prep_manifest(tmp_path, monkeypatch, caplog):
    """An audit: --groups had its own CSV reader, which refused what data_prep reads (a
    spreadsheet's empty trailing row: "the row names no path"; a header " Path , Speaker ":
    "needs a header") and took speaker names in another Unicode form than data_prep."""
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"")
    nfd = unicodedata.normalize("NFD", "J\u00fcrgen")
    csv_path = tmp_path / "g.csv"
    csv_path.write_text(f" Path ;Speaker \na.wav; {nfd}\nb.wav;\n;\n", encoding="utf-8")
    parser = eval_cli._predict_parser()
    args = parser.parse_args(["--model", "m", "--groups", str(csv_path)])
    files, groups = eval_cli._files_and_groups(args, parser)
    assert files == [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
    assert groups == ["J\u00fcrgen", None]  # NFC, as data_prep stores speakers
    # A relative --groups gives absolute paths (review), and a column data_prep would read
    # under another name is none of predict's business: no "did you mean 'gender'" warning.
    csv_path.write_text("path,speaker,sex\na.wav,s1,f\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["--model", "m", "--groups", "g.csv"])
    with caplog.at_level("WARNING", logger="data_prep"):
        files, groups = eval_cli._files_and_groups(args, parser)
    assert files == [str(tmp_path / "a.wav")] and groups == ["s1"] and not caplog.records
