"""The benchmark scripts use only names the library still has.

Benchmarks are not run in the suite (their numbers belong in ``bench/results/``), so an API
change in ``dkd_jax`` could silently break one: ``bench/latency.py`` once called a split reader
that the run-directory restructure had moved. This reads every ``bench/*.py`` as a syntax tree and
checks that each ``module.name`` it uses on a ``dkd_jax`` / ``data_prep`` module exists.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dkd_jax", "data_prep")
SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


def _module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name → module path, for every import of a project module (at any depth)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if _is_module(full):
                    aliases[a.asname or a.name] = full
    return aliases


def _is_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        return False
    return True


def unresolved_names(path: Path) -> list[str]:
    """``line: module.name`` for every attribute of a project module that does not exist."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = _module_aliases(tree)
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PACKAGES:
                module = importlib.import_module(node.module)
                missing += [
                    f"{node.lineno}: {node.module}.{a.name}"
                    for a in node.names
                    if not hasattr(module, a.name) and not _is_module(f"{node.module}.{a.name}")
                ]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target and not hasattr(importlib.import_module(target), node.attr):
                missing.append(f"{node.lineno}: {target}.{node.attr}")
    return missing


def test_the_check_finds_a_stale_name(tmp_path):
    script = tmp_path / "stale.py"
    script.write_text(
        "from dkd_jax import protocols, run_dir\n"
        "from dkd_jax.losses import dkd_loss, no_such_loss\n"
        "split = protocols.load_split_file('x')\n"
        "ok = run_dir.load_split\n"
    )
    assert unresolved_names(script) == [
        "2: dkd_jax.losses.no_such_loss",
        "3: dkd_jax.protocols.load_split_file",
    ]


def test_bench_scripts_are_found():
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_uses_only_existing_names(script):
    assert unresolved_names(script) == []


