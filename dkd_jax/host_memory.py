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

The price in memory, and the watchdog. A heap that is never trimmed keeps every freed buffer,
and when the next step's buffers come in another order they do not fit in the holes: a teacher
CE step at batch 256 on 40×200 log-mels held 17.9 GiB after its second step against 9.6 GiB with
glibc's defaults (at about twice the speed: 6.4-7.1 s per step in a probe, 12.7 s with the
defaults), and a benchmark child doing the same grew past 24 GiB and was killed by the kernel.
So :func:`configure` also starts a watchdog thread: once the process's resident set exceeds
:data:`RELAX_FRACTION` (a third) of the memory it may use (RAM, or a smaller cgroup limit),
:func:`relax` maps large blocks per use again, as glibc's defaults do, says so in one line on
stderr, and from then on the watchdog gives the heap's free memory back whenever the process is
past that share (``malloc_trim``, at most once a second). A process forked from a configured one
(a ``data_prep`` worker) runs no watchdog, so it starts relaxed (``os.register_at_fork``).
The same step then peaked at 9.2 GiB (13.1 s per step against 13.5 with the defaults, the same
loss bit for bit; ``python bench/host_memory.py --models teacher --batch 256 --shape 40x200
--steps 4 --rounds 1 --settings default,configured``,
``bench/results/host_memory_cpu_teacher_b256_40x200_watchdog.json``). The demo (2.3 GiB) and
every batch-32 run stay far below the share and keep the whole gain.

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
import threading
import time
from pathlib import Path

#: ``mallopt`` parameters (glibc ``malloc.h``).
_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3, "M_MMAP_MAX": -4, "M_ARENA_MAX": -8}
#: ``M_TRIM_THRESHOLD`` value: -1 turns glibc's trimming of the heap top off (``mallopt(3)``),
#: so freed memory of any size stays mapped for the next step. A byte threshold (1 GiB before)
#: lets the largest buffers, those of big batches, be unmapped and faulted in every step.
TRIM_THRESHOLD = -1
#: The environment variable that turns :func:`configure` off (value ``default``).
ENV_VAR = "DKD_JAX_MALLOC"
#: The share of the memory this process may use (RAM, or a smaller cgroup limit) above which
#: the watchdog of :func:`configure` relaxes the setting (:func:`relax`).
RELAX_FRACTION = 1 / 3
#: What :func:`relax` restores: glibc's own limits once its dynamic threshold has grown (blocks
#: above 32 MiB mapped per use, freed heap above 64 MiB given back) and its default map count.
RELAXED = {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 64 << 20, "M_MMAP_MAX": 65536}
_POLL_SECONDS = 0.2
_TRIM_SECONDS = 1.0

_state: dict[str, object] | None = None


def configure(*, relax_above: int | None = None) -> dict[str, object]:
    """Applies the allocator settings once per process (later calls return the first result),
    and starts the watchdog that relaxes them when the process grows large (module docstring).

    Args:
      relax_above: resident bytes above which the watchdog calls :func:`relax` (default:
        :data:`RELAX_FRACTION` of :func:`memory_limit`; tests pass a small value).

    Returns:
      ``{"applied": bool, "reason": str}``; when applied, also the settings and the watchdog's
      ``relax_above`` (and, once it acted, ``relaxed``). Benchmarks record it next to their
      numbers.
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
    wanted = {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": TRIM_THRESHOLD}
    try:
        refused = _mallopt(wanted)
    except (OSError, AttributeError) as e:
        _state = {"applied": False, "reason": f"mallopt unavailable: {e}"}
        return _state
    _state = {
        "applied": not refused,
        "reason": f"mallopt refused {refused}" if refused else "glibc mallopt",
        "settings": wanted,
    }
    if refused:
        return _state
    limit = "the limit it was given"
    if relax_above is None:
        limit = f"{RELAX_FRACTION:.0%} of the memory this process may use"
        relax_above = int(RELAX_FRACTION * memory_limit())
    _state["relax_above"] = relax_above
    # A forked child (a data_prep worker) inherits the setting but not the watchdog thread.
    os.register_at_fork(after_in_child=_relax_in_child)
    threading.Thread(
        target=_watch, args=(relax_above, limit), name="dkd_jax.host_memory", daemon=True
    ).start()
    return _state


def _relax_in_child() -> None:
    _mallopt(RELAXED)


def memory_limit() -> int:
    """Bytes this process may use: physical memory, or a smaller cgroup (container) limit: the
    process's own cgroup v2 (from ``/proc/self/cgroup``), the root one, or cgroup v1's."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    paths = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::/") and line.strip() != "0::/":
                paths.insert(0, f"/sys/fs/cgroup{line[3:].strip()}/memory.max")
    except OSError:
        pass
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1's "none" is a huge number
            limit = min(limit, int(text))
    return limit


def resident_bytes() -> int:
    """This process's resident memory (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def relax() -> bool:
    """Gives large blocks back to ``mmap`` and the heap's free memory back to the kernel.

    Called by the watchdog when the process outgrows its share of memory: from then on the
    process's peak stays near glibc's default (large buffers are mapped and faulted in per
    use again, so CPU steps lose what the setting gained). Values stay bit for bit the same.
    Returns whether glibc accepted every setting.
    """
    ok = not _mallopt(RELAXED)
    _malloc_trim()
    return ok


def _mallopt(values: dict[str, int]) -> list[str]:
    """``mallopt`` for each named parameter; the names glibc refused."""
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return [name for name, value in values.items() if mallopt(_PARAMS[name], value) != 1]


def _malloc_trim() -> None:
    trim = ctypes.CDLL(None).malloc_trim
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    trim(0)


def _watch(relax_above: int, limit: str) -> None:
    """Polls the resident set. Past ``relax_above`` the first time: relaxes the setting and says
    so; from then on, every second the process is past it, gives the heap's free memory back
    (``malloc_trim``): the blocks freed inside the heap before the relaxation would otherwise
    stay resident beside the mapped ones that replace them."""
    try:
        while (resident := resident_bytes()) <= relax_above:
            time.sleep(_POLL_SECONDS)
        ok = relax()
        assert _state is not None
        _state["relaxed"] = {"resident_bytes": resident, "accepted": ok}
        gib = 1 << 30
        done = (
            "large buffers are mapped per use again (bounded memory, slower CPU steps)"
            if ok
            else "glibc refused to map large buffers per use again; freed memory is trimmed"
        )
        print(
            f"dkd_jax.host_memory: this process holds {resident / gib:.2f} GiB, over "
            f"{relax_above / gib:.2f} GiB ({limit}); {done}. {ENV_VAR}=default keeps glibc's "
            "defaults from the start.",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(_TRIM_SECONDS)
            if resident_bytes() > relax_above:
                _malloc_trim()
    except OSError:  # no /proc: nothing to watch
        return
