"""dkd_jax.host_memory: glibc keeps large freed blocks mapped, and every command line asks for it.

The allocator behaviour is checked in child processes (the settings are per process and this
test process already has them, from conftest): a 64 MiB block malloc'ed, written, freed and
malloc'ed again must not fault its pages in a second time once configured, and must with glibc's
defaults (which is what cost XLA:CPU a quarter of each training step).
"""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import eval as eval_cli  # the script at the repository root (pytest pythonpath)
import train as train_cli
from dkd_jax import demo, host_memory
from dkd_jax.experiment import cli as experiment_cli

ROOT = Path(__file__).resolve().parents[1]
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

_CHILD = r"""
import ctypes, json, resource, sys
sys.path.insert(0, sys.argv[1])
from dkd_jax import host_memory
state = host_memory.configure()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": faults}))
"""


def _child(env_value):
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["DKD_JAX_MALLOC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return json.loads(out)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_configured_process_reuses_a_large_freed_block_without_faulting_it_again():
    pages = (64 << 20) // 4096
    configured = _child(None)
    assert configured["state"]["applied"] is True
    assert configured["state"]["settings"] == {
        "M_ARENA_MAX": 1,
        "M_MMAP_MAX": 0,
        "M_TRIM_THRESHOLD": host_memory.TRIM_THRESHOLD_BYTES,
    }
    first, second = configured["faults"]
    assert first > pages // 2  # the first use touches fresh memory
    assert second < pages // 20  # the same memory, still mapped

    default = _child("default")
    assert default["state"] == {"applied": False, "reason": "DKD_JAX_MALLOC=default"}
    assert min(default["faults"]) > pages // 2  # glibc's default: mmap'ed, unmapped, again


def test_configure_runs_once_per_process():
    assert host_memory.configure() is host_memory.configure()


class _Called(Exception):
    pass


def _refuse(*_args, **_kwargs):
    raise _Called


@pytest.mark.parametrize(
    "main, argv",
    [
        (train_cli.main, ["--data", "PREP", "--workdir", "WORK"]),
        (eval_cli.main, ["--workdir", "WORK"]),
        (eval_cli.main, ["predict", "--model", "M", "a.wav"]),
        (experiment_cli.main, ["summarize", "EXP"]),
        (demo.main, ["--out", "OUT"]),
    ],
    ids=["train", "eval", "eval-predict", "experiment", "demo"],
)
def test_every_command_line_configures_the_allocator_before_doing_anything(monkeypatch, main, argv):
    monkeypatch.setattr(host_memory, "configure", _refuse)
    with pytest.raises(_Called):
        main(argv)
