"""Tests for dkd_jax.eval_lib's pure parts: utterance scoring, reports, plots, provenance.

The numbers are checked against confusion matrices worked out by hand below, and against NumPy
re-computations of the utterance means.
"""

import json
import math

import numpy as np
import pytest

from dkd_jax import eval_lib, jsonio, provenance

NAMES = ["neutral", "happy", "sad", "angry"]


def test_report_hand_computed_with_absent_class():
    # class 3 (angry) never occurs in the labels but is predicted once.
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 1, 0, 1, 2, 2, 2, 2, 3])
    report = eval_lib.classification_report(labels, preds, label_names=NAMES)
    assert report["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 3, 1], [0, 0, 0, 0]]
    assert report["wa"] == pytest.approx(6 / 9, abs=1e-12)
    # UA averages the recalls of the three classes that occur: (2/3 + 1/2 + 3/4) / 3.
    assert report["ua"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3, abs=1e-7)
    pc = report["per_class"]
    assert pc["neutral"] == pytest.approx(
        {"recall": 2 / 3, "precision": 1.0, "f1": 0.8, "support": 3, "predicted": 2}
    )
    assert pc["happy"] == pytest.approx(
        {"recall": 0.5, "precision": 0.5, "f1": 0.5, "support": 2, "predicted": 2}
    )
    assert pc["sad"] == pytest.approx(
        {"recall": 0.75, "precision": 0.75, "f1": 0.75, "support": 4, "predicted": 4}
    )
    # absent class: recall and F1 undefined (None), precision 0 (predicted once, wrongly).
    assert pc["angry"]["recall"] is None and pc["angry"]["f1"] is None
    assert pc["angry"]["precision"] == 0.0
    assert pc["angry"]["support"] == 0 and pc["angry"]["predicted"] == 1
    assert report["absent_classes"] == ["angry"]
    assert report["num_utterances"] == 9
    json.dumps(report)  # JSON-ready: no NaN, no numpy types


def test_report_class_never_predicted():
    labels = np.array([0, 1, 1, 2, 3, 3])
    preds = np.array([0, 0, 2, 2, 3, 0])
    report = eval_lib.classification_report(labels, preds, label_names=NAMES)
    cm = np.array([[1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
    assert np.array_equal(report["confusion_matrix"], cm)
    assert report["wa"] == pytest.approx(3 / 6)
    assert report["ua"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    happy = report["per_class"]["happy"]
    assert happy["recall"] == 0.0 and happy["precision"] is None  # 0/0: never predicted
    assert happy["f1"] == 0.0
    assert report["per_class"]["neutral"]["precision"] == pytest.approx(1 / 3)
    assert report["per_class"]["angry"]["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert report["absent_classes"] == []


def test_format_report_shows_numbers_and_na():
    report = eval_lib.classification_report(
        np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), label_names=NAMES
    )
    text = eval_lib.format_report(report, title="run X")
    assert text.splitlines()[0] == "run X"
    assert "WA 75.00 %" in text and "UA 83.33 %" in text
    assert "n/a" in text and "absent: angry" in text
    angry_row = [line for line in text.splitlines() if line.startswith("angry")][-1]
    assert angry_row.split()[1:] == ["0", "0", "0", "0"]  # last row of the confusion matrix


def test_index_utterances_first_appearance_order():
    ids = np.array(["b", "a", "b", "c", "a"])
    index, unique = eval_lib.index_utterances(ids)
    assert unique.tolist() == ["b", "a", "c"]
    assert index.tolist() == [0, 1, 0, 2, 1]
    assert np.array_equal(unique[index], ids)


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_score_segments_matches_numpy_means(mode):
    rng = np.random.default_rng(0)
    ids = np.array(["u2", "u1", "u2", "u3", "u1", "u2"])
    labels = np.array([3, 1, 3, 0, 1, 3])
    logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
    out = eval_lib.score_segments(logits, labels, ids, mode=mode)
    assert out.utterance_ids.tolist() == ["u2", "u1", "u3"]
    assert out.labels.tolist() == [3, 1, 0]
    assert out.num_segments.tolist() == [3, 2, 1]
    values = logits
    if mode == "probs":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        values = e / e.sum(-1, keepdims=True)
    expected = np.stack([values[ids == u].mean(0) for u in ["u2", "u1", "u3"]])
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5, atol=1e-6)
    assert out.predictions.tolist() == np.argmax(expected, -1).tolist()


def test_score_segments_mean_of_logits_differs_from_majority_vote():
    # two weak votes for class 0 and one confident vote for class 1: the logit mean picks class 1.
    logits = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    out = eval_lib.score_segments(logits, np.array([1, 1, 1]), ["u", "u", "u"])
    assert out.predictions.tolist() == [1]


def test_score_segments_errors():
    with pytest.raises(eval_lib.EvalError, match="different labels"):
        eval_lib.score_segments(np.zeros((2, 4)), np.array([0, 1]), ["u", "u"])
    with pytest.raises(eval_lib.EvalError, match="disagree"):
        eval_lib.score_segments(np.zeros((3, 4)), np.array([0, 1]), ["u", "v"])
    with pytest.raises(eval_lib.EvalError, match="no segments"):
        eval_lib.score_segments(np.zeros((0, 4)), np.zeros(0, int), [])


def test_plot_confusion_writes_png(tmp_path):
    cm = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [1, 0, 4, 0], [0, 0, 0, 0]])
    path = eval_lib.plot_confusion(cm, NAMES, tmp_path / "sub" / "c.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_to_jsonable_and_write_json(tmp_path):
    obj = {"a": np.float32(0.5), "b": np.arange(3), "c": math.nan, "d": (1, np.int64(2))}
    path = jsonio.write_json(tmp_path / "x.json", obj)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": [1, 2]}


_MAY = "(the code may differ from its commit)"


def test_provenance_fields():
    prov = provenance.provenance()
    assert prov["packages"]["jax"] and prov["packages"]["numpy"] == np.__version__
    assert prov["device"]["platform"] == "cpu" and prov["device"]["local_device_count"] == 2
    assert prov["device"]["cpu"] == provenance.cpu_description()
    git = prov["git"]
    assert git is None or len(git["commit"]) == 40
    dirty = bool(git and git["dirty"])
    same = provenance.environment_differences(prov, prov)
    assert same == ([f"uncommitted changes in the checkout True -> True {_MAY}"] if dirty else [])


def test_cpu_description_tells_cpu_generations_of_one_model_name_apart(tmp_path):
    """A virtual machine named two EPYC generations "AMD EPYC": the family and model numbers
    and the vector extensions tell them apart (their float32 results differ)."""
    info = tmp_path / "cpuinfo"
    for model, flags, want in (
        ("1", "avx avx2 fma", "AMD EPYC, family 25 model 1 (avx avx2 fma)"),
        ("17", "avx2 avx512f avx512bw", "AMD EPYC, family 25 model 17 (avx2 avx512f)"),
    ):
        info.write_text(
            f"processor\t: 0\ncpu family\t: 25\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\n"
            f"flags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\ncpu family\t: 25\n"
        )
        assert provenance.cpu_description(str(info)) == want


def test_environment_differences_name_what_changed():
    before = {
        "packages": {"jax": "0.10.2", "numpy": "2.4.6"},
        "device": {"platform": "cpu", "device_kind": "cpu", "device_count": 2, "cpu": "A (avx2)"},
        "git": {"commit": "a" * 40, "dirty": False},
    }
    assert provenance.environment_differences(before, before) == []
    now = {
        "packages": {"jax": "0.11.2", "numpy": "2.4.6", "flax": "0.12.8"},
        "device": {"platform": "cpu", "device_kind": "cpu", "device_count": 1, "cpu": "B"},
        "git": {"commit": "b" * 40, "dirty": True},
    }
    assert provenance.environment_differences(before, now) == [
        "flax None -> 0.12.8",
        "jax 0.10.2 -> 0.11.2",
        "device_count 2 -> 1",
        "CPU A (avx2) -> B",
        f"git commit {'a' * 40} -> {'b' * 40}",
        f"uncommitted changes in the checkout False -> True {_MAY}",
    ]
    older = {**before, "device": {k: v for k, v in before["device"].items() if k != "cpu"}}
    assert provenance.environment_differences(older, before) == [
        "CPU not recorded then (an older dkd-jax), now A (avx2)"
    ]


def test_a_model_that_learnt_nothing_is_named():
    """A journey on EmoDB: an 8-epoch run predicted angry for all 81 test utterances (UA 25 %)
    and nothing said so; its student was distilled from it in silence."""
    names = ["neutral", "happy", "sad", "angry"]
    one = np.zeros((4, 4), int)
    one[:, 3] = [20, 20, 20, 21]
    assert eval_lib.collapse_note(one, names) == ("predicts angry for all 81 utterances: UA 25.0 %")
    chance = np.array([[5, 5, 0, 0], [5, 5, 0, 0], [0, 0, 0, 10], [0, 0, 10, 0]])
    assert eval_lib.collapse_note(chance, names) == (
        "has UA 25.0 %, at or below chance (1/4 classes)"
    )
    fine = np.diag([5, 5, 5, 5]) + 1
    assert eval_lib.collapse_note(fine, names) is None
    assert eval_lib.collapse_note(np.zeros((4, 4), int), names) is None  # nothing scored
    only = np.zeros((4, 4), int)
    only[2, 2] = 7  # a test set of one class, all right: not a collapse
    assert eval_lib.collapse_note(only, names) is None
    assert "predicts class 3 for all" in eval_lib.collapse_note(one, [])
