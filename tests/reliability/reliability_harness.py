"""Helpers for the reliability tests: health checks, waiting on conditions, reading the
server's own metrics, calls left in flight on purpose."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_harness import Served, scrape

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

MODEL = "tiny-vae"  # the tiny model's name (tests/conftest.py), in a repository of the test's own
POLL = 0.1  # seconds between polls of the repository
WITH_LATENTS = vae_pb2.SampleRequest(count=1, seed=1, return_latents=True)


def model_info(channel: grpc.Channel) -> vae_pb2.ModelInfo:
    return vae_pb2_grpc.VaeServiceStub(channel).GetModelInfo(
        vae_pb2.GetModelInfoRequest(), timeout=10
    )


def health(channel: grpc.Channel, service: str = "", timeout: float = 10.0) -> str:
    """The grpc.health.v1 status of `service`, by name (SERVING, NOT_SERVING, ...)."""
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout
    )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; generous timeouts, as the machine is shared."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def metric(served: Served, name: str, /, **labels: str) -> float:
    """One sample of the server's /metrics (0 if absent); `labels` are all of its labels."""
    return scrape(served.metrics_url).get((name, tuple(sorted(labels.items()))), 0.0)


def code_of(future: grpc.Future) -> grpc.StatusCode:
    """The status of a finished future call (`stub.X.future(...)`)."""
    try:
        future.result()
    except grpc.RpcError as e:
        return e.code()  # type: ignore[attr-defined,no-any-return]
    except grpc.FutureCancelledError:
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK


def refusal(call: Callable[..., Any], request: Any, timeout: float = 10.0) -> grpc.RpcError:
    """The RpcError `call(request)` ends with; fails the test if the call succeeds."""
    try:
        call(request, timeout=timeout)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"expected the call to be refused: {request}")
