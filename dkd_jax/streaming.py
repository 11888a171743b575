"""Streaming prediction with an exported model, in constant memory and without JAX.

* :class:`StreamingFrontEnd`: the feature front end (:mod:`dkd_jax.audio`) fed block by block.
  Its windows equal the whole-file windows of ``predict.file_segments``: a frame is computed
  once its ``n_fft`` samples have arrived, from a bounded ring buffer of samples, with the same
  ``center=True`` zero padding at the start and, when the stream ends, at the end; a stream
  shorter than one window is padded to one, as a file is. One exception: the MFCC front end's
  ``top_db`` floor (80 dB below the loudest frame of the whole utterance) can only use the
  loudest frame *so far*, so MFCC windows equal the file's once the loudest frame has arrived.
* :class:`StreamPredictor`: one row per evaluation hop (0.4 s): the window's probabilities and
  an exponential moving average of them (time constant ``smoothing_seconds``). Per-utterance
  normalisation uses the statistics of all windows so far (the file rule applied to the stream
  up to now), so the last window of a stream is normalised exactly as a file of the same audio.
* :func:`file_blocks` / :func:`pcm_blocks`: sample blocks from an audio file or from raw 16-bit
  PCM (stdin), resampled to the model's rate by soxr's streaming resampler when needed.

Like :mod:`dkd_jax.deploy`, this module must never import jax, flax or optax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np

from dkd_jax import audio, file_damage
from dkd_jax.deploy import (
    DeployError,
    OnnxClassifier,
    cli_error,
    normalize_segments,
    softmax,
    window_moments,
)
from dkd_jax.predict import band_limit_warning

__all__ = [
    "StreamPredictor",
    "StreamWindow",
    "StreamingFrontEnd",
    "file_blocks",
    "format_stream_header",
    "format_stream_row",
    "pcm_blocks",
    "stream_cli",
    "stream_rows",
]

# --------------------------------------------------------------------------------------------
# Streaming front end
# --------------------------------------------------------------------------------------------


class _Ring:
    """A bounded FIFO of rows (axis 0) in one preallocated array: constant memory."""

    def __init__(self, capacity: int, row_shape: tuple[int, ...] = ()):
        self._data = np.zeros((capacity, *row_shape), np.float32)
        self._lo = 0
        self._hi = 0

    def __len__(self) -> int:
        return self._hi - self._lo

    def append(self, rows: np.ndarray) -> None:
        n = rows.shape[0]
        if self._hi + n > self._data.shape[0]:
            size = len(self)
            if size + n > self._data.shape[0]:
                raise OverflowError(f"ring buffer of {self._data.shape[0]} rows overflows")
            self._data[:size] = self._data[self._lo : self._hi]
            self._lo, self._hi = 0, size
        self._data[self._hi : self._hi + n] = rows
        self._hi += n

    def drop(self, n: int) -> None:
        self._lo += min(int(n), len(self))

    def view(self) -> np.ndarray:
        return self._data[self._lo : self._hi]


@dataclasses.dataclass(frozen=True)
class StreamWindow:
    """One evaluation window of a stream: its index, first frame, times and features."""

    index: int
    start_frame: int
    start_s: float
    end_s: float
    features: np.ndarray  # [F, frames_per_window] float32 (not normalised)
    valid_frames: int


class StreamingFrontEnd:
    """Whole-file-equivalent features of a stream, one evaluation window at a time.

    Feed mono float32 samples at ``cfg.sample_rate`` with :meth:`push` (any block sizes), then
    call :meth:`finish` once; each returns the windows completed so far. Memory is bounded by a
    few windows whatever the stream's length.

    Args:
        cfg: the model's feature config.
        hop_seconds: hop between windows (default ``cfg.eval_hop_seconds``).
    """

    def __init__(self, cfg: audio.FeatureConfig, *, hop_seconds: float | None = None):
        self.cfg = cfg
        self.hop_seconds = float(cfg.eval_hop_seconds if hop_seconds is None else hop_seconds)
        if not self.hop_seconds > 0:
            raise DeployError(f"hop_seconds must be positive, got {hop_seconds}")
        self._half = cfg.n_fft // 2
        self._context = math.ceil(self._half / cfg.hop_length)  # frames of left context
        self._block = max(cfg.hop_length, round(self.hop_seconds * cfg.sample_rate))
        fpw = cfg.frames_per_window
        cap = (
            cfg.window_samples + 2 * self._block + cfg.n_fft + (self._context + 2) * cfg.hop_length
        )
        self._samples = _Ring(cap)
        rows = 2 * fpw + self._block // cfg.hop_length + self._context + 8
        self._frames = _Ring(rows, (cfg.n_mels,))  # log-mel, or MFCC's dB before the DCT
        self._sample0 = 0  # global index of the first buffered sample
        self._frame0 = 0  # global index of the first buffered frame
        self._received = 0
        self._next_frame = 0
        self._next_window = 0
        self._max_db = -np.inf
        self._finished = False

    @property
    def samples_received(self) -> int:
        """Samples pushed so far."""
        return self._received

    def window_start(self, k: int) -> int:
        """First frame of window ``k`` (the formula of ``audio.segment_starts``)."""
        return int(np.round(np.float64(k) * self.cfg.hop_frames(self.hop_seconds)))

    def push(self, samples: np.ndarray) -> list[StreamWindow]:
        """Adds samples (mono: ``[n]``, ``[n, 1]`` or ``[1, n]``); returns the windows now complete.

        Raises:
            DeployError: the stream has finished, the samples are not mono, or one is NaN or
              infinite (file prediction refuses such audio too; it would poison every window
              after it through the running normalisation).
        """
        if self._finished:
            raise DeployError("stream already finished")
        x = np.asarray(samples, np.float32)
        if sum(n > 1 for n in x.shape) > 1:
            raise DeployError(
                f"mono samples expected ([n], [n, 1] or [1, n]), got an array of shape {x.shape}; "
                "average the channels first"
            )
        x = x.reshape(-1)
        finite = np.isfinite(x)
        if not finite.all():
            at = (self._received + int(np.argmin(finite))) / self.cfg.sample_rate
            raise DeployError(
                f"audio contains {int((~finite).sum())} NaN/inf samples (the first at {at:.2f} s)"
            )
        out = []
        for i in range(0, x.shape[0], self._block):
            chunk = x[i : i + self._block]
            self._samples.append(chunk)
            self._received += chunk.shape[0]
            last = (self._received - self._half) // self.cfg.hop_length  # last complete frame
            if last >= self._next_frame:
                self._compute(last + 1, at_end=False)
            out += self._emit()
            self._trim_samples()
        return out

    def finish(self) -> list[StreamWindow]:
        """Ends the stream: the last frames see zero padding, as at the end of a file."""
        if self._finished:
            return []
        self._finished = True
        if self._received == 0:
            raise DeployError("the stream has no samples")
        if self._received < self.cfg.window_samples:
            return [self._short_window()]
        self._compute(audio.num_frames(self._received, self.cfg), at_end=True)
        return self._emit()

    # -- internals --

    def _compute(self, stop: int, *, at_end: bool) -> None:
        """Appends frames [next_frame, stop) to the frame buffer."""
        cfg, start = self.cfg, self._next_frame
        g0 = max(0, (start - self._context) * cfg.hop_length)
        g1 = self._received if at_end else (stop - 1) * cfg.hop_length + self._half
        lo = g0 - self._sample0
        wave = self._samples.view()[lo : lo + (g1 - g0)]
        mel = audio.mel_power(wave, cfg)  # [n_mels, frames] of the chunk, chunk frame 0 = g0
        first = start - g0 // cfg.hop_length
        rows = self._transform(mel[:, first : first + (stop - start)])
        self._frames.append(rows.T)
        self._next_frame = stop

    def _transform(self, mel: np.ndarray) -> np.ndarray:
        if self.cfg.kind == "logmel":
            return audio.log_mel(mel)
        db = audio.mel_db(mel)
        if db.size:
            self._max_db = max(self._max_db, float(db.max()))
        return db

    def _window_features(self, frames: np.ndarray) -> np.ndarray:
        """[fpw, bands] buffered rows → [F, fpw] features (MFCC: floor + DCT)."""
        x = np.ascontiguousarray(frames.T)
        if self.cfg.kind == "logmel":
            return x
        import scipy.fft

        floor = np.float32(self._max_db) - np.float32(audio.MFCC_TOP_DB)
        db = np.maximum(x, floor)
        mfcc = scipy.fft.dct(db, axis=0, type=2, norm="ortho")[: self.cfg.n_mfcc]
        return np.ascontiguousarray(mfcc, dtype=np.float32)

    def _emit(self) -> list[StreamWindow]:
        cfg, fpw, out = self.cfg, self.cfg.frames_per_window, []
        while True:
            s = self.window_start(self._next_window)
            if s + fpw > self._next_frame:
                break
            rows = self._frames.view()[s - self._frame0 : s - self._frame0 + fpw]
            start_s = s * cfg.hop_length / cfg.sample_rate
            # The last windows reach into the end's padding: they end where the audio does, as
            # predict's --segments rows say (a stream can only emit them once it has ended).
            heard = max(self._received / cfg.sample_rate, cfg.window_seconds)
            out.append(
                StreamWindow(
                    self._next_window,
                    s,
                    start_s,
                    min(start_s + cfg.window_seconds, heard),
                    self._window_features(rows),
                    fpw,
                )
            )
            self._next_window += 1
        keep_from = self.window_start(self._next_window)
        self._frames.drop(keep_from - self._frame0)
        self._frame0 = max(self._frame0, keep_from)
        return out

    def _trim_samples(self) -> None:
        if self._received < self.cfg.window_samples:
            return  # a stream shorter than a window is padded as a whole at the end
        keep_from = max(0, (self._next_frame - self._context) * self.cfg.hop_length)
        self._samples.drop(keep_from - self._sample0)
        self._sample0 = max(self._sample0, keep_from)

    def _short_window(self) -> StreamWindow:
        wave = self._samples.view()[: self._received]
        padded, valid = audio.pad_to_window(wave, self.cfg)
        mel = audio.mel_power(padded, self.cfg)
        self._max_db = -np.inf
        rows = self._transform(mel)
        feats = self._window_features(rows.T[: self.cfg.frames_per_window])
        duration = self._received / self.cfg.sample_rate
        return StreamWindow(
            0,
            0,
            0.0,
            max(duration, self.cfg.window_seconds),
            feats,
            int(min(valid, self.cfg.frames_per_window)),
        )


# --------------------------------------------------------------------------------------------
# Streaming prediction
# --------------------------------------------------------------------------------------------


class StreamPredictor:
    """Per-window probabilities of a stream and their exponential moving average.

    Args:
        model: an :class:`OnnxClassifier`.
        smoothing_seconds: time constant τ of the moving average: each hop of ``h`` seconds
            keeps ``exp(-h / τ)`` of the previous average; 0 disables smoothing.
    """

    def __init__(self, model: OnnxClassifier, *, smoothing_seconds: float = 1.0):
        if not (math.isfinite(smoothing_seconds) and smoothing_seconds >= 0):
            raise DeployError(f"--smooth must be ≥ 0 seconds (finite), got {smoothing_seconds}")
        self.model = model
        self.front_end = StreamingFrontEnd(model.features)
        hop = self.front_end.hop_seconds
        self.decay = math.exp(-hop / smoothing_seconds) if smoothing_seconds > 0 else 0.0
        self._smoothed: np.ndarray | None = None
        bins = model.features.num_bins
        self._moments = [0.0, np.zeros(bins), np.zeros(bins)]

    def push(self, samples: np.ndarray) -> list[dict[str, Any]]:
        """Adds samples (mono float32 at the model's rate); returns the finished hops' rows."""
        return self._score(self.front_end.push(samples))

    def finish(self) -> list[dict[str, Any]]:
        """Ends the stream; returns the last rows."""
        return self._score(self.front_end.finish())

    def _normalise(self, w: StreamWindow) -> np.ndarray:
        """One window normalised as the model was trained; "utterance" uses the statistics of
        the stream so far (every window up to this one)."""
        norm = self.model.normalization
        x, valid = w.features[None], np.array([w.valid_frames])
        moments = None
        if norm.get("mode") == "utterance":
            count, total, total_sq = window_moments(x, valid)
            m = self._moments
            m[0] += count
            m[1] = m[1] + total
            m[2] = m[2] + total_sq
            moments = tuple(m)
        return normalize_segments(x, valid, norm, moments=moments)[0]

    def _score(self, windows: list[StreamWindow]) -> list[dict[str, Any]]:
        if not windows:
            return []
        names = self.model.label_names
        probs = softmax(self.model.logits(np.stack([self._normalise(w) for w in windows])))
        rows = []
        for w, p in zip(windows, probs, strict=True):
            if self._smoothed is None:
                self._smoothed = p
            else:
                self._smoothed = self.decay * self._smoothed + (1.0 - self.decay) * p
            rows.append(
                {
                    "start_s": round(w.start_s, 3),
                    "end_s": round(w.end_s, 3),
                    "probabilities": {n: float(v) for n, v in zip(names, p, strict=True)},
                    "prediction": names[int(np.argmax(p))],
                    "smoothed": {n: float(v) for n, v in zip(names, self._smoothed, strict=True)},
                    "smoothed_prediction": names[int(np.argmax(self._smoothed))],
                }
            )
        return rows


MP3_FRAME_SAMPLES = 1152
"""Samples per MPEG-1 Layer III frame (MPEG-2/2.5 frames hold 576): an MP3 is read in whole
frames, as only those reads give a whole-file read's samples (libsndfile 1.2.2)."""

_MPG123_NOISE = re.compile(rb"^\[[^\]]*\] error: part2_3_length \(\d+\) too large")


class _Mpg123Noise:
    """Drops libmpg123's "part2_3_length too large" lines while an MP3 is read block by block.

    libsndfile 1.2.2 reads an MP3 in blocks of under ~64k samples with these C-level messages on
    stderr (70 for a 55-s file at 0.4-s blocks; none for a whole-file read), though with whole
    frames per read the samples equal a whole-file read's. Each read's stderr (file descriptor
    2) goes to a temporary file; every other line is passed on, so a real decoder message is
    still seen.
    """

    def __init__(self):
        self._saved: int | None = None
        self._log = None

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            self._saved = None  # no file descriptor 2 to divert: nothing is filtered
            return self
        if self._log is None:
            self._log = tempfile.TemporaryFile()
        os.dup2(self._log.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return False
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        self._log.seek(0)
        text = self._log.read()
        self._log.seek(0)
        self._log.truncate()
        kept = [line for line in text.splitlines(True) if not _MPG123_NOISE.match(line)]
        if kept:
            os.write(2, b"".join(kept))
        return False


def file_blocks(
    path: str | os.PathLike,
    *,
    sample_rate: int,
    block_seconds: float = 0.4,
    warn: Callable[[str], None] | None = None,
) -> Iterator[np.ndarray]:
    """Mono float32 blocks of an audio file at ``sample_rate``, read incrementally.

    Channels are averaged and samples clipped to [-1, 1] as ``audio.load_audio`` does; another
    rate is resampled block by block (soxr's streaming resampler, same quality as the whole-file
    path, so the samples agree with it up to the resampler's edge handling). ``warn``, when
    given, is called once the file has ended with ``"PATH: ..."`` if it decoded less than it
    declares (``file_damage.decode_shortfall``: an MP3 cut short, an Ogg file with damaged pages).

    Raises:
        DeployError: unreadable file, or NaN/inf samples (naming the time of the first).
    """
    import soundfile as sf

    path = os.fspath(path)
    try:
        audio.check_audio_path(path)
    except audio.AudioError as e:
        raise DeployError(str(e)) from None
    try:
        f = sf.SoundFile(path)
    except Exception as e:  # libsndfile raises LibsndfileError / RuntimeError
        raise DeployError(f"{path}: not a readable audio file ({e})") from None
    with f:
        if f.samplerate < audio.MIN_SAMPLE_RATE:
            raise DeployError(f"{path}: {audio.sample_rate_problem(f.samplerate)}")
        block = max(1, round(block_seconds * f.samplerate))
        quiet = contextlib.nullcontext()
        if f.format == "MP3":
            # libsndfile 1.2.2 decodes some samples of an MP3 differently when a read ends
            # inside a frame (mono 22.05 kHz at 0.4-s blocks: 7,122 of 551,250 samples differed
            # from a whole-file read, by up to 0.16); whole frames (1152 samples, or two of
            # 576) read as the whole file does.
            block = -(-block // MP3_FRAME_SAMPLES) * MP3_FRAME_SAMPLES
            quiet = _Mpg123Noise()
        resampler = _resampler(f.samplerate, sample_rate)
        start = 0
        while True:
            try:
                with quiet:
                    data = f.read(block, dtype="float32", always_2d=True)
            except RuntimeError as e:  # LibsndfileError: e.g. "flac decoder lost sync"
                raise DeployError(
                    f"{path}: not a readable audio file after {start / f.samplerate:.2f} s ({e})"
                ) from None
            last = data.shape[0] < block
            finite = np.isfinite(data).all(axis=1)
            if not finite.all():
                at = (start + int(np.argmin(finite))) / f.samplerate
                raise DeployError(
                    f"{path}: audio contains NaN/inf samples (the first at {at:.2f} s)"
                )
            start += data.shape[0]
            yield _to_model_rate(data, resampler, last=last)
            if last:
                short = file_damage.decode_shortfall(path, start) if warn is not None else None
                if short:  # a regular file only: a pipe declares no length
                    warn(f"{path}: {short}: predicted from what is there")
                return


#: How audio files begin: piped into ``--stream -`` they would be read as raw samples.
_CONTAINERS = {
    b"RIFF": "a WAV",
    b"RIFX": "a WAV",
    b"RF64": "a WAV",
    b"fLaC": "a FLAC",
    b"OggS": "an Ogg",
    b"FORM": "an AIFF",
    b"ID3": "an MP3",
}


def _refuse_a_container(head: bytes) -> None:
    for magic, kind in _CONTAINERS.items():
        if head.startswith(magic):
            raise DeployError(
                f"the input starts like {kind} file ({magic.decode()!r}), but --stream - reads "
                "raw 16-bit PCM: give the file as --stream FILE, or decode it to raw samples "
                "first (e.g. ffmpeg -i IN -f s16le -ac 1 -ar 16000 -)"
            )


#: Bounds of ``--stream -``'s raw PCM: far above any audio interface's (384 kHz, 64 channels),
#: low enough that a mistyped value cannot ask for gigabytes per 0.4-s block.
MAX_PCM_RATE = 768_000
MAX_PCM_CHANNELS = 256


def pcm_blocks(
    stream: BinaryIO, *, rate: int, channels: int = 1, sample_rate: int, block_seconds: float = 0.4
) -> Iterator[np.ndarray]:
    """Mono float32 blocks at ``sample_rate`` of raw little-endian 16-bit PCM from ``stream``."""
    if rate <= 0 or channels <= 0:
        raise DeployError(f"--rate and --channels must be positive, got {rate} and {channels}")
    if rate < audio.MIN_SAMPLE_RATE:  # as files declaring such a rate are refused
        raise DeployError(
            f"--rate {rate}: below {audio.MIN_SAMPLE_RATE} Hz (in Hz: 16000, not 16?)"
        )
    if rate > MAX_PCM_RATE or channels > MAX_PCM_CHANNELS:  # one block would not fit in memory
        raise DeployError(
            f"--rate {rate} / --channels {channels}: raw PCM input takes at most "
            f"{MAX_PCM_RATE} Hz and {MAX_PCM_CHANNELS} channels"
        )
    frame_bytes = 2 * channels
    block = max(1, round(block_seconds * rate)) * frame_bytes
    resampler = _resampler(rate, sample_rate)
    pending = b""
    first = True
    while True:
        data = stream.read(block)
        if first and data:
            _refuse_a_container(data)
            first = False
        last = not data
        pending += data or b""
        usable = len(pending) - len(pending) % frame_bytes
        if last and len(pending) != usable:
            print(
                f"eval.py: warning: the input ended inside a sample frame; "
                f"{len(pending) - usable} byte(s) dropped",
                file=sys.stderr,
            )
        raw, pending = pending[:usable], pending[usable:]
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / np.float32(32768.0)
        yield _to_model_rate(x.reshape(-1, channels), resampler, last=last)
        if last:
            return


def _resampler(in_rate: int, out_rate: int):
    if in_rate == out_rate:
        return None
    import soxr

    return soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")


def _to_model_rate(data: np.ndarray, resampler, *, last: bool) -> np.ndarray:
    wave = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    wave = np.clip(wave, -1.0, 1.0).astype(np.float32)
    if resampler is None:
        return wave
    out = resampler.resample_chunk(wave, last=last)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def stream_rows(
    model: OnnxClassifier, blocks: Iterable[np.ndarray], *, smoothing_seconds: float = 1.0
) -> Iterator[dict[str, Any]]:
    """One row per evaluation hop of a stream of sample blocks (see :class:`StreamPredictor`)."""
    predictor = StreamPredictor(model, smoothing_seconds=smoothing_seconds)
    for block in blocks:
        yield from predictor.push(block)
    yield from predictor.finish()


def format_stream_header(names: Sequence[str]) -> str:
    """Column header of the streaming table."""
    width = max(8, *(len(n) for n in names))
    cols = " ".join(f"{n:>8}" for n in names)
    return f"{'start':>7} {'end':>7}  {cols}  {'window':<{width}}  smoothed"


def format_stream_row(row: dict[str, Any], names: Sequence[str]) -> str:
    """One line of the streaming table: window span (s), probabilities, label, smoothed label."""
    width = max(8, *(len(n) for n in names))
    probs = " ".join(f"{row['probabilities'][n]:>8.3f}" for n in names)
    return (
        f"{row['start_s']:>7.2f} {row['end_s']:>7.2f}  {probs}  "
        f"{row['prediction']:<{width}}  {row['smoothed_prediction']}"
    )


# --------------------------------------------------------------------------------------------
# eval.py predict --model DIR --stream PATH|-
# --------------------------------------------------------------------------------------------


class _StreamWatch:
    """Passes a stream's blocks on, counting the samples and whether they all had one value,
    for the warnings file mode gives (``predict.input_warnings``) once the stream has ended."""

    def __init__(self, blocks: Iterable[np.ndarray]):
        self.blocks = blocks
        self.samples = 0
        self.low = math.inf
        self.high = -math.inf

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in self.blocks:
            if block.size:
                self.samples += block.shape[0]
                self.low = min(self.low, float(block.min()))
                self.high = max(self.high, float(block.max()))
            yield block

    def warnings(self, source: str, sample_rate: int) -> list[str]:
        """Too short to say much, or digital silence (every sample the same)."""
        out = []
        seconds = self.samples / sample_rate
        if seconds < audio.MIN_RELIABLE_SECONDS:
            out.append(
                f"{source}: only {seconds:.3f} s of audio (under {audio.MIN_RELIABLE_SECONDS} s): "
                "its predictions say little"
            )
        if self.samples and self.low == self.high:
            out.append(
                f"{source}: silent: every sample the same (digital silence): its predictions "
                "say nothing"
            )
        return out


def _file_rate(path: str, regular: bool) -> int | None:
    """The sample rate a regular audio file declares (None: not a regular file, or unreadable:
    the stream says why when it opens it)."""
    import soundfile as sf

    if not regular:
        return None
    try:
        return int(sf.info(path).samplerate)
    except Exception:  # libsndfile's errors: file_blocks reports them
        return None


SPEAKER_STREAM_WARNING = (
    "the model was trained with per-speaker normalisation (a speaker's utterances together); "
    "a stream is normalised by its own statistics so far, so its predictions can be far from "
    "the experiment's (a run on EmoDB called every recording 'happy' this way). For streams, "
    "train with --config.data.normalization=utterance or global"
)


@contextlib.contextmanager
def _naming(source: str):
    """Names the input in an error of the front end that does not name it yet."""
    try:
        yield
    except DeployError as e:
        if str(e).startswith(f"{source}: "):
            raise
        raise DeployError(f"{source}: {e}") from None


def _warn_about_input(args, source: str, rate: int, in_rate: int | None) -> None:
    """The warnings file mode gives about the input, said before the first row: a band-limited
    recording, a file cut short (a stream cannot wait for its end to say it). ``in_rate``:
    stdin's ``--rate`` (None: a file, whose header gives its rate)."""
    # Only a regular file: reading a pipe's header here (/dev/stdin, <(...)) would take bytes
    # that the stream then misses.
    regular = args.stream != "-" and os.path.isfile(args.stream)
    cut = file_damage.damage_note(args.stream) if regular else None
    source_rate = in_rate if in_rate is not None else _file_rate(args.stream, regular)
    low = band_limit_warning(source, source_rate, rate) if source_rate else None
    if low:
        print(f"eval.py: warning: {low}", file=sys.stderr)
    if cut:
        print(f"eval.py: warning: {source}: {cut}: predicted from what is there", file=sys.stderr)


def stream_cli(args) -> int:
    """``eval.py predict --model DIR --stream PATH|-``: one line per evaluation hop; returns the
    exit status. ``args`` is eval.py's parsed predict namespace (model, stream, rate, channels,
    smooth, jsonl, threads, files, group, groups)."""
    try:
        model = OnnxClassifier(args.model, threads=args.threads)
        if args.files or args.group or args.groups:
            raise DeployError("--stream takes one input (FILE or -), not extra files")
        rate = model.features.sample_rate
        late_warnings: list[str] = []  # known once the stream has ended
        if args.stream == "-":
            in_rate = rate if args.rate is None else args.rate
            blocks = pcm_blocks(
                sys.stdin.buffer,
                rate=in_rate,
                channels=1 if args.channels is None else args.channels,
                sample_rate=rate,
            )
        else:
            blocks = file_blocks(args.stream, sample_rate=rate, warn=late_warnings.append)
        names = model.label_names
        source = "<stdin>" if args.stream == "-" else os.fspath(args.stream)
        # The input is looked at (its rate, its first samples) before any warning about it: a
        # stream refused at once gets its error alone, not warnings that the error contradicts.
        first = []
        with _naming(source):
            # up to the first samples (a resampler's first blocks can be empty)
            for block in blocks:
                first.append(block)
                if block.size:
                    break
        if any(block.size for block in first):
            _warn_about_input(args, source, rate, in_rate if args.stream == "-" else None)
            if model.normalization.get("trained_with") == "speaker":
                print(f"eval.py: warning: {SPEAKER_STREAM_WARNING}", file=sys.stderr)
        watch = _StreamWatch(itertools.chain(first, blocks))
        with _naming(source):
            smooth = 1.0 if args.smooth is None else args.smooth
            for i, row in enumerate(stream_rows(model, watch, smoothing_seconds=smooth)):
                if i == 0 and not args.jsonl:  # only once there is a row: an input refused
                    print(format_stream_header(names), flush=True)  # at once prints nothing
                print(json.dumps(row) if args.jsonl else format_stream_row(row, names), flush=True)
        for warning in late_warnings + watch.warnings(source, rate):
            print(f"eval.py: warning: {warning}", file=sys.stderr)
    except (DeployError, audio.AudioError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # e.g. piped into `head`
            sys.stderr.close()
            return 0
        print(f"eval.py: error: {cli_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the usual way to end a live stream
        return 130
    return 0
