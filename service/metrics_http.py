"""The /metrics endpoint, served on the server's event loop with bounded resources.

prometheus_client's own `start_http_server` starts a thread per connection and never times one
out: 500 idle connections made 514 threads. Here a connection costs no thread; at most
`max_connections` are open at once (one more closes the oldest, so that idle connections cannot
lock a scraper out), and each must send its request within `timeout` seconds and is closed after
one answer.
"""

from __future__ import annotations

import asyncio
import gzip
import logging

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16384  # request line and headers


class MetricsServer:
    """GET /metrics (or /) in the Prometheus text format, OpenMetrics if asked for, gzip if
    accepted."""

    def __init__(
        self, registry: CollectorRegistry, *, max_connections: int = 32, timeout: float = 5.0
    ) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.timeout = timeout
        self.evicted = 0  # connections closed early because max_connections were open
        self._open: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0 picks a free one); returns the bound port."""
        self._server = await asyncio.start_server(
            self._connection, host.strip("[]"), port, limit=MAX_HEAD_BYTES
        )
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._open):
            writer.close()
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(self._open) >= self.max_connections:
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.close()  # its own coroutine ends on the closed transport
            self.evicted += 1
        self._open[writer] = None
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._answer(head))
            async with asyncio.timeout(self.timeout):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a peer that stalled, went away or sent too much: just close
        finally:
            self._open.pop(writer, None)
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {
            name.strip().lower(): value.strip()
            for name, sep, value in (line.partition(":") for line in lines[1:])
            if sep
        }
        if len(parts) != 3 or parts[0] != "GET":
            return _response(405, "text/plain", b"only GET\n")
        path = parts[1].partition("?")[0]
        if path not in ("/", "/metrics"):
            return _response(404, "text/plain", b"not found: try /metrics\n")
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.registry)
        extra = ""
        if "gzip" in headers.get("accept-encoding", ""):
            body, extra = gzip.compress(body, compresslevel=1), "Content-Encoding: gzip\r\n"
        return _response(200, content_type, body, extra)


REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}


def _response(status: int, content_type: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
