"""Where the test suite's CPU time goes: a pytest plugin, per test and per module.

    PYTHONPATH=bench python -m pytest -q -p suite_profile [--suite-profile-out FILE]

Per test (setup, call and teardown together): wall seconds, CPU seconds of the pytest process
and of the child processes it waited for (``getrusage``), and from ``jax.monitoring`` the
seconds spent tracing, lowering and compiling (``backend_compile`` includes the reads of the
persistent compilation cache) with the number of compile requests and cache hits. At the end it
prints the JSON (totals, per module, the ``--suite-profile-top`` tests of most CPU) after
pytest's summary, and writes it to ``--suite-profile-out`` when given. Listeners are registered
at the first test, after ``tests/conftest.py`` has set up JAX's environment.

``--suite-profile-compiles`` also logs every backend compile of the pytest process (module name,
seconds, test) and groups them by *program*: the StableHLO without the module's name and source
locations, together with the compile options. A program compiled more than once is a compile the
suite could share: the same function under two names (the persistent cache keys on the name),
or a cache entry that was not written. The report lists those (``compiles.repeated``) and the
names that cost the most. It wraps ``jax._src.compiler.backend_compile_and_load`` (a private
function, the one place where the compiled module is at hand) and refuses to start when a jax
release no longer has it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import resource
import time

import benchjson
import pytest

_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
}
_COUNT_EVENTS = {
    "/jax/compilation_cache/compile_requests_use_cache": "compile_requests",
    "/jax/compilation_cache/cache_hits": "cache_hits",
}
_FIELDS = (
    "wall_s",
    "self_cpu_s",
    "child_cpu_s",
    *_COMPILE_EVENTS.values(),
    *_COUNT_EVENTS.values(),
)


def cpu_seconds() -> tuple[float, float]:
    """(this process, its waited-for children): user + system CPU seconds so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


class SuiteProfile:
    """Accumulates per-test figures; ``report`` turns them into the JSON."""

    def __init__(self):
        self.tests: dict[str, dict[str, float]] = {}
        self.current: dict[str, float] | None = None
        self.listening = False
        self.start_cpu = cpu_seconds()
        self.start_wall = time.perf_counter()
        self.load_before = os.getloadavg()
        self.compile_log: CompileLog | None = None

    def listen(self) -> None:
        if self.listening:
            return
        import jax

        if self.compile_log is not None:
            try:
                self.compile_log.install()
            except RuntimeError as e:
                pytest.exit(str(e), returncode=pytest.ExitCode.USAGE_ERROR)
        jax.monitoring.register_event_duration_secs_listener(self.on_duration)
        jax.monitoring.register_event_listener(self.on_event)
        self.listening = True

    def on_duration(self, name: str, secs: float, **_) -> None:
        if self.current is not None and name in _COMPILE_EVENTS:
            self.current[_COMPILE_EVENTS[name]] += secs

    def on_event(self, name: str, **_) -> None:
        if self.current is not None and name in _COUNT_EVENTS:
            self.current[_COUNT_EVENTS[name]] += 1

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = row = dict.fromkeys(_FIELDS, 0.0)
        if self.compile_log is not None:
            self.compile_log.test = item.nodeid
        own0, kids0 = cpu_seconds()
        t0 = time.perf_counter()
        yield
        own1, kids1 = cpu_seconds()
        row.update(
            wall_s=time.perf_counter() - t0, self_cpu_s=own1 - own0, child_cpu_s=kids1 - kids0
        )
        self.tests[item.nodeid] = row
        self.current = None
        if self.compile_log is not None:
            self.compile_log.test = None

    def pytest_runtest_setup(self, item):
        self.listen()

    def report(self, top: int) -> dict:
        own, kids = cpu_seconds()
        return summarize(
            self.tests,
            top=top,
            totals={
                "wall_s": time.perf_counter() - self.start_wall,
                "self_cpu_s": own - self.start_cpu[0],
                "child_cpu_s": kids - self.start_cpu[1],
                "loadavg_before_after": [self.load_before, os.getloadavg()],
            },
        )


