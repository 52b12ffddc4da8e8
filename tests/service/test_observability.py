"""Health, reflection and Prometheus metrics, through their real clients."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from service_harness import Served, open_channel, running, scrape, tiny_settings

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import to_tensor

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("service", ["", "vae.v1.VaeService"])
def test_health_is_serving(channel: grpc.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == SERVING


def test_health_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_reflection_describes_the_api(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    assert set(database.get_services()) >= {
        "vae.v1.VaeService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    service = DescriptorPool(database).FindServiceByName("vae.v1.VaeService")
    assert [m.name for m in service.methods] == [
        "Encode",
        "Decode",
        "Sample",
        "GetModelInfo",
        "Interpolate",
        "Score",
    ]


def test_metrics_move_by_exactly_the_calls_made(
    served: Served, stub: vae_pb2_grpc.VaeServiceStub, channel: grpc.Channel
) -> None:
    before = scrape(served.metrics_url)
    for _ in range(3):
        stub.Sample(vae_pb2.SampleRequest(count=5, format=vae_pb2.IMAGE_FORMAT_UINT8))
    z = to_tensor(np.zeros((4, 4), np.float32))
    for _ in range(2):
        stub.Decode(vae_pb2.DecodeRequest(latents=z))
    images = vae_pb2.ImageInput(tensor=to_tensor(np.zeros((6, 784), np.uint8)))
    stub.Encode(vae_pb2.EncodeRequest(images=images, samples_per_image=2))
    stub.GetModelInfo(vae_pb2.GetModelInfoRequest())
    with pytest.raises(grpc.RpcError):
        stub.Sample(vae_pb2.SampleRequest(count=0))
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())  # not counted
    after = scrape(served.metrics_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests = "vae_requests_total"
    assert delta(requests, method="Sample", code="OK") == 3
    assert delta(requests, method="Sample", code="INVALID_ARGUMENT") == 1
    assert delta(requests, method="Decode", code="OK") == 2
    assert delta(requests, method="Encode", code="OK") == 1
    assert delta(requests, method="GetModelInfo", code="OK") == 1
    total = sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == requests)
    assert total == 8  # health checks and reflection are not API traffic
    assert delta("vae_request_duration_seconds_count", method="Sample") == 4
    assert delta("vae_request_duration_seconds_count", method="Decode") == 2
    assert delta("vae_images_generated_total") == 3 * 5 + 2 * 4
    assert delta("vae_images_encoded_total") == 6
    assert delta("vae_inference_seconds_count", network="decoder") == 3 + 2
    # uint8 replies come from the graph's own image output (their queue), probabilities from
    # the logits (the decoder queue): one run each, the calls being one at a time.
    assert delta("vae_batch_runs_total", queue="decoder_images") == 3
    assert delta("vae_batch_runs_total", queue="decoder") == 2
    assert delta("vae_inference_seconds_count", network="encoder") == 1
    assert delta("vae_inference_seconds_sum", network="decoder") > 0
    assert after[("vae_requests_in_flight", ())] == 0
    info = (
        ("name", "tiny-vae"),
        ("precision", "fp32"),
        ("provider", "CPUExecutionProvider"),
        ("version", "1"),
    )
    assert after[("vae_model_info", info)] == 1


def test_shutdown_reports_not_serving_at_once(tiny_model: Path) -> None:
    """From the moment stop begins, health watchers see NOT_SERVING (grace period running)."""
    with running(tiny_settings(tiny_model)) as s, open_channel(s.target) as ch:
        watch: Any = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service="vae.v1.VaeService"), timeout=30
        )
        statuses = [next(watch).status]
        stopping = threading.Thread(target=s.background.run, args=(s.service.stop(10.0),))
        stopping.start()
        statuses.append(next(watch).status)
        watch.cancel()  # the watch is itself an in-flight call the grace period would wait for
        stopping.join(10)
        assert not stopping.is_alive()
    assert statuses == [SERVING, NOT_SERVING]


def test_calls_past_their_deadline_are_counted_once(
    served: Served, stub: vae_pb2_grpc.VaeServiceStub
) -> None:
    key = ("vae_requests_total", (("code", "DEADLINE_EXCEEDED"), ("method", "Sample")))
    before = scrape(served.metrics_url).get(key, 0.0)
    slow = vae_pb2.SampleRequest(count=4096, format=vae_pb2.IMAGE_FORMAT_PNG)  # about 0.2 s
    with pytest.raises(grpc.RpcError) as info:
        stub.Sample(slow, timeout=0.02)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while (after := scrape(served.metrics_url)).get(key, 0.0) == before:
        assert time.monotonic() < deadline, "the expired call was never counted"
        time.sleep(0.01)
    assert after[key] == before + 1
    while scrape(served.metrics_url)[("vae_requests_in_flight", ())] != 0:
        assert time.monotonic() < deadline, "the expired call stayed in flight"
        time.sleep(0.01)
