"""Train/test protocols: which utterances a run trains on and which it is scored on.

This module owns the split rules (DESIGN.md §4); ``run_dir`` stores a run's split in its
``split.json``:

* ``"loso"``: leave one session out. Sessions are sorted by name and fold ``k`` holds out
  ``sessions[k]``; every utterance of that session is a test utterance, so no speaker of the
  test set is seen in training (IEMOCAP: one session = one speaker pair).
* ``"paper"``: the lineage protocol, a random 80/20 *utterance* split (speakers overlap) of the
  *improvised* dialogs when the prep records dialogs (IEMOCAP; scripted ones are neither trained
  on nor scored), of every utterance when it does not (EmoDB, CSV manifests). The permutation
  comes from a NumPy ``Generator`` seeded with (seed, the prep's content hash), so it is a
  deterministic function of the seed and the data and changes when the data change.
* ``"none"``: every utterance trains, nothing is held out.

A validation hold-out (:func:`hold_out_validation`) is carved from the *training* utterances only,
by whole speakers or by utterances, so checkpoint selection never looks at the test set.

Every function here is pure (metadata dict in, :class:`Split` out).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PROTOCOLS",
    "Split",
    "hold_out_validation",
    "make_split",
    "num_folds",
    "split_for_run",
    "untrained_classes",
]

PROTOCOLS = ("loso", "paper", "none")
IMPROVISED = "improvised"  # an IEMOCAP utterance's "dialog" in the prep metadata
PAPER_TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Split:
    """Utterance ids of one split (each tuple sorted).

    Attributes:
      train_ids: utterances the model trains on.
      test_ids: held-out utterances the run is scored on.
      name: human-readable name, e.g. "loso-fold0-Ses01" or "paper-seed111111".
      validation_ids: training-side utterances held out for checkpoint selection (not trained on).
    """

    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    name: str
    validation_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name,
            "train_ids": list(self.train_ids),
            "test_ids": list(self.test_ids),
            "validation_ids": list(self.validation_ids),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Split:
        """Inverse of :meth:`to_dict`."""
        return cls(
            train_ids=tuple(d["train_ids"]),
            test_ids=tuple(d["test_ids"]),
            name=str(d["name"]),
            validation_ids=tuple(d.get("validation_ids", ())),
        )


def _utterances(metadata: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    utts = metadata.get("utterances")
    if not utts:
        raise ValueError("metadata has no utterances: the prep directory is empty")
    ids = [u["utterance_id"] for u in utts]
    if len(set(ids)) != len(ids):
        raise ValueError("metadata lists duplicate utterance ids")
    return list(utts)


def _content_seed(metadata: Mapping[str, Any]) -> list[int]:
    h = metadata.get("content_hash")
    if not isinstance(h, str) or not h:
        raise ValueError("metadata has no content_hash (re-run data_prep)")
    digits = "".join(c for c in h.lower() if c in "0123456789abcdef")
    if not digits:
        raise ValueError(f"metadata content_hash {h!r} is not hexadecimal")
    digits = digits[:32].ljust(32, "0")
    return [int(digits[i : i + 8], 16) for i in range(0, 32, 8)]


def _rng(seed: int, metadata: Mapping[str, Any], salt: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([int(seed), salt, *_content_seed(metadata)])


def sessions(metadata: Mapping[str, Any]) -> list[str]:
    """Sorted distinct session names of the prep."""
    return sorted({str(u["session"]) for u in _utterances(metadata)})


def untrained_classes(metadata: Mapping[str, Any], split: Split) -> list[str]:
    """The prep's classes (``label_names``) with no utterance among ``split.train_ids``: a model
    cannot learn them (never predicts them), and UA still averages their recall of 0 wherever
    the test set holds them. Common when a class comes from one speaker or session only."""
    names = [str(n) for n in metadata.get("label_names", ())]
    trained = set(_class_counts(metadata, split.train_ids))
    return [n for c, n in enumerate(names) if c not in trained]


def _class_counts(metadata: Mapping[str, Any], ids) -> collections.Counter:
    """{label id: utterances among ``ids``}."""
    label = {str(u["utterance_id"]): int(u["label"]) for u in _utterances(metadata)}
    return collections.Counter(label[str(i)] for i in ids if str(i) in label)


def untrained_warning(
    metadata: Mapping[str, Any], split: Split, *, test_counts: bool = True
) -> str | None:
    """One line naming :func:`untrained_classes` and how many test utterances hold each
    (``test_counts``; off when choosing settings without looking at the test set), or None
    when every class trains."""
    missing = untrained_classes(metadata, split)
    if not missing:
        return None
    if not test_counts:
        return (
            f"warning: {split.name} trains on no utterance of {', '.join(missing)}: the model "
            "cannot predict what it never saw (a class from one speaker or session only?)"
        )
    names = [str(n) for n in metadata.get("label_names", ())]
    tested = _class_counts(metadata, split.test_ids)
    counts = [tested[names.index(n)] for n in missing]
    listed = ", ".join(f"{n} ({k} in the test set)" for n, k in zip(missing, counts, strict=True))
    scored = " and UA counts a recall of 0 for each one tested" if any(counts) else ""
    return (
        f"warning: {split.name} trains on no utterance of {listed}: the model cannot predict "
        f"what it never saw{scored} (a class from one speaker or session only?)"
    )


def num_folds(metadata: Mapping[str, Any], protocol: str) -> int:
    """Number of folds of a protocol: sessions for "loso", 1 otherwise."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    return len(sessions(metadata)) if protocol == "loso" else 1


