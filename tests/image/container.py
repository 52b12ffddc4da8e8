"""A vae-serve container under podman, seen from the host: its ports, health, logs, metrics."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.servers import scrape, total

REPO = Path(__file__).resolve().parents[2]
SERVICE = "vae.v1.VaeService"
START_TIMEOUT = 60.0  # seconds to SERVING; generous: two shared cores
STOP_TIMEOUT = 40  # podman stop -t: above the server's drain and grace (deploy/README.md)


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        command = " ".join(args)
        raise AssertionError(f"podman {command} failed ({result.returncode}):\n{result.stderr}")
    return result


@dataclass
class Container:
    """One `podman run -d` of the image, read-only with a tmpfs /tmp, as Kubernetes runs it."""

    name: str
    port: int  # the host port of gRPC (50051 inside)
    metrics_port: int  # the host port of /metrics (8000 inside)
    started: float  # time.monotonic() just before `podman run`
    serving_after: float = field(default=0.0)  # seconds from `podman run` to SERVING

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = START_TIMEOUT) -> Container:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        self.serving_after = time.monotonic() - self.started
                        return self
                except grpc.RpcError:
                    pass
                if self.state()["Status"] == "exited":
                    break
                time.sleep(0.05)
        raise AssertionError(f"{self.name} not SERVING in {timeout} s:\n{self.logs()[-3000:]}")

    def state(self) -> dict[str, object]:
        result = podman("inspect", "--format", "{{json .State}}", self.name)
        state: dict[str, object] = json.loads(result.stdout)
        return state

    def logs(self) -> str:
        result = podman("logs", self.name)
        return result.stdout + result.stderr

    def metric(self, name: str, /, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        return total(scrape(f"http://127.0.0.1:{self.metrics_port}/metrics"), name, **labels)

    def stop(self) -> tuple[int, float]:
        """`podman stop` (SIGTERM, then SIGKILL after STOP_TIMEOUT): (exit code, seconds)."""
        begin = time.monotonic()
        podman("stop", "-t", str(STOP_TIMEOUT), self.name, timeout=STOP_TIMEOUT + 30)
        code = self.state()["ExitCode"]
        assert isinstance(code, int)
        return code, time.monotonic() - begin
