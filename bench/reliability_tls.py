"""The reliability campaign's `tls` scenario: truncated handshakes, stalled handshakes and
plaintext clients against a TLS port; all refused, the server serves TLS clients throughout, its
memory flat."""

from __future__ import annotations

import contextlib
import socket
import ssl
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from bench.certificates import make_pki
from bench.load_drivers import OPTIONS, mb
from bench.servers import ServerProcess
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import tls_credentials


def _client_hello(ca: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return outgoing.read()


def tls_faults(repo: Path, model: str, rounds: int = 200) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vae-pki-") as tmp:
        pki = make_pki(Path(tmp))
        flags = (f"--tls-cert={pki.server_cert}", f"--tls-key={pki.server_key}")
        with ServerProcess.start(repo, model, *flags).wait_serving() as server:
            address = ("127.0.0.1", server.port)
            trusted = tls_credentials(ca=pki.ca)
            secure = grpc.secure_channel(f"localhost:{server.port}", trusted, options=OPTIONS)
            stub = vae_pb2_grpc.VaeServiceStub(secure)
            info = vae_pb2.GetModelInfoRequest()
            for _ in range(20):  # warm: the same calls as after the faults
                stub.Sample(vae_pb2.SampleRequest(count=16), timeout=30)
            rss_before = server.rss_bytes()
            hello = _client_hello(pki.ca)
            stalled = []
            for i in range(rounds):
                with socket.create_connection(address, timeout=10) as raw:
                    raw.sendall(hello[: len(hello) // 2])  # then hang up mid-handshake
                if i % 4 == 0:  # and some stay open, stalled mid-handshake
                    held = socket.create_connection(address, timeout=10)
                    held.sendall(hello[:20])
                    stalled.append(held)
            plaintext_codes: list[str] = []
            for _ in range(rounds // 4):
                with grpc.insecure_channel(server.target) as plain:
                    try:
                        vae_pb2_grpc.VaeServiceStub(plain).GetModelInfo(info, timeout=5)
                        plaintext_codes.append("OK")
                    except grpc.RpcError as e:
                        plaintext_codes.append(e.code().name)  # type: ignore[attr-defined]
            served = [
                stub.Sample(vae_pb2.SampleRequest(count=16), timeout=30).images.tensor.shape[0]
                for _ in range(20)
            ]
            for held in stalled:
                held.close()
            rss_after = server.rss_bytes()
            secure.close()
    return {
        "truncated_handshakes": rounds,
        "stalled_handshakes_held_open": len(stalled),
        "plaintext_clients": len(plaintext_codes),
        "plaintext_client_codes": dict(Counter(plaintext_codes)),
        "tls_calls_after_ok": len(served),
        "rss_mb_before": mb(rss_before),
        "rss_mb_after": mb(rss_after),
        "passed": "OK" not in plaintext_codes and served == [16] * 20,
    }
