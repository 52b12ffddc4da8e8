"""Prometheus metrics, on their own registry (passed around, never the global one) and served on
their own HTTP port.

Names follow the Prometheus conventions with a `vae_` prefix: counters end in `_total`, times
are in seconds, and rate() of the image counters is throughput.
"""

from __future__ import annotations

from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

# From 100 microseconds (a small call on loopback) to 10 s (the largest request on a busy host).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
NETWORKS = ("encoder", "decoder")


class Metrics:
    """Every metric the service exports, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vae_requests",
            "RPCs answered, by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "vae_request_duration_seconds",
            "Time from receiving an RPC to answering it, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "vae_requests_in_flight", "RPCs being handled right now.", registry=r
        )
        self.images_generated = Counter(
            "vae_images_generated", "Images produced by Sample and Decode.", registry=r
        )
        self.images_encoded = Counter("vae_images_encoded", "Images encoded by Encode.", registry=r)
        self.inference_seconds = Histogram(
            "vae_inference_seconds",
            "ONNX Runtime time per run, by network (one run may hold many images).",
            ["network"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for network in NETWORKS:
            self.inference_seconds.labels(network)  # exported as 0 before the first call
        self.model = Info("vae_model", "The model being served.", registry=r)

    def set_model(self, name: str, version: int, providers: Sequence[str]) -> None:
        self.model.info({"name": name, "version": str(version), "provider": ",".join(providers)})

    def serve_http(self, host: str, port: int) -> tuple[WSGIServer, int]:
        """Start /metrics in a daemon thread; returns the server and its bound port (port 0
        picks a free one). Stop it with `server.shutdown()`."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port
