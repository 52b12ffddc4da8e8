"""Fixtures for the Open Inference Protocol (KServe V2) tests: the service tests' own `served`
(the tiny model served in process: both protocols on one port), `channel` and `stub`, reused from
tests/service/conftest.py, and a V2 stub."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import grpc
import pytest

# `bench` is not an installed package; the service harness and the reliability helpers live
# beside their own tests: all importable under a bare `pytest` too.
ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests" / "service", ROOT / "tests" / "reliability"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from service.proto.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402


def _service_fixtures() -> ModuleType:
    """tests/service/conftest.py under a name of its own (every conftest is `conftest`)."""
    spec = importlib.util.spec_from_file_location(
        "service_conftest", ROOT / "tests" / "service" / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_service = _service_fixtures()
served = _service.served
channel = _service.channel
stub = _service.stub


@pytest.fixture(scope="session")
def v2(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)
