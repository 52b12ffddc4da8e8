"""Benchmark the peers serving our ONNX decoder, one at a time, on the same cores and the same
load, and write bench/results/peers.json (`make bench-peers`).

    .venv/bin/python bench/peers/run_peers.py models/mnist-vae/1 --duration 5 --warmup 1

Each peer (Triton through PyTriton, Seldon MLServer) runs from its own venv (`make peers`),
pinned with taskset to `--server-cpus`; the driver (drive.py, this venv) is pinned to
`--client-cpus`. For each peer: start, wait for V2 ServerReady and ModelReady, run every load
point (uint8 outputs: count x 784 bytes a reply) while sampling the server's RSS (the whole
process tree: Triton is three kinds of process), then SIGTERM and wait for the whole process
group to exit. Every process started here is killed on the way out, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the checkout importable
    sys.path.insert(0, str(ROOT))

from decoder import network_file  # noqa: E402
from v2_client import GRPCInferenceServiceStub, channel, wait_ready  # noqa: E402

from bench.placement import port_free  # noqa: E402
from bench.process_group import cpu_seconds, rss_mb, spawn_group, stop_group  # noqa: E402

MODEL = "vae_decoder_uint8"
LOAD_POINTS = ((1, 32), (64, 8), (64, 32))  # (images per request, requests in flight)
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 45.0  # Triton waits up to 30 s for in-flight work (exit_timeout)
RSS_SAMPLE_S = 0.25


@dataclass(frozen=True)
class Peer:
    name: str
    venv: Path
    script: str
    package: str  # whose version to record
    port: int
    args: tuple[str, ...]  # batching settings, recorded in the results

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


PEERS = {
    "triton": Peer(
        "triton",
        HERE / ".venv-triton",
        "pytriton_server.py",
        "nvidia-pytriton",
        8101,
        ("--max-batch-size", "1024", "--max-queue-delay-us", "500"),
    ),
    "mlserver": Peer(
        "mlserver",
        HERE / ".venv-mlserver",
        "mlserver_runtime.py",
        "mlserver",
        8201,
        ("--max-batch-size", "1024", "--max-batch-time", "0.0005"),
    ),
}


@contextmanager
def server(
    peer: Peer, version_dir: Path, cpus: str, workdir: Path, log: Path, precision: str = "fp32"
) -> Iterator[int]:
    """Start `peer` pinned to `cpus` in its own process group; yield its pid; stop it (SIGTERM,
    then SIGKILL to the group after STOP_TIMEOUT_S), however the block ends."""
    if not port_free(peer.port):
        raise RuntimeError(f"port {peer.port} is in use: is an earlier server still running?")
    folder_flag = "--workdir" if peer.name == "triton" else "--settings-dir"
    folder = workdir / peer.name
    if peer.name == "mlserver":
        folder.mkdir()
    command = [
        str(peer.python), str(HERE / peer.script), str(version_dir),
        "--grpc-port", str(peer.port), "--http-port", str(peer.port - 1),
        "--metrics-port", str(peer.port + 1), folder_flag, str(folder), *peer.args,
        "--precision", precision,
    ]  # fmt: skip
    proc = spawn_group(command, cpus, log)
    try:
        yield proc.pid
    finally:
        stop_group(proc, STOP_TIMEOUT_S)


# -- the load -----------------------------------------------------------------------------------


async def ready(pid: int, port: int) -> float:
    """Seconds until V2 ServerReady and ModelReady say ready; fail early if the server died."""
    async with channel(f"127.0.0.1:{port}") as ch:
        waiting = asyncio.ensure_future(
            wait_ready(GRPCInferenceServiceStub(ch), MODEL, READY_TIMEOUT_S)
        )
        while not waiting.done():
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                waiting.cancel()
                raise RuntimeError("the server exited before it was ready")
            await asyncio.sleep(0.2)
        return waiting.result()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def drive(
    pid: int, port: int, count: int, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One load point with drive.py on the client cores, sampling the server's RSS and CPU."""
    command = [
        "taskset", "-c", args.client_cpus, sys.executable, str(HERE / "drive.py"),
        "--target", f"127.0.0.1:{port}", "--model", MODEL, "--count", str(count),
        "--concurrency", str(concurrency), "--duration", str(args.duration),
        "--warmup", str(args.warmup), "--json",
    ]  # fmt: skip
    peak, cpu0, wall0 = 0.0, cpu_seconds(pid), time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = wall0 + args.warmup + args.duration + 60
        while proc.poll() is None and time.monotonic() < deadline:
            peak = max(peak, rss_mb(pid))
            time.sleep(RSS_SAMPLE_S)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"drive.py failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    result["server_cpu_percent"] = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
    result["rss_mb_peak"] = round(peak, 1)
    result["rss_mb_end"] = round(rss_mb(pid), 1)
    result["loadavg_1m"] = os.getloadavg()[0]  # the machine is shared: was anything else running?
    return result


