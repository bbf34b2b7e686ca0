"""The layering of docs/architecture.md, checked from the source: imports inside acdc_viz form no
cycle (counting imports inside functions too), and nothing below the widget imports ipywidgets,
nothing below the figure imports plotly."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "acdc_viz"
# The front ends and the modules allowed to draw; everything else sits below the figure.
DRAWING = {"figure", "widget", "app", "export", "evaluate", "cli", "cli_parser", "__init__"}
WIDGETS = {"widget", "app", "cli", "cli_parser", "__init__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module that ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycle_inside_the_package() -> None:
    modules = _modules()
    graph = nx.DiGraph()
    for name, imports in modules.items():
        for target in imports:
            if target.startswith("acdc_viz."):
                target = target.removeprefix("acdc_viz.")
                if target in modules and target != name and name != "__init__":
                    graph.add_edge(name, target)
    assert list(nx.simple_cycles(graph)) == []


def test_the_engine_does_not_import_the_sweeps() -> None:
    modules = _modules()
    for name in ("acdc", "patching", "forward_pass", "pass_inputs", "removed_edges"):
        assert "acdc_viz.sweep" not in modules[name], name


def test_no_plotly_below_the_figure_and_no_ipywidgets_below_the_widget() -> None:
    for name, imports in _modules().items():
        top = name.split(".")[-1]
        heavy = {i.split(".")[0] for i in imports}
        if top not in DRAWING:
            assert "plotly" not in heavy, name
        if top not in WIDGETS:
            assert "ipywidgets" not in heavy, name


def test_every_long_function_says_what_it_is_for() -> None:
    """House rule: a function of 15 lines or more carries a docstring (one or two lines do)."""
    missing = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                long = (node.end_lineno or node.lineno) - node.lineno + 1 >= 15
                if long and ast.get_docstring(node) is None:
                    missing.append(f"{_module_name(path)}.{node.name}")
    assert missing == []
