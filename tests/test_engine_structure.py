"""The analysis engine's modules import one way (plan/replay/run never import their caller): checked on the source.

A static check, because ``trajectory.analysis`` imports the engine on package import, so ``sys.modules`` cannot
tell who imported whom. Every import counts, including those inside functions (they close a circle just the same).
"""
from __future__ import annotations

import ast
import os

import pytest

ANALYSIS = os.path.join(os.path.dirname(__file__), "..", "trajectory", "analysis")
ROOMS = ("engine", "distributed", "plan", "replay", "run", "partials")


def _imports(name: str) -> set[str]:
    """Sibling modules of trajectory/analysis that ``name``.py imports (relative or absolute, any depth)."""
    with open(os.path.join(ANALYSIS, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                out.add(mod.split(".")[0] if mod else "")
                if not mod:
                    out.update(a.name for a in node.names)
            elif mod.startswith("trajectory.analysis."):
                out.add(mod.split(".")[2])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("trajectory.analysis."):
                    out.add(a.name.split(".")[2])
    return {m for m in out if m in ROOMS}


def test_no_import_circle_between_engine_modules():
    graph = {m: _imports(m) for m in ROOMS}
    seen: dict[str, str] = {}

    def visit(m: str, chain: tuple[str, ...]) -> None:
        if seen.get(m) == "done":
            return
        assert seen.get(m) != "active", f"import circle: {' -> '.join(chain + (m,))}"
        seen[m] = "active"
        for d in graph[m]:
            visit(d, chain + (m,))
        seen[m] = "done"

    for m in ROOMS:
        visit(m, ())


@pytest.mark.parametrize("room", ["plan", "replay", "run", "partials"])
def test_rooms_never_import_their_caller(room):
    assert not _imports(room) & {"engine", "distributed"}, f"{room}.py imports {_imports(room)}"


def test_the_checker_sees_imports():
    assert {"plan", "replay", "run", "distributed"} <= _imports("engine")
    assert {"run", "plan", "partials"} <= _imports("distributed")
