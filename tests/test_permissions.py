"""Files and folders this user may not read or change: named as such, never taken for damaged,
changed or missing ones (a permission problem is fixed by ``chmod``, not by ``--overwrite``).

Root ignores file modes, so the denials are simulated (:mod:`helpers_permissions`); each case
was also run for real as an unprivileged user (README "Bad input").
"""

import errno
import os
import shutil

import helpers_permissions as deny
import helpers_prep
import pytest
import soundfile as sf

from data_prep import cli, inputs, manifest, pipeline, sources
from dkd_jax import audio, checkpointing, jsonio, records, run_dir

_TENSORSTORE_DENIED = (
    'PERMISSION_DENIED: Error opening "zarr" driver: Error reading "bad_step/.zarray" in OCDBT '
    'database at local file "/r/checkpoints/4/state/": Error reading local file '
    '"/r/checkpoints/4/state/manifest.ocdbt": Failed to open: '
    '"/r/checkpoints/4/state/manifest.ocdbt": Permission denied{code} '
    '[tensorstore_spec=\'{{"driver":"zarr","kvstore":{{"path":"/r/checkpoints/4/"}}}}\']'
)


def _args(root, out):
    """The command that made conftest's tiny_prep_dir from tiny_corpus_dir (rerun: done)."""
    source = ["iemocap", "--root", str(root), "--out", str(out), "--features", "mfcc26"]
    return [*source, "--no-progress", "--workers", "1"]


def _utterance(path, rel_path):
    return sources.Utterance(rel_path, path, rel_path, 0, "sad", "sad", "s", "1", "", "")


def _one_wav(root):
    """A recording that data_prep prepares (the tree also holds excluded ones)."""
    return pipeline.scan("iemocap", root=root).utterances[0].path


# ---------------------------------------------------------------- audio


def test_an_unreadable_recording_is_no_access_not_a_bad_file(tmp_path, monkeypatch):
    wav = tmp_path / "a.wav"
    sf.write(wav, helpers_prep.tone(1.0), 16000)
    audio.check_audio_path(wav)  # readable: passes
    deny.deny_open(monkeypatch, audio, wav)
    with pytest.raises(audio.AudioError) as e:  # was: "not a readable audio file (System error)"
        audio.load_audio(wav, sample_rate=16000)
    assert e.value.kind == audio.NO_ACCESS
    assert str(e.value) == f"{wav}: cannot open file (Permission denied)"
    with pytest.raises(audio.AudioError) as e:
        audio.check_audio_path(tmp_path / "missing.wav")
    assert e.value.kind == "unreadable"  # missing: still a bad path, not a permission


def test_data_prep_stops_on_unreadable_audio_instead_of_skipping_it(
    tiny_corpus_dir, tmp_path, monkeypatch, capsys
):
    """It used to skip the file as "unreadable" and exit 0: a corpus silently smaller."""
    wav = _one_wav(tiny_corpus_dir)
    deny.deny_open(monkeypatch, pipeline, wav)
    out = tmp_path / "o"
    assert cli.main(_args(tiny_corpus_dir, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"data_prep: error: 1 audio file(s) cannot be read by this user (Permission denied): "
        f"{wav}; fix their permissions, or run data_prep as a user who may read them"
    )
    assert not out.exists()  # refused before any work


def test_a_manifest_row_this_user_may_not_read_is_named_not_skipped(tmp_path, monkeypatch, capsys):
    """Rows whose file shares its size with another are hashed (repeated recordings), and a
    file in a folder this user may not enter looked missing: both were skipped, exit 0."""
    folder = tmp_path / "c"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.wav", "b.wav", "sub/d.wav"):  # the same length: the same size
        sf.write(folder / name, helpers_prep.tone(2.1, seed=len(name)), 16000)
    path = folder / "manifest.csv"
    path.write_text("path,label,speaker\na.wav,sad,s1\nb.wav,angry,s2\nsub/d.wav,sad,s3\n")
    b, d = folder / "b.wav", folder / "sub" / "d.wav"
    deny.deny_open(monkeypatch, manifest, b)
    deny.deny_open(monkeypatch, pipeline, b, d)
    real_stat = os.stat

    def stat(p, *args, **kwargs):  # sub/ of mode 666: its files cannot even be looked at
        if os.path.abspath(p) == str(d):
            raise deny.permission_error(p)
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os.path, "getsize", lambda p: stat(p).st_size)
    argv = ["csv", "--manifest", str(path), "--out", str(tmp_path / "o"), "--workers", "1"]
    assert cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"2 audio file(s) cannot be read by this user (Permission denied): {b}, {d}" in err


