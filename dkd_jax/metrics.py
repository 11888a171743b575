"""Evaluation metrics for speech emotion recognition: confusion matrix, WA, UA, per-class scores.

This module owns the pure metric numerics of the project: arrays in (NumPy or JAX; converted with
``np.asarray``), NumPy values / Python floats out, no config, no I/O.

Definitions (paper_spec.md §1.6):
  * **WA** (weighted accuracy) is the overall accuracy, ``trace(cm) / sum(cm)``.
  * **UA** (unweighted accuracy) is the mean per-class recall. The PyTorch lineage averages the four
    recalls of the IEMOCAP 4-class setup (and rounds each to 3 decimals; we do not round). Here the
    mean runs over the classes that *occur in the labels* (support > 0): a class absent from the
    test set has no defined recall and is left out rather than counted as 0. With every class
    present (the usual case) this equals the lineage definition.
  * Per-class precision / recall / F1 are 0 (never NaN) where undefined, like
    ``sklearn.metrics.precision_recall_fscore_support(..., zero_division=0)``.

Utterance-level prediction: a model scores fixed-length segments; :func:`aggregate_utterances`
averages each utterance's segment logits (PyTorch head-fusion lineage) or softmax probabilities
(TF area-attention lineage) before the argmax.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "aggregate_utterances",
    "confusion_matrix",
    "per_class_scores",
    "summarize",
    "unweighted_accuracy",
    "weighted_accuracy",
]

_WHERE = "dkd_jax.metrics"


def _int_vector(fn: str, name: str, x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{_WHERE}.{fn}: {name} must be 1-D [N], got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise TypeError(f"{_WHERE}.{fn}: {name} must hold integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _count(fn: str, name: str, value, *, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{_WHERE}.{fn}: {name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"{_WHERE}.{fn}: {name} must be >= {minimum}, got {n}")
    return n


def _check_cm(fn: str, cm) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(
            f"{_WHERE}.{fn}: confusion matrix must be square [C, C] with C >= 1, got shape "
            f"{cm.shape}"
        )
    if not (np.issubdtype(cm.dtype, np.integer) or np.issubdtype(cm.dtype, np.floating)):
        raise TypeError(f"{_WHERE}.{fn}: confusion matrix must be numeric, got dtype {cm.dtype}")
    if np.any(cm < 0) or not np.all(np.isfinite(cm)):
        raise ValueError(f"{_WHERE}.{fn}: confusion matrix entries must be finite counts >= 0")
    return cm


def confusion_matrix(labels, predictions, *, num_classes: int, mask=None) -> np.ndarray:
    """Counts (true class, predicted class) pairs.

    Args:
      labels: [N] integer true class ids in ``[0, num_classes)``.
      predictions: [N] integer predicted class ids in ``[0, num_classes)``.
      num_classes: number of classes ``C >= 1``.
      mask: optional [N] boolean; entries where it is False are ignored (their labels and
        predictions are not validated either, so padding may hold any value, e.g. -1).

    Returns:
      [C, C] int64 matrix ``cm`` with ``cm[i, j]`` = number of examples of true class ``i``
      predicted as ``j`` (rows = true, columns = predicted). No examples gives all zeros.

    Raises:
      ValueError: shape mismatch, ``num_classes < 1``, or an (unmasked) id out of range.
      TypeError: non-integer labels/predictions/num_classes or a non-boolean mask.

    Examples:
      >>> confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], num_classes=3).tolist()
      [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    """
    fn = "confusion_matrix"
    num_classes = _count(fn, "num_classes", num_classes, minimum=1)
    labels = _int_vector(fn, "labels", labels)
    predictions = _int_vector(fn, "predictions", predictions)
    if labels.shape != predictions.shape:
        raise ValueError(
            f"{_WHERE}.{fn}: labels and predictions must have the same length, got "
            f"{labels.shape[0]} and {predictions.shape[0]}"
        )
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != labels.shape:
            raise ValueError(
                f"{_WHERE}.{fn}: mask must have shape {labels.shape}, got {mask.shape}"
            )
        if mask.size and mask.dtype != np.bool_:
            raise TypeError(f"{_WHERE}.{fn}: mask must be boolean, got dtype {mask.dtype}")
        keep = mask.astype(bool)
        labels, predictions = labels[keep], predictions[keep]
    for name, ids in (("labels", labels), ("predictions", predictions)):
        bad = (ids < 0) | (ids >= num_classes)
        if np.any(bad):
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{_WHERE}.{fn}: {name} must lie in [0, {num_classes}), found {int(ids[first])} "
                f"({int(bad.sum())} out-of-range value(s))"
            )
    flat = labels * num_classes + predictions
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def weighted_accuracy(cm) -> float:
    """Overall accuracy ("WA"): ``trace(cm) / sum(cm)``.

    Args:
      cm: [C, C] confusion matrix (rows = true, columns = predicted).

    Returns:
      WA in ``[0, 1]`` as a Python float.

    Raises:
      ValueError: the matrix is empty (no examples), not square, or has negative entries.

    Examples:
      >>> weighted_accuracy([[3, 1], [0, 0]])
      0.75
    """
    cm = _check_cm("weighted_accuracy", cm)
    total = cm.sum()
    if total == 0:
        raise ValueError(
            f"{_WHERE}.weighted_accuracy: the confusion matrix is empty (no examples), so accuracy "
            "is undefined"
        )
    return float(np.trace(cm) / total)


def per_class_scores(cm) -> dict[str, np.ndarray]:
    """Per-class recall, precision, F1 and support.

    ``recall[i] = cm[i, i] / sum_j cm[i, j]``, ``precision[i] = cm[i, i] / sum_j cm[j, i]``,
    ``f1 = 2 P R / (P + R)``. A score whose denominator is 0 (class absent from the labels for
    recall, never predicted for precision, ``P + R = 0`` for F1) is **0, not NaN**.

    Args:
      cm: [C, C] confusion matrix (rows = true, columns = predicted).

    Returns:
      dict with ``recall``, ``precision``, ``f1`` ([C] float64) and ``support`` ([C] int64, the
      number of true examples per class).

    Examples:
      >>> s = per_class_scores([[2, 0], [1, 1]])
      >>> s["recall"].tolist(), s["precision"].tolist(), s["support"].tolist()
      ([1.0, 0.5], [0.6666666666666666, 1.0], [2, 2])
    """
    cm = _check_cm("per_class_scores", cm).astype(np.float64)
    diag = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    recall = np.divide(diag, support, out=np.zeros_like(diag), where=support > 0)
    precision = np.divide(diag, predicted, out=np.zeros_like(diag), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(diag), where=denom > 0)
    return {
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "support": np.rint(support).astype(np.int64),
    }


def unweighted_accuracy(cm) -> float:
    """Unweighted accuracy ("UA"): mean recall over the classes with support > 0.

    Classes that never occur in the labels are excluded from the mean (their recall is undefined);
    see the module docstring for how this relates to the lineage's fixed four-class average.

    Args:
      cm: [C, C] confusion matrix (rows = true, columns = predicted).

    Returns:
      UA in ``[0, 1]`` as a Python float.

    Raises:
      ValueError: the matrix is empty (no examples), not square, or has negative entries.

    Examples:
      >>> unweighted_accuracy([[3, 1], [1, 1]])  # (3/4 + 1/2) / 2
      0.625
    """
    cm = _check_cm("unweighted_accuracy", cm)
    if cm.sum() == 0:
        raise ValueError(
            f"{_WHERE}.unweighted_accuracy: the confusion matrix is empty (no examples), so UA is "
            "undefined"
        )
    scores = per_class_scores(cm)
    present = scores["support"] > 0
    return float(scores["recall"][present].mean())


def aggregate_utterances(
    segment_logits, segment_utterance_index, num_utterances: int, *, mode: str = "logits"
) -> np.ndarray:
    """Averages segment scores into one score vector per utterance.

    Args:
      segment_logits: [N, C] float segment logits.
      segment_utterance_index: [N] integer utterance index of each segment, in
        ``[0, num_utterances)``; segments of one utterance need not be contiguous.
      num_utterances: number of utterances ``U``; every utterance must have >= 1 segment.
      mode: ``"logits"`` averages the logits (PyTorch head-fusion lineage); ``"probs"`` averages
        ``softmax(logits)`` (TF area-attention lineage). The argmax of the result is the
        utterance prediction.

    Returns:
      [U, C] float64 mean logits (``"logits"``) or mean probabilities (``"probs"``, rows sum to 1).

    Raises:
      ValueError: bad shapes, unknown mode, non-finite logits, an index out of range, or an
        utterance with no segments (named by index).

    Examples:
      >>> aggregate_utterances([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]], [0, 0, 1], 2).tolist()
      [[2.0, 1.0], [0.0, 5.0]]
    """
    fn = "aggregate_utterances"
    if mode not in ("logits", "probs"):
        raise ValueError(f"{_WHERE}.{fn}: mode must be 'logits' or 'probs', got {mode!r}")
    x = np.asarray(segment_logits)
    if x.ndim != 2:
        raise ValueError(f"{_WHERE}.{fn}: segment_logits must be [N, C], got shape {x.shape}")
    # bfloat16 (from JAX) is an ml_dtypes extension type, not an np.floating subtype.
    if x.size and not (np.issubdtype(x.dtype, np.floating) or "float" in x.dtype.name):
        raise TypeError(f"{_WHERE}.{fn}: segment_logits must be floating, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{_WHERE}.{fn}: segment_logits contain NaN or inf")
    idx = _int_vector(fn, "segment_utterance_index", segment_utterance_index)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"{_WHERE}.{fn}: segment_utterance_index has {idx.shape[0]} entries but "
            f"segment_logits has {x.shape[0]} rows"
        )
    num_utterances = _count(fn, "num_utterances", num_utterances, minimum=0)
    bad = (idx < 0) | (idx >= num_utterances)
    if np.any(bad):
        raise ValueError(
            f"{_WHERE}.{fn}: segment_utterance_index must lie in [0, {num_utterances}), found "
            f"{int(idx[np.flatnonzero(bad)[0]])}"
        )
    counts = np.bincount(idx, minlength=num_utterances)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        shown = ", ".join(str(int(i)) for i in empty[:10])
        more = f" (and {empty.size - 10} more)" if empty.size > 10 else ""
        raise ValueError(
            f"{_WHERE}.{fn}: utterance index {shown}{more} has no segments; every utterance "
            "needs at least one segment to be scored"
        )
    if mode == "probs":
        x = np.exp(x - x.max(axis=1, keepdims=True))
        x /= x.sum(axis=1, keepdims=True)
    sums = np.zeros((num_utterances, x.shape[1]), np.float64)
    np.add.at(sums, idx, x)
    return sums / counts[:, None]


def summarize(cm, label_names: Sequence[str]) -> dict[str, Any]:
    """A JSON-ready summary of a confusion matrix.

    Args:
      cm: [C, C] confusion matrix (rows = true, columns = predicted).
      label_names: C class names, in class-id order.

    Returns:
      dict with ``wa``, ``ua`` (floats), ``num_examples`` (int), ``label_names`` (list),
      ``per_class`` ({name: {"recall", "precision", "f1", "support"}}) and ``confusion_matrix``
      (nested lists of ints). Only Python scalars, lists and dicts, so ``json.dumps`` works.

    Raises:
      ValueError: ``len(label_names) != C``, or the matrix is empty / invalid / not whole counts.

    Examples:
      >>> summarize([[3, 1], [1, 1]], ["neutral", "angry"])["ua"]
      0.625
    """
    cm = _check_cm("summarize", cm)
    names = [str(n) for n in label_names]
    if len(names) != cm.shape[0]:
        raise ValueError(
            f"{_WHERE}.summarize: got {len(names)} label names for a {cm.shape[0]}-class "
            "confusion matrix"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{_WHERE}.summarize: label names must be unique, got {names}")
    if not np.array_equal(cm, np.rint(cm)):  # its counts would be rounded, its scores not
        raise ValueError(
            f"{_WHERE}.summarize: confusion matrix entries must be whole counts, got non-integer "
            "values (a mean over runs? sum the runs' matrices instead, or average their scores)"
        )
    scores = per_class_scores(cm)
    per_class = {
        name: {
            "recall": float(scores["recall"][i]),
            "precision": float(scores["precision"][i]),
            "f1": float(scores["f1"][i]),
            "support": int(scores["support"][i]),
        }
        for i, name in enumerate(names)
    }
    return {
        "wa": weighted_accuracy(cm),
        "ua": unweighted_accuracy(cm),
        "num_examples": int(np.rint(cm.sum())),
        "label_names": names,
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in np.rint(cm).astype(np.int64)],
    }
