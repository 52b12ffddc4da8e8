"""The one place errors become status codes, and every VaeService call is counted once.

ServiceError subclasses are answered with their own code and message; anything else is logged
with its traceback and answered INTERNAL with a generic message, so no internals leak. Calls
arriving before the model is warmed up are answered UNAVAILABLE, so the client's retry takes
them to another replica (once shutdown begins, gRPC itself refuses new calls).

Admission: at most `max_in_flight` inference calls (every VaeService RPC but the cheap ones in
`NOT_INFERENCE`) are handled at once; one more is answered RESOURCE_EXHAUSTED at once, naming the
limit (the batcher's bounded queue is the second limit). Each admitted call leases the live model
version once (`ModelHolder.acquire`), so it finishes on that version across a reload.

Requests are parsed here, inside the call, not by gRPC: bytes that are not the method's message
are answered INVALID_ARGUMENT (gRPC itself would answer UNKNOWN), and a refused call is never
parsed at all, which keeps refusals cheap under overload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from service.errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from service.metrics import Metrics
from service.model_holder import ModelHolder
from service.proto.vae.v1 import vae_pb2

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/vae.v1.VaeService/"
INTERNAL_MESSAGE = "internal error (logged on the server)"
# Answered even when inference is saturated: no model run, no admission limit.
NOT_INFERENCE = frozenset({"GetModelInfo"})

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Parser = Callable[[bytes], Any]
REQUEST_TYPES = {
    m.name: m.input_type.full_name
    for m in vae_pb2.DESCRIPTOR.services_by_name["VaeService"].methods
}


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary-unary handlers of vae.v1.VaeService; other services pass through."""

    def __init__(
        self,
        metrics: Metrics,
        ready: asyncio.Event,
        *,
        models: ModelHolder | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.models = models
        self.max_in_flight = max_in_flight
        self.inference_in_flight = 0
        # One wrapped handler per method, built on its first call (gRPC asks on every call).
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method_path: str = handler_call_details.method  # type: ignore[attr-defined]
        cached = self._handlers.get(method_path)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler.unary_unary is None
            or not method_path.startswith(SERVICE_PREFIX)
        ):
            return handler
        behavior = cast(Handler, handler.unary_unary)  # an async def in a grpc.aio server
        method = method_path.removeprefix(SERVICE_PREFIX)
        parse = _parser(cast(Parser, handler.request_deserializer), REQUEST_TYPES[method])
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(behavior, parse, method),
            request_deserializer=None,  # the raw bytes: parsed in the call, see _parser
            response_serializer=handler.response_serializer,
        )
        self._handlers[method_path] = wrapped
        return wrapped

    def _refuse_if_full(self) -> None:
        limit = self.max_in_flight
        if limit is not None and self.inference_in_flight >= limit:
            self.metrics.admission_rejected.inc()
            raise ResourceExhausted(
                f"server busy: max_in_flight ({limit} inference calls at once) reached; "
                "retry with backoff"
            )

    def _wrap(self, behavior: Handler, parse: Parser, method: str) -> Handler:
        """The call as the service answers it: readiness, admission (an inference call counts
        against max_in_flight and leases the live model version), parsing, the status, the
        metrics. Plain try/finally rather than context managers: this runs on every call."""
        metrics, models = self.metrics, self.models
        inference = method not in NOT_INFERENCE
        in_flight, seconds = metrics.in_flight, metrics.request_seconds.labels(method)
        answered: dict[grpc.StatusCode, Any] = {}  # the requests counter's child per code

        def done(code: grpc.StatusCode, start: float) -> None:
            # Recorded before the status is sent, so a caller that scrapes right after its
            # call returns sees it counted.
            in_flight.dec()
            counter = answered.get(code)
            if counter is None:
                counter = answered[code] = metrics.requests.labels(method, code.name)
            counter.inc()
            seconds.observe(time.perf_counter() - start)

        async def admitted(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            if not inference:
                return await behavior(parse(raw), context)
            self._refuse_if_full()
            lease = models.acquire() if models is not None else None
            self.inference_in_flight += 1
            try:
                return await behavior(parse(raw), context)
            finally:
                if models is not None and lease is not None:
                    models.release(lease)
                self.inference_in_flight -= 1

        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            in_flight.inc()
            try:
                if not self.ready.is_set():
                    raise Unavailable("the model is still warming up; retry shortly")
                response = await admitted(raw, context)
            except ServiceError as e:
                code, message = e.code, str(e)
            except asyncio.CancelledError:
                # The caller went away or its deadline passed: nothing is sent back.
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                done(
                    grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED,
                    start,
                )
                raise
            except grpc.aio.AbortError:  # a handler that aborted by itself
                done(context.code() or grpc.StatusCode.UNKNOWN, start)  # type: ignore[attr-defined]
                raise
            except Exception:
                log.exception("%s failed", method)
                code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
            else:
                done(grpc.StatusCode.OK, start)
                return response
            done(code, start)
            # The status without raising (context.abort raises AbortError, whose traceback keeps
            # this frame, and so the request's bytes, alive until the cyclic GC runs: a caller
            # sending large bad requests would pin hundreds of MB). gRPC drops the reply of a
            # call whose code is not OK.
            context.set_code(code)
            context.set_details(message)
            return None

        return handle


def _parser(deserialize: Parser, type_name: str) -> Parser:
    """`deserialize` (the message's FromString), with bytes that do not parse answered
    INVALID_ARGUMENT."""

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError:
            raise InvalidArgument(
                "request", f"expected a serialized {type_name} message, got bytes that do not parse"
            ) from None

    return parse
