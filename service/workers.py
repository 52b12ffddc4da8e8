"""`vae-serve --workers N`: N server processes on one port under a supervisor, for a pod with
more than one core (the Python gRPC layer of one process holds about one core).

The supervisor (the process `vae-serve` started) loads no model and no ONNX Runtime
(about 48 MB resident). It
- checks that the model has a version and that no other process listens on the ports (else it
  ends with one line, as a lone server does), picks the ports if they are 0, and has every
  worker bind them with SO_REUSEPORT: the kernel spreads new connections over the workers;
- starts the workers (`python -m service.workers`), each a whole server with its own event
  loop, model, batchers and limits, and says SERVING once every one of them does;
- serves /metrics for all of them: each worker writes its metrics to files in a private
  temporary folder, summed at each scrape (prometheus_client's multiprocess mode);
- passes SIGTERM/SIGINT on (each worker drains and stops as a lone server does, then the
  supervisor exits 0) and SIGHUP (each worker reloads its model);
- ends with status 1 when a worker exits on its own (a crash, the OOM killer, a failed start),
  after stopping the others gracefully: the pod restarts whole rather than serving on short of
  the cores it was sized for.
A worker dies with its supervisor (PR_SET_PDEATHSIG), so a killed supervisor leaves no process
holding the port.
"""

from __future__ import annotations

import signal

# As in service/__main__.py: SIGHUP (reload) must not kill a worker before serve() handles it.
signal.signal(signal.SIGHUP, signal.SIG_IGN)

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Coroutine  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from export.manifest import ModelError, resolve_version  # noqa: E402
from service import logs  # noqa: E402
from service.lifecycle import StartupError  # noqa: E402
from service.settings import Settings  # noqa: E402

if TYPE_CHECKING:  # the server (ONNX Runtime, numpy) is imported by the workers only
    from service.model.runtime import ModelInfo
    from service.server import WorkerRole

log = logging.getLogger("vae-serve")

# How the supervisor hands a worker its part (environment variables of the worker only).
SETTINGS_ENV = "VAE_WORKER_SETTINGS"  # the settings, as JSON
INDEX_ENV = "VAE_WORKER_INDEX"
READY_FD_ENV = "VAE_WORKER_READY_FD"  # a pipe: one JSON line once the worker is SERVING
PARENT_ENV = "VAE_WORKER_PARENT"  # the supervisor's pid
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run a server on uvloop (measured faster for gRPC calls) or asyncio's own loop."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("event_loop uvloop: uvloop is not installed; using asyncio's loop")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def run_server(settings: Settings, worker: WorkerRole | None = None) -> int:
    """Serve until stopped; exit status 1 with a one-line reason if the server cannot start."""
    from service.model.sessions import ProviderError
    from service.server import serve

    try:
        run_loop(serve(settings, worker), settings.event_loop)
    except (ModelError, ProviderError, StartupError) as e:
        log.error("cannot start: %s", e)
        return 1
    return 0


# -- the supervisor -----------------------------------------------------------------------------


def claim_port(host: str, port: int, what: str, hold: contextlib.ExitStack) -> int:
    """`port` (0: a free one) once no other process listens on it: the workers bind it with
    SO_REUSEPORT, which would otherwise share it silently with another server of this user.
    The probe stays bound until `hold` closes (so two claims of port 0 differ); between then
    and the workers' bind, another such server could still take the port."""
    name = host.strip("[]")
    candidates = [name] + (["0.0.0.0"] if name == "::" else [])  # a host without IPv6
    error: OSError | None = None
    for candidate in candidates:
        family = socket.AF_INET6 if ":" in candidate else socket.AF_INET
        try:
            probe = hold.enter_context(socket.socket(family, socket.SOCK_STREAM))
            # As gRPC does: a port whose old connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and candidate == "::":
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind((candidate, port))
            return int(probe.getsockname()[1])
        except OSError as e:
            error = error or e
    raise StartupError(f"cannot listen on {host}:{port} ({what}): {error}")


