"""vae_client.client (sync and asyncio), its retry, deadline and load-balancing configuration, and
the vae-client command line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from service_harness import Served, running, scrape, tiny_settings

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client import cli, pictures
from vae_client.client import AsyncVaeClient, VaeClient


def test_sync_client_round_trip(served: Served) -> None:
    with VaeClient(served.target, timeout=10) as vae:
        info = vae.info()
        assert (info.name, info.latent_size, info.image_shape) == ("tiny-vae", 4, (28, 28))
        sampled = vae.sample(6, seed=3, image_format="probabilities", return_latents=True)
        assert sampled.seed == 3 and sampled.latents is not None
        assert isinstance(sampled.images, np.ndarray) and sampled.images.shape == (6, 28, 28)
        decoded = vae.decode(sampled.latents, image_format="probabilities")
        np.testing.assert_array_equal(decoded.images, sampled.images)
        grey = vae.sample(6, seed=3).images  # uint8 by default
        assert isinstance(grey, np.ndarray) and grey.dtype == np.uint8
        pngs = vae.sample(2, seed=3, image_format="png").images
        assert isinstance(pngs, list) and len(pngs) == 2
        from_array = vae.encode(grey, samples_per_image=3, seed=8)
        from_png = vae.encode(vae.sample(6, seed=3, image_format="png").images)
        np.testing.assert_allclose(from_array.mean, from_png.mean, atol=1e-6)
        assert from_array.samples is not None and from_array.samples.shape == (6, 3, 4)
        assert from_png.samples is None


def test_async_client_round_trip(served: Served) -> None:
    async def main() -> tuple[Any, ...]:
        async with AsyncVaeClient(served.target, timeout=10) as vae:
            info = await vae.info()
            many = await asyncio.gather(*(vae.sample(4, seed=s) for s in range(8)))
            encoded = await vae.encode(many[0].images)
            decoded = await vae.decode(encoded.mean, image_format="binary", seed=1)
            return info, many, decoded

    info, many, decoded = asyncio.run(main())
    assert info.version == 1
    assert [m.seed for m in many] == list(range(8))
    with VaeClient(served.target) as vae:  # the same seeds give the same images either way
        np.testing.assert_array_equal(vae.sample(4, seed=5).images, many[5].images)
    assert decoded.seed == 1 and set(np.unique(decoded.images)) <= {0, 1}


class Flaky(vae_pb2_grpc.VaeServiceServicer):
    """GetModelInfo fails with each of `failures` in turn, then succeeds; Sample is slow."""

    def __init__(self, failures: list[grpc.StatusCode]) -> None:
        self.failures = failures
        self.calls = 0

    def GetModelInfo(self, request: Any, context: Any) -> vae_pb2.ModelInfo:
        self.calls += 1
        if self.calls <= len(self.failures):
            context.abort(self.failures[self.calls - 1], "draining")
        return vae_pb2.ModelInfo(name="flaky", version=self.calls)

    def Decode(self, request: Any, context: Any) -> vae_pb2.DecodeResponse:
        self.calls += 1
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "latents: no")
        return vae_pb2.DecodeResponse()  # not reached: abort raises

    def Encode(self, request: Any, context: Any) -> vae_pb2.EncodeResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")
        return vae_pb2.EncodeResponse()

    def Sample(self, request: Any, context: Any) -> vae_pb2.SampleResponse:
        time.sleep(2)
        return vae_pb2.SampleResponse()

    def Interpolate(self, request: Any, context: Any) -> vae_pb2.InterpolateResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")
        return vae_pb2.InterpolateResponse()

    def Score(self, request: Any, context: Any) -> vae_pb2.ScoreResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")
        return vae_pb2.ScoreResponse()


@pytest.fixture
def flaky() -> Iterator[tuple[Flaky, str]]:
    servicer = Flaky(failures=[grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
    server = grpc.server(futures.ThreadPoolExecutor(4))
    vae_pb2_grpc.add_VaeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_client_retries_unavailable_and_cancelled_not_bad_input(flaky: tuple[Flaky, str]) -> None:
    servicer, target = flaky
    with VaeClient(target, timeout=10) as vae:
        assert vae.info().version == 3  # UNAVAILABLE, then CANCELLED, retried by gRPC itself
        servicer.calls = 0
        with pytest.raises(grpc.RpcError) as info:
            vae.decode(np.zeros((1, 4), np.float32))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert servicer.calls == 1


def test_client_deadline(flaky: tuple[Flaky, str]) -> None:
    _servicer, target = flaky
    with VaeClient(target, timeout=0.2) as vae, pytest.raises(grpc.RpcError) as info:
        vae.sample(1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]


def test_dns_target(served: Served) -> None:
    with VaeClient(f"dns:///localhost:{served.service.port}", timeout=10) as vae:
        assert vae.info().name == "tiny-vae"


def test_round_robin_spreads_calls_over_every_address(tiny_model: Path, served: Served) -> None:
    """What a headless service's many A records look like to the client: several addresses."""
    with running(tiny_settings(tiny_model)) as other:
        targets = (served, other)
        key = ("vae_requests_total", (("code", "OK"), ("method", "Sample")))

        def answered() -> list[float]:
            return [scrape(s.metrics_url).get(key, 0.0) for s in targets]

        addresses = ",".join(s.target for s in targets)
        with VaeClient(f"ipv4:{addresses}", timeout=10) as vae:
            # The first calls go to whichever connection is ready first; once both have
            # answered one, both are in the round_robin picker (pick_first, gRPC's default,
            # would never reach the second: this loop would end without it).
            before = answered()
            for _ in range(100):
                vae.sample(1, seed=0)
                if min(a - b for a, b in zip(answered(), before, strict=True)) > 0:
                    break
            before = answered()
            for _ in range(10):
                vae.sample(1, seed=0)
            after = answered()
    calls = [a - b for a, b in zip(after, before, strict=True)]
    assert calls == [5, 5]  # strict alternation, whatever the timing


