"""Tests for dkd_jax.streaming: incremental features, constant memory, label timing.

The front-end tests need no optional extra; the label-timing tests need onnx + onnxruntime.

References: the whole-file front end (``audio.compute_features`` + ``audio.segment_features``,
what ``predict.file_segments`` and data_prep use), and a hand-made ONNX model
(tests/helpers_export.py) whose label on a window is known from the audio: the tone that fills
most of it.
"""

import tracemalloc

import helpers_export
import numpy as np
import pytest

from dkd_jax import audio, deploy, streaming


def _whole_file(wave, fc):
    padded, valid = audio.pad_to_window(wave, fc)
    feats = audio.compute_features(padded, fc)
    segs, valid_frames = audio.segment_features(
        feats, fc, hop_seconds=fc.eval_hop_seconds, num_valid_frames=valid
    )
    starts = audio.segment_starts(feats.shape[1], fc, hop_seconds=fc.eval_hop_seconds)
    return segs, valid_frames, starts


def _stream(wave, fc, blocks):
    fe = streaming.StreamingFrontEnd(fc)
    out, pos, i = [], 0, 0
    while pos < wave.shape[0]:
        n = blocks[i % len(blocks)]
        out += fe.push(wave[pos : pos + n])
        pos, i = pos + n, i + 1
    return out + fe.finish()


def _speechlike(seconds, *, sr=16000, seed=0, loud_first=True):
    """Tones, noise and digital silence; the loudest burst comes first (see the MFCC note)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sr)
    t = np.arange(n) / sr
    x = 0.2 * np.sin(2 * np.pi * (180 + 60 * np.sin(2 * np.pi * 0.7 * t)) * t)
    x += 0.05 * rng.standard_normal(n)
    x[round(0.9 * sr) : round(1.3 * sr)] = 0.0  # digital silence: the MFCC floor binds here
    burst = slice(round(0.2 * sr), round(0.4 * sr)) if loud_first else slice(n - 4000, n - 2000)
    x[burst] *= 4.0
    return np.clip(x, -1, 1).astype(np.float32)


@pytest.mark.parametrize("preset", ["logmel40", "mfcc26"])
@pytest.mark.parametrize("seconds", [7.37, 2.0, 2.0 + 1 / 16000, 1.3])
def test_stream_windows_equal_whole_file_windows(preset, seconds):
    fc = audio.FEATURE_PRESETS[preset]
    wave = _speechlike(seconds)
    ref, ref_valid, ref_starts = _whole_file(wave, fc)
    for blocks in ([6400], [1, 517, 3333], [10**6]):
        got = _stream(wave, fc, blocks)
        assert len(got) == len(ref) >= 1
        if seconds >= fc.window_seconds:
            assert [w.start_frame for w in got] == ref_starts.tolist()
        for w, r, v in zip(got, ref, ref_valid, strict=True):
            np.testing.assert_allclose(w.features, r, rtol=1e-6, atol=1e-5)
            assert w.valid_frames == v
            assert w.start_s == pytest.approx(w.start_frame * fc.hop_length / fc.sample_rate)


def test_mfcc_stream_floor_uses_the_loudest_frame_so_far():
    """When the loudest frame comes late, earlier MFCC windows saw a lower top_db floor: they
    differ from the file's only in frames that are more than 80 dB below that late peak."""
    fc = audio.FEATURE_PRESETS["mfcc26"]
    wave = _speechlike(6.0, loud_first=False)
    ref, _, _ = _whole_file(wave, fc)
    got = _stream(wave, fc, [6400])
    diffs = [float(np.abs(w.features - r).max()) for w, r in zip(got, ref, strict=True)]
    assert max(diffs) > 1e-3  # the silence is floored differently before the late peak
    assert diffs[-1] < 1e-4  # the windows computed after the peak arrived are the file's


def test_stream_memory_is_constant():
    fc = audio.FEATURE_PRESETS["logmel40"]
    rng = np.random.default_rng(0)
    block = rng.uniform(-0.3, 0.3, 6400).astype(np.float32)

    def peak(seconds):
        fe = streaming.StreamingFrontEnd(fc)
        tracemalloc.start()
        count = 0
        for _ in range(round(seconds / 0.4)):
            count += len(fe.push(block))
        count += len(fe.finish())
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size, count

    short, n_short = peak(8.0)
    long, n_long = peak(80.0)
    assert n_long == round((80.0 - 2.0) / 0.4) + 1 and n_short == round((8.0 - 2.0) / 0.4) + 1
    assert long < 1.1 * short + 64 * 1024  # ten times the audio, the same memory


def test_stream_rejects_empty_and_finished_streams():
    fe = streaming.StreamingFrontEnd(audio.FEATURE_PRESETS["logmel40"])
    with pytest.raises(deploy.DeployError, match="no samples"):
        fe.finish()
    with pytest.raises(deploy.DeployError, match="finished"):
        fe.push(np.zeros(10, np.float32))


