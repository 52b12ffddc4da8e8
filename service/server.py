"""The composition root: build the gRPC server (VaeService, health, reflection, the interceptor),
start it, warm up, report SERVING, and stop gracefully on SIGTERM/SIGINT.

`create_server` only builds and binds (tests use the port it returns); `Service.start` brings the
whole graph up; `serve` runs it until a signal arrives.

The stop (`Service.stop`) is built around a gRPC core behaviour (grpc/grpc#41785): when
`server.stop()` begins, core CANCELS every call that has reached the server but that the
application has not picked up yet, and under a burst of large calls the asyncio server picks
calls up slowly. So the stop never begins while calls are still arriving unpicked:

1. Drain (lame duck): health says NOT_SERVING, and calls are still accepted and served, until
   no call has been picked up for `DRAIN_QUIET` seconds (every call that reached the server has
   been taken up; health-aware clients have moved away), or `drain_seconds` have passed.
2. Stop: health Watch streams end; gRPC refuses new calls (GOAWAY: clients retry elsewhere
   transparently) while in-flight calls finish within `grace_period`. Once no VaeService call
   is left (its reply sent), the rest (idle connections, open reflection streams) is cut at
   once instead of holding the grace period.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import reflection, tls
from service.health import HealthServicer
from service.interceptors import ServiceInterceptor
from service.metrics import Metrics
from service.metrics_http import MetricsServer
from service.model.holder import CallModel, ModelHolder
from service.model.served import ServedModel
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
# The drain ends once no call has been picked up for this long (and the event loop turned at
# least DRAIN_QUIET_TURNS times meanwhile, so a loop that was merely blocked does not count).
DRAIN_QUIET = 0.25
DRAIN_QUIET_TURNS = 5
POLL = 0.02  # seconds between looks at the calls during a stop


class StartupError(Exception):
    """The server cannot start (e.g. its port is taken); the message says why."""


def max_streams_per_connection(settings: Settings) -> int:
    return max(256, 2 * settings.max_in_flight)


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Fail loudly if another process holds the port, instead of silently sharing it.
        ("grpc.so_reuseport", 0),
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
) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started server, and the port it bound (settings.port 0 picks one)."""
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(settings))
    vae_pb2_grpc.add_VaeServiceServicer_to_server(servicer, server)
    names = [SERVICE_NAME, HEALTH_SERVICE_NAME]
    if v2_servicer is not None:
        v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(v2_servicer, server)
        names.append(V2_SERVICE_NAME)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable(names, server)
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
    options = [("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 256)]
    server = grpc.aio.server(options=options)
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
    try:
        tls.check_validity(settings.tls_cert)
    except tls.CertificateError as e:
        raise StartupError(f"TLS certificate {e}") from None
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
        await health.set(name, status)


class DaemonThreads(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor (`asyncio.to_thread`: model loading and hashing on a
    reload, closing a version): one daemon thread per job, and `shutdown` never waits. The
    stock executor's threads are joined at exit, so a reload hashing a huge file kept the
    process alive long after "stopped" (90 s and more, past any Kubernetes grace). A
    ThreadPoolExecutor only in name (asyncio's loop accepts nothing else): it never starts its
    pool's threads."""

    def submit(  # type: ignore[override]
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting coroutine
                future.set_exception(e)

        threading.Thread(target=run, daemon=True, name="vae-to-thread").start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # a thread still running is abandoned at exit


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
            metrics,
            ready,
            models=models,
            max_in_flight=settings.max_in_flight,
            max_pending_reply_bytes=settings.max_pending_reply_bytes,
            request_timeout=settings.request_timeout,
            reply_timeout=settings.reply_timeout,
            max_receiving=settings.max_receiving,
        )
        v2_servicer = V2Servicer(  # the Open Inference Protocol, on the same model and batchers
            CallModel(models),  # type: ignore[arg-type]  # info is read-only: a property
            metrics,
            health_ready(health),
            max_items=settings.max_items_per_request,
            max_queue_delay=settings.max_queue_delay,
        )
        health_server, health_port = None, None
        try:
            server, port = create_server(settings, servicer, health, interceptor, v2_servicer)
            if settings.health_port >= 0:
                health_server, health_port = create_health_server(settings, health)
        except StartupError:
            await models.close()
            raise
        metrics_server, metrics_port = None, None
        if settings.metrics_port >= 0:
            metrics_server = MetricsServer(metrics.registry)
            try:
                metrics_port = await metrics_server.start(
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

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Drain, then stop (see the module docstring): NOT_SERVING at once; calls still served
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
        await self._drain(drain)
        self.health.end_watches()
        cut = await self._stop_server(grace, time.monotonic() - began)
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

    async def _drain(self, most: float) -> None:
        """Serve on until no call has been picked up for DRAIN_QUIET seconds (over at least
        DRAIN_QUIET_TURNS turns of the event loop), or for `most` seconds."""
        interceptor = self.interceptor
        deadline = time.monotonic() + most
        seen, turns = interceptor.picked_up, 0
        while time.monotonic() < deadline:
            if interceptor.picked_up != seen:
                seen, turns = interceptor.picked_up, 0
            elif turns >= DRAIN_QUIET_TURNS and (
                time.monotonic() - interceptor.last_pickup >= DRAIN_QUIET
            ):
                return
            turns += 1
            await asyncio.sleep(min(POLL, max(0.0, deadline - time.monotonic())))

    async def _stop_server(self, grace: float, drained: float) -> int:
        """server.stop: gRPC refuses new calls; in-flight ones get `grace` seconds. Once no
        VaeService call is left for two looks in a row, what remains (idle connections, open
        streams) is cut at once; at the end of the grace period, everything is. Returns how
        many inference calls the grace period cut off."""
        interceptor = self.interceptor
        deadline = time.monotonic() + grace
        # gRPC's own grace ends later: the cut at `deadline` below is ours, counted first.
        stopping = asyncio.ensure_future(self.server.stop(grace + 1.0))
        await asyncio.sleep(0)  # stop() has begun: from here gRPC refuses new calls itself
        log.info(
            "shutting down: NOT_SERVING, refusing new calls (after %.2f s of drain); %d calls "
            "in flight get up to %.1f s",
            drained,
            interceptor.service_calls,
            grace,
        )
        idle_looks = 0
        while not stopping.done():
            await asyncio.wait({stopping}, timeout=max(0.0, min(POLL, deadline - time.monotonic())))
            left = interceptor.service_calls
            idle_looks = idle_looks + 1 if left == 0 else 0
            if idle_looks >= 2 or time.monotonic() >= deadline:
                cut = interceptor.inference_in_flight if left else 0
                if left:
                    interceptor.mark_cut_off()
                await self.server.stop(None)  # cancels what is left, closes every connection
                await stopping
                return cut
        return 0


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads the model."""
    stopping = asyncio.Event()
    reload_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(DaemonThreads())
    for sig in (signal.SIGTERM, signal.SIGINT):  # a signal during start-up stops right after it
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)  # acted on once started
    service = await Service.start(settings, reload_requested)
    await stopping.wait()
    await service.stop()
