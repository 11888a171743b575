"""Feature-statistics baseline: logistic regression on per-utterance feature means and stds.

The yardstick a deep model has to beat on the same folds (issue 15). It needs no training loop
and takes seconds, so the experiment runner fits it on every fold next to the CNNs.

Features (:func:`utterance_statistics`, :func:`statistics_features`): for every utterance, the
mean and the (population) standard deviation of each feature band over the utterance's frames,
``2 * num_bins`` numbers. The frames are read back from the prep's segments of one layout
(default ``"eval"``, hop 0.4 s), counting every frame of the utterance **once**: segment ``k``
starts at frame ``round(k * hop_frames)`` (as ``audio.segment_starts``), so it contributes its
first ``start[k+1] - start[k]`` frames and the last segment all of its frames, each capped at
the segment's ``valid_frames`` (the zero padding of short utterances never counts). The frames
covered are those of the whole-utterance feature matrix up to the end of the last complete
window: the tail shorter than one hop (< 0.4 s with the eval layout) that data_prep drops is
missing here too. Sums are accumulated in float64 per shard, so memory stays at one shard.

Normalisation (``normalization``):

* ``"global"``: none before the statistics (a global per-band affine normalisation of the frames
  would change nothing after the standardisation below);
* ``"speaker"``: every frame is normalised with its speaker's per-band mean and std first, as
  ``input_pipeline`` does for ``normalization="speaker"``: statistics of a speaker come from its
  *training* utterances, and from its test utterances only when it has none in training (held-out
  speakers, as the runner does for unseen groups). Speaker statistics here count each frame once
  (the runner's count the overlapping train-layout windows), and std is ``sqrt(var + 1e-6)``
  like the runner's. Mean and std of the normalised frames follow exactly from the raw sums:
  ``(mean - m_s) / s_s`` and ``std / s_s``.

Classifier (:func:`fit_baseline`): the ``2 * num_bins`` statistics are standardised with the
mean and std of the training utterances (a constant column gets std 1), then a multinomial
L2 logistic regression (scikit-learn, lbfgs, ``max_iter`` 2000) is fitted. Its inverse
regularisation ``C`` is chosen from ``c_grid`` by inner cross-validation on the training
utterances only, grouped by speaker (``sklearn.model_selection.GroupKFold`` with
``min(inner_folds, training speakers)`` folds; an inner fold's test speakers are never in its
training part; the standardisation is refitted inside every inner fold). The score of a ``C`` is
the UA of the pooled out-of-fold predictions (every training utterance predicted once; pooling
keeps the score defined when an inner fold lacks a class); the best score wins, ties go to the
smaller ``C`` (stronger regularisation). With a single training speaker there is nothing to
group by: ``C = DEFAULT_C`` and a note says so. Classes absent from the training utterances get
probability 0 and are never predicted (a note names them); with a single training class every
prediction is that class.

Everything is deterministic (sorted utterance ids, unshuffled folds, lbfgs). The result dict has
the keys of ``eval_lib.report_from_confusion`` (``wa``, ``ua``, ``per_class``,
``confusion_matrix``, ``absent_classes`` ...) plus the baseline's own: ``C``, ``inner_cv`` (per-C
scores), ``notes`` and ``predictions`` (one row per test utterance).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dkd_jax import audio, eval_lib, input_pipeline, metrics, records

__all__ = [
    "BASELINE_NAME",
    "DEFAULT_C",
    "DEFAULT_C_GRID",
    "NORMALIZATIONS",
    "UtteranceStats",
    "coverage_frames",
    "fit_baseline",
    "run_baseline",
    "statistics_features",
    "utterance_statistics",
]

BASELINE_NAME = "baseline"
DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
DEFAULT_C = 1.0
"""C used when inner cross-validation is impossible (fewer than two training speakers)."""
INNER_FOLDS = 5
MAX_ITER = 2000
NORMALIZATIONS = ("global", "speaker")


@dataclasses.dataclass(frozen=True)
class UtteranceStats:
    """Per-utterance frame moments of a prep dir (one row per utterance, sorted by id).

    Attributes:
      utterance_ids: [U] str, sorted.
      labels: [U] int class ids.
      speakers: [U] str.
      count: [U] float64 frames counted.
      total: [U, F] float64 per-band sums over those frames.
      total_sq: [U, F] float64 per-band sums of squares.
      label_names: class names of the prep.
      layout: segment layout the frames were read from.
    """

    utterance_ids: np.ndarray
    labels: np.ndarray
    speakers: np.ndarray
    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    label_names: tuple[str, ...]
    layout: str

    def rows(self, utterance_ids: Sequence[str]) -> np.ndarray:
        """Row indices of the given ids (in the given order).

        Raises:
          ValueError: ids that this table does not hold (the first few are named).
        """
        ids = np.asarray(list(utterance_ids), dtype=str)
        pos = np.searchsorted(self.utterance_ids, ids)
        pos = np.minimum(pos, max(len(self.utterance_ids) - 1, 0))
        bad = ids[(len(self.utterance_ids) == 0) | (self.utterance_ids[pos] != ids)]
        if bad.size:
            raise ValueError(
                f"{bad.size} utterance id(s) not in the prep's statistics, e.g. {bad[:3].tolist()}"
            )
        return pos


def coverage_frames(
    segment_index: np.ndarray,
    valid_frames: np.ndarray,
    num_segments: np.ndarray,
    *,
    hop_frames: float,
    frames_per_window: int,
) -> np.ndarray:
    """Leading frames of each segment that count toward its utterance (each frame once).

    Args:
      segment_index: [N] position k of each segment in its utterance.
      valid_frames: [N] real (non-padding) frames of each segment.
      num_segments: [N] number of segments of the segment's utterance.
      hop_frames: hop between window starts in (fractional) frames.
      frames_per_window: frames of one segment.

    Returns:
      [N] int64: ``min(valid, start[k+1] - start[k])`` for all but the last segment of an
      utterance, ``min(valid, frames_per_window)`` for the last.
    """
    k = np.asarray(segment_index, np.int64)
    start = np.round(k * hop_frames).astype(np.int64)
    step = np.round((k + 1) * hop_frames).astype(np.int64) - start
    last = k == np.asarray(num_segments, np.int64) - 1
    span = np.where(last, frames_per_window, np.minimum(step, frames_per_window))
    return np.minimum(np.asarray(valid_frames, np.int64), span)


def utterance_statistics(
    prep_dir: str | os.PathLike, *, layout: str = "eval", progress: bool = False
) -> UtteranceStats:
    """Frame moments of every utterance of a prep dir (read shard by shard).

    Args:
      prep_dir: a prep dir written by data_prep.
      layout: "eval" (default; finest hop, smallest dropped tail) or "train".
      progress: show a tqdm bar over the shards.

    Returns:
      UtteranceStats of every utterance in ``metadata.json``.

    Raises:
      records.DataError: unreadable prep dir or shard, or an utterance whose segments in the
        shards do not match the count in metadata.json.
    """
    from tqdm import tqdm

    prep_dir = os.fspath(prep_dir)
    meta = records.load_metadata(prep_dir)
    cfg = audio.FeatureConfig.from_dict(meta["feature_config"])
    hop = cfg.hop_frames(float(meta["splits"][layout]["hop_seconds"]))
    utts = sorted(meta["utterances"], key=lambda u: str(u["utterance_id"]))
    ids = np.array([str(u["utterance_id"]) for u in utts], dtype=str)
    expected = np.array([int(u[f"num_{layout}_segments"]) for u in utts], np.int64)
    lookup = {u: i for i, u in enumerate(ids.tolist())}
    num_bins = int(meta["segment_shape"][0])
    count = np.zeros((len(ids),), np.float64)
    total = np.zeros((len(ids), num_bins), np.float64)
    total_sq = np.zeros_like(total)
    seen = np.zeros((len(ids),), np.int64)
    num_files = len(records.split_files(meta, layout))
    for j in tqdm(range(num_files), desc="baseline stats", unit="shard", disable=not progress):
        arrays = records.load_split(prep_dir, layout, shard_index=j, shard_count=num_files)
        try:
            row = np.array([lookup[u] for u in arrays.utterance_ids.tolist()], np.int64)
        except KeyError as e:
            raise records.DataError(
                f"{prep_dir}: shard {j} of layout {layout!r} holds utterance {e} that "
                "metadata.json does not list (re-run data_prep with --overwrite)"
            ) from None
        frames = coverage_frames(
            arrays.segment_index,
            arrays.valid_frames,
            expected[row],
            hop_frames=hop,
            frames_per_window=cfg.frames_per_window,
        )
        c, s, q = input_pipeline.group_moments(arrays.features, frames, row, len(ids))
        count += c
        total += s
        total_sq += q
        np.add.at(seen, row, 1)
    bad = np.flatnonzero(seen != expected)
    if bad.size:
        i = int(bad[0])
        raise records.DataError(
            f"{prep_dir}: utterance {ids[i]} has {seen[i]} {layout} segments in the shards, "
            f"metadata.json says {expected[i]} ({bad.size} such utterance(s)); re-run data_prep "
            "with --overwrite"
        )
    return UtteranceStats(
        utterance_ids=ids,
        labels=np.array([int(u["label"]) for u in utts], np.int64),
        speakers=np.array([str(u["speaker"]) for u in utts], dtype=str),
        count=count,
        total=total,
        total_sq=total_sq,
        label_names=tuple(meta["label_names"]),
        layout=layout,
    )


def _speaker_stats(
    stats: UtteranceStats, train: np.ndarray, test: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-speaker frame mean/std [U, F] for the rows train ∪ test (training rows first)."""
    names, group = np.unique(stats.speakers, return_inverse=True)
    in_train = np.zeros((len(names),), bool)
    in_train[group[train]] = True
    use = np.concatenate([train, test[~in_train[group[test]]]])
    g = len(names)
    count = np.bincount(group[use], weights=stats.count[use], minlength=g)
    total = np.zeros((g, stats.total.shape[1]))
    total_sq = np.zeros_like(total)
    np.add.at(total, group[use], stats.total[use])
    np.add.at(total_sq, group[use], stats.total_sq[use])
    mean, std = input_pipeline.moments_to_stats(count, total, total_sq)
    return mean[group], std[group]


