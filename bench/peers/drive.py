"""Closed-loop load on a KServe V2 (Open Inference Protocol) gRPC server: Triton, MLServer.

    .venv/bin/python bench/peers/drive.py --target 127.0.0.1:8101 --model vae_decoder_uint8 \
        --count 64 --concurrency 32 --duration 10 --warmup 2 --json

`--concurrency` callers each send their next ModelInfer when the last one returns. Each request
carries `count` latents z ~ N(0, I) (drawn up front, a few distinct batches sent in turn): the
peers have no "sample" call, so the latents travel in the request. Requests sent during the
warm-up are not measured; latencies are those of successful calls, from send to reply, in an HDR
histogram; failed calls are counted by gRPC status code. Output fields match `vae-loadtest`:
requests_per_s, images_per_s, latency_ms {p50, p90, p99, p999, max}, errors {code: n}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram
from v2_client import GRPCInferenceServiceStub, InvalidResponse, channel, infer_once, wait_ready

LATENT_VARIANTS = 4
HISTOGRAM_MAX_US = 3_600_000_000  # one hour


@dataclass
class Report:
    target: str
    model: str
    count: int
    concurrency: int
    ok: int = 0
    elapsed_s: float = 0.0
    requests_per_s: float = 0.0
    images_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)
    client_cpu_percent: float = 0.0  # the driver's own CPU: near 100 = the driver is the limit


async def drive(
    target: str,
    model: str,
    output: str,
    count: int,
    concurrency: int,
    duration: float,
    warmup: float,
    timeout: float = 30.0,
    latent_size: int = 32,
    seed: int = 0,
) -> Report:
    rng = np.random.default_rng(seed)
    batches = [
        rng.standard_normal((count, latent_size), dtype=np.float32) for _ in range(LATENT_VARIANTS)
    ]
    histogram = HdrHistogram(1, HISTOGRAM_MAX_US, 3)
    errors: Counter[str] = Counter()
    examples: dict[str, str] = {}
    ok = 0
    last_done = 0.0

    async with channel(target) as ch:
        stub = GRPCInferenceServiceStub(ch)
        await wait_ready(stub, model, timeout)
        cpu, wall = time.process_time(), time.perf_counter()
        measure_start = wall + warmup
        measure_end = measure_start + duration

        async def caller(k: int) -> None:
            nonlocal ok, last_done
            i = k
            while (start := time.perf_counter()) < measure_end:
                code = None
                try:
                    await infer_once(stub, model, batches[i % LATENT_VARIANTS], output, timeout)
                except grpc.aio.AioRpcError as exc:
                    code, detail = exc.code().name, exc.details() or ""
                except InvalidResponse as exc:
                    code, detail = "INVALID_RESPONSE", str(exc)
                i += 1
                if start < measure_start:
                    continue
                done = time.perf_counter()
                last_done = max(last_done, done)
                if code is None:
                    ok += 1
                    histogram.record_value(max(1, round((done - start) * 1e6)))
                else:
                    errors[code] += 1
                    examples.setdefault(code, detail[:200])

        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall

    elapsed = max(last_done - measure_start, 1e-9)
    report = Report(target, model, count, concurrency, ok=ok, elapsed_s=elapsed)
    report.requests_per_s = ok / elapsed
    report.images_per_s = ok * count / elapsed
    if ok:
        report.latency_ms = {
            name: histogram.get_value_at_percentile(p) / 1000
            for name, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))
        }
        report.latency_ms["max"] = histogram.get_max_value() / 1000
    report.errors = dict(errors)
    report.error_examples = examples
    report.client_cpu_percent = 100 * cpu_s / wall_s
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:8101", help="host:port")
    parser.add_argument("--model", default="vae_decoder_uint8")
    parser.add_argument("--output", default="probabilities", help="output tensor name")
    parser.add_argument("--count", type=int, default=64, help="images (latents) per request")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call deadline, seconds")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    report = asyncio.run(
        drive(
            args.target,
            args.model,
            args.output,
            args.count,
            args.concurrency,
            args.duration,
            args.warmup,
            args.timeout,
            args.latent_size,
        )
    )
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return
    lat = "  ".join(f"{k} {v:.2f}" for k, v in report.latency_ms.items())
    print(
        f"{report.model} count={report.count} concurrency={report.concurrency}: "
        f"{report.requests_per_s:,.0f} requests/s, {report.images_per_s:,.0f} images/s; "
        f"latency ms {lat}; errors {report.errors or 'none'}; "
        f"client CPU {report.client_cpu_percent:.0f}%"
    )


if __name__ == "__main__":
    main()
