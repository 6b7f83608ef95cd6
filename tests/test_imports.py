"""The command line's modules import each other without a cycle.

Every import counts, the ones inside functions too (a cycle there only waits for the first call to
bite), and so does a ``"module:function"`` string naming a module of the package (the command
table's lazy references are imports made later).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

TARGET = re.compile(r"^([A-Za-z_][\w.]*):[A-Za-z_]\w*$")


def module_names(folder: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package in ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def imported(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """Every dotted name ``tree`` imports, anywhere in the file: ``import a.b``, ``from a import
    b`` (``a.b`` if that is one of ``modules``, else ``a``), relative imports resolved, and
    ``"a.b:function"`` strings."""
    here = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.add(sub if sub in modules else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = TARGET.match(node.value)
            if m:
                names.add(m.group(1))
    return names


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}`` (a module importing itself left out)."""
    modules = module_names(folder, package)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found = imported(tree, name, path.name == "__init__.py", set(modules))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_command_line_modules_have_no_import_cycle():
    graph = import_graph(REPO / "sisajax" / "cli", "sisajax.cli")
    assert {"sisajax.cli", "sisajax.cli.app", "sisajax.cli.commands"} <= set(graph)
    assert "sisajax.cli.app" in graph["sisajax.cli"]  # the graph sees function-level imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_imports_inside_functions_and_lazy_targets(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import helper\n")
    (pkg / "b.py").write_text("def helper():\n    from . import a\n")
    assert find_cycle(import_graph(pkg, "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("TABLE = {'x': 'pkg.a:run'}\n")
    assert find_cycle(import_graph(pkg, "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("def helper():\n    import json\n")
    assert find_cycle(import_graph(pkg, "pkg")) is None


def test_the_library_modules_have_no_import_cycle():
    graph = import_graph(REPO / "sisajax", "sisajax")
    assert {"sisajax.training", "sisajax.unlearning", "sisajax.generation"} <= set(graph)
    assert "sisajax.planning" in graph["sisajax.cli.forget_commands"]  # a function-level import
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
