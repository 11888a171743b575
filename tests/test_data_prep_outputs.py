"""Tests of what a prep run writes: byte-identity with recorded hashes on the synthetic
corpus, records equal to audio.segment_audio, the segment balance (warning + cap), and OS errors
(read-only or full output folder) as one line with exit status 2, resumable afterwards."""

import errno
import hashlib
import os
import re

import helpers_prep
import numpy as np
import pytest

import data_prep
from data_prep import cli, pipeline, sources
from dkd_jax import audio, records

# Produced by the code before the librosa-free front end (commit aa2f5a3) on the conftest tiny
# corpus (synth size "tiny", seed 0): data_prep.prepare("iemocap", root=CORPUS, out_dir=OUT,
# feature_config=NAME, workers=1) -> metadata["content_hash"], metadata["fingerprint"]. Made
# again (aa2f5a3's code, run from a worktree) when the synthetic corpus stopped depending on the
# CPU's BLAS kernel (tests/test_synth.py), which changed its bytes; and once more, by the current
# code, when the logarithms stopped depending on NumPy's choice of SIMD code (audio.natural_log:
# the correctly rounded float32 log, where NumPy's differed in the last bit for some values and
# its AVX-512 float32 log10 for about half; tests/test_audio.py checks the same bits at every
# NumPy SIMD level, and this test that nothing else moves).
TINY_CORPUS_DIGEST = "23fa5ff4ae3b0830b4eb3d8a5165a513cce13c8477f8c39c7269c4c5773abe10"
REFERENCE = {
    "logmel40": (
        "sha256:d40b801ddf1b762da8efd7e2c8f5de4f2fdcf58ec7ba9da60205403054572235",
        "ee9f1b97ca58e9ac7bee6a2bffb039836103435ff71946b1368e39a5d7840dcd",
    ),
    "mfcc26": (
        "sha256:25513a4df9973deb1fec4e3fc969c67a531d86b1cd4756e9b27761039b724e15",
        "97e539bc0d74af7d16f83079373c6d6dfc32a34a6747ae6a4256bb6be6f48285",
    ),
}


def _wav_digest(root):
    h = hashlib.sha256()
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if name.endswith(".wav"):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def iemocap_root(tmp_path_factory):
    return helpers_prep.write_iemocap_tree(tmp_path_factory.mktemp("iemocap"))


# ---------------------------------------------------------------- byte identity


def test_synthetic_corpus_prep_is_byte_identical_to_the_reference(
    tiny_corpus_dir, tiny_prep_dir, tmp_path
):
    if _wav_digest(tiny_corpus_dir) != TINY_CORPUS_DIGEST:
        pytest.fail(
            "the synthetic tiny corpus itself changed (data_prep.synth): the reference hashes "
            "below belong to the corpus with WAV digest " + TINY_CORPUS_DIGEST
        )
    meta = records.load_metadata(tiny_prep_dir)  # conftest: mfcc26, the demo's features
    assert (meta["content_hash"], meta["fingerprint"]) == REFERENCE["mfcc26"]
    meta = data_prep.prepare(
        "iemocap",
        root=tiny_corpus_dir,
        out_dir=tmp_path / "l40",
        feature_config="logmel40",
        workers=1,
        progress=False,
    )
    assert (meta["content_hash"], meta["fingerprint"]) == REFERENCE["logmel40"]


def test_records_equal_segment_audio(iemocap_root, tmp_path):
    """audio.segment_audio is exactly what data_prep stores (both layouts, padded files too)."""
    out = tmp_path / "p"
    meta = data_prep.prepare(
        "iemocap", root=iemocap_root, out_dir=out, feature_config="mfcc26", progress=False
    )
    cfg = audio.FeatureConfig.from_dict(meta["feature_config"])
    layouts = {s: records.load_split(out, s) for s in records.SPLITS}
    for row in meta["utterances"]:
        segs = audio.segment_audio(records.audio_path(meta, row), cfg, hop_seconds=(1.0, 0.4))
        assert segs.padded == row["padded"] and round(segs.duration_s, 6) == row["duration_s"]
        for split, got in zip(records.SPLITS, segs.layouts, strict=True):
            stored = layouts[split].select(layouts[split].utterance_ids == row["utterance_id"])
            np.testing.assert_array_equal(stored.features, got.features)
            np.testing.assert_array_equal(stored.valid_frames, got.valid_frames)
            np.testing.assert_array_equal(stored.segment_index, np.arange(len(got)))


# ---------------------------------------------------------------- segment balance


def _long_and_short(folder):
    """One 30-s file (29 train windows) and five 2.5-s files (1 each)."""
    files = {"long.wav": 30.0, **{f"s{i}.wav": 2.5 for i in range(5)}}
    return helpers_prep.tone_corpus(folder, files, freq=140.0, step=30.0, speakers=3)


