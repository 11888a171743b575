"""Evaluation: utterance-level scoring of a run, reports, plots, provenance and prediction.

Owns everything between a trained checkpoint and a number in a table:

* ``score_segments`` groups segment logits by utterance (``metrics.aggregate_utterances``: mean
  of the segment logits, DESIGN.md §3, paper_spec.md §1.3) and returns utterance-level labels
  and predictions;
* ``classification_report`` turns labels + predictions into WA, UA, per-class
  recall/precision/F1, the confusion matrix and counts (all from one confusion matrix, via
  ``dkd_jax.metrics``); ``format_report`` prints it; ``plot_confusion`` draws counts and
  row-normalised rates;
* ``provenance`` records package versions, the device kind, the git commit and the Python
  version, so a number can be traced to what produced it;
* ``evaluate_run`` scores a run's checkpoint on its held-out utterances (``split.json`` in the
  workdir, eval-layout segments) and writes ``results.json`` + ``confusion.png``;
* ``predict_files`` gives emotion probabilities for audio files of any format, with the run's
  own feature config and normalisation.

Numbers never come from here: ``metrics`` computes them, ``train_lib.predict_logits`` produces
the logits (one compiled function, last batch padded and masked).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dkd_jax import metrics

RESULTS_FILE = "results.json"
CONFUSION_FILE = "confusion.png"
SCORES_FILE = "utterance_scores.csv"
SPLIT_FILE = "split.json"

# Distributions whose versions go into results.json (missing ones are recorded as None).
_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "librosa",
    "soundfile",
    "tensorflow-datasets",
    "matplotlib",
)


class EvalError(ValueError):
    """A run or a data directory that cannot be evaluated (the message names which and why)."""


# --------------------------------------------------------------------------------------------
# Segment -> utterance scoring
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UtteranceScores:
    """Utterance-level outputs of a model on a set of segments.

    Attributes:
        utterance_ids: [U] str, in order of first appearance among the segments.
        labels: [U] int, the utterance labels.
        scores: [U, C] float, the per-utterance mean of the segment logits (``mode="logits"``)
            or of the segment probabilities (``mode="probs"``).
        predictions: [U] int, argmax of ``scores``.
        num_segments: [U] int, segments per utterance.
    """

    utterance_ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    predictions: np.ndarray
    num_segments: np.ndarray


def index_utterances(utterance_ids: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps each segment's utterance id to a dense utterance index.

    Args:
        utterance_ids: [N] str, the utterance id of each segment.

    Returns:
        (segment_utterance_index [N] int32, unique_ids [U] str) with utterances numbered in order
        of first appearance, so ``unique_ids[segment_utterance_index] == utterance_ids``.
    """
    ids = np.asarray(utterance_ids).astype(str)
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # dense index by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)].astype(np.int32), unique[order]


