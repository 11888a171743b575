"""Speaker–label confound check: how far the speaker alone predicts the emotion label.

Why it matters: per-speaker feature normalisation (``normalization="speaker"``) subtracts each
speaker's own mean and divides by their own standard deviation. When a speaker shows one emotion
only, that mean *is* the emotion's mean for that speaker, so the normalisation removes exactly
what is to be recognised. On a natural-speech corpus where 24 of 29 speakers showed a single
emotion, a logistic regression on per-utterance feature statistics fell from 52 % to 17 % WA
with per-speaker normalisation (issue 15); ``tests/test_baseline.py`` reproduces the collapse on
the speaker-confounded synthetic corpus (``python -m data_prep synth --speaker-confound 0.8``).

Numbers (:func:`speaker_label_confound`, from the (speaker, label) pairs of the *training*
utterances):

* ``single_class_share``: share of speakers whose utterances all carry one label. This is the
  mechanism itself: for each such speaker, per-speaker normalisation erases the class mean.
  ``single_class_share_if_independent`` is its expectation if labels were drawn independently
  of speakers with the observed class proportions (``mean_s sum_c p_c ** n_s``): speakers with
  one or two utterances are single-class by chance, so read the share against it.
* ``mutual_information`` I(speaker; label) in nats, ``nmi`` = I / ((H(speaker) + H(label)) / 2)
  (scikit-learn's default "arithmetic" normalised mutual information, for comparison with other
  tools) and ``label_entropy_explained`` = I / H(label): the fraction of the label's uncertainty
  that knowing the speaker removes (1 = the speaker determines the label). The arithmetic NMI
  cannot reach 1 when there are more speakers than classes (H(speaker) > H(label)), so the
  thresholds use ``label_entropy_explained``. Both are plug-in estimates and biased upwards when
  speakers have few utterances each.
* ``speaker_majority_accuracy``: share of utterances whose label is their speaker's most frequent
  label (in-sample: how often "guess the speaker's usual emotion" is right), next to
  ``majority_class_share`` (how often "guess the most frequent class" is right).

Strength (:func:`confound_strength`): "strong" when ``single_class_share >= 0.5`` or
``label_entropy_explained >= 0.5``, i.e. when at least half of the training speakers lose their
whole class signal under per-speaker normalisation, or when the speaker already tells more than
half of what there is to know about the label; "moderate" from 0.2 on either; "weak" below.
:func:`normalization_warning` turns that into a loud warning text for ``normalization="speaker"``.

Entropies use natural logarithms and the conventions of ``sklearn.metrics``: NMI of two
labellings that both have a single value is 1, otherwise NMI is 0 whenever I = 0. Everything
here is pure NumPy (arrays in, JSON-ready dict or text out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MODERATE_THRESHOLD",
    "STRONG_THRESHOLD",
    "confound_from_metadata",
    "confound_strength",
    "contingency",
    "entropy",
    "mutual_information",
    "normalization_warning",
    "normalized_mutual_information",
    "speaker_label_confound",
]

STRONG_THRESHOLD = 0.5
"""single_class_share or label_entropy_explained at or above this: a strong confound."""
MODERATE_THRESHOLD = 0.2
"""single_class_share or label_entropy_explained at or above this: a moderate confound."""

_AVERAGES = ("arithmetic", "geometric", "min", "max")


def contingency(a: Sequence, b: Sequence) -> np.ndarray:
    """Counts ``n[i, j]`` of pairs with the i-th distinct value of ``a`` and j-th of ``b``.

    Args:
      a, b: [N] labellings (any hashable values that NumPy can sort, e.g. str or int).

    Returns:
      [len(unique(a)), len(unique(b))] int64 (rows/columns in sorted value order).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"labellings must be two 1-D arrays of equal length, got {a.shape}, {b.shape}"
        )
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    n = np.zeros((int(ia.max(initial=-1)) + 1, int(ib.max(initial=-1)) + 1), np.int64)
    np.add.at(n, (ia, ib), 1)
    return n


def entropy(counts) -> float:
    """Shannon entropy (nats) of a distribution given by non-negative counts; 0 for no counts."""
    c = np.asarray(counts, np.float64).ravel()
    c = c[c > 0]
    total = c.sum()
    if total == 0:
        return 0.0
    p = c / total
    return float(-(p * np.log(p)).sum())


