"""Functions short enough to read at once (issue 21: none over 60 lines in the packages)."""
from __future__ import annotations

import ast
from pathlib import Path

from .support import ROOT

PACKAGES = ("server", "trainer", "residual_store")
LIMIT = 60  # lines from `def` to the last line of the body, docstring and comments included


def long_functions(root: Path, limit: int = LIMIT) -> list[tuple[Path, int, str, int]]:
    """(file, line, name, length) of every function or method under `root` over `limit` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append((path, node.lineno, node.name, lines))
    return found


def test_no_function_in_the_packages_is_over_60_lines():
    found = [f"{path.relative_to(ROOT)}:{line} {name} is {lines} lines"
             for package in PACKAGES for path, line, name, lines in long_functions(ROOT / package)]
    assert found == [], "split these into functions of at most 60 lines:\n" + "\n".join(found)


def test_the_check_sees_a_long_function(tmp_path):
    """The walk finds nested functions and methods too, not only module-level ones."""
    body = "\n".join(f"        x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "m.py").write_text(f"class C:\n    def short(self):\n        return 1\n\n"
                                   f"    def long(self):\n{body}\n")
    assert [(name, lines) for _, _, name, lines in long_functions(tmp_path)] == [("long", LIMIT + 1)]
