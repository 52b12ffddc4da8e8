"""`make bench`: the service against its limit, its transport floor and its peers, in one run.

    .venv/bin/python -m bench.run_bench models/mnist-vae/1 --duration 8 --warmup 1

Everything is measured side by side on this machine, servers on `--server-cpus` (core 0) and
the load generator (this process: `vae_client.loadtest`, the code of `vae-loadtest`) on
`--client-cpus` (core 1), so the client's CPU never counts against the server:

1. The limit: the decoder in process on the server's core (`bench.inprocess`: ONNX Runtime with
   the service's session options, the service's Sample pipeline without gRPC, PyTorch eager).
2. The service (`vae-serve`, batching on) and the no-op server (`bench.noop_server`, same
   message sizes, no inference) at the same load points, one right after the other: Sample at
   count 1, 64, 1024 (uint8 and float32) at concurrency 1, 8, 32, 64; Decode and Encode of 64.
3. Batching on against a second `vae-serve --no-batching`, point by point.
4. Precision: `vae-serve --precision int8` against the fp32 service, point by point, and the
   int8 decoder in process (`bench.precisions`).
5. The peers: `bench/results/peers.json` from `make bench-peers`, quoted with its date.

Per point: requests/s, images/s, p50/p99 latency (HDR), errors, the server's CPU over the
measured window, rows per ONNX Runtime run from the server's own metrics
(vae_images_generated_total / vae_batch_runs_total). Per server: start-up to SERVING, RSS
sampled over the run. Results go to bench/results/bench.json and bench.md; `bench.report`
computes the goals' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from bench import goals, precisions, report
from bench.limits import keep_best, limit
from bench.machine import cpu, git_commit
from bench.placement import model_flags, pin_self
from bench.scrape import Samples, total
from bench.servers import ServerProcess
from vae_client.loadtest import LoadConfig, run_all

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCIES = (1, 8, 32, 64)
SAMPLE_SHAPES = ((1, "uint8"), (1, "probabilities"), (64, "uint8"), (64, "probabilities"),
                 (1024, "uint8"), (1024, "probabilities"))  # fmt: skip
# (method, count, format, concurrency): Decode returns uint8 images; Encode sends uint8 digits.
OTHER_POINTS = (("decode", 64, "uint8", 8), ("decode", 64, "uint8", 32),
                ("encode", 64, "uint8", 8), ("encode", 64, "uint8", 32))  # fmt: skip
# The settings' defaults (their queue holds every admitted call's rows up to a batch:
# max_in_flight 64 x 1024 rows), so Sample(1024) at 64 in flight measures throughput.
SERVER_ARGS: tuple[str, ...] = ()
# Batching on against off: the 64 callers of one image, an idle caller, and count 64.
BATCHING_REPEATS = 2  # each load on, then off, twice; the goals take the best of each
BATCHING_POINTS = (("sample", 1, "uint8", 64), ("sample", 1, "uint8", 1),
                   ("sample", 64, "uint8", 32))  # fmt: skip


@dataclass(frozen=True)
class Load:
    method: str
    count: int
    image_format: str
    concurrency: int

    @property
    def label(self) -> str:
        fmt = "float32" if self.image_format == "probabilities" else self.image_format
        return f"{self.method.capitalize()}({self.count}, {fmt})"


def service_loads() -> list[Load]:
    loads = [Load("sample", count, fmt, c) for count, fmt in SAMPLE_SHAPES for c in CONCURRENCIES]
    return loads + [Load(*point) for point in OTHER_POINTS]


# -- one load point -----------------------------------------------------------------------------


def run_point(
    server: ServerProcess, load: Load, args: argparse.Namespace, latent_size: int
) -> dict[str, Any]:
    """`load` against `server` for --warmup + --duration seconds, with the server's CPU over the
    measured window and its metrics before and after."""
    config = LoadConfig(
        targets=(server.target,),
        method=load.method,
        count=load.count,
        image_format=load.image_format,
        concurrency=load.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        latent_size=latent_size,
        connections=getattr(args, "connections", 1),  # more than one: a `--workers N` server
    )
    before = server.samples()

    async def measured() -> tuple[Any, float, float, float, float]:
        async def window_start() -> tuple[float, float]:
            await asyncio.sleep(args.warmup)
            return server.cpu_seconds(), time.monotonic()

        start = asyncio.create_task(window_start())
        (result,) = await run_all(config)
        cpu0, t0 = await start
        return result, cpu0, t0, server.cpu_seconds(), time.monotonic()

    result, cpu0, t0, cpu1, t1 = uvloop.run(measured())
    after = server.samples()
    point: dict[str, Any] = {
        "server": server.name,
        "label": load.label,
        **asdict(load),
        **{k: v for k, v in result.to_dict().items() if k != "config"},
        "server_cpu_percent": 100 * (cpu1 - cpu0) / max(t1 - t0, 1e-9),
        "rss_mb": round(server.rss_mb(), 1),
        "loadavg_1m": os.getloadavg()[0],
    }
    if before:
        point.update(batch_figures(before, after))
    print(report.point_line(point), flush=True)
    return point


def batch_figures(before: Samples, after: Samples) -> dict[str, Any]:
    """Rows per run over the point (warm-up included), from the server's own counters."""

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    images = delta("vae_images_generated_total") + delta("vae_images_encoded_total")
    queues = ("decoder", "decoder_images", "encoder")  # not Score's logits: no images counted
    runs = sum(delta("vae_batch_runs_total", queue=q) for q in queues)
    return {"images_counted": images, "runs": runs, "rows_per_run": images / runs if runs else None}