def mutual_information(a: Sequence, b: Sequence) -> float:
    """Plug-in mutual information I(a; b) in nats: ``sum_ij p_ij log(p_ij / (p_i p_j))``."""
    n = contingency(a, b).astype(np.float64)
    total = n.sum()
    if total == 0:
        return 0.0
    p = n / total
    pa = p.sum(axis=1, keepdims=True)
    pb = p.sum(axis=0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum())
    return max(mi, 0.0)


def normalized_mutual_information(
    a: Sequence, b: Sequence, *, average: str = "arithmetic"
) -> float:
    """I(a; b) divided by a mean of H(a) and H(b) ("arithmetic", "geometric", "min", "max").

    Same conventions as ``sklearn.metrics.normalized_mutual_info_score``: 1 when both
    labellings take a single value (or are empty), 0 when I = 0.
    """
    if average not in _AVERAGES:
        raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
    n = contingency(a, b)
    if n.shape[0] == n.shape[1] and n.shape[0] <= 1:
        return 1.0
    mi = mutual_information(a, b)
    if mi == 0.0:
        return 0.0
    ha, hb = entropy(n.sum(axis=1)), entropy(n.sum(axis=0))
    norm = {
        "arithmetic": (ha + hb) / 2,
        "geometric": float(np.sqrt(ha * hb)),
        "min": min(ha, hb),
        "max": max(ha, hb),
    }[average]
    return float(mi / norm)


