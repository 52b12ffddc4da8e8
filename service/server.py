"""The composition root: build the gRPC server (VaeService, the Open Inference Protocol, health,
reflection, the interceptor), start it, warm up, report SERVING, and stop gracefully on
SIGTERM/SIGINT.

`create_server` only builds and binds (tests use the port it returns); `Service.start` brings the
whole graph up (and, if any step fails, takes down what it had started); `serve` runs it until a
signal arrives. The stop (drain, then stop) is `service.lifecycle`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import reflection, tls
from service.health import HealthServicer
from service.interceptors import ServiceInterceptor
from service.lifecycle import DaemonThreads, StartupError, drain_calls, stop_server
from service.metrics import Metrics
from service.metrics_http import MetricsServer
from service.model.holder import ModelHolder
from service.model.runtime import ModelInfo
from service.proto.inference.v2 import grpc_predict_v2_pb2 as v2_pb2
from service.proto.inference.v2 import grpc_predict_v2_pb2_grpc as v2_pb2_grpc
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.servicer import VaeServicer
from service.settings import Settings
from service.v2_servicer import V2Servicer, health_ready

log = logging.getLogger(__name__)

SERVICE_NAME: str = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name
HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The Open Inference Protocol (KServe V2), beside vae.v1 on the same port.
V2_SERVICE_NAME: str = v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_CHECKED = ("", SERVICE_NAME, V2_SERVICE_NAME)  # "" is the whole server


def max_streams_per_connection(settings: Settings) -> int:
    return max(256, 2 * settings.max_in_flight)


@dataclass(frozen=True)
class WorkerRole:
    """What a worker of `vae-serve --workers N` does differently (`service.workers`): it shares
    its ports with its siblings (SO_REUSEPORT), writes its metrics for the supervisor to sum, and
    calls `ready` once it is SERVING."""

    index: int
    ready: Callable[[ModelInfo], None]


def server_options(settings: Settings, share_port: bool = False) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Fail loudly if another process holds the port, instead of silently sharing it; only
        # the workers of one supervisor share it (which checked first that no one else had it).
        ("grpc.so_reuseport", int(share_port)),
        # No flow-control window beyond HTTP/2's initial 64 KiB until the service reads a
        # request (then gRPC opens it for the whole message): with BDP probing on, a call the
        # server refuses unread could still push megabytes into its buffers first.
        ("grpc.http2.bdp_probe", 0),
        # Streams one connection may hold open at once: health Watch and reflection streams are
        # not admitted like inference calls, so this bounds what one peer can open of them.
        # More than max_in_flight, so that the limit on inference still answers first.
        ("grpc.max_concurrent_streams", max_streams_per_connection(settings)),
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
    v2_servicer: v2_pb2_grpc.GRPCInferenceServiceServicer | None = None,
    share_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started server, and the port it bound (settings.port 0 picks one)."""
    options = server_options(settings, share_port)
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    vae_pb2_grpc.add_VaeServiceServicer_to_server(servicer, server)
    names = [SERVICE_NAME, HEALTH_SERVICE_NAME]
    if v2_servicer is not None:
        v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(v2_servicer, server)
        names.append(V2_SERVICE_NAME)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable(names, server)
    address = f"{settings.host}:{settings.port}"
    credentials = tls.server_credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {address}: {e}") from e
    return server, port


