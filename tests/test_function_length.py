"""No function or method in src/feddistill is longer than 80 lines (docstring excluded): issue 17."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "feddistill"
MAX_LINES = 80


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines taken by the function's docstring (0 if it has none)."""
    if not node.body:
        return 0
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def function_lengths(path: Path) -> list[tuple[int, str, int]]:
    """(line, qualified name, length without docstring) of every function and method in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1 - _docstring_lines(child)
                found.append((child.lineno, name, length))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def test_the_scanner_measures_without_the_docstring(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        'class A:\n    def f(self):\n        """Doc\n\n        more."""\n        x = 1\n        return x\n'
    )
    assert function_lengths(source) == [(2, "A.f", 3)]


def test_no_function_longer_than_80_lines():
    modules = sorted(SRC.rglob("*.py"))
    assert modules, f"no modules under {SRC}"
    offenders = [
        f"{path.relative_to(SRC.parent.parent)}:{line} {name} {length}"
        for path in modules
        for line, name, length in function_lengths(path)
        if length > MAX_LINES
    ]
    assert not offenders, (
        f"{len(offenders)} function(s) longer than {MAX_LINES} lines (docstring excluded), "
        "as path:line name length:\n" + "\n".join(offenders)
    )
