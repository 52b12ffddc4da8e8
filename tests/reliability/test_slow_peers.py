"""Peers that hold the server's memory by being slow, on the real server with a raw HTTP/2 client
(bench/h2_peer: grpcio clients always read and grant window): a caller that never takes its
reply (a 1-byte window), one that declares a 16 MB request and stalls, one that goes away before
its reply. Each is bounded (a byte budget, receive slots, timeouts), shown in the metrics, and
cut; the server goes on serving others."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from reliability_harness import metric, refusal, wait_until
from service_harness import Served, open_channel, running, tiny_settings

from bench.h2_peer import H2Peer
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.server import max_streams_per_connection

SAMPLE = "/vae.v1.VaeService/Sample"
DECODE = "/vae.v1.VaeService/Decode"
WATCH = "/grpc.health.v1.Health/Watch"
REFUSED_STREAM = 7  # the HTTP/2 error code
BIG_SAMPLE = vae_pb2.SampleRequest(count=4096, seed=1).SerializeToString()  # 12.8 MB reply
REPLY_BYTES = 4096 * 784 * 4
DECLARED = 16 * 1024 * 1024 - 64  # a request as large as max_message_bytes allows


def gauge(served: Served, name: str) -> float:
    return metric(served, name)


def counted(served: Served) -> float:
    """Sample calls counted CANCELLED, or OK: gRPC gives no sign of a reply lost to a caller
    that went away when its own cancellation is processed first (see service.interceptors)."""
    return sum(
        metric(served, "vae_requests_total", method="Sample", code=code)
        for code in ("CANCELLED", "OK")
    )


def sample_ok(served: Served) -> None:
    with open_channel(served.target) as channel:
        reply = vae_pb2_grpc.VaeServiceStub(channel).Sample(
            vae_pb2.SampleRequest(count=2, seed=1), timeout=30
        )
    assert reply.seed == 1


@pytest.fixture
def budgeted(tiny_model: Path) -> Iterator[Served]:
    """A budget smaller than one large reply, and a short reply timeout."""
    settings = tiny_settings(tiny_model, max_pending_reply_bytes=REPLY_BYTES // 2, reply_timeout=3)
    with running(settings) as served:
        yield served


def test_a_reply_never_taken_is_budgeted_refuses_others_then_is_cut(budgeted: Served) -> None:
    with H2Peer("127.0.0.1", budgeted.service.port, window=1) as peer:
        stream = peer.call(SAMPLE, BIG_SAMPLE)
        wait_until(lambda: gauge(budgeted, "vae_pending_reply_bytes") > 0, "the reply held")
        # Held, not delivered: counted in flight (before, the in-flight gauge read 0).
        assert gauge(budgeted, "vae_pending_reply_bytes") >= REPLY_BYTES
        assert gauge(budgeted, "vae_requests_in_flight") == 1
        with open_channel(budgeted.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            error: Any = refusal(stub.Sample, vae_pb2.SampleRequest(count=1))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_pending_reply_bytes" in error.details()
            assert stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=10).name
        # reply_timeout: the server closes the stalled peer's connection and frees the reply.
        assert peer.wait_for(lambda: peer.closed, timeout=30), "the stalled peer was never cut"
        assert stream.data < REPLY_BYTES
    wait_until(lambda: gauge(budgeted, "vae_pending_reply_bytes") == 0, "the reply freed")
    assert metric(budgeted, "vae_stalled_calls_total", stage="reply") == 1
    assert metric(budgeted, "vae_requests_total", method="Sample", code="CANCELLED") == 1
    assert metric(budgeted, "vae_requests_total", method="Sample", code="OK") == 0
    assert metric(budgeted, "vae_admission_rejected_total") == 1
    sample_ok(budgeted)


def test_replies_held_count_against_max_in_flight(tiny_model: Path) -> None:
    settings = tiny_settings(tiny_model, max_in_flight=2, reply_timeout=60)
    with running(settings) as served:
        peers = [H2Peer("127.0.0.1", served.service.port, window=1) for _ in range(2)]
        try:
            for peer in peers:
                peer.call(SAMPLE, BIG_SAMPLE)
            wait_until(lambda: gauge(served, "vae_requests_in_flight") == 2, "both held")
            with open_channel(served.target) as channel:
                stub = vae_pb2_grpc.VaeServiceStub(channel)
                error: Any = refusal(stub.Sample, vae_pb2.SampleRequest(count=1))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_in_flight" in error.details()
        finally:
            for peer in peers:
                peer.close()
        # Gone before taking their replies: slots and bytes freed, each call counted once.
        wait_until(lambda: gauge(served, "vae_requests_in_flight") == 0, "the slots freed")
        assert gauge(served, "vae_pending_reply_bytes") == 0
        assert counted(served) == 2
        sample_ok(served)


def test_a_caller_gone_before_its_reply_is_one_line_and_cancelled(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running(tiny_settings(tiny_model)) as served:
        with caplog.at_level(logging.INFO), H2Peer("127.0.0.1", served.service.port, window=1) as p:
            p.call(SAMPLE, BIG_SAMPLE)
            wait_until(lambda: gauge(served, "vae_pending_reply_bytes") > 0, "the reply held")
        wait_until(lambda: gauge(served, "vae_requests_in_flight") == 0, "the call ended")
        assert counted(served) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


def test_a_stalled_upload_is_ended_at_request_timeout(tiny_model: Path) -> None:
    with (
        running(tiny_settings(tiny_model, request_timeout=1.5)) as served,
        H2Peer("127.0.0.1", served.service.port) as peer,
    ):
        stream = peer.call(DECODE, b"\x0a" * 1_000_000, declared=DECLARED)  # then nothing more
        assert peer.wait_for(lambda: stream.ended or stream.reset is not None, timeout=30)
        wait_until(lambda: gauge(served, "vae_requests_in_flight") == 0, "the call ended")
        assert metric(served, "vae_stalled_calls_total", stage="request") == 1
        assert metric(served, "vae_requests_total", method="Decode", code="DEADLINE_EXCEEDED") == 1
        sample_ok(served)


def test_a_refused_upload_is_never_read(tiny_model: Path) -> None:
    """Admission runs before the request is read: a call refused while another holds the only
    slot never gets its flow-control window opened, so a 16 MB upload costs about 64 KB."""
    settings = tiny_settings(tiny_model, max_in_flight=1, request_timeout=30)
    with (
        running(settings) as served,
        H2Peer("127.0.0.1", served.service.port) as holder,
        H2Peer("127.0.0.1", served.service.port) as refused,
    ):
        holder.call(DECODE, b"\x0a" * 100_000, declared=DECLARED)
        wait_until(lambda: gauge(served, "vae_requests_in_flight") == 1, "the slot held")
        stream = refused.call(DECODE, b"\x0a" * 4_000_000, declared=DECLARED)
        assert refused.wait_for(lambda: stream.ended or stream.reset is not None, timeout=30)
        assert stream.sent < 200_000  # the initial window only, never the 4 MB offered
        assert metric(served, "vae_admission_rejected_total") == 1


def test_uploads_beyond_max_receiving_wait_with_their_window_shut(tiny_model: Path) -> None:
    settings = tiny_settings(tiny_model, max_receiving=1, request_timeout=4)
    with (
        running(settings) as served,
        H2Peer("127.0.0.1", served.service.port) as first,
        H2Peer("127.0.0.1", served.service.port) as second,
    ):
        first.call(DECODE, b"\x0a" * 2_000_000, declared=DECLARED)  # holds the receive slot
        wait_until(lambda: gauge(served, "vae_requests_in_flight") == 1, "the first reading")
        waiting = second.call(DECODE, b"\x0a" * 4_000_000, declared=DECLARED)
        assert waiting.sent < 200_000  # its window stayed shut while the slot was taken
        assert first.wait_for(lambda: first.streams[1].ended, timeout=30)  # request_timeout
        assert second.wait_for(lambda: waiting.ended, timeout=30)
        assert metric(served, "vae_stalled_calls_total", stage="request") == 2
        sample_ok(served)


def test_one_connection_cannot_open_streams_without_bound(budgeted: Served) -> None:
    """Health Watch streams are not admitted like inference calls: one connection opening
    hundreds of them meets HTTP/2's stream limit (REFUSED_STREAM beyond it)."""
    limit = max_streams_per_connection(budgeted.service.settings)
    watch = health_pb2.HealthCheckRequest(service="").SerializeToString()
    with H2Peer("127.0.0.1", budgeted.service.port) as peer:
        streams = [peer.call(WATCH, watch) for _ in range(limit + 20)]
        assert peer.wait_for(lambda: sum(s.reset == REFUSED_STREAM for s in streams) >= 20)
        assert sum(s.reset is None for s in streams) == limit
    sample_ok(budgeted)
