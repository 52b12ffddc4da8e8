"""`vae-serve` as a child process, for the reliability campaign and its tests: start it on free
ports, wait for SERVING, read its metrics and its resident memory, signal it, stop it.

    with ServerProcess.start(repo, "mnist-vae", "--max-in-flight=32") as server:
        server.wait_serving()
        channel = grpc.insecure_channel(server.target)
        server.rss_bytes(), server.metric("vae_requests_total", method="Sample", code="OK")
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from prometheus_client.parser import text_string_to_metric_families

SERVING_LINE = re.compile(r"SERVING .* on port (\d+) \(metrics: port (\d+)\)")
START_TIMEOUT = 120.0  # seconds; generous: the machine is shared
# The allocator settings the Makefile and the image use for large replies.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "134217728"}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, keyed by (name, sorted labels), parsed by
    prometheus_client's own text-format parser."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, /, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


def vae_serve_command() -> list[str]:
    """The installed console script (`-m service` if it is not installed)."""
    script = Path(sys.executable).with_name("vae-serve")
    if script.exists():
        return [str(script)]
    found = shutil.which("vae-serve")
    return [found] if found else [sys.executable, "-m", "service"]


class ServerProcess:
    """One `vae-serve` child; its stderr is collected in the background (`log`)."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.log: list[str] = []
        self.ports: tuple[int, int] | None = None  # (gRPC, metrics) once SERVING
        self.serving = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @classmethod
    def start(cls, repo: Path, model: str, *flags: str, port: int = 0) -> ServerProcess:
        """Serve `<repo>/<model>` on 127.0.0.1 (gRPC on `port`, 0: a free one; metrics on a free
        port), CPU provider, plus `flags` (vae-serve's own, e.g. `--max-in-flight=8`)."""
        command = [
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
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **MALLOC_ENV},
        )
        return cls(popen)

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.log.append(line)
            match = SERVING_LINE.search(line)
            if match and not self.serving.is_set():
                self.ports = (int(match[1]), int(match[2]))
                self.serving.set()

    def wait_serving(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while not self.serving.wait(0.05):
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"vae-serve exited with {self.popen.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"vae-serve never reported SERVING:\n{self.output()}")
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

    def metric(self, name: str, /, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        assert self.ports is not None, "not SERVING yet"
        return total(scrape(f"http://127.0.0.1:{self.ports[1]}/metrics"), name, **labels)

    def rss_bytes(self) -> int:
        """Resident memory now (VmRSS of /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def send(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

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

    def output(self) -> str:
        return "".join(self.log)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful drain), then SIGKILL if it does not exit; the exit code."""
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
