"""Two promises of the model reloads (deploy/README "Mounted model"): moving the highest version
out of the repository rolls back, as the next poll finds the previous one highest and swaps it
back; and SIGHUP with no new version reloads the same version, without failing a call.

Versions differ in latent size (1: the tiny model's 4, 2: 3), so a reply tells which computed it.
"""

from __future__ import annotations

import logging
import signal
import threading
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
from service_harness import open_channel, running, tiny_settings

from bench.servers import ServerProcess
from export.model import VAE, VAEConfig
from export.onnx_export import export_version
from service.proto.vae.v1 import vae_pb2_grpc


def test_moving_the_highest_version_out_swaps_the_previous_one_back(
    repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings(repo / MODEL / "1", reload_interval=POLL)
    with (
        caplog.at_level(logging.INFO, logger="service.model.holder"),
        running(settings) as served,
        open_channel(served.target) as channel,
    ):
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        torch.manual_seed(1)
        export_version(VAE(VAEConfig(latent_size=3, hidden_sizes=(16,))), repo, MODEL)
        wait_until(lambda: model_info(channel).version == 2, "version 2 to go live")
        assert stub.Sample(WITH_LATENTS, timeout=30).latents.shape == [1, 3]

        (repo / MODEL / "2").rename(tmp_path / "version-2-withdrawn")  # the rollback
        wait_until(lambda: model_info(channel).version == 1, "version 1 to be swapped back")
        info = model_info(channel)
        assert (info.version, info.latent_size) == (1, 4)
        assert stub.Sample(WITH_LATENTS, timeout=30).latents.shape == [1, 4]
        assert metric(served, "vae_model_reloads_total", result="success") == 2
        assert metric(served, "vae_model_reloads_total", result="failure") == 0
        shown = {"name": MODEL, "provider": "CPUExecutionProvider", "precision": "fp32"}
        assert metric(served, "vae_model_info", version="1", **shown) == 1
        assert metric(served, "vae_model_info", version="2", **shown) == 0
    assert any("now serving tiny-vae version 1 (was version 2)" in m for m in caplog.messages)


def test_sighup_on_the_same_version_reloads_it_without_failing_a_call(repo: Path) -> None:
    """What a baked-in model's pods do on SIGHUP: the one version there is verified, loaded,
    warmed and swapped in again, under load, and every call succeeds."""
    results: list[grpc.StatusCode] = []
    stop = threading.Event()

    def caller(channel: grpc.Channel) -> None:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        for _ in range(100_000):  # bounded, whatever happens
            if stop.is_set():
                return
            results.append(code_of(stub.Sample.future(WITH_LATENTS, timeout=30)))

    with ServerProcess.start(repo, MODEL, "--inference-workers=1", "--grace-period=5") as server:
        server.wait_serving()
        with open_channel(server.target) as channel:
            callers = [threading.Thread(target=caller, args=(channel,)) for _ in range(2)]
            for thread in callers:
                thread.start()
            try:
                wait_until(lambda: len(results) >= 20, "load on version 1")
                server.send(signal.SIGHUP)
                server.wait_log("now serving tiny-vae version 1 (was version 1)")
                count = len(results)
                wait_until(lambda: len(results) >= count + 20, "load after the reload")
            finally:
                stop.set()
                for thread in callers:
                    thread.join(60)
            info = model_info(channel)
        assert (info.version, info.latent_size) == (1, 4)
        assert server.metric("vae_model_reloads_total", result="success") == 1
        assert server.metric("vae_model_reloads_total", result="failure") == 0
        assert server.metric("vae_model_info", version="1") == 1
        assert "reload requested (SIGHUP)" in server.output()
        assert set(results) == {grpc.StatusCode.OK}, f"{len(results)} calls: {set(results)}"
        assert server.stop() == 0
