"""Tests of data_prep: the IEMOCAP / EmoDB / CSV readers, every bad input, the CLI, metadata,
end-to-end features vs a NumPy reference, determinism and resume byte-identity."""

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import helpers_prep
import numpy as np
import pytest
import soundfile as sf

import data_prep
from data_prep import cli, pipeline, sources, summary
from data_prep import manifest as manifest_mod
from dkd_jax import audio, records

EMODB = "/work/shared/data/emodb"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def iemocap_root(tmp_path_factory):
    return helpers_prep.write_iemocap_tree(tmp_path_factory.mktemp("iemocap"))


@pytest.fixture(scope="module")
def prepared(iemocap_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    meta = data_prep.prepare(
        "iemocap", root=iemocap_root, out_dir=out, workers=1, progress=False, num_shards=3
    )
    return out, meta


# ---------------------------------------------------------------- IEMOCAP reader


def test_iemocap_reader_counts(iemocap_root):
    scan = sources.scan_iemocap(iemocap_root)
    ids = [u.utterance_id for u in scan.utterances]
    assert ids == sorted(ids) and len(ids) == 10
    assert scan.label_names == ["neutral", "happy", "sad", "angry"]
    by = {u.utterance_id: u for u in scan.utterances}
    assert by["Ses01F_impro01_M000"].label_name == "happy"  # exc -> happy (paper lineage)
    assert by["Ses01F_impro01_M000"].source_label == "exc"
    # Speaker = session + letter starting the last id part, whoever wore the markers.
    u = by["Ses02M_impro02_F000"]
    assert (u.speaker, u.gender, u.session, u.dialog) == (
        "Ses02F",
        "female",
        "Session2",
        "improvised",
    )
    assert by["Ses01F_script01_1_M000"].dialog == "scripted"
    assert by["Ses01F_script01_1_M000"].rel_path == os.path.join(
        "Session1", "sentences", "wav", "Ses01F_script01_1", "Ses01F_script01_1_M000.wav"
    )
    speakers = sorted({u.speaker for u in scan.utterances})
    assert speakers == ["Ses01F", "Ses01M", "Ses02F", "Ses02M"]
    labels = [u.label_name for u in scan.utterances]
    assert {n: labels.count(n) for n in scan.label_names} == {
        "neutral": 3,
        "happy": 2,
        "sad": 2,
        "angry": 3,
    }
    assert scan.excluded == {"label:fru": 1, "label:hap": 2, "label:xxx": 1}
    kinds = sorted((s["kind"], s["utterance_id"] or s["path"]) for s in scan.skipped)
    assert kinds == [
        ("missing_session", "Session3"),
        ("missing_session", "Session4"),
        ("missing_session", "Session5"),
        ("missing_wav", "Ses01F_script01_1_F001"),
        ("no_label", "Ses01F_script01_1_M001"),
        ("unknown_label", "Ses01F_impro01_M003"),
    ]
    assert not any("._" in s["path"] for s in scan.skipped)  # AppleDouble files ignored


@pytest.mark.parametrize(
    ("options", "n", "happy", "excluded"),
    [
        (
            {"dialogs": "improvised"},
            8,
            2,
            {"dialog:scripted": 4, "label:fru": 1, "label:hap": 1, "label:xxx": 1},
        ),
        ({"dialogs": "scripted"}, 2, 0, {"dialog:improvised": 11, "label:hap": 1}),
        ({"happy": "hap+exc"}, 12, 4, {"label:fru": 1, "label:xxx": 1}),
        ({"happy": "hap"}, 10, 2, {"label:exc": 2, "label:fru": 1, "label:xxx": 1}),
    ],
)
def test_iemocap_options(iemocap_root, options, n, happy, excluded):
    scan = sources.scan_iemocap(iemocap_root, **options)
    assert len(scan.utterances) == n
    assert sum(u.label_name == "happy" for u in scan.utterances) == happy
    assert scan.excluded == excluded


def test_cli_classes_empty_or_single_are_refused(iemocap_root, tmp_path, capsys):
    out = tmp_path / "o"
    for value, message in (("", "non-empty list of names"), ("neutral", "at least 2 classes")):
        assert (
            cli.main(["iemocap", "--root", iemocap_root, "--out", str(out), "--classes", value])
            == 2
        )
        assert message in capsys.readouterr().err  # "" used to prepare the default four
    assert not out.exists()


def test_iemocap_class_set(iemocap_root):
    scan = sources.scan_iemocap(iemocap_root, classes="angry,frustrated")
    assert scan.label_names == ["angry", "frustrated"]
    assert sorted(u.label for u in scan.utterances) == [0, 0, 0, 1]
    with pytest.raises(sources.PrepError, match="'bored'"):
        sources.scan_iemocap(iemocap_root, classes=["neutral", "bored"])
    # One class used to make a prep ("wrote DIR", exit 0) that no run could train on.
    with pytest.raises(sources.PrepError, match="a classifier needs at least 2 classes"):
        sources.scan_iemocap(iemocap_root, classes="neutral")
    with pytest.raises(sources.PrepError, match="happy must be"):
        sources.scan_iemocap(iemocap_root, happy="joy")


def test_iemocap_ignores_subfolder_files_and_bad_lines(tmp_path):
    root = helpers_prep.write_iemocap_tree(tmp_path)
    emo = tmp_path / "Session1" / "dialog" / "EmoEvaluation"
    # A label-looking line in a Categorical file must not be read (it names no WAV).
    with open(emo / "Categorical" / "Ses01F_impro01_e2_cat.txt", "a") as f:
        f.write("[1.0000 - 2.0000]\tSes01F_impro01_F099\tang\t[2.0, 2.0, 2.0]\n")
    with open(emo / "Ses01F_impro01.txt", "a") as f:
        f.write("[garbage line\n")
    scan = sources.scan_iemocap(root)
    assert len(scan.utterances) == 10
    assert not any(s["utterance_id"] == "Ses01F_impro01_F099" for s in scan.skipped)
    bad = [s for s in scan.skipped if s["kind"] == "malformed_label_line"]
    assert len(bad) == 1 and "[garbage line" in bad[0]["reason"]


def test_iemocap_bad_roots(tmp_path):
    with pytest.raises(sources.PrepError, match="not a folder"):
        sources.scan_iemocap(tmp_path / "nope")
    with pytest.raises(sources.PrepError, match=r"no Session1\.\.Session5 folders"):
        sources.scan_iemocap(tmp_path)
    (tmp_path / "Session2").mkdir()
    scan = sources.scan_iemocap(tmp_path)
    assert ("missing_labels", "Session2/dialog/EmoEvaluation") in {
        (s["kind"], s["path"]) for s in scan.skipped
    }
    with pytest.raises(sources.PrepError, match="nothing usable left"):
        data_prep.prepare("iemocap", root=tmp_path, out_dir=tmp_path / "o", progress=False)


def test_iemocap_root_one_level_off_names_the_release_folder(tmp_path):
    """An audit: the parent of IEMOCAP_full_release (or a folder unzipped into one of the same
    name), and a session folder, all gave the generic "no Session1..Session5 folders"."""
    release = Path(helpers_prep.write_iemocap_tree(tmp_path / "data" / "IEMOCAP_full_release"))
    with pytest.raises(sources.PrepError, match=f": pass {re.escape(str(release))}, which holds"):
        sources.scan_iemocap(tmp_path / "data")
    session = release / "Session1"
    with pytest.raises(sources.PrepError, match="is a session folder; pass its parent"):
        sources.scan_iemocap(session)


def test_iemocap_wavs_of_a_dialog_without_its_label_file_name_the_file(tmp_path):
    """An audit: deleting one EmoEvaluation file gave one "WAV has no label line" per turn
    (40-110 in a real dialog), never saying that the whole file is missing."""
    root = Path(helpers_prep.write_iemocap_tree(tmp_path / "a"))
    label_file = sorted((root / "Session1" / "dialog" / "EmoEvaluation").glob("Ses*.txt"))[0]
    label_file.unlink()
    dialog = label_file.stem
    scan = sources.scan_iemocap(root)
    reasons = {s["reason"] for s in scan.skipped if s["path"].split("/")[-2:-1] == [dialog]}
    assert reasons == {
        f"the dialog's label file Session1/dialog/EmoEvaluation/{dialog}.txt does not exist"
    }


def test_iemocap_lettered_dialogs_both_recordings_and_decoy_folders(tmp_path):
    """Real-corpus details the default fixture lacks (an audit): Session 3's lettered dialogs
    (Ses03M_impro05a, ..._impro08b), both actors' recordings (Ses03F_* and Ses03M_*) of one
    session, whole-dialog WAVs under dialog/wav and sentences/ForcedAlignment beside the
    sentence WAVs: read by turn, one speaker per actor, decoys never taken for utterances."""
    utts = (
        helpers_prep.FixtureUtt(3, "Ses03M_impro05a_F012", "ang", 2.2),
        helpers_prep.FixtureUtt(3, "Ses03M_impro08b_M000", "sad", 2.3),
        helpers_prep.FixtureUtt(3, "Ses03F_impro05a_F000", "neu", 2.4),
        helpers_prep.FixtureUtt(3, "Ses03F_script01_1_M001", "exc", 2.5),
    )
    root = Path(helpers_prep.write_iemocap_tree(tmp_path / "r", utts))
    (root / "Session3" / "dialog" / "wav").mkdir()
    sf.write(root / "Session3" / "dialog" / "wav" / "Ses03M_impro05a.wav", np.zeros(800), 16000)
    aligned = root / "Session3" / "sentences" / "ForcedAlignment" / "Ses03M_impro05a"
    aligned.mkdir(parents=True)
    (aligned / "Ses03M_impro05a_F012.wdseg").write_text("SFrm EFrm SegAScr Word\n")
    scan = sources.scan_iemocap(root)
    got = {(u.utterance_id, u.speaker, u.gender, u.dialog, u.label_name) for u in scan.utterances}
    assert got == {
        ("Ses03M_impro05a_F012", "Ses03F", "female", "improvised", "angry"),
        ("Ses03M_impro08b_M000", "Ses03M", "male", "improvised", "sad"),
        ("Ses03F_impro05a_F000", "Ses03F", "female", "improvised", "neutral"),
        ("Ses03F_script01_1_M001", "Ses03M", "male", "scripted", "happy"),
    }
    assert {s["kind"] for s in scan.skipped} == {"missing_session"}  # only 3 is written


def test_iemocap_odd_files_are_named_or_read(tmp_path):
    root = helpers_prep.write_iemocap_tree(tmp_path / "a")
    emo = tmp_path / "a" / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    before = sources.scan_iemocap(root)
    # A Windows editor's UTF-16 (with its byte-order mark) is read like the UTF-8 original.
    emo.write_bytes(emo.read_text().encode("utf-16"))
    assert sources.scan_iemocap(root) == before
    emo.write_bytes(emo.read_text(encoding="utf-16").encode("utf-16-le"))  # no mark: refused
    with pytest.raises(sources.PrepError, match=f"^{emo}: holds NUL bytes"):
        sources.scan_iemocap(root)
    # An id whose last part is empty was an IndexError traceback.
    emo.write_text(
        emo.read_bytes().decode("utf-16-le") + "[30.0 - 32.0]\tSes01F_impro01_\tneu\t[2, 3, 2]\n"
    )
    bad = [s for s in sources.scan_iemocap(root).skipped if s["kind"] == "bad_id"]
    assert [s["utterance_id"] for s in bad] == ["Ses01F_impro01_"]
    # A file whose name is not UTF-8 is skipped with its bytes escaped (metadata.json is JSON).
    wav_dir = tmp_path / "a" / "Session1" / "sentences" / "wav" / "Ses01F_impro01"
    odd = os.path.join(os.fsencode(wav_dir), b"Ses01F_impro01_F000_\xe9.wav")
    with open(odd, "wb") as f:
        f.write((wav_dir / "Ses01F_impro01_F000.wav").read_bytes())
    entry = next(s for s in sources.scan_iemocap(root).skipped if "\\xe9" in s["path"])
    assert entry["kind"] == "no_label" and entry["path"].endswith("F000_\\xe9.wav")
    out = data_prep.prepare("iemocap", root=root, out_dir=tmp_path / "p", progress=False)
    assert any(s["path"] == entry["path"] for s in out["skipped"])
    # A Session2 id filed under Session1 is skipped: its speaker would be in two sessions.
    emo.write_text(emo.read_text() + "[40.0 - 42.0]\tSes02F_impro01_F009\tneu\t[2, 3, 2]\n")
    wrong = [s for s in sources.scan_iemocap(root).skipped if s["kind"] == "wrong_session"]
    assert [s["utterance_id"] for s in wrong] == ["Ses02F_impro01_F009"]
    assert "the id names Session2 but its label line is in Session1" in wrong[0]["reason"]
    # A session folder in the wrong case is named (its utterances used to vanish).
    root_b = helpers_prep.write_iemocap_tree(tmp_path / "b")
    os.rename(tmp_path / "b" / "Session1", tmp_path / "b" / "session1")
    with pytest.raises(sources.PrepError, match="session1: named 'session1'; the release names"):
        sources.scan_iemocap(root_b)


def test_iemocap_label_files_sessions_and_wav_names_that_used_to_mislead(tmp_path):
    base = tmp_path / "base"
    helpers_prep.write_iemocap_tree(base)
    emo2 = base / "Session2" / "dialog" / "EmoEvaluation"
    kept = {u.utterance_id: u.label_name for u in sources.scan_iemocap(base).utterances}
    # A copy of a label file beside it, with the same labels: an extra file, no utterance lost.
    root = tmp_path / "same"
    shutil.copytree(base, root)
    emo = root / "Session2" / "dialog" / "EmoEvaluation"
    shutil.copy(emo / "Ses02M_impro02.txt", emo / "Ses02M_impro02 (copy).txt")
    scan = sources.scan_iemocap(root)
    assert {u.utterance_id: u.label_name for u in scan.utterances} == kept
    extra = [s for s in scan.skipped if s["kind"] == "duplicate_label_line"]
    assert len(extra) == 4 and "duplicate_label_line" in summary.NOT_UTTERANCES
    # ... with other labels (a stale copy, sorted first): which is right is not file order's
    (emo / "Ses02M_impro02 (copy).txt").write_text(
        (emo2 / "Ses02M_impro02.txt").read_text().replace("\tang\t", "\tneu\t")
    )
    with pytest.raises(sources.PrepError, match=r"Ses02M_impro02_M001 is labelled 'neu' in "
                       r".*\(copy\)\.txt and 'ang' in .*Ses02M_impro02\.txt"):  # fmt: skip
        sources.scan_iemocap(root)
    # A second copy of a session in another letter case is refused (its files were ignored).
    root = tmp_path / "twice"
    shutil.copytree(base, root)
    shutil.copytree(root / "Session1", root / "session1")
    with pytest.raises(sources.PrepError, match="named 'session1' beside 'Session1'"):
        sources.scan_iemocap(root)
    # A session without label files: its WAVs are listed (and counted), not lost unseen.
    root = tmp_path / "nolabels"
    shutil.copytree(base, root)
    shutil.rmtree(root / "Session2" / "dialog" / "EmoEvaluation")
    skipped = sources.scan_iemocap(root).skipped
    no_label = sorted(s["utterance_id"] for s in skipped if s["kind"] == "no_label")
    assert [i for i in no_label if i.startswith("Ses02")] == sorted(
        i for i in (n.stem for n in (base / "Session2").rglob("Ses02*.wav"))
    )
    # A WAV saved as .WAV is read; a label line that cannot be parsed is said as such.
    root = tmp_path / "odd"
    shutil.copytree(base, root)
    wav = root / "Session2" / "sentences" / "wav" / "Ses02M_impro02" / "Ses02M_impro02_M000.wav"
    wav.rename(wav.with_suffix(".WAV"))
    label_file = root / "Session2" / "dialog" / "EmoEvaluation" / "Ses02M_impro02.txt"
    text = label_file.read_text()
    line = next(ln for ln in text.splitlines() if "Ses02M_impro02_F000" in ln)
    label_file.write_text(text.replace(line, line + "\textra"))
    scan = sources.scan_iemocap(root)
    assert "Ses02M_impro02_M000" in {u.utterance_id for u in scan.utterances}
    reasons = {s["utterance_id"]: s["reason"] for s in scan.skipped if s["utterance_id"]}
    assert (
        reasons["Ses02M_impro02_F000"] == "its label line in dialog/EmoEvaluation cannot be parsed"
    )


# ---------------------------------------------------------------- EmoDB reader


def test_emodb_subfolders_duplicates_and_odd_names_are_skipped_with_reasons(tmp_path):
    tone = helpers_prep.tone(0.5, freq=200.0, seed=0)
    for name in ("03a01Fa.wav", "03a01Fa.WAV", "spk03/03a01Wa.wav", "03a02Fa.flac"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        sf.write(tmp_path / name, tone, 16000)
    with open(os.path.join(os.fsencode(tmp_path), b"\xdcbersicht.wav"), "wb") as f:
        f.write((tmp_path / "03a01Fa.wav").read_bytes())
    scan = sources.scan_emodb(tmp_path)
    assert [u.rel_path for u in scan.utterances] == ["03a01Fa.WAV"]  # sorted: "W" < "w"
    kinds = sorted((s["kind"], s["path"]) for s in scan.skipped)
    assert kinds == [
        ("bad_name", "\\xdcbersicht.wav"),
        ("duplicate", "03a01Fa.wav"),
        ("not_wav", "03a02Fa.flac"),  # other audio: said, not read
        ("subfolder", "spk03/03a01Wa.wav"),
    ]
    json.dumps(scan.skipped, ensure_ascii=False).encode("utf-8")  # writable into metadata.json
    (tmp_path / "wav").mkdir()  # the release's wav/ beside stray root files: which is meant?
    sf.write(tmp_path / "wav" / "08a01Na.wav", tone, 16000)
    with pytest.raises(sources.PrepError, match=r"\(3 WAV file\(s\)\) and .*/wav \(1\) hold WAVs"):
        sources.scan_emodb(tmp_path)  # it used to read the 3 at the root, skip wav/ as subfolder
    speakers = tmp_path / "by_speaker"  # one folder per speaker: named, with their counts
    for name in ("03/03a01Fa.wav", "03/03a02Fa.wav", "08/08a01Na.wav"):
        (speakers / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(speakers / name, tone, 16000)
    with pytest.raises(sources.PrepError, match=r"these subfolders hold WAVs: 03 \(2\), 08 \(1\)"):
        sources.scan_emodb(speakers)


@pytest.mark.skipif(not os.path.isdir(EMODB), reason="shared EmoDB copy not present")
def test_emodb_reader_against_labels_csv():
    scan = sources.scan_emodb(os.path.join(EMODB, "wav_2s_22k"))
    names = [u.label_name for u in scan.utterances]
    counts = {n: names.count(n) for n in scan.label_names}
    assert counts == {"neutral": 79, "happy": 71, "sad": 62, "angry": 127}  # README: 339 files
    assert sum(scan.excluded.values()) == 535 - 339
    assert set(scan.excluded) == {"label:A", "label:E", "label:L"}
    with open(os.path.join(EMODB, "labels.csv"), newline="") as f:
        table = {row["file"]: row for row in csv.DictReader(f)}
    emotion = {"anger": "angry", "happiness": "happy", "sadness": "sad", "neutral": "neutral"}
    for u in scan.utterances:
        row = table[u.utterance_id + ".wav"]
        assert int(row["speaker"]) == int(u.speaker)
        assert {"m": "male", "f": "female"}.get(row["gender"][:1].lower()) == u.gender
        assert emotion[row["emotion"]] == u.label_name
    sessions = {}
    for u in scan.utterances:
        sessions.setdefault(u.session, set()).add((u.speaker, u.gender))
    assert sessions["Session1"] == {("03", "male"), ("08", "female")}
    assert sessions["Session2"] == {("10", "male"), ("09", "female")}
    assert sorted(sessions) == [f"Session{i}" for i in range(1, 6)]
    assert all(len({g for _, g in s}) == 2 for s in sessions.values())


@pytest.mark.skipif(not os.path.isdir(EMODB), reason="shared EmoDB copy not present")
def test_emodb_prepare_resamples_22k(tmp_path):
    corpus = tmp_path / "emodb"
    corpus.mkdir()
    src = os.path.join(EMODB, "wav_2s_22k")
    picked = ["08a01Ab.wav", "08a01Fd.wav", "08a01Lc.wav", "08a01Na.wav", "08a01Wa.wav"]
    for name in picked:
        os.symlink(os.path.join(src, name), corpus / name)  # read in place, never copied
    (corpus / "notes.wav").write_bytes(b"")
    (corpus / "._08a01Fd.wav").write_bytes(b"\x00\x05\x16\x07")
    meta = data_prep.prepare(
        "emodb", root=corpus, out_dir=tmp_path / "out", workers=1, progress=False
    )
    assert [r["utterance_id"] for r in meta["utterances"]] == ["08a01Fd", "08a01Na", "08a01Wa"]
    assert meta["counts"]["by_class"] == {"neutral": 1, "happy": 1, "sad": 0, "angry": 1}
    assert meta["counts"]["excluded"] == {"label:A": 1, "label:L": 1}
    # The summary says what EmoDB's letters mean (it used to print "label:A 1").
    assert "  excluded: label:A (fearful) 1, label:L (bored) 1" in data_prep.prep_summary(meta)
    assert [(s["path"], s["kind"]) for s in meta["skipped"]] == [("notes.wav", "bad_name")]
    assert {(r["speaker"], r["session"], r["gender"]) for r in meta["utterances"]} == {
        ("08", "Session1", "female")
    }
    for row in meta["utterances"]:
        assert sf.info(os.path.join(src, row["utterance_id"] + ".wav")).samplerate == 22050
        assert abs(row["duration_s"] - 2.0) < 1e-3  # 2.000 s at 22.05 kHz -> 32000 samples
        assert (row["num_train_segments"], row["num_eval_segments"]) == (1, 1)


# ---------------------------------------------------------------- CSV manifest + bad inputs


def _bad_corpus(folder):
    """A CSV corpus with one file per odd input; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    sr = 16000
    tone = helpers_prep.tone
    sf.write(folder / "good.wav", tone(2.5), sr)
    sf.write(folder / "stereo.wav", np.stack([tone(2.2), tone(2.2, freq=330)], 1), sr)
    sf.write(folder / "eight_bit.wav", tone(2.1), sr, subtype="PCM_U8")
    sf.write(folder / "hi_rate.wav", tone(2.3, sample_rate=44100), 44100)
    sf.write(folder / "lo_rate.wav", tone(2.4, sample_rate=8000), 8000)
    sf.write(folder / "short.wav", tone(0.5), sr)
    nan = tone(2.2)
    nan[100:110] = np.nan
    sf.write(folder / "nan.wav", nan, sr, subtype="FLOAT")
    sf.write(folder / "zero_length.wav", np.zeros(0, np.float32), sr)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.wav").write_bytes(b"RIFF$\x00\x00\x00WAVEfmt " + os.urandom(64))
    (folder / "sub").mkdir(exist_ok=True)
    sf.write(folder / "sub" / "nested.wav", tone(3.0), sr)
    rows = [
        ("good.wav", "neutral", "spk1", "s1", "F"),
        ("stereo.wav", "Happy", "spk1", "s1", "f"),
        ("eight_bit.wav", "sad", "spk2", "s1", "male"),
        ("hi_rate.wav", "angry", "spk2", "s1", "M"),
        ("lo_rate.wav", "neutral", "spk3", "", ""),
        ("short.wav", "sad", "spk3", "", ""),
        ("nan.wav", "angry", "spk3", "", ""),
        ("zero_length.wav", "happy", "spk1", "s1", ""),
        ("empty.wav", "happy", "spk1", "s1", ""),
        ("corrupt.wav", "happy", "spk1", "s1", ""),
        ("missing.wav", "sad", "spk1", "s1", ""),
        ("good.wav", "frustrated", "spk1", "s1", ""),
        ("sub/nested.wav", "angry", "spk4", "s2", "m"),
        (str(folder / "good.wav"), "neutral", "spk9", "s9", ""),  # absolute path, same file
    ]
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "speaker", "session", "gender"])
        w.writerows(rows)
    return manifest


def test_csv_bad_inputs_are_handled(tmp_path):
    manifest = _bad_corpus(tmp_path / "corpus")
    meta = data_prep.prepare(
        "csv",
        manifest=manifest,
        out_dir=tmp_path / "out",
        workers=1,
        progress=False,
        exclude_labels="frustrated",
        duplicates="keep-first",
    )
    kept = {r["utterance_id"]: r for r in meta["utterances"]}
    absolute = str(tmp_path / "corpus" / "good.wav")
    expected = ["good", "stereo", "eight_bit", "hi_rate", "lo_rate", "short", "sub/nested"]
    assert sorted(kept) == sorted(f"{e}.wav" for e in expected)  # ids keep the extension
    skipped = {s["utterance_id"]: s for s in meta["skipped"]}
    assert {u: s["kind"] for u, s in skipped.items()} == {
        "nan.wav": "non_finite",
        "zero_length.wav": "no_samples",
        "empty.wav": "empty",
        "corrupt.wav": "unreadable",
        "missing.wav": "missing_wav",
        absolute: "duplicate_path",  # the absolute spelling of good.wav, row 15
    }
    assert "row 2 (good.wav, id 'good.wav')" in skipped[absolute]["reason"]
    for s in meta["skipped"]:
        assert s["reason"] and s["path"]
    assert meta["counts"]["excluded"] == {"label:frustrated": 1}
    assert meta["source"]["exclude_labels"] == ["frustrated"]
    assert meta["source"]["duplicates"] == "keep-first"
    assert meta["counts"]["short_padded"] == 1 and kept["short.wav"]["padded"]
    assert abs(kept["hi_rate.wav"]["duration_s"] - 2.3) < 1e-3  # resampled 44.1 kHz -> 16 kHz
    assert abs(kept["lo_rate.wav"]["duration_s"] - 2.4) < 1e-3
    assert kept["lo_rate.wav"]["session"] == "spk3"  # session defaults to the speaker
    assert (kept["eight_bit.wav"]["gender"], kept["stereo.wav"]["gender"]) == ("male", "female")
    assert kept["stereo.wav"]["label_name"] == "happy"
    nested = records.audio_path(meta, kept["sub/nested.wav"])
    assert nested == str(tmp_path / "corpus/sub/nested.wav")
    arrays = records.load_split(tmp_path / "out", "train")
    short = arrays.select(arrays.utterance_ids == "short.wav")
    assert len(short) == 1 and short.valid_frames.tolist() == [1 + 8000 // 160]
    # The padding is silence: log(LOG_FLOOR) after the real frames (and their window overlap).
    np.testing.assert_allclose(short.features[0, :, 60:], np.log(np.float32(audio.LOG_FLOOR)))
    # Stereo is the channel mean.
    wave = sf.read(tmp_path / "corpus" / "stereo.wav", dtype="float32")[0].mean(axis=1)
    ref = audio.compute_features(wave, audio.FEATURE_PRESETS["logmel40"])
    got = arrays.select(arrays.utterance_ids == "stereo.wav").features[0]
    np.testing.assert_allclose(got, ref[:, :200], atol=1e-5)


def test_csv_short_drop_and_manifest_errors(tmp_path):
    manifest = _bad_corpus(tmp_path / "corpus")
    drop = audio.FeatureConfig(short_utterances="drop")
    meta = data_prep.prepare(
        "csv",
        manifest=manifest,
        out_dir=tmp_path / "out",
        feature_config=drop,
        workers=1,
        progress=False,
        exclude_labels="frustrated",
        duplicates="keep-first",
    )
    assert meta["counts"]["short_dropped"] == 1 and meta["counts"]["short_padded"] == 0
    assert "short.wav" not in {r["utterance_id"] for r in meta["utterances"]}
    dropped = [s for s in meta["skipped"] if s["kind"] == "short_dropped"]
    assert dropped[0]["utterance_id"] == "short.wav" and "0.500 s" in dropped[0]["reason"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.wav,sad\n")
    with pytest.raises(sources.PrepError, match=r"missing column\(s\) \['path', 'speaker'\]"):
        manifest_mod.scan_csv(bad)
    dup = tmp_path / "corpus" / "dup.csv"
    dup.write_text("path,label,speaker\ngood.wav,sad,a\n./good.wav,angry,b\n,sad,c\n")
    with pytest.raises(sources.PrepError, match=r"row 2 \(good.wav.*row 3 \(./good.wav"):
        manifest_mod.scan_csv(dup)
    with pytest.raises(sources.PrepError, match=r"same file with label 'sad' and 'angry'.*"):
        manifest_mod.scan_csv(dup, duplicates="keep-first")  # it would pick the label by order
    dup.write_text("path,label,speaker\ngood.wav,sad,a\n./good.wav,sad,b\n,sad,c\n")
    scan = manifest_mod.scan_csv(dup, duplicates="keep-first")
    assert len(scan.utterances) == 1 and scan.utterances[0].speaker == "a"
    assert sorted(s["kind"] for s in scan.skipped) == ["bad_row", "duplicate_path"]


def test_nothing_usable_left_fails_with_reasons(tmp_path, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.wav").write_bytes(b"not audio")
    (folder / "b.wav").write_bytes(b"")
    (folder / "m.csv").write_text("path,label,speaker\na.wav,sad,x\nb.wav,angry,y\n")
    with pytest.raises(sources.PrepError, match=r"nothing usable left.*1 empty, 1 unreadable"):
        data_prep.prepare("csv", manifest=folder / "m.csv", out_dir=tmp_path / "o", progress=False)
    assert not os.path.exists(tmp_path / "o" / "metadata.json")
    rc = cli.main(["csv", "--manifest", str(folder / "m.csv"), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: nothing usable left" in err and "a.wav" in err
    assert "Traceback" not in err


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "iemocap",
            "--root",
            str(tmp_path / "x"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "is not a folder" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- output folder policy


def test_out_dir_with_other_config_is_refused(prepared, iemocap_root, tmp_path, capsys):
    out, meta = prepared
    before = helpers_prep.tree_bytes(out)
    again = data_prep.prepare(
        "iemocap", root=iemocap_root, out_dir=out, workers=1, progress=False, num_shards=3
    )
    assert again == meta and helpers_prep.tree_bytes(out) == before  # same run: nothing redone
    with pytest.raises(sources.PrepError) as info:
        data_prep.prepare(
            "iemocap",
            root=iemocap_root,
            out_dir=out,
            feature_config="logmel64",
            progress=False,
            num_shards=3,
        )
    msg = str(info.value)
    assert "different configuration" in msg and "n_mels: 40 -> 64" in msg and "--overwrite" in msg
    assert str(out) in msg and helpers_prep.tree_bytes(out) == before
    rc = cli.main(
        [
            "iemocap",
            "--root",
            iemocap_root,
            "--out",
            str(out),
            "--happy",
            "hap+exc",
            "--shards",
            "3",
        ]
    )
    assert rc == 2 and "source.happy: 'exc' -> 'hap+exc'" in capsys.readouterr().err
    # A folder with unrelated files is refused too.
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(sources.PrepError, match="is not empty"):
        data_prep.prepare("iemocap", root=iemocap_root, out_dir=tmp_path, progress=False)


def test_a_cut_shard_among_several_is_named(prepared, iemocap_root, tmp_path, capsys):
    """With several shards per split, the rerun's check used to report only the split's byte
    total; the shard whose SHA-256 is no longer the recorded one is named now (a prep whose
    metadata.json records no digests still gets the total)."""
    out = tmp_path / "o"
    shutil.copytree(prepared[0], out)
    meta = records.load_metadata(out)
    names = meta["splits"]["train"]["files"]
    assert len(names) == 3
    cut = out / names[1]
    cut.write_bytes(cut.read_bytes()[:-5])
    args = ["iemocap", "--root", iemocap_root, "--out", str(out), "--shards", "3"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"({names[1]} is not the file it wrote ({cut.stat().st_size} bytes))" in err, err
    assert names[0] not in err and names[2] not in err and "--overwrite" in err
    del meta["splits"]["train"]["sha256"]
    (out / records.METADATA_FILE).write_text(json.dumps(meta))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    total = meta["splits"]["train"]["num_bytes"]
    assert f"(the train shards hold {total - 5} bytes, metadata.json says {total})" in err, err


def test_overwrite_replaces_a_different_run(iemocap_root, tmp_path, capsys):
    out = tmp_path / "o"
    data_prep.prepare("iemocap", root=iemocap_root, out_dir=out, workers=1, progress=False)
    rc = cli.main(
        [
            "iemocap",
            "--root",
            iemocap_root,
            "--out",
            str(out),
            "--features",
            "mfcc26",
            "--overwrite",
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "iemocap: 10 utterances" in printed and "shape [26, 63]" in printed
    meta = records.load_metadata(out)
    assert meta["segment_shape"] == [26, 63] and meta["feature_config"]["kind"] == "mfcc"
    assert sorted(n for n in os.listdir(out) if "tfrecord" in n) == [
        "iemocap-eval.tfrecord-00000-of-00001",
        "iemocap-train.tfrecord-00000-of-00001",
    ]


def test_a_rerun_refuses_a_finished_prep_with_damaged_shards_until_overwrite(
    iemocap_root, tmp_path, capsys
):
    """Rerunning data_prep on a prep whose shard was deleted or cut used to say "nothing to
    do" (while train.py told the user to re-run data_prep); a damaged metadata.json used to be
    reported as "a different configuration"."""
    out = tmp_path / "o"
    args = ["iemocap", "--root", iemocap_root, "--out", str(out), "--no-progress"]
    assert cli.main([*args, "--workers", "1"]) == 0
    capsys.readouterr()
    meta = records.load_metadata(out)
    train_shard = out / meta["splits"]["train"]["files"][0]
    eval_shard = out / meta["splits"]["eval"]["files"][0]
    original = train_shard.read_bytes()
    train_shard.write_bytes(original[:-7])  # cut
    eval_shard.unlink()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{eval_shard.name} is missing" in err and "--overwrite" in err
    assert f"{train_shard.name} is not the file it wrote ({len(original) - 7} bytes)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(records.DataError, match="re-run data_prep with --overwrite"):
        records.load_split(out, "eval")
    for damaged in (b'{"format_version": ', b"[]", b"\xff\xfe{}"):  # cut, not an object, not UTF-8
        (out / records.METADATA_FILE).write_bytes(damaged)
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert f"{out / records.METADATA_FILE} is unreadable (damaged?)" in err, err
        assert "Traceback" not in err
    capsys.readouterr()
    assert cli.main([*args, "--overwrite", "--workers", "1"]) == 0
    assert train_shard.read_bytes() == original and eval_shard.is_file()
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}")
    assert cli.main(args) == 0 and train_shard.read_bytes() == original  # intact: done
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(  # was: "wrote", with nothing written
            f"{out} was already prepared: nothing written"
        )
    )


# ---------------------------------------------------------------- metadata + end to end


def test_metadata_contract(prepared):
    out, meta = prepared
    assert meta == records.load_metadata(out)
    assert meta["label_names"] == ["neutral", "happy", "sad", "angry"]
    assert meta["feature_config"] == audio.FEATURE_PRESETS["logmel40"].to_dict()
    assert meta["source"]["dialogs"] == "all" and meta["source"]["happy"] == "exc"
    c = meta["counts"]
    assert c["utterances"] == 10 and c["short_padded"] == 1 and c["short_dropped"] == 0
    assert c["by_session"] == {"Session1": 6, "Session2": 4}
    assert c["by_speaker"] == {"Ses01F": 3, "Ses01M": 3, "Ses02F": 2, "Ses02M": 2}
    assert c["by_class"] == {"neutral": 3, "happy": 2, "sad": 2, "angry": 3}
    assert c["skipped"] == {
        "missing_session": 3,
        "missing_wav": 1,
        "no_label": 1,
        "unknown_label": 1,
    }
    assert c["excluded"] == {"label:fru": 1, "label:hap": 2, "label:xxx": 1}
    assert (
        "  excluded: label:fru (frustrated) 1, label:hap (happiness, see --happy) 2, "
        "label:xxx (no majority label) 1"
    ) in data_prep.prep_summary(meta).splitlines()
    assert len(meta["skipped"]) == 6
    keys = {"utterance_id", "label", "label_name", "speaker", "session", "gender", "dialog"}
    keys |= {"duration_s", "num_train_segments", "num_eval_segments", "path"}
    for row in meta["utterances"]:
        assert keys <= set(row)
    rows = {r["utterance_id"]: r for r in meta["utterances"]}
    # 3.2 s -> 321 frames: train starts 0, 100 (2); eval 0, 40, 80, 120 (4).
    assert (
        rows["Ses01F_impro01_M000"]["num_train_segments"],
        rows["Ses01F_impro01_M000"]["num_eval_segments"],
    ) == (2, 4)
    assert (
        rows["Ses01F_impro01_F002"]["num_train_segments"],
        rows["Ses01F_impro01_F002"]["num_eval_segments"],
    ) == (1, 1)
    for split in records.SPLITS:
        info = meta["splits"][split]
        assert info["files"] == [f"iemocap-{split}.tfrecord-{j:05d}-of-00003" for j in range(3)]
        key = "num_train_segments" if split == "train" else "num_eval_segments"
        assert (
            info["num_segments"] == sum(r[key] for r in rows.values()) == sum(info["shard_lengths"])
        )
        for name, digest in zip(info["files"], info["sha256"], strict=True):
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert (
        meta["splits"]["train"]["hop_seconds"] == 1.0
        and meta["splits"]["eval"]["hop_seconds"] == 0.4
    )
    assert meta["content_hash"].startswith("sha256:") and len(meta["content_hash"]) == 71
    assert not os.path.exists(out / ".prep")
    # Deterministic shard assignment: utterance i (sorted ids) goes to shard i % 3.
    eval_shard1 = records.load_split(out, "eval", shard_index=1, shard_count=3)
    ids = sorted(rows)
    assert list(dict.fromkeys(eval_shard1.utterance_ids)) == ids[1::3]


def test_records_match_numpy_reference_features(prepared, iemocap_root):
    import librosa

    out, meta = prepared
    arrays = records.load_split(out, "eval")
    row = next(r for r in meta["utterances"] if r["utterance_id"] == "Ses02M_impro02_M000")
    assert records.audio_path(meta, row) == os.path.join(iemocap_root, row["path"])
    wave, sr = sf.read(records.audio_path(meta, row), dtype="float64")
    assert sr == 16000
    # NumPy reference: centre-padded frames, periodic Hann(400) in 512, rfft, mel matrix, log.
    x = np.pad(wave, (256, 256 + 512))
    frames = 1 + len(wave) // 160
    idx = np.arange(frames)[:, None] * 160 + np.arange(512)[None, :]
    win = np.zeros(512)
    win[56:456] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    power = np.abs(np.fft.rfft(x[idx] * win, axis=1)).T ** 2
    ref = np.log(np.maximum(librosa.filters.mel(sr=16000, n_fft=512, n_mels=40) @ power, 1e-6))
    sel = arrays.select(arrays.utterance_ids == "Ses02M_impro02_M000")
    assert sel.segment_index.tolist() == list(range(row["num_eval_segments"])) == list(range(3))
    for k in range(len(sel)):
        np.testing.assert_allclose(sel.features[k], ref[:, 40 * k : 40 * k + 200], atol=1e-4)


def test_python_api_feature_config_forms(iemocap_root, tmp_path):
    with pytest.raises(sources.PrepError, match="unknown feature preset 'mel40'"):
        data_prep.prepare(
            "iemocap", root=iemocap_root, out_dir=tmp_path / "a", feature_config="mel40"
        )
    with pytest.raises(sources.PrepError, match="unknown source 'timit'"):
        data_prep.prepare("timit", root=iemocap_root, out_dir=tmp_path / "a")
    with pytest.raises(sources.PrepError, match="needs root="):
        data_prep.prepare("iemocap", out_dir=tmp_path / "a")
    cfg = audio.FEATURE_PRESETS["mfcc26"].to_dict()
    meta = data_prep.prepare(
        "iemocap",
        root=iemocap_root,
        out_dir=tmp_path / "b",
        feature_config=cfg,
        dialogs="improvised",
        workers=1,
        progress=False,
    )
    assert meta["segment_shape"] == [26, 63] and meta["source"]["dialogs"] == "improvised"
    assert {r["dialog"] for r in meta["utterances"]} == {"improvised"}


# ---------------------------------------------------------------- determinism + resume


def test_byte_identical_regardless_of_workers(prepared, iemocap_root, tmp_path):
    out, _ = prepared
    other = tmp_path / "w2"
    data_prep.prepare(
        "iemocap", root=iemocap_root, out_dir=other, workers=2, progress=False, num_shards=3
    )
    assert helpers_prep.tree_bytes(other) == helpers_prep.tree_bytes(out)


def test_resume_after_interruption_is_byte_identical(prepared, iemocap_root, tmp_path, monkeypatch):
    out, _ = prepared
    target = tmp_path / "resumed"
    seen = []

    def stop_after_first(j):
        seen.append(j)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_on_shard_done", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        data_prep.prepare(
            "iemocap", root=iemocap_root, out_dir=target, workers=1, progress=False, num_shards=3
        )
    assert seen == [0]
    assert not os.path.exists(target / "metadata.json")
    assert os.path.exists(target / ".prep" / "shard-00000.json")
    with pytest.raises(records.DataError, match="interrupted prep run"):
        records.load_metadata(target)
    # A half-written shard of the interrupted run is left behind; it must be redone.
    (target / ".prep" / "iemocap-train.tfrecord-00001-of-00003.tmp").write_bytes(b"partial")
    monkeypatch.setattr(pipeline, "_on_shard_done", seen.append)
    data_prep.prepare(
        "iemocap", root=iemocap_root, out_dir=target, workers=1, progress=False, num_shards=3
    )
    assert seen == [0, 1, 2]  # shard 0 was not redone
    assert helpers_prep.tree_bytes(target) == helpers_prep.tree_bytes(out)


def _interrupt_at_the_first_shard(monkeypatch, root, out):
    """Leaves an interrupted two-shard prep of ``root`` in ``out`` (Ctrl-C at the first shard)."""

    def stop(j):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_on_shard_done", stop)
    with pytest.raises(KeyboardInterrupt):
        data_prep.prepare(
            "iemocap", root=root, out_dir=out, workers=1, progress=False, num_shards=2
        )
    monkeypatch.setattr(pipeline, "_on_shard_done", None)


def test_interrupted_run_of_an_earlier_front_end_is_not_resumed(
    iemocap_root, tmp_path, monkeypatch
):
    """Shards written before the logarithms became CPU-independent have other bits in places:
    resuming such a run would make one prep of two front ends."""
    _interrupt_at_the_first_shard(monkeypatch, iemocap_root, tmp_path)
    state_path = tmp_path / ".prep" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["front_end"] == audio.FRONT_END_VERSION == 2
    del state["front_end"]  # as the earlier versions wrote it
    state_path.write_text(json.dumps(state))
    kwargs = dict(root=iemocap_root, out_dir=tmp_path, workers=1, progress=False, num_shards=2)
    with pytest.raises(sources.PrepError, match="front end version 1, now 2") as e:
        data_prep.prepare("iemocap", **kwargs)
    assert str(tmp_path) in str(e.value) and "--overwrite" in str(e.value)
    assert not (tmp_path / "metadata.json").exists()
    meta = data_prep.prepare("iemocap", overwrite=True, **kwargs)
    assert meta["front_end"] == 2
    assert data_prep.prepare("iemocap", **kwargs)["content_hash"] == meta["content_hash"]


def test_interrupted_run_with_other_config_is_refused(iemocap_root, tmp_path, monkeypatch):
    _interrupt_at_the_first_shard(monkeypatch, iemocap_root, tmp_path)
    with pytest.raises(
        sources.PrepError, match="interrupted prep run with a different configuration"
    ):
        data_prep.prepare(
            "iemocap", root=iemocap_root, out_dir=tmp_path, workers=1, progress=False, num_shards=3
        )
    # the cap is named too (it used to say only "different fingerprint")
    with pytest.raises(sources.PrepError, match="max_segments_per_utterance: None -> 1"):
        data_prep.prepare(
            "iemocap",
            root=iemocap_root,
            out_dir=tmp_path,
            progress=False,
            num_shards=2,
            max_segments_per_utterance=1,
        )
    for workers in (0, -3, 1.5):  # 0 and -3 used to run in-process without a word
        with pytest.raises(sources.PrepError, match="workers must be a positive integer"):
            data_prep.prepare("iemocap", root=iemocap_root, out_dir=tmp_path, workers=workers)


def test_cli_synth_then_iemocap(tmp_path, capsys):
    pytest.importorskip("data_prep.synth")
    corpus = tmp_path / "corpus"
    argv = ["synth", "--out", str(corpus), "--size", "tiny", "--seed", "0", "--workers", "1"]
    rc = cli.main([*argv, "--no-progress"])
    assert rc == 0 and "python -m data_prep iemocap" in capsys.readouterr().out
    assert (corpus / "Session1" / "dialog" / "EmoEvaluation").is_dir()
    assert cli.main(["synth", "--out", str(tmp_path / "x"), "--size", "huge"]) == 2
    assert "unknown --size 'huge'" in capsys.readouterr().err
    out = tmp_path / "prep"
    argv = ["iemocap", "--root", str(corpus), "--out", str(out), "--dialogs", "improvised"]
    rc = cli.main([*argv, "--features", "mfcc26", "--short", "drop", "--workers", "1"])
    assert rc == 0
    meta = records.load_metadata(out)
    assert meta["feature_config"]["short_utterances"] == "drop"
    assert meta["counts"]["short_dropped"] > 0 and meta["counts"]["short_padded"] == 0
    assert {r["dialog"] for r in meta["utterances"]} == {"improvised"}
    assert all(r["duration_s"] >= 2.0 for r in meta["utterances"])


def test_shared_tiny_prep_dir_fixture(tiny_prep_dir):
    """The conftest fixture other modules train on: synthetic corpus -> MFCC-26 prep dir."""
    meta = records.load_metadata(tiny_prep_dir)
    assert meta["segment_shape"] == [26, 63] and meta["source"]["dialogs"] == "all"
    assert {r["dialog"] for r in meta["utterances"]} == {"improvised", "scripted"}
    for split in records.SPLITS:
        arrays = records.load_split(tiny_prep_dir, split)
        assert arrays.features.shape == (meta["splits"][split]["num_segments"], 26, 63)
        assert set(np.unique(arrays.labels)) == {0, 1, 2, 3}
    assert len(meta["counts"]["by_session"]) >= 2
