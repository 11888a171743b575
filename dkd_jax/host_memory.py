"""Host memory allocator settings that stop XLA:CPU from page-faulting its buffers every step.

XLA:CPU asks ``malloc`` for each executable's temporary buffer on every call (214 MiB for a
teacher training step at batch 32 on 26×63 MFCC) and frees it at the end. glibc serves a
request that large from a fresh ``mmap`` (XLA's worker threads allocate from their own arenas,
whose heaps stop at 64 MB, so no ``M_MMAP_THRESHOLD`` avoids it) and returns it to the kernel on
``free``, so every step faults in every page of it again: 55,000 page faults, and 28 % of
the step's CPU time spent in the kernel.

:func:`configure` switches glibc to one arena (``M_ARENA_MAX=1``), no ``mmap`` for large blocks
(``M_MMAP_MAX=0``) and never gives freed heap back to the kernel (``M_TRIM_THRESHOLD=-1``), so
the block is reused step after step. Nothing numerical changes: XLA asks for the same alignment
and runs the same kernels on the same values; ``python -m dkd_jax.experiment reproduce`` matched
bit for bit.

The trim threshold used to be 1 GiB, which fails exactly where the buffers are largest: when the
freed block on top of the heap exceeds it, glibc trims it and the next step faults it in again.
A student CE step on 40×200 log-mels at batch 256 (two threads) still took 678,535 page faults
and 1.65 s of kernel time per 5.8 s step with 1 GiB; with trimming off, 113 and 4.4 s: 1.33×
faster, the same loss bit for bit, and a lower peak resident set (3,400 against 5,456 MiB).
``bench/profile_step.py`` showed the page-faulting buffers; ``python bench/host_memory.py
--models student --batch 256 --shape 40x200 --steps 3 --settings trim1g,configured`` measured
the two settings side by side (``bench/results/host_memory_cpu_student_b256_40x200_trim.json``).

Measured on the 2-core dev machine (``python bench/host_memory.py``, three interleaved rounds,
``bench/results/host_memory_cpu.json``): CE training steps at batch 32 on 26×63 MFCC 1.23× faster
for the teacher and the student, kernel time 2.9 → 0.3 s per 30 teacher steps; the README demo
194 → 167 s. The price: compiling is slower (one arena for LLVM's threads: a step's compile
2.3 → 3.6 s, about 35 steps of the teacher's gain), and the process keeps its peak heap
(the teacher bench's resident set 731 → 1,334 MiB; the whole demo peaked lower, 2.34 against
2.55 GiB). Inference gains nothing (its buffers are small) and was 7–9 % slower at batch 32
(``--op inference``, ``bench/results/host_memory_cpu_inference.json``, a loaded machine). So the
training command lines use it (training is steps); ``eval.py`` does not, and neither does the
test suite (it is compiles: ``tests/conftest.py`` sets ``DKD_JAX_MALLOC=default``;
``tests/test_train_lib.py`` took 78–82 s, and 100–106 s with the setting).

The training command lines (``train.py``, ``python -m dkd_jax.experiment``, the demo) and the
benchmarks call it first, before JAX runs anything: called late, it loses most of its effect
(threads that have already allocated keep their arenas, and glibc hands those arenas to new
threads too). Library users opt in the same way, at the top of their script. It does nothing
off glibc (macOS, musl) and when ``DKD_JAX_MALLOC=default`` is set.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: ``mallopt`` parameters (glibc ``malloc.h``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: ``M_TRIM_THRESHOLD`` value: -1 turns glibc's trimming of the heap top off (``mallopt(3)``),
#: so freed memory of any size stays mapped for the next step. A byte threshold (1 GiB before)
#: lets the largest buffers, those of big batches, be unmapped and faulted in every step.
TRIM_THRESHOLD = -1
#: The environment variable that turns :func:`configure` off (value ``default``).
ENV_VAR = "DKD_JAX_MALLOC"

_state: dict[str, object] | None = None


def configure() -> dict[str, object]:
    """Applies the allocator settings once per process (later calls return the first result).

    Returns:
      ``{"applied": bool, "reason": str}``; when applied, also the settings. Benchmarks record
      it next to their numbers.
    """
    global _state
    if _state is not None:
        return _state
    if os.environ.get(ENV_VAR, "").strip().lower() == "default":
        _state = {"applied": False, "reason": f"{ENV_VAR}=default"}
        return _state
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        _state = {"applied": False, "reason": f"not glibc ({sys.platform})"}
        return _state
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError) as e:
        _state = {"applied": False, "reason": f"mallopt unavailable: {e}"}
        return _state
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = {
        "M_ARENA_MAX": (_M_ARENA_MAX, 1),
        "M_MMAP_MAX": (_M_MMAP_MAX, 0),
        "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    }
    refused = [name for name, (param, value) in settings.items() if mallopt(param, value) != 1]
    _state = {
        "applied": not refused,
        "reason": f"mallopt refused {refused}" if refused else "glibc mallopt",
        "settings": {name: value for name, (_, value) in settings.items()},
    }
    return _state
