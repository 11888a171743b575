"""Tests of data_prep.workers: killing a prep run (SIGKILL or SIGTERM) leaves no worker behind
and SIGTERM keeps it resumable; the train-window cap's spread; worker counts; and a feature path
that never imports librosa/numba (their import, per worker, dominated small preps)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import helpers_prep
import numpy as np
import pytest
import soundfile as sf

import data_prep
from data_prep import workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = sys.platform.startswith("linux")


def _long_corpus(folder, n=40, seconds=15.0):
    """``n`` tone WAVs of about ``seconds`` each (enough work to outlast the kill)."""
    files = {f"u{i:03d}.wav": seconds + 0.01 * i for i in range(n)}
    return helpers_prep.tone_corpus(folder, files)


def _proc_stat(pid):
    """(state, ppid, pgrp) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _processes(where):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None and stat[0] != "Z" and where(stat):
                found.append(int(name))
    return found


@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_data_prep_leaves_no_worker(tmp_path, sig):
    manifest = _long_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    argv = ["--manifest", str(manifest), "--out", str(out), "--workers", "2", "--no-progress"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err_file:  # a file, not a pipe: a surviving worker would hold a pipe
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_prep", "csv", *argv],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,  # its own process group: every worker stays findable
        )
    group = proc.pid
    try:
        deadline = time.monotonic() + 60
        while len(_processes(lambda s: s[1] == proc.pid)) < 2:
            if proc.poll() is not None:
                pytest.fail(f"the prep ended before two workers were seen: {log.read_text()}")
            assert time.monotonic() < deadline, "no workers after 60 s"
            time.sleep(0.01)
        killed_at = time.monotonic()
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        left = _processes(lambda s: s[2] == group)
        while left and time.monotonic() - killed_at < 5:
            time.sleep(0.05)
            left = _processes(lambda s: s[2] == group)
        assert not left, f"workers still alive 5 s after {sig.name}: {left}"
    finally:
        for pid in _processes(lambda s: s[2] == group):  # leftovers of a failed run
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert "terminated; run the same command again to resume" in err
        assert "Traceback" not in err
        assert (out / ".prep" / "state.json").exists()  # resumable
        meta = data_prep.prepare("csv", manifest=manifest, out_dir=out, workers=1, progress=False)
        assert meta["counts"]["utterances"] == 40 and not (out / ".prep").exists()


def test_spread_keeps_first_and_last_evenly():
    np.testing.assert_array_equal(workers.spread(29, 3), [0, 14, 28])
    np.testing.assert_array_equal(workers.spread(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(workers.spread(5, 8), np.arange(5))
    np.testing.assert_array_equal(workers.spread(7, 1), [0])
    for count in range(1, 40):
        for keep in range(1, 12):
            idx = workers.spread(count, keep)
            assert len(idx) == min(count, keep)
            assert np.all(np.diff(idx) > 0) and idx[0] == 0
            assert idx.max() == (count - 1 if keep > 1 else 0)


def test_default_workers_never_exceed_the_work():
    assert workers.default_workers(10, 8) == 3  # ceil(10 / CHUNK)
    assert workers.default_workers(1, None) == 1
    assert workers.default_workers(10_000, 2) == 2
    assert 1 <= workers.default_workers(10_000, None) <= (os.cpu_count() or 1)


def test_feature_path_never_imports_librosa(tmp_path):
    """The worker's whole path (44.1 kHz file → both layouts, log-mel and MFCC) is librosa-free."""
    path = tmp_path / "a.wav"
    sf.write(path, helpers_prep.tone(2.5, sample_rate=44100), 44100)
    code = textwrap.dedent(
        f"""
        import sys
        from data_prep import workers
        from data_prep.sources import Utterance
        from dkd_jax import audio
        for name in ("logmel40", "mfcc26"):
            cfg = audio.FEATURE_PRESETS[name]
            workers.warm_up(cfg)
            workers.init_worker(cfg.to_dict(), "csv")
            utt = Utterance("a", {str(path)!r}, "a.wav", 0, "neutral", "neutral", "s", "s", "", "")
            res = workers.process_utterance(utt)
            assert res[0] == "ok" and res[3] == 1 and res[5] == 2, res[:2]
        heavy = sorted(m for m in ("librosa", "numba", "scipy.signal") if m in sys.modules)
        print(heavy)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
