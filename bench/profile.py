"""Where the server's time goes under Sample load: py-spy samples of `vae-serve`, by part.

    .venv/bin/python -m bench.profile models/mnist-vae/1 --duration 10   # make bench-profile
    .venv/bin/python -m bench.profile models/mnist-vae/2 --precision int8

`vae-serve` runs pinned to `--server-cpus`; py-spy and the load (`vae_client.loadtest`) run on
`--client-cpus`, so neither takes the server's core. For each load (Sample of 1 image at 32 in
flight, of 64 and of 1024 at 8), py-spy records every thread of the server for `--duration` seconds,
native frames included (ONNX Runtime, numpy, gRPC's C core and uvloop have no Python frame of
their own). Samples of a waiting thread (epoll, a lock, the GIL) are set aside; each other sample
goes to the first part of `PARTS` with a rule matching one of its frames. py-spy pauses the
server to unwind native stacks, which slows it 2 to 4 times: the shares are what to read,
not the rates.

Writes bench/results/profile.json and profile.md; `--stacks DIR` keeps the collapsed stacks
(profile-<load>.txt, which flamegraph.pl and speedscope read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from bench.machine import git_commit
from bench.placement import model_flags
from bench.readme_block import replace_block
from bench.servers import ServerProcess
from vae_client.loadtest import LoadConfig, run_all

RESULTS = Path(__file__).resolve().parent / "results"
# name: (count, concurrency), uint8
LOADS = {"sample-1": (1, 32), "sample-64": (64, 8), "sample-1024": (1024, 8)}
RATE_HZ = 25
# A sample is put in the first part (in this order of precedence) with a rule matching any frame
# of its stack: so time in numpy under the servicer is numpy's, and gRPC's C code calling the
# servicer is the servicer's.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decoder (ONNX Runtime)", ("onnxruntime",)),
    ("sigmoid (numpy)", ("sigmoid_",)),
    ("uint8 conversion (numpy)", ("to_uint8", "bernoulli", "png_bytes")),
    ("latent draw (numpy RNG)", ("prior_latents", "pick_seed", "numpy/random")),
    (
        "protobuf: parse, build, serialize",
        (
            "(service/codec.py",
            "(service/tensors.py",
            "(service/images.py",
            "(service/methods.py",
            "_message.abi3",
            "upb_",
        ),
    ),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    (
        "batcher and executor hop",
        ("(service/batch", "(concurrent/futures", "(asyncio/futures.py", "run_in_executor"),
    ),
    (
        "servicer, interceptor, model lease",
        (
            "(service/servicer.py",
            "(service/interceptors.py",
            "(service/model",
            "(service/server",
            "(service/lifecycle.py",
            "(service/delivery.py",
        ),
    ),
    ("gRPC (Cython and C core)", ("grpc",)),
    ("event loop (uvloop)", ("uvloop", "loop.c", "uv_", "uv__", "Runner.run")),
)
OTHER = "other (interpreter, libc)"
# Frames of a thread that waits (for work, the GIL, a socket): such samples are not CPU time.
WAITS = ("epoll_wait", "epoll_pwait", "pthread_cond_timedwait", "pthread_cond_wait", "sem_wait",
         "sem_timedwait", "sem_clockwait", "PyThread_acquire_lock", "take_gil", "select (",
         "poll (", "nanosleep", "accept (", "_PollLikeSelector.select")  # fmt: skip


def py_spy() -> str:
    """This venv's py-spy (the dev extra), else one on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def part_of(stack: list[str]) -> str | None:
    """The part a sample (frames outermost first) belongs to; None for a waiting thread."""
    if any(wait in frame for frame in stack[-4:] for wait in WAITS):
        return None
    for part, needles in PARTS:
        if any(needle in frame for frame in stack for needle in needles):
            return part
    return OTHER


def parts(collapsed: str) -> tuple[Counter[str], int]:
    """CPU samples per part, and the waiting ones, from py-spy's raw (collapsed) output:
    one `frame;frame;... count` line per distinct stack."""
    counts: Counter[str] = Counter()
    waiting = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not (stack and n.isdigit()):
            continue
        part = part_of(stack.split(";"))
        if part is None:
            waiting += int(n)
        else:
            counts[part] += int(n)
    return counts, waiting