def create_health_server(
    settings: Settings, health: HealthServicer, share_port: bool = False
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server of grpc.health.v1 alone on settings.health_port, sharing `health`
    with the main server: for kubelet gRPC probes, which cannot speak TLS, when the main port
    does. It tells nothing but SERVING or NOT_SERVING."""
    options = [("grpc.so_reuseport", int(share_port)), ("grpc.max_concurrent_streams", 256)]
    server = grpc.aio.server(options=options)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{settings.host}:{settings.health_port}"
    try:
        return server, server.add_insecure_port(address)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {address} (health_port): {e}") from e


async def _set_health(health: HealthServicer, status: int) -> None:
    for name in HEALTH_CHECKED:
        await health.set(name, status)


@dataclass
class Service:
    """The running object graph: settings -> metrics -> model (runtime and batchers) ->
    servicer -> server."""

    settings: Settings
    metrics: Metrics
    models: ModelHolder
    health: HealthServicer
    server: grpc.aio.Server
    port: int
    metrics_server: MetricsServer | None
    metrics_port: int | None
    interceptor: ServiceInterceptor
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    watcher: asyncio.Task[None] | None = None
    stopped: bool = False

    @classmethod
    async def start(
        cls,
        settings: Settings,
        reload_requested: asyncio.Event | None = None,
        worker: WorkerRole | None = None,
    ) -> Service:
        """Load and verify the model (ModelError / ProviderError before any port is bound),
        start the server NOT_SERVING, warm up, then report SERVING. Then reload the model when
        `reload_requested` is set (SIGHUP) or a new version appears (settings.reload_interval).
        If a step fails (a port taken, warm-up), what had started is stopped and the model
        closed before the error is raised. `worker`: one of `--workers N` (`service.workers`)."""
        began = time.perf_counter()
        shared = worker is not None
        metrics = Metrics(worker=shared)
        models = ModelHolder(settings, metrics)
        info = models.open()
        health = HealthServicer()
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        ready = asyncio.Event()
        servicer = VaeServicer(models.lease, metrics, max_items=settings.max_items_per_request)
        interceptor = ServiceInterceptor(
            metrics,
            ready,
            max_in_flight=settings.max_in_flight,
            max_pending_reply_bytes=settings.max_pending_reply_bytes,
            request_timeout=settings.request_timeout,
            reply_timeout=settings.reply_timeout,
            max_receiving=settings.max_receiving,
        )
        v2_servicer = V2Servicer(  # the Open Inference Protocol, on the same model and batchers
            models.lease,
            metrics,
            health_ready(health),
            max_items=settings.max_items_per_request,
            max_queue_delay=settings.max_queue_delay,
        )
        async with contextlib.AsyncExitStack() as undo:  # what a failed start takes down again
            undo.push_async_callback(models.close)
            server, port = create_server(
                settings, servicer, health, interceptor, v2_servicer, share_port=shared
            )
            health_server, health_port = None, None
            if settings.health_port >= 0:
                health_server, health_port = create_health_server(settings, health, shared)
            metrics_server, metrics_port = None, None
            if settings.metrics_port >= 0:
                metrics_server = MetricsServer(metrics.registry)
                try:
                    metrics_port = await metrics_server.start(
                        settings.metrics_host, settings.metrics_port
                    )
                except OSError as e:
                    raise StartupError(
                        f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
                        f"{e}"
                    ) from e
                undo.push_async_callback(metrics_server.close)
            await server.start()
            undo.push_async_callback(server.stop, None)
            if health_server is not None:
                await health_server.start()
                undo.push_async_callback(health_server.stop, None)
                log.info("plaintext health checks (grpc.health.v1 only) on port %d", health_port)
            await models.warm_up()
            undo.pop_all()  # started: from here `stop` takes it all down
        ready.set()
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        metrics_at = "off" if metrics_port is None else f"port {metrics_port}"
        log.info(
            "SERVING %s version %d on port %d (metrics: %s) after %.2f s",
            info.name,
            info.version,
            port,
            "the supervisor's" if shared else metrics_at,
            time.perf_counter() - began,
        )
        if worker is not None:
            worker.ready(info)
        watcher = None
        if settings.reload_interval > 0 or reload_requested is not None:
            watcher = asyncio.create_task(
                models.watch(settings.reload_interval, reload_requested), name="model-reload"
            )
        return cls(
            settings,
            metrics,
            models,
            health,
            server,
            port,
            metrics_server,
            metrics_port,
            interceptor,
            health_server,
            health_port,
            watcher,
        )

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Drain, then stop (see `service.lifecycle`): NOT_SERVING at once; calls still served
        until they stop arriving (at most `drain` seconds, settings.drain_seconds by default);
        then gRPC refuses new calls (GOAWAY) while those in flight finish within `grace`
        (settings.grace_period by default); then release the threads and the metrics port."""
        if self.stopped:
            return
        self.stopped = True
        grace = self.settings.grace_period if grace is None else grace
        drain = self.settings.drain_seconds if drain is None else drain
        await self.health.enter_graceful_shutdown()
        if self.watcher is not None:
            self.watcher.cancel()  # a reload under way is abandoned (DaemonThreads)
        began = time.monotonic()
        log.info(
            "draining: NOT_SERVING; still serving calls until they stop arriving (at most %.1f s)",
            drain,
        )
        await drain_calls(self.interceptor, drain)
        self.health.end_watches()
        cut = await stop_server(self.server, self.interceptor, grace, time.monotonic() - began)
        if cut:
            log.warning("%d inference calls were cut off at the end of the grace period", cut)
        if self.watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        if self.health_server is not None:
            await self.health_server.stop(None)
        await self.models.close()  # the server sends no more work: finish the queues, then stop
        if self.metrics_server is not None:
            await self.metrics_server.close()
        log.info("stopped")


async def serve(settings: Settings, worker: WorkerRole | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads the model."""
    stopping = asyncio.Event()
    reload_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(DaemonThreads())
    for sig in (signal.SIGTERM, signal.SIGINT):  # a signal during start-up stops right after it
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)  # acted on once started
    service = await Service.start(settings, reload_requested, worker)
    await stopping.wait()
    await service.stop()
