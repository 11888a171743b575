"""The feature workers of a prep run: one utterance → framed records, and the process pool.

:func:`process_utterance` turns one :class:`~data_prep.sources.Utterance` into the framed
TFRecords of both segment layouts (via :func:`dkd_jax.audio.segment_audio`, the one audio →
segments path). :class:`FeaturePool` runs it over a list of utterances and yields the results
in input order, with a bounded look-ahead (about four chunks per worker in flight, so memory
does not grow with the corpus).

Worker lifetime: a worker must never outlive the prep run. Each worker asks the kernel to send
it SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)`` on Linux) and also runs a watchdog
thread that exits once its parent process is gone (every platform), so a SIGKILLed prep leaves
no worker. When the run stops early (an error, Ctrl-C, or SIGTERM, which
:func:`stop_on_signals` turns into :class:`Terminated`), the pool cancels the queued chunks and
sets a stop event that every worker checks between utterances, then waits for them: each ends
after at most the utterance it is on. (Killing a worker instead can cut a result message in
half and hang the executor's reader thread.) The finished shards stay on disk and the same
command resumes the run.

Start-up cost: with the ``fork`` start method the parent imports and warms up everything a
worker needs first (:func:`warm_up`), so a worker costs a fork; with ``spawn`` (after JAX or
TensorFlow started threads in this process) each worker imports NumPy, SciPy's sparse module,
soundfile and soxr, about a second. The feature code does not import librosa.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from data_prep.sources import Utterance
from dkd_jax import audio, file_damage, records

CHUNK = 4  # utterances per pool task
_LOOKAHEAD_PER_WORKER = 4  # chunks in flight per worker
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_WATCHDOG_PERIOD_S = 0.5


class Terminated(KeyboardInterrupt):
    """The prep run received SIGTERM; it stops like Ctrl-C (finished shards kept, resumable).

    Attributes:
      signum: the signal number (``signal.SIGTERM``).
    """

    def __init__(self, signum: int):
        super().__init__(f"received signal {signum}")
        self.signum = signum


_received: list[int] = []  # signals seen by the stop_on_signals handler
_deferring = [False]


def _stop_exception(signum: int) -> KeyboardInterrupt:
    return Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame):
    first = not _received
    _received.append(signum)
    # A second one gets the usual behaviour: SIGTERM ends the process at once (the workers
    # follow their parent), Ctrl-C raises KeyboardInterrupt wherever the cleanup is.
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    else:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if first and not _deferring[0]:
        raise _stop_exception(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM raises :class:`Terminated` and Ctrl-C KeyboardInterrupt.

    The first signal raises in the main thread, except inside :func:`_deferred` sections (the
    pool's start, where a raise could land inside the executor's or ``os.fork``'s internals,
    which swallow or half-finish); there it is raised when the section ends. A raise that Python
    swallows anyway is caught up with by :func:`raise_if_terminated`, which the run calls after
    every utterance. Outside the main thread this does nothing (Python delivers signals only
    there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()


@contextlib.contextmanager
def _deferred():
    """Holds back the exception of a stop signal until the block ends."""
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = False
    raise_if_terminated()


def raise_if_terminated() -> None:
    """Raises the stop exception of a signal that arrived inside :func:`stop_on_signals`."""
    if _received:
        raise _stop_exception(_received[0])


# --------------------------------------------------------------------------------------------
# One utterance
# --------------------------------------------------------------------------------------------

_state: dict = {}


def init_worker(
    cfg_dict: dict,
    corpus: str,
    max_segments: int | None = None,
    parent_pid: int | None = None,
    stop=None,
) -> None:
    """Sets up a feature process (``parent_pid`` given: a pool worker of that process).

    ``stop`` (a multiprocessing Event): when set, the worker's chunks end early.
    """
    if parent_pid is not None:
        # SIGTERM ends a worker at once (a forked worker inherits the parent's handler, which
        # would raise instead). Ctrl-C reaches the whole process group: the main process handles
        # it (stops the pool, keeps finished shards); workers leave it to their parent.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _follow_parent(parent_pid)
    _state["cfg"] = audio.FeatureConfig.from_dict(cfg_dict)
    _state["corpus"] = corpus
    _state["max_segments"] = max_segments
    _state["stop"] = stop


def _follow_parent(parent_pid: int) -> None:
    """Exit when ``parent_pid`` dies: PR_SET_PDEATHSIG (Linux) plus a watchdog thread."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(_WATCHDOG_PERIOD_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def warm_up(cfg: audio.FeatureConfig) -> None:
    """Imports and caches what a worker needs (forked workers then inherit it)."""
    import soundfile  # noqa: F401
    import soxr  # noqa: F401

    audio.compute_features(np.zeros(cfg.window_samples, np.float32), cfg)
    records.frame_record(b"")