def record(
    server: ServerProcess, count: int, concurrency: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """py-spy on the server while the load runs; the samples by part and the load's figures."""
    command = [
        "taskset", "-c", args.client_cpus, py_spy(), "record", "--pid", str(server.pid),
        "--rate", str(RATE_HZ), "--duration", str(int(args.duration)), "--format", "raw",
        "--native", "--output", str(out),
    ]  # fmt: skip
    config = LoadConfig(
        targets=(server.target,),
        count=count,
        image_format="uint8",
        concurrency=concurrency,
        warmup=1.0,
        duration=args.duration + 1.5,  # covers py-spy's whole recording
    )

    async def load() -> Any:
        task = asyncio.create_task(run_all(config))
        await asyncio.sleep(config.warmup)
        spy = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        _, err = await spy.communicate()
        cpu1, t1 = server.cpu_seconds(), time.monotonic()
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode()[-1000:]}")
        (report,) = await task
        return report, 100 * (cpu1 - cpu0) / (t1 - t0)

    report, cpu_percent = uvloop.run(load())
    counts, waiting = parts(out.read_text())
    total = sum(counts.values())
    return {
        "count": count,
        "concurrency": concurrency,
        "requests_per_s": report.requests_per_s,
        "images_per_s": report.images_per_s,
        "server_cpu_percent": cpu_percent,
        "samples": total,
        "samples_waiting": waiting,
        "threads_busy": total / (RATE_HZ * args.duration),
        "parts": {part: n / total for part, n in counts.most_common()},
        "stacks": str(out) if args.stacks else None,
    }


def markdown(result: dict[str, Any]) -> str:
    loads = result["loads"]
    names = list(loads)
    all_parts = [p for p, _ in PARTS if any(p in loads[n]["parts"] for n in names)]
    all_parts += [OTHER] if any(OTHER in loads[n]["parts"] for n in names) else []
    header = ["part"] + [f"Sample({loads[n]['count']}) x{loads[n]['concurrency']}" for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for part in all_parts:
        shares = [f"{100 * loads[n]['parts'].get(part, 0):.0f}%" for n in names]
        lines.append("| " + " | ".join([part, *shares]) + " |")
    figures = [
        f"Sample({v['count']}) x{v['concurrency']}: {v['requests_per_s']:,.0f} requests/s "
        f"({v['images_per_s']:,.0f} images/s) while profiled, server CPU "
        f"{v['server_cpu_percent']:.0f}%, {v['samples']} samples"
        for v in loads.values()
    ]
    return (
        f"py-spy {result['py_spy']} at {RATE_HZ} Hz, {result['duration_s']:g} s a load, "
        f"{result.get('precision', 'fp32')} networks (commit {result['git_commit']}), "
        f"server on cpus {result['server_cpus']}, py-spy and the load on cpus "
        f"{result['client_cpus']} ({result['generated_at']}). Share of the samples of all the "
        f"server's threads:\n\n" + "\n".join(lines) + "\n\n" + "; ".join(figures) + ".\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="<repo>/<name>/<version>/ to serve")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds recorded a load")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile.json")
    parser.add_argument("--stacks", type=Path, help="keep the collapsed stacks in this folder")
    parser.add_argument("--readme", type=Path, help="rewrite its profile block with the table")
    parser.add_argument("--precision", default="fp32", help="the networks served (int8: a variant)")
    args = parser.parse_args(argv)
    spy = subprocess.run([py_spy(), "--version"], capture_output=True, text=True, check=True)
    model = model_flags(args.version_dir)
    result: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
        "py_spy": spy.stdout.split()[-1],
        "duration_s": args.duration,
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "precision": args.precision,
        "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "loads": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.stacks:
        args.stacks.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        server = ServerProcess.start_vae_serve(
            "service",
            args.server_cpus,
            Path(tmp) / "service.log",
            dict(os.environ),
            [*model, f"--precision={args.precision}"],
        )
        try:
            for name, (count, concurrency) in LOADS.items():
                stacks = (args.stacks or Path(tmp)) / f"profile-{name}.txt"
                result["loads"][name] = record(server, count, concurrency, args, stacks)
                print(f"{name}: {result['loads'][name]['parts']}", flush=True)
        finally:
            server.stop()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    if args.readme:
        args.readme.write_text(replace_block(args.readme.read_text(), "profile", text))
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
