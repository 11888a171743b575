"""Tests of data_prep.manifest: labels that cannot vanish (unknown labels are errors, --label-map,
--exclude-labels, --ignore-unknown-labels), repeated recordings (same path, same bytes), default
utterance ids that keep the file identity, and id collisions naming the rows."""

import collections
import csv
import hashlib
import json
import os
import shutil

import helpers_prep
import numpy as np
import pytest
import soundfile as sf

import data_prep
from data_prep import cli, manifest, pipeline, sources
from dkd_jax import audio

SR = 16000


def _write(folder, rows, files=None, header=("path", "label", "speaker")):
    """Writes tone WAVs (name → seconds) and a manifest of ``rows``; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, seconds) in enumerate((files or {}).items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        fmt = {".ogg": "OGG", ".flac": "FLAC"}.get(os.path.splitext(name)[1], "WAV")
        wave = helpers_prep.tone(seconds, freq=150 + 35 * i, seed=i)
        sf.write(folder / name, wave, SR, format=fmt)
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("sep", [";", "\t", ", "])
def test_semicolon_tab_and_spaced_manifests_read_like_comma_ones(tmp_path, sep):
    """A German or French spreadsheet saves ";" (its decimal mark is the comma): the header used
    to be one column "path;label;speaker". ``a, "b"`` kept the quotes: the label '"angry"' was
    unknown, and the speaker kept them ('"s0"')."""
    files = {"a.wav": 2.1, "b.wav": 2.2, "c.wav": 2.3}
    rows = [("a.wav", "angry", "s0"), ("b.wav", "sad", "s1"), ("c.wav", "happy", "s0")]
    comma = _write(tmp_path / "comma", rows, files)
    other = _write(tmp_path / "other", [], files)
    quoted = [[f'"{v}"' for v in row] for row in rows]
    other.write_text("\n".join(sep.join(r) for r in [["Path", "label", "speaker"], *quoted]) + "\n")
    want = [(u.utterance_id, u.label_name, u.speaker) for u in manifest.scan_csv(comma).utterances]
    got = [(u.utterance_id, u.label_name, u.speaker) for u in manifest.scan_csv(other).utterances]
    assert got == want and len(got) == 3


def test_a_header_of_no_known_separator_names_the_separators(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path|label|speaker\na.wav|sad|s0\n")
    with pytest.raises(sources.PrepError, match="separated by commas, semicolons or tabs"):
        manifest.scan_csv(path)
    path.write_text("path;label;spk\na.wav;sad;s0\n")  # named the three columns as missing
    with pytest.raises(sources.PrepError, match=r"missing column\(s\) \['speaker'\]"):
        manifest.scan_csv(path)


def test_excel_sep_line_names_the_separator(tmp_path):
    """Excel may write "sep=;" as the first line: it names the separator and is no header."""
    files = {"a.wav": 2.1, "b.wav": 2.2}
    path = _write(tmp_path / "c", [], files)
    path.write_text("sep=;\r\npath;label;speaker\r\na.wav;sad;s0\r\n\r\nb.wav;angry;s1\r\n")
    scan = manifest.scan_csv(path)
    assert [(u.utterance_id, u.label_name) for u in scan.utterances] == [
        ("a.wav", "sad"),
        ("b.wav", "angry"),
    ]
    path.write_text("sep=;\npath;label\na.wav;sad\n")
    with pytest.raises(sources.PrepError, match=r"missing column\(s\) \['speaker'\]"):
        manifest.scan_csv(path)
    path.write_text("sep=;\npath;label;speaker\n;sad;s0\na.wav;sad;s1\n")  # lines count it
    assert [s["path"] for s in manifest.scan_csv(path).skipped] == [f"{path}:3"]
    path.write_text("sep=;\npath;label;speaker\na.wav;zzz;s0\n")
    with pytest.raises(sources.PrepError, match="unknown label"):
        manifest.scan_csv(path)


def _labelled(tmp_path):
    files = {f"c{i}.wav": 2.1 + 0.1 * i for i in range(10)}
    labels = ["angry", "anger", "anger", "anger", "joy", "fear", "fear", "sad", "Neutral", "happy"]
    rows = [(f"c{i}.wav", lab, f"s{i % 3}") for i, lab in enumerate(labels)]
    return _write(tmp_path / "c", rows, files)


# ---------------------------------------------------------------- labels


def test_a_manifest_that_is_a_folder_or_missing_is_named_as_such(tmp_path):
    with pytest.raises(sources.PrepError, match="is a folder, not a CSV file"):
        manifest.scan_csv(tmp_path)  # used to say "does not exist"
    with pytest.raises(sources.PrepError, match="does not exist"):
        manifest.scan_csv(tmp_path / "nope.csv")


def test_unknown_labels_are_an_error_listing_each_with_its_count(tmp_path, capsys):
    path = _labelled(tmp_path)
    with pytest.raises(sources.PrepError) as info:
        manifest.scan_csv(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: unknown label(s) ")
    assert "anger (3 rows, did you mean angry?)" in msg
    assert "fear (2 rows)" in msg and "joy (1 row, did you mean happy?)" in msg
    assert "--label-map anger=angry,joy=happy" in msg and "--exclude-labels fear)" in msg
    assert "--ignore-unknown-labels" in msg and "sad" not in msg.split("the classes")[0]
    rc = cli.main(["csv", "--manifest", str(path), "--out", str(tmp_path / "o"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("data_prep: error: ")
    assert not (tmp_path / "o").exists()


def test_the_suggestion_for_happiness_maps_it_to_happy():
    """A journey on EmoDB: "happiness" (spelling ratio 0.57 to "happy") was suggested for
    --exclude-labels; following it left the happy class empty, with only a warning."""
    classes = ["neutral", "happy", "sad", "angry"]
    msg = manifest._unknown_message(
        "m.csv", collections.Counter({"happiness": 71, "sadness": 62, "anger": 127, "fear": 69}),
        classes,
    )  # fmt: skip
    assert "--label-map anger=angry,happiness=happy,sadness=sad" in msg
    assert "--exclude-labels fear" in msg and "exclude-labels fear," not in msg
    assert manifest._closest_classes("fear", classes) == []
    assert manifest._closest_classes("neutrality", classes) == ["neutral"]


def test_emotion_words_of_other_languages_suggest_their_own_emotion_or_none():
    """``angst`` (German: fear) was suggested as ``angst=angry`` (spelling ratio 0.6): following
    the hint would have trained fear as anger."""
    classes = ["neutral", "happy", "sad", "angry"]
    msg = manifest._unknown_message(
        "m.csv", collections.Counter({"angst": 5, "wut": 4, "freude": 3}), classes
    )
    assert "angst (5 rows)" in msg and "--exclude-labels angst" in msg and "angst=" not in msg
    assert "--label-map wut=angry,freude=happy" in msg
    assert manifest._closest_classes("angst", ["neutral", "fear", "angry"]) == ["fear"]
    assert manifest._closest_classes("Ärger", classes) == ["angry"]
    assert manifest._closest_classes("angel", classes) == ["angry"]  # a spelling guess still


def test_label_map_exclusions_and_ignore(tmp_path, caplog):
    path = _labelled(tmp_path)
    scan = manifest.scan_csv(path, label_map="anger=angry, JOY=happy", exclude_labels="fear")
    names = [u.label_name for u in scan.utterances]
    assert {n: names.count(n) for n in scan.label_names} == {
        "neutral": 1,
        "happy": 2,
        "sad": 1,
        "angry": 4,
    }
    assert scan.excluded == {"label:fear": 2}
    by_id = {u.utterance_id: u for u in scan.utterances}
    assert (by_id["c1.wav"].source_label, by_id["c1.wav"].label) == ("anger", 3)
    assert scan.options["label_map"] == {"anger": "angry", "joy": "happy"}
    assert scan.options["exclude_labels"] == ["fear"]
    # The same map from a JSON file.
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"anger": "angry", "joy": "happy"}))
    again = manifest.scan_csv(path, label_map=mapping, exclude_labels=["fear"])
    assert again.utterances == scan.utterances and again.options == scan.options
    # Everything unknown left out (and counted) on request; near misses of a class are said
    # (they used to vanish into the count line, emptying the class they mean).
    caplog.clear()
    with caplog.at_level("WARNING", logger="data_prep"):
        loose = manifest.scan_csv(path, ignore_unknown_labels=True, exclude_labels="joy")
    assert len(loose.utterances) == 4
    assert loose.excluded == {"label:anger": 3, "label:fear": 2, "label:joy": 1}
    assert loose.options["ignore_unknown_labels"] is True
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {path}: --ignore-unknown-labels left out label(s) that look like a class: "
        "anger (3 rows, angry?); if they mean it, map them (--label-map anger=angry)"
    ]  # fear is no class's near miss, joy was excluded by name


def test_label_map_reaches_metadata_through_the_cli(tmp_path, capsys):
    path = _labelled(tmp_path)
    out = tmp_path / "out"
    argv = ["csv", "--manifest", str(path), "--out", str(out), "--workers", "1", "--no-progress"]
    rc = cli.main([*argv, "--label-map", "anger=angry,joy=happy", "--exclude-labels", "fear"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["counts"]["by_class"] == {"neutral": 1, "happy": 2, "sad": 1, "angry": 4}
    assert meta["counts"]["excluded"] == {"label:fear": 2}
    assert meta["source"]["label_map"] == {"anger": "angry", "joy": "happy"}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"label_map": "anger=furious"}, r"anger=furious map to no class"),
        ({"label_map": "anger"}, r"'anger' is not LABEL=CLASS"),
        ({"label_map": "anger=angry", "exclude_labels": "anger"}, r"both mapped"),
        ({"duplicates": "keep-last"}, r"duplicates must be one of"),
    ],
)
def test_bad_label_options(tmp_path, options, match):
    path = _labelled(tmp_path)
    with pytest.raises(sources.PrepError, match=match):
        manifest.scan_csv(path, **options)


def test_excluding_a_class_is_refused_and_empty_labels_can_be_excluded(tmp_path, capsys):
    files = {f"c{i}.wav": 2.1 + 0.1 * i for i in range(4)}
    rows = [("c0.wav", "sad", "a"), ("c1.wav", "", "a"), ("c2.wav", "angry", "b"),
            ("c3.wav", " ", "b")]  # fmt: skip
    path = _write(tmp_path / "c", rows, files)
    with pytest.raises(sources.PrepError) as info:  # was: silently kept as a class
        manifest.scan_csv(path, exclude_labels="Sad,fear")
    assert str(info.value) == (
        "--exclude-labels: sad is a class (the classes are neutral, happy, sad, angry); to leave "
        "a class out, name the classes to keep: --classes neutral,happy,angry"
    )
    with pytest.raises(sources.PrepError, match=r"--exclude-labels <empty>"):
        manifest.scan_csv(path)  # the message's suggestion, then followed:
    scan = manifest.scan_csv(path, exclude_labels="<empty>")
    assert [u.rel_path for u in scan.utterances] == ["c0.wav", "c2.wav"]
    assert scan.excluded == {"label:<empty>": 2} and scan.options["exclude_labels"] == [""]
    out = tmp_path / "o"
    argv = ["csv", "--manifest", str(path), "--out", str(out), "--workers", "1", "--no-progress"]
    assert cli.main([*argv, "--exclude-labels", "<empty>"]) == 0
    assert "excluded: label:<empty> 2" in capsys.readouterr().out


def test_bad_label_map_file(tmp_path):
    bad = tmp_path / "map.json"
    bad.write_text('["anger", "angry"]')
    with pytest.raises(sources.PrepError, match="must be a JSON object"):
        manifest.parse_label_map(bad)
    with pytest.raises(sources.PrepError, match="cannot read the label map"):
        manifest.parse_label_map(tmp_path / "missing.json")


# ---------------------------------------------------------------- repeated recordings


def test_same_audio_under_two_paths_is_refused_naming_both_rows(tmp_path):
    files = {"a.wav": 2.2, "b.wav": 2.4, "sub/c.wav": 2.6}
    folder = tmp_path / "c"
    rows = [
        ("a.wav", "sad", "s1"),
        ("b.wav", "angry", "s2"),
        ("copy_of_a.wav", "sad", "s3"),  # the same recording under another name and speaker
        ("sub/c.wav", "happy", "s1"),
    ]
    path = _write(folder, rows, files)
    shutil.copyfile(folder / "a.wav", folder / "copy_of_a.wav")
    with pytest.raises(sources.PrepError) as info:
        data_prep.prepare("csv", manifest=path, out_dir=tmp_path / "o", progress=False)
    msg = str(info.value)
    assert "row 2 (a.wav, id 'a.wav') and row 4 (copy_of_a.wav, id 'copy_of_a.wav')" in msg
    assert "hold identical audio" in msg and "--duplicates keep-first" in msg
    assert "b.wav" not in msg and "sub/c.wav" not in msg
    assert not (tmp_path / "o").exists()
    meta = data_prep.prepare(
        "csv",
        manifest=path,
        out_dir=tmp_path / "o",
        workers=1,
        progress=False,
        duplicates="keep-first",
    )
    assert [r["utterance_id"] for r in meta["utterances"]] == ["a.wav", "b.wav", "sub/c.wav"]
    (dup,) = meta["skipped"]
    assert (dup["kind"], dup["utterance_id"]) == ("duplicate_audio", "copy_of_a.wav")
    assert "the same audio as row 2 (a.wav, id 'a.wav')" in dup["reason"]


def test_same_path_spelt_differently_is_refused(tmp_path):
    folder = tmp_path / "c"
    rows = [
        ("sub/a.wav", "sad", "s1"),
        ("b.wav", "sad", "s1"),
        ("./sub/../sub/a.wav", "angry", "s2"),
        (str(folder / "sub" / "a.wav"), "happy", "s3"),
    ]
    path = _write(folder, rows, {"sub/a.wav": 2.2, "b.wav": 2.3})
    with pytest.raises(sources.PrepError) as info:
        manifest.scan_csv(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: 2 repeated recording(s)")
    assert "row 2 (sub/a.wav, id 'sub/a.wav') and row 4 (./sub/../sub/a.wav" in msg
    assert f"row 5 ({folder / 'sub' / 'a.wav'}" in msg and "name the same file" in msg


def test_excluded_rows_are_not_duplicates(tmp_path):
    rows = [("a.wav", "sad", "s1"), ("a.wav", "fear", "s1")]
    path = _write(tmp_path / "c", rows, {"a.wav": 2.2})
    scan = manifest.scan_csv(path, exclude_labels="fear")
    assert [u.utterance_id for u in scan.utterances] == ["a.wav"]
    assert scan.excluded == {"label:fear": 1}


# ---------------------------------------------------------------- utterance ids


def test_default_ids_keep_the_extension(tmp_path):
    files = {"clip.wav": 2.2, "clip.flac": 2.3, "clip.ogg": 2.4, "d/clip.wav": 2.5}
    rows = [(name, "neutral", "s1") for name in files]
    path = _write(tmp_path / "c", rows, files)
    scan = manifest.scan_csv(path)
    assert [u.utterance_id for u in scan.utterances] == [
        "clip.flac",
        "clip.ogg",
        "clip.wav",
        "d/clip.wav",
    ]
    assert not scan.skipped
    meta = data_prep.prepare(
        "csv", manifest=path, out_dir=tmp_path / "o", workers=1, progress=False
    )
    assert meta["counts"]["utterances"] == 4


def test_id_collision_names_the_rows(tmp_path):
    files = {"a.wav": 2.2, "b.wav": 2.3, "c.wav": 2.4}
    rows = [
        ("a.wav", "sad", "s1", "utt1"),
        ("b.wav", "sad", "s1", "utt2"),
        ("c.wav", "sad", "s1", "utt1"),
    ]
    header = ("path", "label", "speaker", "utterance_id")
    path = _write(tmp_path / "c", rows, files, header=header)
    with pytest.raises(sources.PrepError) as info:
        manifest.scan_csv(path)
    msg = str(info.value)
    assert "id 'utt1' on row 2 (a.wav), row 4 (c.wav)" in msg and "utt2" not in msg


def test_corpus_name_is_tfds_safe():
    assert manifest.corpus_name("My Corpus-2") == "my_corpus_2"
    assert manifest.corpus_name("2024") == "c_2024"
    assert manifest.corpus_name("!!!") == "csv"


# ---------------------------------------------------------------- the file itself


def test_a_speaker_in_two_sessions_is_refused_naming_the_rows(tmp_path):
    files = {f"c{i}.wav": 2.1 + 0.1 * i for i in range(5)}
    rows = [  # speaker x: session s1 on two rows, empty (= "x") on one; y: "y" and empty
        ("c0.wav", "sad", "x", "s1"), ("c1.wav", "angry", "x", ""), ("c2.wav", "sad", "x", "s1"),
        ("c3.wav", "happy", "y", "y"), ("c4.wav", "sad", "y", ""),
    ]  # fmt: skip
    path = _write(tmp_path / "c", rows, files, header=("path", "label", "speaker", "session"))
    with pytest.raises(sources.PrepError) as info:
        manifest.scan_csv(path)
    assert str(info.value) == (
        f"{path}: 1 speaker(s) in more than one session, so leave-one-session-out would test on "
        "speakers it trained on: speaker 'x' in sessions 's1' (rows 2, 4), 'x' (row 3). Give "
        "every row of a speaker the same session (an empty session cell stands for the "
        "speaker's id)"
    )


def test_unclosed_quote_names_its_line_instead_of_swallowing_rows(tmp_path):
    files = {f"c{i}.wav": 2.1 + 0.1 * i for i in range(4)}
    path = _write(tmp_path / "c", [], files)
    with open(path, "a") as f:
        f.write('c0.wav,sad,a\n\nc1.wav,"angry,b\nc2.wav,sad,b\nc3.wav,happy,a\n')
    for options in ({}, {"ignore_unknown_labels": True}):  # was: 1 row kept, 3 "excluded"
        with pytest.raises(sources.PrepError) as info:
            manifest.scan_csv(path, **options)
        assert str(info.value) == (
            f"{path}:4: one row runs over lines 4-6: a field holds a line break, most likely a "
            'quote (") that is never closed'
        )


def test_messages_count_blank_lines(tmp_path):
    files = {"a.wav": 2.1, "b.wav": 2.2}
    path = _write(tmp_path / "c", [], files)
    with open(path, "a") as f:
        f.write("a.wav,sad,x\n\n\nb.wav,angry,y\n\na.wav,happy,z\n")
    with pytest.raises(sources.PrepError, match=r"row 2 \(a\.wav.*row 7 \(a\.wav"):
        manifest.scan_csv(path)


def test_not_utf8_names_the_first_bad_line_and_repeated_columns_are_refused(tmp_path):
    files = {"a.wav": 2.1, "b.wav": 2.2}
    path = _write(tmp_path / "c", [("a.wav", "sad", "x")], files)
    with open(path, "ab") as f:
        f.write("b.wav,sad,J\u00fcrgen\n".encode("latin-1"))
    with pytest.raises(sources.PrepError) as info:
        manifest.scan_csv(path)
    assert str(info.value) == (
        f'{path}:3: not UTF-8 text; save the manifest as UTF-8 (in a spreadsheet: "CSV UTF-8")'
    )
    path.write_text("path,label,speaker\na.wav,sad,x\n", encoding="utf-16")
    with pytest.raises(sources.PrepError, match=r"manifest\.csv:1: not UTF-8 text"):
        manifest.scan_csv(path)
    path.write_text("path,label,speaker,Label\na.wav,sad,x,\n")
    with pytest.raises(sources.PrepError, match=r"names column\(s\) \['label'\] more than once"):
        manifest.scan_csv(path)
    path.write_text("path,label,speaker,note,note\r\na.wav,sad,x,,\r\n   \r\n\tb.wav,sad,y\r\n")
    scan = manifest.scan_csv(path)  # columns it ignores may repeat
    assert [u.rel_path for u in scan.utterances] == ["a.wav", "b.wav"]
    assert scan.skipped == []  # an all-blank row (a spreadsheet's ",,") is no row at all
    path.write_text("path,label,speaker\na.wav,sad,x\n,sad,y\n,,\n")
    scan = manifest.scan_csv(path)  # a row with a label but no path is one
    assert [(s["path"], s["reason"]) for s in scan.skipped] == [(f"{path}:3", "empty path")]


def test_audio_rewritten_in_place_after_a_prep_is_refused_until_overwrite(tmp_path):
    files = {"a.wav": 2.1, "b.wav": 2.2}
    path = _write(tmp_path / "c", [("a.wav", "sad", "x"), ("b.wav", "angry", "y")], files)
    out = tmp_path / "o"
    options = dict(manifest=path, out_dir=out, workers=1, progress=False)
    first = data_prep.prepare("csv", **options)
    a, b = tmp_path / "c" / "a.wav", tmp_path / "c" / "b.wav"
    later = (out / "metadata.json").stat().st_mtime_ns + 10**9
    os.utime(a, ns=(later, later))  # touched (or copied, or a clock ahead): same bytes
    assert data_prep.prepare("csv", **options)["content_hash"] == first["content_hash"]
    size = b.stat().st_size
    wave, sr = sf.read(b, dtype="float32")
    sf.write(b, 0.25 * wave, sr)  # re-normalised in place: same length, same size
    os.utime(b, ns=(later, later))
    assert b.stat().st_size == size
    with pytest.raises(sources.PrepError) as info:  # was: "nothing to do", the old features
        data_prep.prepare("csv", **options)
    assert str(info.value) == (
        f"{out} holds a finished prep run of these files, but 1 of them changed after it was "
        "made (b.wav); pass --overwrite (overwrite=True) to prepare them again"
    )
    again = data_prep.prepare("csv", **options, overwrite=True)
    assert again["content_hash"] != first["content_hash"]
    assert data_prep.prepare("csv", **options)["content_hash"] == again["content_hash"]
    digests = (out / pipeline.INPUTS_FILE).read_text().splitlines()
    assert [line.split("  ")[1] for line in digests] == ["a.wav", "b.wav"]
    assert digests[1].split()[0] == hashlib.sha256(b.read_bytes()).hexdigest()


def test_digital_silence_and_corrupt_rate_headers_are_skipped_with_reasons(tmp_path):
    files = {"a.wav": 2.1, "b.wav": 2.2}
    rows = [("a.wav", "sad", "x"), ("b.wav", "angry", "y"), ("quiet.wav", "sad", "x"),
            ("rate.wav", "happy", "y"), ("inverted.wav", "sad", "y")]  # fmt: skip
    path = _write(tmp_path / "c", rows, files)
    sf.write(tmp_path / "c" / "quiet.wav", np.zeros(3 * SR, np.float32), SR)
    speech = helpers_prep.tone(2.5, freq=180, seed=3)  # one channel the other inverted
    sf.write(tmp_path / "c" / "inverted.wav", np.stack([speech, -speech], axis=1), SR)
    sf.write(tmp_path / "c" / "rate.wav", np.full(400, 0.1, np.float32), 1000)
    data = bytearray((tmp_path / "c" / "rate.wav").read_bytes())
    data[24:28] = (1).to_bytes(4, "little")  # the header says 1 Hz: 400 samples = 400 s
    (tmp_path / "c" / "rate.wav").write_bytes(bytes(data))
    meta = data_prep.prepare("csv", manifest=path, out_dir=tmp_path / "o", progress=False)
    assert meta["counts"]["utterances"] == 2  # was: both kept, "rate.wav" as 400 s of audio
    assert meta["counts"]["skipped"] == {"bad_rate": 1, "silent": 2}
    reasons = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert reasons["quiet.wav"] == audio.SILENT_REASON
    assert reasons["inverted.wav"].startswith("silent once mixed to mono: its channels cancel out")
    assert reasons["rate.wav"].startswith("implausible sample rate 1 Hz (below 1000 Hz")


def test_labels_and_speakers_compare_in_one_unicode_form(tmp_path):
    nfd, nfc = "a\u0308rger", "\u00e4rger"  # "ärger" as macOS exports it, and as typed
    files = {"a.wav": 2.1, "b.wav": 2.2}
    rows = [("a.wav", nfd, "J\u00fcrgen"), ("b.wav", "sad", "Ju\u0308rgen")]
    path = _write(tmp_path / "c", rows, files)
    scan = manifest.scan_csv(path, label_map=f"{nfc}=angry")  # was: "unknown label ärger"
    assert [(u.label_name, u.speaker) for u in scan.utterances] == [
        ("angry", "J\u00fcrgen"),
        ("sad", "J\u00fcrgen"),  # one speaker, not two
    ]
    assert manifest.scan_csv(path, exclude_labels=nfc).excluded == {f"label:{nfc}": 1}


def test_speaker_ids_differing_only_in_case_are_warned_about(tmp_path, caplog):
    files = {"a.wav": 2.1, "b.wav": 2.2, "c.wav": 2.3}
    rows = [("a.wav", "sad", "S03"), ("b.wav", "angry", "s03"), ("c.wav", "sad", "s04")]
    path = _write(tmp_path / "c", rows, files)
    with caplog.at_level("WARNING", logger="data_prep"):
        scan = manifest.scan_csv(path)
    assert sorted({u.speaker for u in scan.utterances}) == ["S03", "s03", "s04"]  # kept apart
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {path}: speaker ids that differ only in case or in how a number is written "
        "('S03' and 's03') are taken as different speakers; if they are one person, spell them "
        "alike"
    ]


def test_speaker_ids_differing_only_in_leading_zeros_are_warned_about(tmp_path, caplog):
    """A spreadsheet that drops leading zeros ("03" -> "3") or pandas writing "3.0" made two
    speakers of one without a word: the fold holding out "3" trained on "03"."""
    files = {f"{c}.wav": 2.0 + i / 10 for i, c in enumerate("abcdefg")}
    rows = [("a.wav", "sad", "03"), ("b.wav", "angry", "3"), ("c.wav", "sad", "3.0"),
            ("d.wav", "sad", "Ses01F"), ("e.wav", "sad", "ses1f"), ("f.wav", "sad", "13"),
            ("g.wav", "sad", "30")]  # fmt: skip
    path = _write(tmp_path / "c", rows, files)
    with caplog.at_level("WARNING", logger="data_prep"):
        manifest.scan_csv(path)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "('03' and '3' and '3.0'; 'Ses01F' and 'ses1f')" in message
    assert manifest._speaker_key("13") != manifest._speaker_key("3") != manifest._speaker_key("30")
    for a, b in (("3.05", "3.5"), ("spk1.01", "spk1.1")):  # digits after a point stay (review)
        assert manifest._speaker_key(a) != manifest._speaker_key(b)


def test_audio_files_that_no_row_names_are_warned_about(tmp_path, caplog):
    files = {f"a/{i}.wav": 2.1 for i in range(8)} | {"a/x.FLAC": 2.1, "b/y.ogg": 2.1}
    rows = [("a/0.wav", "sad", "s1"), ("a/1.wav", "fear", "s1"), ("b/../a/2.wav", "angry", "s2")]
    path = _write(tmp_path / "c", rows, files)
    (tmp_path / "c" / "a" / "._3.wav").write_bytes(b"AppleDouble")  # hidden: not audio
    (tmp_path / "c" / "a" / "notes.txt").write_text("not audio")
    (tmp_path / "c" / "a" / "sub.wav").mkdir()  # a folder named like audio
    with caplog.at_level("WARNING", logger="data_prep"):
        scan = manifest.scan_csv(path, exclude_labels="fear")
    assert len(scan.utterances) == 2 and scan.excluded == {"label:fear": 1}  # listed: not warned
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {path}: 6 audio file(s) beside the listed ones are in no row (a/3.wav, "
        "a/4.wav, a/5.wav, a/6.wav, a/7.wav and 1 more) and are not prepared; add them to the "
        "manifest if they belong to the corpus"
    ]  # b/ holds no listed file: never looked at (nor the manifest's whole tree)
    caplog.clear()
    complete = [(f"a/{i}.wav", "sad", "s1") for i in range(8)] + [("a/x.FLAC", "sad", "s1")]
    with caplog.at_level("WARNING", logger="data_prep"):
        manifest.scan_csv(_write(tmp_path / "c", complete))
    assert caplog.records == []


def test_rows_without_a_speaker_are_an_error_naming_their_lines(tmp_path):
    # Before: skipped with a count only ("bad_row 1"), the recording and its label gone.
    rows = [("a.wav", "sad", "x"), ("b.wav", "happy", ""), ("c.wav", "angry", "y")]
    path = _write(tmp_path / "c", rows, {"a.wav": 2.1, "b.wav": 2.2, "c.wav": 2.3})
    with pytest.raises(sources.PrepError) as info:
        manifest.scan_csv(path)
    assert str(info.value) == (
        f"{path}: 1 row(s) have an empty speaker cell (line(s) 3): every row needs its speaker "
        "(the folds keep each speaker's recordings on one side); fill them in"
    )


def test_missing_files_and_folders_are_said_whatever_their_share(tmp_path, caplog):
    files = {f"f{i}.wav": 2.1 for i in range(30)}
    rows = [(n, "sad", f"s{i % 3}") for i, n in enumerate(files)]
    rows += [("gone.wav", "angry", "s1"), ("take2.wav", "happy", "s2")]
    path = _write(tmp_path / "c", rows, files)
    (tmp_path / "c" / "take2.wav").mkdir()  # a row naming a folder: not "missing"
    with caplog.at_level("WARNING", logger="data_prep"):
        scan = manifest.scan_csv(path)  # 2 of 32 rows: under the 10 % that the summary flags
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {path}: 1 row(s) name an audio file that does not exist (gone.wav (line "
        f"32: looked for {tmp_path / 'c' / 'gone.wav'})); they are skipped (listed in "
        "metadata.json)"
    ]
    reasons = {s["utterance_id"]: (s["kind"], s["reason"]) for s in scan.skipped}
    assert reasons == {
        "gone.wav": ("missing_wav", f"audio file missing ({path}:32)"),
        "take2.wav": ("unreadable", f"is a folder, not an audio file ({path}:33)"),
    }


def test_paths_relative_to_the_current_folder_or_with_backslashes_get_a_hint(
    tmp_path, caplog, monkeypatch
):
    """An audit: rows written relative to where the user stood (audio/a.wav beside a manifest
    kept in sub/) were "missing" with the path as written, naming neither where they were looked
    for nor why."""
    files = {f"audio/f{i}.wav": 2.1 for i in range(3)}
    _write(tmp_path, [], files)  # the audio, beside the user
    rows = [(n, "sad", "s1") for n in files] + [("x\\y.wav", "sad", "s2")]
    path = _write(tmp_path / "sub", rows)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="data_prep"):
        assert manifest.scan_csv(path).utterances == []  # nothing left
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"audio/f0.wav (line 2: looked for {tmp_path / 'sub' / 'audio' / 'f0.wav'})" in message
    assert (
        f"Relative paths resolve against the manifest's folder ({tmp_path / 'sub'}), not the "
        "current folder, where 3 of them exist" in message
    )
    caplog.clear()
    path = _write(tmp_path / "win", [("x\\y.wav", "sad", "s2"), ("z.wav", "sad", "s1")])
    with caplog.at_level("WARNING", logger="data_prep"):
        manifest.scan_csv(path)
    assert "Some paths hold '\\' (Windows' separator): write them with '/'" in caplog.text


def test_columns_that_look_like_known_ones_are_warned_about(tmp_path, caplog):
    files = {"a.wav": 2.1, "b.wav": 2.2}
    rows = [("a.wav", "sad", "x", "A", "f", "hello"), ("b.wav", "happy", "y", "B", "m", "hi")]
    header = ("path", "label", "speaker", "session_id", "sex", "transcript")
    path = _write(tmp_path / "c", rows, files, header=header)
    with caplog.at_level("WARNING", logger="data_prep"):
        manifest.scan_csv(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {path}: column(s) 'session_id' (did you mean 'session'?), 'sex' (did you mean "
        "'gender'?) are not read; the columns read are path, label, speaker, session, gender, "
        "utterance_id: rename the column to have it used"
    ]  # "transcript" is like no column: not warned about
    caplog.clear()
    path = _write(
        tmp_path / "d",
        rows,
        files,
        header=("path", "label", "speaker", "sesion", "gender", "transcript"),
    )
    with caplog.at_level("WARNING", logger="data_prep"):
        manifest.scan_csv(path)
    assert "'sesion' (did you mean 'session'?)" in caplog.records[0].getMessage()
    caplog.clear()  # a gender value the column does not know is read as unknown: said
    rows = [("a.wav", "sad", "x", "woman"), ("b.wav", "happy", "y", "M")]
    path = _write(tmp_path / "e", rows, files, header=("path", "label", "speaker", "gender"))
    with caplog.at_level("WARNING", logger="data_prep"):
        scan = manifest.scan_csv(path)
    assert [u.gender for u in scan.utterances] == ["", "male"]
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {path}: gender value(s) 'woman' (1 row) are not read (unknown); the column "
        "takes f, female, w or m, male"
    ]


def test_identical_silent_files_are_not_called_one_recording(tmp_path):
    # Two speakers' empty takes are byte for byte the same; they are skipped as silent, not
    # refused as "repeated recordings".
    path = _write(tmp_path / "c", [("a.wav", "sad", "x"), ("b.wav", "happy", "y")], {})
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / "c" / name, np.zeros(2 * SR, np.float32), SR)
    (tmp_path / "c" / "s.csv").write_text(path.read_text() + "c.wav,angry,z\n")
    sf.write(tmp_path / "c" / "c.wav", helpers_prep.tone(2.1), SR)
    scan = manifest.scan_csv(tmp_path / "c" / "s.csv")
    assert [u.rel_path for u in scan.utterances] == ["a.wav", "b.wav", "c.wav"]
    meta = data_prep.prepare(
        "csv", manifest=tmp_path / "c" / "s.csv", out_dir=tmp_path / "o", progress=False
    )
    assert {s["utterance_id"]: s["kind"] for s in meta["skipped"]} == {
        "a.wav": "silent",
        "b.wav": "silent",
    }
    for name in ("a.wav", "b.wav"):  # a constant non-zero level is prepared: copies are repeats
        sf.write(tmp_path / "c" / name, np.full(2 * SR, 0.25, np.float32), SR, subtype="FLOAT")
    with pytest.raises(sources.PrepError, match="hold identical audio"):
        manifest.scan_csv(tmp_path / "c" / "s.csv")


def test_a_rerun_after_a_label_edit_names_the_rows_not_only_files(tmp_path):
    rows = [("a.wav", "sad", "x"), ("b.wav", "happy", "y")]
    path = _write(tmp_path / "c", rows, {"a.wav": 2.1, "b.wav": 2.2})
    data_prep.prepare("csv", manifest=path, out_dir=tmp_path / "o", progress=False)
    _write(tmp_path / "c", [("a.wav", "angry", "x"), ("b.wav", "happy", "y")])
    with pytest.raises(sources.PrepError, match="a row's label, speaker, session or utterance id"):
        data_prep.prepare("csv", manifest=path, out_dir=tmp_path / "o", progress=False)


def test_a_class_recorded_in_one_session_only_is_said_by_the_prep_summary(tmp_path):
    files = {f"{s}_{c}.wav": 2.1 for s in ("s1", "s2") for c in ("sad", "happy")}
    files["s1_angry.wav"] = 2.2  # angry: speaker (= session) s1 only
    rows = [(name, name.split("_")[1][:-4], name[:2]) for name in files]
    meta = data_prep.prepare(
        "csv", manifest=_write(tmp_path / "c", rows, files), out_dir=tmp_path / "o", progress=False
    )
    assert (
        "  warning: class angry (only in s1): a leave-one-session-out fold holding that session "
        "out trains without it (train.py names such folds)"
    ) in data_prep.prep_summary(meta).splitlines()
    for u in meta["utterances"]:  # one session in all: nothing to say (loso needs two)
        u["session"] = "s1"
    assert "only in" not in data_prep.prep_summary(meta)


def test_files_cut_short_are_kept_and_said(tmp_path):
    files = {"a.wav": 2.1, "b.wav": 2.6}
    rows = [("a.wav", "sad", "x"), ("b.wav", "angry", "y"), ("c.ogg", "sad", "y")]
    path = _write(tmp_path / "c", rows, files)
    b = tmp_path / "c" / "b.wav"
    b.write_bytes(b.read_bytes()[: 44 + 2 * 2 * SR])  # 2 s of the 2.6 s the header declares
    c = tmp_path / "c" / "c.ogg"  # an Ogg file declares no length: cut inside its last page
    noise = 0.1 * np.random.default_rng(0).standard_normal(8 * SR).astype(np.float32)
    sf.write(c, noise, SR, format="OGG", subtype="VORBIS")
    c.write_bytes(c.read_bytes()[:-100])
    meta = data_prep.prepare("csv", manifest=path, out_dir=tmp_path / "o", progress=False)
    rows = {r["utterance_id"]: r for r in meta["utterances"]}
    assert "warning" not in rows["a.wav"] and rows["b.wav"]["duration_s"] == 2.0
    assert rows["b.wav"]["warning"] == (
        "the header declares 2.60 s of audio but the file holds 2.00 s (cut short?)"
    )
    assert rows["c.ogg"]["warning"] == (
        f"the file ends inside an Ogg page, at byte {c.stat().st_size} (cut short?)"
    )
    assert (
        "  warning: 2 file(s) were cut short or damaged: they decode less audio than they "
        "declare, or stop without their end (e.g. b.wav); kept with what they hold, each with a "
        '"warning" in metadata.json'
    ) in data_prep.prep_summary(meta).splitlines()


def test_excluding_the_label_of_an_empty_class_is_cautioned():
    """A review: 'hapiness' (a misspelling no rule maps) was suggested for --exclude-labels
    while no row was labelled happy: following it emptied the class."""
    classes = ["neutral", "happy", "sad", "angry"]
    known = collections.Counter({"neutral": 3, "sad": 2, "angry": 4})
    msg = manifest._unknown_message("m.csv", collections.Counter({"hapiness": 5}), classes, known)
    assert "--exclude-labels hapiness" in msg
    assert msg.endswith(
        "No row is labelled happy yet: if one of these labels means it, map it "
        "(--label-map LABEL=CLASS) rather than excluding it."
    )
    known["happy"] = 1
    assert "No row" not in manifest._unknown_message(
        "m.csv", collections.Counter({"hapiness": 5}), classes, known
    )


def test_float_files_beyond_full_scale_are_said_to_be_clipped(tmp_path):
    """An audit: a float WAV peaking at 8.0 was clipped to ±1 (15 % of its samples) with no word
    anywhere; now counted per file and warned about. A file within full scale has no record."""
    files = {"quiet.wav": 2.1, "hot.wav": 2.2, "b.wav": 2.3}
    rows = [("quiet.wav", "sad", "s1"), ("hot.wav", "angry", "s1"), ("b.wav", "sad", "s2")]
    path = _write(tmp_path / "c", rows, files)
    hot = 8.0 * helpers_prep.tone(2.2, freq=200, seed=7)
    sf.write(tmp_path / "c" / "hot.wav", hot, SR, subtype="FLOAT")
    want = int(np.count_nonzero(np.abs(hot.astype(np.float32)) > 1.0))
    meta = data_prep.prepare(
        "csv", manifest=path, out_dir=tmp_path / "o", workers=1, progress=False
    )
    rows = {r["utterance_id"]: r for r in meta["utterances"]}
    assert rows["hot.wav"]["clipped"] == {
        "samples": want,
        "peak": round(float(np.abs(hot.astype(np.float32)).max()), 4),
    }
    assert want > 0.1 * hot.size and "clipped" not in rows["quiet.wav"]
    summary = data_prep.prep_summary(meta)
    assert "warning: 1 float file(s) go beyond full scale and were clipped to ±1 (loudest: " in (
        summary
    )
    assert f"hot.wav, peak {rows['hot.wav']['clipped']['peak']:g}, {want} samples" in summary


def test_files_recorded_below_the_feature_rate_are_counted_by_rate_and_class(tmp_path):
    """An audit: an 8-kHz file resampled to 16 kHz has its upper log-mel bands empty, and
    nothing recorded the rate: telephone anger beside studio neutral let a model learn the
    channel without a word. Files at the feature rate have no record (the prep is unchanged)."""
    files = {"a.wav": 2.1, "b.wav": 2.2, "c.wav": 2.3}
    rows = [("a.wav", "sad", "s1"), ("b.wav", "angry", "s1"), ("c.wav", "angry", "s2")]
    path = _write(tmp_path / "c", rows, files)
    for seed, name in enumerate(("b.wav", "c.wav")):
        sf.write(tmp_path / "c" / name, helpers_prep.tone(2.2, freq=200, seed=seed)[::2], SR // 2)
    meta = data_prep.prepare(
        "csv", manifest=path, out_dir=tmp_path / "o", workers=1, progress=False
    )
    by_id = {r["utterance_id"]: r for r in meta["utterances"]}
    assert by_id["b.wav"]["source_rate"] == by_id["c.wav"]["source_rate"] == SR // 2
    assert "source_rate" not in by_id["a.wav"]
    assert (
        "  warning: 2 of 3 utterances were recorded below the features' 16000 Hz (8000 Hz: 2; "
        "by class: angry 2): nothing above 4000 Hz reaches their features;"
    ) in data_prep.prep_summary(meta)
