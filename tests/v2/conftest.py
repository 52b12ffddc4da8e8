"""Fixtures for the Open Inference Protocol (KServe V2) tests: the tiny model served in process
(both protocols on one port), a channel, and stubs of both."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

# `bench` is not an installed package; the service harness and the reliability helpers live
# beside their own tests: all importable under a bare `pytest` too.
ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests" / "service", ROOT / "tests" / "reliability"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from service_harness import Served, open_channel, running, tiny_settings  # noqa: E402

from service.proto.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from service.proto.vae.v1 import vae_pb2_grpc  # noqa: E402


@pytest.fixture(scope="session")
def served(tiny_model: Path) -> Iterator[Served]:
    with running(tiny_settings(tiny_model)) as s:
        yield s


@pytest.fixture(scope="session")
def channel(served: Served) -> Iterator[grpc.Channel]:
    with open_channel(served.target) as ch:
        yield ch


@pytest.fixture(scope="session")
def v2(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> vae_pb2_grpc.VaeServiceStub:
    return vae_pb2_grpc.VaeServiceStub(channel)
