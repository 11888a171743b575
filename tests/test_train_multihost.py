"""Two processes on localhost (one CPU device each, gloo collectives) train one model together.

This is the multi-host path of train.py end to end: jax.distributed.initialize from
--coordinator/--num-processes/--process-id, a pmap whose collectives span both processes, each
process reading its share of the training segments, process 0 writing the logs, both taking
part in the orbax checkpoint.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_training_on_localhost(tiny_prep_dir, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per process
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    workdir = tmp_path / "run"
    procs = []
    for pid in range(2):
        cmd = [
            sys.executable,
            str(REPO / "train.py"),
            "--data",
            str(tiny_prep_dir),
            "--workdir",
            str(workdir),
            "--role",
            "teacher",
            "--preset",
            "tiny",
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(pid),
            "--config.optim.num_epochs=1",
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two training processes did not finish in 400 s")
        outs.append((p.returncode, out, err))
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]
    assert summaries[0] == summaries[1]  # both processes evaluate the same model
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    start, final = events[0], events[-1]
    assert start["event"] == "start" and final["event"] == "final"  # written once, by process 0
    assert start["num_devices"] == 2 and final["process_count"] == 2
    assert start["on_device"] is False  # "auto" streams on CPU
    # Each process trained on its half of the segments (the other half is the other process's).
    assert start["num_train_segments"] < start["num_train_segments_global"]
    assert (workdir / "checkpoints" / str(final["step"])).is_dir()
