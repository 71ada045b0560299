"""The package's layout as checked contracts: the layering in pyproject.toml holds (lint-imports), no
import cycle exists (function-level imports included), outside the tuner only pemlang.tune's public
names are used, and no module outgrows a reader."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "pemlang"
MAX_LINES = 900


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the package found under `root`, with root's pyproject.toml (no cache)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_the_import_contracts_are_kept() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    # an upward import hidden in a function (the kind of cycle that crept in before)
    ("source.py", "def _late():\n    from .diagnostics import PemError\n    return PemError\n", "pemlang reads top-down"),
    # siblings that must not import each other
    ("writer.py", "def _late():\n    from .backend import torch_backend\n    return torch_backend\n",
     "pemlang reads top-down"),
    # a stage module of the tuner imported from outside it
    ("api.py", "def _late():\n    from .tune.study import is_done\n    return is_done\n", "only the package pemlang.tune"),
    # torch reached from the checker
    ("check.py", "def _late():\n    import torch\n    return torch\n", "never import torch"),
])
def test_a_broken_layering_fails_the_check(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """The contracts are not vacuous: each kind of violation in a copy of the package is reported."""
    shutil.copytree(PACKAGE, tmp_path / "pemlang", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "pemlang" / module).open("a", encoding="utf-8") as f:
        f.write("\n\n" + line)
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken.replace("\n", " "), result.stdout


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one member: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle_function_level_imports_included() -> None:
    graph = grimp.build_graph("pemlang")  # every import statement, at any depth of the module
    edges = {m: {t for t in graph.find_modules_directly_imported_by(m) if t.startswith("pemlang")}
             for m in graph.modules}
    assert strongly_connected(edges) == []
    # the oracle finds a cycle when there is one
    assert strongly_connected({**edges, "pemlang.source": {"pemlang.diagnostics"}}) == [
        {"pemlang.source", "pemlang.diagnostics"}]


def test_outside_the_tuner_only_its_public_names_are_imported() -> None:
    import pemlang.tune

    public = set(pemlang.tune.__all__)
    assert all(hasattr(pemlang.tune, name) for name in public)
    used: dict[str, set[str]] = {}
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        if PACKAGE / "tune" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = node.module or ""
            if node.level:  # relative, inside pemlang
                parts = list(path.relative_to(REPO).with_suffix("").parts)[: -node.level]
                target = ".".join([*parts, target] if target else parts)
            if target == "pemlang.tune":
                used.setdefault(str(path.relative_to(REPO)), set()).update(a.name for a in node.names)
    assert used, "nothing imports the tuner: the test looks in the wrong place"
    private = {where: sorted(names - public) for where, names in used.items() if names - public}
    assert private == {}


def test_no_module_is_longer_than_a_reader_takes_in() -> None:
    lengths = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in lengths.items() if n > MAX_LINES} == {}
