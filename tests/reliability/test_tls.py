"""TLS and mutual TLS on the real server, with certificates made for the test (bench/certificates):
trusted clients are served; plaintext clients, clients without (or with a foreign) certificate
under mutual TLS, and broken handshakes are refused, and the server goes on serving."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from reliability_harness import health, metric
from service_harness import Served, running, tiny_settings

from bench.certificates import Pki
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.server import StartupError
from vae_client import cli
from vae_client.client import AsyncVaeClient, VaeClient, tls_credentials

INFO = vae_pb2.GetModelInfoRequest()


@pytest.fixture(scope="module")
def tls_server(tiny_model: Path, pki: Pki) -> Iterator[Served]:
    settings = tiny_settings(tiny_model, tls_cert=pki.server_cert, tls_key=pki.server_key)
    with running(settings) as served:
        yield served


@pytest.fixture(scope="module")
def mtls_server(tiny_model: Path, pki: Pki) -> Iterator[Served]:
    settings = tiny_settings(
        tiny_model, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    with running(settings) as served:
        yield served


def localhost(served: Served) -> str:
    return f"localhost:{served.service.port}"  # a name the server's certificate carries


def refused_code(channel: grpc.Channel) -> grpc.StatusCode:
    """How a call on `channel` fails (plain channels: no retries)."""
    with channel, pytest.raises(grpc.RpcError) as refused:
        vae_pb2_grpc.VaeServiceStub(channel).GetModelInfo(INFO, timeout=10)
    return refused.value.code()  # type: ignore[attr-defined,no-any-return]


def assert_serves_tls(served: Served, credentials: grpc.ChannelCredentials) -> None:
    with VaeClient(localhost(served), timeout=30, credentials=credentials) as vae:
        assert vae.info().name == "tiny-vae"
        assert np.asarray(vae.sample(2, seed=1).images).shape == (2, 28, 28)


def test_tls_serves_a_client_that_trusts_the_ca(tls_server: Served, pki: Pki) -> None:
    assert_serves_tls(tls_server, tls_credentials(ca=pki.ca))
    # The certificate names 127.0.0.1 too; health checks go over the same TLS port.
    credentials = tls_credentials(ca=pki.ca)
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        assert health(channel) == "SERVING"


async def _async_info(target: str, credentials: grpc.ChannelCredentials) -> str:
    async with AsyncVaeClient(target, timeout=30, credentials=credentials) as vae:
        return (await vae.info()).name


def test_the_async_client_speaks_tls(tls_server: Served, pki: Pki) -> None:
    credentials = tls_credentials(ca=pki.ca)
    assert asyncio.run(_async_info(localhost(tls_server), credentials)) == "tiny-vae"


def test_a_plaintext_client_is_refused_without_harm(tls_server: Served, pki: Pki) -> None:
    answered = metric(tls_server, "vae_requests_total", method="GetModelInfo", code="OK")
    for _ in range(3):
        assert refused_code(grpc.insecure_channel(tls_server.target)) == grpc.StatusCode.UNAVAILABLE
    assert metric(tls_server, "vae_requests_total", method="GetModelInfo", code="OK") == answered
    assert_serves_tls(tls_server, tls_credentials(ca=pki.ca))


def test_a_client_that_does_not_trust_the_server_refuses_it(tls_server: Served, pki: Pki) -> None:
    wrong_ca = tls_credentials(ca=pki.rogue_cert)  # not the CA that signed the server
    channel = grpc.secure_channel(localhost(tls_server), wrong_ca)
    assert refused_code(channel) == grpc.StatusCode.UNAVAILABLE


def client_hello(pki: Pki) -> bytes:
    """The first flight of a real TLS 1.3 handshake to the server (ALPN h2, as gRPC sends)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def assert_hangs_up(tls: ssl.SSLSocket) -> None:
    """The peer closes the connection: a clean close or a reset ends the reads. A peer that
    keeps it open fails the test when the socket's timeout (10 s) runs out: TimeoutError is
    not an answer."""
    try:
        while tls.recv(4096):  # the server answers with a GOAWAY, then closes
            pass
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLError):
        pass  # closed without a TLS close_notify: a hang-up too


