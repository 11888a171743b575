"""Tests for dkd_jax.metrics: hand-computed confusion matrices and scores, sklearn as an
independent reference, utterance aggregation against a NumPy loop, and edge cases."""

from __future__ import annotations

import doctest
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from dkd_jax import metrics
from dkd_jax.metrics import (
    aggregate_utterances,
    confusion_matrix,
    per_class_scores,
    summarize,
    unweighted_accuracy,
    weighted_accuracy,
)

# Hand-worked 4-class example; class 3 never occurs in the labels but is predicted once.
LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 2]
PREDS = [0, 0, 0, 1, 1, 2, 2, 3, 0]
CM = [
    [3, 1, 0, 0],
    [0, 1, 1, 0],
    [1, 0, 1, 1],
    [0, 0, 0, 0],
]


def test_hand_confusion_matrix_and_scores():
    cm = confusion_matrix(LABELS, PREDS, num_classes=4)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    np.testing.assert_array_equal(cm, CM)
    assert weighted_accuracy(cm) == pytest.approx(5 / 9, abs=1e-12)
    # Mean recall over the 3 classes present: (3/4 + 1/2 + 1/3) / 3 = 19/36.
    assert unweighted_accuracy(cm) == pytest.approx(19 / 36, abs=1e-12)
    s = per_class_scores(cm)
    np.testing.assert_allclose(s["recall"], [3 / 4, 1 / 2, 1 / 3, 0.0], atol=1e-12)
    np.testing.assert_allclose(s["precision"], [3 / 4, 1 / 2, 1 / 2, 0.0], atol=1e-12)
    # F1: 2PR/(P+R); class 2: 2 * 1/2 * 1/3 / (5/6) = 2/5; class 3 undefined -> 0.
    np.testing.assert_allclose(s["f1"], [3 / 4, 1 / 2, 2 / 5, 0.0], atol=1e-12)
    np.testing.assert_array_equal(s["support"], [4, 2, 3, 0])
    assert s["support"].dtype == np.int64
    for key in ("recall", "precision", "f1"):
        assert not np.any(np.isnan(s[key]))


def test_masked_entries_are_ignored():
    labels = [*LABELS, -1, 9, 2]
    preds = [*PREDS, 7, 0, -5]
    mask = [True] * len(LABELS) + [False, False, False]
    cm = confusion_matrix(np.array(labels), np.array(preds), num_classes=4, mask=np.array(mask))
    np.testing.assert_array_equal(cm, CM)
    # Masking out real entries removes exactly those counts.
    mask2 = np.ones(len(LABELS), bool)
    mask2[[0, 7]] = False  # one (0 -> 0) and one (2 -> 3)
    expected = np.array(CM)
    expected[0, 0] -= 1
    expected[2, 3] -= 1
    np.testing.assert_array_equal(
        confusion_matrix(LABELS, PREDS, num_classes=4, mask=mask2), expected
    )


def test_single_class_case():
    cm = confusion_matrix([1, 1, 1], [1, 1, 0], num_classes=4)
    np.testing.assert_array_equal(cm[1], [1, 2, 0, 0])
    assert cm.sum() == 3
    assert weighted_accuracy(cm) == pytest.approx(2 / 3)
    assert unweighted_accuracy(cm) == pytest.approx(2 / 3)  # only class 1 has support
    s = per_class_scores(cm)
    np.testing.assert_allclose(s["precision"], [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(s["recall"], [0.0, 2 / 3, 0.0, 0.0])
    np.testing.assert_allclose(s["f1"], [0.0, 0.8, 0.0, 0.0])  # 2 * 1 * 2/3 / (5/3)


def test_accepts_jax_arrays():
    cm = confusion_matrix(jnp.array(LABELS), jnp.array(PREDS), num_classes=4)
    np.testing.assert_array_equal(cm, CM)
    assert weighted_accuracy(jnp.asarray(cm)) == pytest.approx(5 / 9)


@pytest.mark.parametrize("seed,num_classes,n", [(0, 4, 200), (1, 2, 50), (2, 7, 300), (3, 4, 5)])
def test_against_sklearn(seed, num_classes, n):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, num_classes, size=n))
    if seed == 0:
        y[y == 3] = 2  # make one class absent from the labels
    cm = confusion_matrix(y, p, num_classes=num_classes)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, p, labels=list(range(num_classes))))
    assert weighted_accuracy(cm) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about predicted-only classes
        ua_ref = skm.balanced_accuracy_score(y, p)  # mean recall over classes in y_true
    assert unweighted_accuracy(cm) == pytest.approx(ua_ref, abs=1e-12)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(
        y, p, labels=list(range(num_classes)), zero_division=0
    )
    s = per_class_scores(cm)
    np.testing.assert_allclose(s["precision"], prec, atol=1e-12)
    np.testing.assert_allclose(s["recall"], rec, atol=1e-12)
    np.testing.assert_allclose(s["f1"], f1, atol=1e-12)
    np.testing.assert_array_equal(s["support"], sup)


