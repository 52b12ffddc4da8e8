"""vae-serve as a process: refuses a bad model or an impossible provider with a clear message
and exit code 1; on SIGTERM it drains in-flight calls, loses none, and exits 0."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from service_harness import BackgroundLoop, open_channel, scrape, tiny_settings

from bench.servers import ServerProcess, free_port
from export.manifest import MANIFEST_FILE, ModelError, sha256_of
from service.model.runtime import Runtime
from service.model.sessions import CUDA, ProviderError
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.server import Service

SERVING_LINE = re.compile(r"SERVING .* on port (\d+) \(metrics: port (\d+)\) after ([\d.]+) s")


def vae_serve(repo: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "service",
        f"--model-repo={repo}",
        "--model=tiny-vae",
        "--host=127.0.0.1",
        "--port=0",
        "--metrics-host=127.0.0.1",
        "--metrics-port=0",
        *flags,
    ]


def refuses(repo: Path, *flags: str) -> str:
    """Run vae-serve, expect exit code 1, return its stderr."""
    done = subprocess.run(vae_serve(repo, *flags), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def copy_repo(tiny_model: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model.parent.parent, repo)
    return repo


def test_tampered_model_refuses_to_start(tiny_model: Path, tmp_path: Path) -> None:
    repo = copy_repo(tiny_model, tmp_path)
    decoder = repo / "tiny-vae" / "1" / "decoder.onnx"
    data = bytearray(decoder.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    decoder.write_bytes(bytes(data))
    stderr = refuses(repo)
    assert "cannot start" in stderr
    assert "decoder.onnx: sha256" in stderr and "does not match the manifest" in stderr


def test_missing_model_refuses_to_start(tmp_path: Path) -> None:
    stderr = refuses(tmp_path)
    assert "no model versions found" in stderr and "make model" in stderr


def test_missing_version_refuses_to_start(tiny_model: Path) -> None:
    stderr = refuses(tiny_model.parent.parent, "--version=7")
    assert "version 7 not found (have [1])" in stderr


def cuda_unusable(tiny_model: Path) -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or None where it can. Asked of ONNX Runtime
    itself, not of the service: onnxruntime-gpu lists CUDA as available even without a GPU and
    silently runs a CUDA session on the CPU, so only `get_providers()` after creation tells."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build has no {CUDA}"
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its error on a CPU host is the expected answer here
    session = ort.InferenceSession(
        str(tiny_model / "decoder.onnx"), options, providers=[CUDA, "CPUExecutionProvider"]
    )
    if CUDA not in session.get_providers():
        return f"a session asked for CUDA runs on {session.get_providers()} (no usable GPU)"
    return None


def test_cuda_without_a_gpu_is_a_clear_start_up_error(tiny_model: Path) -> None:
    if cuda_unusable(tiny_model) is None:  # pragma: no cover - a machine with a working GPU
        pytest.skip("CUDA works here: test_cuda_serves_where_a_gpu_works checks that path")
    done = subprocess.run(
        vae_serve(tiny_model.parent.parent, "--provider=cuda", "--grace-period=0"),
        capture_output=True,
        text=True,
        timeout=60,
        input="",
    )
    assert done.returncode == 1, done.stderr
    assert "provider 'cuda' was requested but ONNX Runtime cannot use CUDA here" in done.stderr
    assert "Traceback" not in done.stderr


def test_cuda_serves_where_a_gpu_works(tiny_model: Path) -> None:
    """The positive check of the CUDA path, run wherever a GPU works: the sessions really run
    on CUDA (get_providers after creation), and `vae-serve --provider=cuda` serves images that
    the CPU session computes too."""
    reason = cuda_unusable(tiny_model)
    if reason is not None:
        pytest.skip(f"no working CUDA here: {reason}")
    settings = tiny_settings(tiny_model, provider="cuda")  # pragma: no cover
    runtime = Runtime.load(tiny_model, settings)  # pragma: no cover
    try:  # pragma: no cover - a machine with a working GPU
        assert CUDA in runtime.encoder.get_providers()
        assert CUDA in runtime.decoder.get_providers()
        assert runtime.info.providers[0] == CUDA
    finally:
        runtime.close()
    repo = tiny_model.parent.parent  # pragma: no cover
    with ServerProcess.start(repo, "tiny-vae", "--provider=cuda") as server:  # pragma: no cover
        server.wait_serving()
        with open_channel(server.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            info = stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30)
            assert info.providers[0] == CUDA, info.providers
            request = vae_pb2.SampleRequest(
                count=64, seed=1, format=vae_pb2.IMAGE_FORMAT_PROBABILITIES, return_latents=True
            )
            reply = stub.Sample(request, timeout=60)
        assert server.metric("vae_model_info", provider=CUDA) == 1
    latents = np.frombuffer(reply.latents.data, np.float32).reshape(64, -1)  # pragma: no cover
    served = np.frombuffer(reply.images.tensor.data, np.float32).reshape(64, 784)
    cpu = ort.InferenceSession(str(tiny_model / "decoder.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = cpu.run(["logits"], {"latent": latents})
    np.testing.assert_allclose(served, 1 / (1 + np.exp(-logits)), atol=1e-4)


def test_auto_falls_back_to_the_cpu_with_a_warning(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.model.runtime"):
        runtime = Runtime.load(tiny_model, tiny_settings(tiny_model, provider="auto"))
    runtime.close()
    if CUDA in runtime.info.providers:  # pragma: no cover - a machine with a working GPU
        pytest.skip("CUDA works here")
    assert runtime.info.providers == ("CPUExecutionProvider",)
    assert any("CUDA is not usable here" in r.message for r in caplog.records)


def test_cuda_is_refused_in_process_too(tiny_model: Path) -> None:
    try:
        runtime = Runtime.load(tiny_model, tiny_settings(tiny_model, provider="cuda"))
    except ProviderError as e:
        assert "Use --provider auto or cpu" in str(e)
    else:  # pragma: no cover - a machine with a working GPU
        runtime.close()
        pytest.skip("CUDA works here")


def decoder_for_batches_of_2(version: Path) -> None:
    """Replace the decoder by one that passes loading (the manifest vouches for it, and the
    load-time probe runs a batch of 2 and gets finite values) but declares a fixed batch of 2,
    so the warm-up's batch of 1 fails."""
    from onnx import TensorProto, helper

    manifest = json.loads((version / MANIFEST_FILE).read_text())
    latent = manifest["latent_size"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["latent", "weights"], ["logits"])],
        "a-fixed-batch-of-2",
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, [2, latent])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 784])],
        [helper.make_tensor("weights", TensorProto.FLOAT, [latent, 784], [0.0] * latent * 784)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = version / "decoder.onnx"
    path.write_bytes(model.SerializeToString())
    manifest["decoder"]["sha256"] = sha256_of(path)
    manifest["decoder"]["outputs"] = manifest["decoder"]["outputs"][:1]  # logits alone
    (version / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_model_failing_warm_up_leaves_no_port_listening(tiny_model: Path, tmp_path: Path) -> None:
    """The ports open before warm-up (the startupProbe sees NOT_SERVING meanwhile); when warm-up
    fails, the start stops the gRPC, health and metrics servers before raising."""
    version = copy_repo(tiny_model, tmp_path) / "tiny-vae" / "1"
    decoder_for_batches_of_2(version)
    ports = {"port": free_port(), "health_port": free_port(), "metrics_port": free_port()}
    background = BackgroundLoop()
    try:
        with pytest.raises(ModelError, match="warm-up failed"):
            background.run(Service.start(tiny_settings(version, **ports)))
    finally:
        background.close()
    for name, port in ports.items():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            pytest.fail(f"{name} {port} is still listening")


@dataclass
class Process:
    popen: subprocess.Popen[str]
    port: int
    metrics_port: int
    start_seconds: float
    log: list[str]


@pytest.fixture
def server_process(tiny_model: Path) -> Iterator[Process]:
    popen = subprocess.Popen(
        vae_serve(tiny_model.parent.parent, "--grace-period=30", "--provider=cpu"),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert popen.stderr is not None
    log: list[str] = []
    deadline = time.monotonic() + 60
    match = None
    while match is None and time.monotonic() < deadline:
        line = popen.stderr.readline()
        if not line:
            break
        log.append(line)
        match = SERVING_LINE.search(line)
    assert match, "".join(log)
    stderr = popen.stderr
    drain = threading.Thread(target=lambda: log.extend(stderr), daemon=True)
    drain.start()
    try:
        yield Process(popen, int(match[1]), int(match[2]), float(match[3]), log)
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait(10)
        drain.join(10)


def test_sigterm_with_calls_in_flight_loses_none(server_process: Process) -> None:
    calls = 6
    metrics_url = f"http://127.0.0.1:{server_process.metrics_port}/metrics"
    with open_channel(f"127.0.0.1:{server_process.port}") as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        # 4096 PNG images a call: about 0.2 s of work each, on 2 inference threads
        request = vae_pb2.SampleRequest(count=4096, seed=1, format=vae_pb2.IMAGE_FORMAT_PNG)
        with ThreadPoolExecutor(calls) as pool:
            futures = [pool.submit(stub.Sample, request, timeout=60) for _ in range(calls)]
            deadline = time.monotonic() + 30
            while scrape(metrics_url)[("vae_requests_in_flight", ())] < calls:
                assert time.monotonic() < deadline, "the calls never were all in flight"
                time.sleep(0.005)
            server_process.popen.send_signal(signal.SIGTERM)
            assert not all(f.done() for f in futures)
            while not any("shutting down" in line for line in server_process.log):
                assert time.monotonic() < deadline, "SIGTERM was not acted on"
                time.sleep(0.005)
            late = open_channel(f"127.0.0.1:{server_process.port}")
            with late, pytest.raises(grpc.RpcError) as refused:
                vae_pb2_grpc.VaeServiceStub(late).GetModelInfo(
                    vae_pb2.GetModelInfoRequest(), timeout=5
                )
            # gRPC refuses it itself: UNAVAILABLE, or CANCELLED when the new connection raced
            # the listener's close (calls on open connections get GOAWAY and are retried).
            assert refused.value.code() in (  # type: ignore[attr-defined]
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
            )
            replies = [f.result() for f in futures]
    assert [len(r.images.png) for r in replies] == [4096] * calls
    assert server_process.popen.wait(30) == 0
    log = "".join(server_process.log)
    assert "shutting down: NOT_SERVING" in log and "stopped" in log
