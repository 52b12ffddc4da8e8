"""`vae-serve --workers N` for real: N worker processes answering on one port, their metrics
summed on the supervisor's endpoint, SIGHUP and SIGTERM passed to every worker (a drain under
load loses no call), a worker that dies takes the others down, a killed supervisor leaves no
worker behind, and a taken port or a missing model is refused in one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from reliability_harness import MODEL, code_of, wait_until

from bench.servers import ServerProcess
from export.manifest import MANIFEST_FILE
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.settings import Settings, usable_cpus
from service.workers import worker_settings

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]


def sockets_of(pid: int) -> int:
    """Open sockets of process `pid` (its listening ones and the connections it accepted)."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(os.readlink(fds / fd).startswith("socket:") for fd in os.listdir(fds))


def nobody_listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def served_versions(server: ServerProcess) -> dict[str, str]:
    """pid -> version of every worker's vae_model_info series at 1."""
    return {
        dict(labels)["pid"]: dict(labels)["version"]
        for (name, labels), value in server.samples().items()
        if name == "vae_model_info" and value == 1
    }


@pytest.fixture
def two_workers(repo: Path) -> Iterator[ServerProcess]:
    flags = ("--workers=2", "--grace-period=60", "--drain-seconds=3")
    with ServerProcess.start(repo, MODEL, *flags) as server:
        server.wait_serving()
        yield server


def test_two_workers_answer_on_one_port_and_the_supervisor_sums_their_metrics(
    two_workers: ServerProcess,
) -> None:
    server = two_workers
    _, *workers = server.process_ids()
    assert len(workers) == 2
    assert served_versions(server) == {str(pid): "1" for pid in workers}
    before = [sockets_of(pid) for pid in workers]
    channels = [grpc.insecure_channel(server.target, options=OWN_CONNECTION) for _ in range(16)]
    try:
        for seed, channel in enumerate(channels):
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            reply = stub.Sample(vae_pb2.SampleRequest(count=3, seed=seed), timeout=30)
            assert list(reply.images.tensor.shape) == [3, 28, 28]
        after = [sockets_of(pid) for pid in workers]
    finally:
        for channel in channels:
            channel.close()
    # The kernel spread the 16 connections over both (all on one: odds of 1 in 32,768).
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert server.metric("vae_requests_total", method="Sample", code="OK") == 16
    assert server.metric("vae_images_generated_total") == 48
    assert server.metric("vae_request_duration_seconds_count", method="Sample") == 16
    assert server.metric("vae_requests_in_flight") == 0


def test_sighup_reloads_every_worker(repo: Path, two_workers: ServerProcess) -> None:
    staging = repo / ".staging-2"
    shutil.copytree(repo / MODEL / "1", staging)
    manifest = json.loads((staging / MANIFEST_FILE).read_text())
    (staging / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 2}))
    staging.rename(repo / MODEL / "2")
    two_workers.send(signal.SIGHUP)
    wait_until(lambda: set(served_versions(two_workers).values()) == {"2"}, "version 2 served")
    assert len(served_versions(two_workers)) == 2
    assert two_workers.metric("vae_model_reloads_total", result="success") == 2


def test_sigterm_drains_every_worker_and_loses_no_call(two_workers: ServerProcess) -> None:
    server = two_workers
    request = vae_pb2.SampleRequest(count=2048, seed=1, format=vae_pb2.IMAGE_FORMAT_PNG)
    channels = [grpc.insecure_channel(server.target, options=OWN_CONNECTION) for _ in range(8)]
    try:
        futures = []
        for channel in channels:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            assert stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30).name
            futures += [stub.Sample.future(request, timeout=120) for _ in range(4)]
        server.send(signal.SIGTERM)
        codes = [code_of(f) for f in futures]
    finally:
        for channel in channels:
            channel.close()
    assert server.popen.wait(60) == 0
    assert codes == [grpc.StatusCode.OK] * 32, codes
    log = server.output()
    assert log.count("draining: NOT_SERVING") == 2 and "stopped 2 workers" in log
    assert "cut off" not in log and "Traceback" not in log
    assert nobody_listens(server.port)


def test_a_worker_that_dies_takes_the_others_down(two_workers: ServerProcess) -> None:
    server = two_workers
    _, first, second = server.process_ids()
    os.kill(first, signal.SIGKILL)
    assert server.popen.wait(60) == 1
    line = server.wait_log("stopping the other workers")
    assert f"(pid {first}) exited (SIGKILL)" in line
    assert "draining: NOT_SERVING" in server.output()  # the other drained, then stopped
    assert not Path(f"/proc/{second}").exists()
    assert nobody_listens(server.port)


def test_a_killed_supervisor_leaves_no_worker_behind(two_workers: ServerProcess) -> None:
    server = two_workers
    _, *workers = server.process_ids()
    server.send(signal.SIGKILL)
    server.popen.wait(10)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "workers gone")
    assert nobody_listens(server.port)


def test_a_port_another_process_holds_is_refused_in_one_line(repo: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = ServerProcess.start(repo, MODEL, "--workers=2", port=port)
        assert server.popen.wait(60) == 1
        server.reader.join(10)
    line = f"cannot start: cannot listen on 127.0.0.1:{port} (port)"
    assert line in server.output() and "Traceback" not in server.output()
    assert "worker 0" not in server.output()  # refused before any worker started


def test_a_missing_model_is_refused_in_one_line(repo: Path) -> None:
    server = ServerProcess.start(repo, "no-such-model", "--workers=2")
    assert server.popen.wait(60) == 1
    server.reader.join(10)
    log = server.output()
    assert "cannot start: " in log and "no model versions found" in log
    assert "worker 0" not in log and "Traceback" not in log


def test_a_model_no_worker_can_load_ends_the_supervisor(repo: Path) -> None:
    (repo / MODEL / "1" / "decoder.onnx").write_bytes(b"tampered")
    server = ServerProcess.start(repo, MODEL, "--workers=2")
    assert server.popen.wait(60) == 1
    server.reader.join(10)
    log = server.output()
    assert re.search(r"\[worker \d\] vae-serve: cannot start: .*sha256", log), log
    assert "stopping the other workers" in log
    assert "Traceback" not in log and "SERVING" not in log


def test_each_worker_gets_its_share_of_the_inference_threads() -> None:
    settings = Settings(workers=2, port=0, health_port=0, host="127.0.0.1")
    shared = worker_settings(settings)
    assert shared.workers == 1 and shared.metrics_port == -1
    assert shared.port > 0 and shared.health_port > 0 and shared.port != shared.health_port
    assert shared.inference_workers == max(1, usable_cpus() // 2)
    chosen = worker_settings(settings.model_copy(update={"inference_workers": 3}))
    assert chosen.inference_workers == 3


def test_json_logs_name_the_worker_of_each_line(repo: Path) -> None:
    with ServerProcess.start(repo, MODEL, "--workers=2", "--log-format=json") as server:
        server.wait_serving()
    records = [json.loads(line) for line in server.log]
    serving = [r for r in records if r["message"].startswith("SERVING")]
    assert sorted(r.get("worker", -1) for r in serving) == [-1, 0, 1]  # -1: the supervisor's
    assert {r.get("worker") for r in records} == {None, 0, 1}