def _check_speakers_disjoint(utts, held: str) -> None:
    """A held-out session's speakers must be absent from training (data_prep refuses manifests
    where a speaker spans sessions; a prep made before that check may still hold one)."""
    test_speakers = {str(u["speaker"]) for u in utts if str(u["session"]) == held}
    seen = {str(u["speaker"]): str(u["session"]) for u in utts if str(u["session"]) != held}
    both = sorted(test_speakers & set(seen))
    if both:
        listed = ", ".join(f"{s} (also in session {seen[s]})" for s in both[:5])
        raise ValueError(
            f"loso fold holding out session {held!r} would test on speakers it trains on: "
            f"{listed}; prepare the corpus again with every speaker in one session"
        )


def make_split(
    metadata: Mapping[str, Any], *, protocol: str = "loso", fold: int = 0, seed: int = 0
) -> Split:
    """Splits a prep's utterances into train and test.

    Args:
      metadata: ``records.load_metadata(prep_dir)`` (uses "utterances" and "content_hash").
      protocol: "loso" | "paper" | "none".
      fold: loso: index of the held-out session in the sorted session list.
      seed: paper: seed of the random 80/20 utterance split (of the improvised dialogs when the
        prep records dialogs).

    Returns:
      A Split, deterministic in (protocol, fold or seed, metadata content hash).

    Raises:
      ValueError: unknown protocol, fold out of range, fewer than 2 sessions (loso), a held-out
        speaker also in a training session (loso), fewer than 2 utterances or only scripted
        dialogs (paper), missing content hash.
    """
    utts = _utterances(metadata)
    ids = sorted(str(u["utterance_id"]) for u in utts)
    if protocol == "none":
        return Split(train_ids=tuple(ids), test_ids=(), name="all")
    if protocol == "loso":
        names = sessions(metadata)
        if len(names) < 2:
            raise ValueError(f"loso needs at least 2 sessions, the prep has {names}")
        if not 0 <= fold < len(names):
            raise ValueError(f"loso fold {fold} out of range: {len(names)} sessions {names}")
        held = names[fold]
        test = sorted(str(u["utterance_id"]) for u in utts if str(u["session"]) == held)
        train = sorted(set(ids) - set(test))
        _check_speakers_disjoint(utts, held)
        return Split(tuple(train), tuple(test), name=f"loso-fold{fold}-{held}")
    if protocol == "paper":
        ids = _paper_pool(utts)
        if len(ids) < 2:
            raise ValueError(f"paper split needs at least 2 utterances, got {len(ids)}")
        rng = _rng(seed, metadata, salt=1)
        order = rng.permutation(len(ids))
        num_test = min(max(int(np.floor(PAPER_TEST_FRACTION * len(ids) + 0.5)), 1), len(ids) - 1)
        test = sorted(ids[i] for i in order[:num_test])
        train = sorted(ids[i] for i in order[num_test:])
        return Split(tuple(train), tuple(test), name=f"paper-seed{seed}")
    raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")


