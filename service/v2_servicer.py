"""The Open Inference Protocol (KServe V2, `inference.GRPCInferenceService`) beside vae.v1.

Served on the same port, through the same interceptor (admission, readiness, deadlines, status
codes, `vae_requests_total` under the V2 method names) and the same model: a ModelInfer on
`<name>-decoder` goes through the decoder batcher that vae.v1 Sample and Decode use, one on
`<name>-encoder` through the encoder's. Tensors and the model's V2 description are in
`service.v2_codec`. Like `service.servicer`, no try/except: errors are ServiceErrors that the
interceptor answers (unknown model or version NOT_FOUND, bad tensors INVALID_ARGUMENT, a full
queue or max_in_flight RESOURCE_EXHAUSTED).

Readiness is the health service's: ServerReady and ModelReady say true once the model is warmed
up (grpc.health SERVING) and false from the moment the drain begins. ModelReady of a model or
version not served is false, not an error (what a probe wants).

ModelStatistics (Triton's extension, read by perf_analyzer): the V2 ModelInfer calls of each
model answered OK since start, their rows and where their time went (reading the tensors, the
batcher, writing the outputs); `execution_count` is the network's batcher runs from the metrics,
shared with vae.v1 (the same runs serve both protocols).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from service import v2_codec
from service.health import HealthServicer
from service.methods import not_inference, unwrapped
from service.metrics import Metrics
from service.model.runtime import ModelInfo
from service.proto.inference.v2 import grpc_predict_v2_pb2 as pb
from service.proto.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from service.servicer import INLINE_ROWS, Lease

SERVER_NAME = "vae-serve"
EXTENSIONS = ("model_configuration", "statistics")

Ready = Callable[[grpc.aio.ServicerContext], Awaitable[bool]]


def _version() -> str:
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class CallStats:
    """One V2 model's ModelInfer calls answered OK since start, and where their time went."""

    calls: int = 0
    rows: int = 0
    last_ms: int = 0  # time.time() of the latest, in milliseconds
    input_ns: int = 0  # reading and checking the request's tensors
    infer_ns: int = 0  # the batcher: queue wait and model run
    output_ns: int = 0  # converting and writing the outputs

    def add(self, rows: int, began: int, read: int, inferred: int) -> None:
        """One call: `began`, `read`, `inferred` are its time.perf_counter_ns() marks."""
        ended = time.perf_counter_ns()
        self.calls += 1
        self.rows += rows
        self.input_ns += read - began
        self.infer_ns += inferred - read
        self.output_ns += ended - inferred
        self.last_ms = time.time_ns() // 1_000_000


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        lease: Lease,
        metrics: Metrics,
        ready: Ready,
        *,
        max_items: int,
        max_queue_delay: float = 0.0,
    ) -> None:
        self.lease = lease
        self.metrics = metrics
        self.ready = ready
        self.max_items = max_items
        self.max_queue_delay = max_queue_delay
        self.version = _version()
        self.stats: dict[str, CallStats] = {}
        self._described: tuple[ModelInfo, dict[str, v2_codec.V2Model]] | None = None

    def _models(self, info: ModelInfo) -> dict[str, v2_codec.V2Model]:
        """The V2 models of one model version, made once per version."""
        cached = self._described
        if cached is None or cached[0] is not info:
            cached = self._described = (info, v2_codec.models_of(info))
        return cached[1]

    def _find(self, name: str, version: str, info: ModelInfo) -> v2_codec.V2Model:
        return v2_codec.find_model(self._models(info), name, version, info)

    @unwrapped
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @unwrapped
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.ready(context))

    @not_inference
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        with self.lease() as model:
            info = model.info
            served = request.name in self._models(info) and request.version in (
                "",
                str(info.version),
            )
            return pb.ModelReadyResponse(ready=served and await self.ready(context))

    @not_inference
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.version, extensions=EXTENSIONS
        )

    @not_inference
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        with self.lease() as model:
            v2_model = self._find(request.name, request.version, model.info)
            return v2_codec.metadata_out(v2_model, model.info, self.max_items)

    @not_inference
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        with self.lease() as model:
            v2_model = self._find(request.name, request.version, model.info)
            config = v2_codec.config_out(v2_model, self.max_items, self.max_queue_delay)
            return pb.ModelConfigResponse(config=config)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        with self.lease() as model:
            began = time.perf_counter_ns()
            info = model.info
            v2_model = self._find(request.model_name, request.model_version, info)
            wanted = v2_codec.requested_outputs(request, v2_model)
            array, typed = v2_codec.read_input(request, v2_model, info, limit=self.max_items)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            n = array.shape[0]
            read = time.perf_counter_ns()
            produce: Callable[[], list[np.ndarray]]
            if v2_model.network == "decoder":
                # Each output from the decoder run that makes it (uint8 images from the graph,
                # as vae.v1's uint8 format: the same bytes), both at once when both are asked.
                # One output (the usual request) is awaited directly: no task for it.
                runs = {"probabilities": model.decode, "image": model.decode_uint8}
                calls = [runs[t.name](array, deadline=deadline) for t in wanted]
                decoded = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
                self.metrics.images_generated.inc(n)
                produce = partial(v2_codec.decoder_outputs, decoded)
            else:
                mean, log_variance = await model.encode(array, deadline=deadline)
                self.metrics.images_encoded.inc(n)
                produce = partial(v2_codec.encoder_outputs, mean, log_variance, wanted)
            inferred = time.perf_counter_ns()
            response = pb.ModelInferResponse(
                model_name=v2_model.name, model_version=str(info.version), id=request.id
            )
            if n > INLINE_ROWS:  # conversions and copies off the event loop when large
                await model.offload(v2_codec.outputs_into, response, wanted, produce, typed=typed)
            else:
                v2_codec.outputs_into(response, wanted, produce, typed=typed)
            self.stats.setdefault(v2_model.name, CallStats()).add(n, began, read, inferred)
            return response

    @not_inference
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        with self.lease() as model:
            info = model.info
            if request.name:
                chosen = [self._find(request.name, request.version, info)]
            else:
                chosen = list(self._models(info).values())
            version, registry = str(info.version), self.metrics.registry
            return pb.ModelStatisticsResponse(
                model_stats=[
                    _statistics(m, version, self.stats.get(m.name, CallStats()), registry)
                    for m in chosen
                ]
            )


def _statistics(
    model: v2_codec.V2Model, version: str, calls: CallStats, registry: CollectorRegistry
) -> pb.ModelStatistics:
    """Triton's statistics of one model. Every duration counts the calls answered OK (what
    perf_analyzer divides by); the batcher's queue wait is inside compute_infer (the batcher
    does not time calls one by one), so `queue` is 0."""
    runs = registry.get_sample_value("vae_batch_runs_total", {"queue": model.network}) or 0.0

    def spent(ns: int) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=calls.calls, ns=ns)

    return pb.ModelStatistics(
        name=model.name,
        version=version,
        last_inference=calls.last_ms,
        inference_count=calls.rows,
        execution_count=int(runs),
        inference_stats=pb.InferStatistics(
            success=spent(calls.input_ns + calls.infer_ns + calls.output_ns),
            queue=spent(0),
            compute_input=spent(calls.input_ns),
            compute_infer=spent(calls.infer_ns),
            compute_output=spent(calls.output_ns),
        ),
    )


def health_ready(health: HealthServicer) -> Ready:
    """Readiness as the health service tells it for the whole server ("" SERVING: warmed up
    and not draining)."""
    request = health_pb2.HealthCheckRequest(service="")

    async def ready(context: grpc.aio.ServicerContext) -> bool:
        reply = await health.Check(request, context)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    return ready
