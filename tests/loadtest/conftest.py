"""A no-op VaeService on a free port, served from its own thread and event loop."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# `bench` is not an installed package: make the checkout importable under a bare `pytest` too
# (`python -m pytest` already puts the working directory on sys.path).
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.noop_server import create_server  # noqa: E402

LATENT_SIZE = 8


@pytest.fixture(scope="module")
def noop_port() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    bound: list[int] = []
    stop = asyncio.Event()

    async def serve() -> None:
        server, port = create_server("127.0.0.1:0", latent_size=LATENT_SIZE)
        await server.start()
        bound.append(port)
        started.set()
        await stop.wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10), "the no-op server did not start"
    yield bound[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()
