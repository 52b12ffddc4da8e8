"""The shutdown on the real server: no call that reached it is CANCELLED or lost, every call is
counted, an idle server with open streams and connections leaves within about a second of its
drain, a reload under way never holds the exit, and SIGHUP at launch does not kill it.

gRPC core cancels the calls that reached the server but were not yet picked up when
`server.stop()` begins (grpc/grpc#41785): the server drains first (NOT_SERVING, still serving
until calls stop arriving) and only then stops.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from reliability_harness import code_of, wait_until
from service_harness import running, tiny_settings

from bench.h2_peer import H2Peer
from bench.servers import ServerProcess
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import MAX_MESSAGE_BYTES

ROOT = Path(__file__).resolve().parents[2]
NO_RETRIES = [
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def burst_then_sigterm(server: ServerProcess, calls: int) -> list[grpc.StatusCode]:
    """`calls` large Sample calls sent at once from a client without retries, SIGTERM in the
    same instant; the status of each."""
    # 2048 rows a call: 32 calls fill the decoder's queue (max_queue_rows 65536) exactly.
    request = vae_pb2.SampleRequest(count=2048, seed=1, format=vae_pb2.IMAGE_FORMAT_PNG)
    with grpc.insecure_channel(server.target, options=NO_RETRIES) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        assert stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30).name
        futures = [stub.Sample.future(request, timeout=120) for _ in range(calls)]
        server.send(signal.SIGTERM)
        return [code_of(f) for f in futures]


def test_a_burst_sent_just_before_sigterm_is_served_in_full(tiny_model: Path) -> None:
    """Before: a third to a half of such a burst came back CANCELLED."""
    repo = tiny_model.parent.parent
    with ServerProcess.start(repo, "tiny-vae", "--grace-period=60") as server:
        server.wait_serving()
        codes = burst_then_sigterm(server, 32)
        assert server.popen.wait(60) == 0
    assert codes == [grpc.StatusCode.OK] * len(codes), codes
    log = server.output()
    assert "draining: NOT_SERVING" in log and "stopped" in log
    assert "cut off" not in log and "Traceback" not in log


def test_every_call_is_counted_through_a_drain(tiny_model: Path) -> None:
    request = vae_pb2.SampleRequest(count=2048, seed=1, format=vae_pb2.IMAGE_FORMAT_PNG)
    with running(tiny_settings(tiny_model)) as served:
        registry = served.service.metrics.registry
        with grpc.insecure_channel(served.target, options=NO_RETRIES) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            futures = [stub.Sample.future(request, timeout=120) for _ in range(24)]
            wait_until(
                lambda: (registry.get_sample_value("vae_requests_in_flight") or 0) > 0,
                "calls in flight",
            )
            served.background.run(served.service.stop(grace=60, drain=10), timeout=120)
            codes = [code_of(f) for f in futures]
    assert codes == [grpc.StatusCode.OK] * 24
    assert registry.get_sample_value("vae_requests_total", {"method": "Sample", "code": "OK"}) == 24
    assert registry.get_sample_value("vae_requests_in_flight") == 0


def test_calls_cut_at_the_end_of_the_grace_period_are_warned_and_counted(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply its caller never takes (a shut HTTP/2 window) outlives the grace period."""
    request = vae_pb2.SampleRequest(count=4096, seed=1).SerializeToString()
    with (
        caplog.at_level(logging.INFO),
        running(tiny_settings(tiny_model, reply_timeout=0)) as served,
        H2Peer("127.0.0.1", served.service.port, window=1) as peer,
    ):
        count = served.service.metrics.registry.get_sample_value
        peer.call("/vae.v1.VaeService/Sample", request)
        wait_until(lambda: (count("vae_pending_reply_bytes") or 0) > 0, "the reply held")
        served.background.run(served.service.stop(grace=1.0, drain=0.5), timeout=60)
        assert count("vae_requests_total", {"method": "Sample", "code": "CANCELLED"}) == 1
        assert count("vae_requests_in_flight") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 inference calls were cut off at the end of the grace period" in warnings