def statistics_features(
    stats: UtteranceStats,
    rows: np.ndarray,
    *,
    normalization: str = "global",
    train_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Per-utterance [mean over frames | std over frames] of every band: [len(rows), 2F].

    Args:
      stats: per-utterance moments.
      rows: rows of ``stats`` to return.
      normalization: "global" (raw statistics) or "speaker" (frames normalised per speaker
        first; see the module docstring).
      train_rows: with "speaker", the training rows whose speakers' statistics are used (default
        ``rows``: every speaker normalised with all of its given utterances).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"baseline normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
        )
    rows = np.asarray(rows, np.int64)
    mean, std = input_pipeline.moments_to_stats(
        stats.count[rows], stats.total[rows], stats.total_sq[rows], eps=0.0
    )
    if normalization == "speaker":
        train = rows if train_rows is None else np.asarray(train_rows, np.int64)
        s_mean, s_std = _speaker_stats(stats, train, rows)
        mean = (mean - s_mean[rows]) / s_std[rows]
        std = std / s_std[rows]
    return np.concatenate([mean, std], axis=1)


def _standardize(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu = x_train.mean(axis=0)
    sd = x_train.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [(x - mu) / sd for x in (x_train, *others)]


def _fit_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, c: float, num_classes: int
) -> tuple[np.ndarray, int]:
    """Class probabilities [n_test, num_classes] of a standardised logistic regression, and the
    number of convergence warnings."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x_train, x_test = _standardize(x_train, x_test)
    probs = np.zeros((x_test.shape[0], num_classes))
    classes = np.unique(y_train)
    if classes.size == 1:
        probs[:, classes[0]] = 1.0
        return probs, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf = LogisticRegression(C=c, max_iter=MAX_ITER).fit(x_train, y_train)
    probs[:, clf.classes_] = clf.predict_proba(x_test)
    return probs, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


def _inner_cv(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    c_grid: Sequence[float],
    inner_folds: int,
    num_classes: int,
) -> dict[str, Any]:
    """Pooled out-of-fold UA/WA of every C, folds grouped by speaker."""
    from sklearn.model_selection import GroupKFold

    n_splits = min(inner_folds, len(np.unique(groups)))
    folds = list(GroupKFold(n_splits=n_splits).split(x, y, groups))
    scores, warned = [], 0
    for c in c_grid:
        pred = np.empty_like(y)
        for tr, va in folds:
            probs, w = _fit_predict(x[tr], y[tr], x[va], c=c, num_classes=num_classes)
            pred[va] = probs.argmax(axis=1)
            warned += w
        cm = metrics.confusion_matrix(y, pred, num_classes=num_classes)
        scores.append(
            {
                "C": float(c),
                "ua": metrics.unweighted_accuracy(cm),
                "wa": metrics.weighted_accuracy(cm),
            }
        )
    best = int(np.argmax([s["ua"] for s in scores]))  # first maximum = smallest C
    return {
        "folds": n_splits,
        "grouped_by": "speaker",
        "num_speakers": len(np.unique(groups)),
        "score": "UA of the pooled out-of-fold predictions",
        "scores": scores,
        "best_C": scores[best]["C"],
        "convergence_warnings": warned,
    }


def _check_ids(train_ids: Sequence[str], test_ids: Sequence[str]) -> None:
    if not len(train_ids):
        raise ValueError("baseline: the split has no training utterances")
    if not len(test_ids):
        raise ValueError("baseline: the split has no test utterances (protocol 'none'?)")
    both = set(map(str, train_ids)) & set(map(str, test_ids))
    if both:
        raise ValueError(f"baseline: {len(both)} utterance(s) in both train and test")


def fit_baseline(
    stats: UtteranceStats,
    train_ids: Sequence[str],
    test_ids: Sequence[str],
    *,
    normalization: str = "global",
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    inner_folds: int = INNER_FOLDS,
) -> dict[str, Any]:
    """Fits the baseline on the training utterances and scores it on the test utterances.

    Args:
      stats: :func:`utterance_statistics` of the prep.
      train_ids, test_ids: the split's utterances (``protocols.Split.train_ids`` / ``test_ids``;
        validation ids, if any, are simply not passed).
      normalization: "global" or "speaker" (see the module docstring).
      c_grid: candidate inverse regularisation strengths (sorted ascending here).
      inner_folds: speaker-grouped inner folds (fewer when there are fewer training speakers).

    Returns:
      ``eval_lib.report_from_confusion`` of the test utterances plus ``model``, ``features``,
      ``normalization``, ``layout``, ``num_train_utterances``, ``C``, ``c_selection``
      ("inner-cv" | "default"), ``inner_cv`` (folds, per-C scores; None without inner CV),
      ``train_classes``, ``notes`` (list of str) and ``predictions`` (per test utterance:
      ``utterance_id``, ``speaker``, ``label``, ``prediction``, ``probabilities`` [C]).

    Raises:
      ValueError: empty train or test set, overlapping ids, ids the prep does not hold, bad
        normalisation, empty or non-positive ``c_grid``, ``inner_folds < 2``.
    """
    _check_ids(train_ids, test_ids)
    grid = sorted(float(c) for c in c_grid)
    if not grid or grid[0] <= 0:
        raise ValueError(f"baseline: c_grid must hold positive values, got {list(c_grid)}")
    if inner_folds < 2:
        raise ValueError(f"baseline: inner_folds must be >= 2, got {inner_folds}")
    tr = stats.rows(sorted(map(str, train_ids)))
    te = stats.rows(sorted(map(str, test_ids)))
    x = statistics_features(
        stats, np.concatenate([tr, te]), normalization=normalization, train_rows=tr
    )
    x_tr, x_te = x[: tr.size], x[tr.size :]
    y_tr, y_te = stats.labels[tr], stats.labels[te]
    names = list(stats.label_names)
    notes = []
    present = np.unique(y_tr)
    missing = [n for c, n in enumerate(names) if c not in present]
    if missing:
        notes.append(f"classes absent from the training utterances, never predicted: {missing}")
    import threadpoolctl  # a dependency of scikit-learn

    # One BLAS thread: these problems are small, and several threads on a busy machine are
    # 10-40x slower (and a fixed thread count keeps the sums in one order).
    with threadpoolctl.threadpool_limits(limits=1):
        if len(np.unique(stats.speakers[tr])) < 2:
            inner = None
            c, selection = DEFAULT_C, "default"
            notes.append(f"one training speaker: no speaker-grouped inner CV, C = {DEFAULT_C}")
        else:
            inner = _inner_cv(
                x_tr,
                y_tr,
                stats.speakers[tr],
                c_grid=grid,
                inner_folds=inner_folds,
                num_classes=len(names),
            )
            c, selection = inner["best_C"], "inner-cv"
        probs, warned = _fit_predict(x_tr, y_tr, x_te, c=c, num_classes=len(names))
    if warned or (inner and inner["convergence_warnings"]):
        notes.append(f"lbfgs stopped at {MAX_ITER} iterations without converging in some fits")
    pred = probs.argmax(axis=1)
    cm = metrics.confusion_matrix(y_te, pred, num_classes=len(names))
    return {
        "model": BASELINE_NAME,
        "features": "per-utterance mean and std of each feature band",
        **eval_lib.report_from_confusion(np.asarray(cm), names),
        "normalization": normalization,
        "layout": stats.layout,
        "num_train_utterances": int(tr.size),
        "C": float(c),
        "c_selection": selection,
        "inner_cv": inner,
        "train_classes": [names[int(i)] for i in present],
        "untrained_classes": missing,
        "notes": notes,
        "predictions": _prediction_rows(stats, te, pred, probs),
    }


def _prediction_rows(
    stats: UtteranceStats, rows: np.ndarray, pred: np.ndarray, probs: np.ndarray
) -> list[dict[str, Any]]:
    names = stats.label_names
    return [
        {
            "utterance_id": str(stats.utterance_ids[r]),
            "speaker": str(stats.speakers[r]),
            "label": names[int(stats.labels[r])],
            "prediction": names[int(pred[i])],
            "probabilities": [float(p) for p in probs[i]],
        }
        for i, r in enumerate(rows)
    ]


def run_baseline(
    prep_dir: str | os.PathLike,
    split: Any,
    *,
    normalization: str = "global",
    stats: UtteranceStats | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`fit_baseline` on one split of a prep dir.

    Args:
      prep_dir: the prep dir (read only when ``stats`` is None).
      split: a ``protocols.Split`` (or a mapping with ``train_ids`` / ``test_ids``).
      normalization: "global" or "speaker".
      stats: precomputed :func:`utterance_statistics` (compute once, reuse for every fold).
      **kwargs: ``c_grid``, ``inner_folds``.
    """
    if stats is None:
        stats = utterance_statistics(prep_dir)
    if isinstance(split, Mapping):
        train_ids, test_ids = split["train_ids"], split["test_ids"]
    else:
        train_ids, test_ids = split.train_ids, split.test_ids
    return fit_baseline(stats, train_ids, test_ids, normalization=normalization, **kwargs)
