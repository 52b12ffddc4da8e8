"""A deliberately badly behaved gRPC client, written on raw HTTP/2 frames: it can ask for a reply
and never grant the flow-control window to receive it, or declare a large request and stall
part way through. Real grpcio clients cannot do either (their transport reads and grants window
on its own), which is why the attacks on the server's memory need this.

    with H2Peer("127.0.0.1", port, window=1) as peer:    # a 1-byte HTTP/2 receive window
        stream = peer.call("/vae.v1.VaeService/Sample", request_bytes)
        peer.wait_for(lambda: peer.closed or stream.data > 0)

The peer answers SETTINGS and PING (so the server's transport sees a live client) and records
what comes back per stream: DATA bytes, trailers (end of stream), RST_STREAM, GOAWAY, and the
connection's end. Frames only as far as the tests need: no HPACK decoding, no CONTINUATION.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 4, 5
DEFAULT_WINDOW = 65535
MAX_FRAME = 16384  # the HTTP/2 default SETTINGS_MAX_FRAME_SIZE, never raised here


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
    return head + payload


def _hpack_string(value: str) -> bytes:
    raw = value.encode()
    n = len(raw)
    if n < 127:
        return bytes([n]) + raw
    n -= 127
    out = bytearray([127])
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out) + raw


def headers_block(headers: list[tuple[str, str]]) -> bytes:
    """HPACK: every field a literal without indexing, with a literal name, no Huffman."""
    return b"".join(b"\x00" + _hpack_string(k) + _hpack_string(v) for k, v in headers)


def grpc_message(payload: bytes, declared: int | None = None) -> bytes:
    """The gRPC length-prefixed message; `declared` may claim more bytes than follow."""
    return b"\x00" + struct.pack(">I", len(payload) if declared is None else declared) + payload


@dataclass
class Stream:
    id: int
    data: int = 0  # DATA payload bytes received
    sent: int = 0  # DATA payload bytes sent
    ended: bool = False  # END_STREAM received (the trailers)
    reset: int | None = None  # RST_STREAM error code, if reset
    send_window: int = DEFAULT_WINDOW


class H2Peer:
    """One HTTP/2 connection to a gRPC server with a chosen receive window."""

    def __init__(self, host: str, port: int, *, window: int = DEFAULT_WINDOW) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.settimeout(None)
        self.authority = f"{host}:{port}"
        self.lock = threading.Condition()
        self.streams: dict[int, Stream] = {}
        self.next_id = 1
        self.goaway = False
        self.closed = False
        self.send_window = DEFAULT_WINDOW  # the connection's, granted by the server
        self.initial_send_window = DEFAULT_WINDOW
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def __enter__(self) -> H2Peer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join(5)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            with self.lock:
                self.closed = True
                self.lock.notify_all()

    def call(
        self, path: str, request: bytes, *, declared: int | None = None, patience: float = 2.0
    ) -> Stream:
        """Start a call and send its message (or, with `declared`, the first bytes of a longer
        one, as far as the server's flow-control windows let it, then stall)."""
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        with self.lock:
            stream = Stream(self.next_id, send_window=self.initial_send_window)
            self.next_id += 2
            self.streams[stream.id] = stream
        self._send(frame(HEADERS, END_HEADERS, stream.id, headers_block(headers)))
        body = grpc_message(request, declared)
        complete = declared is None
        self.send_body(stream, body, end=complete, patience=patience)
        return stream

    def send_body(self, stream: Stream, body: bytes, *, end: bool, patience: float = 2.0) -> int:
        """Send `body` on `stream` as the windows allow; stops when a window stays shut for
        `patience` seconds. Returns the bytes sent."""
        sent = 0
        while sent < len(body):
            with self.lock:
                ok = self.lock.wait_for(
                    lambda: self.closed or (self.send_window > 0 and stream.send_window > 0),
                    patience,
                )
                if not ok or self.closed:
                    return sent
                n = min(len(body) - sent, MAX_FRAME, self.send_window, stream.send_window)
                self.send_window -= n
                stream.send_window -= n
            last = end and sent + n == len(body)
            self._send(frame(DATA, END_STREAM if last else 0, stream.id, body[sent : sent + n]))
            sent += n
            stream.sent += n
        return sent

    def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0) -> bool:
        with self.lock:
            return self.lock.wait_for(condition, timeout)

    def _recv_exactly(self, n: int) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < n:
            try:
                chunk = self.sock.recv(n - len(chunks))
            except OSError:
                return None
            if not chunk:
                return None
            chunks += chunk
        return bytes(chunks)

    def _read(self) -> None:
        while True:
            header = self._recv_exactly(9)
            if header is None:
                break
            length = int.from_bytes(header[:3], "big")
            kind, flags = header[3], header[4]
            stream_id = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            payload = self._recv_exactly(length) if length else b""
            if payload is None:
                break
            self._on_frame(kind, flags, stream_id, payload)
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        reply = b""
        with self.lock:
            stream = self.streams.get(stream_id)
            if kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload), 6):
                    key, value = struct.unpack(">HI", payload[i : i + 6])
                    if key == SETTINGS_INITIAL_WINDOW_SIZE:
                        delta = value - self.initial_send_window
                        self.initial_send_window = value
                        for s in self.streams.values():
                            s.send_window += delta
                reply = frame(SETTINGS, ACK, 0)
            elif kind == PING and not flags & ACK:
                reply = frame(PING, ACK, 0, payload)
            elif kind == WINDOW_UPDATE:
                increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                if stream_id == 0:
                    self.send_window += increment
                elif stream is not None:
                    stream.send_window += increment
            elif kind == DATA and stream is not None:
                stream.data += len(payload)
                stream.ended |= bool(flags & END_STREAM)
            elif kind == HEADERS and stream is not None:
                stream.ended |= bool(flags & END_STREAM)
            elif kind == RST_STREAM and stream is not None:
                stream.reset = int.from_bytes(payload[:4], "big")
            elif kind == GOAWAY:
                self.goaway = True
            self.lock.notify_all()
        if reply:
            self._send(reply)


def wait(condition: Callable[[], bool], timeout: float = 30.0, step: float = 0.05) -> bool:
    """Poll `condition` until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
