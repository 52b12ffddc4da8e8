"""How `vae-loadtest` drives the load: channels, then a closed loop (N callers, each sending its
next request when the last returns) or an open loop (sends on a schedule, latency counted from
the scheduled send), a warm-up first, and one histogram of the measured calls.

Requests go out pre-serialized and replies are not parsed: bytes in, bytes out.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import MAX_MESSAGE_BYTES
from vae_client.load_report import PERCENTILES, Report
from vae_client.load_requests import METHODS, LoadConfig, build_payloads

SERVICE = "/vae.v1.VaeService/"
HISTOGRAM_MAX_US = 3_600_000_000  # one hour, in microseconds


def make_channels(targets: tuple[str, ...], connections: int) -> list[grpc.aio.Channel]:
    """`connections` channels (at least one per target), each with its own TCP connection(s);
    a `dns:///` target spreads its calls over every address the name resolves to."""
    channels = []
    for k in range(max(connections, len(targets))):
        target = targets[k % len(targets)]
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Channels to one target share connections unless each has its own pool.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if target.startswith("dns:"):
            options.append(("grpc.lb_policy_name", "round_robin"))
        channels.append(grpc.aio.insecure_channel(target, options=options))
    return channels


async def model_info(channel: grpc.aio.Channel, timeout: float) -> vae_pb2.ModelInfo:
    stub = vae_pb2_grpc.VaeServiceStub(channel)
    return await stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=timeout)  # type: ignore[no-any-return]


RawCall = Callable[..., Any]  # grpc.aio.UnaryUnaryMultiCallable on bytes


class LoadRun:
    """What one load run counts: a histogram, errors, completion times."""

    def __init__(self, config: LoadConfig, calls: list[RawCall], payloads: list[bytes]) -> None:
        self.config = config
        self.calls = calls
        self.payloads = payloads
        self.histogram = HdrHistogram(1, HISTOGRAM_MAX_US, 3)
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_done = 0.0
        self.send_lag_max = 0.0
        self.sent = 0
        start = time.perf_counter()
        self.measure_start = start + config.warmup
        self.measure_end = (
            self.measure_start + config.duration if config.duration is not None else math.inf
        )
        self.to_measure = config.requests if config.requests is not None else math.inf

    def admit(self, at: float) -> bool | None:
        """Whether a request sent (or scheduled) at `at` is measured; None: stop sending."""
        if at < self.measure_start:
            return False
        if at >= self.measure_end or self.to_measure <= 0:
            return None
        self.to_measure -= 1
        return True

    async def call(self, measured: bool, start: float) -> None:
        """One call; its latency counts from `start` (the send, or the scheduled send)."""
        i = self.sent
        self.sent += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.calls[i % len(self.calls)](
                self.payloads[i % len(self.payloads)], timeout=self.config.timeout
            )
            code = None
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            if code not in self.error_examples:
                self.error_examples[code] = (exc.details() or "")[:200]
        finally:
            self.in_flight -= 1
        done = time.perf_counter()
        if not measured:
            return
        self.last_done = max(self.last_done, done)
        if code is None:
            self.ok += 1
            self.histogram.record_value(max(1, round((done - start) * 1e6)))
        else:
            self.errors[code] += 1

    async def closed_loop(self) -> None:
        async def caller() -> None:
            while True:
                start = time.perf_counter()
                measured = self.admit(start)
                if measured is None:
                    return
                await self.call(measured, start)

        await asyncio.gather(*(caller() for _ in range(self.config.concurrency)))

    async def open_loop(self) -> None:
        assert self.config.rate is not None
        rate = self.config.rate
        rng = np.random.default_rng(self.config.seed)
        pending: set[asyncio.Task[None]] = set()
        origin = time.perf_counter()
        scheduled = origin
        i = 0
        while True:
            if self.config.arrivals == "poisson":
                scheduled += rng.exponential(1 / rate)
            else:
                scheduled = origin + i / rate
            i += 1
            measured = self.admit(scheduled)
            if measured is None:
                break
            wait = scheduled - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                self.send_lag_max = max(self.send_lag_max, -wait)
                if i % 64 == 0:
                    await asyncio.sleep(0)  # behind schedule: let replies in now and then
            task = asyncio.create_task(self.call(measured, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    def report(self, cpu_seconds: float, wall_seconds: float, notes: list[str]) -> Report:
        elapsed = max(self.last_done - self.measure_start, 1e-9) if self.last_done else 0.0
        h = self.histogram
        latency = {}
        if self.ok:
            latency = {f"p{p:g}": h.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
            latency["max"] = h.get_max_value() / 1000
            latency["mean"] = h.get_mean_value() / 1000
        config = asdict(self.config)
        config["mode"] = self.config.mode
        return Report(
            config=config,
            ok=self.ok,
            errors=dict(self.errors),
            error_examples=self.error_examples,
            elapsed_s=elapsed,
            requests_per_s=self.ok / elapsed if elapsed else 0.0,
            images_per_s=self.ok * self.config.images_per_call / elapsed if elapsed else 0.0,
            latency_ms=latency,
            client_cpu_percent=100 * cpu_seconds / wall_seconds if wall_seconds else 0.0,
            send_lag_ms_max=self.send_lag_max * 1000,
            max_in_flight=self.max_in_flight,
            notes=notes,
        )


async def run_load(
    config: LoadConfig, channels: list[grpc.aio.Channel], payloads: list[bytes], notes: list[str]
) -> Report:
    """One closed- or open-loop run over `channels`, warm-up first."""
    path = SERVICE + METHODS[config.method]
    calls: list[RawCall] = [  # no (de)serializers: bytes in, bytes out
        channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        for channel in channels
    ]
    cpu, wall = time.process_time(), time.perf_counter()
    run = LoadRun(config, calls, payloads)
    await (run.closed_loop() if config.mode == "closed" else run.open_loop())
    return run.report(time.process_time() - cpu, time.perf_counter() - wall, notes)


async def run_all(config: LoadConfig, sweep: list[float] | None = None) -> list[Report]:
    """Run `config`, or one run per sweep value (a concurrency, or a rate in open loop), over
    the same channels."""
    channels = make_channels(config.targets, config.connections)
    try:
        latent_size = config.latent_size
        if config.method == "decode" and latent_size is None:
            latent_size = (await model_info(channels[0], config.timeout)).latent_size
        payloads, notes = build_payloads(config, latent_size)
        reports = []
        steps: list[float | None] = list(sweep) if sweep else [None]
        for value in steps:
            step = config
            if value is not None:
                if config.mode == "open":
                    step = replace(config, rate=float(value))
                else:
                    step = replace(config, concurrency=int(value))
            reports.append(await run_load(step, channels, payloads, notes))
        return reports
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))
