"""The Open Inference Protocol beside vae.v1, for the same images (`make bench-v2`).

One vae-serve pinned to --server-cpus; this process, the load, pinned to --client-cpus. At each
point (count images a call, concurrency callers in a closed loop) it runs vae.v1
Sample(count, uint8) and V2 ModelInfer on `<name>-decoder` asking for `image` (UINT8
[count, 28, 28]: the same images, from the same decoder batcher), in the order v1, V2, V2, v1 so
that a drift of the shared machine falls on both; each protocol's figure is the mean of its two
runs. The V2 call carries its latents (count x latent_size float32, drawn up front); Sample
draws them on the server. Then perf_analyzer (tritonclient 2.51.0's, `make v2-client`) drives
the same server at the same points; it asks for every output (probabilities FP32 and image
UINT8), so its calls carry 5 times the reply bytes of ours. Where `make peers` made Triton's venv,
perf_analyzer then drives Triton (PyTriton) at the same points, on its `vae_decoder_uint8` (the
same images as UINT8 [N, 784]), on the same cores.

    python -m bench.v2_bench models/mnist-vae/1 --duration 3 --warmup 1

Writes bench/results/v2.json (and prints one line a run).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop

from bench import v2_triton
from bench.machine import cpu
from bench.placement import model_flags, pin_self
from bench.servers import ServerProcess
from service.proto.inference.v2 import grpc_predict_v2_pb2 as pb
from service.proto.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import MAX_MESSAGE_BYTES

ROOT = Path(__file__).resolve().parents[1]
V2_CLIENT = ROOT / "bench" / "peers" / ".venv-tritonclient"
POINTS = ((1, 32), (64, 8), (1024, 4))  # (images a call, calls in flight)
IMAGE_BYTES = 784
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
Call = Callable[[], Awaitable[int]]  # one request; returns the images it got


def v1_call(channel: grpc.aio.Channel, count: int) -> Call:
    stub = vae_pb2_grpc.VaeServiceStub(channel)
    request = vae_pb2.SampleRequest(count=count, format=vae_pb2.IMAGE_FORMAT_UINT8)

    async def call() -> int:
        reply = await stub.Sample(request, timeout=60)
        assert len(reply.images.tensor.data) == count * IMAGE_BYTES
        return count

    return call


def v2_call(channel: grpc.aio.Channel, model: str, count: int, latent_size: int) -> Call:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(4):  # a few distinct latent batches, sent in turn
        z = rng.standard_normal((count, latent_size), dtype=np.float32)
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="latent", datatype="FP32", shape=z.shape
        )
        requests.append(
            pb.ModelInferRequest(
                model_name=model,
                inputs=[tensor],
                outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="image")],
                raw_input_contents=[z.tobytes()],
            )
        )
    sent = 0

    async def call() -> int:
        nonlocal sent
        sent += 1
        reply = await stub.ModelInfer(requests[sent % len(requests)], timeout=60)
        assert len(reply.raw_output_contents[0]) == count * IMAGE_BYTES
        return count

    return call


async def closed_loop(call: Call, concurrency: int, warmup: float, duration: float) -> dict:
    """`concurrency` callers, each calling again as its call returns; calls that start after
    the warm-up and end within the window are measured. `client_cpu_percent` is this process's
    CPU over the window (near 100: the load generator is the limit)."""
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    start = clock() + warmup
    end = start + duration
    latencies: list[float] = []
    images = 0
    cpu: list[float] = []

    async def caller() -> None:
        nonlocal images
        while (began := clock()) < end:
            if began >= start and not cpu:
                cpu.append(time.process_time())
            got = await call()
            done = clock()
            if began >= start and done <= end:
                latencies.append(done - began)
                images += got

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    ms = np.asarray(latencies) * 1000
    return {
        "calls": len(latencies),
        "images_per_s": round(images / duration, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 3) if len(ms) else None,
        "client_cpu_percent": round(100 * (time.process_time() - cpu[0]) / duration, 1)
        if cpu
        else None,
    }


def run_protocol(
    protocol: str, target: str, model: str, count: int, concurrency: int, args: argparse.Namespace
) -> dict:
    async def measured() -> dict:
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            if protocol == "vae.v1":
                call = v1_call(channel, count)
            else:
                call = v2_call(channel, model, count, args.latent_size)
            return await closed_loop(call, concurrency, args.warmup, args.duration)

    result = uvloop.run(measured())
    print(f"{protocol:6} count {count:5} x {concurrency:2}: {result}", flush=True)
    return result


def mean_of(runs: list[dict]) -> dict:
    return {
        key: round(float(np.mean([r[key] for r in runs])), 3)
        for key in ("images_per_s", "p50_ms", "p99_ms")
    } | {"runs": runs}


def perf_analyzer(target: str, model: str, count: int, concurrency: int, args: Any) -> dict | None:
    """perf_analyzer's own client figures (and its server-side ones) at one point."""
    binary = V2_CLIENT / "bin" / "perf_analyzer"
    if not binary.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "perf.csv"
        command = [
            str(binary),
            *("-m", model, "-u", target, "-i", "grpc", "-b", str(count)),
            *("--concurrency-range", str(concurrency), "--shape", f"latent:{args.latent_size}"),
            *("--input-data", "zero", "--measurement-interval", str(int(args.duration * 1000))),
            *("--stability-percentage", "999", "--max-trials", "3", "-f", str(report)),
        ]
        env = {**os.environ, "LD_LIBRARY_PATH": str(V2_CLIENT / "perf-libs")}
        done = subprocess.run(
            ["taskset", "-c", args.client_cpus, *command],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        if done.returncode != 0 or not report.exists():
            return {"error": (done.stdout + done.stderr)[-500:]}
        (row,) = list(csv.DictReader(report.open()))
    result = {
        "images_per_s": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1000,
        "p99_ms": int(row["p99 latency"]) / 1000,
        "server_queue_us": int(row["Server Queue"]),
        "server_compute_us": int(row["Server Compute Input"])
        + int(row["Server Compute Infer"])
        + int(row["Server Compute Output"]),
    }
    print(f"perf_analyzer count {count:5} x {concurrency:2}: {result}", flush=True)
    return result


def table_rows(result: dict[str, Any]) -> list[str]:
    """The README's rows of a bench/results/v2.json: images/s (p99 ms) for vae.v1, V2, the ratio,
    perf_analyzer on vae-serve and on Triton."""

    def cell(figures: dict[str, Any] | None) -> str:
        if not figures or "images_per_s" not in figures:
            return "-"
        return f"{figures['images_per_s']:,.0f} ({figures['p99_ms']:.1f})"

    return [
        f"| {p['count']} x {p['concurrency']} | {cell(p['vae_v1_sample_uint8'])} | "
        f"{cell(p['v2_modelinfer_image'])} | {p['v2_over_v1']:.2f} | {cell(p['perf_analyzer'])} | "
        f"{cell(p.get('perf_analyzer_triton'))} |"
        for p in result["points"]
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version_dir", type=Path, help="<repo>/<name>/<version>/ to serve")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds a run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument(
        "--no-triton",
        dest="triton",
        action="store_false",
        help="skip perf_analyzer against Triton (run only where `make peers` made its venv)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "v2.json")
    args = parser.parse_args(argv)
    pin_self(args.client_cpus)
    model = f"{args.version_dir.parent.name}-decoder"
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "33554432",
        "MALLOC_TRIM_THRESHOLD_": "134217728",
    }
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess.start_vae_serve(
            "vae-serve",
            args.server_cpus,
            Path(tmp) / "server.log",
            env,
            model_flags(args.version_dir),
        )
        points = []
        try:
            for count, concurrency in POINTS:
                runs: dict[str, list[dict]] = {"vae.v1": [], "v2": []}
                for protocol in ("vae.v1", "v2", "v2", "vae.v1"):
                    runs[protocol].append(
                        run_protocol(protocol, server.target, model, count, concurrency, args)
                    )
                v1, v2 = mean_of(runs["vae.v1"]), mean_of(runs["v2"])
                points.append(
                    {
                        "count": count,
                        "concurrency": concurrency,
                        "vae_v1_sample_uint8": v1,
                        "v2_modelinfer_image": v2,
                        "v2_over_v1": round(v2["images_per_s"] / v1["images_per_s"], 3),
                        "perf_analyzer": perf_analyzer(
                            server.target, model, count, concurrency, args
                        ),
                        "loadavg_1m": os.getloadavg()[0],
                    }
                )
        finally:
            server.stop()
        if args.triton and v2_triton.available():
            try:
                with v2_triton.triton(args.version_dir, args.server_cpus, Path(tmp)) as target:
                    for point in points:
                        point["perf_analyzer_triton"] = perf_analyzer(
                            target, v2_triton.MODEL, point["count"], point["concurrency"], args
                        )
            except RuntimeError as e:  # Triton is a comparison: keep vae-serve's figures
                print(f"Triton: {e}", flush=True)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": f"python -m bench.v2_bench {args.version_dir} --duration {args.duration} "
        f"--warmup {args.warmup}",
        "cpu": cpu(),
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "points": points,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
