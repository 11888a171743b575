"""Audio front end: loading, log-mel / MFCC features and 2-s segmentation.

This module owns the data contract's signal side (DESIGN.md §3): every waveform is mono float32
in [-1, 1] at ``FeatureConfig.sample_rate``; features are computed once per *whole utterance*
(``center=True`` framing) and cut into fixed windows in the frame domain, so the training layout
(hop 1.0 s) and the evaluation layout (hop 0.4 s) share one feature matrix.

Numerics are pure (arrays in, arrays out, keyword hyper-parameters, no I/O) except the loading
section (:func:`read_audio` / :func:`load_audio`; ``dkd_jax.file_damage`` says what a file that
decodes without an error still lost), and :func:`segment_audio`, the one path from an audio
file (or waveform) to the windows data_prep stores and predict scores.

The STFT, the mel filterbank and the resampler are plain NumPy + soxr calls that equal
``librosa.stft``, ``librosa.filters.mel`` and ``librosa.resample(res_type="soxr_hq")`` bit for
bit (the tests check it): librosa's import (scipy.signal, numba) costs seconds in every
data_prep worker, which dominated the prep time of small corpora.

Feature kinds:
  * ``"logmel"``: ``log(max(mel_power, LOG_FLOOR))`` of a Hann-windowed power spectrogram
    (25 ms window, 10 ms hop, n_fft 512, Slaney mel filterbank). 40 bands by default.
  * ``"mfcc"``: the head-fusion lineage front end (librosa defaults): mel power → ``power_to_db``
    (ref 1, amin 1e-10, top_db 80) → orthonormal DCT-II, first ``n_mfcc`` coefficients.

Segmentation (:func:`segment_features`): window ``k`` starts at frame
``round(k * hop_seconds * sample_rate / hop_length)`` and spans ``frames_per_window`` frames;
only windows that fit completely inside the utterance's frames are emitted, so the tail after
the last complete window (less than one hop) is dropped, as in the lineage code. An utterance
whose feature matrix is shorter than one window gives exactly one window, right-padded (or none
when ``short_utterances="drop"``). The data-prep pipeline pads short utterances in the *waveform*
domain with zeros (:func:`pad_to_window`), which makes the padded frames exact silence for both
feature kinds; ``valid_frames`` records how many frames of each window come from real audio.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import stat
from typing import Any

import numpy as np

from dkd_jax import file_damage

LOG_FLOOR = 1e-6
"""Floor applied to mel power before ``log`` in the ``"logmel"`` kind (log(1e-6) ≈ -13.8)."""
FRONT_END_VERSION = 2
"""Version of the feature bits: 2 since the logarithms became the same on every CPU
(:func:`natural_log`); 1 before (recorded by nothing: a prep without it is version 1). data_prep
records it and will not resume an interrupted prep of another version into one prep."""
MFCC_AMIN = 1e-10  # librosa power_to_db's amin: the MFCC's power floor
MFCC_TOP_DB = 80.0  # and its top_db: dB below the utterance's loudest frame are raised to it

_KINDS = ("logmel", "mfcc")

MIN_SAMPLE_RATE = 1000
"""Lowest sample rate (Hz) a file may declare: below it the header is taken as corrupt (a 1-Hz
header on a 400-kB file would be resampled to 13 GB at 16 kHz)."""
_SHORT = ("pad", "drop")


#: :attr:`AudioError.kind` of a file that exists but that this user may not read (or whose
#: folder it may not enter): fixed by permissions, not by a better file.
NO_ACCESS = "no_access"


class AudioError(ValueError):
    """An audio file that cannot be used, with the path and the reason.

    Attributes:
      path: the file (str).
      reason: what is wrong with it, in words.
      kind: a short machine-readable category ("unreadable", "empty", "no_samples",
        "non_finite", "bad_rate", or ``NO_ACCESS``: the file exists but this user may not
        read it).
    """

    def __init__(self, path: Any, reason: str, kind: str = "unreadable"):
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.path, self.reason, self.kind))


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines the features and segments of a prep run.

    Attributes:
      kind: "logmel" or "mfcc".
      sample_rate: audio is resampled to this rate (Hz).
      n_fft: FFT size (samples).
      win_length: analysis window (samples, Hann), ≤ n_fft.
      hop_length: frame hop (samples).
      n_mels: mel bands.
      n_mfcc: MFCC coefficients kept (kind "mfcc" only).
      fmin: lowest mel frequency (Hz).
      fmax: highest mel frequency (Hz); None means sample_rate / 2.
      window_seconds: segment length (s).
      train_hop_seconds: hop between segments of the "train" layout (s).
      eval_hop_seconds: hop between segments of the "eval" layout (s).
      short_utterances: "pad" (one right-padded window) or "drop" (paper protocol).
    """

    kind: str = "logmel"
    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 40
    n_mfcc: int = 26
    fmin: float = 0.0
    fmax: float | None = None
    window_seconds: float = 2.0
    train_hop_seconds: float = 1.0
    eval_hop_seconds: float = 0.4
    short_utterances: str = "pad"

    def __post_init__(self):
        problems = []
        if self.kind not in _KINDS:
            problems.append(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.short_utterances not in _SHORT:
            problems.append(
                f"short_utterances must be one of {_SHORT}, got {self.short_utterances!r}"
            )
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "n_mfcc"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.win_length > self.n_fft:
                problems.append(f"win_length ({self.win_length}) must be ≤ n_fft ({self.n_fft})")
            if self.kind == "mfcc" and self.n_mfcc > self.n_mels:
                problems.append(f"n_mfcc ({self.n_mfcc}) must be ≤ n_mels ({self.n_mels})")
            nyquist = self.sample_rate / 2
            top = nyquist if self.fmax is None else self.fmax
            if not 0 <= self.fmin < top <= nyquist:
                problems.append(
                    f"need 0 ≤ fmin < fmax ≤ sample_rate/2, got fmin={self.fmin}, fmax={self.fmax}"
                )
        for name in ("window_seconds", "train_hop_seconds", "eval_hop_seconds"):
            if not float(getattr(self, name)) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("invalid FeatureConfig: " + "; ".join(problems))

    @property
    def window_samples(self) -> int:
        """Samples in one segment window."""
        return round(self.window_seconds * self.sample_rate)

    @property
    def frames_per_window(self) -> int:
        """Frames per segment: ceil(window_samples / hop_length) (200 log-mel, 63 MFCC-26)."""
        return math.ceil(self.window_samples / self.hop_length)

    @property
    def num_bins(self) -> int:
        """Feature rows: n_mels for "logmel", n_mfcc for "mfcc"."""
        return self.n_mels if self.kind == "logmel" else self.n_mfcc

    @property
    def segment_shape(self) -> tuple[int, int]:
        """Shape of one segment: (num_bins, frames_per_window)."""
        return (self.num_bins, self.frames_per_window)

    def hop_frames(self, hop_seconds: float) -> float:
        """A segment hop in (possibly fractional) frames."""
        return hop_seconds * self.sample_rate / self.hop_length

    def to_dict(self) -> dict:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown FeatureConfig keys {unknown}; known: {sorted(names)}")
        return cls(**d)


FEATURE_PRESETS: dict[str, FeatureConfig] = {
    "logmel40": FeatureConfig(kind="logmel", n_mels=40),
    "logmel64": FeatureConfig(kind="logmel", n_mels=64),
    "logmel128": FeatureConfig(kind="logmel", n_mels=128),
    # Head-fusion lineage: librosa.feature.mfcc defaults (n_fft 2048, hop 512, 128 mels), 26 coeffs.
    "mfcc26": FeatureConfig(
        kind="mfcc", n_fft=2048, win_length=2048, hop_length=512, n_mels=128, n_mfcc=26
    ),
}
"""Named feature configurations (values are FeatureConfig objects)."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def check_audio_path(path: str | os.PathLike) -> None:
    """Raises :class:`AudioError` for what libsndfile would report badly: a missing path or one
    this user may not read (both "System error"), a folder or an empty file ("Format not
    recognised"). A file that exists but may not be read is kind ``NO_ACCESS``: a setting of
    the machine, not a bad recording (``data_prep`` stops on it instead of skipping it)."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise _open_error(path, e) from None
    if stat.S_ISDIR(info.st_mode):
        raise AudioError(path, "is a folder, not an audio file", "unreadable")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)", "empty")
    if not stat.S_ISREG(info.st_mode):
        return  # a pipe or a device: opened once, by the reader
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise _open_error(path, e) from None


def _open_error(path: str | os.PathLike, e: OSError) -> AudioError:
    kind = NO_ACCESS if isinstance(e, PermissionError) else "unreadable"
    return AudioError(path, f"cannot open file ({e.strerror or e})", kind)


def load_audio(path: str | os.PathLike, *, sample_rate: int) -> np.ndarray:
    """Reads an audio file as mono float32 at ``sample_rate``.

    Multi-channel audio is mixed down by averaging channels; other rates are resampled
    (soxr high quality); integer PCM of any width (8-bit unsigned included) is scaled to [-1, 1];
    float files are clipped to [-1, 1] (data_prep says so: :func:`segment_audio` counts it).

    Args:
      path: audio file (anything libsndfile reads: WAV, FLAC, OGG, ...).
      sample_rate: target rate in Hz.

    Returns:
      [num_samples] float32 waveform.

    Raises:
      AudioError: unreadable / empty file, no samples, non-finite samples, or a declared rate
        below ``MIN_SAMPLE_RATE`` (a corrupt header).
    """
    wave, rate = read_audio(path)
    if rate != sample_rate:
        wave = resample(wave, orig_sr=rate, target_sr=sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """An audio file as mono float32 at its own rate, and that rate: :func:`load_audio` before
    resampling (same checks, same mix-down and clipping)."""
    wave, rate = _read_mono(path)
    np.clip(wave, -1.0, 1.0, out=wave)
    return wave, rate


def _read_mono(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """:func:`read_audio` before clipping (a float file may go beyond full scale)."""
    import soundfile as sf

    path = os.fspath(path)
    check_audio_path(path)
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises LibsndfileError / RuntimeError / TypeError
        reason = str(e).strip() or type(e).__name__
        raise AudioError(path, f"not a readable audio file ({reason})") from None
    if data.shape[0] == 0:
        cut = file_damage.damage_note(
            path
        )  # an Ogg file cut inside its first pages decodes nothing
        reason = f"audio has no samples (0 frames{f'; {cut}' if cut else ''})"
        raise AudioError(path, reason, "no_samples")
    if rate < MIN_SAMPLE_RATE:
        raise AudioError(path, sample_rate_problem(rate), "bad_rate")
    finite = np.isfinite(data).all(axis=1)
    if not finite.all():
        bad = int((~np.isfinite(data)).sum())
        at = int(np.argmin(finite)) / rate
        raise AudioError(
            path, f"audio contains {bad} NaN/inf samples (the first at {at:.2f} s)", "non_finite"
        )
    wave = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return wave, int(rate)


MIN_RELIABLE_SECONDS = 0.25
"""Audio shorter than this says next to nothing: predict warns with its prediction (a 10-ms
click normalised per utterance can come out ~100 % confident), data_prep in its summary."""

SILENT_REASON = "silent: every frame the same (digital silence, or below the feature floor)"
"""Why data_prep skips, and predict warns about, audio that :func:`is_digital_silence`."""


def silent_reason(path: str | os.PathLike) -> str:
    """Why a file whose windows :func:`is_digital_silence` is silent: :data:`SILENT_REASON`, or,
    for channels that are not silent but cancel out when mixed down to mono (one channel the
    other inverted: a wiring fault), that."""
    import soundfile as sf

    try:
        data, _ = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except Exception:  # it was read a moment ago; a file changed since keeps the usual reason
        return SILENT_REASON
    if data.shape[1] > 1 and float(np.ptp(data, axis=0).max()) > 0.0:
        return (
            "silent once mixed to mono: its channels cancel out (one is the other inverted, "
            "a wiring fault); keep one channel of it"
        )
    return SILENT_REASON


def is_digital_silence(segments: np.ndarray, valid_frames: np.ndarray) -> bool:
    """Whether the real frames of windows [K, F, T] (``valid_frames`` [K]) are all the same in
    every band: digital silence, or audio so quiet that every band sits at the feature floor
    (log-mel floors power at ``LOG_FLOOR``; MFCC's floor is relative to the loudest frame, so
    the same quiet file can be silent for one preset and not the other). Such windows carry
    nothing to learn or predict."""
    x, valid = np.asarray(segments), np.asarray(valid_frames)
    real = np.arange(x.shape[2])[None, :] < valid[:, None]  # [windows, frames]
    frames = np.swapaxes(x, 1, 2)[real]  # [real frames, bands]
    return bool(frames.size) and float(np.ptp(frames, axis=0).max()) == 0.0


def sample_rate_problem(rate: int) -> str:
    """The reason given for a declared sample rate below ``MIN_SAMPLE_RATE``."""
    return f"implausible sample rate {rate} Hz (below {MIN_SAMPLE_RATE} Hz: a corrupt header?)"


def resample(wave: np.ndarray, *, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling (soxr, "HQ") of a mono waveform [n] → [ceil(n·target/orig)].

    The output is trimmed or zero-padded to ``ceil(n * target_sr / orig_sr)`` samples and
    clipped to [-1, 1]; it equals ``librosa.resample(..., res_type="soxr_hq")`` bit for bit
    (the tests check it), without librosa's import cost in every feature worker.
    """
    import soxr

    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr:
        return wave
    n_out = int(np.ceil(wave.shape[0] * (float(target_sr) / orig_sr)))
    out = soxr.resample(wave, orig_sr, target_sr, quality="soxr_hq")
    if out.shape[0] > n_out:
        out = out[:n_out]
    elif out.shape[0] < n_out:
        out = np.pad(out, (0, n_out - out.shape[0]))
    return np.clip(out, -1.0, 1.0).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

# Slaney's mel scale (Auditory Toolbox): linear below 1 kHz at 200/3 Hz per mel, logarithmic
# above it, with 27 mels per factor 6.4 in frequency.
_MEL_LINEAR_HZ = 200.0 / 3
_MEL_BREAK_HZ = 1000.0
_MEL_BREAK = _MEL_BREAK_HZ / _MEL_LINEAR_HZ  # 15 mels
_MEL_LOG_STEP = np.log(6.4) / 27.0
_STFT_BLOCK = 2048  # frames transformed at a time (bounds the float64 temporaries)


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel of frequencies in Hz (float64, same shape)."""
    hz = np.asarray(hz, dtype=np.float64)
    high = hz >= _MEL_BREAK_HZ
    log_part = (
        _MEL_BREAK + np.log(np.where(high, hz, _MEL_BREAK_HZ) / _MEL_BREAK_HZ) / _MEL_LOG_STEP
    )
    return np.where(high, log_part, hz / _MEL_LINEAR_HZ)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel` (float64, same shape)."""
    mel = np.asarray(mel, dtype=np.float64)
    high = mel >= _MEL_BREAK
    return np.where(
        high, _MEL_BREAK_HZ * np.exp(_MEL_LOG_STEP * (mel - _MEL_BREAK)), _MEL_LINEAR_HZ * mel
    )


@functools.lru_cache(maxsize=16)
def _sparse_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None):
    import scipy.sparse

    fb = mel_filterbank(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    return scipy.sparse.csr_matrix(fb)


@functools.lru_cache(maxsize=16)
def mel_filterbank(
    *, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None
) -> np.ndarray:
    """Slaney-normalised mel filterbank [n_mels, n_fft // 2 + 1] float32.

    Triangle ``m`` rises from mel edge ``m`` to edge ``m + 1`` and falls to edge ``m + 2``
    (``n_mels + 2`` edges equally spaced on the Slaney mel scale from ``fmin`` to ``fmax``),
    scaled by ``2 / (edge[m + 2] - edge[m])`` in Hz so each filter has unit area. Computed in
    float64 and rounded once to float32; equal bit for bit to ``librosa.filters.mel`` with its
    defaults (checked by the tests).
    """
    top = sample_rate / 2 if fmax is None else float(fmax)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(top), n_mels + 2))
    freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    width = np.diff(edges)
    rising = (freqs[None, :] - edges[:-2, None]) / width[:-1, None]
    falling = (edges[2:, None] - freqs[None, :]) / width[1:, None]
    triangles = np.maximum(0, np.minimum(rising, falling)).astype(np.float32)
    fb = (triangles * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)
    fb.setflags(write=False)
    return fb


@functools.lru_cache(maxsize=16)
def _analysis_window(n_fft: int, win_length: int) -> np.ndarray:
    """Periodic Hann of ``win_length`` centred in ``n_fft`` zeros, float64 [n_fft]."""
    phase = np.linspace(-np.pi, np.pi, win_length + 1)
    hann = np.zeros(win_length + 1)
    hann += 0.5
    hann += 0.5 * np.cos(phase)
    window = np.zeros(n_fft)
    left = (n_fft - win_length) // 2
    window[left : left + win_length] = hann[:win_length]
    window.setflags(write=False)
    return window


def power_spectrogram(wave: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Power spectrogram [n_fft // 2 + 1, 1 + n // hop_length] float32 of a waveform [n].

    ``center=True`` framing with zero padding of ``n_fft // 2`` on both sides, periodic Hann of
    ``win_length`` centred in ``n_fft``; each frame is windowed and transformed in float64 and
    the spectrum rounded to complex64 before squaring (as ``librosa.stft`` does, whose output
    this equals bit for bit).
    """
    wave = np.asarray(wave, dtype=np.float32)
    frames = num_frames(wave.shape[0], cfg)
    half = cfg.n_fft // 2
    padded = np.pad(wave, (half, half + max(0, cfg.n_fft - wave.shape[0])))
    view = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft)[:: cfg.hop_length][:frames]
    window = _analysis_window(cfg.n_fft, cfg.win_length)
    power = np.empty((cfg.n_fft // 2 + 1, frames), np.float32)
    for s in range(0, frames, _STFT_BLOCK):
        spec = np.fft.rfft(window * view[s : s + _STFT_BLOCK], axis=-1).astype(np.complex64)
        power[:, s : s + _STFT_BLOCK] = (np.square(spec.real) + np.square(spec.imag)).T
    return power


def num_frames(num_samples: int, cfg: FeatureConfig) -> int:
    """Frames of a ``center=True`` analysis of ``num_samples`` samples: 1 + n // hop."""
    return 1 + int(num_samples) // cfg.hop_length


def mel_power(wave: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Mel power spectrogram [n_mels, frames] float32 of a mono waveform [n].

    :func:`power_spectrogram` (Hann window of ``win_length`` zero-padded to ``n_fft``,
    ``center=True`` with zero padding, power 2) times the Slaney mel filterbank.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D [num_samples], got shape {wave.shape}")
    power = power_spectrogram(wave, cfg)
    # The filterbank is ~95 % zeros: a CSR product is exact up to float32 rounding, avoids
    # BLAS (whose thread pool costs 100x on small products on a busy 2-core host) and sums in
    # a fixed order, so results do not depend on the thread count.
    fb = _sparse_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    return np.asarray(fb @ power, dtype=np.float32)


def compute_features(wave: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Whole-utterance features of a mono waveform.

    Args:
      wave: [num_samples] float waveform at ``cfg.sample_rate``.
      cfg: feature configuration.

    Returns:
      [cfg.num_bins, 1 + num_samples // cfg.hop_length] float32.
    """
    mel = mel_power(wave, cfg)
    if cfg.kind == "logmel":
        return log_mel(mel)
    # MFCC (librosa.feature.mfcc defaults): power_to_db(ref=1, amin=1e-10, top_db=80) + DCT-II.
    import scipy.fft

    db = mel_db(mel)
    db = np.maximum(db, db.max() - np.float32(MFCC_TOP_DB))
    mfcc = scipy.fft.dct(db, axis=0, type=2, norm="ortho")[: cfg.n_mfcc]
    return np.ascontiguousarray(mfcc, dtype=np.float32)


# ln(2) and ln(10) as float64 literals (not computed here: np.log may differ by CPU).
_LN2 = 0.6931471805599453
_LN10 = 2.302585092994046
# Coefficients 1 / (2k + 1) of ln(m) = 2 s (1 + s²/3 + s⁴/5 + …), s = (m - 1) / (m + 1): with
# |s| ≤ 0.172 the terms past k = 11 are below 1e-19 of the sum.
_ATANH_SERIES = tuple(1.0 / (2 * k + 1) for k in range(11, -1, -1))


def natural_log(x: np.ndarray) -> np.ndarray:
    """ln of a float array, in float64, the same bits on every CPU.

    NumPy's own ``log``/``log10`` pick an implementation by the CPU's vector extensions at
    run time (the float32 ``log10`` of an AVX-512 CPU and of an AVX2 one disagree in the last
    bit for about half of all mel energies; ``log`` without AVX2 is the C library's), so
    features written on two machines had other bits. This uses only exact steps
    (``frexp``) and IEEE-rounded ``+ - * /``, one NumPy operation each, in a fixed order:
    ``x = m·2^e`` with ``m`` in [√½, √2), ``ln x = e·ln 2 + 2·atanh((m - 1) / (m + 1))`` by its
    series. Within 4e-16 relative of NumPy's float64 ``log`` (3 million float32 inputs), so its
    float32 rounding is the correctly rounded float32 logarithm but for values closer than that
    to a tie. ``ln 0 = -inf``, ``ln inf = inf``, negative or NaN inputs give NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    shape = x.shape
    x = x.reshape(-1)  # 0-d too: frexp of a 0-d array gives scalars, not arrays
    # In place where possible (same operations, same order as the formula above).
    with np.errstate(divide="ignore", invalid="ignore"):  # 0, negative, inf: replaced below
        m, e = np.frexp(x)
        low = m < 0.7071067811865476  # √½
        np.multiply(m, 2.0, out=m, where=low)
        e -= low
        out = e.astype(np.float64)
        t = m + 1.0
        m -= 1.0
        m /= t  # s = (m - 1) / (m + 1)
        s2 = np.multiply(m, m, out=t)
        series = np.full_like(s2, _ATANH_SERIES[0])
        for c in _ATANH_SERIES[1:]:
            series *= s2
            series += c
        out *= _LN2
        m *= 2.0
        m *= series
        out += m  # e·ln 2 + (2·s)·series
    if not np.all((x > 0) & (x < np.inf)):  # NaN fails both
        out = np.where(x == 0, -np.inf, out)
        out = np.where(x == np.inf, np.inf, out)
        out = np.where(x < 0, np.nan, out)
    return out.reshape(shape)


_LOG_BLOCK = 1 << 16  # values per natural_log call: its float64 temporaries stay ~0.5 MiB each


def _float32_log(x: np.ndarray, *, divisor: float = 1.0) -> np.ndarray:
    """float32 of ``natural_log(x) / divisor`` for a float32 array, block by block (the float64
    temporaries of one call on a whole hour of log-mel frames would take ~1 GB)."""
    flat = x.reshape(-1)
    out = np.empty(flat.shape, np.float32)
    for start in range(0, flat.size, _LOG_BLOCK):
        value = natural_log(flat[start : start + _LOG_BLOCK])
        if divisor != 1.0:
            value /= divisor
        out[start : start + _LOG_BLOCK] = value  # rounds to float32 as astype does
    return out.reshape(x.shape)


def log_mel(mel: np.ndarray) -> np.ndarray:
    """``ln(max(mel, LOG_FLOOR))`` of float32 mel power, as float32, the same bits on every CPU
    (:func:`natural_log`)."""
    return _float32_log(np.maximum(np.asarray(mel, np.float32), np.float32(LOG_FLOOR)))


def mel_db(mel: np.ndarray) -> np.ndarray:
    """``10·log10(max(mel, 1e-10))`` of float32 mel power, as float32 (librosa's
    ``power_to_db`` with ``ref=1`` before its ``top_db`` floor): log10 rounded to float32, then
    times 10 in float32, as NumPy's float32 ``log10`` did; the same bits on every CPU
    (:func:`natural_log`)."""
    floored = np.maximum(np.asarray(mel, np.float32), np.float32(MFCC_AMIN))
    return np.float32(10.0) * _float32_log(floored, divisor=_LN10)


def pad_to_window(wave: np.ndarray, cfg: FeatureConfig) -> tuple[np.ndarray, int]:
    """Zero-pads a waveform shorter than one window (silence padding).

    Args:
      wave: [n] waveform.
      cfg: feature configuration.

    Returns:
      (wave [max(n, window_samples)], number of frames that come from real audio).
    """
    n = int(wave.shape[0])
    real = num_frames(n, cfg)
    if n >= cfg.window_samples:
        return wave, real
    return np.pad(wave, (0, cfg.window_samples - n)), real


def segment_starts(total_frames: int, cfg: FeatureConfig, *, hop_seconds: float) -> np.ndarray:
    """First frame of every complete window in a [*, total_frames] feature matrix.

    Returns:
      [K] int64 start frames (empty when ``total_frames < frames_per_window``).
    """
    fpw = cfg.frames_per_window
    if total_frames < fpw:
        return np.zeros((0,), np.int64)
    hop = cfg.hop_frames(hop_seconds)
    if not hop > 0:
        raise ValueError(f"hop_seconds must be > 0, got {hop_seconds}")
    last = total_frames - fpw
    candidates = np.arange(int(last / hop) + 2)  # one past the last start that can fit
    starts = np.round(candidates * hop).astype(np.int64)
    return starts[starts <= last]


def segment_features(
    features: np.ndarray,
    cfg: FeatureConfig,
    *,
    hop_seconds: float,
    num_valid_frames: int | None = None,
    pad_value: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a whole-utterance feature matrix into fixed windows.

    Args:
      features: [num_bins, frames] whole-utterance features.
      cfg: feature configuration (window length, short-utterance policy).
      hop_seconds: hop between window starts (s); converted to frames and rounded per window.
      num_valid_frames: how many leading frames come from real audio (the rest is padding);
        default all of them.
      pad_value: value for right-padding a matrix shorter than one window; default the minimum of
        each row (a stand-in for silence; the prep pipeline pads the waveform instead, see
        :func:`pad_to_window`, so it never needs this).

    Returns:
      segments [K, num_bins, frames_per_window] float32 and valid_frames [K] int32 (frames of
      each window inside the first ``num_valid_frames``). K = 0 only when the matrix is shorter
      than one window and ``cfg.short_utterances == "drop"`` (or it has no frames at all).
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be [num_bins, frames], got shape {features.shape}")
    bins, total = features.shape
    fpw = cfg.frames_per_window
    valid_total = total if num_valid_frames is None else int(min(num_valid_frames, total))
    if total < fpw:
        if cfg.short_utterances == "drop" or total == 0:
            return np.zeros((0, bins, fpw), np.float32), np.zeros((0,), np.int32)
        if pad_value is None:
            fill = features.min(axis=1, keepdims=True)
        else:
            fill = np.full((bins, 1), pad_value, np.float32)
        padded = np.concatenate([features, np.broadcast_to(fill, (bins, fpw - total))], axis=1)
        return padded[None], np.array([valid_total], np.int32)
    starts = segment_starts(total, cfg, hop_seconds=hop_seconds)
    index = starts[:, None] + np.arange(fpw)[None, :]
    segments = np.ascontiguousarray(np.moveaxis(features[:, index], 1, 0))
    valid = np.clip(valid_total - starts, 0, fpw).astype(np.int32)
    return segments, valid


# --------------------------------------------------------------------------------------------
# File → segments (the one path shared by data_prep and predict)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segments:
    """The windows of one segment layout of an utterance.

    Attributes:
      hop_seconds: hop between window starts (s).
      features: [K, num_bins, frames_per_window] float32 windows.
      valid_frames: [K] int32 frames of each window that come from real audio (not padding).
      start_frames: [K] int64 first feature frame of each window.
      starts_s: [K] float64 start of each window in seconds.
    """

    hop_seconds: float
    features: np.ndarray
    valid_frames: np.ndarray
    start_frames: np.ndarray
    starts_s: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclasses.dataclass(frozen=True)
class UtteranceSegments:
    """An utterance turned into windows, as data_prep stores it.

    Attributes:
      duration_s: length of the audio (s), before any padding.
      num_samples: samples of the audio at ``cfg.sample_rate``, before any padding.
      padded: the audio is shorter than one window (it was zero-padded to one, or dropped).
      dropped: the audio is shorter than one window and the policy is "drop": no windows.
      layouts: one :class:`Segments` per requested hop, in the order requested (empty windows
        when ``dropped``).
      constant: every sample of the audio (before resampling) has the same value (digital
        silence, or a DC level whose windows still differ at the file's zero-padded edges).
      source_rate: the sample rate of the file or waveform, before resampling (Hz).
      source_frames: samples (per channel) decoded from the file, or of the waveform, before
        resampling (for ``file_damage.damage_note``'s comparison with what the file declares).
      clipped_samples: samples of a file beyond full scale (a float file louder than 1.0,
        after the channels' mix-down), clipped to [-1, 1] before the features.
      peak: the largest absolute sample of the file before that clipping (0 when none was).
    """

    duration_s: float
    num_samples: int
    padded: bool
    dropped: bool
    layouts: tuple[Segments, ...]
    constant: bool = False
    source_rate: int = 0
    source_frames: int = 0
    clipped_samples: int = 0
    peak: float = 0.0


def segment_audio(
    source: str | os.PathLike | np.ndarray,
    cfg: FeatureConfig,
    *,
    hop_seconds: float | tuple[float, ...] | list[float],
    short_utterances: str | None = None,
    sample_rate: int | None = None,
) -> UtteranceSegments:
    """Audio → whole-utterance features → fixed windows, exactly as data_prep stores them.

    The waveform (a file read by :func:`load_audio`, or an array at ``sample_rate``, resampled
    when it differs from ``cfg.sample_rate``) is zero-padded to one window when shorter
    (:func:`pad_to_window`, so the padding is exact silence), turned into features once
    (:func:`compute_features`) and cut with each requested hop (:func:`segment_features`);
    ``valid_frames`` counts the frames of each window inside the real audio.

    Args:
      source: an audio file path, or a mono waveform [n] (float, in [-1, 1]).
      cfg: feature configuration.
      hop_seconds: one hop or a sequence of hops (s), e.g. ``(cfg.train_hop_seconds,
        cfg.eval_hop_seconds)`` for data_prep's two layouts.
      short_utterances: "pad" or "drop" for audio shorter than one window (default
        ``cfg.short_utterances``); predict uses "pad" so every file gets a score.
      sample_rate: rate of a waveform ``source`` (default ``cfg.sample_rate``); ignored for
        files.

    Returns:
      :class:`UtteranceSegments` with one :class:`Segments` per hop.

    Raises:
      AudioError: the file cannot be used (unreadable, empty, no samples, NaN/inf).
      ValueError: a waveform that is not 1-D, or a bad policy / hop.
    """
    hops = (hop_seconds,) if isinstance(hop_seconds, int | float) else tuple(hop_seconds)
    policy = cfg.short_utterances if short_utterances is None else short_utterances
    if policy not in _SHORT:
        raise ValueError(f"short_utterances must be one of {_SHORT}, got {policy!r}")
    if isinstance(source, np.ndarray):
        wave = np.asarray(source, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"waveform must be 1-D [num_samples], got shape {wave.shape}")
        rate = cfg.sample_rate if sample_rate is None else int(sample_rate)
        clipped, peak = 0, 0.0
    else:
        wave, rate = _read_mono(source)
        clipped = int(np.count_nonzero(np.abs(wave) > 1.0))  # read_audio's clipping, counted
        peak = float(np.abs(wave).max()) if clipped else 0.0
        np.clip(wave, -1.0, 1.0, out=wave)
    constant = bool(wave.size) and bool(wave.min() == wave.max())
    frames = int(wave.shape[0])
    if rate != cfg.sample_rate:
        wave = resample(wave, orig_sr=rate, target_sr=cfg.sample_rate)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    n = int(wave.shape[0])
    short = n < cfg.window_samples
    if short and policy == "drop":
        empty = tuple(_empty_segments(cfg, h) for h in hops)
        return UtteranceSegments(
            n / cfg.sample_rate, n, True, True, empty, constant, rate, frames, clipped, peak
        )
    padded, valid = pad_to_window(wave, cfg)
    feats = compute_features(padded, cfg)
    layouts = []
    for hop in hops:
        segs, valid_frames = segment_features(feats, cfg, hop_seconds=hop, num_valid_frames=valid)
        starts = segment_starts(feats.shape[1], cfg, hop_seconds=hop)
        layouts.append(
            Segments(
                hop_seconds=float(hop),
                features=segs,
                valid_frames=valid_frames,
                start_frames=starts,
                starts_s=starts * cfg.hop_length / cfg.sample_rate,
            )
        )
    return UtteranceSegments(
        n / cfg.sample_rate, n, short, False, tuple(layouts), constant, rate, frames, clipped, peak
    )


def _empty_segments(cfg: FeatureConfig, hop: float) -> Segments:
    return Segments(
        hop_seconds=float(hop),
        features=np.zeros((0, *cfg.segment_shape), np.float32),
        valid_frames=np.zeros((0,), np.int32),
        start_frames=np.zeros((0,), np.int64),
        starts_s=np.zeros((0,), np.float64),
    )
