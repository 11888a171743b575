"""Prediction on audio files with a trained run (``python eval.py predict --workdir RUN``).

The files go through exactly the prep pipeline of the run (``audio``: resample to its rate, mix
down, zero-pad a file shorter than one window, whole-file features, 2-s windows at the eval
hop), the run's own feature normalisation, and ``eval_lib.predict_logits``; a file's
probabilities are the softmax of its mean window logits (the mean whose argmax ``evaluate_run``
scores).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dkd_jax import audio, file_damage, jsonio

__all__ = [
    "file_entry",
    "file_segments",
    "format_predictions",
    "predict_files",
    "report_predictions",
    "softmax",
]


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def file_segments(path: str | os.PathLike, feature_config) -> dict[str, Any]:
    """Features of one audio file cut into eval-layout windows, exactly as data_prep does.

    ``audio.segment_audio``, the sequence data_prep runs too: the waveform is loaded (any rate,
    channels, sample format; resampled and mixed down), zero-padded to one window when shorter,
    turned into whole-file features and cut into windows with the eval hop. A file shorter than
    one window gives one (padded) window even when the run's prep dropped short utterances.

    Args:
        path: an audio file.
        feature_config: the run's ``audio.FeatureConfig``.

    Returns:
        {"segments" [K, F, T] float32, "valid_frames" [K] int32, "starts_s" [K] float,
        "duration_s" float, "padded" bool, "constant" bool (every sample equal), "source_rate"
        (the file's) and "sample_rate" (the model's) int, "source_frames" int (decoded at the
        file's rate), "clipped_samples" int and "peak" float (a float file beyond full scale,
        clipped to [-1, 1])}.

    Raises:
        audio.AudioError: unreadable or empty file.
    """
    fc = feature_config
    seg = audio.segment_audio(path, fc, hop_seconds=fc.eval_hop_seconds, short_utterances="pad")
    (windows,) = seg.layouts
    return {
        "segments": windows.features,
        "valid_frames": windows.valid_frames,
        "starts_s": windows.starts_s.tolist(),
        "duration_s": seg.duration_s,
        "padded": seg.padded,
        "constant": seg.constant,
        "source_rate": seg.source_rate,
        "sample_rate": int(fc.sample_rate),
        "source_frames": seg.source_frames,
        "clipped_samples": seg.clipped_samples,
        "peak": seg.peak,
    }


def band_limit_warning(source: str, source_rate: int, sample_rate: int) -> str | None:
    """The warning for audio recorded at a lower rate than the model's (telephone audio at 8
    kHz for a 16-kHz model): resampling cannot restore what lies above half its rate, so those
    bands reach the model empty, unlike anything it was trained on."""
    if source_rate >= sample_rate:
        return None
    return (
        f"{source}: recorded at {source_rate} Hz: nothing above {source_rate // 2} Hz reaches "
        f"the model (trained on {sample_rate}-Hz audio), so its prediction may suffer"
    )


def input_warnings(path: str, seg: dict[str, Any]) -> list[str]:
    """Warnings about one file's audio (:func:`file_segments`' output) that no model can fix:
    too short to say much, a float file beyond full scale (clipped), a file cut short or
    damaged (``file_damage.damage_note``), digital
    silence (every real frame the same, in every band) or a constant level (every sample the
    same), or recorded at a lower rate than the model's."""
    out = []
    if seg["duration_s"] < audio.MIN_RELIABLE_SECONDS:
        out.append(
            f"{path}: only {seg['duration_s']:.3f} s of audio (under "
            f"{audio.MIN_RELIABLE_SECONDS} s): its prediction says little"
        )
    if seg.get("clipped_samples"):
        out.append(
            f"{path}: {seg['clipped_samples']} samples beyond full scale (peak {seg['peak']:g}) "
            "were clipped to ±1: predicted from the distorted audio (scale the file down)"
        )
    cut = file_damage.damage_note(path, decoded_frames=seg.get("source_frames"))
    if cut:
        out.append(f"{path}: {cut}: predicted from what is there")
    if audio.is_digital_silence(seg["segments"], seg["valid_frames"]):
        out.append(f"{path}: {audio.silent_reason(path)}: its prediction says nothing")
    elif seg.get("constant"):  # a DC level: the padded edges differ, nothing else does
        out.append(
            f"{path}: silent: every sample the same (a constant level): its prediction says nothing"
        )
    low = band_limit_warning(path, seg.get("source_rate", 0), seg.get("sample_rate", 0))
    if low:
        out.append(low)
    return out


