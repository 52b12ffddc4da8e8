"""The reliability campaign's `soak` scenario: minutes of steady mixed load (every method in
turn) with RSS sampled; growth after warm-up under 5 percent, no failed call."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import grpc
import numpy as np

from bench.load_drivers import (
    MB,
    OPTIONS,
    Callers,
    RssSampler,
    codes,
    health_ok,
    mb,
    percentiles_ms,
)
from bench.servers import ServerProcess
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc


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
