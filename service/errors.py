"""Domain errors, and the one place they become gRPC status codes.

Code below the RPC boundary raises these; the servicers hold no try/except. The interceptor in
`service/interceptors.py` answers each with its code and message; anything else is logged in
full and answered INTERNAL with a generic message, so no internals leak.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with a gRPC status code and a message safe to show the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """Bad input: the message names the field and what was expected."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class Unavailable(ServiceError):
    """Not ready yet, or shutting down: the caller should retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    """A queue or in-flight limit is full; the message says which."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work was computed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