def _paper_pool(utts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The utterances the paper protocol splits: the improvised dialogs of a prep that records
    dialogs (the lineage filters on ``impro``, paper_spec.md §1.1), else every utterance."""
    dialogs = {str(u.get("dialog") or "") for u in utts}
    if dialogs <= {""}:  # no dialog information (EmoDB, CSV manifests)
        return sorted(str(u["utterance_id"]) for u in utts)
    if IMPROVISED not in dialogs:
        kinds = ", ".join(sorted(d or "<none>" for d in dialogs))
        raise ValueError(
            f"the paper protocol trains and tests on improvised dialogs; this prep has {kinds} "
            "only (prepare the corpus with --dialogs all or improvised, or use --protocol loso)"
        )
    return sorted(str(u["utterance_id"]) for u in utts if u.get("dialog") == IMPROVISED)


def hold_out_validation(
    split: Split,
    metadata: Mapping[str, Any],
    *,
    mode: str,
    fraction: float,
    seed: int,
) -> Split:
    """Moves a fraction of the training utterances to a validation hold-out.

    Args:
      split: the protocol's split.
      metadata: the prep metadata (speakers of the utterances).
      mode: "none" (returns ``split``), "speaker" (whole training speakers, at least one, never
        all) or "utterance" (random training utterances, at least one, never all).
      fraction: fraction of training speakers / utterances to hold out, in (0, 1).
      seed: seed of the choice (combined with the content hash).

    Returns:
      The split with ``validation_ids`` set and removed from ``train_ids``.
    """
    if mode == "none":
        return split
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = _rng(seed, metadata, salt=2)
    train = list(split.train_ids)
    if mode == "speaker":
        speaker_of = {str(u["utterance_id"]): str(u["speaker"]) for u in _utterances(metadata)}
        speakers = sorted({speaker_of[i] for i in train})
        if len(speakers) < 2:
            raise ValueError(f"speaker validation needs >= 2 training speakers, got {speakers}")
        k = min(max(round(fraction * len(speakers)), 1), len(speakers) - 1)
        held = {speakers[i] for i in rng.permutation(len(speakers))[:k]}
        val = sorted(i for i in train if speaker_of[i] in held)
    elif mode == "utterance":
        if len(train) < 2:
            raise ValueError(
                f"utterance validation needs >= 2 training utterances, got {len(train)}"
            )
        k = min(max(round(fraction * len(train)), 1), len(train) - 1)
        val = sorted(train[i] for i in rng.permutation(len(train))[:k])
    else:
        raise ValueError(f"unknown validation mode {mode!r}; known: none, speaker, utterance")
    rest = sorted(set(train) - set(val))
    return Split(tuple(rest), split.test_ids, f"{split.name}-val{mode}", tuple(val))


def split_for_run(metadata: Mapping[str, Any], data_config: Any) -> Split:
    """The split of a run: the protocol's split with its validation hold-out, checked disjoint.

    Args:
      metadata: the prep metadata.
      data_config: a ``config.DataConfig`` (protocol, fold, split_seed, validation,
        validation_fraction).
    """
    d = data_config
    split = make_split(metadata, protocol=d.protocol, fold=d.fold, seed=d.split_seed)
    split = hold_out_validation(
        split, metadata, mode=d.validation, fraction=d.validation_fraction, seed=d.split_seed
    )
    check_disjoint(split)
    return split


def check_disjoint(split: Split) -> None:
    """Raises ValueError if any utterance is in two of train/validation/test."""
    groups: Sequence[tuple[str, tuple[str, ...]]] = (
        ("train", split.train_ids),
        ("validation", split.validation_ids),
        ("test", split.test_ids),
    )
    for i, (na, a) in enumerate(groups):
        for nb, b in groups[i + 1 :]:
            both = set(a) & set(b)
            if both:
                raise ValueError(
                    f"split {split.name}: {len(both)} utterance(s) in both {na} and {nb}"
                )
