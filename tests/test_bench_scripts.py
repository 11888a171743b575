"""The benchmark scripts use only names the library still has.

Benchmarks are not run in the suite (their numbers belong in ``bench/results/``), so an API
change in ``dkd_jax`` could silently break one: ``bench/latency.py`` once called a split reader
that the run-directory restructure had moved. This reads every ``bench/*.py`` as a syntax tree and
checks that each ``module.name`` it uses on a ``dkd_jax`` / ``data_prep`` module exists.
"""

from __future__ import annotations

import ast
import importlib
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
