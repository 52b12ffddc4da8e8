"""Promises the README and deploy/README make about the running server, each checked on the real
server (in process, free loopback ports, real grpcio clients): NOT_SERVING during warm-up,
`--max-connection-age` GOAWAY, the batch metrics and the queue-full refusal's count, and
Encode's posterior draws and Score under concurrent batching equal to unbatched runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_harness import (
    BackgroundLoop,
    Samples,
    Served,
    open_channel,
    running,
    scrape,
    tiny_settings,
)

from bench.servers import free_port
from service.model.holder import ModelHolder
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.server import SERVICE_NAME, Service
from vae_client.client import to_tensor

CALL_TIMEOUT = 60.0
WAIT = 30.0  # the longest any condition below is waited for (a shared machine)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    event = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def metric(served: Served, name: str, /, **labels: str) -> float:
    return scrape(served.metrics_url).get((name, tuple(sorted(labels.items()))), 0.0)


def health_status(target: str, service: str = "") -> str | None:
    """The health status by name, or None while nothing answers on `target`."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


# ---- NOT_SERVING during warm-up (what the startupProbe relies on) ----


def test_not_serving_and_unavailable_while_the_model_warms_up(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port is open during warm-up, but health says NOT_SERVING and calls are refused
    UNAVAILABLE (retried by clients); SERVING comes only once warm-up is done. Warm-up is held
    at a gate, so nothing here depends on how long it takes."""
    gate = threading.Event()
    warm_up = ModelHolder.warm_up

    async def held_warm_up(self: ModelHolder) -> None:
        assert await asyncio.to_thread(gate.wait, 2 * WAIT), "the test never opened the gate"
        await warm_up(self)

    monkeypatch.setattr(ModelHolder, "warm_up", held_warm_up)
    port = free_port()
    settings = tiny_settings(tiny_model, port=port)
    target = f"127.0.0.1:{port}"
    background = BackgroundLoop()
    try:
        starting = asyncio.run_coroutine_threadsafe(Service.start(settings), background.loop)
        wait_until(lambda: health_status(target) is not None, "the port to answer")
        assert health_status(target) == "NOT_SERVING"
        assert health_status(target, SERVICE_NAME) == "NOT_SERVING"
        with open_channel(target) as channel, pytest.raises(grpc.RpcError) as refused:
            vae_pb2_grpc.VaeServiceStub(channel).Sample(
                vae_pb2.SampleRequest(count=1), timeout=CALL_TIMEOUT
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        details = refused.value.details()  # type: ignore[attr-defined]
        assert details == "the model is still warming up; retry shortly"
        assert not starting.done()
        gate.set()
        service = starting.result(WAIT)
        try:
            assert health_status(target) == "SERVING"
            assert health_status(target, SERVICE_NAME) == "SERVING"
            with open_channel(target) as channel:
                reply = vae_pb2_grpc.VaeServiceStub(channel).Sample(
                    vae_pb2.SampleRequest(count=1, seed=1), timeout=CALL_TIMEOUT
                )
            assert reply.seed == 1
        finally:
            background.run(service.stop(grace=1.0))
    finally:
        gate.set()
        background.close()


# ---- --max-connection-age ----


def test_max_connection_age_sends_goaway_and_the_client_reconnects(tiny_model: Path) -> None:
    """With --max-connection-age 1 the server ends each connection with a GOAWAY after about a
    second: the client's channel leaves READY on its own (without it a channel stays READY for
    good) and its next calls go over a new connection, none failing."""
    settings = tiny_settings(tiny_model, max_connection_age=1.0, grace_period=1.0)
    with running(settings) as served, open_channel(served.target) as channel:
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=True)
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        assert stub.Sample(vae_pb2.SampleRequest(count=1, seed=1), timeout=CALL_TIMEOUT).seed == 1
        wait_until(lambda: grpc.ChannelConnectivity.READY in states, "a READY connection")
        first_ready = states.index(grpc.ChannelConnectivity.READY)
        wait_until(
            lambda: any(s != grpc.ChannelConnectivity.READY for s in states[first_ready:]),
            "the server to end the connection (GOAWAY)",
        )
        gone = states[first_ready:]
        assert grpc.ChannelConnectivity.TRANSIENT_FAILURE not in gone, states
        for seed in range(3):  # a new connection; no call fails
            assert stub.Sample(vae_pb2.SampleRequest(count=1, seed=seed), timeout=CALL_TIMEOUT)
        assert metric(served, "vae_requests_total", method="Sample", code="OK") == 4
        channel.unsubscribe(states.append)


# ---- the batch metrics and the queue-full refusal's count ----


def test_batch_rows_and_queue_wait_count_every_run_and_every_call(tiny_model: Path) -> None:
    """vae_batch_rows observes each ONNX Runtime run's rows (its count is the runs, its sum the
    rows); vae_batch_queue_wait_seconds observes each call once, with the time it waited: a
    lone call held by --max-queue-delay 0.3 records a wait above 0.25 s (a lower bound: a busy
    machine only makes waits longer)."""
    settings = tiny_settings(tiny_model, max_batch_size=64, max_queue_delay=0.3)
    counts = [1, 2, 3, 5, 8, 13, 21, 40, 100]  # 100 rows: split over two runs
    with running(settings) as served, open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)

        def sample(count: int) -> None:
            stub.Sample(vae_pb2.SampleRequest(count=count), timeout=CALL_TIMEOUT)

        with ThreadPoolExecutor(len(counts)) as callers:
            list(callers.map(sample, counts))
        busy = scrape(served.metrics_url)
        sample(1)  # alone: it waits out the whole delay
        lone = scrape(served.metrics_url)

    def value(samples: Samples, name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted({"queue": "decoder", **labels}.items()))), 0.0)

    runs = value(busy, "vae_batch_runs_total")
    assert runs >= 4  # 193 rows, at most 64 a run
    assert value(busy, "vae_batch_rows_count") == runs
    assert value(busy, "vae_batch_rows_sum") == sum(counts)
    assert value(busy, "vae_batch_rows_bucket", le="64.0") == runs  # none above max_batch_size
    assert value(busy, "vae_batch_queue_wait_seconds_count") == len(counts)  # once per call
    assert value(busy, "vae_batch_queue_rows") == 0  # nothing left queued

    def moved(name: str, **labels: str) -> float:
        return value(lone, name, **labels) - value(busy, name, **labels)

    assert (moved("vae_batch_runs_total"), moved("vae_batch_rows_sum")) == (1, 1)
    assert moved("vae_batch_queue_wait_seconds_count") == 1
    assert moved("vae_batch_queue_wait_seconds_bucket", le="0.25") == 0  # it waited longer
    assert moved("vae_batch_queue_wait_seconds_sum") >= 0.25


def test_a_queue_full_refusal_is_counted_in_requests_total(tiny_model: Path) -> None:
    """A call refused RESOURCE_EXHAUSTED by --max-queue-rows is answered and counted like any
    other: vae_requests_total{code="RESOURCE_EXHAUSTED"} moves by one (and the max-in-flight
    counter, another limit, does not)."""
    settings = tiny_settings(
        tiny_model,
        max_items_per_request=16,
        max_queue_rows=16,
        max_batch_size=32,
        max_queue_delay=60.0,  # 16 rows wait a minute for a fuller batch: the queue stays full
    )
    with running(settings) as served, open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        held = stub.Sample.future(vae_pb2.SampleRequest(count=16), timeout=120)
        wait_until(
            lambda: metric(served, "vae_batch_queue_rows", queue="decoder") == 16,
            "16 rows queued",
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.Sample(vae_pb2.SampleRequest(count=1), timeout=CALL_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert refused.value.details() == (  # type: ignore[attr-defined]
            "decoder: queue full (16 rows queued + 1 requested > max_queue_rows 16)"
        )
        assert metric(served, "vae_requests_total", method="Sample", code="RESOURCE_EXHAUSTED") == 1
        assert metric(served, "vae_admission_rejected_total") == 0
        held.cancel()
        wait_until(
            lambda: metric(served, "vae_requests_total", method="Sample", code="CANCELLED") == 1,
            "the held call counted as cancelled",
        )


# ---- Encode's posterior draws and Score, batched and not ----


def images(n: int, seed: int) -> vae_pb2.ImageInput:
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return vae_pb2.ImageInput(tensor=to_tensor(pixels))


def draw_requests() -> list[vae_pb2.EncodeRequest | vae_pb2.ScoreRequest]:
    """Encode with 1 to 5 posterior draws an image and Score with 0 to 8 importance samples, of
    1 to 9 images: below and above inline_max_rows (16) and the batch size (32)."""
    calls: list[vae_pb2.EncodeRequest | vae_pb2.ScoreRequest] = []
    for i in range(48):
        n = (1, 2, 3, 5, 9)[i % 5]
        if i % 2:
            calls.append(
                vae_pb2.EncodeRequest(images=images(n, i), samples_per_image=1 + i % 5, seed=i)
            )
        else:
            calls.append(
                vae_pb2.ScoreRequest(images=images(n, i), importance_samples=i % 9, seed=i)
            )
    return calls


def answer(
    stub: vae_pb2_grpc.VaeServiceStub, request: vae_pb2.EncodeRequest | vae_pb2.ScoreRequest
) -> bytes:
    if isinstance(request, vae_pb2.EncodeRequest):
        reply: vae_pb2.EncodeResponse | vae_pb2.ScoreResponse = stub.Encode(
            request, timeout=CALL_TIMEOUT
        )
    else:
        reply = stub.Score(request, timeout=CALL_TIMEOUT)
    return bytes(reply.SerializeToString(deterministic=True))


def test_encode_draws_and_scores_under_concurrent_batching_equal_unbatched_runs(
    tiny_model: Path,
) -> None:
    calls = draw_requests()
    with (
        running(tiny_settings(tiny_model, batching=False)) as served,
        open_channel(served.target) as channel,
    ):
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        alone = [answer(stub, r) for r in calls]

    settings = tiny_settings(tiny_model, max_batch_size=32, max_queue_delay=0.02)
    with running(settings) as served:
        with open_channel(served.target) as channel, ThreadPoolExecutor(24) as callers:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            batched = list(callers.map(lambda r: answer(stub, r), calls))
        runs = {
            queue: metric(served, "vae_batch_runs_total", queue=queue)
            for queue in ("encoder", "decoder_logits")
        }
        encoded = metric(served, "vae_images_encoded_total")

    for request, a, b in zip(calls, alone, batched, strict=True):
        assert a == b, f"{type(request).__name__} seed {request.seed} differs when batched"
    # The calls were batched: fewer encoder runs than calls, and every image encoded once.
    assert 0 < runs["encoder"] < len(calls) and runs["decoder_logits"] > 0
    assert encoded == sum(r.images.tensor.shape[0] for r in calls)