def speaker_label_confound(
    speakers: Sequence[str], labels: Sequence, *, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """How far the speaker predicts the label, from the (speaker, label) pairs of utterances.

    Args:
      speakers: [N] speaker of each (training) utterance.
      labels: [N] label (class id or name) of each utterance.
      label_names: optional names for class ids (used in ``single_class_speakers``).

    Returns:
      JSON-ready dict: ``num_utterances``, ``num_speakers``, ``num_classes`` (present),
      ``single_class_speakers`` (sorted {speaker: label}), ``single_class_share``,
      ``single_class_share_if_independent``, ``mutual_information`` (nats), ``nmi``
      (arithmetic), ``label_entropy_explained`` (I / H(label); None with one class),
      ``speaker_majority_accuracy``, ``majority_class_share`` and ``strength``
      (see :func:`confound_strength`).

    Raises:
      ValueError: no utterances, or speakers and labels of different lengths.
    """
    spk = np.asarray([str(s) for s in speakers])
    lab = np.asarray(labels)
    if spk.shape[0] != lab.shape[0]:
        raise ValueError(f"got {spk.shape[0]} speakers for {lab.shape[0]} labels")
    if spk.shape[0] == 0:
        raise ValueError("confound check needs at least one utterance")
    n = contingency(spk, lab)  # [S, C]
    speaker_names = np.unique(spk)
    class_values = np.unique(lab)
    per_speaker = n.sum(axis=1)
    classes_per_speaker = (n > 0).sum(axis=1)
    single = classes_per_speaker == 1

    def name(value) -> str:
        if label_names is not None and np.issubdtype(np.asarray(value).dtype, np.integer):
            return str(label_names[int(value)])
        return str(value)

    p_class = n.sum(axis=0) / n.sum()
    chance = np.array([float((p_class**k).sum()) for k in per_speaker])
    h_label = entropy(n.sum(axis=0))
    mi = mutual_information(spk, lab)
    out = {
        "num_utterances": int(n.sum()),
        "num_speakers": int(n.shape[0]),
        "num_classes": int(n.shape[1]),
        "single_class_speakers": {
            str(speaker_names[i]): name(class_values[int(np.argmax(n[i]))])
            for i in np.flatnonzero(single)
        },
        "single_class_share": float(single.mean()),
        "single_class_share_if_independent": float(chance.mean()),
        "mutual_information": mi,
        "nmi": normalized_mutual_information(spk, lab),
        "label_entropy_explained": None if h_label == 0 else min(float(mi / h_label), 1.0),
        "speaker_majority_accuracy": float(n.max(axis=1).sum() / n.sum()),
        "majority_class_share": float(n.sum(axis=0).max() / n.sum()),
    }
    out["strength"] = confound_strength(out)
    return out


def confound_from_metadata(
    metadata: Mapping[str, Any], utterance_ids: Sequence[str]
) -> dict[str, Any]:
    """:func:`speaker_label_confound` of the given utterances of a prep's ``metadata.json``.

    Raises:
      ValueError: an utterance id that the metadata does not list (the first few are named).
    """
    rows = {str(u["utterance_id"]): u for u in metadata.get("utterances", ())}
    missing = [i for i in utterance_ids if str(i) not in rows]
    if missing:
        raise ValueError(
            f"{len(missing)} utterance id(s) not in the prep's metadata, e.g. {missing[:3]}"
        )
    chosen = [rows[str(i)] for i in utterance_ids]
    return speaker_label_confound(
        [u["speaker"] for u in chosen],
        [int(u["label"]) for u in chosen],
        label_names=metadata.get("label_names"),
    )


def confound_strength(confound: Mapping[str, Any]) -> str:
    """ "strong", "moderate" or "weak" from ``single_class_share`` and ``label_entropy_explained``
    (thresholds :data:`STRONG_THRESHOLD`, :data:`MODERATE_THRESHOLD`; see the module docstring)."""
    values = [confound["single_class_share"], confound.get("label_entropy_explained")]
    top = max(float(v) for v in values if v is not None)
    if top >= STRONG_THRESHOLD:
        return "strong"
    if top >= MODERATE_THRESHOLD:
        return "moderate"
    return "weak"


def normalization_warning(confound: Mapping[str, Any], normalization: str) -> str | None:
    """The warning to print before training, or None.

    Args:
      confound: :func:`speaker_label_confound` of the training split.
      normalization: the run's feature normalisation ("none", "global", "utterance", "speaker").

    Returns:
      With ``normalization == "speaker"``: a multi-line, loud warning for a strong confound, a
      one-line note for a moderate one, None for a weak one. None for every other normalisation.
    """
    if normalization != "speaker":
        return None
    strength = confound_strength(confound)
    if strength == "weak":
        return None
    share = confound["single_class_share"]
    chance = confound["single_class_share_if_independent"]
    explained = confound.get("label_entropy_explained")
    speakers = (
        f"{len(confound['single_class_speakers'])} of {confound['num_speakers']} training "
        f"speakers ({100 * share:.0f} %; {100 * chance:.0f} % expected by chance) show one "
        "emotion only"
    )
    entropy_text = (
        "one class only (no label entropy to explain)"
        if explained is None
        else f"the speaker explains {100 * explained:.0f} % of the label entropy"
    )
    if strength == "moderate":
        return (
            f"note: speaker and label are moderately confounded ({speakers}; {entropy_text}); "
            "per-speaker normalisation may remove part of the emotion signal."
        )
    bar = "!" * 78
    return "\n".join(
        [
            bar,
            "WARNING: normalization=speaker on a corpus where the speaker predicts the emotion.",
            f"  {speakers};",
            f"  {entropy_text}.",
            "  Per-speaker normalisation subtracts each speaker's own mean: for a speaker who",
            "  shows one emotion only, that mean IS the emotion, so it is removed before the model",
            "  sees it; accuracy can fall to chance. Use normalization=global, or choose the",
            "  normalisation by inner cross-validation on the training speakers",
            "  (experiment --validation-only).",
            bar,
        ]
    )


def held_out_note(
    metadata: Mapping[str, Any], train_ids: Sequence[str], test_ids: Sequence[str]
) -> str | None:
    """For ``normalization=speaker``: a note naming the held-out (test) speakers absent from
    training who show one emotion only: their features are normalised with their own test
    statistics, which removes that emotion's level, whatever the training speakers look like.
    None otherwise (a speaker also in training uses its training statistics)."""
    if not test_ids:
        return None
    speaker = {str(u["utterance_id"]): str(u["speaker"]) for u in metadata.get("utterances", ())}
    trained = {speaker.get(str(i)) for i in train_ids}
    alone = [i for i in test_ids if speaker.get(str(i)) not in trained]
    if not alone:  # every held-out speaker is normalised with its training statistics
        return None
    numbers = confound_from_metadata(metadata, alone)
    single = numbers["single_class_speakers"]
    if not single:
        return None
    listed = ", ".join(f"{spk} ({label})" for spk, label in list(single.items())[:5])
    more = f" and {len(single) - 5} more" if len(single) > 5 else ""
    return (
        f"note: {len(single)} of {numbers['num_speakers']} held-out speakers show one emotion "
        f"only: {listed}{more}; normalization=speaker takes their statistics from their own "
        "test utterances, which removes that emotion's level: their scores say little"
    )
