"""One settings object for the server: defaults, then `VAE_*` environment variables, then CLI
flags (`--model-repo`, `--port`, ...). Built once in `__main__` and passed to every part."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 8000
# The images this service reads and writes (a model for another shape is refused at load): the
# one place the shape is written; every size and message derives from it.
IMAGE_SHAPE = (28, 28)
IMAGE_SIZE = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
IMAGE_BYTES = IMAGE_SIZE * 4  # one float32 image, the largest row a request carries


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup (what a Kubernetes CPU limit sets) in CPUs:
    cgroup v2's cpu.max, else v1's cfs_quota_us / cfs_period_us; None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup CPU quota, never the
    host's core count."""
    count = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, int(limit)))
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
    model_version: int | None = Field(default=None, ge=1, le=2**63 - 1)
    """Which version to serve (1 to 2^63 - 1); the highest number present if unset (flag also
    --version)."""

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
    precision: Literal["fp32", "int8", "fp16"] = "fp32"
    """Which of the version's networks to serve: the parity-checked fp32 ones, or a variant the
    manifest lists (int8 for CPUs, fp16 for CUDA); a version without it is refused."""
    workers: int = Field(default=1, ge=1)
    """Server processes sharing the gRPC port (SO_REUSEPORT), each with its own event loop, model
    and limits (max_in_flight and the queues are per worker), under one supervisor that serves
    /metrics for them all: for a pod with more than one core (service/workers.py)."""
    intra_op_threads: int = Field(default=1, ge=1)
    """ONNX Runtime threads per inference run (1: parallelism comes from inference_workers)."""
    inference_workers: int = Field(default_factory=usable_cpus, ge=1)
    """Threads running inference off the event loop; defaults to the CPUs this process may use
    (divided among the workers)."""

    max_items_per_request: int = Field(default=4096, ge=1)
    """Largest count / batch N one request may ask for."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=4 * 1024 * 1024)
    """gRPC max send/receive message size: at least the largest request, max_items_per_request
    float32 images (12.8 MB at 4096), plus 1 MiB; larger only lets a caller cost more memory."""

    batching: bool = True
    """Merge concurrent requests for one network into one ONNX Runtime run (off: one run per
    request, with the same queue bound, deadline checks and metrics)."""
    max_batch_size: int = Field(default=1024, ge=1)
    """Most rows (images or latents) in one run; a larger request is split across runs."""
    max_queue_delay: float = Field(default=0.0, ge=0)
    """Seconds every run waits for more rows after the oldest queued one arrived, even on an
    idle server; 0 (the default) uses adaptive_queue_delay instead."""
    adaptive_queue_delay: float = Field(default=0.002, ge=0)
    """Most seconds a batch of fewer than 512 rows waits for more while the server is busy with
    other calls (service/batching/hold.py); a lone caller never waits. 0: never wait (batches
    still form from rows that queue while the runs are busy)."""
    max_queue_rows: int = Field(default=65536, ge=1)
    """Most rows queued for one network before new requests get RESOURCE_EXHAUSTED; at least
    max_items_per_request. The default, max_in_flight x max_batch_size, lets the in-flight
    limit bind first for requests of up to a batch."""
    inline_max_rows: int = Field(default=16, ge=0)
    """Runs of at most this many rows run on the event loop instead of a worker thread
    (0: never); a small run costs less than the hop to a thread and back. Larger runs stay on
    the threads even on one CPU: the batcher merges the calls that arrive meanwhile (inline, a
    64-row call always ran alone: bench/results/inline_one_cpu_count*.json)."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The asyncio event loop implementation (uvloop: faster gRPC calls)."""

    drain_seconds: float = Field(default=5.0, ge=0)
    """Most seconds of the lame-duck period after SIGTERM/SIGINT: health says NOT_SERVING while
    calls are still accepted and served; it ends as soon as no call has arrived for 0.25 s. Only
    then does the server refuse new calls (GOAWAY), so that gRPC core never cancels a call that
    had reached it (grpc/grpc#41785). 0: refuse new calls at once."""
    grace_period: float = Field(default=10.0, ge=0)
    """Seconds in-flight calls get to finish once the drain is over."""
    max_connection_age: float = 300.0
    """Seconds before the server asks a client to reconnect (rebalances after scale-out);
    0 turns it off."""

    max_in_flight: int = Field(default=64, ge=1)
    """Most inference calls (every VaeService RPC but GetModelInfo) handled at once; beyond it a
    call gets RESOURCE_EXHAUSTED at once. Bounds the memory the requests and replies hold."""
    max_pending_reply_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Budget of serialized replies not yet taken by their callers (a slow or stalled reader
    holds its reply, about twice its size in memory); while it is spent, new inference calls
    get RESOURCE_EXHAUSTED at once. 0: no budget."""
    request_timeout: float = Field(default=30.0, ge=0)
    """Seconds a call's request may take to arrive once its headers have; a peer that declares
    a large message and stalls is answered DEADLINE_EXCEEDED then and its bytes freed. 0: none."""
    max_receiving: int = Field(default=16, ge=1)
    """Most requests being received at once; the others wait (within request_timeout) without
    their flow-control window opened. A request still arriving holds up to max_message_bytes
    (16 x 16 MiB by default), so this bounds what peers that stall part way through a large
    request can pin."""
    reply_timeout: float = Field(default=30.0, ge=0)
    """Seconds a reply may wait for its caller to take it; past that the caller's connection is
    closed (a peer that never opens its HTTP/2 window would hold the reply for good). 0: none."""
    reload_interval: float = Field(default=0.0, ge=0)
    """Seconds between polls of the model repository for a new version to swap in without a
    restart; 0: no polling (SIGHUP still reloads)."""

    health_port: int = Field(default=-1, ge=-1, le=65535)
    """A plaintext port serving grpc.health.v1 alone, for probes that cannot speak TLS (the
    kubelet's) when the main port does; 0 picks a free one, -1 (the default): none."""

    tls_cert: Path | None = None
    """PEM server certificate (chain): serve TLS instead of plaintext. Needs tls_key."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: require client certificates signed by it (mutual TLS). Needs tls_cert."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Python logging level (any case)."""
    log_format: Literal["text", "json"] = "text"
    """`text` for a terminal; `json`, one object a line, for a log collector (the images set it)."""

    @model_validator(mode="after")
    def _queue_fits_a_request(self) -> Settings:
        if self.max_queue_rows < self.max_items_per_request:
            raise ValueError(
                f"max_queue_rows ({self.max_queue_rows}) must be at least max_items_per_request "
                f"({self.max_items_per_request}), or the largest request could never be queued"
            )
        return self

    @model_validator(mode="after")
    def _messages_fit_a_request(self) -> Settings:
        largest = self.max_items_per_request * IMAGE_BYTES + 2**20
        if self.max_message_bytes < largest:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must be at least {largest}: "
                f"max_items_per_request ({self.max_items_per_request}) float32 images of "
                f"{IMAGE_BYTES} bytes, plus 1 MiB"
            )
        return self

    @model_validator(mode="after")
    def _tls_files_together(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both for TLS, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value
