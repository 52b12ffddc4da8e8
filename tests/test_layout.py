"""The architecture's rules (docs/architecture.md), checked on the source itself: the client
imports no server internals, no training code and no heavy runtime; the packages import in one
direction, with no circle; no module grows past what a reader takes in at once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "vae_client", "vae_data", "export", "bench")
MAX_LINES = 300


def modules() -> dict[str, Path]:
    """Dotted name -> path of every first-party module (generated stubs left out)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "proto" in parts[:2] or ".venv" in str(path) or "peers" in parts[:2]:
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The first-party modules `path` imports at its top level (not inside functions: those are
    deliberate late imports, e.g. of torch)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def test_the_client_imports_only_the_stubs_numpy_and_pillow() -> None:
    client = sorted(name for name in modules() if name.startswith("vae_client"))
    code = (
        "import sys\n"
        f"for name in {client!r}: __import__(name)\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert "vae_client.client" in loaded  # the check ran
    forbidden = [
        name
        for name in loaded
        if name.split(".")[0] in ("export", "torch", "onnxruntime", "onnx", "prometheus_client")
        or (name.startswith("service.") and not name.startswith("service.proto"))
    ]
    assert forbidden == []


def test_the_server_imports_no_client_code() -> None:
    known = modules()
    leaks = {
        name: sorted(imported)
        for name, path in known.items()
        if name.startswith("service")
        and (imported := {i for i in imports_of(path, known) if i.startswith("vae_client")})
    }
    assert leaks == {}


def test_no_import_circle() -> None:
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    # A package's own __init__ is a parent of its modules, not an edge back.
    graph = {
        name: {i for i in deps if not name.startswith(i + ".")} for name, deps in graph.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep) :], dep] if dep in path else [name, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_every_package_folder_is_a_regular_package() -> None:
    """setuptools' find_packages (the image's `pip install .`) skips a folder without an
    __init__.py: its modules would be missing from the image, though an editable install works."""
    folders = {path.parent for path in modules().values()}
    assert (
        sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_small(package: str) -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for name, path in modules().items()
        if name.split(".")[0] == package and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
