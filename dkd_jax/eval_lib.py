"""Evaluation: the one scoring path from segments to utterance-level numbers, reports, plots.

Owns everything between a model and a number in a table. Training (the periodic and final
evaluations of ``train_lib``) and ``eval.py`` score through the same functions:

* :func:`predict_logits` runs a model in eval mode over segments (one compiled function, the
  last batch padded to a small power-of-two bucket);
* :func:`score_segments` groups segment logits by utterance (``metrics.aggregate_utterances``:
  mean of the segment logits, DESIGN.md §3) in order of first appearance, and
  :func:`score_eval_set` chains the two for an ``input_pipeline.EvalSet``;
* :func:`classification_report` turns labels + predictions into WA, UA, per-class
  recall/precision/F1, the confusion matrix and counts (all from one confusion matrix, via
  ``dkd_jax.metrics``); :func:`format_report` prints it; :func:`plot_confusion` draws it;
* :func:`write_run_results` writes ``results.json``, ``utterance_scores.csv`` and
  ``confusion.png`` into a run directory (``run_dir`` owns the files), both at the end of
  training and from :func:`evaluate_run`, which scores any checkpoint of a run on its held-out
  utterances.

Numbers never come from here: ``metrics`` computes them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dkd_jax import (
    distributed,
    input_pipeline,
    jsonio,
    metrics,
    protocols,
    provenance,
    records,
    run_dir,
)

__all__ = [
    "EvalError",
    "UtteranceScores",
    "classification_report",
    "evaluate_run",
    "format_report",
    "plot_confusion",
    "predict_logits",
    "report_from_confusion",
    "restore",
    "score_eval_set",
    "score_segments",
    "write_run_results",
]

TRACE_COUNTS: collections.Counter = collections.Counter()
"""How often the prediction function was traced (tests assert no retracing)."""


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
        predictions: [U] int, argmax of the float64 means (``scores`` are them rounded to
            float32).
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
    means = metrics.aggregate_utterances(logits, seg_utt, num_utts, mode=mode)  # float64
    return UtteranceScores(
        utterance_ids=unique_ids,
        labels=utt_labels,
        scores=np.asarray(means, dtype=np.float32),
        predictions=np.argmax(means, axis=-1),
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


def collapse_note(cm, label_names: Sequence[str]) -> str | None:
    """What says a model learnt nothing usable on a held-out set (None: nothing does): it
    predicts one class for every utterance, or its UA is at or below chance (1 / the number of
    classes present). A short run (too few epochs for the corpus) ends so without an error."""
    cm = np.asarray(cm)
    total = int(cm.sum())
    present = int((cm.sum(axis=1) > 0).sum())
    if total == 0 or present < 2:
        return None
    ua = metrics.unweighted_accuracy(cm)
    used = np.flatnonzero(cm.sum(axis=0))
    if len(used) == 1:
        k = int(used[0])
        name = label_names[k] if k < len(label_names) else f"class {k}"
        return f"predicts {name} for all {total} utterances: UA {100 * ua:.1f} %"
    if ua <= 1.0 / present + 1e-9:
        return f"has UA {100 * ua:.1f} %, at or below chance (1/{present} classes)"
    return None


COLLAPSE_HINT = "check the training length (optim.num_epochs), learning rate and normalisation"


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
    # Atomic: a full disk leaves the old plot (or none), never an empty one, and names the file.
    return jsonio.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


# --------------------------------------------------------------------------------------------
# Segment logits
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _predict_fn(model, devices):
    import jax
    import jax.numpy as jnp

    def predict(variables, x):
        TRACE_COUNTS["predict"] += 1
        return model.apply(variables, x[..., None], train=False).astype(jnp.float32)

    return jax.pmap(predict, axis_name=distributed.AXIS, in_axes=(0, 0), devices=devices)


EVAL_MIN_BUCKET = 8
"""Smallest per-device batch of a padded last prediction batch (see :func:`predict_logits`)."""


def _tail_rows(needed: int, per: int) -> int:
    """Per-device rows of a batch that must hold ``needed`` rows: ``per`` when it is full, else
    the next power of two >= needed (at least EVAL_MIN_BUCKET), so that a short last batch
    costs about its size and only log2(per) extra shapes can ever compile."""
    if needed >= per:
        return per
    bucket = EVAL_MIN_BUCKET
    while bucket < needed:
        bucket *= 2
    return min(bucket, per)


def predict_logits(
    model,
    variables,
    features: np.ndarray,
    *,
    batch_size: int,
    devices: Sequence | None = None,
    replicated: bool = False,
) -> np.ndarray:
    """Segment logits of a model in eval mode (running BatchNorm statistics).

    One compiled function per (model, per-device batch, segment shape), pmapped over the local
    devices. Full batches have ``batch_size`` rows; the last one is zero-padded only up to the
    next power-of-two per-device size (>= ``EVAL_MIN_BUCKET``), so a small eval set does not pay
    for a whole ``batch_size`` batch (on a 2-core CPU, padding 81 EmoDB segments to 256 made the
    per-epoch evaluation cost as much as the epoch's training), and at most
    ``log2(batch_size / d / EVAL_MIN_BUCKET) + 2`` shapes compile per model. Padding rows are
    discarded (eval-mode BatchNorm is per example, so padding cannot change real rows).

    Args:
      model: a MACNN.
      variables: {"params", "batch_stats"} (host or device arrays), or with ``replicated``
        already copied to ``devices`` by ``distributed.replicate`` (several sets scored with
        one copy).
      features: [N, F, T] float32 segments (already normalised like the training data).
      batch_size: segments per call over all local devices (rounded up to a multiple of them).
      devices: devices to use (default all local devices).
      replicated: ``variables`` are already replicated over ``devices``.

    Returns:
      [N, num_classes] float32 numpy logits.
    """
    features = np.asarray(features, np.float32)
    if features.ndim != 3:
        raise ValueError(f"predict_logits: features must be [N, F, T], got {features.shape}")
    devices = tuple(devices) if devices is not None else distributed.local_devices()
    d = len(devices)
    per = max(1, -(-int(batch_size) // d))
    n = features.shape[0]
    num_classes = model.num_classes
    if n == 0:
        return np.zeros((0, num_classes), np.float32)
    fn = _predict_fn(model, devices)
    rep = variables if replicated else replicate_variables(variables, devices)
    out = []
    start = 0
    while start < n:
        rows = _tail_rows(-(-(n - start) // d), per)
        step = rows * d
        chunk = features[start : start + step]
        if chunk.shape[0] < step:
            pad = np.zeros((step - chunk.shape[0], *chunk.shape[1:]), np.float32)
            chunk = np.concatenate([chunk, pad])
        logits = fn(rep, chunk.reshape(d, rows, *chunk.shape[1:]))
        out.append(np.asarray(logits).reshape(step, num_classes)[: n - start])
        start += step
    return np.concatenate(out)


def replicate_variables(variables, devices: Sequence) -> dict:
    """{"params", "batch_stats"} copied to every device, as :func:`predict_logits` takes them
    with ``replicated=True``."""
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return distributed.replicate(tree, devices=tuple(devices))


def score_eval_set(
    model,
    variables,
    eval_set: input_pipeline.EvalSet,
    *,
    batch_size: int,
    devices: Sequence | None = None,
    mode: str = "logits",
    replicated: bool = False,
) -> UtteranceScores:
    """Utterance-level scores of a model on a held-out set (the one scoring path)."""
    logits = predict_logits(
        model,
        variables,
        eval_set.features,
        batch_size=batch_size,
        devices=devices,
        replicated=replicated,
    )
    return score_segments(logits, eval_set.labels, eval_set.utterance_ids, mode=mode)


def eval_summary(
    scores: UtteranceScores, eval_set: input_pipeline.EvalSet, *, num_classes: int
) -> dict[str, Any]:
    """The numbers training logs per evaluation (``metrics.jsonl`` "eval" records): wa, ua,
    confusion_matrix, num_utterances, num_segments, num_unscored."""
    cm = metrics.confusion_matrix(scores.labels, scores.predictions, num_classes=num_classes)
    return {
        "wa": metrics.weighted_accuracy(cm),
        "ua": metrics.unweighted_accuracy(cm),
        "confusion_matrix": cm.tolist(),
        "num_utterances": len(scores.utterance_ids),
        "num_segments": len(eval_set),
        "num_unscored": int(eval_set.num_unscored),
    }


# --------------------------------------------------------------------------------------------
# Results of a run
# --------------------------------------------------------------------------------------------


def build_results(
    scores: UtteranceScores,
    *,
    label_names: Sequence[str],
    cfg,
    split,
    step: int,
    checkpoint: str,
    num_segments: int,
    data_dir: str | os.PathLike,
    content_hash: str | None,
    workdir: str | os.PathLike,
    mode: str = "logits",
    untrained_classes: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``results.json`` dict: the report (:func:`report_from_confusion`) plus the run's
    step, checkpoint, role and loss, split sizes, aggregation, data, config and provenance, and
    ``untrained_classes`` (``protocols.untrained_classes``: classes the model never saw)."""
    from dkd_jax import config as config_lib

    report = classification_report(scores.labels, scores.predictions, label_names=label_names)
    return {
        **report,
        "untrained_classes": list(untrained_classes),
        "num_segments": int(num_segments),
        "step": int(step),
        "checkpoint": checkpoint,
        "role": cfg.model.role,
        "loss": cfg.kd.loss if cfg.model.role == "student" else "ce",
        "split": {
            "name": split.name,
            "num_train_utterances": len(split.train_ids),
            "num_validation_utterances": len(split.validation_ids),
            "num_test_utterances": len(split.test_ids),
        },
        "aggregation": f"mean of segment {mode} per utterance, then argmax",
        "data": {"prep_dir": os.path.abspath(data_dir), "content_hash": content_hash},
        "workdir": os.path.abspath(workdir),
        "config": config_lib.to_dict(cfg),
        "provenance": provenance.provenance(),
    }


def write_run_results(
    workdir: str | os.PathLike,
    results: Mapping[str, Any],
    scores: UtteranceScores,
    *,
    mode: str = "logits",
    plot: bool = True,
) -> None:
    """Writes ``results.json``, ``utterance_scores.csv`` and (``plot``) ``confusion.png``."""
    label_names = list(results["label_names"])
    run_dir.write_scores(
        workdir,
        utterance_ids=scores.utterance_ids,
        labels=scores.labels,
        predictions=scores.predictions,
        num_segments=scores.num_segments,
        scores=scores.scores,
        label_names=label_names,
        mode=mode,
    )
    if plot:
        plot_confusion(
            np.asarray(results["confusion_matrix"]),
            label_names,
            run_dir.confusion_plot_path(workdir),
            title=f"{Path(workdir).name} ({results['split']['name']}, step {results['step']}): "
            f"WA {100 * results['wa']:.1f} %, UA {100 * results['ua']:.1f} %",
        )
    run_dir.write_results(workdir, results)  # last: a run is finished once this exists


# --------------------------------------------------------------------------------------------
# Scoring a run from its checkpoint
# --------------------------------------------------------------------------------------------


def restore(workdir: str | os.PathLike, *, step: int | None, best: bool) -> run_dir.RestoredRun:
    """``run_dir.restore_run`` with its problems as :class:`EvalError`; a run whose training
    did not finish is restored with its warning on stderr (``RestoredRun.warning``)."""
    try:
        run = run_dir.restore_run(workdir, step=step, best=best)
    except run_dir.RunDirError as e:
        raise EvalError(str(e)) from None
    if run.warning:
        print(f"eval.py: warning: {run.warning}", file=sys.stderr)
    return run


def _check_same_data(run, metadata: dict[str, Any], data_dir: str) -> None:
    """The prep must be the run's own; what differs is named (classes and features first: the
    content hash differs whenever they do, and says nothing about why)."""
    info = run.data_info
    hint = "pass the run's own prep dir with --data"
    names = info.get("label_names")
    if names and list(names) != list(metadata.get("label_names", [])):
        raise EvalError(
            f"{data_dir}: its classes {list(metadata.get('label_names', []))} differ from the "
            f"run's {list(names)}; {hint}"
        )
    fc, have_fc = info.get("feature_config"), metadata.get("feature_config")
    if fc and fc != have_fc:
        changed = sorted(
            k for k in set(fc) | set(have_fc or {}) if fc.get(k) != (have_fc or {}).get(k)
        )
        shown = ", ".join(
            f"{k} {(have_fc or {}).get(k)!r} (run: {fc.get(k)!r})" for k in changed[:4]
        )
        raise EvalError(f"{data_dir}: its features differ from the run's: {shown}; {hint}")
    want, have = info.get("content_hash"), metadata.get("content_hash")
    if want and have and want != have:
        why = records.front_end_note(info.get("front_end"), metadata)
        raise EvalError(
            f"{data_dir}: content hash {have} differs from the data the run was trained on "
            f"({want}): the same classes and feature settings, other utterances, labels or "
            f"feature bits{why}; {hint}"
        )


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
    (hop ``eval_hop_seconds``) are normalised as in training (``normalization.json``) and scored
    by :func:`score_eval_set`, exactly as training scores them.

    Args:
        workdir: a training workdir.
        data_dir: the prep dir (default: the one recorded in the run's config).
        step: checkpoint step (default: the latest, i.e. the last epoch).
        best: use the best-by-validation checkpoint instead.
        batch_size: segments per compiled batch (default ``config.data.eval_batch_size``).
        mode: utterance aggregation, "logits" (mean of logits) or "probs" (mean of softmax).
        write: write ``results.json``, ``utterance_scores.csv`` and ``confusion.png`` (when
            ``plot``) into the workdir, holding its lock (process 0 only, in a multi-process job).
        plot: draw the confusion matrix.
        verbose: print the report table.

    Returns:
        The results dict (:func:`build_results`) plus ``eval_seconds``.

    Raises:
        EvalError: missing run files, data that differs from the run's, no test utterances, or
            test utterances missing from the prep dir.
        run_dir.WorkdirLockedError: ``write`` while another process holds the workdir.
    """
    import jax

    t0 = time.perf_counter()
    workdir = Path(workdir)
    holder = run_dir.lock_holder(workdir) if write and jax.process_index() == 0 else None
    if holder:  # refused before scoring, not after: its table would be lost
        raise EvalError(
            f"{workdir}: in use by {run_dir.holder_text(holder)}; wait for it to finish, or "
            "pass --no-write to score its newest checkpoint without writing into the run"
        )
    run = restore(workdir, step=step, best=best)
    split = run.split
    recorded = data_dir is None
    data_dir = os.fspath(data_dir) if data_dir is not None else run.config.data.prep_dir
    if recorded and not os.path.isdir(data_dir):  # moved, or a relative path from elsewhere
        raise EvalError(
            f"{workdir}: the prep dir the run recorded, {data_dir}, is not there (moved, or "
            "another machine?); pass the run's prep dir with --data"
        )
    try:
        metadata = records.load_metadata(data_dir)
    except records.DataError as e:
        raise EvalError(str(e)) from None
    _check_same_data(run, metadata, data_dir)
    if not split.test_ids:
        raise EvalError(f"{workdir}: the run's split ({split.name}) has no test utterances")
    eval_set = input_pipeline.load_eval_set(data_dir, "test", split.test_ids, run.normalization)
    if eval_set.num_unscored:
        raise EvalError(
            f"{data_dir}: {eval_set.num_unscored} test utterance(s) of {workdir} have no eval "
            "segments"
        )
    bs = int(batch_size or run.config.data.eval_batch_size)
    scores = score_eval_set(run.model, run.variables, eval_set, batch_size=bs, mode=mode)
    results = build_results(
        scores,
        label_names=list(metadata["label_names"]),
        cfg=run.config,
        split=split,
        step=run.step,
        checkpoint=run.checkpoint_label(best=best),
        num_segments=len(eval_set),
        data_dir=data_dir,
        content_hash=metadata["content_hash"],
        workdir=workdir,
        mode=mode,
        untrained_classes=protocols.untrained_classes(metadata, split),
    )
    results["eval_seconds"] = round(time.perf_counter() - t0, 3)
    # False: scored from a partly trained run (the experiment runner then trains it on).
    results["training_finished"] = run.training["finished"]
    if write and jax.process_index() == 0:
        with run_dir.locked(workdir, "eval.py"):
            write_run_results(workdir, results, scores, mode=mode, plot=plot)
    if verbose:
        print(format_report(results, title=f"{workdir} — {split.name}, step {run.step}"))
    return results
