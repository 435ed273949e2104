"""The package's layout: imports flow one way through the pipeline's stages, with no circle.

A plain AST walk of every ``import``/``from`` line under ``onnx_fpgm/`` (those inside functions
and under ``TYPE_CHECKING`` too). A module may import its own folder (without a circle) and any
stage below its own in ``STAGES``; docs/ARCHITECTURE.md is the map in words.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_fpgm"
#: Stages from the bottom up: a module may import only stages listed before its own.
STAGES = ("errors", "config", "model", "deps", "importance", "oracle", "measure", "recover",
          "planning", "report", "api", "outcome", "cli", "__init__", "__main__")
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _imports(source: str, name: str, is_package: bool,
             modules: set[str]) -> list[tuple[str, int]]:
    """(imported onnx_fpgm module, line) of every import in module ``name``'s ``source``."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("onnx_fpgm")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""])
                base = base.rstrip(".")
            elif (node.module or "").startswith("onnx_fpgm"):
                base = node.module
            else:
                continue
            for alias in node.names:  # ``from . import io`` imports the module ``io``
                candidate = f"{base}.{alias.name}"
                found.append((candidate if candidate in modules else base, node.lineno))
    return [(module, line) for module, line in found if module != name]


def _graph() -> dict[str, list[tuple[str, int]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p.read_text(), _module_name(p), p.name == "__init__.py",
                                      modules) for p in files}


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_module_belongs_to_a_stage() -> None:
    unknown = {m for m in _graph() if _stage(m) not in STAGES}
    assert not unknown, f"modules outside the stage list (add the folder to STAGES): {unknown}"


def test_imports_flow_down_the_stages() -> None:
    against = [f"{module}:{line} imports {target}"
               for module, imports in _graph().items() for target, line in imports
               if _stage(target) != _stage(module)
               and STAGES.index(_stage(target)) >= STAGES.index(_stage(module))]
    assert not against, "imports against the stage order:\n" + "\n".join(against)


def test_no_import_circle() -> None:
    assert not _cycles(_graph())


def test_no_module_over_the_house_limit() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("source, wanted", [
    ("from ..deps.channels import Analysis\n", ["onnx_fpgm.deps.channels"]),
    ("from .. import api\n", ["onnx_fpgm.api"]),
    ("from . import mapped, runtime\n", ["onnx_fpgm.model.mapped", "onnx_fpgm.model.runtime"]),
    ("def f():\n    from ..cli.common import Parser\n", ["onnx_fpgm.cli.common"]),
    ("import onnx_fpgm.outcome.entry\n", ["onnx_fpgm.outcome.entry"]),
])
def test_the_walk_sees_relative_and_function_level_imports(source, wanted) -> None:
    """The check itself: imports inside functions, through ``..`` and of modules are resolved."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    found = _imports(source, "onnx_fpgm.model.io", False, modules)
    assert [module for module, _ in found] == wanted


def test_the_order_check_catches_an_upward_import() -> None:
    """A model-stage module importing the api would be reported (the check can fail)."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    found = _imports("from ..api import prune\n", "onnx_fpgm.model.io", False, modules)
    assert [STAGES.index(_stage(m)) > STAGES.index("model") for m, _ in found] == [True]
    assert _cycles({"a": [("b", 1)], "b": [("a", 2)], "c": [("a", 3)]}) == [["a", "b"]]