def unique_inputs(
    paths: Sequence[str | os.PathLike], groups: Sequence[str | None] | None
) -> tuple[list[str], list[str | None], list[str], str | None]:
    """The files to score once each, their groups, warnings, and an error (or None).

    A file listed twice (the same file under two spellings too) is scored once: a repeat
    printed twice says nothing new, and in a speaker group it would count twice in the group's
    statistics, moving every other file's numbers. The same file in two speaker groups is an
    error: it cannot be normalised as both speakers.
    """
    groups = list(groups) if groups is not None else [None] * len(paths)
    seen: dict[str, tuple[str, str | None]] = {}
    files, kept, repeats = [], [], []
    for path, group in zip(paths, groups, strict=True):
        path = os.fspath(path)
        key = os.path.realpath(path)
        if key in seen:
            first, first_group = seen[key]
            if first_group != group:
                error = (
                    f"{path}: listed {_where(first_group)} (as {first}) and {_where(group)}: a "
                    "file can be normalised as one speaker only"
                )
                return [], [], [], error
            repeats.append(path if path == first else f"{path} (= {first})")
            continue
        seen[key] = (path, group)
        files.append(path)
        kept.append(group)
    warnings = []
    if repeats:
        warnings.append(f"listed more than once, scored once: {', '.join(repeats)}")
    return files, kept, warnings, None


def _where(group: str | None) -> str:
    return f"in speaker group {group}" if group else "without a speaker group"


def ungrouped_warning(
    trained: str, paths: Sequence[str], groups: Sequence[str | None]
) -> str | None:
    """The warning for files of a per-speaker run that have no speaker group (each one is then
    normalised on its own, unlike any utterance of the experiment), or None. ``trained``
    starts the sentence: the run or the model that was trained per speaker."""
    alone = [p for p, g in zip(paths, groups, strict=True) if not g]
    if not alone:
        return None
    how = (
        "Name the files of one speaker with --group SPEAKER FILE ... (or --groups CSV with "
        "path,speaker) to normalise them together, as the run did"
    )
    if len(alone) == len(paths):
        return (
            f"{trained} with per-speaker normalisation, but no file has a speaker group: each "
            f"file is normalised on its own. {how}"
        )
    shown = ", ".join(alone[:5]) + (f" and {len(alone) - 5} more" if len(alone) > 5 else "")
    return (
        f"{trained} with per-speaker normalisation, but {len(alone)} of {len(paths)} files have "
        f"no speaker group ({shown}): each of them is normalised on its own. {how}"
    )