def test_summarize_is_json_ready():
    out = summarize(np.array(CM), ["neutral", "happy", "sad", "angry"])
    restored = json.loads(json.dumps(out))
    assert restored == out
    assert out["wa"] == pytest.approx(5 / 9) and out["ua"] == pytest.approx(19 / 36)
    assert out["num_examples"] == 9
    assert out["confusion_matrix"] == CM
    assert out["per_class"]["sad"] == {
        "recall": pytest.approx(1 / 3),
        "precision": pytest.approx(1 / 2),
        "f1": pytest.approx(2 / 5),
        "support": 3,
    }
    assert out["per_class"]["angry"]["support"] == 0
    with pytest.raises(ValueError, match="3 label names for a 4-class"):
        summarize(CM, ["a", "b", "c"])
    with pytest.raises(ValueError, match="unique"):
        summarize(CM, ["a", "b", "c", "a"])
    # A mean of matrices reported rounded counts beside unrounded WA/UA ([[1, 0], [0, 1]] next
    # to WA 0.83); whole counts held as floats are counts.
    with pytest.raises(ValueError, match="must be whole counts, got non-integer values"):
        summarize([[1.4, 0.5], [0.0, 1.0]], ["a", "b"])
    assert summarize(np.array(CM, np.float64), ["n", "h", "s", "a"])["confusion_matrix"] == CM


# --------------------------------------------------------------------------------------------
# Utterance aggregation
# --------------------------------------------------------------------------------------------


def _loop_aggregate(x, idx, num_utt, mode):
    x = np.asarray(x, np.float64)
    out = np.zeros((num_utt, x.shape[1]))
    for u in range(num_utt):
        rows = [x[i] for i in range(len(idx)) if idx[i] == u]
        if mode == "probs":
            rows = [np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in rows]
        out[u] = np.mean(rows, axis=0)
    return out


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_aggregate_matches_numpy_loop(mode):
    rng = np.random.default_rng(0)
    num_utt, c = 6, 4
    idx = np.concatenate([np.arange(num_utt), rng.integers(0, num_utt, size=20)])
    rng.shuffle(idx)  # segments of one utterance are not contiguous
    x = (4.0 * rng.standard_normal((idx.size, c))).astype(np.float32)
    got = aggregate_utterances(x, idx, num_utt, mode=mode)
    assert got.shape == (num_utt, c) and got.dtype == np.float64
    np.testing.assert_allclose(got, _loop_aggregate(x, idx, num_utt, mode), rtol=1e-12)
    if mode == "probs":
        np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)


def test_aggregate_hand_case_and_modes_can_disagree():
    # One confident segment for class 0 and three mild ones for class 1:
    # mean logits = [(10 - 3) / 4, 0] = [1.75, 0] -> class 0;
    # mean probs of class 0 = (sigmoid(10) + 3 sigmoid(-1)) / 4 = (0.99995 + 3 * 0.26894) / 4
    #                       = 0.45169 -> class 1.
    x = np.array([[10.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
    idx = np.array([0, 0, 0, 0, 1])
    mean_logits = aggregate_utterances(x, idx, 2, mode="logits")
    np.testing.assert_allclose(mean_logits, [[1.75, 0.0], [0.0, 2.0]])

    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))

    p0 = (sigmoid(10.0) + 3 * sigmoid(-1.0)) / 4
    assert p0 == pytest.approx(0.45169, abs=1e-5)
    mean_probs = aggregate_utterances(x, idx, 2, mode="probs")
    np.testing.assert_allclose(
        mean_probs, [[p0, 1 - p0], [sigmoid(-2.0), sigmoid(2.0)]], rtol=1e-12
    )
    assert mean_logits[0].argmax() == 0 and mean_probs[0].argmax() == 1


def test_aggregate_accepts_jax_and_bfloat16():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]], jnp.bfloat16)
    got = aggregate_utterances(x, jnp.array([1, 0, 1]), 2)
    np.testing.assert_allclose(got, [[3.0, 4.0], [3.0, -2.0]])


