"""Admission control, deadlines, cancellation and size limits, on the real server.

Calls are held in flight deterministically, without timing: with `max_queue_delay=60` a request
smaller than `max_batch_size` waits in the batch queue for a fuller batch for a minute, so it
stays admitted (and leased) until the test cancels it or fills the batch.
"""

from __future__ import annotations

import gc
import types
from pathlib import Path

import grpc
import numpy as np
from reliability_harness import code_of, health, metric, refusal, wait_until
from service_harness import Served, open_channel, running, tiny_settings

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

HELD = {"max_queue_delay": 60.0}  # requests below max_batch_size wait a minute in the queue
ONE = vae_pb2.SampleRequest(count=1, seed=1)
CALL_TIMEOUT = 120.0  # held calls end by cancellation, never by this


def queued_rows(served: Served) -> float:
    return metric(served, "vae_batch_queue_rows", queue="decoder")


def test_in_flight_limit_refuses_at_once_naming_it_while_health_and_info_answer(
    tiny_model: Path,
) -> None:
    settings = tiny_settings(tiny_model, max_in_flight=2, max_batch_size=1024, **HELD)
    with running(settings) as served, open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        held = [stub.Sample.future(ONE, timeout=CALL_TIMEOUT) for _ in range(2)]
        wait_until(lambda: queued_rows(served) == 2, "two calls held in the queue")

        refused = refusal(stub.Sample, ONE)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "max_in_flight (2 inference calls at once)" in refused.details()  # type: ignore[attr-defined]
        # Cheap calls are not inference: answered while the limit is reached.
        assert stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=10).name == "tiny-vae"
        assert health(channel) == "SERVING"
        assert health(channel, "vae.v1.VaeService") == "SERVING"
        assert metric(served, "vae_admission_rejected_total") == 1
        assert metric(served, "vae_requests_total", method="Sample", code="RESOURCE_EXHAUSTED") == 1

        for call in held:
            call.cancel()
        assert [code_of(call) for call in held] == [grpc.StatusCode.CANCELLED] * 2
        wait_until(lambda: metric(served, "vae_requests_in_flight") == 0, "the places freed")
        # A full batch (max_batch_size rows) runs at once: admitted and answered.
        full = stub.Sample(vae_pb2.SampleRequest(count=1024, seed=2), timeout=60)
        assert full.images.tensor.shape == [1024, 28, 28]


def test_full_queue_refuses_naming_it_and_a_cancelled_call_frees_its_place(
    tiny_model: Path,
) -> None:
    settings = tiny_settings(
        tiny_model, max_items_per_request=16, max_queue_rows=16, max_batch_size=32, **HELD
    )
    with running(settings) as served, open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        sixteen = vae_pb2.SampleRequest(count=16, seed=1)
        first = stub.Sample.future(sixteen, timeout=CALL_TIMEOUT)
        wait_until(lambda: queued_rows(served) == 16, "16 rows queued")

        refused = refusal(stub.Sample, ONE)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "queue full" in refused.details()  # type: ignore[attr-defined]
        assert "max_queue_rows 16" in refused.details()  # type: ignore[attr-defined]

        first.cancel()
        assert code_of(first) == grpc.StatusCode.CANCELLED
        wait_until(lambda: queued_rows(served) == 0, "the cancelled call's rows removed")
        wait_until(
            lambda: metric(served, "vae_requests_total", method="Sample", code="CANCELLED") == 1,
            "the cancelled call counted",
        )
        # Its place is free: the same request is queued again instead of refused.
        again = stub.Sample.future(sixteen, timeout=CALL_TIMEOUT)
        wait_until(lambda: queued_rows(served) == 16, "the next call queued")
        assert not again.done()
        again.cancel()
        assert metric(served, "vae_batch_runs_total", queue="decoder") == 0  # nothing computed


def test_a_call_whose_deadline_passes_in_the_queue_is_never_computed(tiny_model: Path) -> None:
    with running(tiny_settings(tiny_model, **HELD)) as served, open_channel(served.target) as ch:
        stub = vae_pb2_grpc.VaeServiceStub(ch)
        runs = metric(served, "vae_batch_runs_total", queue="decoder")
        images = metric(served, "vae_images_generated_total")

        late = refusal(stub.Sample, ONE, timeout=0.5)
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        wait_until(
            lambda: (
                metric(served, "vae_requests_total", method="Sample", code="DEADLINE_EXCEEDED") == 1
            ),
            "the server to count the expired call",
        )
        assert queued_rows(served) == 0
        assert metric(served, "vae_batch_runs_total", queue="decoder") == runs
        assert metric(served, "vae_images_generated_total") == images
        # The server is unharmed: a full batch goes at once.
        assert stub.Sample(vae_pb2.SampleRequest(count=1024), timeout=60).images.tensor.data


def test_a_message_above_max_message_bytes_is_refused_by_grpc_itself(tiny_model: Path) -> None:
    """One caller cannot make the server buffer more than max_message_bytes for one message:
    gRPC refuses it before any of our code (or memory for the tensor) is involved."""
    limit = 4 * 1024 * 1024
    settings = tiny_settings(tiny_model, max_message_bytes=limit, max_items_per_request=512)
    with running(settings) as served, open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)  # this client would send up to 64 MiB
        rows = limit // (4 * 4) + 1  # float32 latents of size 4, just over the limit
        latents = np.zeros((rows, 4), np.float32)
        big = vae_pb2.DecodeRequest(
            latents=vae_pb2.Tensor(
                shape=latents.shape, dtype=vae_pb2.DATA_TYPE_FLOAT32, data=latents.tobytes()
            )
        )
        assert big.ByteSize() > limit
        refused = refusal(stub.Decode, big)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "larger than max" in refused.details()  # type: ignore[attr-defined]
        assert metric(served, "vae_requests_total", method="Decode", code="OK") == 0

        too_many = refusal(stub.Sample, vae_pb2.SampleRequest(count=513))
        assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert too_many.details() == "count: expected 1 to 512, got 513"  # type: ignore[attr-defined]
        assert stub.Sample(ONE, timeout=30).images.tensor.shape == [1, 28, 28]


def frames_holding_large_bytes() -> list[str]:
    """Frames kept alive (by a reference cycle) whose locals hold a request-sized bytes."""
    return [
        f"{o.f_code.co_filename}:{o.f_code.co_name}"
        for o in gc.get_objects()
        if type(o) is types.FrameType  # not isinstance: some objects warn when asked
        and any(isinstance(v, bytes) and len(v) > 1 << 20 for v in o.f_locals.values())
    ]


def test_a_refused_large_request_is_freed_at_once_not_by_the_cyclic_gc(tiny_model: Path) -> None:
    """Refusals must not leave the request's bytes in a reference cycle (as a raised
    context.abort() did: its traceback kept the handler's frame), or a caller sending large
    bad requests pins memory until the garbage collector happens to run."""
    with running(tiny_settings(tiny_model)) as served, open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        too_many = np.zeros((200_000, 4), np.float32)  # 3.2 MB, above max_items_per_request
        request = vae_pb2.DecodeRequest(
            latents=vae_pb2.Tensor(
                shape=too_many.shape, dtype=vae_pb2.DATA_TYPE_FLOAT32, data=too_many.tobytes()
            )
        )
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                refused = refusal(stub.Decode, request)
                assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]

            async def held() -> list[str]:
                return frames_holding_large_bytes()

            assert served.background.run(held()) == []
        finally:
            gc.enable()
