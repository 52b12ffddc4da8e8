"""Fixtures for the reliability tests: a throwaway PKI; helpers live in reliability_harness.py.
The long campaign is `make reliability` (bench/reliability.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

# `bench` is not an installed package and the service harness lives beside the service tests:
# make both importable under a bare `pytest` too.
ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests" / "service"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench.certificates import Pki, make_pki  # noqa: E402


@pytest.fixture
def repo(tiny_model: Path, tmp_path: Path) -> Path:
    """A repository of the test's own holding version 1 of the tiny model (to add versions to,
    or to damage)."""
    target = tmp_path / "repo"
    shutil.copytree(tiny_model.parent.parent, target)
    return target


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
