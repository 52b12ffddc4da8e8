"""The test harness for the service: the real object graph (Settings -> Runtime -> Service:
grpc.aio server, health, reflection, metrics HTTP) on free ports, its event loop in a background
thread so tests can use plain blocking stubs. Imported by conftest.py and the tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

# The /metrics parser, re-exported for the tests that import it from here.
from bench.servers import Samples as Samples
from bench.servers import scrape as scrape
from service.server import Service
from service.settings import Settings
from vae_client.client import MAX_MESSAGE_BYTES

T = TypeVar("T")
MAX_MESSAGE = MAX_MESSAGE_BYTES


class BackgroundLoop:
    """An asyncio event loop running in a daemon thread (the server's home in tests)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Served:
    service: Service
    background: BackgroundLoop

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.service.metrics_port}/metrics"


def tiny_settings(tiny_model: Path, **overrides: Any) -> Settings:
    """Settings serving the tiny model (its version directory) on free local ports."""
    values: dict[str, Any] = {
        "model_repo": tiny_model.parent.parent,
        "model_name": tiny_model.parent.name,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "provider": "cpu",
        "inference_workers": 2,
        "grace_period": 5.0,
    }
    return Settings(**{**values, **overrides})


@contextmanager
def running(settings: Settings) -> Iterator[Served]:
    background = BackgroundLoop()
    try:
        service = background.run(Service.start(settings))
        try:
            yield Served(service, background)
        finally:
            background.run(service.stop(grace=1.0))
    finally:
        background.close()


def open_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ],
    )
