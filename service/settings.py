"""One settings object for the server: defaults, then `VAE_*` environment variables, then CLI
flags (`--model-repo`, `--port`, ...). Built once in `__main__` and passed to every part."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 8000


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (what a Kubernetes CPU limit sets), never the host's core count."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VAE_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        protected_namespaces=(),
        extra="ignore",
        use_attribute_docstrings=True,
    )

    model_repo: Path = Path("models")
    """Model repository laid out as <repo>/<model-name>/<version>/."""
    model_name: str = "mnist-vae"
    """Which model of the repository to serve (flag also --model)."""
    model_version: int | None = None
    """Which version to serve; the highest number present if unset (flag also --version)."""

    host: str = "[::]"
    """Address the gRPC server binds."""
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """gRPC port; 0 picks a free one (the bound port is logged)."""
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, ge=-1, le=65535)
    """Prometheus /metrics port; 0 picks a free one, -1 turns the endpoint off."""
    metrics_host: str = "0.0.0.0"
    """Address the /metrics HTTP server binds."""

    provider: Literal["auto", "cuda", "cpu"] = "auto"
    """ONNX Runtime execution provider: auto (CUDA if usable, else CPU with a warning)."""
    intra_op_threads: int = Field(default=1, ge=1)
    """ONNX Runtime threads per inference run (1: parallelism comes from inference_workers)."""
    inference_workers: int = Field(default_factory=usable_cpus, ge=1)
    """Threads running inference off the event loop; defaults to the CPUs this process may use."""

    max_items_per_request: int = Field(default=4096, ge=1)
    """Largest count / batch N one request may ask for."""
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=4 * 1024 * 1024)
    """gRPC max send/receive message size; fits the largest request and reply."""

    grace_period: float = Field(default=10.0, ge=0)
    """Seconds in-flight calls get to finish after SIGTERM/SIGINT."""
    max_connection_age: float = 300.0
    """Seconds before the server asks a client to reconnect (rebalances after scale-out);
    0 turns it off."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Python logging level (any case)."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value