def test_summary_warns_about_an_empty_class_and_many_skipped_files(tmp_path):
    manifest = _long_and_short(tmp_path / "c")
    meta = data_prep.prepare("csv", manifest=manifest, out_dir=tmp_path / "a", progress=False)
    # Each class of this manifest lives in one session (said: test_data_prep_manifest.py);
    # in one session in all there is no fold to empty, and nothing to warn about.
    one = [dict(u, session="s0") for u in meta["utterances"]]
    meta = {**meta, "utterances": one}
    assert "warning" not in data_prep.prep_summary({**meta, "segment_balance": {}})
    # A 50-ms clip was kept as a whole window of padding without a word (an audit).
    clips = [dict(u, duration_s=d) for u, d in zip(one, (0.05, 0.2, 0.25), strict=False)]
    text = data_prep.prep_summary({**meta, "utterances": clips + one[3:], "segment_balance": {}})
    assert (
        f"  warning: 2 utterance(s) last under 0.25 s (shortest: {one[0]['utterance_id']}, 0.050 "
        "s): padded to a whole window, they hold next to no speech for their label; check or "
        "leave them out"
    ) in text.splitlines()
    counts = {**meta["counts"], "by_class": {"neutral": 8, "happy": 0, "sad": 4, "angry": 0}}
    counts.update(utterances=12, skipped={"missing_wav": 1})  # 1 of 13 skipped: no warning
    text = data_prep.prep_summary({**meta, "counts": counts, "segment_balance": {}})
    expected = (
        "  warning: no utterance of class happy, angry: a model cannot learn them and UA "
        "scores them 0; fix the rows (skipped and excluded above) or leave them out with "
        "--classes neutral,sad"
    )
    assert text.count("warning") == 1 and expected in text.splitlines()
    one_class = {**counts, "by_class": {"neutral": 0, "happy": 0, "sad": 4, "angry": 0}}
    text = data_prep.prep_summary({**meta, "counts": one_class, "segment_balance": {}})
    assert "--classes" not in text  # "--classes sad" was advised, then refused (2 needed)
    assert (
        "(skipped and excluded above); training needs utterances of at least 2 classes (1 now)"
        in text
    )
    counts["skipped"] = {"missing_wav": 1, "missing_session": 3, "malformed_label_line": 2}
    text = data_prep.prep_summary({**meta, "counts": counts, "segment_balance": {}})
    assert "utterances were skipped" not in text  # folders and lines are not utterances
    counts["skipped"] = {"missing_wav": 1, "unreadable": 1}  # 2 of 14: over a tenth
    text = data_prep.prep_summary({**meta, "counts": counts, "segment_balance": {}})
    assert "  warning: 2 of 14 utterances were skipped (reasons in metadata.json)" in text


def _balance(segments, **kw):
    rows = [{"utterance_id": f"u{i}", "num_train_segments": n} for i, n in enumerate(segments)]
    return pipeline.segment_balance({0: {"rows": rows}}, 1, cap=None, **kw)["dominant"]


def test_dominant_needs_more_than_twice_an_even_share():
    # Five even utterances each supply 20 %, over max_share by arithmetic: not dominant.
    assert _balance([4, 4, 4, 4, 4], max_share=0.1) == []
    # One of five at 50 % is over 2/5 = 40 %.
    assert _balance([8, 2, 2, 2, 2], max_share=0.1) == [
        {"utterance_id": "u0", "segments": 8, "share": 0.5}
    ]
    assert _balance([7, 3, 3, 3, 3], max_share=0.1) == []  # 36.8 %, under 40 %
    # From 2 / max_share = 20 utterances on, max_share alone decides.
    assert [d["utterance_id"] for d in _balance([6] + [2] * 29, max_share=0.09)] == ["u0"]
    assert _balance([2] * 30, max_share=0.01) == []  # 3.3 % each: over 1 %, not twice even
    assert _balance([], max_share=0.1) == [] and _balance([0, 0], max_share=0.1) == []


