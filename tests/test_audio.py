"""Tests of dkd_jax.audio: config, loading (every odd WAV), features vs NumPy references,
segmentation counts and hops."""

import math

import numpy as np
import pytest
import soundfile as sf

from dkd_jax import audio, file_damage

LOGMEL = audio.FEATURE_PRESETS["logmel40"]
MFCC = audio.FEATURE_PRESETS["mfcc26"]


def _wave(seconds, sr=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    x = 0.4 * np.sin(2 * np.pi * 300 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (x + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


# ---------------------------------------------------------------- independent references


def _ref_mel_power(wave, cfg):
    """Centre-padded framing + periodic Hann + np.fft.rfft + librosa's mel matrix, in float64."""
    import librosa

    x = np.pad(wave.astype(np.float64), (cfg.n_fft // 2, cfg.n_fft // 2))
    frames = 1 + len(wave) // cfg.hop_length
    n = np.arange(cfg.win_length)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.win_length)  # periodic Hann
    lpad = (cfg.n_fft - cfg.win_length) // 2
    window = np.zeros(cfg.n_fft)
    window[lpad : lpad + cfg.win_length] = win
    x = np.pad(x, (0, max(0, (frames - 1) * cfg.hop_length + cfg.n_fft - len(x))))
    idx = np.arange(frames)[:, None] * cfg.hop_length + np.arange(cfg.n_fft)[None, :]
    spec = np.fft.rfft(x[idx] * window, axis=1)
    power = (np.abs(spec) ** 2).T
    fb = librosa.filters.mel(
        sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax
    ).astype(np.float64)
    return fb @ power


def _ref_dct_ortho(x, n):
    """DCT-II with orthonormal scaling along axis 0, from its definition."""
    m = x.shape[0]
    k = np.arange(n)[:, None]
    i = np.arange(m)[None, :]
    basis = np.cos(np.pi * k * (2 * i + 1) / (2 * m)) * np.sqrt(2.0 / m)
    basis[0] /= np.sqrt(2.0)
    return basis @ x


# ---------------------------------------------------------------- config


def test_presets_and_shapes():
    assert LOGMEL.frames_per_window == 200 and LOGMEL.num_bins == 40
    assert LOGMEL.segment_shape == (40, 200)
    assert MFCC.frames_per_window == 63 and MFCC.num_bins == 26  # ceil(32000 / 512)
    assert audio.FEATURE_PRESETS["logmel64"].num_bins == 64
    assert audio.FEATURE_PRESETS["logmel128"].num_bins == 128
    assert set(audio.FEATURE_PRESETS) == {"logmel40", "logmel64", "logmel128", "mfcc26"}


def test_config_round_trip_and_validation():
    cfg = audio.FeatureConfig(n_mels=64, short_utterances="drop", fmax=7600.0)
    assert audio.FeatureConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown FeatureConfig keys"):
        audio.FeatureConfig.from_dict({**cfg.to_dict(), "n_bands": 3})
    with pytest.raises(ValueError, match="kind"):
        audio.FeatureConfig(kind="cqt")
    with pytest.raises(ValueError, match="short_utterances"):
        audio.FeatureConfig(short_utterances="trim")
    with pytest.raises(ValueError, match="win_length"):
        audio.FeatureConfig(win_length=1024)
    with pytest.raises(ValueError, match="fmax"):
        audio.FeatureConfig(fmax=9000.0)
    with pytest.raises(ValueError, match="hop_length"):
        audio.FeatureConfig(hop_length=0)


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("cfg", [LOGMEL, audio.FEATURE_PRESETS["logmel128"]], ids=["40", "128"])
def test_logmel_matches_numpy_reference(cfg):
    wave = _wave(1.37)
    got = audio.compute_features(wave, cfg)
    assert got.dtype == np.float32
    assert got.shape == (cfg.n_mels, 1 + len(wave) // cfg.hop_length)
    ref = np.log(np.maximum(_ref_mel_power(wave, cfg), audio.LOG_FLOOR))
    # float32 STFT vs float64 reference (measured max |diff| ~6e-7 nats): 1e-4 nats.
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_mfcc_matches_numpy_reference_and_librosa():
    import librosa

    wave = _wave(2.3, seed=1)
    got = audio.compute_features(wave, MFCC)
    assert got.shape == (26, 1 + len(wave) // 512)
    db = 10 * np.log10(np.maximum(_ref_mel_power(wave, MFCC), 1e-10))
    db = np.maximum(db, db.max() - 80.0)
    ref = _ref_dct_ortho(db, 26)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)  # dB-scale values up to ~100
    # Lineage parity: librosa.feature.mfcc with its defaults (n_fft 2048, hop 512, 128 mels).
    lib = librosa.feature.mfcc(y=wave, sr=16000, n_mfcc=26)
    np.testing.assert_allclose(got, lib, atol=1e-4, rtol=0)


def test_features_of_silence_and_very_short_input():
    silent = audio.compute_features(np.zeros(4000, np.float32), LOGMEL)
    np.testing.assert_array_equal(silent, np.float32(np.log(np.float32(audio.LOG_FLOOR))))
    tiny = _wave(0.01)  # 160 samples < n_fft
    feats = audio.compute_features(tiny, LOGMEL)
    assert feats.shape == (40, 2)
    ref = np.log(np.maximum(_ref_mel_power(tiny, LOGMEL), audio.LOG_FLOOR))
    np.testing.assert_allclose(feats, ref, atol=1e-4)


def test_zero_padding_the_wave_leaves_real_frames_unchanged():
    wave = _wave(1.2)
    padded, valid = audio.pad_to_window(wave, LOGMEL)
    assert padded.shape == (32000,) and valid == 1 + len(wave) // 160 == 121
    np.testing.assert_array_equal(padded[len(wave) :], 0)
    a = audio.compute_features(wave, LOGMEL)
    b = audio.compute_features(padded, LOGMEL)
    np.testing.assert_allclose(b[:, :valid], a, atol=1e-5)
    long = _wave(2.5)
    same, valid_long = audio.pad_to_window(long, LOGMEL)
    assert same is long and valid_long == 251


# ---------------------------------------------------------------- segmentation


@pytest.mark.parametrize(
    ("cfg", "seconds", "n_train", "n_eval"),
    [
        (LOGMEL, 2.0, 1, 1),  # 201 frames
        (LOGMEL, 3.0, 2, 3),  # 301 frames: train starts 0,100; eval 0,40,80
        (LOGMEL, 4.5, 3, 7),  # 451 frames: eval starts 0..240 step 40
        (MFCC, 3.0, 2, 3),  # 94 frames, fpw 63: train starts 0,31; eval 0,12,25
        (MFCC, 2.0, 1, 1),  # 63 frames
    ],
)
def test_segment_counts_and_contents(cfg, seconds, n_train, n_eval):
    feats = audio.compute_features(_wave(seconds), cfg)
    fpw = cfg.frames_per_window
    for hop_s, expected in ((cfg.train_hop_seconds, n_train), (cfg.eval_hop_seconds, n_eval)):
        segs, valid = audio.segment_features(feats, cfg, hop_seconds=hop_s)
        assert segs.shape == (expected, cfg.num_bins, fpw) and segs.dtype == np.float32
        np.testing.assert_array_equal(valid, fpw)
        hop = hop_s * cfg.sample_rate / cfg.hop_length
        # Independent count: complete windows only, starts at round(k * hop).
        k = np.arange(1000)
        assert int(np.sum(np.round(k * hop) + fpw <= feats.shape[1])) == expected
        for i in range(expected):
            start = int(np.round(i * hop))
            np.testing.assert_array_equal(segs[i], feats[:, start : start + fpw])


def test_integer_hop_count_formula():
    for frames in range(200, 700, 37):
        starts = audio.segment_starts(frames, LOGMEL, hop_seconds=1.0)
        assert len(starts) == (frames - 200) // 100 + 1
        np.testing.assert_array_equal(starts, 100 * np.arange(len(starts)))
        eval_starts = audio.segment_starts(frames, LOGMEL, hop_seconds=0.4)
        assert len(eval_starts) == (frames - 200) // 40 + 1
    assert len(audio.segment_starts(199, LOGMEL, hop_seconds=1.0)) == 0


def test_short_matrix_pad_and_drop():
    feats = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    segs, valid = audio.segment_features(feats, LOGMEL, hop_seconds=1.0, pad_value=-5.0)
    assert segs.shape == (1, 40, 200) and valid.tolist() == [50]
    np.testing.assert_array_equal(segs[0, :, :50], feats)
    np.testing.assert_array_equal(segs[0, :, 50:], -5.0)
    segs, _ = audio.segment_features(feats, LOGMEL, hop_seconds=1.0)  # default: row minimum
    np.testing.assert_array_equal(segs[0, :, 50:], np.broadcast_to(feats[:, :1], (40, 150)))
    drop = audio.FeatureConfig(short_utterances="drop")
    segs, valid = audio.segment_features(feats, drop, hop_seconds=1.0)
    assert segs.shape == (0, 40, 200) and valid.shape == (0,)


def test_valid_frames_of_a_padded_utterance():
    feats = np.zeros((40, 301), np.float32)
    segs, valid = audio.segment_features(feats, LOGMEL, hop_seconds=0.4, num_valid_frames=250)
    assert segs.shape == (3, 40, 200)
    # starts 0, 40, 80 -> valid 200, 200, 170
    assert valid.tolist() == [200, 200, 170]
    with pytest.raises(ValueError, match="num_bins, frames"):
        audio.segment_features(np.zeros(10), LOGMEL, hop_seconds=1.0)


# ---------------------------------------------------------------- loading


def _tone(freq, seconds, sr):
    t = np.arange(round(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


def test_load_mono_pcm16(tmp_path):
    x = _tone(440, 0.5, 16000)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="PCM_16")
    y = audio.load_audio(tmp_path / "a.wav", sample_rate=16000)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1 / 32768 + 1e-7)


def test_load_stereo_mixes_down(tmp_path):
    x = _tone(440, 0.5, 16000)
    sf.write(tmp_path / "s.wav", np.stack([x, 0.5 * x], axis=1), 16000, subtype="FLOAT")
    y = audio.load_audio(tmp_path / "s.wav", sample_rate=16000)
    np.testing.assert_allclose(y, 0.75 * x, atol=1e-6)


def test_load_8bit(tmp_path):
    x = _tone(300, 0.5, 16000)
    sf.write(tmp_path / "u8.wav", x, 16000, subtype="PCM_U8")
    assert sf.info(tmp_path / "u8.wav").subtype == "PCM_U8"
    y = audio.load_audio(tmp_path / "u8.wav", sample_rate=16000)
    np.testing.assert_allclose(y, x, atol=1 / 128 + 1e-6)


@pytest.mark.parametrize("sr", [44100, 8000, 22050])
def test_load_resamples(tmp_path, sr):
    x = _tone(440, 1.0, sr)
    sf.write(tmp_path / "r.wav", x, sr)
    y = audio.load_audio(tmp_path / "r.wav", sample_rate=16000)
    assert abs(len(y) - 16000) <= 1
    assert abs(_peak_hz(y, 16000) - 440) < 2.0
    assert 0.45 < np.abs(y[2000:-2000]).max() < 0.55  # amplitude kept, within [-1, 1]


def test_load_float_out_of_range_is_clipped(tmp_path):
    sf.write(tmp_path / "f.wav", np.array([0.5, 1.7, -3.0], np.float32), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(
        audio.load_audio(tmp_path / "f.wav", sample_rate=16000), [0.5, 1.0, -1.0]
    )


def test_load_errors_name_file_and_kind(tmp_path):
    cases = {}
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" + bytes(50))
    cases["corrupt.wav"] = "unreadable"
    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = "empty"
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    cases["zero.wav"] = "no_samples"
    nan = _tone(440, 0.1, 16000)
    nan[1000] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    cases["nan.wav"] = "non_finite"
    cases["missing.wav"] = "unreadable"
    for name, kind in cases.items():
        with pytest.raises(audio.AudioError) as info:
            audio.load_audio(tmp_path / name, sample_rate=16000)
        assert info.value.kind == kind, name
        assert name in str(info.value) and info.value.reason in str(info.value)
        assert isinstance(info.value, ValueError)
        if kind == "non_finite":  # the time, as a stream says it (the README promised it)
            assert info.value.reason == "audio contains 1 NaN/inf samples (the first at 0.06 s)"


def _noise_file(path, seconds, fmt, subtype, rate=16000):
    wave = 0.1 * np.random.default_rng(0).standard_normal(round(seconds * rate))
    sf.write(path, wave.astype(np.float32), rate, format=fmt, subtype=subtype)
    return path.read_bytes()


def _damage(path):
    wave, _ = audio.read_audio(path)
    return file_damage.damage_note(path, decoded_frames=len(wave))


def test_files_that_decode_short_without_an_error_are_named(tmp_path):
    """libsndfile decodes a cut or damaged Ogg/MP3/AIFF file short without a word."""
    ogg = _noise_file(tmp_path / "a.ogg", 20, "OGG", "VORBIS")
    opus = _noise_file(tmp_path / "a.opus", 10, "OGG", "OPUS", rate=48000)
    mp3 = _noise_file(tmp_path / "a.mp3", 20, "MP3", "MPEG_LAYER_III")
    aiff = _noise_file(tmp_path / "a.aiff", 2, "AIFF", "PCM_16")
    for name in ("a.ogg", "a.opus", "a.mp3", "a.aiff"):  # whole files: nothing to say
        assert _damage(tmp_path / name) is None, name
    (tmp_path / "cut.ogg").write_bytes(ogg[: len(ogg) // 2])  # inside a page
    assert _damage(tmp_path / "cut.ogg") == (
        f"the file ends inside an Ogg page, at byte {len(ogg) // 2} (cut short?)"
    )
    last = opus.rfind(b"OggS")  # at a page boundary: the end-of-stream page is missing
    (tmp_path / "cut.opus").write_bytes(opus[:last])
    assert _damage(tmp_path / "cut.opus") == (
        f"the Ogg stream stops at byte {last} without its end page (cut short?)"
    )
    damaged = bytearray(ogg)  # a damaged page mid-file: the decoder skips it
    damaged[len(ogg) // 2] ^= 0x10
    (tmp_path / "damaged.ogg").write_bytes(bytes(damaged))
    note = _damage(tmp_path / "damaged.ogg")
    assert note.startswith("the header declares 20.00 s of audio but 19.") and note.endswith(
        " s decode (cut short or damaged?)"
    )
    (tmp_path / "cut.mp3").write_bytes(mp3[: len(mp3) // 2])  # its Xing header has the length
    head, _, tail = _damage(tmp_path / "cut.mp3").partition(" s decode ")
    assert head.startswith("the header declares 20.00 s of audio but ") and tail == (
        "(cut short or damaged?)"
    )
    assert 8.0 < float(head.rsplit(" ", 1)[1]) < 12.0  # about half
    walk = file_damage.mp3_frames(tmp_path / "a.mp3")  # by frame headers, against the decoder
    assert walk.length_header and (walk.samples_per_frame, walk.sample_rate) == (576, 16000)
    assert 0 <= walk.frames * 576 - 20 * 16000 < 4 * 576  # encoder delay, padding, Xing frame
    xing = mp3.find(b"Xing")  # without it, libsndfile guesses a VBR file's length, stops there
    plain = mp3[:xing] + bytes(4) + mp3[xing + 4 :]
    (tmp_path / "plain.mp3").write_bytes(plain)
    head, _, tail = _damage(tmp_path / "plain.mp3").partition(" s decode ")
    assert head.startswith("its MP3 frames hold 20.1") and tail == (
        "(an MP3 without a Xing/Info header: libsndfile guesses its length; convert it to WAV "
        "or FLAC)"
    )
    size = 200_000  # an ID3v2 tag (cover art) in front: not audio, not counted
    synchsafe = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    (tmp_path / "tagged.mp3").write_bytes(b"ID3\x04\x00\x00" + synchsafe + bytes(size) + plain)
    assert file_damage.mp3_frames(tmp_path / "tagged.mp3").frames == walk.frames
    # libsndfile counts the tag in its guess (34.5 s): no false "cut short" from that
    assert _damage(tmp_path / "tagged.mp3") is None
    (tmp_path / "cut.aiff").write_bytes(aiff[: 54 + 2 * 8000])  # 0.5 s of 2 s
    assert _damage(tmp_path / "cut.aiff") == (
        "the header declares 2.00 s of audio but the file holds 0.50 s (cut short?)"
    )
    sf.write(tmp_path / "tone.ogg", _tone(220, 5, 16000), 16000, format="OGG", subtype="VORBIS")
    tone = (tmp_path / "tone.ogg").read_bytes()  # a few pages: cut in half, it decodes nothing
    (tmp_path / "stub.ogg").write_bytes(tone[: len(tone) // 2])
    with pytest.raises(audio.AudioError, match=r"no samples \(0 frames; the file ends inside"):
        audio.read_audio(tmp_path / "stub.ogg")


def test_shortfall_threshold():
    assert (
        file_damage.shortfall_note(16000, 16000 - 1599, 16000) is None
    )  # under 0.1 s: codec slack
    assert file_damage.shortfall_note(16000, 14400, 16000) == (
        "the header declares 1.00 s of audio but 0.90 s decode (cut short or damaged?)"
    )
    assert file_damage.shortfall_note(16000, 20000, 16000) is None
    assert file_damage.shortfall_note(16000, 0, 0) is None


def test_audio_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(audio.AudioError("/x.wav", "bad", "empty")))
    assert (e.path, e.reason, e.kind) == ("/x.wav", "bad", "empty")
    assert math.isclose(audio.FeatureConfig().hop_frames(0.4), 40.0)


# ---------------------------------------------------------------- librosa parity (bit for bit)


@pytest.mark.parametrize("name", sorted(audio.FEATURE_PRESETS))
def test_filterbank_and_stft_equal_librosa_bit_for_bit(name):
    """The NumPy front end must give exactly the features the librosa one gave (prep parity)."""
    import librosa

    cfg = audio.FEATURE_PRESETS[name]
    fb = audio.mel_filterbank(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=0.0, fmax=None
    )
    ref_fb = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels)
    np.testing.assert_array_equal(fb, ref_fb)
    rng = np.random.default_rng(3)
    for n in (100, cfg.n_fft - 1, cfg.n_fft, 16001, 50_123):
        wave = (0.3 * rng.standard_normal(n)).astype(np.float32)
        got = audio.power_spectrogram(wave, cfg)
        padded = np.pad(wave, (0, max(0, cfg.n_fft - n)))
        spec = librosa.stft(
            padded,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window="hann",
            center=True,
            pad_mode="constant",
        )[:, : got.shape[1]]
        assert got.shape == (cfg.n_fft // 2 + 1, 1 + n // cfg.hop_length)
        np.testing.assert_array_equal(got, np.square(spec.real) + np.square(spec.imag))


def test_filterbank_with_band_limits_equals_librosa():
    import librosa

    for sr, n_fft, n_mels, fmin, fmax in (
        (16000, 512, 40, 50.0, 7600.0),
        (22050, 1024, 80, 20.0, None),
    ):
        got = audio.mel_filterbank(sample_rate=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        np.testing.assert_array_equal(got, ref)
    # Slaney scale: linear to 1 kHz (200/3 Hz per mel), then 27 mels per factor 6.4.
    np.testing.assert_allclose(
        audio.hz_to_mel(np.array([0.0, 500.0, 1000.0, 6400.0])), [0.0, 7.5, 15.0, 42.0]
    )
    f = np.array([0.0, 123.0, 999.0, 1000.0, 5000.0, 8000.0])
    np.testing.assert_allclose(audio.mel_to_hz(audio.hz_to_mel(f)), f, rtol=1e-12)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resample_equals_librosa_soxr_hq(sr):
    import librosa

    wave = (0.3 * np.random.default_rng(sr).standard_normal(12_345)).astype(np.float32)
    got = audio.resample(wave, orig_sr=sr, target_sr=16000)
    ref = librosa.resample(wave, orig_sr=sr, target_sr=16000, res_type="soxr_hq")
    assert got.shape == (math.ceil(12_345 * 16000 / sr),)
    np.testing.assert_array_equal(got, np.clip(ref, -1.0, 1.0))


# ---------------------------------------------------------------- segment_audio


def test_segment_audio_is_the_composition_of_the_steps(tmp_path):
    wave = _wave(3.37)
    sf.write(tmp_path / "a.wav", wave, 16000, subtype="FLOAT")
    hops = (LOGMEL.train_hop_seconds, LOGMEL.eval_hop_seconds)
    from_file = audio.segment_audio(tmp_path / "a.wav", LOGMEL, hop_seconds=hops)
    from_wave = audio.segment_audio(wave, LOGMEL, hop_seconds=list(hops))
    feats = audio.compute_features(wave, LOGMEL)
    assert (from_file.num_samples, from_file.padded, from_file.dropped) == (len(wave), False, False)
    assert from_file.duration_s == len(wave) / 16000
    for got, again, hop in zip(from_file.layouts, from_wave.layouts, hops, strict=True):
        segs, valid = audio.segment_features(feats, LOGMEL, hop_seconds=hop)
        np.testing.assert_array_equal(got.features, segs)
        np.testing.assert_array_equal(got.valid_frames, valid)
        np.testing.assert_array_equal(again.features, segs)
        starts = np.round(np.arange(len(segs)) * hop * 100).astype(int)
        np.testing.assert_array_equal(got.start_frames, starts)
        np.testing.assert_allclose(got.starts_s, starts / 100)
        assert got.hop_seconds == hop and len(got) == len(segs)
    assert [len(x) for x in from_file.layouts] == [2, 4]  # 338 frames: 0,100 / 0,40,80,120


def test_segment_audio_short_pad_drop_and_rates(tmp_path):
    short = _wave(0.7)
    pad = audio.segment_audio(short, LOGMEL, hop_seconds=0.4)
    (layout,) = pad.layouts
    assert pad.padded and not pad.dropped and len(layout) == 1
    assert layout.valid_frames.tolist() == [1 + len(short) // 160]
    padded_wave = np.pad(short, (0, 32000 - len(short)))
    np.testing.assert_array_equal(
        layout.features[0], audio.compute_features(padded_wave, LOGMEL)[:, :200]
    )
    drop = audio.segment_audio(short, LOGMEL, hop_seconds=(1.0, 0.4), short_utterances="drop")
    assert drop.dropped and [x.features.shape for x in drop.layouts] == [(0, 40, 200)] * 2
    # A waveform at another rate is resampled exactly as a file at that rate is.
    x44 = _wave(2.2, sr=44100)
    sf.write(tmp_path / "b.wav", x44, 44100, subtype="FLOAT")
    a = audio.segment_audio(x44, MFCC, hop_seconds=0.4, sample_rate=44100)
    b = audio.segment_audio(tmp_path / "b.wav", MFCC, hop_seconds=0.4)
    np.testing.assert_array_equal(a.layouts[0].features, b.layouts[0].features)
    assert a.num_samples == b.num_samples == math.ceil(len(x44) * 16000 / 44100)
    with pytest.raises(ValueError, match="1-D"):
        audio.segment_audio(np.zeros((2, 100)), LOGMEL, hop_seconds=1.0)
    with pytest.raises(ValueError, match="short_utterances"):
        audio.segment_audio(short, LOGMEL, hop_seconds=1.0, short_utterances="trim")
    with pytest.raises(audio.AudioError, match=r"missing\.wav"):
        audio.segment_audio(tmp_path / "missing.wav", LOGMEL, hop_seconds=1.0)


# ---------------------------------------------------------------- the same bits on every CPU


def _positive_float32(n, seed):
    """Every exponent of a positive finite float32, subnormals included, random mantissas."""
    bits = np.random.default_rng(seed).integers(1, 0x7F800000, n, dtype=np.uint32)
    return bits.view(np.float32)


def test_natural_log_is_the_correctly_rounded_float32_log():
    x = np.concatenate(
        [
            _positive_float32(300_000, 0),
            np.float32([1e-10, audio.LOG_FLOOR, 0.5, 1.0, 2.0, np.sqrt(0.5), np.sqrt(2.0)]),
            np.nextafter(np.float32(1), np.float32([0, 2])),  # ln near 0: no cancellation
            np.float32(2.0) ** np.arange(-149, 128, dtype=np.float32),
        ]
    ).astype(np.float32)
    exact = np.log(x.astype(np.float64))  # float64: far finer than the float32 result
    got = audio.natural_log(x)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, exact, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(got.astype(np.float32), exact.astype(np.float32))
    # and against an exact reference (decimal's ln is correctly rounded; NumPy's float64 log is
    # accurate but picks its code by CPU too): 3,000 values
    import decimal

    ctx = decimal.Context(prec=40)
    few = x[::100]
    exact_few = np.array([float(ctx.ln(decimal.Decimal(float(v)))) for v in few])
    np.testing.assert_array_equal(
        audio.natural_log(few).astype(np.float32), exact_few.astype(np.float32)
    )
    np.testing.assert_allclose(audio.natural_log(few), exact_few, rtol=5e-16, atol=0)
    assert audio.natural_log(np.float32(1.0)) == 0.0
    special = audio.natural_log(np.array([0.0, np.inf, -1.0, np.nan, -np.inf]))
    np.testing.assert_array_equal(special, [-np.inf, np.inf, np.nan, np.nan, np.nan])


def test_log_mel_and_mel_db_floor_and_round_like_the_float32_formulas():
    mel = np.concatenate([_positive_float32(100_000, 1), np.float32([0.0, 1e-12, 1e-8, 5.0])])
    mel = np.minimum(mel, np.float32(1e30))
    floored = np.maximum(mel, np.float32(audio.LOG_FLOOR)).astype(np.float64)
    want = np.log(floored).astype(np.float32)
    assert mel.size > audio._LOG_BLOCK  # computed in two blocks
    np.testing.assert_array_equal(audio.log_mel(mel), want)
    rows = mel[:100_000].reshape(40, 2500)  # [bands, frames], as the front end passes it
    np.testing.assert_array_equal(audio.log_mel(rows), want[:100_000].reshape(40, 2500))
    db = audio.mel_db(mel)
    log10 = np.log10(np.maximum(mel, np.float32(audio.MFCC_AMIN)).astype(np.float64))
    assert db.dtype == np.float32
    np.testing.assert_array_equal(db, np.float32(10) * log10.astype(np.float32))
    assert audio.log_mel(np.float32([0.0]))[0] == np.float32(np.log(audio.LOG_FLOOR))
    assert audio.mel_db(np.float32([0.0]))[0] == np.float32(-100.0)


_CHILD_FEATURES = """
import sys
import numpy as np
from dkd_jax import audio
waves = np.load(sys.argv[1])
out = {}
for name in sorted(audio.FEATURE_PRESETS):
    for i, wave in enumerate(waves):
        out[f"{name}_{i}"] = audio.compute_features(wave, audio.FEATURE_PRESETS[name])
np.savez(sys.argv[2], **out)
"""


def test_features_have_the_same_bits_at_every_numpy_simd_level(tmp_path):
    """Prep hashes must not depend on the CPU. NumPy picks its float32 ``log``/``log10`` by the
    CPU's vector extensions at run time: an AVX-512 machine wrote MFCCs with other bits than an
    AVX2 one, and NumPy without AVX2 other log-mels. Children with the AVX-512 groups switched
    off (an AVX2 CPU), and with every runtime-dispatched group off (x86-64 baseline), compute
    the same features bit for bit, quiet and loud waves alike."""
    import os
    import subprocess
    import sys

    from numpy._core import _multiarray_umath as umath

    rng = np.random.default_rng(7)
    waves = np.stack(
        [_wave(2.5, seed=2) * g for g in (1.0, 1e-3)]
        + [(0.3 * rng.standard_normal(40_000)).astype(np.float32)]
    ).astype(np.float32)
    np.save(tmp_path / "waves.npy", waves)
    subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD_FEATURES,
            str(tmp_path / "waves.npy"),
            str(tmp_path / "here"),
        ],
        check=True,
    )
    reference = np.load(tmp_path / "here.npz")
    found = [f for f in umath.__cpu_dispatch__ if umath.__cpu_features__.get(f)]
    settings = {
        "numpy without AVX-512": [f for f in found if f.startswith(("AVX512", "X86_V4"))],
        "numpy baseline SIMD": found,
    }
    tried = 0
    for name, disabled in settings.items():
        if not disabled:
            continue  # a CPU without these extensions: the parent already ran this level
        out = tmp_path / name.replace(" ", "_")
        env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(disabled)}
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_FEATURES, str(tmp_path / "waves.npy"), str(out)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        other = np.load(f"{out}.npz")
        assert sorted(other.files) == sorted(reference.files)
        for key in reference.files:
            assert other[key].tobytes() == reference[key].tobytes(), (name, key)
        tried += 1
    assert tried >= 1 or not found