def spread(count: int, keep: int) -> np.ndarray:
    """``keep`` of ``count`` window indices, spread evenly from the first to the last.

    Returns:
      [min(count, keep)] int64, strictly increasing; ``round(i * (count - 1) / (keep - 1))``.
    """
    if count <= keep:
        return np.arange(count)
    if keep == 1:
        return np.zeros(1, np.int64)
    return np.round(np.arange(keep) * ((count - 1) / (keep - 1))).astype(np.int64)


def _layout_blob(seg: audio.Segments, utt: Utterance, corpus: str, keep: np.ndarray) -> bytes:
    parts = []
    for k in keep:
        payload = records.encode_segment(
            seg.features[k],
            label=utt.label,
            utterance_id=utt.utterance_id,
            segment_index=int(k),
            valid_frames=int(seg.valid_frames[k]),
            speaker=utt.speaker,
            session=utt.session,
            gender=utt.gender,
            corpus=corpus,
        )
        parts.append(records.frame_record(payload))
    return b"".join(parts)


def process_utterance(utt: Utterance) -> tuple:
    """Features + framed records of one utterance (runs in a worker, after :func:`init_worker`).

    The "train" layout keeps at most ``max_segments`` windows, spread over the utterance
    (:func:`spread`; records keep each window's own segment_index); "eval" keeps them all.

    Returns:
      ("ok", row dict, train bytes, n_train, eval bytes, n_eval) or ("skip", kind, reason);
      digital silence is skipped ("silent").
    """
    cfg: audio.FeatureConfig = _state["cfg"]
    corpus: str = _state["corpus"]
    cap = _state.get("max_segments")
    try:
        segs = audio.segment_audio(
            utt.path, cfg, hop_seconds=(cfg.train_hop_seconds, cfg.eval_hop_seconds)
        )
    except audio.AudioError as e:
        if e.kind == audio.NO_ACCESS:  # permissions changed during the run: not a bad file
            raise
        return ("skip", e.kind, e.reason)
    if segs.dropped:
        return (
            "skip",
            "short_dropped",
            f"shorter than one window ({segs.duration_s:.3f} s < {cfg.window_seconds} s), "
            "dropped (short_utterances='drop')",
        )
    train, evals = segs.layouts
    if audio.is_digital_silence(evals.features, evals.valid_frames):
        return ("skip", "silent", audio.silent_reason(utt.path))
    keep_train = spread(len(train), cap) if cap else np.arange(len(train))
    row = {
        "utterance_id": utt.utterance_id,
        "label": utt.label,
        "label_name": utt.label_name,
        "source_label": utt.source_label,
        "speaker": utt.speaker,
        "session": utt.session,
        "gender": utt.gender,
        "dialog": utt.dialog,
        "duration_s": round(segs.duration_s, 6),
        "num_train_segments": len(keep_train),
        "num_eval_segments": len(evals),
        "padded": bool(segs.padded),
        "path": utt.rel_path,
    }
    if len(keep_train) < len(train):
        row["train_segments_before_cap"] = len(train)
    if segs.source_rate < cfg.sample_rate:  # upsampled: its upper bands are empty
        row["source_rate"] = segs.source_rate
    if segs.clipped_samples:  # a float file louder than full scale: its features hold it
        row["clipped"] = {"samples": segs.clipped_samples, "peak": round(segs.peak, 4)}
    cut = file_damage.damage_note(utt.path, decoded_frames=segs.source_frames)
    if cut:  # kept with what it holds, and said (libsndfile reads the rest without a word)
        row["warning"] = cut
    blobs = (
        _layout_blob(train, utt, corpus, keep_train),
        _layout_blob(evals, utt, corpus, np.arange(len(evals))),
    )
    return ("ok", row, blobs[0], len(keep_train), blobs[1], len(evals))


def _process_chunk(chunk: list[Utterance]) -> list[tuple]:
    """Results of a chunk; shorter when the pool's stop event is set (the run is aborting)."""
    stop = _state.get("stop")
    out = []
    for u in chunk:
        if stop is not None and stop.is_set():
            break
        out.append(process_utterance(u))
    return out


