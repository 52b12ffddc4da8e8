"""Prometheus metrics, on their own registry (passed around, never the global one) and served on
their own HTTP port (`service.metrics_http`).

Names follow the Prometheus conventions with a `vae_` prefix: counters end in `_total`, times
are in seconds, and rate() of the image counters is throughput.

Under `--workers N` each worker writes its metrics to files that the supervisor sums on one
endpoint (prometheus_client's multiprocess mode, `service.workers`): the gauges are summed over
the live workers, and `vae_model_info` has one series per worker (a `pid` label).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

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
# One batcher (queue) per network, and one per other decoder output a run asks for: uint8
# images (the uint8 and PNG formats) and logits (Score).
QUEUES = (*NETWORKS, "decoder_images", "decoder_logits")
MODEL_LABELS = ("name", "version", "provider", "precision")
# Rows (images or latents) per ONNX Runtime run: powers of two up to the largest batch.
BATCH_ROWS_BUCKETS = tuple(float(2**k) for k in range(13))


class Metrics:
    """Every metric the service exports, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None, *, worker: bool = False) -> None:
        """`worker`: one of several processes whose metrics the supervisor sums (prometheus_client
        must then have been imported with PROMETHEUS_MULTIPROC_DIR set)."""
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
            "vae_requests_in_flight",
            "RPCs being handled right now, each until its reply has left (a reply a slow caller "
            "has not taken still counts).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.images_generated = Counter(
            "vae_images_generated", "Images produced by Sample, Decode and Interpolate.", registry=r
        )
        self.images_encoded = Counter(
            "vae_images_encoded",
            "Images encoded by Encode, Score and Interpolate's image endpoints.",
            registry=r,
        )
        self.inference_seconds = Histogram(
            "vae_inference_seconds",
            "ONNX Runtime time per run, by network (one run may hold many images).",
            ["network"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for network in NETWORKS:
            self.inference_seconds.labels(network)  # exported as 0 before the first call
        # Info has no multiprocess mode: a worker's is a gauge, 1 (0: a version served before).
        self._served: tuple[str, ...] | None = None
        self.model: Info | Gauge = (
            Gauge(
                "vae_model_info",
                "The model being served, one series per worker (1; 0: served before a reload).",
                MODEL_LABELS,
                multiprocess_mode="liveall",
                registry=r,
            )
            if worker
            else Info("vae_model", "The model being served.", registry=r)
        )
        self.model_reloads = Counter(
            "vae_model_reloads",
            "Model reloads without a restart, by result (failure: the old version kept serving).",
            ["result"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.model_reloads.labels(result)
        self.admission_rejected = Counter(
            "vae_admission_rejected",
            "Calls refused RESOURCE_EXHAUSTED by admission: the in-flight limit (max_in_flight) "
            "or the budget of replies not yet taken (max_pending_reply_bytes).",
            registry=r,
        )
        self.pending_reply_bytes = Gauge(
            "vae_pending_reply_bytes",
            "Bytes of serialized replies not yet taken by their callers "
            "(bounded by max_pending_reply_bytes).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.stalled_calls = Counter(
            "vae_stalled_calls",
            "Calls ended because the peer stalled, by stage: request (not received within "
            "request_timeout) or reply (not taken within reply_timeout: connection closed).",
            ["stage"],
            registry=r,
        )
        for stage in ("request", "reply"):
            self.stalled_calls.labels(stage)
        self.batch_rows = Histogram(
            "vae_batch_rows",
            "Rows (images or latents) per ONNX Runtime run, by queue.",
            ["queue"],
            buckets=BATCH_ROWS_BUCKETS,
            registry=r,
        )
        self.batch_runs = Counter(
            "vae_batch_runs",
            "ONNX Runtime runs started by the batchers, by queue.",
            ["queue"],
            registry=r,
        )
        self.batch_queue_wait_seconds = Histogram(
            "vae_batch_queue_wait_seconds",
            "Time a request waited in the batch queue before its rows went to a run, by queue.",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_queue_rows = Gauge(
            "vae_batch_queue_rows",
            "Rows queued and not yet in a run, by queue.",
            ["queue"],
            multiprocess_mode="livesum",
            registry=r,
        )
        for queue in QUEUES:  # exported as 0 before the first run
            for family in (self.batch_rows, self.batch_runs, self.batch_queue_wait_seconds):
                family.labels(queue)
            self.batch_queue_rows.labels(queue)

    def batch_observer(self, queue: str) -> BatchMetrics:
        """The observer of one batcher (`queue`: encoder, decoder, or decoder_logits, Score's
        runs of the decoder); children resolved once, off the hot path."""
        return BatchMetrics(
            self.batch_rows.labels(queue),
            self.batch_runs.labels(queue),
            self.batch_queue_wait_seconds.labels(queue),
            self.batch_queue_rows.labels(queue),
        )

    def set_model(self, name: str, version: int, providers: Sequence[str], precision: str) -> None:
        served = (name, str(version), ",".join(providers), precision)
        if isinstance(self.model, Info):
            self.model.info(dict(zip(MODEL_LABELS, served, strict=True)))
            return
        if self._served is not None and self._served != served:
            self.model.labels(*self._served).set(0)
        self.model.labels(*served).set(1)
        self._served = served


class BatchMetrics:
    """A `service.batching.queue.BatchObserver` writing one queue's batch metrics."""

    def __init__(self, rows: Histogram, runs: Counter, wait: Histogram, depth: Gauge) -> None:
        self._rows, self._runs, self._wait, self._depth = rows, runs, wait, depth

    def observe_run(self, rows: int) -> None:
        self._rows.observe(rows)
        self._runs.inc()

    def observe_queue_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def set_queue_depth(self, rows: int) -> None:
        self._depth.set(rows)