def predict_files(
    workdir: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    *,
    step: int | None = None,
    best: bool = False,
    batch_size: int | None = None,
    segments: bool = False,
    groups: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Emotion probabilities for audio files with a trained run.

    Uses the run's own feature config (from its ``split.json`` data info) and its feature
    normalisation (``normalization.json``): "global" applies the training statistics;
    "utterance" normalises each file by its own statistics; "speaker" normalises the files of
    one *group* (one speaker, ``groups``) by the group's statistics, as the run normalised each
    speaker's utterances, and a file without a group by its own. Always the group's own files:
    the statistics the run stored for its training speakers are not used, even for a group of
    the same name (an export does not carry them, and a short name like EmoDB's "03" can match
    by accident). The file probability is ``softmax`` of the mean segment logits (the same mean
    whose argmax ``evaluate_run`` scores).

    Args:
        workdir: a training workdir.
        paths: audio files (any sample rate, channel count, sample format, length).
        step, best: which checkpoint (default the latest).
        batch_size: segments per compiled batch (default ``config.data.eval_batch_size``).
        segments: also return per-window probabilities (2-s windows, eval hop).
        groups: one group name (the speaker) per file, or None for a file of its own.

    Returns:
        {"label_names": [...], "normalization": mode, "files": [{"path", "group",
        "duration_s", "num_segments", "padded", "probabilities" {name: p}, "prediction",
        optional "segments": [{"start_s", "end_s", "probabilities", "prediction"}]}],
        "errors": [{"path", "error"}], "warnings": [str]}; unreadable files go to "errors" and
        the others are still scored.

    Raises:
        EvalError: the run cannot be restored or lacks its feature config; ``groups`` does not
            give one entry per file.
    """
    from dkd_jax import eval_lib, input_pipeline

    workdir = Path(workdir)
    if groups is not None and len(groups) != len(paths):
        raise eval_lib.EvalError(f"{len(groups)} group names for {len(paths)} files")
    run = eval_lib.restore(workdir, step=step, best=best)
    fc = _feature_config(run, workdir)
    label_names = list(run.data_info.get("label_names") or ["neutral", "happy", "sad", "angry"])
    mode = run.normalization.get("mode", "none")
    out: dict[str, Any] = {
        "label_names": label_names,
        "normalization": mode,
        "files": [],
        "errors": [],
        "warnings": [],
    }
    paths, groups, repeat_warnings, error = unique_inputs(paths, groups)
    if error:
        raise eval_lib.EvalError(error)
    out["warnings"] += repeat_warnings
    if mode == "speaker" and (alone := ungrouped_warning(f"{workdir} was trained", paths, groups)):
        out["warnings"].append(alone)
    done = []
    for path, group in zip(paths, groups, strict=True):
        try:
            seg = file_segments(path, fc)
        except audio.AudioError as e:
            out["errors"].append({"path": path, "error": str(e)})
            continue
        done.append((path, group, seg))
        out["warnings"] += input_warnings(path, seg)
    if not done:
        return out
    arrays, owner = _segment_arrays(done)
    rule = {**run.normalization, "groups": {}} if mode == "speaker" else run.normalization
    arrays = input_pipeline.normalize_arrays(arrays, rule)
    bs = int(batch_size or run.config.data.eval_batch_size)
    logits = np.asarray(
        eval_lib.predict_logits(run.model, run.variables, arrays.features, batch_size=bs)
    )
    for k, (path, group, seg) in enumerate(done):
        entry = file_entry(
            path, seg, logits[owner == k], label_names, fc.window_seconds, segments=segments
        )
        entry["group"] = group
        out["files"].append(entry)
    return out


def _feature_config(run, workdir: Path) -> audio.FeatureConfig:
    from dkd_jax import eval_lib, records

    fc_dict = run.data_info.get("feature_config")
    if not fc_dict:
        try:
            fc_dict = records.load_metadata(run.config.data.prep_dir)["feature_config"]
        except records.DataError:
            raise eval_lib.EvalError(
                f"{workdir}: the run records no feature config and its prep dir "
                f"{run.config.data.prep_dir!r} is unavailable"
            ) from None
    return audio.FeatureConfig.from_dict(fc_dict)


def _segment_arrays(done: list) -> tuple[Any, np.ndarray]:
    """All files' windows as one SegmentArrays (utterance = file, speaker = its group or the
    file itself), and the file index of each window."""
    from dkd_jax import records

    counts = [seg["segments"].shape[0] for _, _, seg in done]
    owner = np.repeat(np.arange(len(done)), counts)
    ids = np.array([f"file{k}" for k in range(len(done))], dtype=str)
    # A file without a group is a speaker of its own (a name no training speaker can have).
    speakers = np.array(
        [g if g else f"<ungrouped file {k}>" for k, (_, g, _) in enumerate(done)], dtype=str
    )
    arrays = records.SegmentArrays(
        features=np.concatenate([seg["segments"] for _, _, seg in done]),
        labels=np.zeros(len(owner), np.int32),
        utterance_ids=ids[owner],
        segment_index=np.concatenate([np.arange(c, dtype=np.int32) for c in counts]),
        valid_frames=np.concatenate([seg["valid_frames"] for _, _, seg in done]).astype(np.int32),
        speakers=speakers[owner],
        sessions=np.full(len(owner), "", dtype=str),
        genders=np.full(len(owner), "", dtype=str),
    )
    return arrays, owner


def file_entry(
    path: str,
    seg: dict[str, Any],
    logits: np.ndarray,
    label_names: Sequence[str],
    window_seconds: float,
    *,
    segments: bool,
) -> dict[str, Any]:
    """One file's row of a prediction: the softmax of its mean window logits [K, C] (and, with
    ``segments``, one row per window). Shared by the JAX and the ONNX (``deploy``) paths."""
    probs = softmax(logits.mean(axis=0))
    entry: dict[str, Any] = {
        "path": path,
        "duration_s": round(seg["duration_s"], 3),
        "num_segments": int(logits.shape[0]),
        "padded": seg["padded"],
        "probabilities": {n: float(p) for n, p in zip(label_names, probs, strict=True)},
        "prediction": label_names[int(np.argmax(probs))],
    }
    if segments:
        window = window_seconds
        entry["segments"] = [
            {
                "start_s": round(start, 3),
                "end_s": round(min(start + window, max(seg["duration_s"], window)), 3),
                "probabilities": {n: float(p) for n, p in zip(label_names, row, strict=True)},
                "prediction": label_names[int(np.argmax(row))],
            }
            for start, row in zip(seg["starts_s"], softmax(logits), strict=True)
        ]
    return entry


def report_predictions(pred: dict[str, Any], *, json_out: str | None = None) -> int:
    """Prints a prediction (warnings and errors as ``eval.py:`` lines on stderr, the table on
    stdout), writes ``json_out`` if given; returns the exit status (2 when a file failed)."""
    for warning in pred["warnings"]:
        print(f"eval.py: warning: {warning}", file=sys.stderr)
    if pred["files"]:
        try:
            print(format_predictions(pred), flush=True)
        except BrokenPipeError:  # e.g. piped into `head`: the reader has what it wanted, but
            # --json and the errors still follow (stdout now goes nowhere)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    status = 2 if pred["errors"] else 0
    if json_out:
        try:
            jsonio.write_json(json_out, pred)
        except OSError as e:
            print(f"eval.py: error: {jsonio.describe_os_error(e)}", file=sys.stderr)
            status = 2
    for err in pred["errors"]:
        print(f"eval.py: error: {err['error']}", file=sys.stderr)
    return status


def format_predictions(pred: dict[str, Any]) -> str:
    """Plain-text table of ``predict_files`` output (one row per file, indented segment rows;
    a speaker-group column when any file has one)."""
    names = pred["label_names"]
    width = max([4, *(len(f["path"]) for f in pred["files"])])
    width = min(width, 60)
    grouped = any(f.get("group") for f in pred["files"])
    gw = max([5, *(len(f.get("group") or "") for f in pred["files"])]) if grouped else 0
    cols = " ".join(f"{n:>8}" for n in names)
    group_head = f"{'group':<{gw}}  " if grouped else ""
    lines = [f"{'file':<{width}}  {group_head}{'seconds':>7}  {'windows':>7}  {cols}  prediction"]
    for f in pred["files"]:
        shown = f["path"] if len(f["path"]) <= width else "…" + f["path"][-(width - 1) :]
        probs = " ".join(f"{f['probabilities'][n]:>8.3f}" for n in names)
        note = "  (shorter than one window: padded)" if f["padded"] else ""
        group = f"{f.get('group') or '-':<{gw}}  " if grouped else ""
        lines.append(
            f"{shown:<{width}}  {group}{f['duration_s']:>7.2f}  {f['num_segments']:>7d}  {probs}  "
            f"{f['prediction']}{note}"
        )
        for s in f.get("segments", []):
            span = f"  {s['start_s']:6.2f}-{s['end_s']:.2f} s"
            probs = " ".join(f"{s['probabilities'][n]:>8.3f}" for n in names)
            pad = " " * (gw + 2) if grouped else ""
            lines.append(f"{span:<{width}}  {pad}{'':>7}  {'':>7}  {probs}  {s['prediction']}")
    return "\n".join(lines)
