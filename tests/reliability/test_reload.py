"""Model updates without a restart: a new version directory found by polling (in process) or
announced with SIGHUP (a real `vae-serve`) is verified, loaded, warmed and swapped in; calls in
flight finish on the version they started with; a version that fails verification, loading or
warm-up is rejected, logged and counted, and the old one keeps serving.

The versions differ in latent size (the tiny model's 4, the new one's 3), so every reply tells
which version computed it (`return_latents`).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from reliability_harness import (
    MODEL,
    POLL,
    WITH_LATENTS,
    code_of,
    metric,
    model_info,
    wait_until,
)
from service_harness import Served, open_channel, running, tiny_settings

from bench.servers import ServerProcess
from export.manifest import MANIFEST_FILE, sha256_of
from export.model import VAE, VAEConfig
from export.onnx_export import export_version
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc


def export_latent_3(repo: Path) -> Path:
    """The next version: a different tiny VAE, latent size 3."""
    torch.manual_seed(1)
    model = VAE(VAEConfig(latent_size=3, hidden_sizes=(16,)))
    return export_version(model, repo, MODEL, metrics={"negative_elbo": 432.1})


def stage(repo: Path, version: int, damage: Callable[[Path, dict], None]) -> Path:
    """Version `version`: a copy of version 1 damaged by `damage(directory, manifest)`, moved
    into the repository in one rename (as an export does), so no poll sees half of it."""
    staging = repo / f".staging-{version}"
    shutil.copytree(repo / MODEL / "1", staging)
    manifest = json.loads((staging / MANIFEST_FILE).read_text())
    manifest["version"] = version
    damage(staging, manifest)
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest))
    final = repo / MODEL / str(version)
    staging.rename(final)
    return final


def flip_a_byte(directory: Path, manifest: dict) -> None:
    """A decoder corrupted on disk after export: its sha256 no longer matches."""
    path = directory / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def garbage_with_matching_checksum(directory: Path, manifest: dict) -> None:
    """A decoder that is not an ONNX graph, with a manifest that vouches for it."""
    path = directory / "decoder.onnx"
    path.write_bytes(b"not an onnx graph" * 100)
    manifest["decoder"]["sha256"] = sha256_of(path)


def fails_at_warm_up(directory: Path, manifest: dict) -> None:
    """A decoder that loads (names and declared shapes fit) but fails when run."""
    from onnx import TensorProto, helper

    latent = manifest["latent_size"]
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["latent", "shape"], ["logits"])],
        "reshapes-to-the-wrong-size",
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["N", latent])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 785])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "decoder.onnx"
    path.write_bytes(model.SerializeToString())
    manifest["decoder"]["sha256"] = sha256_of(path)
    manifest["decoder"]["outputs"] = manifest["decoder"]["outputs"][:1]  # logits alone


def version_1_shown(served: Served) -> float:
    return metric(
        served,
        "vae_model_info",
        name=MODEL,
        version="1",
        provider="CPUExecutionProvider",
        precision="fp32",
    )


def test_polling_swaps_a_new_version_in_while_a_call_in_flight_finishes_on_the_old(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The held call waits for a fuller batch (max_queue_delay) across the whole swap.
    settings = tiny_settings(
        repo / MODEL / "1", reload_interval=POLL, max_queue_delay=60.0, max_batch_size=1024
    )
    with (
        caplog.at_level(logging.INFO, logger="service.model.holder"),
        running(settings) as served,
        open_channel(served.target) as channel,
    ):
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        held = stub.Sample.future(WITH_LATENTS, timeout=120)
        wait_until(
            lambda: metric(served, "vae_batch_queue_rows", queue="decoder") == 1,
            "a call held on version 1",
        )
        export_latent_3(repo)
        wait_until(lambda: model_info(channel).version == 2, "version 2 to go live")

        info = model_info(channel)
        assert (info.latent_size, dict(info.metrics)) == (3, {"negative_elbo": 432.1})
        labels = {
            "name": MODEL,
            "version": "2",
            "provider": "CPUExecutionProvider",
            "precision": "fp32",
        }
        assert metric(served, "vae_model_info", **labels) == 1
        assert version_1_shown(served) == 0  # version 1 is no longer shown
        assert metric(served, "vae_model_reloads_total", result="success") == 1
        # The call admitted before the swap finishes, on version 1 (latent size 4).
        assert held.result(timeout=60).latents.shape == [1, 4]
        full = stub.Sample(vae_pb2.SampleRequest(count=1024, return_latents=True), timeout=60)
        assert full.latents.shape == [1024, 3]
    assert any("now serving tiny-vae version 2 (was version 1)" in m for m in caplog.messages)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (flip_a_byte, "does not match the manifest"),
        (garbage_with_matching_checksum, "ONNX Runtime cannot load it"),
        (fails_at_warm_up, "warm-up failed"),
    ],
    ids=["tampered", "unloadable", "fails-warm-up"],
)
def test_a_bad_new_version_is_rejected_logged_counted_and_the_old_keeps_serving(
    repo: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path, dict], None],
    reason: str,
) -> None:
    settings = tiny_settings(repo / MODEL / "1", reload_interval=POLL)
    with (
        caplog.at_level(logging.INFO, logger="service.model.holder"),
        running(settings) as served,
        open_channel(served.target) as channel,
    ):
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        stage(repo, 2, damage)
        wait_until(
            lambda: metric(served, "vae_model_reloads_total", result="failure") == 1,
            "the bad version to be rejected",
        )
        rejected = [m for m in caplog.messages if "reload rejected" in m]
        assert len(rejected) == 1 and reason in rejected[0], caplog.messages
        assert "still serving version 1" in rejected[0]
        assert model_info(channel).version == 1
        assert version_1_shown(served) == 1
        assert stub.Sample(WITH_LATENTS, timeout=30).latents.shape == [1, 4]
        # The poller does not retry a rejected version whose files did not change.
        time.sleep(5 * POLL)
        assert metric(served, "vae_model_reloads_total", result="failure") == 1
        assert metric(served, "vae_model_reloads_total", result="success") == 0

        # Repaired in place (a fresh copy of a good version): picked up by the next poll.
        shutil.rmtree(repo / MODEL / "2")
        stage(repo, 2, lambda directory, manifest: None)
        wait_until(lambda: model_info(channel).version == 2, "the repaired version to go live")
        assert metric(served, "vae_model_reloads_total", result="success") == 1


@pytest.fixture
def process(repo: Path) -> Iterator[ServerProcess]:
    server = ServerProcess.start(repo, MODEL, "--inference-workers=1", "--grace-period=5")
    try:
        yield server.wait_serving()
    finally:
        server.stop()


def test_sighup_reloads_a_running_vae_serve_under_load_without_failing_a_call(
    process: ServerProcess, repo: Path
) -> None:
    results: list[tuple[grpc.StatusCode, int]] = []  # (status, latent size of the reply)
    stop = threading.Event()

    def caller(channel: grpc.Channel) -> None:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        request = vae_pb2.SampleRequest(count=16, return_latents=True)
        deadline = time.monotonic() + 120  # bounded, whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            future = stub.Sample.future(request, timeout=30)
            code = code_of(future)
            results.append((code, future.result().latents.shape[1] if code.name == "OK" else 0))
            time.sleep(0.005)

    with open_channel(process.target) as channel:
        callers = [threading.Thread(target=caller, args=(channel,)) for _ in range(2)]
        for thread in callers:
            thread.start()
        try:
            wait_until(lambda: len(results) >= 20, "load on version 1")
            export_latent_3(repo)
            process.send(signal.SIGHUP)
            process.wait_log("now serving tiny-vae version 2 (was version 1)")
            count = len(results)
            wait_until(lambda: len(results) >= count + 20, "load on version 2")
        finally:
            stop.set()
            for thread in callers:
                thread.join(60)
        assert model_info(channel).version == 2

    assert process.metric("vae_model_info", version="2") == 1
    assert process.metric("vae_model_reloads_total", result="success") == 1
    assert "reload requested (SIGHUP)" in process.output()
    codes = {code.name for code, _ in results}
    assert codes == {"OK"}, f"{len(results)} calls: {codes}"
    sizes = [size for _, size in results]
    assert sizes[0] == 4 and sizes[-1] == 3, "the load did not span the swap"
    assert process.stop() == 0
