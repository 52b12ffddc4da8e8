"""The one place errors become status codes, and every VaeService call is counted once.

ServiceError subclasses are answered with their own code and message; anything else is logged
with its traceback and answered INTERNAL with a generic message, so no internals leak. Calls
arriving before the model is warmed up are answered UNAVAILABLE, so the client's retry takes
them to another replica (once shutdown begins, gRPC itself refuses new calls).

Admission: at most `max_in_flight` inference calls (every wrapped RPC but those marked
`@not_inference`) are handled at once, counted from the moment the call arrives until its reply
has left (not when the handler returns: a reply a slow peer has not taken still holds memory);
and while replies of `max_pending_reply_bytes` or more wait for their peers, new inference calls
are refused too. A refused call is answered RESOURCE_EXHAUSTED at once, naming the limit (the
batcher's bounded queue is a further limit).

The methods wrapped, and which are inference, are `service.methods`': read from the generated
service descriptors and the servicers' markers, so a new RPC needs no table here.

Requests are read and parsed here, inside the call, not by gRPC: every VaeService method is
served as stream-unary (the same frames on the wire), so the handler runs as soon as the call's
headers arrive. A call is refused before its request is read, so gRPC never opens its flow-control
window and a refused 16 MB upload costs nothing; a request not received within
`request_timeout` (a peer that declares a large message and stalls) ends the call; bytes that
are not the method's message are INVALID_ARGUMENT (gRPC itself would answer UNKNOWN). Replies
are serialized here too, so their size is known and the message itself is freed at once; a
reply not taken within `reply_timeout` closes the peer's connection (`service.peers`).

A call is counted in `vae_requests_total` when it ends: an error status as it is sent, an OK
reply once it has left, and one whose caller went away before taking it as CANCELLED. gRPC tells
the last case in only one way: its core logs the failed send as an ERROR with a traceback, which
`service.delivery` turns into one INFO line and a mark on the call. When the caller's own
cancellation reaches the server first, gRPC drops the send silently and the call is counted OK
(serving replies from the handler itself, which would see the failure, costs a second batch per
call: a third fewer small calls a second in a side-by-side measurement).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc

from service import peers
from service.delivery import DELIVERY
from service.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from service.methods import Method, wrapped_method
from service.metrics import Metrics

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error (logged on the server)"


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handlers of vae.v1.VaeService; other services pass through. Every call the
    server picks up, of any service, is tracked in `calls` until its status is sent, for the
    shutdown (`service.server`)."""

    def __init__(
        self,
        metrics: Metrics,
        ready: asyncio.Event,
        *,
        max_in_flight: int | None = None,
        max_pending_reply_bytes: int | None = None,
        request_timeout: float | None = None,
        reply_timeout: float | None = None,
        max_receiving: int = 16,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.max_in_flight = max_in_flight
        self.max_pending_reply_bytes = max_pending_reply_bytes or None
        self.request_timeout = request_timeout or None
        self._receiving = asyncio.Semaphore(max_receiving)
        self.reply_timeout = reply_timeout or None
        self.inference_in_flight = 0  # admitted inference calls whose reply has not left
        self.service_calls = 0  # VaeService calls of any method whose reply has not left
        self.pending_reply_bytes = 0  # replies serialized and not yet taken by their peers
        self.calls: set[asyncio.Task[Any]] = set()  # every call picked up, until it ends
        self.last_pickup = 0.0  # time.monotonic() of the latest call picked up
        self.picked_up = 0
        # One wrapped handler per method, built on its first call (gRPC asks on every call).
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        task = asyncio.current_task()  # the call's own task, until its status is sent
        if task is not None:
            self.calls.add(task)
            task.add_done_callback(self.calls.discard)
        self.last_pickup = time.monotonic()
        self.picked_up += 1
        method_path: str = handler_call_details.method  # type: ignore[attr-defined]
        cached = self._handlers.get(method_path)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        method = wrapped_method(method_path, handler)
        if method is None:
            return handler
        wrapped = grpc.stream_unary_rpc_method_handler(
            self._wrap(method),
            request_deserializer=None,  # the raw bytes, read and parsed in the call
            response_serializer=None,  # the call returns its reply serialized
        )
        self._handlers[method_path] = wrapped
        return wrapped

    def mark_cut_off(self) -> None:
        """The calls in progress are about to be cancelled (the grace period ended): count
        their replies as undelivered (CANCELLED), whatever gRPC tells of them."""
        DELIVERY.undelivered.update(self.calls)

    def _refuse_if_full(self) -> None:
        limit = self.max_in_flight
        if limit is not None and self.inference_in_flight >= limit:
            self.metrics.admission_rejected.inc()
            raise ResourceExhausted(
                f"server busy: max_in_flight ({limit} inference calls at once) reached; "
                "retry with backoff"
            )
        budget = self.max_pending_reply_bytes
        if budget and self.pending_reply_bytes >= budget:
            self.metrics.admission_rejected.inc()
            raise ResourceExhausted(
                f"server busy: {self.pending_reply_bytes} bytes of replies not yet taken by "
                f"their callers (max_pending_reply_bytes {budget}); retry with backoff"
            )

    async def _read(self, context: grpc.aio.ServicerContext) -> bytes:
        """The call's one request message, as bytes: within request_timeout, and only once one
        of the `max_receiving` receive slots is free (reading opens the peer's flow-control
        window for the whole message, so each slot may hold up to max_message_bytes)."""
        timeout = self.request_timeout
        try:
            async with asyncio.timeout(timeout):
                async with self._receiving:
                    raw = await context.read()
        except TimeoutError:
            self.metrics.stalled_calls.labels("request").inc()
            log.info("a request not received within request_timeout (%s s) was dropped", timeout)
            raise DeadlineExceeded(
                f"request not received within request_timeout ({timeout} s)"
            ) from None
        if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise InvalidArgument("request", "expected one request message, got none")
        return cast(bytes, raw)

    def _over_budget(self, size: int) -> bool:
        """Whether one more reply of `size` bytes would overspend max_pending_reply_bytes (a
        reply alone may, so that no reply is ever too large to send)."""
        budget, pending = self.max_pending_reply_bytes, self.pending_reply_bytes
        return budget is not None and pending > 0 and pending + size > budget

    def _wrap(self, wrapped: Method) -> Any:
        """The call as the service answers it: readiness, admission (an inference call counts
        against max_in_flight), reading and parsing the request, the status, the metrics once
        the call has ended. No context managers: this runs on every call."""
        metrics = self.metrics
        method, inference, behavior = wrapped.name, wrapped.inference, wrapped.behavior
        parse, serialize = wrapped.parse, wrapped.serialize
        in_flight, seconds = metrics.in_flight, metrics.request_seconds.labels(method)
        pending_gauge = metrics.pending_reply_bytes
        answered: dict[grpc.StatusCode, Any] = {}  # the requests counter's child per code

        def count(code: grpc.StatusCode, start: float) -> None:
            counter = answered.get(code)
            if counter is None:
                counter = answered[code] = metrics.requests.labels(method, code.name)
            counter.inc()
            seconds.observe(time.perf_counter() - start)

        async def handle(_requests: Any, context: grpc.aio.ServicerContext) -> bytes | None:
            start = time.perf_counter()
            task = asyncio.current_task()
            assert task is not None
            # What the call's end (its task's done callback) must account for.
            admitted = counted = False
            reply_size = 0
            code = grpc.StatusCode.OK
            timer: asyncio.TimerHandle | None = None
            raw: bytes | None = None

            def ended(_task: object) -> None:
                # The status (and the reply) has left, or the call died: only now is its
                # memory free.
                nonlocal code
                in_flight.dec()
                self.service_calls -= 1
                if admitted:
                    self.inference_in_flight -= 1
                if reply_size:
                    self.pending_reply_bytes -= reply_size
                    pending_gauge.dec(reply_size)
                if timer is not None:
                    timer.cancel()
                if counted:
                    return
                if code == grpc.StatusCode.OK and task in DELIVERY.undelivered:
                    code = grpc.StatusCode.CANCELLED
                count(code, start)

            def stalled() -> None:
                # The reply has not left within reply_timeout: the peer keeps its window shut.
                nonlocal code
                if task.done():
                    return
                code = grpc.StatusCode.CANCELLED
                metrics.stalled_calls.labels("reply").inc()
                peer = context.peer()
                closed = peers.cut(peer)
                log.warning(
                    "%s: a reply of %d bytes was not taken within reply_timeout (%s s); %s %s",
                    method,
                    reply_size,
                    self.reply_timeout,
                    "closed the connection to" if closed else "could not find the connection to",
                    peer,
                )

            in_flight.inc()
            self.service_calls += 1
            task.add_done_callback(ended)
            try:
                if not self.ready.is_set():
                    raise Unavailable("the model is still warming up; retry shortly")
                if inference:
                    self._refuse_if_full()  # before the request is read: refusals cost nothing
                    admitted = True
                    self.inference_in_flight += 1
                response = await behavior(parse(await self._read(context)), context)
                raw = serialize(response)
                del response  # only the bytes stay alive while they are sent
                if inference and self._over_budget(len(raw)):
                    metrics.admission_rejected.inc()
                    raise ResourceExhausted(
                        f"server busy: {self.pending_reply_bytes} bytes of replies not yet taken "
                        f"by their callers (max_pending_reply_bytes "
                        f"{self.max_pending_reply_bytes}); retry with backoff"
                    )
            except ServiceError as e:
                code, message = e.code, str(e)
            except asyncio.CancelledError:
                # The caller went away or its deadline passed: nothing is sent back.
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:  # a handler that aborted by itself
                code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
                raise
            except Exception:
                log.exception("%s failed", method)
                code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
            else:
                reply_size = len(raw)
                self.pending_reply_bytes += reply_size
                pending_gauge.inc(reply_size)
                if self.reply_timeout is not None:
                    timer = asyncio.get_running_loop().call_later(self.reply_timeout, stalled)
                return raw
            # The status alone (trailers only, which flow control never holds back: an error to
            # a peer with a shut window still leaves). Raised here, after the except clauses, so
            # that the AbortError's traceback holds no frame with the request in it.
            count(code, start)  # now: a caller that reads metrics after its error sees it
            counted = True
            raw = None  # a refused reply's bytes must not ride on the AbortError's traceback
            await context.abort(code, message)
            return None  # not reached: abort raises

        return handle
