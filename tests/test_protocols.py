"""Tests of dkd_jax.protocols: determinism, disjointness, speaker independence, split files."""

import pytest

from dkd_jax import protocols, run_dir


def _metadata(num_sessions=5, per_speaker=20, content_hash="sha256:" + "ab" * 32):
    utts = []
    for s in range(1, num_sessions + 1):
        for g in "FM":
            for i in range(per_speaker):
                utts.append(
                    {
                        "utterance_id": f"Ses{s:02d}{g}_u{i:03d}",
                        "label": i % 4,
                        "speaker": f"Ses{s:02d}{g}",
                        "session": f"Session{s}",
                    }
                )
    return {"utterances": utts, "content_hash": content_hash}


def _speakers(meta, ids):
    spk = {u["utterance_id"]: u["speaker"] for u in meta["utterances"]}
    return {spk[i] for i in ids}


@pytest.mark.parametrize("fold", range(5))
def test_loso_holds_out_one_session_and_its_speakers(fold):
    meta = _metadata()
    split = protocols.make_split(meta, protocol="loso", fold=fold)
    sessions = sorted({u["session"] for u in meta["utterances"]})
    held = {u["utterance_id"] for u in meta["utterances"] if u["session"] == sessions[fold]}
    assert set(split.test_ids) == held
    assert not set(split.train_ids) & set(split.test_ids)
    assert set(split.train_ids) | set(split.test_ids) == {
        u["utterance_id"] for u in meta["utterances"]
    }
    assert not _speakers(meta, split.train_ids) & _speakers(meta, split.test_ids)
    assert split.name == f"loso-fold{fold}-{sessions[fold]}"
    protocols.check_disjoint(split)


def test_loso_sorts_sessions_and_checks_the_fold():
    meta = _metadata(num_sessions=3)
    meta["utterances"].reverse()  # order of the metadata must not matter
    assert protocols.make_split(meta, protocol="loso", fold=0).name.endswith("Session1")
    assert protocols.num_folds(meta, "loso") == 3
    assert protocols.num_folds(meta, "paper") == 1
    with pytest.raises(ValueError, match="loso fold 3 out of range: 3 sessions"):
        protocols.make_split(meta, protocol="loso", fold=3)
    with pytest.raises(ValueError, match="at least 2 sessions"):
        protocols.make_split(_metadata(num_sessions=1), protocol="loso")


def test_loso_refuses_a_held_out_speaker_who_is_also_in_training():
    # A prep made before data_prep refused such manifests: speaker Ses02F also has rows in
    # Session1, so holding out either session would test on a speaker seen in training.
    meta = _metadata(num_sessions=3)
    meta["utterances"][0]["speaker"] = "Ses02F"  # a Session1 row
    for fold, other in ((0, "Session2"), (1, "Session1")):
        with pytest.raises(ValueError, match=f"Ses02F \\(also in session {other}\\)"):
            protocols.make_split(meta, protocol="loso", fold=fold)
    assert protocols.make_split(meta, protocol="loso", fold=2).name.endswith("Session3")


def test_paper_split_is_80_20_deterministic_and_seeded():
    meta = _metadata()
    a = protocols.make_split(meta, protocol="paper", seed=111111)
    b = protocols.make_split(
        dict(meta, utterances=list(reversed(meta["utterances"]))), protocol="paper", seed=111111
    )
    assert a == b  # a function of (seed, content), not of list order
    n = len(meta["utterances"])
    assert len(a.test_ids) == round(0.2 * n) and len(a.train_ids) == n - round(0.2 * n)
    assert not set(a.train_ids) & set(a.test_ids)
    c = protocols.make_split(meta, protocol="paper", seed=123456)
    assert set(c.test_ids) != set(a.test_ids)
    d = protocols.make_split(
        dict(meta, content_hash="sha256:" + "cd" * 32), protocol="paper", seed=111111
    )
    assert set(d.test_ids) != set(a.test_ids)  # other data, other split


def test_paper_split_keeps_the_improvised_dialogs_of_a_prep_that_records_them():
    meta = _metadata()
    for i, u in enumerate(meta["utterances"]):
        u["dialog"] = "improvised" if i % 3 else "scripted"
    improvised = {u["utterance_id"] for u in meta["utterances"] if u["dialog"] == "improvised"}
    split = protocols.make_split(meta, protocol="paper", seed=0)
    assert set(split.train_ids) | set(split.test_ids) == improvised  # the lineage's `impro`
    assert len(split.test_ids) == round(0.2 * len(improvised))
    for u in meta["utterances"]:  # a prep without dialog information splits everything
        u["dialog"] = ""
    assert len(protocols.make_split(meta, protocol="paper").train_ids) == 160
    for u in meta["utterances"]:
        u["dialog"] = "scripted"  # prepared with --dialogs scripted
    with pytest.raises(ValueError, match="improvised dialogs; this prep has scripted only"):
        protocols.make_split(meta, protocol="paper")
    assert len(protocols.make_split(meta, protocol="loso").train_ids) == 160  # loso: all