def _bench(name: str, monkeypatch):
    """``bench/<name>.py`` by path, its folder on ``sys.path`` (for ``benchjson``) and itself in
    ``sys.modules`` (dataclasses look their module up there), both undone after the test."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_compare_torch_table_keeps_split_cpu_rows_apart(monkeypatch):
    def case(ours_ms):
        side = {"median_ms": ours_ms, "p10_ms": ours_ms, "p90_ms": ours_ms, "first_call_s": 1.0}
        theirs = {**side, "median_ms": 100.0, "p10_ms": 90.0, "p90_ms": 110.0, "first_call_s": 0.1}
        return {
            "input": [26, 63], "batch": 32, "op": "ce", "ours": {**side, "timed_steps": 30},
            "theirs": theirs, "speedup": round(100.0 / ours_ms, 3),
            "speedup_per_round": [1.0, 2.0], "load_before": [1.0], "load_after": [1.5],
        }  # fmt: skip

    def run(threads, devices, ours_ms):
        info = {"threads": threads}
        if devices is not None:  # reports written before --split-cpu have no such field
            info["jax_step_devices"] = devices
        return {"threads": info, "cases": [case(ours_ms)]}

    report = {"runs": [run(2, None, 80.0), run(2, 2, 50.0), run(1, 1, 120.0)]}
    rows = _bench("compare_torch", monkeypatch).markdown_table([report]).splitlines()[2:]
    assert len(rows) == 3
    assert rows[0].startswith("| 26×63 | 32 | ce | 1 | 120 (120–120) | 100 (90–110) | **0.83**")
    assert rows[1].startswith("| 26×63 | 32 | ce | 2 | 80 (80–80) | 100 (90–110) | **1.25**")
    assert rows[2].startswith("| 26×63 | 32 | ce | 2 (2 JAX devices) | 50 (50–50) | 100 ")
    assert "**2.00** (1.00–2.00)" in rows[2]


def test_compare_torch_table_rounds_the_speedup_once(monkeypatch):
    """Medians of 100 and 124.47 ms are a speedup of 1.2447, stored rounded as 1.245: the table
    prints 1.24 (the ratio of the medians), not 1.25 (the stored value rounded again); the same
    for the per-round range."""
    ours = {"median_ms": 100.0, "p10_ms": 99.0, "p90_ms": 101.0, "first_call_s": 1.0,
            "timed_steps": 30, "round_medians_ms": [100.0, 100.0]}  # fmt: skip
    theirs = {**ours, "median_ms": 124.47, "round_medians_ms": [124.47, 130.0]}
    case = {
        "input": [26, 63], "batch": 32, "op": "dkd", "ours": ours, "theirs": theirs,
        "speedup": 1.245, "speedup_per_round": [1.245, 1.3],
        "load_before": [1.0], "load_after": [1.0],
    }  # fmt: skip
    report = {"runs": [{"threads": {"threads": 1}, "cases": [case]}]}
    row = _bench("compare_torch", monkeypatch).markdown_table([report]).splitlines()[2]
    assert "| **1.24** (1.24–1.30) |" in row


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--split-cpu", "--device", "gpu"], "--split-cpu splits the CPU; with --device gpu"),
        (["--split-cpu", "--threads", "3", "--batches", "32"], "batch 32 does not split evenly"),
        (["--rounds", "0"], "--rounds and --steps must be ≥ 1"),
    ],
)
def test_compare_torch_refuses_bad_arguments_in_one_line(argv, message, capsys, monkeypatch):
    module = _bench("compare_torch", monkeypatch)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a refused argument must stop before any benchmark runs")

    monkeypatch.setattr(module.subprocess, "run", must_not_run)
    monkeypatch.setattr(module, "child", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.count("\n") == 0 and err.startswith("compare_torch: error: ") and message in err


@pytest.mark.parametrize(
    "threads, env_flags, extra, expected",
    [
        (1, "--xla_a=1", "", "--xla_cpu_multi_thread_eigen=false"),
        (1, "", "--xla_b=2 --xla_c=3", "--xla_cpu_multi_thread_eigen=false --xla_b=2 --xla_c=3"),
        (2, "--xla_a=1", "--xla_b=2", "--xla_a=1 --xla_b=2"),
        (2, None, "", ""),
    ],
)
def test_step_breakdown_appends_the_flags_to_try(threads, env_flags, extra, expected, monkeypatch):
    """``bench/step_breakdown.py --xla-flags``: one thread replaces the environment's flags
    with its own and the extras, more threads keep them; the process is never pinned here."""
    module = _bench("step_breakdown", monkeypatch)
    pinned = []
    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(module.os, "sched_setaffinity", lambda pid, cores: pinned.append(cores))
    for name in ("XLA_FLAGS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "JAX_PLATFORMS"):
        monkeypatch.delenv(name, raising=False)
    if env_flags is not None:
        monkeypatch.setenv("XLA_FLAGS", env_flags)
    module._pin(threads, extra)
    assert module.os.environ["XLA_FLAGS"] == expected
    assert pinned == ([[0]] if threads == 1 else [])


def test_step_breakdown_pieces_are_picked_by_name(monkeypatch):
    module = _bench("step_breakdown", monkeypatch)
    assert module._pieces_arg("bn, convs") == ["convs", "bn"]  # in the report's order
    for bad in ("bn,attention", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="choose from student,pools"):
            module._pieces_arg(bad)


def test_cpu_flags_reports_speed_and_bits_against_the_default(monkeypatch, capsys):
    """``bench/cpu_flags.py``: the ratio to the default's median, and whether a candidate's state
    after one step is bit for bit the default's in every round (children faked: no JAX runs)."""
    module = _bench("cpu_flags", monkeypatch)
    children = {  # per candidate, per round: (step seconds, state digest)
        "default": [(0.100, "a"), (0.100, "a")],
        "xnnpack": [(0.050, "a"), (0.050, "a")],
        "onednn": [(0.200, "a"), (0.200, "b")],  # rounds differently in one round
    }
    calls = {name: 0 for name in children}

    def fake_child(name, cand, args):
        secs, digest = children[name][calls[name]]
        calls[name] += 1
        case = {"first_call_s": 2.0, "compile_s": 1.5, "times_s": [secs] * 4}
        return {"ce": {**case, "state_digest": digest}}

    monkeypatch.setattr(module, "_run_candidate", fake_child)
    argv = ["--rounds", "2", "--cases", "ce", "--candidates", ",".join(children)]
    assert module.main(argv) == 0
    report = json.loads(capsys.readouterr().out)["candidates"]
    assert calls == {name: 2 for name in children}
    assert [report[n]["ce"]["speed_vs_default"] for n in children] == [1.0, 2.0, 0.5]
    assert [report[n]["ce"]["same_bits_as_default"] for n in children] == [True, True, False]
    assert report["onednn"]["ce"]["state_digests"] == ["a", "b"]


