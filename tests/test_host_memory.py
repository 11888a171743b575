"""dkd_jax.host_memory: glibc keeps large freed blocks mapped, and every command line asks for it.

The allocator behaviour is checked in child processes (the settings are per process, and the
test session runs with glibc's defaults: conftest sets DKD_JAX_MALLOC=default): a 64 MiB block
malloc'ed, written, freed and malloc'ed again must not fault its pages in a second time once
configured, and must with glibc's defaults (which is what cost XLA:CPU a quarter of each
training step). Each child is compared with itself, so the thresholds hold with 4 KiB pages and
with transparent huge pages alike.
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
size = int(sys.argv[2]) << 20
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": faults}))
"""


def _child(env_value, mib=64):
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["DKD_JAX_MALLOC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), str(mib)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return json.loads(out)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_configured_process_reuses_a_large_freed_block_without_faulting_it_again():
    configured = _child(None)
    assert configured["state"]["applied"] is True
    assert configured["state"]["settings"] == {
        "M_ARENA_MAX": 1,
        "M_MMAP_MAX": 0,
        "M_TRIM_THRESHOLD": -1,  # trimming off
    }
    first, second = configured["faults"]
    assert first >= 16  # the first use faults fresh memory in (16,384 pages; 32 huge pages)
    assert second <= first // 10  # the same memory, still mapped

    default = _child("default")
    assert default["state"] == {"applied": False, "reason": "DKD_JAX_MALLOC=default"}
    first, second = default["faults"]
    assert first >= 16 and second >= first // 2  # glibc's default: mmap'ed, unmapped, again


def _available_mib():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.skipif(_available_mib() < 4096, reason="needs 4 GiB of free memory")
def test_a_block_larger_than_a_gibibyte_is_not_faulted_in_again():
    """A training step's buffers at batch 256 on 40×200 exceed 1 GiB; the trim threshold that
    was 1 GiB let glibc unmap such a block on free, and every step faulted it in again."""
    first, second = _child(None, mib=1280)["faults"]
    assert first >= 320  # 327,680 pages; 640 huge pages
    assert second <= first // 10


class _Called(Exception):
    pass


def _refuse(*_args, **_kwargs):
    raise _Called


@pytest.mark.parametrize(
    "main, argv",
    [
        (train_cli.main, ["--data", "PREP", "--workdir", "WORK"]),
        (experiment_cli.main, ["summarize", "EXP"]),
        (demo.main, ["--out", "OUT"]),
    ],
    ids=["train", "experiment", "demo"],
)
def test_every_training_command_line_configures_the_allocator_first(monkeypatch, main, argv):
    monkeypatch.setattr(host_memory, "configure", _refuse)
    with pytest.raises(_Called):
        main(argv)


def test_eval_leaves_the_allocator_alone(monkeypatch, tmp_path):
    # Inference only: no gain measured, 7-9 % slower at batch 32 (bench/host_memory.py --op
    # inference), so eval.py keeps glibc's defaults.
    monkeypatch.setattr(host_memory, "configure", _refuse)
    assert eval_cli.main(["--workdir", str(tmp_path / "missing")]) == 2
