"""Library code in export/ raises errors a caller can catch; only the command lines (each
module's `main`, and export/entry.py's wrappers) turn them into an exit status."""

from __future__ import annotations

import ast
from pathlib import Path

EXPORT = Path(__file__).resolve().parents[2] / "export"


def exits(tree: ast.Module) -> list[tuple[str, int]]:
    """(enclosing top-level function, line) of every `raise SystemExit` and `sys.exit(...)`."""
    found = []
    for top in tree.body:
        owner = top.name if isinstance(top, ast.FunctionDef | ast.ClassDef) else "<module>"
        for node in ast.walk(top):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                    found.append((owner, node.lineno))
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "sys.exit":
                found.append((owner, node.lineno))
    return found


def test_only_the_command_lines_exit() -> None:
    library_exits = {
        f"{path.name}:{line} in {owner}"
        for path in sorted(EXPORT.glob("*.py"))
        if path.name != "entry.py"
        for owner, line in exits(ast.parse(path.read_text()))
        if owner != "main"
    }
    assert library_exits == set()


def test_the_check_sees_an_exit() -> None:
    code = "def helper():\n    raise SystemExit('no')\n\ndef main():\n    sys.exit(1)\n"
    assert exits(ast.parse(code)) == [("helper", 2), ("main", 5)]