def test_cpu_flags_child_gets_the_candidate_flags_and_environment(monkeypatch):
    """A candidate's XLA flags and environment reach its child process, with the thread pin."""
    module = _bench("cpu_flags", monkeypatch)
    seen = []

    def fake_run(cmd, *, env, **_):
        seen.append((cmd, env))
        line = json.dumps({"ce": {"times_s": [0.1]}})
        return subprocess.CompletedProcess(cmd, 0, stdout=f"log\n{line}\n", stderr="")

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    monkeypatch.delenv("JAX_OPTIMIZATION_LEVEL", raising=False)
    args = module.parse_args(["--threads", "1", "--cases", "ce"])
    for name in ("opt level 0", "jax O1"):
        out = module._run_candidate(name, module.CANDIDATES[name], args)
        assert out == {"ce": {"times_s": [0.1]}}
    (cmd0, env0), (cmd1, env1) = seen
    first_core = str(min(os.sched_getaffinity(0)))  # was core 0, which may not be ours
    assert cmd0[:3] == ["taskset", "-c", first_core] and "--child" in cmd0 and cmd1 == cmd0
    assert env0["XLA_FLAGS"].split() == [  # no bare intra_op_parallelism_threads: XLA ignores it
        "--xla_backend_optimization_level=0",
        "--xla_cpu_multi_thread_eigen=false",
    ]
    assert "JAX_OPTIMIZATION_LEVEL" not in env0 and env1["JAX_OPTIMIZATION_LEVEL"] == "O1"
    assert env1["XLA_FLAGS"].split()[0] == "--xla_cpu_multi_thread_eigen=false"


def test_suite_profile_sums_per_module_and_ranks_tests_by_cpu(monkeypatch):
    module = _bench("suite_profile", monkeypatch)

    def row(own, kids, compile_s=0.0):
        r = dict.fromkeys(module._FIELDS, 0.0)
        return {**r, "wall_s": own + kids, "self_cpu_s": own, "child_cpu_s": kids,
                "backend_compile_s": compile_s}  # fmt: skip

    tests = {
        "tests/test_a.py::one": row(1.0, 0.0, compile_s=0.5),
        "tests/test_a.py::two": row(2.0, 0.0, compile_s=1.5),
        "tests/test_b.py::child": row(0.5, 4.0),
    }
    totals = {"wall_s": 9.0, "self_cpu_s": 5.0, "child_cpu_s": 4.0, "loadavg_before_after": []}
    report = module.summarize(tests, top=2, totals=totals)
    assert report["totals"]["cpu_min"] == 9.0 / 60
    assert report["totals"]["in_tests"]["self_cpu_s"] == 3.5 and report["totals"]["tests"] == 3
    assert list(report["modules"]) == ["tests/test_b.py", "tests/test_a.py"]  # 4.5 > 3.0 CPU-s
    a = report["modules"]["tests/test_a.py"]
    assert (a["tests"], a["self_cpu_s"], a["backend_compile_s"]) == (2, 3.0, 2.0)
    assert [t["test"] for t in report["top_tests"]] == [
        "tests/test_b.py::child",
        "tests/test_a.py::two",
    ]