def test_aggregate_errors():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="utterance index 1, 3 has no segments"):
        aggregate_utterances(x, [0, 0, 2, 2], 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\), found 2"):
        aggregate_utterances(x, [0, 1, 2, 1], 2)
    with pytest.raises(ValueError, match="has 3 entries but segment_logits has 4 rows"):
        aggregate_utterances(x, [0, 1, 1], 2)
    with pytest.raises(ValueError, match="mode must be 'logits' or 'probs'"):
        aggregate_utterances(x, [0, 1, 1, 0], 2, mode="mean")
    with pytest.raises(ValueError, match=r"segment_logits must be \[N, C\]"):
        aggregate_utterances(np.zeros(4), [0, 1, 1, 0], 2)
    with pytest.raises(TypeError, match="segment_logits must be floating"):
        aggregate_utterances(np.zeros((4, 3), np.int32), [0, 1, 1, 0], 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        aggregate_utterances(np.full((4, 3), np.nan), [0, 1, 1, 0], 2)
    with pytest.raises(TypeError, match="num_utterances must be an integer"):
        aggregate_utterances(x, [0, 1, 1, 0], 2.5)
    with pytest.raises(ValueError, match="utterance index 0 has no segments"):
        aggregate_utterances(np.zeros((0, 3)), np.zeros(0, np.int64), 1)
    # No utterances and no segments is a valid, empty result.
    assert aggregate_utterances(np.zeros((0, 3)), [], 0).shape == (0, 3)


# --------------------------------------------------------------------------------------------
# Edge cases and errors
# --------------------------------------------------------------------------------------------


def test_empty_input():
    cm = confusion_matrix([], [], num_classes=4)
    np.testing.assert_array_equal(cm, np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError, match="confusion matrix is empty"):
        weighted_accuracy(cm)
    with pytest.raises(ValueError, match="confusion matrix is empty"):
        unweighted_accuracy(cm)
    # Everything masked out is also empty.
    cm = confusion_matrix([0, 1], [1, 1], num_classes=2, mask=[False, False])
    assert cm.sum() == 0
    # Per-class scores of an empty matrix are all zero, not NaN.
    s = per_class_scores(cm)
    assert all(np.all(s[k] == 0) for k in ("recall", "precision", "f1", "support"))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), found 4"):
        confusion_matrix([0, 4], [0, 1], num_classes=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), found -1"):
        confusion_matrix([0, -1], [0, 1], num_classes=4)
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 2\)"):
        confusion_matrix([0, 1], [0, 2], num_classes=2)
    with pytest.raises(ValueError, match="same length, got 2 and 3"):
        confusion_matrix([0, 1], [0, 1, 1], num_classes=2)
    with pytest.raises(TypeError, match="integer class ids"):
        confusion_matrix([0.0, 1.0], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="must be 1-D"):
        confusion_matrix([[0, 1]], [[0, 1]], num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        confusion_matrix([], [], num_classes=0)
    with pytest.raises(TypeError, match="num_classes must be an integer"):
        confusion_matrix([0], [0], num_classes=2.0)
    with pytest.raises(TypeError, match="mask must be boolean"):
        confusion_matrix([0, 1], [0, 1], num_classes=2, mask=[1, 0])
    with pytest.raises(ValueError, match="mask must have shape"):
        confusion_matrix([0, 1], [0, 1], num_classes=2, mask=[True])
    with pytest.raises(ValueError, match="square"):
        weighted_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="counts >= 0"):
        unweighted_accuracy([[1, -1], [0, 1]])


def test_docstring_examples_run():
    result = doctest.testmod(metrics, raise_on_error=False)
    assert result.attempted >= 6 and result.failed == 0
