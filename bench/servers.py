"""Servers as child processes, for the benchmarks, the reliability campaign and the tests: start
them (pinned to their cores with `taskset` if asked), wait until they serve, read their metrics,
memory and CPU time, signal them, stop them. The one launcher of the repository.

    with ServerProcess.start(repo, "mnist-vae", "--max-in-flight=32") as server:
        server.wait_serving()
        channel = grpc.insecure_channel(server.target)
        server.rss_bytes(), server.metric("vae_requests_total", method="Sample", code="OK")

The benchmarks time the spawn up to a SERVING health check instead (`start_vae_serve`,
`start_noop`: `startup_s`), and keep the output in a log file as well.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from types import TracebackType

from bench import process_group
from bench.placement import free_port, pinned, vae_serve_command
from bench.scrape import Samples, health_serving, scrape, total

# Re-exported: the names the rest of the repository imports from here.
__all__ = ["MALLOC_ENV", "Samples", "ServerProcess", "free_port", "scrape", "total"]

SERVING_LINE = re.compile(r"SERVING .* on port (\d+) \(metrics: port (\d+)\)")
START_TIMEOUT = 120.0  # seconds; generous: the machine is shared
STOP_TIMEOUT = 30.0
# The allocator settings the Makefile and the image use for large replies.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "134217728"}
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024


class ServerProcess:
    """One server child; its output (stderr and stdout) is collected in the background (`log`,
    a list of lines), and copied to `log_file` if there is one."""

    def __init__(
        self, popen: subprocess.Popen[str], name: str = "vae-serve", log_file: Path | None = None
    ) -> None:
        self.popen = popen
        self.name = name
        self.log: list[str] = []
        self.log_file = log_file
        self.ports: tuple[int, int] | None = None  # (gRPC, metrics) once known
        self.startup_s = 0.0  # from the spawn to up (`_wait`)
        self.rss_samples_mb: list[float] = []
        self.serving = threading.Event()
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @classmethod
    def spawn(
        cls,
        command: list[str],
        *,
        name: str = "vae-serve",
        cpus: str | None = None,
        env: dict[str, str] | None = None,
        log_file: Path | None = None,
    ) -> ServerProcess:
        """`command` as a child (on `cpus` if given), its output read in the background."""
        popen = subprocess.Popen(
            pinned(cpus, command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env if env is not None else {**os.environ, **MALLOC_ENV},
        )
        return cls(popen, name, log_file)

    @classmethod
    def start(cls, repo: Path, model: str, *flags: str, port: int = 0) -> ServerProcess:
        """Serve `<repo>/<model>` on 127.0.0.1 (gRPC on `port`, 0: a free one; metrics on a free
        port), CPU provider, plus `flags` (vae-serve's own, e.g. `--max-in-flight=8`)."""
        return cls.spawn(
            [
                *vae_serve_command(),
                f"--model-repo={repo}",
                f"--model-name={model}",
                "--host=127.0.0.1",
                f"--port={port}",
                "--metrics-host=127.0.0.1",
                "--metrics-port=0",
                "--provider=cpu",
                *flags,
            ]
        )

    @classmethod
    def start_vae_serve(
        cls, name: str, cpus: str, log: Path, env: dict[str, str], args: list[str]
    ) -> ServerProcess:
        """`vae-serve` with `args` on `cpus`; returns once health says SERVING (`startup_s`)."""
        port, metrics_port = free_port(), free_port()
        command = [
            *vae_serve_command(),
            "--host", "127.0.0.1", "--port", str(port),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
            *args,
        ]  # fmt: skip
        server = cls.spawn(command, name=name, cpus=cpus, env=env, log_file=log)
        server.ports = (port, metrics_port)
        server._wait(lambda: health_serving(server.target))
        return server

    @classmethod
    def start_noop(cls, name: str, cpus: str, log: Path, env: dict[str, str]) -> ServerProcess:
        """bench/noop_server.py on uvloop (the service's loop) on `cpus`; it has no metrics."""
        port = free_port()
        command = [
            sys.executable, "-m", "bench.noop_server",
            "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
        ]  # fmt: skip
        server = cls.spawn(command, name=name, cpus=cpus, env=env, log_file=log)
        server.ports = (port, 0)
        server._wait(lambda: "listening on port" in server.output())
        return server

    def _read(self) -> None:
        assert self.popen.stdout is not None
        out = self.log_file.open("w") if self.log_file else None
        try:
            for line in self.popen.stdout:
                self.log.append(line)
                if out:
                    out.write(line)
                    out.flush()
                match = SERVING_LINE.search(line)
                if match and not self.serving.is_set():
                    self.ports = self.ports or (int(match[1]), int(match[2]))
                    self.serving.set()
        finally:
            if out:
                out.close()

    def _wait(self, up: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        """Until `up()`; raises (and stops the child) if it exits or times out first."""
        began = time.monotonic()
        while not up():
            if self.popen.poll() is not None:
                self.reader.join(5)
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.output()}"
                )
            if time.monotonic() - began > timeout:
                self.stop()
                raise RuntimeError(f"{self.name} never reported SERVING:\n{self.output()}")
            time.sleep(0.02)
        self.startup_s = time.monotonic() - began

    def wait_serving(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Until it logs its SERVING line (which names its ports)."""
        self._wait(self.serving.is_set, timeout)
        return self

    @property
    def port(self) -> int:
        assert self.ports is not None, "not SERVING yet"
        return self.ports[0]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return "".join(self.log)

    def tail(self, chars: int = 2000) -> str:
        return self.output()[-chars:]

    def wait_log(self, text: str, timeout: float = 60.0) -> str:
        """The first log line containing `text`, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.log):
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line with {text!r}:\n{self.output()}")
            time.sleep(0.02)

    def internal_startup_s(self) -> float | None:
        """What vae-serve itself logs: from loading the model to SERVING."""
        match = re.search(r"SERVING .* after ([\d.]+) s", self.output())
        return float(match.group(1)) if match else None

    # -- metrics ------------------------------------------------------------------------------

    def samples(self) -> Samples:
        """Its /metrics now (empty for a server without metrics: the no-op one)."""
        assert self.ports is not None, "not SERVING yet"
        if not self.ports[1]:
            return {}
        return scrape(f"http://127.0.0.1:{self.ports[1]}/metrics")

    def metric(self, name: str, /, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        return total(self.samples(), name, **labels)

    # -- /proc --------------------------------------------------------------------------------

    def process_ids(self) -> list[int]:
        """Its pid, then its descendants' (the workers of `vae-serve --workers N`)."""
        return process_group.tree(self.pid)

    def rss_bytes(self) -> int:
        """Resident memory now, its workers' included; raises OSError once the process is gone."""
        pids = self.process_ids()
        total = int(Path(f"/proc/{pids[0]}/statm").read_text().split()[1])
        for pid in pids[1:]:
            with suppress(OSError):
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        return total * PAGE_BYTES

    def rss_mb(self) -> float:
        """Resident memory now in MiB (0 once the process is gone)."""
        with suppress(OSError, ValueError, IndexError):
            return self.rss_bytes() / MB
        return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, every thread and every worker included."""
        return process_group.cpu_seconds(self.pid)

    def sample_rss(self, every_s: float = 0.25) -> None:
        """Record RSS (MiB) in `rss_samples_mb` every `every_s` until `stop_sampling()`."""

        def sample() -> None:
            while not self._sampling.wait(every_s):
                self.rss_samples_mb.append(self.rss_mb())

        self._sampler = threading.Thread(target=sample, name=f"rss-{self.name}", daemon=True)
        self._sampler.start()

    def stop_sampling(self) -> None:
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join()

    # -- signals and the end ------------------------------------------------------------------

    def send(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (a graceful drain), then SIGKILL if it does not exit; the exit code."""
        self.stop_sampling()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        code = self.popen.wait(10)
        self.reader.join(10)
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