def score_segments(
    segment_logits: np.ndarray,
    segment_labels: np.ndarray,
    utterance_ids: Sequence[str] | np.ndarray,
    *,
    mode: str = "logits",
) -> UtteranceScores:
    """Aggregates segment logits into utterance predictions (mean over each utterance's segments).

    Args:
        segment_logits: [N, C] float, model logits per segment.
        segment_labels: [N] int, the label of each segment (its utterance's label).
        utterance_ids: [N] str, the utterance each segment belongs to.
        mode: "logits" (mean of logits, the PyTorch lineage) or "probs" (mean of softmax).

    Returns:
        UtteranceScores over the U distinct utterances.

    Raises:
        EvalError: if the shapes disagree, there are no segments, or one utterance's segments
            carry different labels.
    """
    logits = np.asarray(segment_logits, dtype=np.float32)
    labels = np.asarray(segment_labels).astype(np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) != len(utterance_ids):
        raise EvalError(
            f"segment arrays disagree: logits {logits.shape}, labels {labels.shape}, "
            f"utterance ids {len(utterance_ids)}"
        )
    if len(labels) == 0:
        raise EvalError("no segments to score")
    seg_utt, unique_ids = index_utterances(utterance_ids)
    num_utts = len(unique_ids)
    utt_labels = np.full(num_utts, -1, dtype=np.int64)
    utt_labels[seg_utt] = labels
    conflicting = np.flatnonzero(utt_labels[seg_utt] != labels)
    if conflicting.size:
        bad = unique_ids[seg_utt[conflicting[0]]]
        raise EvalError(f"utterance {bad!r} has segments with different labels")
    scores = np.asarray(
        metrics.aggregate_utterances(logits, seg_utt, num_utts, mode=mode), dtype=np.float32
    )
    return UtteranceScores(
        utterance_ids=unique_ids,
        labels=utt_labels,
        scores=scores,
        predictions=np.argmax(scores, axis=-1),
        num_segments=np.bincount(seg_utt, minlength=num_utts),
    )


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def report_from_confusion(cm: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
    """Builds the metrics report (WA, UA, per-class scores, counts) from one confusion matrix.

    Args:
        cm: [C, C] int, rows = true class, columns = predicted class.
        label_names: C class names.

    Returns:
        A JSON-ready dict: ``wa``, ``ua`` (fractions in [0, 1]), ``per_class`` (name -> recall,
        precision, f1, support, predicted; a score that is undefined, e.g. the recall of a class
        absent from the labels, is None), ``confusion_matrix`` ([C][C] ints), ``label_names``,
        ``num_utterances``, ``absent_classes`` (names with zero support; UA averages over the
        others, as ``metrics.unweighted_accuracy`` does).
    """
    cm = np.asarray(cm, dtype=np.int64)
    names = list(label_names)
    if cm.shape != (len(names), len(names)):
        raise EvalError(f"confusion matrix {cm.shape} does not match {len(names)} class names")
    scores = metrics.per_class_scores(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    per_class = {}
    for c, name in enumerate(names):
        recall = scores["recall"][c] if support[c] > 0 else math.nan
        precision = scores["precision"][c] if predicted[c] > 0 else math.nan
        f1 = scores["f1"][c] if support[c] > 0 else math.nan
        per_class[name] = {
            "recall": _finite_or_none(recall),
            "precision": _finite_or_none(precision),
            "f1": _finite_or_none(f1),
            "support": int(support[c]),
            "predicted": int(predicted[c]),
        }
    return {
        "wa": float(metrics.weighted_accuracy(cm)),
        "ua": float(metrics.unweighted_accuracy(cm)),
        "label_names": names,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "num_utterances": int(cm.sum()),
        "absent_classes": [n for n, s in zip(names, support, strict=True) if s == 0],
    }


def classification_report(
    labels: np.ndarray, predictions: np.ndarray, *, label_names: Sequence[str]
) -> dict[str, Any]:
    """Report (see ``report_from_confusion``) for utterance labels and predictions.

    Args:
        labels: [U] int true classes.
        predictions: [U] int predicted classes.
        label_names: C class names (C fixes the confusion-matrix size).
    """
    cm = metrics.confusion_matrix(
        np.asarray(labels), np.asarray(predictions), num_classes=len(label_names)
    )
    return report_from_confusion(np.asarray(cm), label_names)


def _pct(x: float | None, width: int = 7) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{100 * x:>{width - 2}.1f} %"


def format_report(report: dict[str, Any], *, title: str | None = None) -> str:
    """Renders a report as a plain-text table (per-class scores, WA/UA, confusion matrix)."""
    names = report["label_names"]
    width = max(8, *(len(n) for n in names))
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'class':<{width}}  support  predicted   recall  precision       F1")
    for name in names:
        pc = report["per_class"][name]
        lines.append(
            f"{name:<{width}}  {pc['support']:>7d}  {pc['predicted']:>9d}  {_pct(pc['recall'])}"
            f"  {_pct(pc['precision'], 9)}  {_pct(pc['f1'])}"
        )
    extra = ""
    if report.get("absent_classes"):
        extra = f"; UA over present classes (absent: {', '.join(report['absent_classes'])})"
    segs = f", {report['num_segments']} segments" if "num_segments" in report else ""
    lines.append(
        f"WA {100 * report['wa']:.2f} %   UA {100 * report['ua']:.2f} %   "
        f"({report['num_utterances']} utterances{segs}{extra})"
    )
    lines.append("confusion matrix (rows = true, columns = predicted):")
    cw = max(6, *(len(n) for n in names))
    lines.append(" " * width + "  " + " ".join(f"{n:>{cw}}" for n in names))
    for name, row in zip(names, report["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)


def plot_confusion(
    cm: np.ndarray, label_names: Sequence[str], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Draws the confusion matrix: counts (left) and row-normalised rates (right) to a PNG.

    Args:
        cm: [C, C] int, rows = true class.
        label_names: C class names.
        path: output file (PNG).
        title: figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    rates = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    num = len(label_names)
    fig = Figure(figsize=(4.2 * 2 + 1.0, 4.0 + 0.1 * num))  # no pyplot: no global state
    axes = fig.subplots(1, 2)
    panels = ((cm, "counts", "d"), (rates, "row-normalised (recall)", ".2f"))
    for ax, (values, name, fmt) in zip(axes, panels, strict=True):
        vmax = max(float(values.max()), 1e-9)
        ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        for i in range(num):
            for j in range(num):
                v = values[i, j]
                ax.text(
                    j,
                    i,
                    format(v, fmt),
                    ha="center",
                    va="center",
                    color="white" if v > 0.6 * vmax else "black",
                    fontsize=9,
                )
        ax.set_xticks(range(num), labels=list(label_names), rotation=30)
        ax.set_yticks(range(num), labels=list(label_names))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


def git_commit(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The git commit of the checkout at ``path``, and whether its tree differs from it.

    ``dirty`` is True when tracked files are modified or files that are not ignored are
    untracked (the code that ran may not be the commit's).

    Returns None when ``path`` (default: this package's directory) is not in a git checkout or git
    is unavailable.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain"],  # untracked (not ignored) files count too
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {
        "commit": commit.stdout.strip(),
        "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
    }


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that determine the numbers (None if not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    from dkd_jax import __version__

    versions["dkd_jax"] = __version__
    return versions


def device_info() -> dict[str, Any]:
    """The JAX backend, device kind and device counts of this process."""
    import jax

    devices = jax.local_devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "local_device_count": len(devices),
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "host": platform.node(),
        "machine": platform.machine(),
    }


def provenance() -> dict[str, Any]:
    """Everything that identifies the software and hardware behind a result."""
    return {"packages": package_versions(), "device": device_info(), "git": git_commit()}


def to_jsonable(obj: Any) -> Any:
    """Converts numpy scalars/arrays, paths, dataclasses and non-finite floats for ``json.dump``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Scoring a run
# --------------------------------------------------------------------------------------------


def _restore(workdir: Path, *, step: int | None, best: bool):
    from dkd_jax import checkpointing

    if not workdir.is_dir():
        raise EvalError(f"{workdir}: no such run directory")
    try:
        return checkpointing.restore_run(workdir, step=step, best=best)
    except FileNotFoundError as e:
        raise EvalError(f"{workdir}: {e}") from None
    except ValueError as e:  # missing config/split/checkpoints, bad config (named by the callee)
        raise EvalError(str(e)) from None


def _check_same_data(run, metadata: dict[str, Any], data_dir: str) -> None:
    info = run.data_info
    want, have = info.get("content_hash"), metadata.get("content_hash")
    if want and have and want != have:
        raise EvalError(
            f"{data_dir}: content hash {have} differs from the data the run was trained on "
            f"({want}); pass the run's own prep dir with --data"
        )
    names = info.get("label_names")
    if names and list(names) != list(metadata.get("label_names", [])):
        raise EvalError(
            f"{data_dir}: label names {metadata.get('label_names')} differ from the run's {names}"
        )
    fc = info.get("feature_config")
    if fc and fc != metadata.get("feature_config"):
        raise EvalError(f"{data_dir}: feature config differs from the one the run was trained on")


def evaluate_run(
    workdir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    step: int | None = None,
    best: bool = False,
    batch_size: int | None = None,
    mode: str = "logits",
    write: bool = True,
    plot: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Scores a run's checkpoint on its held-out utterances.

    The test utterances are those of ``split.json`` in the workdir; their eval-layout segments
    (hop ``eval_hop_seconds``) are normalised as in training (``normalization.json``), scored by
    ``train_lib.predict_logits`` (one compiled function, last batch padded and masked), and the
    segment logits are averaged per utterance before the argmax.

    Args:
        workdir: a training workdir.
        data_dir: the prep dir (default: the one recorded in the run's config).
        step: checkpoint step (default: the latest, i.e. the last epoch).
        best: use the best-by-validation checkpoint instead.
        batch_size: segments per compiled batch (default ``config.data.eval_batch_size``).
        mode: utterance aggregation, "logits" (mean of logits) or "probs" (mean of softmax).
        write: write ``results.json``, ``utterance_scores.csv`` (per-utterance label,
            prediction and mean scores) and ``confusion.png`` (when ``plot``) into the workdir
            (on process 0 only, in a multi-process job).
        plot: draw the confusion matrix.
        verbose: print the report table.

    Returns:
        The results dict: the report (``report_from_confusion``) plus ``num_segments``, ``step``,
        ``split``, ``data`` (prep dir, content hash), ``aggregation``, ``config``,
        ``provenance`` and ``eval_seconds``.

    Raises:
        EvalError: missing run files, data that differs from the run's, no test utterances, or
            test utterances missing from the prep dir.
    """
    import time

    import jax

    from dkd_jax import config as config_lib
    from dkd_jax import input_pipeline, protocols, records, train_lib

    t0 = time.perf_counter()
    workdir = Path(workdir)
    run = _restore(workdir, step=step, best=best)
    try:
        split, _ = protocols.load_split_file(workdir / protocols.SPLIT_FILE)
    except ValueError as e:
        raise EvalError(str(e)) from None
    data_dir = os.fspath(data_dir) if data_dir is not None else run.config.data.prep_dir
    try:
        metadata = input_pipeline.load_metadata(data_dir)
    except records.DataError as e:
        raise EvalError(str(e)) from None
    _check_same_data(run, metadata, data_dir)
    if not split.test_ids:
        raise EvalError(f"{workdir}: the run's split ({split.name}) has no test utterances")
    arrays = input_pipeline.load_segments(data_dir, "eval", split.test_ids)
    missing = sorted(set(split.test_ids) - set(arrays.utterance_ids.tolist()))
    if missing:
        raise EvalError(
            f"{data_dir}: {len(missing)} test utterance(s) of {workdir} have no eval segments "
            f"(first: {missing[0]})"
        )
    arrays = input_pipeline.normalize_arrays(arrays, run.normalization)
    bs = int(batch_size or run.config.data.eval_batch_size)
    logits = train_lib.predict_logits(run.model, run.variables, arrays.features, batch_size=bs)
    scores = score_segments(logits, arrays.labels, arrays.utterance_ids, mode=mode)
    label_names = list(metadata["label_names"])
    report = classification_report(scores.labels, scores.predictions, label_names=label_names)
    results: dict[str, Any] = {
        **report,
        "num_segments": len(arrays),
        "step": int(run.step),
        "checkpoint": "best-by-validation" if best else "latest",
        "role": run.config.model.role,
        "loss": run.config.kd.loss if run.config.model.role == "student" else "ce",
        "split": {
            "name": split.name,
            "num_train_utterances": len(split.train_ids),
            "num_validation_utterances": len(split.validation_ids),
            "num_test_utterances": len(split.test_ids),
        },
        "aggregation": f"mean of segment {mode} per utterance, then argmax",
        "data": {"prep_dir": os.path.abspath(data_dir), "content_hash": metadata["content_hash"]},
        "workdir": os.path.abspath(workdir),
        "config": config_lib.to_dict(run.config),
        "provenance": provenance(),
    }
    results["eval_seconds"] = round(time.perf_counter() - t0, 3)
    if write and jax.process_index() == 0:
        write_json(workdir / RESULTS_FILE, results)
        write_utterance_scores(workdir / SCORES_FILE, scores, label_names, mode=mode)
        if plot:
            plot_confusion(
                np.asarray(report["confusion_matrix"]),
                label_names,
                workdir / CONFUSION_FILE,
                title=f"{workdir.name} ({split.name}, step {run.step}): "
                f"WA {100 * report['wa']:.1f} %, UA {100 * report['ua']:.1f} %",
            )
    if verbose:
        print(format_report(results, title=f"{workdir} — {split.name}, step {run.step}"))
    return results


def write_utterance_scores(
    path: str | os.PathLike, scores: UtteranceScores, label_names: Sequence[str], *, mode: str
) -> Path:
    """Writes one CSV row per utterance: id, true and predicted label, segments, mean scores.

    Args:
        path: output CSV file.
        scores: ``score_segments`` output.
        label_names: class names (column suffixes).
        mode: "logits" or "probs" (what the score columns hold).
    """
    import csv

    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["utterance_id", "label", "prediction", "num_segments"]
            + [f"{mode}_{n}" for n in label_names]
        )
        for i, utt in enumerate(scores.utterance_ids):
            w.writerow(
                [utt, label_names[scores.labels[i]], label_names[scores.predictions[i]]]
                + [int(scores.num_segments[i])]
                + [repr(float(v)) for v in scores.scores[i]]
            )
    return path


def read_utterance_scores(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Reads ``write_utterance_scores`` output: {utterance id: {label, prediction, num_segments,
    scores [C] float32}}."""
    import csv

    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            cols = [k for k in row if k.startswith(("logits_", "probs_"))]
            out[row["utterance_id"]] = {
                "label": row["label"],
                "prediction": row["prediction"],
                "num_segments": int(row["num_segments"]),
                "scores": np.array([float(row[k]) for k in cols], np.float32),
            }
    return out


# --------------------------------------------------------------------------------------------
# Prediction on audio files
# --------------------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def file_segments(path: str | os.PathLike, feature_config) -> dict[str, Any]:
    """Features of one audio file cut into eval-layout windows, exactly as data_prep does.

    The waveform is loaded (any rate, channels, sample format; resampled and mixed down),
    zero-padded to one window when shorter, turned into whole-file features and cut into windows
    with the eval hop. A file shorter than one window gives one (padded) window even when the
    run's prep dropped short utterances.

    Args:
        path: an audio file.
        feature_config: the run's ``audio.FeatureConfig``.

    Returns:
        {"segments" [K, F, T] float32, "valid_frames" [K] int32, "starts_s" [K] float,
        "duration_s" float, "padded" bool}.

    Raises:
        audio.AudioError: unreadable or empty file.
    """
    from dkd_jax import audio

    fc = dataclasses.replace(feature_config, short_utterances="pad")
    wave = audio.load_audio(path, sample_rate=fc.sample_rate)
    duration = wave.shape[0] / fc.sample_rate
    padded, valid = audio.pad_to_window(wave, fc)
    feats = audio.compute_features(padded, fc)
    segments, valid_frames = audio.segment_features(
        feats, fc, hop_seconds=fc.eval_hop_seconds, num_valid_frames=valid
    )
    starts = audio.segment_starts(feats.shape[1], fc, hop_seconds=fc.eval_hop_seconds)
    return {
        "segments": segments,
        "valid_frames": valid_frames,
        "starts_s": (starts * fc.hop_length / fc.sample_rate).tolist(),
        "duration_s": duration,
        "padded": bool(wave.shape[0] < fc.window_samples),
    }


def predict_files(
    workdir: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    *,
    step: int | None = None,
    best: bool = False,
    batch_size: int | None = None,
    segments: bool = False,
) -> dict[str, Any]:
    """Emotion probabilities for audio files with a trained run.

    Uses the run's own feature config (from its ``split.json`` data info) and its feature
    normalisation (``normalization.json``: "global" applies the training statistics, "utterance"
    and "speaker" normalise each file by its own statistics, since a new file's speaker is
    unknown). The file probability is ``softmax`` of the mean segment logits (the same mean whose
    argmax ``evaluate_run`` scores).

    Args:
        workdir: a training workdir.
        paths: audio files (any sample rate, channel count, sample format, length).
        step, best: which checkpoint (default the latest).
        batch_size: segments per compiled batch (default ``config.data.eval_batch_size``).
        segments: also return per-window probabilities (2-s windows, eval hop).

    Returns:
        {"label_names": [...], "files": [{"path", "duration_s", "num_segments", "padded",
        "probabilities" {name: p}, "prediction", optional "segments": [{"start_s", "end_s",
        "probabilities", "prediction"}]}], "errors": [{"path", "error"}]}; unreadable files go to
        "errors" and the others are still scored.

    Raises:
        EvalError: the run cannot be restored or lacks its feature config.
    """
    from dkd_jax import audio, input_pipeline, records, train_lib

    workdir = Path(workdir)
    run = _restore(workdir, step=step, best=best)
    fc_dict = run.data_info.get("feature_config")
    if not fc_dict:
        try:
            fc_dict = records.load_metadata(run.config.data.prep_dir)["feature_config"]
        except records.DataError:
            raise EvalError(
                f"{workdir}: the run records no feature config and its prep dir "
                f"{run.config.data.prep_dir!r} is unavailable"
            ) from None
    fc = audio.FeatureConfig.from_dict(fc_dict)
    label_names = list(run.data_info.get("label_names") or ["neutral", "happy", "sad", "angry"])
    done, errors = [], []
    for i, path in enumerate(paths):
        try:
            seg = file_segments(path, fc)
        except audio.AudioError as e:
            errors.append({"path": os.fspath(path), "error": str(e)})
            continue
        done.append((i, os.fspath(path), seg))
    out: dict[str, Any] = {"label_names": label_names, "files": [], "errors": errors}
    if not done:
        return out
    counts = [d[2]["segments"].shape[0] for d in done]
    owner = np.repeat(np.arange(len(done)), counts)
    ids = np.array([f"file{i}" for i, _, _ in done], dtype=str)[owner]
    arrays = records.SegmentArrays(
        features=np.concatenate([d[2]["segments"] for d in done]),
        labels=np.zeros(len(owner), np.int32),
        utterance_ids=ids,
        segment_index=np.concatenate([np.arange(c, dtype=np.int32) for c in counts]),
        valid_frames=np.concatenate([d[2]["valid_frames"] for d in done]).astype(np.int32),
        speakers=ids,  # unknown speaker: each file is its own group
        sessions=np.full(len(owner), "", dtype=str),
        genders=np.full(len(owner), "", dtype=str),
    )
    arrays = input_pipeline.normalize_arrays(arrays, run.normalization)
    bs = int(batch_size or run.config.data.eval_batch_size)
    logits = np.asarray(
        train_lib.predict_logits(run.model, run.variables, arrays.features, batch_size=bs)
    )
    window = fc.window_seconds
    for k, (_, path, seg) in enumerate(done):
        seg_logits = logits[owner == k]
        probs = _softmax(seg_logits.mean(axis=0))
        entry: dict[str, Any] = {
            "path": path,
            "duration_s": round(seg["duration_s"], 3),
            "num_segments": int(seg_logits.shape[0]),
            "padded": seg["padded"],
            "probabilities": {n: float(p) for n, p in zip(label_names, probs, strict=True)},
            "prediction": label_names[int(np.argmax(probs))],
        }
        if segments:
            seg_probs = _softmax(seg_logits)
            entry["segments"] = [
                {
                    "start_s": round(start, 3),
                    "end_s": round(min(start + window, max(seg["duration_s"], window)), 3),
                    "probabilities": {n: float(p) for n, p in zip(label_names, row, strict=True)},
                    "prediction": label_names[int(np.argmax(row))],
                }
                for start, row in zip(seg["starts_s"], seg_probs, strict=True)
            ]
        out["files"].append(entry)
    return out


def format_predictions(pred: dict[str, Any]) -> str:
    """Plain-text table of ``predict_files`` output (one row per file, indented segment rows)."""
    names = pred["label_names"]
    width = max([4, *(len(f["path"]) for f in pred["files"])])
    width = min(width, 60)
    cols = " ".join(f"{n:>8}" for n in names)
    lines = [f"{'file':<{width}}  {'seconds':>7}  {'windows':>7}  {cols}  prediction"]
    for f in pred["files"]:
        shown = f["path"] if len(f["path"]) <= width else "…" + f["path"][-(width - 1) :]
        probs = " ".join(f"{f['probabilities'][n]:>8.3f}" for n in names)
        note = "  (shorter than one window: padded)" if f["padded"] else ""
        lines.append(
            f"{shown:<{width}}  {f['duration_s']:>7.2f}  {f['num_segments']:>7d}  {probs}  "
            f"{f['prediction']}{note}"
        )
        for s in f.get("segments", []):
            span = f"  {s['start_s']:6.2f}-{s['end_s']:.2f} s"
            probs = " ".join(f"{s['probabilities'][n]:>8.3f}" for n in names)
            lines.append(f"{span:<{width}}  {'':>7}  {'':>7}  {probs}  {s['prediction']}")
    return "\n".join(lines)