def test_cli_sample_writes_a_png_grid(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "samples.png"
    code = cli.main(
        ["--target", served.target, "sample", "-n", "64", "--seed", "1", "--out", str(out)]
    )
    assert code == 0
    with Image.open(out) as grid:
        assert (grid.format, grid.mode, grid.size) == ("PNG", "L", (8 * 30 + 2, 8 * 30 + 2))
        pixels = np.asarray(grid)
    with VaeClient(served.target) as vae:
        first = vae.sample(64, seed=1).images
    np.testing.assert_array_equal(pixels[2:30, 2:30], first[0])  # tile 0, after the padding
    assert "64 images (seed 1)" in capsys.readouterr().out


def test_cli_encode_then_decode(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with VaeClient(served.target) as vae:
        files = vae.sample(2, seed=4, image_format="png").images
    paths = []
    for i, data in enumerate(files):
        paths.append(tmp_path / f"digit{i}.png")
        paths[-1].write_bytes(data)  # type: ignore[arg-type]
    latents = tmp_path / "latents.npy"
    target = ["--target", served.target]
    assert cli.main([*target, "encode", *map(str, paths), "--out", str(latents)]) == 0
    assert np.load(latents).shape == (2, 4)
    out = tmp_path / "decoded.png"
    assert cli.main([*target, "decode", str(latents), "--z", "0,0,0,0", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 30 + 2, 2 * 30 + 2)  # 3 tiles: a 2x2 grid
    assert cli.main([*target, "decode", "--z", "0,0,0,0"]) == 0  # ASCII preview
    printed = capsys.readouterr().out
    assert "digit0.png" in printed and "sigma" in printed and "decoded: 1 image (seed" in printed


def test_cli_reports_errors_readably(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", served.target, "sample", "-n", "0"]) == 1
    assert "INVALID_ARGUMENT: count: expected 1 to 4096, got 0" in capsys.readouterr().err


def test_vae_client_console_script(served: Served) -> None:
    script = Path(sys.executable).with_name("vae-client")
    done = subprocess.run(
        [str(script), "--target", served.target, "info"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "tiny-vae version 1" in done.stdout and "CPUExecutionProvider" in done.stdout


def test_cli_grid_shapes() -> None:
    images = np.full((5, 28, 28), 255, np.uint8)
    grid = pictures.tile(images, columns=2, gap=cli.GRID_PADDING, border=cli.GRID_PADDING)
    assert grid.shape == (3 * 30 + 2, 2 * 30 + 2)
    assert grid[:2].max() == 0 and grid[2:30, 2:30].min() == 255  # padding, then tile 0
    assert grid[62:90, 32:60].max() == 0  # the sixth cell stays empty
