"""What clients other than ours meet, on the real server: grpc.health.v1 List (in the proto the
server advertises), reflection as grpc.reflection.v1 (newer grpcurl, Postman, grpcui) as well as
v1alpha, a bounded /metrics endpoint, and a TLS certificate outside its validity refused at start
with one line."""

from __future__ import annotations

import datetime
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from reliability_harness import wait_until
from service_harness import Served, running, scrape, tiny_settings

from bench.certificates import write_pem
from service.metrics import Metrics
from service.metrics_http import MetricsServer
from service.server import SERVICE_NAME, StartupError
from service.tls import CertificateError, check_validity

REFLECTION = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}


@pytest.fixture(scope="module")
def served(tiny_model: Path) -> Iterator[Served]:
    with running(tiny_settings(tiny_model)) as s:
        yield s


def test_health_list_answers_every_service(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(served.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=10)
    statuses = {name: status.status for name, status in reply.statuses.items()}
    assert statuses[""] == health_pb2.HealthCheckResponse.SERVING
    assert statuses[SERVICE_NAME] == health_pb2.HealthCheckResponse.SERVING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def reflect(
    channel: grpc.Channel, version: str, **request: str
) -> reflection_pb2.ServerReflectionResponse:
    call = channel.stream_stream(
        REFLECTION[version],
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = list(call(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10))
    assert len(replies) == 1
    return replies[0]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_is_served_as_v1_and_v1alpha(served: Served, version: str) -> None:
    with grpc.insecure_channel(served.target) as channel:
        listed = reflect(channel, version, list_services="")
        names = {s.name for s in listed.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        assert {"grpc.reflection.v1.ServerReflection"} <= names
        # describe: the file defining each listed service (grpcurl describe does this)
        for name in names:
            found = reflect(channel, version, file_containing_symbol=name)
            assert found.WhichOneof("message_response") == "file_descriptor_response", name


def test_metrics_endpoint_costs_no_thread_per_connection(served: Served) -> None:
    """prometheus_client's server started a thread per connection and never timed one out
    (500 idle connections: 514 threads)."""
    threads = threading.active_count()
    port = served.service.metrics_port
    assert port is not None
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    try:
        assert threading.active_count() <= threads + 2
        assert ("vae_requests_in_flight", ()) in scrape(served.metrics_url)
    finally:
        for sock in idle:
            sock.close()


def test_metrics_connections_are_bounded_and_timed_out() -> None:
    """Beyond max_connections the oldest connection is closed (idle ones cannot lock a scraper
    out); an idle one is closed after `timeout`."""
    from service_harness import BackgroundLoop

    background = BackgroundLoop()
    server = MetricsServer(Metrics().registry, max_connections=4, timeout=0.5)
    try:
        port = background.run(server.start("127.0.0.1", 0))
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        wait_until(lambda: server.open_connections == 4, "four connections open")
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert idle[0].recv(1) == b""  # the oldest, closed at once: the bound
        extra.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert extra.recv(100).startswith(b"HTTP/1.1 200 OK")
        assert server.evicted == 1
        for sock in idle[1:]:
            assert sock.recv(1) == b""  # closed after the idle timeout
        wait_until(lambda: server.open_connections == 0, "the idle connections closed")
        for sock in (*idle, extra):
            sock.close()
    finally:
        background.run(server.close())
        background.close()


def certificate(directory: Path, not_before: datetime.datetime, days: int) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    return write_pem(directory, "server", cert, key)


NOW = datetime.datetime.now(datetime.UTC)


@pytest.mark.parametrize(
    ("start", "days", "reason"),
    [
        (NOW - datetime.timedelta(days=30), 1, "expired on"),
        (NOW + datetime.timedelta(days=30), 365, "not valid before"),
    ],
)
def test_a_certificate_outside_its_validity_is_refused(
    tiny_model: Path, tmp_path: Path, start: datetime.datetime, days: int, reason: str
) -> None:
    cert, key = certificate(tmp_path, start, days)
    with pytest.raises(CertificateError, match=reason):
        check_validity(cert)
    settings = tiny_settings(tiny_model, tls_cert=cert, tls_key=key, health_port=0)
    with pytest.raises(StartupError, match=reason), running(settings):
        pass
    # The process: exit 1, one line, no traceback, and no health port ever saying SERVING.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            f"--model-repo={tiny_model.parent.parent}",
            "--model-name=tiny-vae",
            "--host=127.0.0.1",
            "--port=0",
            "--metrics-port=-1",
            "--health-port=0",
            f"--tls-cert={cert}",
            f"--tls-key={key}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and reason in errors[0], done.stderr
    assert "SERVING" not in done.stderr


def test_a_valid_certificate_chain_passes(tmp_path: Path) -> None:
    cert, _ = certificate(tmp_path, NOW - datetime.timedelta(days=1), 30)
    check_validity(cert)
    check_validity(cert, now=NOW + datetime.timedelta(days=28))
    with pytest.raises(CertificateError, match="expired"):
        check_validity(cert, now=NOW + datetime.timedelta(days=31))
