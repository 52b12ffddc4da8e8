"""The reliability campaign's `overload` scenario: open loop at several times the measured
capacity; admitted calls succeed, the rest are refused RESOURCE_EXHAUSTED, and health answers
throughout (probed from a process of its own)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.load_drivers import (
    OPTIONS,
    Callers,
    HealthProbe,
    RssSampler,
    codes,
    health_ok,
    mb,
    open_loop,
    percentiles_ms,
)
from bench.servers import ServerProcess
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

# Overload with a call that is dear for the server and cheap for the client (a 50 KB request,
# a reply of a few numbers): 64 images, 16 importance samples each, so 1,024 decoder rows.
OVERLOAD_METHOD = "Score"
OVERLOAD_REQUEST = vae_pb2.ScoreRequest(
    images=vae_pb2.ImageInput(
        tensor=vae_pb2.Tensor(
            shape=[64, 784],
            dtype=vae_pb2.DATA_TYPE_UINT8,
            data=np.random.default_rng(0).integers(0, 256, 64 * 784, dtype=np.uint8).tobytes(),
        )
    ),
    importance_samples=16,
    seed=1,
)


def capacity(target: str, seconds: float) -> float:
    """Calls a second at saturation (closed loop, 16 callers), the request of the overload."""
    request = OVERLOAD_REQUEST

    def make_call(ch: grpc.Channel) -> Callable[[], Any]:
        method = getattr(vae_pb2_grpc.VaeServiceStub(ch), OVERLOAD_METHOD)
        return lambda: method(request, timeout=30)

    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        callers = Callers({"capacity": channel}, make_call, count=16)
        time.sleep(seconds / 4)  # warm up
        start = len(callers.snapshot())
        time.sleep(seconds)
        ok = sum(c.code == "OK" for c in callers.snapshot()[start:])
        callers.stop()
    return ok / seconds


def overload(
    repo: Path, model: str, seconds: float, factor: float, max_in_flight: int
) -> dict[str, Any]:
    flags = [f"--max-in-flight={max_in_flight}"]
    with ServerProcess.start(repo, model, *flags).wait_serving() as server:
        measured = capacity(server.target, 6.0)
        rate = factor * measured
        rss = RssSampler(server)
        rss_before = server.rss_bytes()
        probe = HealthProbe(server.target, seconds + 1)
        time.sleep(1.0)  # the prober process starts
        calls, lag = asyncio.run(
            open_loop(
                server.target,
                f"/vae.v1.VaeService/{OVERLOAD_METHOD}",
                OVERLOAD_REQUEST.SerializeToString(),
                rate,
                seconds,
                timeout=30,
            )
        )
        health = probe.result()
        samples = rss.stop()
        alive = health_ok(server.target)
        rejected = server.metric("vae_admission_rejected_total")
    ok = [c for c in calls if c.code == "OK"]
    refused = [c for c in calls if c.code == "RESOURCE_EXHAUSTED"]
    limits = Counter(
        "max_in_flight" if "max_in_flight" in c.details else "queue full" for c in refused
    )
    others = {k: v for k, v in codes(calls).items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    peak = max(r for _, r in samples) if samples else rss_before
    return {
        "request": "Score(64 uint8 images, importance_samples=16): 1,024 decoder rows a call",
        "capacity_calls_per_s": round(measured, 1),
        "offered_calls_per_s": round(rate, 1),
        "factor": factor,
        "server_flags": flags,
        "seconds": seconds,
        "sent": len(calls),
        "driver_worst_send_lag_ms": round(lag * 1000, 1),
        "ok": len(ok),
        "ok_calls_per_s": round(len(ok) / seconds, 1),
        "ok_latency_ms": percentiles_ms(c.latency for c in ok),
        "resource_exhausted": len(refused),
        "refused_by": dict(limits),
        "refusal_latency_ms": percentiles_ms(c.latency for c in refused),
        # The same from the moment each call was actually sent: without the driver's own lag.
        "ok_latency_from_send_ms": percentiles_ms(c.ended - c.started for c in ok),
        "refusal_latency_from_send_ms": percentiles_ms(c.ended - c.started for c in refused),
        "other_codes": others,
        "server_admission_rejected_total": rejected,
        "health_during_overload": health,
        "rss_mb_before": mb(rss_before),
        "rss_mb_peak": mb(peak),
        "server_alive_after": alive,
        "passed": not others and alive and not health["failures"] and len(ok) > 0,
    }
