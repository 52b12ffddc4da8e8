"""The process faults of the reliability campaign (bench/reliability.py).

- `sigterm_under_load`: SIGTERM to a server with calls in flight and callers that keep calling;
  no admitted call may be lost (each one in flight at the signal ends OK, or was refused before
  it was admitted, UNAVAILABLE "shutting down"; none is cut at the grace period).
- `sigkill_failover`: SIGKILL to one of two servers under a client given both addresses
  (round_robin, the project's retry policy): the client fails over; a client without retries
  shows what the retries save.
- `reload_under_load`: a corrupted version then a good one, each announced by SIGHUP, under load:
  the first is rejected and the old keeps serving, the second goes live, no call fails.

The connection faults are in bench/reliability_tls.py, the soak in bench/reliability_soak.py.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench.load_drivers import (
    OPTIONS,
    Call,
    Callers,
    codes,
    health_ok,
    mb,
    percentiles_ms,
)
from bench.servers import ServerProcess
from export.manifest import MANIFEST_FILE
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import channel_options

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