def test_file_paths_that_are_no_audio_are_named_like_the_whole_file_path(tmp_path):
    # libsndfile says "System error" for a missing file and "Format not recognised" for a
    # folder or an empty file; streaming used to pass that on, predicting whole files did not.
    (tmp_path / "empty.wav").write_bytes(b"")
    cases = {
        tmp_path / "missing.wav": "cannot open file (No such file or directory)",
        tmp_path: "is a folder, not an audio file",
        tmp_path / "empty.wav": "file is empty (0 bytes)",
    }
    for path, reason in cases.items():
        with pytest.raises(deploy.DeployError) as streamed:
            next(streaming.file_blocks(path, sample_rate=16000))
        with pytest.raises(audio.AudioError) as whole:
            audio.load_audio(path, sample_rate=16000)
        assert str(streamed.value) == str(whole.value) == f"{path}: {reason}"


def test_stream_rejects_non_finite_stereo_and_a_zero_hop():
    fc = audio.FEATURE_PRESETS["logmel40"]
    fe = streaming.StreamingFrontEnd(fc)
    fe.push(np.zeros(16000, np.float32))
    x = np.zeros(8000, np.float32)
    x[4000] = np.nan  # was: NaN logits from here on (the running statistics), exit status 0
    with pytest.raises(deploy.DeployError, match=r"1 NaN/inf samples \(the first at 1\.25 s\)"):
        fe.push(x)
    with pytest.raises(deploy.DeployError, match=r"mono samples expected .* shape \(100, 2\)"):
        streaming.StreamingFrontEnd(fc).push(np.zeros((100, 2), np.float32))  # was: interleaved
    column = streaming.StreamingFrontEnd(fc).push(np.zeros((40000, 1), np.float32))
    row = streaming.StreamingFrontEnd(fc).push(np.zeros((1, 40000), np.float32))
    flat = streaming.StreamingFrontEnd(fc).push(np.zeros(40000, np.float32))
    assert len(column) == len(row) == len(flat) == 2
    for hop in (0, -0.4):  # was: 0 silently became the default 0.4 s
        with pytest.raises(deploy.DeployError, match="hop_seconds must be positive"):
            streaming.StreamingFrontEnd(fc, hop_seconds=hop)


# --------------------------------------------------------------------------------------------
# Label timing on a stream of tones (constructed model: the labels are known)
# --------------------------------------------------------------------------------------------

ORDER = (2, 0, 3, 1)
SECONDS = (3.3, 3.1, 3.5, 3.2)  # no window centre (1.0 + 0.4 k s) within 0.1 s of a boundary


@pytest.fixture(scope="module")
def band_model(tmp_path_factory):
    pytest.importorskip("onnx", reason="needs the export extra: pip install -e '.[export]'")
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    return helpers_export.band_model_folder(tmp_path_factory.mktemp("band") / "model")


def _class_at(t, boundaries):
    return ORDER[int(np.searchsorted(boundaries, t))]


def _changes(labels, times):
    return [(times[i], labels[i]) for i in range(1, len(labels)) if labels[i] != labels[i - 1]]


def test_stream_labels_change_at_the_right_times(band_model):
    model = deploy.OnnxClassifier(band_model)
    wave, boundaries = helpers_export.tone_sequence(ORDER, SECONDS)
    blocks = (wave[i : i + 6400] for i in range(0, wave.shape[0], 6400))
    rows = list(streaming.stream_rows(model, blocks, smoothing_seconds=1.0))
    fc = model.features
    assert len(rows) == len(_whole_file(wave, fc)[0])
    names = model.label_names
    centres = [(r["start_s"] + r["end_s"]) / 2 for r in rows]
    # every window's label is the tone at its centre (the tone filling most of it) ...
    assert [r["prediction"] for r in rows] == [names[_class_at(c, boundaries)] for c in centres]
    # ... so raw labels change within half a window of each boundary, in the right order
    ends = [r["end_s"] for r in rows]
    for labels in ([r["prediction"] for r in rows], [r["smoothed_prediction"] for r in rows]):
        changes = _changes(labels, ends)
        assert [lab for _, lab in changes] == [names[c] for c in ORDER[1:]]
        for (t, _), b in zip(changes, boundaries, strict=True):
            # the line that shows a change is printed at a window end: between the boundary
            # and one window (plus, smoothed, the moving average's lag) later
            assert b < t <= b + fc.window_seconds + 0.8, (t, b)


def test_moving_average_follows_its_formula(band_model):
    model = deploy.OnnxClassifier(band_model)
    wave, _ = helpers_export.tone_sequence(ORDER, SECONDS)
    tau = 0.7
    rows = list(streaming.stream_rows(model, [wave], smoothing_seconds=tau))
    raw = rows[0]["probabilities"]
    names = model.label_names
    ema = np.array([raw[n] for n in names])
    a = np.exp(-0.4 / tau)
    for r in rows:
        p = np.array([r["probabilities"][n] for n in names])
        ema = p if r is rows[0] else a * ema + (1 - a) * p
        np.testing.assert_allclose([r["smoothed"][n] for n in names], ema, rtol=1e-12)
    off = list(streaming.stream_rows(model, [wave], smoothing_seconds=0.0))
    assert all(r["smoothed"] == r["probabilities"] for r in off)
    for bad in (-1.0, float("nan"), float("inf")):  # nan and inf used to pass
        with pytest.raises(deploy.DeployError, match="smooth"):
            streaming.StreamPredictor(model, smoothing_seconds=bad)


