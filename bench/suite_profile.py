"""Where the test suite's CPU time goes: a pytest plugin, per test and per module.

    PYTHONPATH=bench python -m pytest -q -p suite_profile [--suite-profile-out FILE]

Per test (setup, call and teardown together): wall seconds, CPU seconds of the pytest process
and of the child processes it waited for (``getrusage``), and from ``jax.monitoring`` the
seconds spent tracing, lowering and compiling (``backend_compile`` includes the reads of the
persistent compilation cache) with the number of compile requests and cache hits. At the end it
prints the JSON (totals, per module, the ``--suite-profile-top`` tests of most CPU) after
pytest's summary, and writes it to ``--suite-profile-out`` when given. Listeners are registered
at the first test, after ``tests/conftest.py`` has set up JAX's environment.
"""

from __future__ import annotations

import collections
import os
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

    def listen(self) -> None:
        if self.listening:
            return
        import jax

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
        own0, kids0 = cpu_seconds()
        t0 = time.perf_counter()
        yield
        own1, kids1 = cpu_seconds()
        row.update(
            wall_s=time.perf_counter() - t0, self_cpu_s=own1 - own0, child_cpu_s=kids1 - kids0
        )
        self.tests[item.nodeid] = row
        self.current = None

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


def pytest_configure(config):
    config.pluginmanager.register(SuiteProfile(), "suite_profile_collector")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    profile = config.pluginmanager.get_plugin("suite_profile_collector")
    report = profile.report(config.getoption("suite_profile_top"))
    terminalreporter.write_sep("=", "suite profile")
    benchjson.emit(report, config.getoption("suite_profile_out"))
