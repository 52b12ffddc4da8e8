"""Triton (through PyTriton, bench/peers/pytriton_server.py) for `make bench-v2`'s perf_analyzer
comparison: started from its own venv (`make peers`) pinned to the server's cores, in its own
process group, ready once V2 ServerReady and ModelReady say so; stopped with SIGTERM (SIGKILL to
the group after STOP_TIMEOUT_S). Its `vae_decoder_uint8` returns UINT8 [N, 784], the images of
our Sample(N, uint8)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

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
        "taskset", "-c", cpus, str(PYTHON), str(PEERS / "pytriton_server.py"), str(version_dir),
        "--grpc-port", str(PORT), "--http-port", str(PORT - 1), "--metrics-port", str(PORT + 1),
        "--workdir", str(workdir / "triton"), "--max-batch-size", "1024",
        "--max-queue-delay-us", "500",
    ]  # fmt: skip
    log = workdir / "triton.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    target = f"127.0.0.1:{PORT}"
    try:
        began = time.monotonic()
        while not _ready(target):
            if proc.poll() is not None or time.monotonic() - began > READY_TIMEOUT_S:
                raise RuntimeError(f"Triton did not become ready: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield target
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    group = proc.pid  # start_new_session: the group id is the leader's pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and _alive(group):
        proc.poll()
        time.sleep(0.1)
    if _alive(group):
        os.killpg(group, signal.SIGKILL)
    proc.wait(timeout=10)


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
