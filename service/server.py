"""The composition root: build the gRPC server (VaeService, health, reflection, the interceptor),
start it, warm up, report SERVING, and stop gracefully on SIGTERM/SIGINT.

`create_server` only builds and binds (tests use the port it returns); `Service.start` brings the
whole graph up; `serve` runs it until a signal arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from service.interceptors import ServiceInterceptor
from service.metrics import Metrics
from service.model import ServedModel
from service.model_holder import CallModel, ModelHolder
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
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
    credentials = server_credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {address}: {e}") from e
    return server, port


def create_health_server(settings: Settings, health: HealthServicer) -> tuple[grpc.aio.Server, int]:
    """A plaintext server of grpc.health.v1 alone on settings.health_port, sharing `health`
    with the main server: for kubelet gRPC probes, which cannot speak TLS, when the main port
    does. It tells nothing but SERVING or NOT_SERVING."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{settings.host}:{settings.health_port}"
    try:
        return server, server.add_insecure_port(address)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {address} (health_port): {e}") from e


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mutual TLS when a client CA is set), or
    None for plaintext, which is for local development only (a warning is logged)."""
    if settings.tls_cert is None or settings.tls_key is None:
        log.warning(
            "serving PLAINTEXT gRPC (no TLS): for local development only; set VAE_TLS_CERT and "
            "VAE_TLS_KEY (and VAE_TLS_CLIENT_CA for mutual TLS) in production"
        )
        return None
    paths = [settings.tls_cert, settings.tls_key, settings.tls_client_ca]
    try:
        cert, key, client_ca = (p.read_bytes() if p is not None else None for p in paths)
    except OSError as e:
        raise StartupError(f"cannot read a TLS file: {e}") from e
    assert cert is not None and key is not None
    _check_pem(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    log.info(
        "serving TLS with %s%s",
        settings.tls_cert,
        f"; mutual TLS: client certificates must be signed by {settings.tls_client_ca}"
        if client_ca is not None
        else "",
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _check_pem(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Refuse unusable TLS files with the reason (gRPC itself only fails to bind the port)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise StartupError(f"{cert} and {key}: not a PEM certificate and its key ({e})") from e
    if client_ca is not None:
        try:
            context.load_verify_locations(client_ca)
        except ssl.SSLError as e:
            raise StartupError(f"{client_ca}: not a PEM CA bundle ({e})") from e


async def _set_health(health: HealthServicer, status: int) -> None:
    for name in HEALTH_CHECKED:
        await health.set(name, status)  # type: ignore[arg-type]


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
    metrics_server: WSGIServer | None
    metrics_port: int | None
    interceptor: ServiceInterceptor
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    watcher: asyncio.Task[None] | None = None
    stopped: bool = False

    @property
    def model(self) -> ServedModel:
        """The live model version (it changes on a reload)."""
        return cast(ServedModel, self.models.current)

    @classmethod
    async def start(
        cls, settings: Settings, reload_requested: asyncio.Event | None = None
    ) -> Service:
        """Load and verify the model (ModelError / ProviderError before any port is bound),
        start the server NOT_SERVING, warm up, then report SERVING. Then reload the model when
        `reload_requested` is set (SIGHUP) or a new version appears (settings.reload_interval)."""
        began = time.perf_counter()
        metrics = Metrics()
        models = ModelHolder(settings, metrics)
        models.open()
        model = models.current
        health = HealthServicer()
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        ready = asyncio.Event()
        servicer = VaeServicer(
            CallModel(models),  # type: ignore[arg-type]  # info is read-only: a property
            metrics,
            max_items=settings.max_items_per_request,
        )
        interceptor = ServiceInterceptor(
            metrics, ready, models=models, max_in_flight=settings.max_in_flight
        )
        health_server, health_port = None, None
        try:
            server, port = create_server(settings, servicer, health, interceptor)
            if settings.health_port >= 0:
                health_server, health_port = create_health_server(settings, health)
        except StartupError:
            await models.close()
            raise
        metrics_server, metrics_port = None, None
        if settings.metrics_port >= 0:
            try:
                metrics_server, metrics_port = metrics.serve_http(
                    settings.metrics_host, settings.metrics_port
                )
            except OSError as e:
                await models.close()
                raise StartupError(
                    f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {e}"
                ) from e
        await server.start()
        if health_server is not None:
            await health_server.start()
            log.info("plaintext health checks (grpc.health.v1 only) on port %d", health_port)
        await models.warm_up()
        ready.set()
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "SERVING %s version %d on port %d (metrics: %s) after %.2f s",
            model.info.name,
            model.info.version,
            port,
            f"port {metrics_port}" if metrics_port is not None else "off",
            time.perf_counter() - began,
        )
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

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once; gRPC refuses new calls (GOAWAY, so clients retry elsewhere)
        while the calls it had received finish within `grace` (settings.grace_period by
        default); then release the threads and the metrics port."""
        if self.stopped:
            return
        self.stopped = True
        grace = self.settings.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.watcher is not None:
            self.watcher.cancel()
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.sleep(0)  # stop() has begun: from here gRPC refuses new calls itself
        log.info(
            "shutting down: NOT_SERVING, refusing new calls; %d inference calls in flight get up "
            "to %.1f s",
            self.interceptor.inference_in_flight,
            grace,
        )
        if self.watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        await stopping
        if self.interceptor.inference_in_flight:  # gRPC cancelled them at the grace period
            log.warning(
                "%d inference calls were cut off at the end of the grace period",
                self.interceptor.inference_in_flight,
            )
        if self.health_server is not None:
            await self.health_server.stop(None)
        await self.models.close()  # the server sends no more work: finish the queues, then stop
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.shutdown)
            self.metrics_server.server_close()
        log.info("stopped")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads the model."""
    stopping = asyncio.Event()
    reload_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a signal during start-up stops right after it
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)  # acted on once started
    service = await Service.start(settings, reload_requested)
    await stopping.wait()
    await service.stop()