def test_dominant_utterance_is_warned_about_and_can_be_capped(tmp_path, caplog, capsys):
    manifest = _long_and_short(tmp_path / "c")
    free = data_prep.prepare("csv", manifest=manifest, out_dir=tmp_path / "a", progress=False)
    balance = free["segment_balance"]
    assert balance["total_segments"] == 34 and balance["max_segments_per_utterance"] is None
    assert balance["dominant"] == [{"utterance_id": "long.wav", "segments": 29, "share": 0.8529}]
    assert any(
        "utterance long.wav supplies 29 of the 34 train segments (85 %" in r.getMessage()
        for r in caplog.records
    )
    assert "1 utterance(s) supply more than 10 %" in data_prep.prep_summary(free)
    quiet = data_prep.prepare(
        "csv", manifest=manifest, out_dir=tmp_path / "q", progress=False, max_utterance_share=0.9
    )
    assert (
        quiet["segment_balance"]["dominant"] == [] and quiet["fingerprint"] == free["fingerprint"]
    )

    out = tmp_path / "b"
    argv = ["csv", "--manifest", str(manifest), "--out", str(out), "--no-progress"]
    assert cli.main([*argv, "--max-segments-per-utterance", "3", "--workers", "2"]) == 0
    capped = records.load_metadata(out)
    assert (
        "capped: 1 utterance(s) at 3 train segments (26 segments left out)"
        in capsys.readouterr().out
    )
    row = next(r for r in capped["utterances"] if r["utterance_id"] == "long.wav")
    assert (row["num_train_segments"], row["train_segments_before_cap"]) == (3, 29)
    assert row["num_eval_segments"] == 71  # the eval layout keeps every window
    b = capped["segment_balance"]
    assert (b["max_segments_per_utterance"], b["capped_utterances"]) == (3, 1)
    assert (b["segments_removed_by_cap"], b["total_segments"]) == (26, 8)
    assert capped["fingerprint"] != free["fingerprint"]
    assert capped["splits"]["eval"]["sha256"] == free["splits"]["eval"]["sha256"]
    # The kept windows are the first, middle and last, with their own segment index.
    all_train = records.load_split(tmp_path / "a", "train")
    full = all_train.select(all_train.utterance_ids == "long.wav")
    some = records.load_split(out, "train")
    some = some.select(some.utterance_ids == "long.wav")
    assert some.segment_index.tolist() == [0, 14, 28]
    np.testing.assert_array_equal(some.features, full.features[[0, 14, 28]])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_segments_per_utterance": 0}, "positive integer"),
        ({"max_segments_per_utterance": 2.5}, "positive integer"),
        ({"max_utterance_share": 0.0}, r"in \(0, 1\]"),
        ({"max_utterance_share": 1.5}, r"in \(0, 1\]"),
    ],
)
def test_bad_balance_options(iemocap_root, tmp_path, options, match):
    with pytest.raises(sources.PrepError, match=match):
        data_prep.prepare("iemocap", root=iemocap_root, out_dir=tmp_path, **options)


# ---------------------------------------------------------------- OS errors


def _fake_open(real_open, fail):
    """An ``open`` for the pipeline module that hands ``fail(path, mode)`` the decision."""

    def fake_open(path, mode="r", *args, **kwargs):
        return fail(os.fspath(path), mode) or real_open(path, mode, *args, **kwargs)

    return fake_open


def test_read_only_out_dir_is_one_line(iemocap_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        probe = out / "probe"
        try:
            probe.write_text("x")  # root ignores the mode bits: inject the error instead
            probe.unlink()
            injected = True
        except PermissionError:
            injected = False
        if injected:

            def fail(path, mode):
                if "w" in mode and path.startswith(str(out)):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

            monkeypatch.setattr(pipeline, "open", _fake_open(open, fail), raising=False)
        argv = ["iemocap", "--root", iemocap_root, "--out", str(out), "--workers", "1"]
        rc = cli.main([*argv, "--no-progress"])
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    pattern = rf"data_prep: error: {re.escape(str(out))}/\S+: Permission denied"
    assert re.fullmatch(pattern, err.strip()), err


class _FullDisk:
    """A file whose writes fail like a full disk (the errno carries no file name)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        self._f.close()


def test_full_disk_at_the_shard_writer_is_one_line_and_resumable(
    iemocap_root, tmp_path, capsys, monkeypatch
):
    clean = tmp_path / "clean"
    data_prep.prepare(
        "iemocap", root=iemocap_root, out_dir=clean, workers=1, progress=False, num_shards=3
    )
    out = tmp_path / "full"
    real_open = open

    def fail(path, mode):
        if path.endswith("-00001-of-00003.tmp"):  # shard 0 completes, shard 1 hits the wall
            return _FullDisk(real_open(path, mode))

    monkeypatch.setattr(pipeline, "open", _fake_open(real_open, fail), raising=False)
    argv = ["iemocap", "--root", iemocap_root, "--out", str(out), "--shards", "3"]
    rc = cli.main([*argv, "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    shard = out / ".prep" / "iemocap-train.tfrecord-00001-of-00003.tmp"
    assert rc == 2 and err == f"data_prep: error: {shard}: No space left on device"
    assert (out / ".prep" / "shard-00000.json").exists()
    monkeypatch.undo()
    assert cli.main([*argv, "--workers", "1", "--no-progress"]) == 0
    assert helpers_prep.tree_bytes(out) == helpers_prep.tree_bytes(clean)