# -- the run ------------------------------------------------------------------------------------


@contextmanager
def servers(
    args: argparse.Namespace, env: dict[str, str], logs: Path, variant: bool
) -> Iterator[dict]:
    """The servers (`variant`: and the int8 one), started one after the other (start-up timed
    alone), all pinned to the server's cores; an idle one costs nothing while another is
    measured."""
    model = [*model_flags(args.version_dir), *SERVER_ARGS]
    with ExitStack() as stack:
        started: dict[str, ServerProcess] = {}

        def keep(server: ServerProcess) -> None:
            stack.callback(server.stop)
            started[server.name] = server
            print(f"{server.name}: up in {server.startup_s:.2f} s (pid {server.pid})", flush=True)

        keep(ServerProcess.start_noop("noop", args.server_cpus, logs / "noop.log", env))
        service = ServerProcess.start_vae_serve(
            "service", args.server_cpus, logs / "service.log", env, model
        )
        keep(service)
        service.sample_rss()
        keep(
            ServerProcess.start_vae_serve(
                "batching_off",
                args.server_cpus,
                logs / "batching_off.log",
                env,
                [*model, "--no-batching"],
            )
        )
        if variant:
            precision = ["--precision", precisions.PRECISION]
            log = logs / f"{precisions.PRECISION}.log"
            name = precisions.PRECISION
            keep(ServerProcess.start_vae_serve(name, args.server_cpus, log, env, model + precision))
        yield started


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    malloc = {k: v for k, v in env.items() if k.startswith("MALLOC_")}
    manifest = json.loads((args.version_dir / "manifest.json").read_text())
    results: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu(),  # the model and its AVX/AMX flags: the figures depend on them
            "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg(),
        },
        "git_commit": git_commit(),
        "model": str(args.version_dir),
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "env": malloc or {"MALLOC_*": "unset: glibc's defaults (the Makefile exports them)"},
        "server_args": list(SERVER_ARGS),
    }
    began = time.monotonic()
    results["limit"] = limit(args, env)
    variant = precisions.available(manifest)
    if variant:
        results[precisions.LIMIT] = limit(args, env, *precisions.LIMIT_FLAGS)
    else:
        results["precision_skipped"] = f"{args.version_dir} has no {precisions.PRECISION} variant"
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        servers(args, env, Path(tmp), variant) as s,
    ):
        noop, service, off = s["noop"], s["service"], s["batching_off"]
        idle = service.rss_mb()
        latent = int(manifest["latent_size"])
        points = []
        for load in service_loads():  # the floor right before the service, point by point
            points.append(run_point(noop, load, args, latent))
            points.append(run_point(service, load, args, latent))
        first = next(p["rss_mb"] for p in points if p["server"] == "service")
        for point in BATCHING_POINTS:  # on, off, on, off: a passing blip spoils one only
            for repeat in range(BATCHING_REPEATS):
                for server in (service, off):
                    measured = run_point(server, Load(*point), args, latent)
                    measured.update(section="batching", repeat=repeat)
                    points.append(measured)
        if variant:
            points += precisions.measure(
                lambda server, load: run_point(server, Load(*load), args, latent),
                service,
                s[precisions.PRECISION],
            )
        results["points"] = points
        rss_during = list(service.rss_samples_mb)  # the batching points repeat earlier loads
        results["servers"] = {
            name: {
                "startup_s": round(server.startup_s, 2),
                "internal_startup_s": server.internal_startup_s(),
                "rss_mb_end": round(server.rss_mb(), 1),
            }
            for name, server in s.items()
        }
        results["servers"]["service"]["rss_mb"] = rss_summary(idle, first, rss_during)
    # The limit again, ONNX Runtime alone: a shared machine may have been busy the first time.
    keep_best(results["limit"]["onnxruntime"], limit(args, env, "--only-onnxruntime"))
    if variant:
        again = limit(args, env, *precisions.LIMIT_FLAGS)
        keep_best(results[precisions.LIMIT]["onnxruntime"], again)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["total_s"] = round(time.monotonic() - began, 1)
    results["peers"] = goals.load_peers(args.peers)
    results["goals"] = goals.goals(results)
    return results


def rss_summary(idle: float, first: float, samples: list[float]) -> dict[str, float]:
    """RSS of the service: idle, after its first point, peak and end of the run, and the
    growth from the first point to the end."""
    samples = samples or [first]
    return {
        "idle": round(idle, 1),
        "first": round(first, 1),
        "peak": round(max(samples), 1),
        "end": round(samples[-1], 1),
        "growth": round(samples[-1] - first, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="<repo>/<name>/<version>/ to serve")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds a point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds a point")
    parser.add_argument("--server-cpus", default="0", help="taskset list for the servers")
    parser.add_argument("--client-cpus", default="1", help="taskset list for the load")
    parser.add_argument("--peers", type=Path, default=RESULTS / "peers.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench.json")
    args = parser.parse_args(argv)
    if not (args.version_dir / "manifest.json").is_file():
        parser.error(f"{args.version_dir} has no manifest.json")
    pin_self(args.client_cpus)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    markdown = report.markdown(results)
    md = args.out.with_suffix(".md")
    md.write_text(markdown)
    print("\n" + markdown)
    print(f"wrote {args.out} and {md} in {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
