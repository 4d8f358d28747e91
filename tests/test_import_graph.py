"""No import cycles in src/feddistill or bench (issue 17: "data down, simulation up").

Every module is parsed with :mod:`ast` and every import statement counts: the ones at module
level and the ones inside functions or under ``if TYPE_CHECKING:`` (a lazy import that closes a
cycle hides the cycle, it does not remove it). Relative imports are resolved, and
``from package import name`` points at ``package.name`` when that is a module. Lazy imports of
third-party packages (Opacus, matplotlib, ray) are not edges of this graph: only modules of the
project are.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (folder holding the top-level package, top-level package)
PACKAGES = ((ROOT / "src", "feddistill"), (ROOT, "bench"))


def module_files(packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages``."""
    found: dict[str, Path] = {}
    for base, package in packages:
        for path in sorted((base / package).rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def _resolve_relative(module: str, node: ast.ImportFrom, files: dict[str, Path]) -> str:
    """The absolute package or module a ``from .x import y`` in ``module`` names."""
    here = module if _is_package(module, files) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        here = here.rpartition(".")[0]
    return f"{here}.{node.module}" if node.module else here


def _known(name: str, files: dict[str, Path]) -> str | None:
    """``name`` or its nearest enclosing module that is a file of the project; None outside it."""
    while name:
        if name in files:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, files: dict[str, Path]) -> set[str]:
    """The project's modules that ``module`` imports, anywhere in its file."""
    tree = ast.parse(files[module].read_text(encoding="utf-8"), filename=str(files[module]))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(filter(None, (_known(alias.name, files) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_relative(module, node, files) if node.level else node.module
            for alias in node.names:
                # `from package import submodule` imports the submodule; any other name comes
                # from the module (or package) itself
                target = _known(f"{source}.{alias.name}", files) if alias.name != "*" else None
                if target != f"{source}.{alias.name}":
                    target = _known(source, files)
                if target:
                    targets.add(target)
    targets.discard(module)
    return targets


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project's modules it imports."""
    files = module_files(packages)
    return {module: imports_of(module, files) for module in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None if it has none (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_scanner_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import f\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from pkg import top\n    return top\n")
    (pkg / "top.py").write_text("import json\nfrom pkg.sub import leaf\nfrom . import other\n")
    (pkg / "other.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.leaf import f\n")
    graph = import_graph(((tmp_path, "pkg"),))
    assert graph == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top"},  # inside a function, `from package import module`
        "pkg.top": {"pkg.sub.leaf", "pkg.other"},  # json is not the project's
        "pkg.other": {"pkg.sub.leaf"},  # under TYPE_CHECKING, relative
    }
    assert find_cycle(graph) == ["pkg.other", "pkg.sub.leaf", "pkg.top", "pkg.other"]
    assert strongly_connected(graph) == [["pkg.other", "pkg.sub.leaf", "pkg.top"]]
    del graph["pkg.sub.leaf"]
    assert find_cycle(graph) is None and strongly_connected(graph) == []


def test_the_graph_covers_both_packages():
    graph = import_graph()
    assert {"feddistill.config", "feddistill.server.app", "bench.__main__", "bench.readme"} <= set(graph)
    assert "feddistill.config" in graph["feddistill.server.app"]


def test_no_import_cycles():
    graph = import_graph()
    components = strongly_connected(graph)
    cycle = find_cycle(graph)
    assert not components and cycle is None, f"import cycle: {' -> '.join(cycle or [])}\n" + "\n".join(
        f"modules importing one another: {', '.join(c)}" for c in components
    )


def test_nothing_imports_the_bench_cli():
    """bench/__main__.py is the CLI: it loads the suites by name (SUITES), so a suite that imported
    a helper back from it would close a cycle this graph cannot see; helpers live in bench.common."""
    graph = import_graph()
    importers = sorted(m for m, targets in graph.items() if "bench.__main__" in targets)
    assert not importers, f"modules importing bench.__main__ (import from bench.common instead): {importers}"


def imported_by(graph: dict[str, set[str]], roots) -> set[str]:
    """Every module of the project that ``roots`` import, directly or not (the roots included)."""
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def test_the_production_apps_import_nothing_from_simulations():
    """Simulation up (issue 17): the ClientApp, the ServerApp and the round loop, and whatever they
    import, know no simulation scenario; a simulation installs its own (a ClientApp mod, a sampling hook)."""
    graph = import_graph()
    roots = ("feddistill.client.app", "feddistill.server.app", "feddistill.server.loop")
    reached = imported_by(graph, roots)
    assert "feddistill.data.fleet" in reached and "feddistill.client.secagg" in reached  # the scan follows lazy imports
    simulation = sorted(m for m in reached if m == "feddistill.simulations" or m.startswith("feddistill.simulations."))
    assert not simulation, f"the production apps import simulation modules: {simulation}"
