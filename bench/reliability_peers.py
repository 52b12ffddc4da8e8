"""Campaign scenarios for hostile peers and the drain (`make reliability`, scenario `peers`),
against real `vae-serve` processes serving the default model:

- slow readers: Sample(4096) callers with a 1-byte HTTP/2 window, which never take their
  replies (before: ~41 MB pinned each, 60 of them took RSS to 2.6 GB, in-flight read 0);
- stalled uploads: connections declaring a 16 MB request and stalling part way (before: ~6-15 MB
  pinned each, unbounded);
- idle /metrics connections (before: a thread each, 500 connections -> 514 threads);
- a burst of large calls sent with SIGTERM from a client without retries (before: most came
  back CANCELLED), and an idle server with an open health Watch and an idle connection (before:
  held for the whole grace period).
"""

from __future__ import annotations

import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.h2_peer import H2Peer
from bench.servers import ServerProcess
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import MAX_MESSAGE_BYTES

POD_LIMIT_MB = 2048  # deploy/k8s/base/deployment.yaml
SAMPLE = "/vae.v1.VaeService/Sample"
DECODE = "/vae.v1.VaeService/Decode"
NO_RETRIES = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def _mb(n: float) -> float:
    return round(n / 1e6, 1)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def slow_readers(repo: Path, model: str, peers: int = 60) -> dict[str, Any]:
    reply_timeout = 5.0
    server = ServerProcess.start(repo, model, f"--reply-timeout={reply_timeout}").wait_serving()
    try:
        before = server.rss_bytes()
        request = vae_pb2.SampleRequest(count=4096, seed=1).SerializeToString()
        connections = [H2Peer("127.0.0.1", server.port, window=1) for _ in range(peers)]
        streams = [c.call(SAMPLE, request) for c in connections]
        time.sleep(2.0)
        held = {
            "rss_mb": _mb(server.rss_bytes()),
            "pending_reply_mb": _mb(server.metric("vae_pending_reply_bytes")),
            "in_flight": server.metric("vae_requests_in_flight"),
            "refused_resource_exhausted": server.metric(
                "vae_requests_total", code="RESOURCE_EXHAUSTED"
            ),
        }
        cut = _wait(
            lambda: all(c.closed or s.ended for c, s in zip(connections, streams, strict=True)), 30
        )
        after = {
            "pending_reply_mb": _mb(server.metric("vae_pending_reply_bytes")),
            "in_flight": server.metric("vae_requests_in_flight"),
            "stalled_replies_cut": server.metric("vae_stalled_calls_total", stage="reply"),
        }
        for c in connections:
            c.close()
        budget_mb = 256 * 1024 * 1024 / 1e6
        return {
            "load": f"{peers} Sample(4096) callers with a 1-byte HTTP/2 window",
            "rss_mb_before": _mb(before),
            "while_held": held,
            "after_reply_timeout": after,
            "every_peer_cut_or_refused": cut,
            "passed": cut
            and held["rss_mb"] < POD_LIMIT_MB
            and held["pending_reply_mb"] <= budget_mb + 13
            and after["pending_reply_mb"] == 0,
        }
    finally:
        server.stop()


def stalled_uploads(repo: Path, model: str, peers: int = 100) -> dict[str, Any]:
    request_timeout = 5.0
    server = ServerProcess.start(repo, model, f"--request-timeout={request_timeout}").wait_serving()
    try:
        before = server.rss_bytes()
        connections = [H2Peer("127.0.0.1", server.port) for _ in range(peers)]
        streams = [
            c.call(DECODE, b"\x0a" * 15_000_000, declared=16 * 1024 * 1024 - 64, patience=0.1)
            for c in connections
        ]
        peak = server.rss_bytes()
        ended = _wait(lambda: all(s.ended or s.reset is not None for s in streams), 60)
        result = {
            "load": f"{peers} connections declaring a 16 MB Decode request, stalling part way",
            "rss_mb_before": _mb(before),
            "rss_mb_with_all_stalled": _mb(peak),
            "bytes_sent_mb": _mb(sum(s.sent for s in streams)),
            "every_call_ended": ended,
            "ended_at_request_timeout": server.metric("vae_stalled_calls_total", stage="request"),
            "in_flight_after": server.metric("vae_requests_in_flight"),
        }
        for c in connections:
            c.close()
        result["passed"] = ended and peak / 1e6 < POD_LIMIT_MB and result["in_flight_after"] == 0
        return result
    finally:
        server.stop()


def idle_metrics_connections(repo: Path, model: str, count: int = 500) -> dict[str, Any]:
    server = ServerProcess.start(repo, model).wait_serving()
    try:
        threads_before = _threads(server.pid)
        assert server.ports is not None
        idle = [socket.create_connection(("127.0.0.1", server.ports[1])) for _ in range(count)]
        time.sleep(1.0)
        threads_with_idle = _threads(server.pid)
        began = time.monotonic()
        scraped = server.metric("vae_requests_in_flight") == 0
        scrape_ms = round((time.monotonic() - began) * 1000, 1)
        for sock in idle:
            sock.close()
        return {
            "idle_connections": count,
            "threads_before": threads_before,
            "threads_with_idle_connections": threads_with_idle,
            "scrape_answered_meanwhile": scraped,
            "scrape_ms": scrape_ms,
            "passed": scraped and threads_with_idle <= threads_before + 2,
        }
    finally:
        server.stop()


def drain(repo: Path, model: str, calls: int = 32) -> dict[str, Any]:
    server = ServerProcess.start(repo, model, "--grace-period=60").wait_serving()
    request = vae_pb2.SampleRequest(count=2048, seed=1, format=vae_pb2.IMAGE_FORMAT_PNG)
    with grpc.insecure_channel(server.target, options=NO_RETRIES) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30)
        futures = [stub.Sample.future(request, timeout=120) for _ in range(calls)]
        signalled = time.monotonic()
        server.send(signal.SIGTERM)
        codes: Counter[str] = Counter()
        for f in futures:
            try:
                f.result()
                codes["OK"] += 1
            except grpc.RpcError as e:
                codes[e.code().name] += 1  # type: ignore[attr-defined]
    burst_exit = server.popen.wait(120)
    burst_seconds = round(time.monotonic() - signalled, 2)
    server.stop()

    idle = ServerProcess.start(repo, model, "--grace-period=10").wait_serving()
    with grpc.insecure_channel(idle.target) as channel:
        watch: Any = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60
        )
        next(watch)
        tcp = socket.create_connection(("127.0.0.1", idle.port))
        signalled = time.monotonic()
        idle.send(signal.SIGTERM)
        idle_exit = idle.popen.wait(60)
        idle_seconds = round(time.monotonic() - signalled, 2)
        tcp.close()
    idle.stop()
    return {
        "burst": f"{calls} Sample(2048, png) sent with SIGTERM, one channel without retries",
        "burst_codes": dict(codes),
        "burst_exit_code": burst_exit,
        "burst_seconds_to_exit": burst_seconds,
        "idle_with_watch_and_tcp_seconds_to_exit": idle_seconds,
        "idle_grace_period_s": 10,
        "passed": codes == Counter(OK=calls)
        and burst_exit == 0
        and idle_exit == 0
        and idle_seconds < 5,
    }


def hostile_peers(repo: Path, model: str) -> dict[str, Any]:
    parts = {
        "slow_readers": slow_readers(repo, model),
        "stalled_uploads": stalled_uploads(repo, model),
        "idle_metrics_connections": idle_metrics_connections(repo, model),
        "drain": drain(repo, model),
    }
    return {**parts, "passed": all(p["passed"] for p in parts.values())}
