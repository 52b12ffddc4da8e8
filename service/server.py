"""The composition root: build the gRPC server (VaeService, health, reflection, the interceptor),
start it, warm up, report SERVING, and stop gracefully on SIGTERM/SIGINT.

`create_server` only builds and binds (tests use the port it returns); `Service.start` brings the
whole graph up; `serve` runs it until a signal arrives.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from service.interceptors import ServiceInterceptor
from service.metrics import Metrics
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.runtime import Runtime
from service.servicer import VaeServicer
from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME: str = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name
HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_CHECKED = ("", SERVICE_NAME)  # "" is the whole server


class StartupError(Exception):
    """The server cannot start (e.g. its port is taken); the message says why."""


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Fail loudly if another process holds the port, instead of silently sharing it.
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.grace_period * 1000)),
        ]
    return options


def create_server(
    settings: Settings,
    servicer: vae_pb2_grpc.VaeServiceServicer,
    health: HealthServicer,
    interceptor: grpc.aio.ServerInterceptor,
) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started server, and the port it bound (settings.port 0 picks one)."""
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(settings))
    vae_pb2_grpc.add_VaeServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {address}: {e}") from e
    return server, port


async def _set_health(health: HealthServicer, status: int) -> None:
    for name in HEALTH_CHECKED:
        await health.set(name, status)  # type: ignore[arg-type]


@dataclass
class Service:
    """The running object graph: settings -> metrics -> runtime -> servicer -> server."""

    settings: Settings
    metrics: Metrics
    runtime: Runtime
    health: HealthServicer
    server: grpc.aio.Server
    port: int
    metrics_server: WSGIServer | None
    metrics_port: int | None
    stopped: bool = False

    @classmethod
    async def start(cls, settings: Settings) -> Service:
        """Load and verify the model (ModelError / ProviderError before any port is bound),
        start the server NOT_SERVING, warm up, then report SERVING."""
        began = time.perf_counter()
        metrics = Metrics()
        runtime = Runtime.load(settings, metrics)
        health = HealthServicer()
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        ready = asyncio.Event()
        servicer = VaeServicer(runtime, metrics, max_items=settings.max_items_per_request)
        server, port = create_server(settings, servicer, health, ServiceInterceptor(metrics, ready))
        metrics_server, metrics_port = None, None
        if settings.metrics_port >= 0:
            try:
                metrics_server, metrics_port = metrics.serve_http(
                    settings.metrics_host, settings.metrics_port
                )
            except OSError as e:
                runtime.close()
                raise StartupError(
                    f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {e}"
                ) from e
        await server.start()
        await runtime.offload(runtime.warm_up)
        ready.set()
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "SERVING %s version %d on port %d (metrics: %s) after %.2f s",
            runtime.info.name,
            runtime.info.version,
            port,
            f"port {metrics_port}" if metrics_port is not None else "off",
            time.perf_counter() - began,
        )
        return cls(settings, metrics, runtime, health, server, port, metrics_server, metrics_port)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once; refuse new calls; let in-flight ones finish within `grace`
        (settings.grace_period by default); then release the threads and the metrics port."""
        if self.stopped:
            return
        self.stopped = True
        grace = self.settings.grace_period if grace is None else grace
        log.info("shutting down: NOT_SERVING, in-flight calls get up to %.1f s", grace)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.runtime.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.shutdown)
            self.metrics_server.server_close()
        log.info("stopped")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a signal during start-up stops right after it
        loop.add_signal_handler(sig, stopping.set)
    service = await Service.start(settings)
    await stopping.wait()
    await service.stop()