def test_pcm_blocks_decode_and_resample():
    x = (np.sin(np.arange(22050) / 10.0) * 20000).astype("<i2")
    stereo = np.stack([x, x // 2], axis=1).tobytes()
    import io

    mono = np.concatenate(
        list(streaming.pcm_blocks(io.BytesIO(stereo), rate=22050, channels=2, sample_rate=22050))
    )
    np.testing.assert_allclose(mono, (x.astype(np.float32) + (x // 2)) / 2 / 32768.0, atol=1e-6)
    resampled = np.concatenate(
        list(streaming.pcm_blocks(io.BytesIO(x.tobytes()), rate=22050, sample_rate=16000))
    )
    assert abs(resampled.shape[0] - 16000) <= 1  # 1 s of audio stays 1 s
    whole = audio.resample(x.astype(np.float32) / 32768.0, orig_sr=22050, target_sr=16000)
    n = min(whole.shape[0], resampled.shape[0])
    inner = slice(200, n - 200)  # the streaming resampler handles the edges its own way
    np.testing.assert_allclose(resampled[inner], whole[inner], atol=1e-3)
    with pytest.raises(deploy.DeployError, match="positive"):
        next(streaming.pcm_blocks(io.BytesIO(b""), rate=0, sample_rate=16000))
    # --rate 10 used to turn 3 s of audio into 4,800 s of windows; file headers refuse it too
    with pytest.raises(deploy.DeployError, match="--rate 10: below 1000 Hz"):
        next(streaming.pcm_blocks(io.BytesIO(stereo), rate=10, sample_rate=16000))


def test_an_audio_file_piped_as_raw_pcm_is_refused(tmp_path):
    """``cat x.wav | eval.py predict --stream -`` used to score the header and the compressed
    bytes as samples (exit 0); raw PCM that merely starts with other bytes still streams."""
    import io

    import soundfile as sf

    wave = 0.1 * np.random.default_rng(0).standard_normal(8000)
    for fmt, kind in (("WAV", "a WAV"), ("FLAC", "a FLAC"), ("OGG", "an Ogg")):
        buf = io.BytesIO()
        sf.write(buf, wave, 16000, format=fmt)
        with pytest.raises(deploy.DeployError, match=f"starts like {kind} file .*--stream FILE"):
            next(streaming.pcm_blocks(io.BytesIO(buf.getvalue()), rate=16000, sample_rate=16000))
    raw = (wave * 20000).astype("<i2").tobytes()
    got = np.concatenate(list(streaming.pcm_blocks(io.BytesIO(raw), rate=16000, sample_rate=16000)))
    assert got.shape == (8000,)
    with pytest.raises(deploy.DeployError, match="at most 768000 Hz and 256 channels"):
        next(streaming.pcm_blocks(io.BytesIO(raw), rate=16000, channels=10**8, sample_rate=16000))


def test_a_file_that_breaks_mid_stream_is_one_error_with_the_time(tmp_path):
    """A FLAC whose frames are damaged past its start: the whole-file path named it, the
    stream raised libsndfile's "flac decoder lost sync" as a traceback."""
    import soundfile as sf

    path = tmp_path / "corrupt.flac"
    sf.write(path, 0.3 * np.random.default_rng(0).standard_normal(3 * 16000), 16000)
    data = bytearray(path.read_bytes())
    data[20000:] = bytes(len(data) - 20000)
    path.write_bytes(bytes(data))
    with pytest.raises(audio.AudioError, match="not a readable audio file"):
        audio.load_audio(path, sample_rate=16000)
    with pytest.raises(deploy.DeployError) as e:
        list(streaming.file_blocks(path, sample_rate=16000))
    assert str(e.value).startswith(f"{path}: not a readable audio file after ")


@pytest.mark.parametrize("seconds", [3.202, 1.3, 2.0])
def test_stream_windows_end_where_the_audio_does(seconds):
    """The last windows reach into the end's zero padding: --segments rows end at the audio's
    end (a short file at one window), the stream's last row used to say 3.216 for 3.202 s."""
    fc = audio.FEATURE_PRESETS["mfcc26"]
    wave = 0.1 * np.random.default_rng(0).standard_normal(round(seconds * fc.sample_rate))
    front = streaming.StreamingFrontEnd(fc)
    windows = front.push(wave.astype(np.float32)) + front.finish()
    duration = wave.shape[0] / fc.sample_rate
    for w in windows:  # predict.file_entry's rule for the rows of --segments
        assert w.end_s == min(w.start_s + fc.window_seconds, max(duration, fc.window_seconds))
    assert round(windows[-1].end_s, 3) == round(max(duration, fc.window_seconds), 3)