def test_suite_profile_plugin_counts_compiles_and_child_processes(tmp_path):
    """The plugin in a real pytest run (its own process): a jitted function's compile lands on
    its test, a child process's CPU on the test that waited for it, and the same program compiled
    under two names is reported as repeated (the persistent cache keys on the name)."""
    (tmp_path / "test_inner.py").write_text(
        "import subprocess, sys\n"
        "import jax, jax.numpy as jnp\n"
        "def test_compiles():\n"
        "    assert float(jax.jit(lambda x: jnp.sin(x) * 2)(1.0)) > 0\n"
        "def test_child():\n"
        "    subprocess.run([sys.executable, '-c', 'sum(range(3 * 10**7))'], check=True)\n"
        "def cube_a(x):\n"
        "    return jnp.cos(x) ** 3\n"
        "def cube_b(x):\n"
        "    return jnp.cos(x) ** 3\n"
        "def test_same_program_twice():\n"
        "    assert float(jax.jit(cube_a)(0.5)) == float(jax.jit(cube_b)(0.5))\n"
        "    jax.jit(cube_a)(jnp.ones(3))  # another shape: another program\n"
    )
    out = tmp_path / "profile.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench"), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # nothing served from the suite's cache
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "suite_profile", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [*cmd, "--suite-profile-out", str(out), "--suite-profile-compiles", "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "suite profile" in proc.stdout
    report = json.loads(out.read_text())
    rows = {t["test"].split("::")[1]: t for t in report["top_tests"]}
    assert rows["test_compiles"]["compile_requests"] >= 1
    assert (
        rows["test_compiles"]["backend_compile_s"] > 0
        and rows["test_child"]["compile_requests"] == 0
    )
    assert rows["test_child"]["child_cpu_s"] > 0.2 and rows["test_compiles"]["child_cpu_s"] < 0.05
    assert report["totals"]["tests"] == 3
    compiles = report["compiles"]
    assert compiles["by_name"]["jit_cube_a"]["count"] == 2
    assert compiles["programs"] < compiles["count"]
    [repeated] = [r for r in compiles["repeated"] if "jit_cube_a" in r["names"]]
    assert repeated["names"] == ["jit_cube_a", "jit_cube_b"] and repeated["count"] == 2
    assert repeated["tests"] == ["test_inner.py::test_same_program_twice"]
    assert compiles["repeat_seconds"] >= repeated["repeat_seconds"] > 0


def test_cpu_model_names_the_cpu_and_its_vector_extensions(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import benchjson

    info = tmp_path / "cpuinfo"
    two_cpus = "".join(
        f"processor\t: {i}\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx fma avx2 "
        "avx512f avx512_vnni avx512_bf16 avx512bw\n\n"
        for i in range(2)
    )
    info.write_text(two_cpus)
    assert benchjson.cpu_model(str(info)) == (
        "AMD EPYC 9R14 (avx avx2 fma avx512f avx512_bf16 avx512_vnni)"
    )
    info.write_text("processor\t: 0\nmodel name\t: Some ARM core\nFeatures\t: fp asimd\n")
    assert benchjson.cpu_model(str(info)) == "Some ARM core"
    missing = benchjson.cpu_model(str(tmp_path / "absent"))
    assert missing and "(" not in missing  # platform's name, without extensions


@pytest.mark.parametrize(
    "setting, malloc, trim",
    [("default", "default", None), ("configured", None, None), ("trim1g", None, str(1 << 30))],
)
def test_host_memory_children_get_their_allocator_setting(setting, malloc, trim, monkeypatch):
    module = _bench("host_memory", monkeypatch)
    seen = {}

    def fake_run(cmd, *, env, **_):
        seen.update(env)
        line = json.dumps({"host_memory": {"applied": setting != "default"}})
        return subprocess.CompletedProcess(cmd, 0, stdout=f"{line}\n")

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    monkeypatch.setenv("BENCH_TRIM_THRESHOLD", "123")  # a stray value never leaks to a child
    args = argparse.Namespace(batch=4, shape=(26, 63), steps=1, op="train")
    module._run_child(setting, "student", args)
    assert seen.get("DKD_JAX_MALLOC") == malloc and seen.get("BENCH_TRIM_THRESHOLD") == trim


def test_bench_data_prep_never_deletes_a_prep_dir_of_other_files(tmp_path, capsys, monkeypatch):
    """A non-empty --prep-dir used to be deleted whatever it held."""
    module = _bench("data_prep", monkeypatch)

    def must_not_run(*args, **kwargs):
        raise AssertionError("refused before the corpus is generated")

    monkeypatch.setattr(module, "_corpus", must_not_run)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--prep-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and (tmp_path / "notes.txt").read_text() == "mine"
    assert f"--prep-dir {tmp_path}: not empty and holds no prep run" in capsys.readouterr().err
    meta = {"source": {"kind": "iemocap", "root": "/data/IEMOCAP_full_release"}}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))  # the user's own prep
    with pytest.raises(SystemExit):
        module.main(["--prep-dir", str(tmp_path)])
    assert "holds no prep run of this benchmark's corpora" in capsys.readouterr().err
    meta["source"]["root"] = f"/tmp/{module.CORPUS_PREFIX}synth_demo"  # its own prep ...
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit):  # ... beside a file of the user's: was deleted with it
        module.main(["--prep-dir", str(tmp_path)])
    assert "corpora alone (it holds notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "notes.txt").unlink()
    with pytest.raises(AssertionError, match="refused before the corpus"):  # alone: timed again
        module.main(["--prep-dir", str(tmp_path)])
    with pytest.raises(SystemExit):  # a file: was a traceback once the corpus was generated
        module.main(["--prep-dir", str(tmp_path / "metadata.json")])
    assert "metadata.json: exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an --out that cannot be written: before any work
        module.main(["--out", str(tmp_path)])
    assert f"--out {tmp_path}: is a folder, not a file" in capsys.readouterr().err
    fresh = tmp_path / "fresh"  # its own JSON inside: a second run refused "it holds result.json"
    with pytest.raises(SystemExit):
        module.main(["--prep-dir", str(fresh), "--out", str(fresh / "sub" / "result.json")])
    assert f"lies inside --prep-dir {fresh}" in capsys.readouterr().err


