"""Tests for dkd_jax/confound.py: information measures against scikit-learn, the speaker-label
numbers against hand counts and closed forms, strength thresholds and the warning text."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from dkd_jax import confound


def _labellings():
    rng = np.random.default_rng(0)
    cases = [
        (["a"] * 5, ["x"] * 5),  # both single-valued: NMI 1 by convention
        (["a"] * 4, ["x", "y", "x", "z"]),  # one single-valued: I = 0
        (["a", "b", "c", "d"], [0, 0, 1, 1]),
        (["s1", "s1", "s2", "s2"], [1, 1, 0, 0]),  # perfect dependence
    ]
    for n, ka, kb in [(50, 7, 4), (200, 29, 4), (30, 30, 3), (400, 3, 3)]:
        cases.append((rng.integers(0, ka, n).astype(str).tolist(), rng.integers(0, kb, n).tolist()))
    a = rng.integers(0, 12, 300)
    cases.append(((a // 3).tolist(), (a % 4 + 4 * (a < 6)).tolist()))  # partial dependence
    return cases


@pytest.mark.parametrize("case", range(len(_labellings())))
def test_information_matches_sklearn(case):
    a, b = _labellings()[case]
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    assert confound.mutual_information(a, b) == pytest.approx(mutual_info_score(ia, ib), abs=1e-12)
    for average in ("arithmetic", "geometric", "min", "max"):
        want = normalized_mutual_info_score(ia, ib, average_method=average)
        got = confound.normalized_mutual_information(a, b, average=average)
        assert got == pytest.approx(want, abs=1e-12), average


def test_entropy_and_contingency_by_hand():
    assert confound.entropy([1, 1]) == pytest.approx(math.log(2))
    assert confound.entropy([2, 0, 2, 4]) == pytest.approx(
        -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    )
    assert confound.entropy([]) == 0.0 and confound.entropy([0, 0]) == 0.0
    n = confound.contingency(["b", "a", "b"], [1, 1, 2])
    np.testing.assert_array_equal(n, [[1, 0], [1, 1]])  # rows a, b; columns 1, 2
    with pytest.raises(ValueError, match="equal length"):
        confound.contingency([1, 2], [1])
    with pytest.raises(ValueError, match="average must be"):
        confound.normalized_mutual_information([1], [1], average="mean")


def test_speaker_label_numbers_by_hand():
    # s1: 3 x class 0 (single), s2: 1 x class 1 (single), s3: classes 0, 1, 2, 2.
    speakers = ["s1"] * 3 + ["s2"] + ["s3"] * 4
    labels = [0, 0, 0, 1, 0, 1, 2, 2]
    c = confound.speaker_label_confound(speakers, labels, label_names=["neu", "hap", "sad"])
    assert c["num_utterances"] == 8 and c["num_speakers"] == 3 and c["num_classes"] == 3
    assert c["single_class_speakers"] == {"s1": "neu", "s2": "hap"}
    assert c["single_class_share"] == pytest.approx(2 / 3)
    p = np.array([4, 2, 2]) / 8  # class proportions
    chance = ((p**3).sum() + (p**1).sum() + (p**4).sum()) / 3
    assert c["single_class_share_if_independent"] == pytest.approx(chance)
    assert c["speaker_majority_accuracy"] == pytest.approx((3 + 1 + 2) / 8)
    assert c["majority_class_share"] == pytest.approx(4 / 8)
    h_label = confound.entropy([4, 2, 2])
    mi = mutual_info_score(np.unique(speakers, return_inverse=True)[1], labels)
    assert c["mutual_information"] == pytest.approx(mi)
    assert c["label_entropy_explained"] == pytest.approx(mi / h_label)
    assert c["nmi"] == pytest.approx(normalized_mutual_info_score(speakers, labels))


def test_single_speaker_chance_closed_form():
    # One speaker with n utterances, C equiprobable classes: P(single class) = C * (1/C)^n.
    c = confound.speaker_label_confound(["s"] * 8, [0, 1, 2, 3] * 2)
    assert c["single_class_share_if_independent"] == pytest.approx(4 * 0.25**8)
    assert c["single_class_share"] == 0.0 and c["label_entropy_explained"] == 0.0
    assert c["strength"] == "weak"


def test_speaker_determines_label_is_strong_and_one_class_is_undefined():
    spk = [f"s{i}" for i in range(12) for _ in range(5)]
    lab = [i % 4 for i in range(12) for _ in range(5)]
    c = confound.speaker_label_confound(spk, lab)
    assert c["single_class_share"] == 1.0
    assert c["label_entropy_explained"] == pytest.approx(1.0)
    assert c["nmi"] < 0.75  # arithmetic NMI cannot reach 1 with 12 speakers and 4 classes
    assert c["speaker_majority_accuracy"] == 1.0 and c["strength"] == "strong"
    one = confound.speaker_label_confound(["a", "b"], [2, 2])
    assert one["label_entropy_explained"] is None and one["single_class_share"] == 1.0
    with pytest.raises(ValueError, match="at least one utterance"):
        confound.speaker_label_confound([], [])
    with pytest.raises(ValueError, match="2 speakers for 1 labels"):
        confound.speaker_label_confound(["a", "b"], [1])


@pytest.mark.parametrize(
    ("share", "explained", "strength"),
    [
        (0.0, 0.0, "weak"),
        (0.19, 0.19, "weak"),
        (0.2, 0.0, "moderate"),
        (0.0, 0.49, "moderate"),
        (0.5, 0.0, "strong"),
        (0.1, 0.5, "strong"),
        (0.6, None, "strong"),
        (0.1, None, "weak"),
    ],
)
def test_strength_thresholds(share, explained, strength):
    c = {"single_class_share": share, "label_entropy_explained": explained}
    assert confound.confound_strength(c) == strength


def test_normalization_warning():
    spk = [f"s{i}" for i in range(29) for _ in range(4)]
    lab = [(i % 4 if i < 24 else j) for i in range(29) for j in range(4)]  # 24 of 29 single
    strong = confound.speaker_label_confound(spk, lab)
    assert strong["strength"] == "strong" and len(strong["single_class_speakers"]) == 24
    text = confound.normalization_warning(strong, "speaker")
    assert "WARNING" in text and "24 of 29 training speakers (83 %;" in text
    assert "removed" in text and "normalization=global" in text and "--validation-only" in text
    for mode in ("global", "none", "utterance"):
        assert confound.normalization_warning(strong, mode) is None
    weak = confound.speaker_label_confound(spk, [j for _ in range(29) for j in range(4)])
    assert confound.normalization_warning(weak, "speaker") is None
    moderate = dict(weak, single_class_share=0.3, single_class_speakers={"a": "x"})
    note = confound.normalization_warning(moderate, "speaker")
    assert note.startswith("note:") and "\n" not in note


def test_confound_from_metadata():
    meta = {
        "label_names": ["neutral", "happy"],
        "utterances": [
            {"utterance_id": "u1", "speaker": "A", "label": 0},
            {"utterance_id": "u2", "speaker": "A", "label": 0},
            {"utterance_id": "u3", "speaker": "B", "label": 1},
            {"utterance_id": "u4", "speaker": "B", "label": 0},
        ],
    }
    c = confound.confound_from_metadata(meta, ["u1", "u2", "u3"])
    assert c["single_class_speakers"] == {"A": "neutral", "B": "happy"}
    assert c["num_utterances"] == 3
    with pytest.raises(ValueError, match=r"1 utterance id\(s\) not in the prep's metadata"):
        confound.confound_from_metadata(meta, ["u1", "zz"])
