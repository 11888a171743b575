"""Test-wide setup: CPU only, two forced host devices so every pmap path runs.

XLA_FLAGS must be set before JAX initialises its backend, so it is set here at import time,
before any test module touches JAX.
"""

import atexit
import os
import shutil
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One persistent XLA compilation cache for the whole session (this process, both pytest-xdist
# workers of the README's `-n 2`, and every process a test starts): many tests compile the same
# tiny networks, and a cache hit skips the backend compile (the same executable, so no number
# changes). Removed when the session ends. The
# experiment runner keeps it too (train_lib.enable_compilation_cache: the environment wins).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dkd_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# glibc's default allocator for the whole session, subprocesses included: the command lines'
# one-arena setting (dkd_jax.host_memory) makes training steps faster but compiles slower, and
# the suite is mostly compiles (tests/test_train_lib.py: 78-82 s as is, 100-106 s with it).
# tests/test_host_memory.py checks the setting in its own child processes.
os.environ.setdefault("DKD_JAX_MALLOC", "default")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory):
    """A tiny synthetic corpus in the real IEMOCAP layout (built once per test session)."""
    from data_prep import synth

    out = tmp_path_factory.mktemp("tiny_corpus")
    synth.generate_corpus(out, size="tiny", seed=0, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_prep_dir(tiny_corpus_dir, tmp_path_factory):
    """The tiny corpus prepared to MFCC-26 TFRecords (26x63 segments: cheapest model input)."""
    import data_prep
    from dkd_jax import audio

    out = tmp_path_factory.mktemp("tiny_prep")
    data_prep.prepare(
        "iemocap",
        out_dir=out,
        root=tiny_corpus_dir,
        dialogs="all",
        feature_config=audio.FEATURE_PRESETS["mfcc26"],
        workers=1,
        progress=False,
    )
    return out