def test_conv_algorithms_needs_two_rounds_for_its_quantiles(capsys, monkeypatch):
    module = _bench("conv_algorithms", monkeypatch)
    monkeypatch.setattr(module, "_configure", lambda *a: pytest.fail("ran with --rounds 1"))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--rounds", "1"])  # used to fail after the compiles, in the quantiles
    assert exit_info.value.code == 2 and "--rounds must be ≥ 2" in capsys.readouterr().err


def test_stream_drift_is_zero_for_log_mel_and_shows_the_mfcc_floor(tmp_path, monkeypatch):
    """The README's claim about --stream's last window, on short versions of the bench signals:
    log-mel ends exactly on the whole file's normalisation; MFCC differs only when frames below
    a later, louder passage's floor came first."""
    import numpy as np

    module = _bench("stream_drift", monkeypatch)
    rng = np.random.default_rng(0)
    noise = (0.003 * rng.standard_normal(3 * module.RATE)).astype(np.float32)
    gap = np.zeros(module.RATE // 2, np.float32)
    burst = (0.1 * rng.standard_normal(module.RATE)).astype(np.float32)
    late = np.concatenate([noise, gap, noise, burst])
    early = np.concatenate([burst, noise, gap, noise])
    for wave in (late, early):
        got = module.drift(wave, "logmel40", str(tmp_path))
        assert got["last_window_max_abs_difference"] == 0.0
        assert got["raw_features_of_last_window_equal"]
    assert module.drift(early, "mfcc26", str(tmp_path))["last_window_max_abs_difference"] == 0.0
    assert module.drift(late, "mfcc26", str(tmp_path))["last_window_max_abs_difference"] > 0.01


def test_every_report_records_its_command_and_load_and_quantiles_stay_in_the_data(
    tmp_path, capsys, monkeypatch
):
    """An audit: seven scripts wrote JSON without the command that made it, three without a
    load average; p10/p90 of a few samples lay outside them ([10, 40, 50] ms: p10 -8 ms)."""
    benchjson = _bench("benchjson", monkeypatch)
    out = tmp_path / "deep" / "r.json"
    report = {"x": 1}
    command = benchjson.command_line("a.py", ["--q", "a b"])
    assert benchjson.emit(report, str(out), command=command) == 0
    stored = json.loads(out.read_text())
    assert stored["command"] == "python bench/a.py --q 'a b'"
    assert len(stored["loadavg_at_end"]) == 3 and json.loads(capsys.readouterr().out) == stored
    mine = {"command": "kept", "loadavg_at_end": [0, 0, 0]}
    benchjson.emit(mine, None, command="other")
    assert json.loads(capsys.readouterr().out) == mine
    assert benchjson.out_problem(str(tmp_path)) == f"--out {tmp_path}: is a folder, not a file"
    assert "is not a folder" in benchjson.out_problem(str(out / "below_a_file.json"))
    assert benchjson.out_problem(str(tmp_path / "new" / "dir" / "r.json")) is None
    cpu_flags = _bench("cpu_flags", monkeypatch)
    got = cpu_flags._summary([0.010, 0.040, 0.050])
    assert 10 <= got["p10_ms"] <= got["median_ms"] <= got["p90_ms"] <= 50
    with pytest.raises(SystemExit):  # one time: was a StatisticsError after the whole run
        cpu_flags.parse_args(["--rounds", "1", "--steps", "1"])
    assert "--rounds x --steps must be >= 2" in capsys.readouterr().err
    ro = tmp_path / "ro.json"
    ro.write_text("{}")
    ro.chmod(0o444)
    if not os.access(ro, os.W_OK):  # (root may write anything)
        assert benchjson.out_problem(str(ro)) == f"--out {ro}: cannot write it (read-only)"
    assert benchjson.out_problem(str(tmp_path / "newdir") + "/") is not None
