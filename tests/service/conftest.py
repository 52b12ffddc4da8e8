"""Fixtures: the tiny model served in process for the whole session, a channel and a stub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from service_harness import Served, open_channel, running, tiny_settings

from service.proto.vae.v1 import vae_pb2_grpc


@pytest.fixture(scope="session")
def served(tiny_model: Path) -> Iterator[Served]:
    with running(tiny_settings(tiny_model)) as s:
        yield s


@pytest.fixture(scope="session")
def channel(served: Served) -> Iterator[grpc.Channel]:
    with open_channel(served.target) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> vae_pb2_grpc.VaeServiceStub:
    return vae_pb2_grpc.VaeServiceStub(channel)
