"""Tests for dkd_jax/baseline.py: per-utterance statistics against independent reconstructions
(audio recomputed from the WAVs, segments stitched on a timeline), the classifier against a
scikit-learn pipeline on the same matrix, edge cases, and the speaker-confound collapse on the
synthetic speaker-confounded corpus."""

from __future__ import annotations

import numpy as np
import pytest
import threadpoolctl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dkd_jax import audio, baseline, confound, input_pipeline, metrics, protocols, records

SMALL_GRID = (0.01, 1.0, 100.0)


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["logmel40", "mfcc26"])  # hop 40 frames / 12.5 frames
def test_coverage_counts_every_frame_once(preset):
    cfg = audio.FEATURE_PRESETS[preset]
    fpw = cfg.frames_per_window
    rng = np.random.default_rng(1)
    for total, valid in [(fpw, fpw), (fpw + 1, 70), (fpw + 39, None), (3 * fpw + 17, None)]:
        feats = rng.standard_normal((cfg.num_bins, total)).astype(np.float32)
        segs, vf = audio.segment_features(
            feats, cfg, hop_seconds=cfg.eval_hop_seconds, num_valid_frames=valid
        )
        k = np.arange(len(segs))
        frames = baseline.coverage_frames(
            k,
            vf,
            np.full(len(segs), len(segs)),
            hop_frames=cfg.hop_frames(cfg.eval_hop_seconds),
            frames_per_window=fpw,
        )
        c, s, q = input_pipeline.group_moments(segs, frames, np.zeros(len(segs), np.int64), 1)
        starts = audio.segment_starts(total, cfg, hop_seconds=cfg.eval_hop_seconds)
        n = min(total if valid is None else valid, int(starts[-1]) + fpw)
        ref = feats[:, :n].astype(np.float64)
        assert c[0] == n
        np.testing.assert_allclose(s[0], ref.sum(axis=1), rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(q[0], (ref * ref).sum(axis=1), rtol=1e-10, atol=1e-9)


def test_utterance_statistics_match_audio_and_stitched_segments(tiny_prep_dir):
    stats = baseline.utterance_statistics(tiny_prep_dir)
    meta = records.load_metadata(tiny_prep_dir)
    cfg = audio.FeatureConfig.from_dict(meta["feature_config"])
    assert stats.utterance_ids.tolist() == sorted(u["utterance_id"] for u in meta["utterances"])
    assert any(u["padded"] for u in meta["utterances"])  # short, zero-padded utterances included
    mean, std = np.split(
        baseline.statistics_features(stats, np.arange(len(stats.utterance_ids))), 2, 1
    )

    # Reference 1: features recomputed from the audio, frames up to the last complete window.
    for i, row in enumerate(sorted(meta["utterances"], key=lambda u: u["utterance_id"])):
        wave = audio.load_audio(records.audio_path(meta, row), sample_rate=cfg.sample_rate)
        padded, real = audio.pad_to_window(wave, cfg)
        feats = audio.compute_features(padded, cfg).astype(np.float64)
        starts = audio.segment_starts(feats.shape[1], cfg, hop_seconds=cfg.eval_hop_seconds)
        x = feats[:, : min(real, int(starts[-1]) + cfg.frames_per_window)]
        assert stats.count[i] == x.shape[1], row["utterance_id"]
        assert stats.labels[i] == row["label"] and stats.speakers[i] == row["speaker"]
        np.testing.assert_allclose(mean[i], x.mean(axis=1), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(std[i], x.std(axis=1), rtol=1e-6, atol=1e-5)

    # Reference 2: the eval segments written onto a timeline (overlaps overwrite equal values).
    arrays = records.load_split(tiny_prep_dir, "eval")
    hop = cfg.hop_frames(cfg.eval_hop_seconds)
    for i, utt in enumerate(stats.utterance_ids):
        sel = np.flatnonzero(arrays.utterance_ids == utt)
        line = np.full((cfg.num_bins, 4000), np.nan)
        for j in sel:
            start = int(np.round(arrays.segment_index[j] * hop))
            v = arrays.valid_frames[j]
            line[:, start : start + v] = arrays.features[j][:, :v]
        x = line[:, ~np.isnan(line[0])]
        assert stats.count[i] == x.shape[1]
        np.testing.assert_allclose(mean[i], x.mean(axis=1), rtol=1e-9, atol=1e-9)


def test_utterance_statistics_refuses_inconsistent_prep(tiny_prep_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "prep"
    shutil.copytree(tiny_prep_dir, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    meta["utterances"][0]["num_eval_segments"] += 1
    (bad / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(records.DataError, match=r"has \d+ eval segments in the shards"):
        baseline.utterance_statistics(bad)


# ------------------------------------------------------------------------------------------------
# Classifier on hand-made statistics
# ------------------------------------------------------------------------------------------------
def make_stats(means, stds, labels, speakers, *, frames=100, names=("a", "b", "c", "d")):
    """UtteranceStats whose utterances have the given per-band mean and std exactly."""
    means, stds = np.asarray(means, float), np.asarray(stds, float)
    n = len(labels)
    count = np.full(n, float(frames))
    total = means * frames
    total_sq = (stds**2 + means**2) * frames
    ids = np.array([f"u{i:04d}" for i in range(n)])
    return baseline.UtteranceStats(
        utterance_ids=ids,
        labels=np.asarray(labels, np.int64),
        speakers=np.asarray(speakers, dtype=str),
        count=count,
        total=total,
        total_sq=total_sq,
        label_names=tuple(names),
        layout="eval",
    )


def random_stats(seed=0, n=120, bands=3, speakers=8, separation=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    spk = np.array([f"s{i}" for i in rng.integers(0, speakers, n)])
    means = rng.standard_normal((n, bands)) + separation * np.eye(4, bands)[labels]
    stds = np.exp(0.3 * rng.standard_normal((n, bands))) + 0.2 * labels[:, None]
    return make_stats(means, stds, labels, spk), means, stds


def test_fit_matches_sklearn_pipeline():
    stats, means, stds = random_stats()
    ids = stats.utterance_ids
    train, test = ids[:90], ids[90:]
    x = np.concatenate([means, stds], axis=1)
    scaler_lr = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000))
    ref = scaler_lr.fit(x[:90], stats.labels[:90]).predict_proba(x[90:])
    res = baseline.fit_baseline(stats, train, test, c_grid=[0.3])
    got = np.array([p["probabilities"] for p in res["predictions"]])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    pred = ref.argmax(axis=1)
    cm = metrics.confusion_matrix(stats.labels[90:], pred, num_classes=4)
    assert res["wa"] == pytest.approx(metrics.weighted_accuracy(cm))
    assert res["ua"] == pytest.approx(metrics.unweighted_accuracy(cm))
    assert res["confusion_matrix"] == np.asarray(cm).tolist()
    assert [p["utterance_id"] for p in res["predictions"]] == test.tolist()
    assert res["C"] == 0.3 and res["c_selection"] == "inner-cv" and res["notes"] == []


def test_inner_cv_matches_sklearn_grouped_cv():
    stats, means, stds = random_stats(seed=3, separation=0.7)
    ids = stats.utterance_ids
    train_rows = np.flatnonzero(stats.speakers != "s0")
    test_rows = np.flatnonzero(stats.speakers == "s0")
    x = np.concatenate([means, stds], axis=1)[train_rows]
    y, groups = stats.labels[train_rows], stats.speakers[train_rows]
    res = baseline.fit_baseline(
        stats, ids[train_rows], ids[test_rows], inner_folds=4, c_grid=SMALL_GRID[::-1]
    )
    assert res["inner_cv"]["folds"] == 4 and res["inner_cv"]["num_speakers"] == 7
    scores = []
    with threadpoolctl.threadpool_limits(limits=1):  # tiny problem: threads only cost time
        for c in SMALL_GRID:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
            pred = cross_val_predict(model, x, y, groups=groups, cv=GroupKFold(n_splits=4))
            scores.append(balanced_accuracy_score(y, pred))
    got = [s["ua"] for s in res["inner_cv"]["scores"]]
    np.testing.assert_allclose(got, scores, atol=1e-12)
    assert res["C"] == SMALL_GRID[int(np.argmax(scores))]


def test_known_answer_and_determinism():
    # Band 0's mean is 10 * class: perfectly separable, whatever the speaker.
    n = 80
    labels = np.arange(n) % 4
    speakers = [f"s{i % 10}" for i in range(n)]
    rng = np.random.default_rng(0)
    means = np.stack([10.0 * labels + 0.1 * rng.standard_normal(n), rng.standard_normal(n)], 1)
    stats = make_stats(means, np.ones((n, 2)), labels, speakers)
    test = [u for u, s in zip(stats.utterance_ids, speakers, strict=True) if s in ("s0", "s1")]
    train = sorted(set(stats.utterance_ids) - set(test))
    a = baseline.fit_baseline(stats, train, test)
    assert a["wa"] == 1.0 and a["ua"] == 1.0 and a["absent_classes"] == []
    assert a == baseline.fit_baseline(stats, train[::-1], test[::-1])  # order-free, repeatable
    # Every speaker single-class and the class only in the mean: per-speaker normalisation
    # leaves identical features for all utterances, so one class is predicted for all.
    single = make_stats(
        np.stack([10.0 * labels, np.zeros(n)], 1),
        np.ones((n, 2)),
        labels,
        [f"s{c}{i % 3}" for i, c in enumerate(labels)],
    )
    test = [u for u, s in zip(single.utterance_ids, single.speakers, strict=True) if s[-1] == "0"]
    train = sorted(set(single.utterance_ids) - set(test))
    glob = baseline.fit_baseline(single, train, test, normalization="global")
    spk = baseline.fit_baseline(single, train, test, normalization="speaker")
    assert glob["wa"] == 1.0
    (only,) = {p["prediction"] for p in spk["predictions"]}
    share = np.mean([p["label"] == only for p in spk["predictions"]])
    assert spk["wa"] == pytest.approx(share) and share < 0.3


def test_speaker_normalization_formula():
    stats, means, stds = random_stats(seed=5, n=40, bands=2, speakers=3)
    rows = np.arange(40)
    train = rows[stats.speakers != "s2"]
    x = baseline.statistics_features(stats, rows, normalization="speaker", train_rows=train)
    for spk in ("s0", "s1", "s2"):
        r = np.flatnonzero(stats.speakers == spk)  # s2 is not in training: its own frames
        m_s = stats.total[r].sum(0) / stats.count[r].sum()
        var = stats.total_sq[r].sum(0) / stats.count[r].sum() - m_s**2
        s_s = np.sqrt(var + 1e-6)
        np.testing.assert_allclose(x[r, :2], (means[r] - m_s) / s_s, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(x[r, 2:], stds[r] / s_s, rtol=1e-9)
    # Training statistics only: s0's test utterances do not move s0's normalisation.
    some = rows[(stats.speakers == "s0")][:3]
    x2 = baseline.statistics_features(
        stats, rows, normalization="speaker", train_rows=np.setdiff1d(train, some)
    )
    assert not np.allclose(x2[some], x[some])


def test_edge_cases():
    stats, _, _ = random_stats(seed=2)
    ids, labels, spk = stats.utterance_ids, stats.labels, stats.speakers
    # A class missing from training: never predicted, probability 0, named in a note.
    train = ids[(labels != 3) & (spk != "s0")]
    test = ids[spk == "s0"]
    res = baseline.fit_baseline(stats, train, test, c_grid=SMALL_GRID)
    assert "d" not in res["train_classes"] and "never predicted: ['d']" in res["notes"][0]
    assert all(p["probabilities"][3] == 0.0 and p["prediction"] != "d" for p in res["predictions"])
    # Fewer training speakers than inner folds: one fold per speaker.
    train = ids[np.isin(spk, ["s1", "s2", "s3"])]
    res = baseline.fit_baseline(stats, train, test, c_grid=SMALL_GRID, inner_folds=5)
    assert res["inner_cv"]["folds"] == 3
    # One training speaker: no inner CV, the default C and a note.
    res = baseline.fit_baseline(stats, ids[spk == "s1"], test, c_grid=SMALL_GRID)
    assert res["C"] == baseline.DEFAULT_C and res["c_selection"] == "default"
    assert res["inner_cv"] is None and "one training speaker" in res["notes"][0]
    # One training class: that class everywhere.
    res = baseline.fit_baseline(stats, ids[(labels == 2) & (spk != "s0")], test)
    assert {p["prediction"] for p in res["predictions"]} == {"c"}
    assert res["per_class"]["c"]["predicted"] == len(test)
    # Bad input.
    with pytest.raises(ValueError, match="no test utterances"):
        baseline.fit_baseline(stats, ids, [])
    with pytest.raises(ValueError, match="no training utterances"):
        baseline.fit_baseline(stats, [], ids)
    with pytest.raises(ValueError, match="in both train and test"):
        baseline.fit_baseline(stats, ids[:5], ids[4:9])
    with pytest.raises(ValueError, match=r"not in the prep's statistics, e.g. \['nope'\]"):
        baseline.fit_baseline(stats, ["nope", *ids[:5]], ids[5:9])
    with pytest.raises(ValueError, match="normalization must be one of"):
        baseline.fit_baseline(stats, ids[:50], ids[50:], normalization="utterance")
    with pytest.raises(ValueError, match="c_grid must hold positive"):
        baseline.fit_baseline(stats, ids[:50], ids[50:], c_grid=[0.0, 1.0])
    with pytest.raises(ValueError, match="inner_folds must be >= 2"):
        baseline.fit_baseline(stats, ids[:50], ids[50:], inner_folds=1)


# ------------------------------------------------------------------------------------------------
# The phenomenon of issue 15 on the speaker-confounded synthetic corpus
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def confounded_prep(tmp_path_factory):
    """10 sessions (20 speakers), 16 of whom show one emotion only; MFCC-26 prep."""
    import data_prep
    from data_prep import synth

    root = tmp_path_factory.mktemp("confounded_corpus")
    summary = synth.generate_corpus(
        root,
        size="tiny",
        seed=0,
        sessions=10,
        turns_per_dialog=6,
        speaker_confound=0.8,
        workers=1,
        progress=False,
    )
    assert len(summary["single_emotion_speakers"]) == 16
    out = tmp_path_factory.mktemp("confounded_prep")
    data_prep.prepare(
        "iemocap",
        out_dir=out,
        root=root,
        feature_config=audio.FEATURE_PRESETS["mfcc26"],
        workers=1,
        progress=False,
    )
    return out


def pooled_loso(prep_dir, normalization):
    meta = records.load_metadata(prep_dir)
    stats = baseline.utterance_statistics(prep_dir)
    cm = 0
    for fold in range(protocols.num_folds(meta, "loso")):
        split = protocols.make_split(meta, protocol="loso", fold=fold)
        res = baseline.run_baseline(
            prep_dir,
            split,
            normalization=normalization,
            stats=stats,
            c_grid=SMALL_GRID,
            inner_folds=3,
        )
        cm = cm + np.asarray(res["confusion_matrix"])
    return metrics.weighted_accuracy(cm)


def test_speaker_normalization_collapses_on_confounded_corpus(confounded_prep):
    meta = records.load_metadata(confounded_prep)
    split = protocols.make_split(meta, protocol="loso", fold=0)
    check = confound.confound_from_metadata(meta, split.train_ids)
    assert check["strength"] == "strong" and check["single_class_share"] >= 0.75
    assert "WARNING" in confound.normalization_warning(check, "speaker")
    wa_global = pooled_loso(confounded_prep, "global")
    wa_speaker = pooled_loso(confounded_prep, "speaker")
    # Measured (seed 0): global 0.54, speaker 0.26 (4 classes, chance about 0.25).
    assert wa_global >= 0.45
    assert wa_speaker <= 0.33
    assert wa_global - wa_speaker >= 0.2


def test_speaker_normalization_keeps_signal_without_confound(tiny_prep_dir):
    # Control: every tiny-corpus speaker shows every class; per-speaker normalisation then keeps
    # the emotion (measured 0.60 WA, 4 classes; pooled_loso(tiny_prep_dir, "global") gives 0.56).
    meta = records.load_metadata(tiny_prep_dir)
    check = confound.confound_from_metadata(meta, [u["utterance_id"] for u in meta["utterances"]])
    assert check["strength"] == "weak"
    assert pooled_loso(tiny_prep_dir, "speaker") >= 0.45
