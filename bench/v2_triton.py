"""Triton (through PyTriton, bench/peers/pytriton_server.py) for `make bench-v2`'s perf_analyzer
comparison: started from its own venv (`make peers`) pinned to the server's cores, in its own
process group, ready once V2 ServerReady and ModelReady say so; stopped with SIGTERM (SIGKILL to
the group after STOP_TIMEOUT_S). Its `vae_decoder_uint8` returns UINT8 [N, 784], the images of
our Sample(N, uint8)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from bench.process_group import spawn_group, stop_group
from service.proto.inference.v2 import grpc_predict_v2_pb2 as pb
from service.proto.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

PEERS = Path(__file__).resolve().parent / "peers"
PYTHON = PEERS / ".venv-triton" / "bin" / "python"
MODEL = "vae_decoder_uint8"
PORT = 8101
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 45.0  # Triton waits up to 30 s for in-flight work


def available() -> bool:
    return PYTHON.exists()


def _ready(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            return bool(
                stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready
                and stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=1).ready
            )
        except grpc.RpcError:
            return False


@contextmanager
def triton(version_dir: Path, cpus: str, workdir: Path) -> Iterator[str]:
    """Triton serving `version_dir`'s decoder; yields its gRPC target."""
    command = [
        str(PYTHON), str(PEERS / "pytriton_server.py"), str(version_dir),
        "--grpc-port", str(PORT), "--http-port", str(PORT - 1), "--metrics-port", str(PORT + 1),
        "--workdir", str(workdir / "triton"), "--max-batch-size", "1024",
        "--max-queue-delay-us", "500",
    ]  # fmt: skip
    log = workdir / "triton.log"
    proc = spawn_group(command, cpus, log)
    target = f"127.0.0.1:{PORT}"
    try:
        began = time.monotonic()
        while not _ready(target):
            if proc.poll() is not None or time.monotonic() - began > READY_TIMEOUT_S:
                raise RuntimeError(f"Triton did not become ready: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield target
    finally:
        stop_group(proc, STOP_TIMEOUT_S)
