"""`vae-loadtest`: drive any VaeService RPC at a concurrency or a rate, report throughput and
latency from an HDR histogram.

    vae-loadtest --target localhost:50051 --method sample --count 64 --format uint8 \\
        --concurrency 32 --duration 10 --warmup 2
    vae-loadtest --target dns:///vae.default.svc:50051 --connections 4 --rate 2000 \\
        --arrivals poisson --requests 20000 --json
    vae-loadtest --target localhost:50051 --sweep 1,2,4,8,16,32,64 --plot sweep.png

Closed loop (`--concurrency N`): N callers, each sending its next request when the last one
returns; latency is measured from the send. Open loop (`--rate R`): requests are sent on a
schedule (constant spacing or Poisson arrivals) whatever the replies do, and latency is measured
from the *scheduled* send time, so a server (or client) that falls behind shows its queue in the
latencies instead of hiding it (coordinated omission). Requests sent during `--warmup` are not
measured. Latencies are those of successful calls; failed calls are counted by status code.

Requests are built once with the generated messages and sent pre-serialized, and replies are
not parsed, so the generator spends its CPU on gRPC itself; pin it to other cores than the
server's (`taskset`) to keep the two apart.

The parts: `vae_client.load_requests` (configuration and payloads), `vae_client.load_driver`
(the closed and open loops), `vae_client.load_report` (text, JSON and the sweep plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any

import grpc

from vae_client.client import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from vae_client.load_driver import run_all
from vae_client.load_report import Report, format_report, plot_sweep
from vae_client.load_requests import METHODS, LoadConfig
from vae_client.load_requests import build_payloads as build_payloads
from vae_client.tensors import FORMATS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vae-loadtest",
        description="Load-test a VaeService: throughput and HDR latency percentiles.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--target",
        action="append",
        help="host:port or dns:///host:port (round-robin over its addresses); repeatable "
        "(default localhost:50051)",
    )
    p.add_argument("--method", choices=sorted(METHODS), default="sample")
    p.add_argument("--count", type=int, default=1, help="images (or latents) per request")
    p.add_argument(
        "--format",
        dest="image_format",
        choices=sorted(FORMATS),
        default="uint8",
        help="reply images for sample/decode; how the images travel for encode",
    )
    p.add_argument("--samples-per-image", type=int, default=0, help="encode: z draws per image")
    p.add_argument("--latent-size", type=int, help="decode: skip asking GetModelInfo")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=1, help="closed loop: calls in flight")
    load.add_argument("--rate", type=float, help="open loop: requests per second")
    p.add_argument("--arrivals", choices=["constant", "poisson"], default="constant")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--requests", type=int, help="measured requests (instead of --duration)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    p.add_argument("--connections", type=int, default=1, help="channels (TCP connections)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-call deadline, seconds")
    p.add_argument("--seed", type=int, default=0, help="for request data and Poisson arrivals")
    p.add_argument(
        "--sweep",
        help="comma-separated concurrencies (or rates, with --rate) to run one after another",
    )
    p.add_argument("--plot", help="PNG of throughput against p99 latency over the sweep")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = p.parse_args(argv)
    for name in ("count", "concurrency", "connections", "requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be > 0")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0:
        p.error("--duration and --timeout must be > 0, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = LoadConfig(
        targets=tuple(args.target or ["localhost:50051"]),
        method=args.method,
        count=args.count,
        image_format=args.image_format,
        concurrency=args.concurrency,
        rate=args.rate,
        arrivals=args.arrivals,
        duration=None if args.requests else args.duration,
        requests=args.requests,
        warmup=args.warmup,
        connections=args.connections,
        timeout=args.timeout,
        samples_per_image=args.samples_per_image,
        latent_size=args.latent_size,
        seed=args.seed,
    )
    sweep = [float(v) for v in args.sweep.split(",")] if args.sweep else None
    try:
        reports = _run(run_all(config, sweep), args.loop)
    except grpc.aio.AioRpcError as exc:  # GetModelInfo failed
        message = f"cannot get the model info: {exc.code().name}: {exc.details()}"
        print(message, file=sys.stderr)
        if args.json:
            print(json.dumps({"error": message}))
        return 2
    if args.plot:
        plot_sweep(reports, args.plot)
    if args.json:
        out: dict[str, Any] = (
            reports[0].to_dict() if sweep is None else {"sweep": [r.to_dict() for r in reports]}
        )
        if args.plot:
            out["plot"] = args.plot
        print(json.dumps(out))
    else:
        print("\n\n".join(format_report(r) for r in reports))
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0 if any(r.ok for r in reports) else 1


def _run(coroutine: Coroutine[Any, Any, list[Report]], loop: str) -> list[Report]:
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            print("uvloop not installed: using asyncio's loop", file=sys.stderr)
        else:
            return uvloop.run(coroutine)  # type: ignore[no-any-return]
    return asyncio.run(coroutine)


if __name__ == "__main__":
    raise SystemExit(main())