class CompileLog:
    """Every backend compile of this process with its program fingerprint (see the module doc)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.test: str | None = None
        self._restore = None

    def install(self) -> None:
        from jax._src import compiler

        original = getattr(compiler, "backend_compile_and_load", None)
        if original is None:
            raise RuntimeError(
                "--suite-profile-compiles: this jax has no "
                "jax._src.compiler.backend_compile_and_load to wrap"
            )

        def logged(backend, module, executable_devices, options, *args, **kwargs):
            t0 = time.perf_counter()
            out = original(backend, module, executable_devices, options, *args, **kwargs)
            self.record(module, options, time.perf_counter() - t0)
            return out

        compiler.backend_compile_and_load = logged
        self._restore = lambda: setattr(compiler, "backend_compile_and_load", original)

    def uninstall(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    def record(self, module, options, seconds: float) -> None:
        text = module.operation.get_asm(enable_debug_info=False)
        match = re.search(r"module @([\w.$-]+)", text)
        name = match.group(1) if match else "?"
        program = hashlib.sha256(re.sub(r"module @[\w.$-]+", "module @_", text, count=1).encode())
        program.update(options.SerializeAsString())
        self.rows.append(
            {"test": self.test, "name": name, "seconds": seconds, "program": program.hexdigest()}
        )


def summarize_compiles(rows: list[dict], *, top: int) -> dict:
    """Compiles per module name (the ``top`` costliest) and the programs compiled more than once,
    with the seconds their repeats cost. Pure: it takes :class:`CompileLog` rows."""
    names: dict[str, dict] = collections.defaultdict(lambda: {"count": 0, "seconds": 0.0})
    programs: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        names[row["name"]]["count"] += 1
        names[row["name"]]["seconds"] += row["seconds"]
        programs[row["program"]].append(row)
    repeated = [
        {
            "names": sorted({r["name"] for r in group}),
            "tests": sorted({r["test"] or "(outside a test)" for r in group}),
            "count": len(group),
            "repeat_seconds": sum(r["seconds"] for r in group[1:]),
        }
        for group in programs.values()
        if len(group) > 1
    ]
    repeated.sort(key=lambda r: -r["repeat_seconds"])
    return {
        "count": len(rows),
        "seconds": sum(r["seconds"] for r in rows),
        "programs": len(programs),
        "repeat_seconds": sum(r["repeat_seconds"] for r in repeated),
        "repeated": repeated[:top],
        "by_name": dict(sorted(names.items(), key=lambda kv: -kv[1]["seconds"])[:top]),
    }


def summarize(tests: dict[str, dict[str, float]], *, top: int, totals: dict) -> dict:
    """The JSON: session totals, the per-test sums, per module, and the ``top`` costliest tests
    by CPU (own + children). Pure: it takes the per-test rows."""
    modules: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: dict.fromkeys(_FIELDS, 0.0)
    )
    for nodeid, row in tests.items():
        module = modules[nodeid.split("::")[0]]
        for k in _FIELDS:
            module[k] += row[k]
        module["tests"] = module.get("tests", 0) + 1

    def cpu(row):
        return row["self_cpu_s"] + row["child_cpu_s"]

    total = {**totals, "cpu_min": (totals["self_cpu_s"] + totals["child_cpu_s"]) / 60}
    total["in_tests"] = {k: sum(r[k] for r in tests.values()) for k in _FIELDS}
    total["tests"] = len(tests)
    return {
        "totals": total,
        "modules": dict(sorted(modules.items(), key=lambda kv: -cpu(kv[1]))),
        "top_tests": [
            {"test": nodeid, **row}
            for nodeid, row in sorted(tests.items(), key=lambda kv: -cpu(kv[1]))[:top]
        ],
    }


def pytest_addoption(parser):
    group = parser.getgroup("suite_profile")
    group.addoption("--suite-profile-out", help="also write the JSON here")
    group.addoption("--suite-profile-top", type=int, default=30, help="costliest tests listed")
    group.addoption(
        "--suite-profile-compiles",
        action="store_true",
        help="log every backend compile and report the programs compiled more than once",
    )


def pytest_configure(config):
    profile = SuiteProfile()
    if config.getoption("suite_profile_compiles"):
        profile.compile_log = CompileLog()
    config.pluginmanager.register(profile, "suite_profile_collector")


def pytest_unconfigure(config):
    profile = config.pluginmanager.get_plugin("suite_profile_collector")
    if profile is not None and profile.compile_log is not None:
        profile.compile_log.uninstall()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    profile = config.pluginmanager.get_plugin("suite_profile_collector")
    top = config.getoption("suite_profile_top")
    report = profile.report(top)
    if profile.compile_log is not None:
        report["compiles"] = summarize_compiles(profile.compile_log.rows, top=top)
    terminalreporter.write_sep("=", "suite profile")
    benchjson.emit(report, config.getoption("suite_profile_out"))
