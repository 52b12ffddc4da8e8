"""Batching on against off for one caller, in process: does the batcher cost a lone request
anything? The servicer's Sample awaited directly on one uvloop, no gRPC.

    taskset -c 0 .venv/bin/python -m bench.batching_ab models/mnist-vae/1 --rounds 11

The model is served twice, with the settings' defaults (batching on: the fast path, probes for
holding) and with `batching=False` (the pass-through), and called back to back in interleaved
bursts, so the machine's drift falls on both alike. Reports, per mode, the median calls/s and
CPU time per call, and the ratio on / off of each round (median and range): without gRPC, a
call costs a fifth of what it costs over gRPC, so the batcher's own cost shows five times as
large here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.inprocess import NoDeadline, version_settings
from service.metrics import Metrics
from service.model.served import ServedModel, open_model
from service.proto.vae.v1 import vae_pb2
from service.servicer import VaeServicer, pinned

MODES = {"on": {}, "off": {"batching": False}}


def _served(version_dir: Path, **overrides: Any) -> tuple[VaeServicer, ServedModel]:
    settings = version_settings(version_dir, **overrides)
    model = open_model(settings, Metrics())
    model.warm_up()
    servicer = VaeServicer(pinned(model), Metrics(), max_items=settings.max_items_per_request)
    return servicer, model


async def _burst(servicer: VaeServicer, request: vae_pb2.SampleRequest, seconds: float) -> dict:
    """Calls one after the other for `seconds`: calls/s and CPU (all threads) per call."""
    context: Any = NoDeadline()
    calls, cpu, start = 0, time.process_time(), time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        await servicer.Sample(request, context)
        calls += 1
    elapsed = time.perf_counter() - start
    return {"calls_per_s": calls / elapsed, "cpu_us": 1e6 * (time.process_time() - cpu) / calls}


def run(version_dir: Path, count: int, rounds: int, seconds: float) -> dict[str, Any]:
    loop = uvloop.new_event_loop()
    served = {mode: _served(version_dir, **overrides) for mode, overrides in MODES.items()}
    request = vae_pb2.SampleRequest(count=count, format=vae_pb2.IMAGE_FORMAT_UINT8)
    bursts: dict[str, list[dict]] = {mode: [] for mode in MODES}
    try:
        for servicer, _ in served.values():  # warm-up
            loop.run_until_complete(_burst(servicer, request, min(seconds, 0.2)))
        for _ in range(rounds):
            for mode, (servicer, _) in served.items():
                bursts[mode].append(loop.run_until_complete(_burst(servicer, request, seconds)))
    finally:
        for _, model in served.values():
            loop.run_until_complete(model.close())
        loop.close()
    ratios = [
        on["calls_per_s"] / off["calls_per_s"]
        for on, off in zip(bursts["on"], bursts["off"], strict=True)
    ]
    return {
        "count": count,
        "rounds": rounds,
        **{
            mode: {
                "calls_per_s": statistics.median(b["calls_per_s"] for b in runs),
                "cpu_us_per_call": statistics.median(b["cpu_us"] for b in runs),
            }
            for mode, runs in bursts.items()
        },
        "on_over_off": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="<repo>/<name>/<version>/")
    parser.add_argument("--count", type=int, default=1, help="images per Sample call")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved bursts per mode")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one burst")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run(args.version_dir, args.count, args.rounds, args.seconds)
    if args.json:
        print(json.dumps(result))
        return
    for mode in MODES:
        print(
            f"batching {mode:3}: {result[mode]['calls_per_s']:9,.0f} calls/s "
            f"{result[mode]['cpu_us_per_call']:7.1f} us CPU a call"
        )
    r = result["on_over_off"]
    print(f"on / off: {r['median']:.3f} (rounds {r['min']:.3f} to {r['max']:.3f})")


if __name__ == "__main__":
    main()