def perf_analyzer(
    peer: Peer, count: int, concurrency: int, args: argparse.Namespace
) -> dict[str, float]:
    """Triton's own perf_analyzer at the same point (Triton only), as a cross-check."""
    command = [
        "taskset", "-c", args.client_cpus, str(peer.venv / "bin" / "perf_analyzer"),
        "-m", MODEL, "-i", "grpc", "-u", f"127.0.0.1:{peer.port}", "-b", str(count),
        "--concurrency-range", str(concurrency), "--percentile", "99",
        "--input-data", "zero",  # its random FP32 bits overflow exp() in the sigmoid
        "--measurement-interval", str(int(args.duration * 1000)),
        "--stability-percentage", "25", "--max-trials", "6",  # a shared, noisy machine
    ]  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(peer.venv / "perf-libs")}
    run = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=args.duration * 10 + 60
    )
    if run.returncode != 0:
        raise RuntimeError(f"perf_analyzer exited {run.returncode}: {run.stdout[-500:]}")
    out = run.stdout
    throughput = float(re.search(r"Throughput: ([\d.]+) infer/sec", out).group(1))  # type: ignore[union-attr]
    p99_us = float(re.search(r"p99 latency: (\d+) usec", out).group(1))  # type: ignore[union-attr]
    return {
        "images_per_s": throughput,
        "requests_per_s": throughput / count,
        "p99_ms": p99_us / 1000,
    }


def run_peer(peer: Peer, args: argparse.Namespace, workdir: Path, log: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "package": f"{peer.package} {package_version(peer)}",
        "server_args": list(peer.args),
    }
    started = time.monotonic()
    with server(peer, args.version_dir, args.server_cpus, workdir, log, args.precision) as pid:
        result["startup_s"] = round(asyncio.run(ready(pid, peer.port)), 2)
        result["rss_mb_idle"] = round(rss_mb(pid), 1)
        result["points"] = []
        for count, concurrency in LOAD_POINTS:
            point = drive(pid, peer.port, count, concurrency, args)
            if args.perf_analyzer and peer.name == "triton":
                try:
                    point["perf_analyzer"] = perf_analyzer(peer, count, concurrency, args)
                except (subprocess.SubprocessError, RuntimeError, AttributeError) as exc:
                    point["perf_analyzer"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(summary(peer.name, point), flush=True)
            result["points"].append(point)
        stopping = time.monotonic()
    result["stop_s"] = round(time.monotonic() - stopping, 2)
    result["total_s"] = round(time.monotonic() - started, 1)
    return result


def package_version(peer: Peer) -> str:
    code = f"import importlib.metadata as m; print(m.version({peer.package!r}))"
    return subprocess.run(
        [str(peer.python), "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()


def summary(name: str, p: dict[str, Any]) -> str:
    return (
        f"{name:8} count={p['count']:<4} concurrency={p['concurrency']:<3} "
        f"{p['requests_per_s']:8,.0f} requests/s {p['images_per_s']:9,.0f} images/s  "
        f"p99 {p['latency_ms'].get('p99', float('nan')):6.2f} ms  RSS {p['rss_mb_peak']:.0f} MB  "
        f"server CPU {p['server_cpu_percent']:.0f}%  client CPU {p['client_cpu_percent']:.0f}%  "
        f"errors {p['errors'] or 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="<repo>/<name>/<version>/ with decoder.onnx")
    parser.add_argument("--peers", default="triton,mlserver", help="comma-separated")
    parser.add_argument("--server-cpus", default="0", help="taskset list for the server: 0 or 0-1")
    parser.add_argument("--client-cpus", default="1", help="taskset list for the driver")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds a point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds a point")
    parser.add_argument("--perf-analyzer", action="store_true", help="cross-check Triton with it")
    parser.add_argument("--out", type=Path, default=HERE.parent / "results" / "peers.json")
    parser.add_argument("--logs", type=Path, help="keep the servers' logs in this folder")
    parser.add_argument("--precision", default="fp32", help="the decoder file: fp32 or int8")
    args = parser.parse_args()
    if not (args.version_dir / network_file(args.precision)).is_file():
        parser.error(f"{args.version_dir} has no {network_file(args.precision)}")
    # Stopped by SIGTERM (make killed, a CI timeout): unwind, so every server started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    results: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": str(args.version_dir),
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "output": "UINT8 [count, 784] (as our Sample(count, format=uint8))",
        "precision": args.precision,
        "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "notes": [
            f"Both peers run the same {network_file(args.precision)} in ONNX Runtime "
            "(onnxruntime-gpu 1.31.1, CPU provider, 1 intra-op thread, spinning off), the uint8 "
            "images from the graph's own image output where it has one, as the service "
            "(decoder.py).",
            "The client draws the latents and sends them (KServe V2 ModelInfer, raw tensor "
            "bytes): the peers have no sample call. This favours the peers slightly (no random "
            "draw on the server, for 128 bytes more to receive per image).",
            "RSS is the server's whole process tree (Triton: the PyTriton Python process, "
            "tritonserver and one Python backend stub per model instance).",
        ],
        "peers": {},
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for name in args.peers.split(","):
            peer = PEERS[name]
            try:
                results["peers"][name] = run_peer(peer, args, Path(tmp), logs / f"{name}.log")
            except Exception as exc:  # record it, go on with the next peer
                failed = True
                log = logs / f"{name}.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                results["peers"][name] = {"error": f"{type(exc).__name__}: {exc}", "log_tail": tail}
                print(f"{name}: FAILED: {exc}\n{tail}", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