def test_classes_without_a_training_utterance_are_named():
    meta = _metadata(num_sessions=3)
    meta["label_names"] = ["neutral", "happy", "sad", "angry"]
    for u in meta["utterances"]:  # angry (3) only in Session1; sad (2) nowhere
        if (u["label"] == 3 and u["session"] != "Session1") or u["label"] == 2:
            u["label"] = 0
    held_angry = protocols.make_split(meta, protocol="loso", fold=0)  # holds Session1 out
    assert protocols.untrained_classes(meta, held_angry) == ["sad", "angry"]
    tested = sum(1 for u in meta["utterances"] if u["session"] == "Session1" and u["label"] == 3)
    assert protocols.untrained_warning(meta, held_angry) == (
        f"warning: loso-fold0-Session1 trains on no utterance of sad (0 in the test set), angry "
        f"({tested} in the test set): the model cannot predict what it never saw and UA counts "
        "a recall of 0 for each one tested (a class from one speaker or session only?)"
    )
    assert protocols.untrained_warning(meta, held_angry, test_counts=False) == (
        "warning: loso-fold0-Session1 trains on no utterance of sad, angry: the model cannot "
        "predict what it never saw (a class from one speaker or session only?)"
    )  # choosing settings (--validation-only): nothing about the test set
    other = protocols.make_split(meta, protocol="loso", fold=1)
    assert protocols.untrained_classes(meta, other) == ["sad"]
    assert "UA counts" not in protocols.untrained_warning(meta, other)  # sad: never tested
    for u in meta["utterances"]:
        u["label"] = int(u["utterance_id"][-1]) % 4
    assert protocols.untrained_warning(meta, other) is None


def test_none_trains_on_everything_and_bad_inputs_raise():
    meta = _metadata(num_sessions=2)
    s = protocols.make_split(meta, protocol="none")
    assert len(s.train_ids) == len(meta["utterances"]) and s.test_ids == ()
    with pytest.raises(ValueError, match="unknown protocol 'kfold'"):
        protocols.make_split(meta, protocol="kfold")
    with pytest.raises(ValueError, match="no utterances"):
        protocols.make_split({"utterances": [], "content_hash": "ab"}, protocol="none")
    with pytest.raises(ValueError, match="no content_hash"):
        protocols.make_split({"utterances": meta["utterances"]}, protocol="paper")
    dup = dict(meta, utterances=meta["utterances"] + meta["utterances"][:1])
    with pytest.raises(ValueError, match="duplicate utterance ids"):
        protocols.make_split(dup, protocol="none")


def test_speaker_validation_comes_from_training_speakers_only():
    meta = _metadata()
    split = protocols.make_split(meta, protocol="loso", fold=2)
    v = protocols.hold_out_validation(split, meta, mode="speaker", fraction=0.25, seed=0)
    protocols.check_disjoint(v)
    assert set(v.train_ids) | set(v.validation_ids) == set(split.train_ids)
    assert v.test_ids == split.test_ids
    assert len(_speakers(meta, v.validation_ids)) == 2  # round(0.25 * 8)
    assert not _speakers(meta, v.validation_ids) & _speakers(meta, v.train_ids)
    again = protocols.hold_out_validation(split, meta, mode="speaker", fraction=0.25, seed=0)
    assert again == v
    others = {
        protocols.hold_out_validation(
            split, meta, mode="speaker", fraction=0.25, seed=s
        ).validation_ids
        for s in range(1, 6)
    }
    assert len(others | {v.validation_ids}) > 1  # the seed chooses the speakers
    assert protocols.hold_out_validation(split, meta, mode="none", fraction=0.1, seed=0) is split


def test_utterance_validation_keeps_at_least_one_each_side():
    meta = _metadata(num_sessions=2, per_speaker=2)
    split = protocols.make_split(meta, protocol="loso", fold=0)  # 4 training utterances
    v = protocols.hold_out_validation(split, meta, mode="utterance", fraction=0.01, seed=0)
    assert len(v.validation_ids) == 1 and len(v.train_ids) == 3
    protocols.check_disjoint(v)
    with pytest.raises(ValueError, match="unknown validation mode"):
        protocols.hold_out_validation(split, meta, mode="session", fraction=0.1, seed=0)


def test_split_file_round_trip_and_leak_check(tmp_path):
    meta = _metadata(num_sessions=2)
    split = protocols.hold_out_validation(
        protocols.make_split(meta, protocol="loso", fold=1),
        meta,
        mode="utterance",
        fraction=0.2,
        seed=0,
    )
    run_dir.write_split(tmp_path, split, {"content_hash": "x"})
    back, info = run_dir.load_split(tmp_path)
    assert back == split and info == {"content_hash": "x"}
    with pytest.raises(run_dir.RunDirError, match="missing split file"):
        run_dir.load_split(tmp_path / "missing")
    (tmp_path / "split.json").write_text('{"train_ids": ')
    with pytest.raises(run_dir.RunDirError, match=r"split\.json: unreadable split file"):
        run_dir.load_split(tmp_path)
    leaky = protocols.Split(("a", "b"), ("b",), "leaky")
    with pytest.raises(ValueError, match="1 utterance\\(s\\) in both train and test"):
        protocols.check_disjoint(leaky)


def test_real_tiny_prep_loso(tiny_prep_dir):
    from dkd_jax import records

    meta = records.load_metadata(tiny_prep_dir)
    folds = protocols.num_folds(meta, "loso")
    assert folds >= 2
    seen = set()
    for fold in range(folds):
        split = protocols.make_split(meta, protocol="loso", fold=fold)
        assert not _speakers(meta, split.train_ids) & _speakers(meta, split.test_ids)
        seen |= set(split.test_ids)
    assert seen == {u["utterance_id"] for u in meta["utterances"]}  # every utterance tested once
