"""grpc.health.v1: Check, Watch and List, with Watch streams the shutdown can end.

grpcio-health-checking's asyncio servicer (1.85) has no `List` (the proto it ships has it: the
server answered UNIMPLEMENTED with an ERROR traceback), and its Watch streams run until the
client leaves, so one open Watch held `server.stop(grace)` for the whole grace period. This one
answers List, and `end_watches()` ends every Watch with UNAVAILABLE (after the watcher has seen
NOT_SERVING), which is what a client's health checker takes as "go elsewhere".
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status = Any  # health_pb2.HealthCheckResponse.ServingStatus (an int)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The status of each service name ("" is the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, Status] = {"": SERVING}
        self._changed = asyncio.Event()  # replaced on every change; watchers wait on it
        self._shutting_down = False
        self._ending = False

    async def set(self, service: str, status: Status) -> None:
        """Set a service's status; ignored once shutdown began (NOT_SERVING is final)."""
        if not self._shutting_down:
            self._set(service, status)

    def _set(self, service: str, status: Status) -> None:
        self._status[service] = status
        self._changed.set()
        self._changed = asyncio.Event()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in list(self._status):
            self._set(service, NOT_SERVING)

    def end_watches(self) -> None:
        """End every Watch stream (UNAVAILABLE) and refuse new ones: the server is stopping."""
        self._ending = True
        self._changed.set()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._status.items()
            }
        )

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._ending:
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details("the server is shutting down")
                return
            await changed.wait()
