"""Load for the reliability campaign (bench/reliability.py): the client's open-loop driver (it
keeps sending whatever the replies do), closed-loop callers, a health prober in a process of its
own, and the percentiles of what they saw.

Every call is recorded as a `Call` (when it was meant to start, when it started and ended, its
status and details), so a scenario can ask afterwards which calls were in flight at a given
moment and how each one ended.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.servers import ServerProcess
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import MAX_MESSAGE_BYTES
from vae_client.load_driver import LoadRun, RawCall
from vae_client.load_requests import LoadConfig

MB = 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class Call:
    scheduled: float  # monotonic time the call was meant to start (open loop) or started
    started: float
    ended: float
    code: str  # grpc.StatusCode name
    details: str = ""
    tag: str = ""  # e.g. the method, or the channel

    @property
    def latency(self) -> float:
        """From the scheduled start: an open-loop driver that falls behind shows it here."""
        return self.ended - self.scheduled

    def spans(self, moment: float) -> bool:
        return self.started <= moment < self.ended


def percentiles_ms(seconds: Iterable[float], points: tuple[int, ...] = (50, 90, 99)) -> dict:
    values = np.asarray(list(seconds), dtype=np.float64) * 1000
    if values.size == 0:
        return {"count": 0}
    summary: dict[str, float] = {"count": int(values.size)}
    summary.update({f"p{p}": round(float(np.percentile(values, p)), 2) for p in points})
    summary["max"] = round(float(values.max()), 2)
    return summary


def codes(calls: Iterable[Call]) -> dict[str, int]:
    return dict(Counter(c.code for c in calls))


# -- open loop ----------------------------------------------------------------------------------


class RecordedOpenLoop(LoadRun):
    """The client's open-loop driver (`vae-loadtest`'s schedule and send lag), each call recorded
    as a `Call` instead of counted in a histogram."""

    def __init__(self, config: LoadConfig, send: RawCall, request: bytes) -> None:
        super().__init__(config, [send], [request])
        self.recorded: list[Call] = []

    async def call(self, measured: bool, start: float) -> None:
        """One call, scheduled at `start` (time.perf_counter(): the monotonic clock)."""
        started = time.perf_counter()
        try:
            await self.calls[0](self.payloads[0], timeout=self.config.timeout)
            code, details = "OK", ""
        except grpc.aio.AioRpcError as e:
            code, details = e.code().name, e.details() or ""
        self.recorded.append(Call(start, started, time.perf_counter(), code, details))


async def open_loop(
    target: str, method: str, request: bytes, rate: float, seconds: float, timeout: float
) -> tuple[list[Call], float]:
    """Send `request` (serialized) to `method` `rate` times a second for `seconds`, on a
    schedule that ignores the replies. Returns every call and the worst lag of a send behind
    its schedule (the driver's own limit: if it is large, the offered load was not offered)."""
    config = LoadConfig(
        targets=(target,), method=method, rate=rate, duration=seconds, warmup=0.0, timeout=timeout
    )
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        send = channel.unary_unary(method)  # type: ignore[call-arg]  # bytes in, bytes out
        await channel.channel_ready()
        run = RecordedOpenLoop(config, send, request)
        await run.open_loop()
    return run.recorded, run.send_lag_max


# -- closed loop --------------------------------------------------------------------------------

ERROR_PAUSE = 0.02  # seconds a caller waits after a failed call

CallFn = Callable[[grpc.Channel], Callable[[], Any]]
"""Given a channel, a function making one call (raising grpc.RpcError on failure)."""


@dataclass
class Callers:
    """`count` threads per channel, each making its next call when the last one returns (after
    `pause` seconds), until `stop()`; every call recorded. Bounded by `max_seconds`."""

    channels: dict[str, grpc.Channel]
    make_call: CallFn
    count: int = 4
    pause: float = 0.0
    max_seconds: float = 900.0
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(tag, ch), daemon=True)
            for tag, ch in self.channels.items()
            for _ in range(self.count)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, tag: str, channel: grpc.Channel) -> None:
        call = self.make_call(channel)
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                call()
                code, details = "OK", ""
            except grpc.RpcError as e:
                code, details = e.code().name, e.details() or ""  # type: ignore[attr-defined]
            with self._lock:
                self.calls.append(Call(started, started, time.monotonic(), code, details, tag))
            # After a failure, wait as a client backing off would (a refused call is answered
            # at once: without this, callers would hammer a draining or dead server).
            pause = self.pause if code == "OK" else max(self.pause, ERROR_PAUSE)
            if pause:
                time.sleep(pause)

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def stop(self) -> list[Call]:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        return self.snapshot()


# -- health, from another process ---------------------------------------------------------------


def _probe(target: str, seconds: float, interval: float, out: Any) -> None:
    latencies, failures = [], Counter[str]()
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.monotonic()
            try:
                reply = stub.Check(request, timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    latencies.append(time.monotonic() - start)
                else:
                    failures["NOT_SERVING"] += 1
            except grpc.RpcError as e:
                failures[e.code().name] += 1  # type: ignore[attr-defined]
            time.sleep(max(0.0, interval - (time.monotonic() - start)))
    out.put((latencies, dict(failures)))


class HealthProbe:
    """grpc.health.v1 checks every `interval` seconds for `seconds`, from a process of its own
    (so the load generator's event loop and GIL do not inflate what it measures)."""

    def __init__(self, target: str, seconds: float, interval: float = 0.05) -> None:
        context = multiprocessing.get_context("spawn")
        self._out = context.Queue()
        self._process = context.Process(
            target=_probe, args=(target, seconds, interval, self._out), daemon=True
        )
        self._process.start()

    def result(self, timeout: float = 600) -> dict[str, Any]:
        latencies, failures = self._out.get(timeout=timeout)
        self._process.join(30)
        return {"latency_ms": percentiles_ms(latencies), "failures": failures}


# -- the server's health and memory ---------------------------------------------------------


class RssSampler:
    """The server's resident memory every `interval` seconds, in a thread."""

    def __init__(self, server: ServerProcess, interval: float = 0.5) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, interval), daemon=True)
        self._thread.start()

    def _run(self, server: ServerProcess, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.samples.append((time.monotonic(), server.rss_bytes()))
            except (OSError, RuntimeError):  # the process is gone
                return

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples


def mb(n: float) -> float:
    return round(n / MB, 1)


def health_ok(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        sample = vae_pb2_grpc.VaeServiceStub(channel).Sample(
            vae_pb2.SampleRequest(count=4, seed=1), timeout=30
        )
    return serving and list(sample.images.tensor.shape) == [4, 28, 28]