@pytest.fixture
def idle_server(tiny_model: Path) -> Iterator[ServerProcess]:
    flags = ("--grace-period=60", "--drain-seconds=3")
    with ServerProcess.start(tiny_model.parent.parent, "tiny-vae", *flags) as server:
        server.wait_serving()
        yield server


def test_an_idle_server_with_open_streams_and_connections_leaves_after_its_drain(
    idle_server: ServerProcess,
) -> None:
    """An open health Watch, a reflection stream, an idle TCP connection and an idle HTTP/2
    connection each held stop(grace) for the whole grace period (11.2 s for 10 s of grace,
    against 0.8 s idle). Now the server leaves once its drain ends."""
    server = idle_server
    with grpc.insecure_channel(server.target) as channel:
        watch: Any = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        release = threading.Event()

        def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            release.wait(120)  # the stream stays open

        reflecting: Any = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(requests(), timeout=120)
        assert next(reflecting).list_services_response.service
        idle_tcp = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        idle_h2 = H2Peer("127.0.0.1", server.port)
        try:
            began = time.monotonic()
            server.send(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as ended:
                next(watch)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert server.popen.wait(30) == 0  # the grace period is 60 s
            took = time.monotonic() - began
        finally:
            release.set()
            idle_tcp.close()
            idle_h2.close()
    assert took < 30, took
    assert "cut off" not in server.output()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_a_reload_under_way_does_not_hold_the_exit(tiny_model: Path, event_loop: str) -> None:
    """A reload hashing a huge file kept the process alive 90 s and more after "stopped": the
    loader here sleeps ten minutes on every load after the first."""
    script = (
        "import sys, time\n"
        "import service.model.holder as holder\n"
        "real, calls = holder.open_model, []\n"
        "def slow(settings, metrics, directory):\n"
        "    calls.append(directory)\n"
        "    if len(calls) > 1:\n"
        "        time.sleep(600)\n"
        "    return real(settings, metrics, directory)\n"
        "holder.open_model = slow\n"
        "from service.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = [
        sys.executable,
        "-c",
        script,
        f"--model-repo={tiny_model.parent.parent}",
        "--model-name=tiny-vae",
        "--host=127.0.0.1",
        "--port=0",
        "--metrics-port=-1",
        "--provider=cpu",
        f"--event-loop={event_loop}",
    ]
    popen = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    assert popen.stderr is not None
    stderr = popen.stderr
    reader = threading.Thread(target=lambda: lines.extend(stderr), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("SERVING" in line for line in lines), "SERVING", timeout=120)
        popen.send_signal(signal.SIGHUP)
        wait_until(lambda: any("reloading" in line for line in lines), "the reload", timeout=60)
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(60) == 0, "".join(lines)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(10)
        reader.join(10)
    assert "stopped" in "".join(lines)


def test_sighup_at_launch_does_not_kill_the_server(tiny_model: Path) -> None:
    with ServerProcess.start(tiny_model.parent.parent, "tiny-vae") as server:
        time.sleep(0.3)  # inside the imports, long before the reload handler exists
        server.send(signal.SIGHUP)
        server.wait_serving()
        assert server.popen.poll() is None
        assert server.stop() == 0


def test_the_pod_outlasts_prestop_drain_and_grace() -> None:
    """terminationGracePeriodSeconds covers the preStop sleep, the longest drain and the grace
    period, and liveness never kills a pod that is draining."""
    base = ROOT / "deploy" / "k8s" / "base"
    env = dict(
        line.split("=", 1)
        for line in (base / "vae-serve.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    deployment = yaml.safe_load((base / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain, grace = float(env["VAE_DRAIN_SECONDS"]), float(env["VAE_GRACE_PERIOD"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + grace
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pre_stop + drain + grace