def test_a_worker_does_not_skip_a_file_whose_permissions_change_during_the_run(monkeypatch):
    from data_prep import workers

    def denied(path, cfg, **kwargs):
        raise audio.AudioError(path, "cannot open file (Permission denied)", audio.NO_ACCESS)

    monkeypatch.setattr(audio, "segment_audio", denied)
    utt = _utterance("/c/u.wav", "u.wav")
    monkeypatch.setitem(workers._state, "cfg", audio.FEATURE_PRESETS["mfcc26"])
    monkeypatch.setitem(workers._state, "corpus", "c")
    with pytest.raises(audio.AudioError, match="Permission denied"):
        workers.process_utterance(utt)


# ---------------------------------------------------------------- a finished prep, rerun


@pytest.mark.parametrize("which", ["metadata", "shard", "inputs"])
def test_a_rerun_names_an_unreadable_prep_file_not_a_damaged_one(
    tiny_prep_dir, tiny_corpus_dir, monkeypatch, capsys, which
):
    """metadata.json was called "unreadable (damaged?)" with --overwrite suggested; an
    unreadable shard gave "nothing to do" (exit 0); an unreadable inputs.sha256 skipped the
    check for audio changed in place."""
    prepared = tiny_prep_dir  # the session's: a refused rerun writes nothing
    meta = records.load_metadata(prepared)
    assert cli.main(_args(tiny_corpus_dir, prepared)) == 0  # readable: nothing to do
    capsys.readouterr()
    path, module = {
        "metadata": (prepared / records.METADATA_FILE, pipeline),
        "shard": (prepared / meta["splits"]["eval"]["files"][0], pipeline),
        "inputs": (prepared / inputs.INPUTS_FILE, inputs),
    }[which]
    deny.deny_open(monkeypatch, module, path)
    assert cli.main(_args(tiny_corpus_dir, prepared)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"data_prep: error: {path}: Permission denied"


def test_an_input_that_cannot_be_hashed_is_not_called_changed(tmp_path, monkeypatch):
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF")
    marker = tmp_path / "metadata.json"
    marker.write_text("{}")
    inputs.write_digests(str(tmp_path), [_utterance(str(wav), "a.wav")])
    os.utime(wav, ns=(os.stat(marker).st_mtime_ns + 10**9,) * 2)  # modified after the prep
    assert inputs.changed(str(tmp_path), str(marker), [("a.wav", str(wav))]) == []
    deny.deny_open(monkeypatch, inputs, wav)
    with pytest.raises(PermissionError):  # was: listed as changed
        inputs.changed(str(tmp_path), str(marker), [("a.wav", str(wav))])


def test_a_folder_that_cannot_be_listed_is_said_when_looking_for_unlisted_audio(
    tmp_path, monkeypatch, caplog
):
    folder = tmp_path / "c"
    folder.mkdir()
    for name in ("a.wav", "extra.wav"):
        sf.write(folder / name, helpers_prep.tone(2.1), 16000)
    path = folder / "manifest.csv"
    path.write_text("path,label,speaker\na.wav,sad,s1\n")
    deny.deny_listdir(monkeypatch, folder)
    with caplog.at_level("WARNING", logger="data_prep"):
        scan = manifest.scan_csv(path)
    assert len(scan.utterances) == 1
    assert [r.getMessage() for r in caplog.records] == [  # was: nothing
        f"warning: {path}: cannot list {folder} (Permission denied), so audio files there that "
        "no row names are not looked for"
    ]


# ---------------------------------------------------------------- checkpoints and run folders


@pytest.mark.parametrize("code", ["", " [os_error_code='13']"])
def test_a_tensorstore_error_is_described_by_its_file_and_reason(code):
    e = ValueError(_TENSORSTORE_DENIED.format(code=code))
    assert checkpointing.describe_error(e) == (
        "ValueError: PERMISSION_DENIED: /r/checkpoints/4/state/manifest.ocdbt: Permission denied"
    )  # was: the first 200 characters, cut inside the file name
    assert checkpointing.permission_denied(e)


# Messages as tensorstore 0.1 gives them (chunk of mode 000; a damaged .zarray; a cut chunk).
_TENSORSTORE_MESSAGES = [
    (
        'PERMISSION_DENIED: Error reading "d/ab12" in OCDBT database at local file '
        '"/r/2/state/": Error reading Byte range [0, 205) of local file "/r/2/state/d/ab12": '
        "Failed to open: \"/r/2/state/d/ab12\": Permission denied [os_error_code='13'] "
        "[source locations='tensorstore/kvstore/file/file_key_value_store.cc:312']",
        "PERMISSION_DENIED: /r/2/state/d/ab12: Permission denied",
    ),
    (
        'FAILED_PRECONDITION: Error opening "zarr" driver: Error reading local file '
        '"/r/4/state/bad_step/.zarray": Error parsing object member "shape": Expected array, '
        'but received: 3 [tensorstore_spec=\'{"driver":"zarr"}\']',
        'FAILED_PRECONDITION: /r/4/state/bad_step/.zarray: Error parsing object member "shape": '
        "Expected array, but received: 3",
    ),
    (
        'DATA_LOSS: Error reading "x": Unexpected end of file',  # no absolute path: as is
        'DATA_LOSS: Error reading "x": Unexpected end of file',
    ),
]


@pytest.mark.parametrize("message, described", _TENSORSTORE_MESSAGES)
def test_describe_error_names_the_last_file_and_what_is_wrong_with_it(message, described):
    assert checkpointing.describe_error(ValueError(message)) == f"ValueError: {described}"
    assert checkpointing.permission_denied(ValueError(message)) == message.startswith("PERM")
    long = ValueError("x" * 1000)
    assert checkpointing.describe_error(long) == f"ValueError: {'x' * 300}..."


def test_permission_denied_finds_the_os_error_in_the_chain():
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/r/4")
        except OSError as inner:
            raise RuntimeError("restore failed") from inner
    except RuntimeError as e:
        assert checkpointing.permission_denied(e)
    assert checkpointing.permission_denied(ValueError("x [os_error_code='1']"))  # EPERM
    assert not checkpointing.permission_denied(ValueError("x [os_error_code='2']"))
    assert not checkpointing.permission_denied(OSError(errno.ENOSPC, "No space left"))


def test_a_checkpoint_folder_that_cannot_be_listed_is_one_error(tmp_path, monkeypatch):
    """orbax's cleanup thread used to log 40 lines of tracebacks after the error."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    deny.deny_listdir(monkeypatch, folder)

    def manager(*args, **kwargs):  # its cleanup thread is what logged the tracebacks
        raise AssertionError("the orbax manager was built on a folder it cannot list")

    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", manager)
    with pytest.raises(PermissionError) as e:
        checkpointing.Checkpointer(folder, max_to_keep=1)
    assert e.value.filename == str(folder)


def test_remove_tree_names_the_full_path_of_what_it_cannot_delete(tmp_path, monkeypatch):
    """--overwrite used to ignore such failures; training then failed an epoch later on a file
    named only by its last component."""
    stuck = tmp_path / "run" / "checkpoints" / "4"
    stuck.mkdir(parents=True)
    (stuck / "_CHECKPOINT_METADATA").write_text("{}")
    real = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).endswith("_CHECKPOINT_METADATA"):
            raise deny.permission_error(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(PermissionError) as e:
        run_dir.clear_run(tmp_path / "run")
    assert e.value.filename == str(stuck / "_CHECKPOINT_METADATA")
    monkeypatch.undo()
    run_dir.remove_tree(tmp_path / "run" / "checkpoints")
    run_dir.remove_tree(tmp_path / "run" / "checkpoints")  # gone: nothing to do
    assert not (tmp_path / "run" / "checkpoints").exists()
    shutil.rmtree(tmp_path / "run")


def test_remove_tree_of_a_symbolic_link_removes_the_link_not_its_target(tmp_path):
    """A run's checkpoints/ linked to scratch space: rmtree refuses links, so --overwrite
    used to leave the old checkpoints in place (and then, with errors raised, could not run)."""
    target = tmp_path / "scratch"
    target.mkdir()
    (target / "4").mkdir()
    link = tmp_path / "run" / "checkpoints"
    link.parent.mkdir()
    link.symlink_to(target)
    run_dir.clear_run(tmp_path / "run")
    assert not os.path.lexists(link) and (target / "4").is_dir()


# ---------------------------------------------------------------- experiments, JSON, corpora


def test_an_unwritable_compilation_cache_is_one_warning_not_one_per_program(
    tmp_path, monkeypatch, capsys
):
    """JAX warned, with a traceback, for every program it could not store in EXP/.jax_cache."""
    import jax

    from dkd_jax import train_lib

    monkeypatch.delenv(train_lib.CACHE_ENV, raising=False)

    def temporary_file(dir=None, prefix=None):
        raise deny.permission_error(os.path.join(dir, prefix))

    monkeypatch.setattr(jsonio.tempfile, "TemporaryFile", temporary_file)
    monkeypatch.setattr(jax.config, "update", lambda *a: pytest.fail("cache enabled"))
    for _ in range(2):  # the experiment runner, then each run
        assert train_lib.enable_compilation_cache(tmp_path / "cache") is False
    assert capsys.readouterr().err == (  # once
        f"warning: compilation cache {tmp_path / 'cache'} is not writable (Permission denied); "
        "compiling without it\n"
    )
    monkeypatch.undo()
    assert jsonio.unwritable(tmp_path) is None and os.listdir(tmp_path) == ["cache"]


def test_an_atomic_write_names_the_file_or_folder_not_its_temporary_file(tmp_path, monkeypatch):
    from pathlib import Path

    target = tmp_path / "summary.json"
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".summary.json.tmp"):
            raise deny.permission_error(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(PermissionError) as e:  # root may write here: the file is named
        jsonio.write_text(target, "{}")
    assert e.value.filename == str(target)
    monkeypatch.setattr(jsonio, "unwritable", lambda folder: "Permission denied")  # mode 555
    with pytest.raises(PermissionError) as e:
        jsonio.write_text(target, "{}")
    assert e.value.filename == str(tmp_path) and os.listdir(tmp_path) == []
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):  # a folder it may write into but not search (766)
        if self.name.startswith(".summary.json.tmp"):
            raise deny.permission_error(self)
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(PermissionError) as e:  # the cleanup's own error does not replace it
        jsonio.write_text(target, "{}")
    assert e.value.filename == str(tmp_path)


def test_an_unreadable_corpus_summary_asks_for_permissions_not_an_empty_folder(
    tmp_path, monkeypatch
):
    from data_prep import synth

    (tmp_path / synth._SUMMARY).write_text("{}")
    deny.deny_path_reads(monkeypatch, tmp_path / synth._SUMMARY)
    with pytest.raises(ValueError) as e:
        synth._check_out_dir(tmp_path, {"size": "tiny"})
    assert str(e.value) == (
        f"synthetic corpus: cannot read {tmp_path / synth._SUMMARY} (Permission denied); fix "
        "its permissions"
    )


def test_orbaxs_missing_metadata_warning_is_dropped_and_nothing_else(tmp_path):
    # Logged for a step folder being written by a training process, or one this user may not
    # read, before the one-line error that says what matters.
    import logging

    def record(level, msg, path="/x/orbax/checkpoint/_src/metadata/checkpoint.py"):
        return logging.LogRecord("absl", level, path, 1, msg, (), None)

    drop = checkpointing._missing_metadata_filter
    assert not drop(record(logging.WARNING, "Metadata file does not exist: %s"))
    assert drop(record(logging.WARNING, "Something else: %s"))
    assert drop(record(logging.ERROR, "Metadata file does not exist: %s"))
    assert drop(record(logging.WARNING, "Metadata file does not exist: %s", "/x/mine.py"))
    checkpointing.Checkpointer(tmp_path / "c", max_to_keep=1, read_only=True).close()
    assert drop in logging.getLogger("absl").filters  # installed by the first Checkpointer
