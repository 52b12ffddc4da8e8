"""Which calls the interceptor wraps, and how: read from the generated service descriptors
(every method of vae.v1.VaeService and of the Open Inference Protocol) and from the servicers'
own markers, so that a new RPC needs no table here or in the interceptor.

    @not_inference    # runs no model: answered even when inference is saturated
    async def GetModelInfo(self, request, context): ...

    @unwrapped        # left alone, like grpc.health: answered at any time, not counted
    async def ServerLive(self, request, context): ...
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError

from service.errors import InvalidArgument
from service.proto.inference.v2 import grpc_predict_v2_pb2 as v2_pb2
from service.proto.vae.v1 import vae_pb2

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Parser = Callable[[bytes], Any]
Serializer = Callable[[Any], bytes]
F = TypeVar("F", bound=Callable[..., Any])

# The methods wrapped, by path (vae.v1 and the Open Inference Protocol's, whose names differ):
# the name (the `method` label of the metrics) and the request type.
WRAPPED = {
    f"/{service.full_name}/{m.name}": (m.name, m.input_type.full_name)
    for service in (
        vae_pb2.DESCRIPTOR.services_by_name["VaeService"],
        v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    )
    for m in service.methods
}
NOT_INFERENCE_MARK = "_vae_not_inference"
UNWRAPPED_MARK = "_vae_unwrapped"


def not_inference(method: F) -> F:
    """Marks a servicer method that runs no model (metadata, model info): answered even when
    inference is saturated, outside the admission limits."""
    setattr(method, NOT_INFERENCE_MARK, True)
    return method


def unwrapped(method: F) -> F:
    """Marks a servicer method the interceptor leaves alone, like grpc.health: liveness and
    readiness, answered at any time (warming up, saturated, draining) and not counted."""
    setattr(method, UNWRAPPED_MARK, True)
    return method


@dataclass(frozen=True)
class Method:
    """One wrapped method: what the interceptor needs to answer its calls."""

    name: str  # the `method` label of the metrics
    inference: bool  # counted against the admission limits
    behavior: Handler  # the servicer's method
    parse: Parser  # the request's bytes -> its message (INVALID_ARGUMENT if they do not parse)
    serialize: Serializer  # the reply -> its bytes


def wrapped_method(path: str, handler: grpc.RpcMethodHandler | None) -> Method | None:
    """The method at `path` as the interceptor wraps it, or None where it passes through (other
    services, streams, `@unwrapped` methods)."""
    wraps = WRAPPED.get(path)
    if handler is None or handler.unary_unary is None or wraps is None:
        return None
    behavior = cast(Handler, handler.unary_unary)  # an async def in a grpc.aio server
    if getattr(behavior, UNWRAPPED_MARK, False):
        return None
    name, request_type = wraps
    return Method(
        name=name,
        inference=not getattr(behavior, NOT_INFERENCE_MARK, False),
        behavior=behavior,
        parse=_parser(cast(Parser, handler.request_deserializer), request_type),
        serialize=cast(Serializer, handler.response_serializer),
    )


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