def worker_settings(settings: Settings) -> Settings:
    """What every worker runs: the ports claimed, no metrics port of its own (the supervisor
    serves them), and the inference threads divided among the workers unless set."""
    with contextlib.ExitStack() as hold:
        update: dict[str, Any] = {
            "workers": 1,
            "port": claim_port(settings.host, settings.port, "port", hold),
            "metrics_port": -1,
        }
        if settings.health_port >= 0:
            update["health_port"] = claim_port(
                settings.host, settings.health_port, "health_port", hold
            )
    if "inference_workers" not in settings.model_fields_set:
        update["inference_workers"] = max(1, settings.inference_workers // settings.workers)
    return settings.model_copy(update=update)


@dataclass
class Worker:
    """One worker process, as the supervisor sees it."""

    index: int
    process: asyncio.subprocess.Process
    ready: asyncio.StreamReader  # the worker's JSON line once SERVING; EOF if it exits first

    @classmethod
    async def spawn(cls, index: int, settings: Settings, metrics_dir: str) -> Worker:
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            SETTINGS_ENV: settings.model_dump_json(),
            INDEX_ENV: str(index),
            READY_FD_ENV: str(write_fd),
            PARENT_ENV: str(os.getpid()),
            MULTIPROC_ENV: metrics_dir,
        }
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service.workers",
                stdin=asyncio.subprocess.DEVNULL, env=env, pass_fds=(write_fd,),
            )  # fmt: skip
        finally:
            os.close(write_fd)
        ready = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(ready), os.fdopen(read_fd, "rb", 0)
        )
        return cls(index, process, ready)

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def describe_exit(self) -> str:
        code = self.process.returncode
        how = f"code {code}" if code is None or code >= 0 else signal.Signals(-code).name
        return f"worker {self.index} (pid {self.process.pid}) exited ({how})"


async def _wait_any(*waits: asyncio.Future[Any]) -> None:
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)


async def _supervise(settings: Settings) -> int:
    from prometheus_client import CollectorRegistry, multiprocess

    from service.metrics_http import MetricsServer

    began = time.perf_counter()
    # A version to load, or one line before any worker starts (each verifies the files itself).
    resolve_version(settings.model_repo, settings.model_name, settings.model_version)
    shared = worker_settings(settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    workers: list[Worker] = []
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stopping.set)

    def reload_all() -> None:
        for worker in workers:
            worker.signal(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, reload_all)
    with tempfile.TemporaryDirectory(prefix="vae-serve-metrics-") as metrics_dir:
        metrics_server, metrics_at = None, "off"
        if settings.metrics_port >= 0:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=metrics_dir)
            metrics_server = MetricsServer(registry)
            try:
                port = await metrics_server.start(settings.metrics_host, settings.metrics_port)
            except OSError as e:
                raise StartupError(
                    f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {e}"
                ) from e
            metrics_at = f"port {port}"
        for index in range(settings.workers):
            workers.append(await Worker.spawn(index, shared, metrics_dir))

        async def exited(worker: Worker) -> Worker:
            await worker.process.wait()
            multiprocess.mark_process_dead(worker.process.pid, metrics_dir)  # its live gauges
            return worker

        exits = [asyncio.ensure_future(exited(w)) for w in workers]
        stop = asyncio.ensure_future(stopping.wait())
        ready = asyncio.ensure_future(asyncio.gather(*(w.ready.readline() for w in workers)))
        await _wait_any(ready, stop, *exits)
        if ready.done() and all(ready.result()):
            first = json.loads(ready.result()[0])
            log.info(
                "SERVING %s version %d on port %d (metrics: %s) with %d workers after %.2f s",
                first["name"], first["version"], shared.port, metrics_at, len(workers),
                time.perf_counter() - began,
            )  # fmt: skip
            await _wait_any(stop, *exits)
        ended = [e.result() for e in exits if e.done()]
        failed = bool(ended) and not stopping.is_set()  # a worker exited unasked
        if failed:
            log.error("%s; stopping the other workers", ended[0].describe_exit())
        for worker in workers:
            worker.signal(signal.SIGTERM)
        await asyncio.gather(*exits)
        stop.cancel()
        ready.cancel()
        if metrics_server is not None:
            await metrics_server.close()
    clean = (0, -signal.SIGTERM, -signal.SIGINT)
    if failed or any(w.process.returncode not in clean for w in workers):
        return 1
    log.info("stopped %d workers", len(workers))
    return 0


def supervise(settings: Settings) -> int:
    """Run `settings.workers` servers on one port until SIGTERM/SIGINT; the exit status."""
    try:
        return asyncio.run(_supervise(settings))
    except (ModelError, StartupError) as e:
        log.error("cannot start: %s", e)
        return 1


# -- a worker -----------------------------------------------------------------------------------


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when its supervisor dies (it drains and stops), so that a killed
    supervisor never leaves workers holding the port."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        sys.exit(1)


def worker_main() -> int:
    die_with_parent(int(os.environ.pop(PARENT_ENV)))
    settings = Settings.model_validate_json(os.environ.pop(SETTINGS_ENV))
    index = int(os.environ.pop(INDEX_ENV))
    ready_fd = int(os.environ.pop(READY_FD_ENV))
    logs.configure(settings.log_level, settings.log_format, worker=index)

    from service.server import WorkerRole

    def ready(info: ModelInfo) -> None:
        line = json.dumps({"name": info.name, "version": info.version}) + "\n"
        os.write(ready_fd, line.encode())
        os.close(ready_fd)

    return run_server(settings, WorkerRole(index, ready))


if __name__ == "__main__":
    sys.exit(worker_main())