def test_truncated_handshakes_and_garbage_are_refused_without_harm(
    tls_server: Served, pki: Pki
) -> None:
    hello = client_hello(pki)
    assert hello[0] == 0x16 and len(hello) > 100  # a TLS handshake record
    address = ("127.0.0.1", tls_server.service.port)
    for payload in (
        hello[: len(hello) // 2],
        hello[:5],
        b"\x16\x03\x01\xff\xff",
        b"GET / HTTP/1.1\r\n\r\n",
    ):
        for _ in range(5):
            with socket.create_connection(address, timeout=10) as raw:
                raw.sendall(payload)  # then hang up mid-handshake
    # A client stalled mid-handshake does not hold up the others.
    with socket.create_connection(address, timeout=10) as stalled:
        stalled.sendall(hello[: len(hello) // 2])
        assert_serves_tls(tls_server, tls_credentials(ca=pki.ca))
    # A completed handshake followed by bytes that are not HTTP/2 is dropped too.
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        tls.sendall(b"this is not HTTP/2" * 10)
        assert_hangs_up(tls)
    assert_serves_tls(tls_server, tls_credentials(ca=pki.ca))


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(
    mtls_server: Served, pki: Pki
) -> None:
    target = localhost(mtls_server)
    no_certificate = grpc.secure_channel(target, tls_credentials(ca=pki.ca))
    assert refused_code(no_certificate) == grpc.StatusCode.UNAVAILABLE
    foreign = tls_credentials(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)
    assert refused_code(grpc.secure_channel(target, foreign)) == grpc.StatusCode.UNAVAILABLE
    assert refused_code(grpc.insecure_channel(target)) == grpc.StatusCode.UNAVAILABLE
    # None of them reached the service.
    assert metric(mtls_server, "vae_requests_total", method="GetModelInfo", code="OK") == 0

    assert_serves_tls(mtls_server, tls_credentials(pki.ca, pki.client_cert, pki.client_key))
    assert metric(mtls_server, "vae_requests_total", method="GetModelInfo", code="OK") == 1


def test_the_command_line_client_speaks_mutual_tls(
    mtls_server: Served,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags = ["--target", localhost(mtls_server), "--tls-ca", str(pki.ca)]
    flags += ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert cli.main([*flags, "info"]) == 0
    assert "tiny-vae version 1" in capsys.readouterr().out
    # The same from the environment (VAE_TLS_*); without the client certificate: refused.
    monkeypatch.setenv("VAE_TLS_CA", str(pki.ca))
    assert cli.main(["--target", localhost(mtls_server), "--timeout", "5", "info"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    monkeypatch.setenv("VAE_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("VAE_TLS_KEY", str(pki.client_key))
    assert cli.main(["--target", localhost(mtls_server), "info"]) == 0


def test_tls_settings_are_checked(tiny_model: Path, pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        tiny_settings(tiny_model, tls_cert=pki.server_cert)
    with pytest.raises(ValidationError, match="needs tls_cert and tls_key"):
        tiny_settings(tiny_model, tls_client_ca=pki.ca)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    unusable = {
        "cannot read a TLS file": (tmp_path / "missing.pem", pki.server_key, None),
        "not a PEM certificate and its key": (garbage, pki.server_key, None),
        "KEY_VALUES_MISMATCH": (pki.server_cert, pki.client_key, None),
        "not a PEM CA bundle": (pki.server_cert, pki.server_key, garbage),
    }
    for reason, (cert, key, client_ca) in unusable.items():
        settings = tiny_settings(tiny_model, tls_cert=cert, tls_key=key, tls_client_ca=client_ca)
        with pytest.raises(StartupError, match=reason), running(settings):
            pass


def test_a_plaintext_health_port_serves_probes_beside_tls(tiny_model: Path, pki: Pki) -> None:
    """What the kubelet's gRPC probes (plaintext only) need when the main port speaks TLS: a
    port with grpc.health.v1 alone, following the server's status."""
    settings = tiny_settings(
        tiny_model, tls_cert=pki.server_cert, tls_key=pki.server_key, health_port=0
    )
    with running(settings) as served:
        port = served.service.health_port
        assert port is not None and port != served.service.port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert health(channel) == "SERVING"
            with pytest.raises(grpc.RpcError) as only_health:
                vae_pb2_grpc.VaeServiceStub(channel).GetModelInfo(INFO, timeout=10)
            assert only_health.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
            # A real stop, held in its grace period by a call still open on the TLS port (a
            # health Watch): the probe port answers NOT_SERVING while the server drains.
            with grpc.secure_channel(localhost(served), tls_credentials(ca=pki.ca)) as main:
                watch = health_pb2_grpc.HealthStub(main).Watch(
                    health_pb2.HealthCheckRequest(service=""), timeout=60
                )
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                stopping = asyncio.run_coroutine_threadsafe(
                    served.service.stop(grace=60), served.background.loop
                )
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                assert not stopping.done()  # still draining: the watch holds the grace period
                assert health(channel) == "NOT_SERVING"
                watch.cancel()
                stopping.result(30)  # the last call gone, the stop ends well before its grace
