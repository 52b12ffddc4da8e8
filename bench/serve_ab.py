"""Configurations of `vae-serve` side by side: every load point on every one, interleaved.

    .venv/bin/python -m bench.serve_ab models/mnist-vae/1 --concurrency 1,4,32,64 \\
        on= off=--no-batching fixed=--max-queue-delay=0.002
    .venv/bin/python -m bench.serve_ab models/mnist-vae/1 before@e67ccaf= now= \\
        --out bench/results/some_ab.json       # the same flags at two commits

A configuration NAME@COMMIT= runs the code of that commit (`git archive`d to a scratch folder
and put first on PYTHONPATH, with this checkout's venv), so a change is measured against its
parent on the same machine in the same run.

Each configuration (NAME=FLAGS, flags comma-separated) is a `vae-serve` pinned to
`--server-cpus`; all are started at once (an idle one costs nothing) and loaded in turn by this
process, pinned to `--client-cpus`, round after round, so the drift of a shared machine falls
on every configuration alike. Per point and configuration: the median over the rounds of
requests/s, server CPU per call and rows per run, and the median (and range) of each round's
requests/s over the first configuration's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.machine import cpu
from bench.placement import model_flags, pin_self
from bench.run_bench import Load, run_point
from bench.servers import ServerProcess


def code_at(commit: str, scratch: Path) -> Path:
    """This repository's files at `commit`, in a folder of `scratch`."""
    folder = scratch / f"code-{commit}"
    if folder.exists():  # another configuration at the same commit
        return folder
    folder.mkdir()
    archive = subprocess.run(["git", "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def start(args: argparse.Namespace, logs: Path, stack: ExitStack) -> dict[str, ServerProcess]:
    model = model_flags(args.version_dir)
    servers = {}
    for spec in args.configs:
        label, _, flags = spec.partition("=")
        name, _, commit = label.partition("@")
        extra = [flag for flag in flags.split(",") if flag]
        env = dict(os.environ)
        if commit:
            env["PYTHONPATH"] = str(code_at(commit, logs))
        server = ServerProcess.start_vae_serve(
            name, args.server_cpus, logs / f"{name}.log", env, [*model, *extra]
        )
        stack.callback(server.stop)
        servers[name] = server
    return servers


def table(points: dict[tuple[int, str], list[dict[str, Any]]], first: str) -> str:
    lines = []
    for (concurrency, name), runs in points.items():
        rates = [p["requests_per_s"] for p in runs]
        base = [p["requests_per_s"] for p in points[(concurrency, first)]]
        ratios = [r / b for r, b in zip(rates, base, strict=True)]
        cpu = [1e4 * p["server_cpu_percent"] / p["requests_per_s"] for p in runs]
        rows = [p.get("rows_per_run") or 0.0 for p in runs]
        lines.append(
            f"x{concurrency:<3} {name:12} {statistics.median(rates):8,.0f} requests/s "
            f"{statistics.median(cpu):6.0f} us CPU/call {statistics.median(rows):6.1f} rows/run "
            f"p99 {statistics.median(p['latency_ms']['p99'] for p in runs):7.2f} ms   "
            f"/ {first}: {statistics.median(ratios):.3f} ({min(ratios):.2f} to {max(ratios):.2f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="<repo>/<name>/<version>/ to serve")
    parser.add_argument("configs", nargs="+", help="NAME=FLAGS (comma-separated vae-serve flags)")
    parser.add_argument("--method", default="sample", choices=("sample", "decode", "encode"))
    parser.add_argument("--count", type=int, default=1, help="images per call")
    parser.add_argument("--format", default="uint8", dest="image_format")
    parser.add_argument("--concurrency", default="1,32,64", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds a point")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds a point")
    parser.add_argument("--connections", type=int, default=1, help="TCP connections a point")
    parser.add_argument("--server-cpus", default="0", help="taskset list for the servers")
    parser.add_argument("--client-cpus", default="1", help="taskset list for the load")
    parser.add_argument("--out", type=Path, help="also write the points and the table as JSON")
    args = parser.parse_args(argv)
    pin_self(args.client_cpus)
    latent_size = int(json.loads((args.version_dir / "manifest.json").read_text())["latent_size"])
    points: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="serve-ab-") as logs:
        servers = start(args, Path(logs), stack)
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            load = Load(args.method, args.count, args.image_format, concurrency)
            for _ in range(args.rounds):
                for name, server in servers.items():
                    point = run_point(server, load, args, latent_size)
                    points.setdefault((concurrency, name), []).append(point)
    summary = table(points, first=next(iter(servers)))
    print()
    print(summary)
    if args.out is not None:
        results = {
            "command": " ".join(["python -m bench.serve_ab", *(argv or sys.argv[1:])]),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "cpu": cpu(),
            "table": summary.splitlines(),
            "points": [p for runs in points.values() for p in runs],
        }
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