# --------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------


def mp_context() -> multiprocessing.context.BaseContext:
    """fork when safe: cheapest (workers inherit the warmed-up parent, no main-module guard
    needed), but unsafe once JAX, TensorFlow or torch started thread pools here; else spawn."""
    methods = multiprocessing.get_all_start_methods()
    threaded = any(m in sys.modules for m in ("jax", "tensorflow", "torch"))
    if "fork" in methods and not threaded:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(num_utterances: int, requested: int | None = None) -> int:
    """Feature processes: ``requested`` or the usable CPUs, at most one per chunk of work."""
    if requested is None:
        requested = usable_cpus()
    chunks = max(1, -(-int(num_utterances) // CHUNK))
    return max(1, min(int(requested), chunks))


class FeaturePool:
    """Runs :func:`process_utterance` over utterances, in order; a context manager.

    Args:
      cfg: feature configuration.
      corpus: corpus name written into every record.
      workers: processes (1 = in this process, no pool).
      max_segments: cap on "train" windows per utterance (None = no cap).

    Entering starts the workers (before the caller opens any output file, so forked workers
    hold none); leaving waits for them, or, when leaving on an exception, cancels the queued
    chunks and sets the stop event first, so each worker ends after its current utterance.
    """

    def __init__(
        self, cfg: audio.FeatureConfig, corpus: str, workers: int, max_segments: int | None
    ):
        self._init = (cfg.to_dict(), corpus, max_segments)
        self._cfg = cfg
        self.workers = max(1, int(workers))
        self._executor: cf.ProcessPoolExecutor | None = None
        self._stop = None

    def __enter__(self) -> FeaturePool:
        if self.workers <= 1:
            init_worker(*self._init)
            return self
        context = mp_context()
        fork = context.get_start_method() == "fork"
        if fork:
            warm_up(self._cfg)
        self._stop = context.Event()
        # A stop signal waits until the pool is up: raised inside the executor's start-up (or
        # os.fork's hooks) it would leave workers nobody shuts down.
        try:
            with _deferred():
                self._executor = cf.ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=context,
                    initializer=init_worker,
                    initargs=(*self._init, os.getpid(), self._stop),
                )
                self._executor.submit(os.getpid)  # starts every (forked) worker now
        except BaseException:  # e.g. the SIGTERM that waited: stop what started
            self.__exit__(*sys.exc_info())
            raise
        return self

    def results(self, utterances: Sequence[Utterance]) -> Iterator[tuple]:
        """Results of ``utterances`` in order (submits the first chunks before returning)."""
        if self._executor is None:
            return (process_utterance(u) for u in utterances)
        chunks = [list(utterances[i : i + CHUNK]) for i in range(0, len(utterances), CHUNK)]
        return _Ordered(self._executor, chunks, _LOOKAHEAD_PER_WORKER * self.workers)

    def __exit__(self, exc_type, exc, tb) -> None:
        ex, self._executor = self._executor, None
        if ex is None:
            return
        if exc_type is not None:
            self._stop.set()
        ex.shutdown(wait=True, cancel_futures=exc_type is not None)


class _Ordered:
    """Iterator over chunk results in submission order with a bounded number in flight."""

    def __init__(self, executor: cf.ProcessPoolExecutor, chunks: list, in_flight: int):
        self._executor = executor
        self._chunks = iter(chunks)
        self._pending: collections.deque = collections.deque()
        self._ready: collections.deque = collections.deque()
        for chunk in self._chunks:
            self._pending.append((executor.submit(_process_chunk, chunk), len(chunk)))
            if len(self._pending) >= in_flight:
                break

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        while not self._ready:
            if not self._pending:
                raise StopIteration
            future, size = self._pending.popleft()
            nxt = next(self._chunks, None)
            if nxt is not None:
                self._pending.append((self._executor.submit(_process_chunk, nxt), len(nxt)))
            results = future.result()
            if len(results) != size:  # only when the stop event was set
                raise RuntimeError("feature pool stopped before the chunk was done")
            self._ready.extend(results)
        return self._ready.popleft()


__all__ = [
    "CHUNK",
    "FeaturePool",
    "Terminated",
    "default_workers",
    "init_worker",
    "mp_context",
    "process_utterance",
    "raise_if_terminated",
    "spread",
    "stop_on_signals",
    "usable_cpus",
    "warm_up",
]
