"""Servers for the benchmarks: started pinned to their cores, watched, stopped.

`BenchServer.start_vae_serve` and `start_noop` spawn `vae-serve` or the no-op server under
`taskset` and time the spawn until gRPC health (vae-serve) or the listening line (no-op) says it
is up. While it runs, its RSS and CPU time come from /proc, its metrics from /metrics. Nothing
here knows about load points: `run_bench.py` drives them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    """A port free right now on loopback (the kernel's pick; a tiny race is fine for benches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_flags(version_dir: Path) -> list[str]:
    """`vae-serve` flags serving `<repo>/<name>/<version>/` on the CPU provider."""
    return [
        "--model-repo", str(version_dir.parent.parent),
        "--model-name", version_dir.parent.name,
        "--model-version", version_dir.name,
        "--provider", "cpu",
    ]  # fmt: skip


def pinned(cpus: str, command: list[str]) -> list[str]:
    """`command` under `taskset -c cpus` (taskset execs it: the pid stays the same)."""
    return ["taskset", "-c", cpus, *command]


@dataclass
class BenchServer:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int | None
    log: Path
    startup_s: float = 0.0
    rss_samples_mb: list[float] = field(default_factory=list)
    _sampler: threading.Thread | None = None
    _sampling: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start_vae_serve(
        cls, name: str, cpus: str, log: Path, env: dict[str, str], args: list[str]
    ) -> BenchServer:
        """`vae-serve` with `args` on `cpus`; returns once health says SERVING."""
        port, metrics_port = free_port(), free_port()
        command = [
            str(BIN / "vae-serve"),
            "--host", "127.0.0.1", "--port", str(port),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
            *args,
        ]  # fmt: skip
        server = cls._spawn(name, pinned(cpus, command), port, metrics_port, log, env)
        server._wait(lambda: _health_serving(port))
        return server

    @classmethod
    def start_noop(cls, name: str, cpus: str, log: Path, env: dict[str, str]) -> BenchServer:
        """bench/noop_server.py on uvloop (the service's loop) on `cpus`."""
        port = free_port()
        command = [
            sys.executable, "-m", "bench.noop_server",
            "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
        ]  # fmt: skip
        server = cls._spawn(name, pinned(cpus, command), port, None, log, env)
        server._wait(lambda: "listening on port" in log.read_text(errors="replace"))
        return server

    @classmethod
    def _spawn(
        cls,
        name: str,
        command: list[str],
        port: int,
        metrics_port: int | None,
        log: Path,
        env: dict[str, str],
    ) -> BenchServer:
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        return cls(name, proc, port, metrics_port, log)

    def _wait(self, up: Callable[[], bool]) -> None:
        began = time.monotonic()
        while not up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() - began > START_TIMEOUT_S:
                self.stop()
                raise RuntimeError(f"{self.name} not up after {START_TIMEOUT_S} s: {self.tail()}")
            time.sleep(0.02)
        self.startup_s = time.monotonic() - began

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def internal_startup_s(self) -> float | None:
        """What vae-serve itself logs: from loading the model to SERVING."""
        match = re.search(r"SERVING .* after ([\d.]+) s", self.tail(100_000))
        return float(match.group(1)) if match else None

    # -- /proc ------------------------------------------------------------------------------

    def rss_mb(self) -> float:
        with suppress(OSError, ValueError, IndexError):
            resident_pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
            return resident_pages * PAGE_KB / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, every thread included."""
        with suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return 0.0

    def sample_rss(self, every_s: float = 0.25) -> None:
        """Record RSS in the background every `every_s` until `stop_sampling()`."""

        def sample() -> None:
            while not self._sampling.wait(every_s):
                self.rss_samples_mb.append(self.rss_mb())

        self._sampler = threading.Thread(target=sample, name=f"rss-{self.name}", daemon=True)
        self._sampler.start()

    def stop_sampling(self) -> None:
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join()

    # -- metrics ----------------------------------------------------------------------------

    def scrape(self) -> dict[str, float]:
        """The server's /metrics as {'name{label="v",...}': value} (counters as `_total`)."""
        if self.metrics_port is None:
            return {}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> int | None:
        """SIGTERM (a graceful drain), SIGKILL after STOP_TIMEOUT_S; returns the exit code."""
        self.stop_sampling()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _health_serving(port: int) -> bool:
    """One health check of the whole server: SERVING or not (yet)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
