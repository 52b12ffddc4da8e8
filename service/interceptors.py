"""The one place errors become status codes, and every VaeService call is counted once.

ServiceError subclasses are answered with their own code and message; anything else is logged
with its traceback and answered INTERNAL with a generic message, so no internals leak. Calls
arriving before the model is warmed up are answered UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc

from service.errors import ServiceError, Unavailable
from service.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/vae.v1.VaeService/"
INTERNAL_MESSAGE = "internal error (logged on the server)"

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary-unary handlers of vae.v1.VaeService; other services pass through."""

    def __init__(self, metrics: Metrics, ready: asyncio.Event) -> None:
        self.metrics = metrics
        self.ready = ready

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method_path: str = handler_call_details.method  # type: ignore[attr-defined]
        if (
            handler is None
            or handler.unary_unary is None
            or not method_path.startswith(SERVICE_PREFIX)
        ):
            return handler
        behavior = cast(Handler, handler.unary_unary)  # an async def in a grpc.aio server
        wrapped = self._wrap(behavior, method_path.removeprefix(SERVICE_PREFIX))
        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, behavior: Handler, method: str) -> Handler:
        metrics = self.metrics

        def done(code: grpc.StatusCode, start: float) -> None:
            # Recorded before the status is sent, so a caller that scrapes right after its
            # call returns sees it counted.
            metrics.in_flight.dec()
            metrics.requests.labels(method, code.name).inc()
            metrics.request_seconds.labels(method).observe(time.perf_counter() - start)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            metrics.in_flight.inc()
            try:
                if not self.ready.is_set():
                    raise Unavailable("the model is still warming up; retry shortly")
                response = await behavior(request, context)
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
            await context.abort(code, message)

        return handle
