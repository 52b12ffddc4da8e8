"""The fault scenarios of the reliability campaign (bench/reliability.py), and its summary.

- `sigterm_under_load`: SIGTERM to a server with calls in flight and callers that keep calling;
  no admitted call may be lost (each one in flight at the signal ends OK, or was refused before
  it was admitted, UNAVAILABLE "shutting down"; none is cut at the grace period).
- `sigkill_failover`: SIGKILL to one of two servers under a client given both addresses
  (round_robin, the project's retry policy): the client fails over; a client without retries
  shows what the retries save.
- `reload_under_load`: a corrupted version then a good one, each announced by SIGHUP, under load:
  the first is rejected and the old keeps serving, the second goes live, no call fails.
- `tls_faults`: truncated handshakes, stalled handshakes and plaintext clients against a TLS
  port: all refused, the server serves TLS clients throughout, its memory flat.
- `soak`: minutes of steady mixed load with RSS sampled: growth after warm-up under 5 percent.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import signal
import socket
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import grpc
import numpy as np

from bench.certificates import make_pki
from bench.load_drivers import (
    MB,
    OPTIONS,
    Call,
    Callers,
    RssSampler,
    codes,
    health_ok,
    mb,
    percentiles_ms,
)
from bench.served_process import ServerProcess
from export.manifest import MANIFEST_FILE
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import channel_options, tls_credentials

IN_FLIGHT_AT_SIGTERM = re.compile(r"(\d+) (?:inference )?calls\s+in flight get up to")


def sampler(request: vae_pb2.SampleRequest, timeout: float = 30) -> Callable:
    def make_call(channel: grpc.Channel) -> Callable[[], Any]:
        sample = vae_pb2_grpc.VaeServiceStub(channel).Sample
        return lambda: sample(request, timeout=timeout)

    return make_call


def sigterm_under_load(repo: Path, model: str) -> dict[str, Any]:
    grace = 20.0
    server = ServerProcess.start(repo, model, f"--grace-period={grace}").wait_serving()
    request = vae_pb2.SampleRequest(count=256, format=vae_pb2.IMAGE_FORMAT_PNG)
    # A plain channel: no retries, so every refusal is seen as it happened.
    with grpc.insecure_channel(server.target, options=OPTIONS) as channel:
        callers = Callers({"A": channel}, sampler(request), count=12)
        time.sleep(3.0)
        in_flight_scraped = server.metric("vae_requests_in_flight")
        signalled = time.monotonic()
        server.send(signal.SIGTERM)
        code = server.popen.wait(grace + 30)
        exited = time.monotonic()
        time.sleep(0.5)
        calls = callers.stop()
    server.reader.join(10)
    log = server.output()
    match = IN_FLIGHT_AT_SIGTERM.search(log)

    def refused_unadmitted(c: Call) -> bool:
        return c.code == "UNAVAILABLE" and "shutting down" in c.details

    outstanding = [c for c in calls if c.spans(signalled)]
    lost = [c for c in outstanding if c.code != "OK" and not refused_unadmitted(c)]
    cut = "cut off at the end of the grace period" in log
    after = [c for c in calls if c.started >= signalled]
    return {
        "load": "12 callers, Sample(count=256, png), one channel without retries",
        "calls_before_sigterm": sum(c.ended < signalled for c in calls),
        "in_flight_scraped_before_sigterm": in_flight_scraped,
        "in_flight_at_drain_per_server_log": int(match[1]) if match else None,
        "outstanding_at_sigterm": len(outstanding),
        "outstanding_ended_ok": sum(c.code == "OK" for c in outstanding),
        "outstanding_refused_before_admission": sum(refused_unadmitted(c) for c in outstanding),
        "calls_lost": len(lost) + (1 if cut else 0),
        "lost_examples": [f"{c.code}: {c.details}" for c in lost[:5]],
        "cut_at_grace_period": cut,
        "calls_after_sigterm": codes(after),
        "exit_code": code,
        "seconds_to_exit": round(exited - signalled, 2),
        "passed": not lost and not cut and code == 0 and match is not None,
    }


def sigkill_failover(repo: Path, model: str) -> dict[str, Any]:
    a = ServerProcess.start(repo, model, "--inference-workers=1")
    b = ServerProcess.start(repo, model, "--inference-workers=1")
    try:
        a.wait_serving()
        b.wait_serving()
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        retries = [(k, v) for k, v in channel_options() if k != "grpc.enable_retries"]
        request = vae_pb2.SampleRequest(count=64, format=vae_pb2.IMAGE_FORMAT_PNG)
        with (
            grpc.insecure_channel(target, options=channel_options()) as client,
            grpc.insecure_channel(target, options=[*retries, ("grpc.enable_retries", 0)]) as bare,
        ):
            callers = Callers({"client": client, "no_retries": bare}, sampler(request), count=4)
            time.sleep(4.0)
            served_a = a.metric("vae_requests_total", method="Sample", code="OK")
            b_before = b.metric("vae_requests_total", method="Sample", code="OK")
            in_flight_a = 0.0
            for _ in range(200):  # kill A while it has calls in flight
                in_flight_a = a.metric("vae_requests_in_flight")
                if in_flight_a >= 2:
                    break
            killed = time.monotonic()
            a.popen.kill()
            a.popen.wait(10)
            time.sleep(5.0)
            b_after = b.metric("vae_requests_total", method="Sample", code="OK")
            calls = callers.stop()
        b_alive = health_ok(b.target)
    finally:
        a.stop()
        b_code = b.stop()

    def of(tag: str) -> list[Call]:
        return [c for c in calls if c.tag == tag]

    with_retries, bare_calls = of("client"), of("no_retries")
    client_failed = [c for c in with_retries if c.code != "OK"]
    spanning = [c for c in with_retries if c.spans(killed)]
    return {
        "load": "2 channels x 4 callers, Sample(count=64, png), both servers in one target",
        "target": "ipv4:127.0.0.1:A,127.0.0.1:B, round_robin",
        "a_answered_before_kill": served_a,
        "a_in_flight_at_kill": in_flight_a,
        "client_with_retries": {
            "calls": len(with_retries),
            "failed": len(client_failed),
            "codes": codes(with_retries),
            "calls_spanning_the_kill": len(spanning),
            "worst_latency_spanning_kill_ms": percentiles_ms(c.latency for c in spanning).get(
                "max"
            ),
            "ok_after_kill": sum(c.code == "OK" and c.started > killed for c in with_retries),
        },
        "client_without_retries": {
            "calls": len(bare_calls),
            "codes": codes(bare_calls),
            "calls_spanning_the_kill": sum(c.spans(killed) for c in bare_calls),
        },
        "b_answered_after_kill": b_after - b_before,
        "b_alive_after": b_alive,
        "b_exit_code": b_code,
        "passed": not client_failed and b_after > b_before and b_alive,
    }


def _stage(repo: Path, model: str, version: int, corrupt: bool) -> None:
    """Version `version`: a copy of version 1 (its manifest renumbered), the decoder corrupted
    on disk if `corrupt`; moved into place in one rename."""
    staging = repo / f".staging-{version}"
    shutil.copytree(repo / model / "1", staging)
    manifest = json.loads((staging / MANIFEST_FILE).read_text())
    manifest["version"] = version
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    if corrupt:
        decoder = staging / "decoder.onnx"
        data = bytearray(decoder.read_bytes())
        data[len(data) // 2] ^= 0xFF
        decoder.write_bytes(bytes(data))
    staging.rename(repo / model / str(version))


def reload_under_load(repo: Path, model: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vae-reload-") as tmp:
        own = Path(tmp)
        shutil.copytree(repo / model / "1", own / model / "1")
        with ServerProcess.start(own, model).wait_serving() as server:
            rss_before = server.rss_bytes()
            with grpc.insecure_channel(server.target, options=OPTIONS) as channel:
                stub = vae_pb2_grpc.VaeServiceStub(channel)
                callers = Callers(
                    {"load": channel}, sampler(vae_pb2.SampleRequest(count=64)), count=4
                )
                time.sleep(2.0)
                _stage(own, model, 2, corrupt=True)
                server.send(signal.SIGHUP)
                rejected_line = server.wait_log("reload rejected")
                version_after_corrupt = stub.GetModelInfo(vae_pb2.GetModelInfoRequest()).version
                time.sleep(1.0)
                _stage(own, model, 3, corrupt=False)
                server.send(signal.SIGHUP)
                server.wait_log("now serving")
                time.sleep(2.0)
                version_after_good = stub.GetModelInfo(vae_pb2.GetModelInfoRequest()).version
                calls = callers.stop()
            reloads = {
                r: server.metric("vae_model_reloads_total", result=r)
                for r in ("success", "failure")
            }
            info_v3 = server.metric("vae_model_info", version="3")
            rss_after = server.rss_bytes()
    failed = [c for c in calls if c.code != "OK"]
    return {
        "load": "4 callers, Sample(count=64)",
        "corrupted_version_rejected": "sha256" in rejected_line,
        "rejection_log": rejected_line.strip()[-200:],
        "version_after_corrupted_reload": version_after_corrupt,
        "version_after_good_reload": version_after_good,
        "vae_model_info_shows_3": info_v3 == 1,
        "reloads_total": reloads,
        "calls": len(calls),
        "calls_failed": len(failed),
        "call_latency_ms": percentiles_ms(c.latency for c in calls),
        "rss_mb_before": mb(rss_before),
        "rss_mb_after_two_reloads": mb(rss_after),
        "passed": not failed
        and version_after_corrupt == 1
        and version_after_good == 3
        and reloads == {"success": 1, "failure": 1},
    }


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


def soak(repo: Path, model: str, seconds: float) -> dict[str, Any]:
    warm_up = min(30.0, seconds / 4)
    rng = np.random.default_rng(0)
    images = vae_pb2.ImageInput(
        tensor=vae_pb2.Tensor(
            shape=[64, 784],
            dtype=vae_pb2.DATA_TYPE_UINT8,
            data=rng.integers(0, 256, (64, 784), dtype=np.uint8).tobytes(),
        )
    )
    with ServerProcess.start(repo, model).wait_serving() as server:
        channel = grpc.insecure_channel(server.target, options=OPTIONS)
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        latent = stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30).latent_size
        z = rng.standard_normal((64, latent), dtype=np.float32)
        latents = vae_pb2.Tensor(shape=z.shape, dtype=vae_pb2.DATA_TYPE_FLOAT32, data=z.tobytes())
        end_a, end_b = (
            vae_pb2.Endpoint(
                latent=vae_pb2.Tensor(
                    shape=[latent], dtype=vae_pb2.DATA_TYPE_FLOAT32, data=z[i].tobytes()
                )
            )
            for i in (0, 1)
        )
        mix: list[tuple[str, Any]] = [
            ("Sample", vae_pb2.SampleRequest(count=64, format=vae_pb2.IMAGE_FORMAT_UINT8)),
            ("Encode", vae_pb2.EncodeRequest(images=images, samples_per_image=1)),
            ("Decode", vae_pb2.DecodeRequest(latents=latents, format=vae_pb2.IMAGE_FORMAT_PNG)),
            ("Score", vae_pb2.ScoreRequest(images=images, importance_samples=4)),
            ("Interpolate", vae_pb2.InterpolateRequest(start=end_a, end=end_b, steps=16)),
            ("GetModelInfo", vae_pb2.GetModelInfoRequest()),
        ]

        def make_call(ch: grpc.Channel) -> Callable[[], Any]:
            """Each caller goes through the mix in turn."""
            caller_stub = vae_pb2_grpc.VaeServiceStub(ch)
            turns = itertools.cycle([(getattr(caller_stub, m), r) for m, r in mix])

            def call() -> Any:
                method, request = next(turns)
                return method(request, timeout=30)

            return call

        rss = RssSampler(server, interval=1.0)
        began = time.monotonic()
        callers = Callers({"soak": channel}, make_call, count=4, pause=0.002)
        time.sleep(seconds)
        calls = callers.stop()
        samples = rss.stop()
        alive = health_ok(server.target)
        channel.close()
    after = [(t - began, r) for t, r in samples if t - began >= warm_up]
    baseline = median(r for t, r in after if t < warm_up + 10)
    final = median(r for t, r in after if t > seconds - 10)
    peak = max(r for _, r in after)
    slope = float(np.polyfit([t for t, _ in after], [r / MB for _, r in after], 1)[0]) * 60
    errors = [c for c in calls if c.code != "OK"]
    growth = 100 * (final - baseline) / baseline
    return {
        "load": "4 callers in turn: Sample 64, Encode 64, Decode 64 png, Score 64 x 4, "
        "Interpolate 16, GetModelInfo",
        "seconds": seconds,
        "warm_up_seconds": warm_up,
        "calls": len(calls),
        "calls_per_s": round(len(calls) / seconds, 1),
        "latency_ms": percentiles_ms(c.latency for c in calls),
        "errors": len(errors),
        "error_codes": codes(errors),
        "rss_samples": len(samples),
        "rss_mb_after_warm_up": mb(baseline),
        "rss_mb_final": mb(final),
        "rss_mb_peak_after_warm_up": mb(peak),
        "rss_growth_percent": round(growth, 2),
        "rss_trend_mb_per_minute": round(slope, 3),
        "server_alive_after": alive,
        "passed": not errors and growth < 5 and alive,
    }
