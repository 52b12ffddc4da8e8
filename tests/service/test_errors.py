"""Every bad input is INVALID_ARGUMENT naming the field and what was expected, and the server
keeps serving; unexpected errors are INTERNAL with a generic message; not ready is UNAVAILABLE."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from service_harness import BackgroundLoop, open_channel, tiny_settings

from service.health import HealthServicer
from service.interceptors import INTERNAL_MESSAGE, ServiceInterceptor
from service.metrics import Metrics
from service.model.runtime import ModelInfo
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.server import create_server
from service.servicer import VaeServicer, pinned
from vae_client.client import to_tensor

Stub = vae_pb2_grpc.VaeServiceStub
F32, U8 = vae_pb2.DATA_TYPE_FLOAT32, vae_pb2.DATA_TYPE_UINT8


def tensor(shape: list[int], dtype: Any = F32, data: bytes | None = None) -> vae_pb2.Tensor:
    if data is None:
        size = int(np.prod(shape)) * (4 if dtype == F32 else 1)
        data = bytes(size)
    return vae_pb2.Tensor(shape=shape, dtype=dtype, data=data)


def floats(values: list[list[float]]) -> vae_pb2.Tensor:
    return to_tensor(np.array(values, dtype=np.float32))


def png(width: int = 28, height: int = 28, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format=image_format)
    return buffer.getvalue()


def noisy_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def images(t: vae_pb2.Tensor) -> vae_pb2.ImageInput:
    return vae_pb2.ImageInput(tensor=t)


def pngs(*files: bytes) -> vae_pb2.ImageInput:
    return vae_pb2.ImageInput(png=vae_pb2.PngImages(images=list(files)))


def decode(latents: vae_pb2.Tensor, **fields: Any) -> tuple[str, vae_pb2.DecodeRequest]:
    return "Decode", vae_pb2.DecodeRequest(latents=latents, **fields)


def encode(image_input: vae_pb2.ImageInput, **fields: Any) -> tuple[str, vae_pb2.EncodeRequest]:
    return "Encode", vae_pb2.EncodeRequest(images=image_input, **fields)


def sample(**fields: Any) -> tuple[str, vae_pb2.SampleRequest]:
    return "Sample", vae_pb2.SampleRequest(**{"count": 1, **fields})


NAN, INF = float("nan"), float("inf")
TWO_IMAGES = np.full((2, 784), 0.5, np.float32)

# (request, field named first in the message, words the message must contain)
BAD_INPUTS = {
    "wrong latent size": (decode(tensor([2, 3])), "latents.shape", "expected [N, 4]"),
    "latents not a matrix": (decode(tensor([2, 4, 1])), "latents.shape", "expected [N, 4]"),
    "latents without shape": (decode(tensor([])), "latents.shape", "expected [N, ...]"),
    "negative dimension": (decode(tensor([2, -4], data=b"")), "latents.shape", "non-negative"),
    "latent bytes short": (
        decode(tensor([2, 4], data=bytes(31))),
        "latents.data",
        "expected 32 bytes",
    ),
    "latent bytes long": (decode(tensor([1, 4], data=bytes(20))), "latents.data", "got 20"),
    "latents uint8": (decode(tensor([1, 4], U8)), "latents.dtype", "DATA_TYPE_FLOAT32"),
    "latents dtype unset": (decode(tensor([1, 4], 0)), "latents.dtype", "DATA_TYPE_FLOAT32"),
    "latents dtype unknown": (decode(tensor([1, 4], 9)), "latents.dtype", "unknown value 9"),
    "latent NaN": (decode(floats([[0, 0, 0, 0], [0, NAN, 0, 0]])), "latents.data", "[1, 1]"),
    "latent infinity": (decode(floats([[0, 0, -INF, 0]])), "latents.data", "finite"),
    "empty latent batch": (decode(tensor([0, 4])), "latents.shape", "empty batch"),
    "latent batch over limit": (decode(tensor([4097, 4])), "latents.shape", "limit of 4096"),
    "decode format unknown": (decode(tensor([1, 4]), format=9), "format", "unknown image format"),
    "count zero": (sample(count=0), "count", "expected 1 to 4096, got 0"),
    "count negative": (sample(count=-3), "count", "got -3"),
    "count over limit": (sample(count=4097), "count", "expected 1 to 4096"),
    "temperature zero": (sample(temperature=0.0), "temperature", "> 0"),
    "temperature negative": (sample(temperature=-1.0), "temperature", "> 0"),
    "temperature NaN": (sample(temperature=NAN), "temperature", "finite"),
    "temperature infinite": (sample(temperature=INF), "temperature", "finite"),
    "sample format unknown": (sample(format=5), "format", "IMAGE_FORMAT_PNG"),
    "no images": (encode(vae_pb2.ImageInput()), "images", "tensor or as png"),
    "image size wrong": (encode(images(tensor([2, 783]))), "images.tensor.shape", "[N, 784]"),
    "image side wrong": (encode(images(tensor([2, 28, 27]))), "images.tensor.shape", "28, 28"),
    "image bytes wrong": (
        encode(images(tensor([1, 784], data=bytes(784)))),
        "images.tensor.data",
        "expected 3136 bytes",
    ),
    "image above 1": (encode(images(floats([[1.5] * 784]))), "images.tensor.data", "[0, 1]"),
    "image below 0": (encode(images(floats([[-0.1] * 784]))), "images.tensor.data", "[0, 1]"),
    "image NaN": (encode(images(floats([[NAN] * 784]))), "images.tensor.data", "finite"),
    "image dtype unset": (encode(images(tensor([1, 784], 0))), "images.tensor.dtype", "UINT8"),
    "empty image batch": (encode(images(tensor([0, 784]))), "images.tensor.shape", "empty batch"),
    "image batch over limit": (
        encode(images(tensor([4097, 784], U8))),
        "images.tensor.shape",
        "limit of 4096",
    ),
    "empty png batch": (encode(pngs()), "images.png.images", "empty batch"),
    "png undecodable": (encode(pngs(png(), b"not a png")), "images.png.images[1]", "decodable"),
    "png truncated": (encode(pngs(noisy_png()[:400])), "images.png.images[0]", "decodable"),
    "png wrong size": (encode(pngs(png(27, 28))), "images.png.images[0]", "got 27x28"),
    "not a png": (encode(pngs(png(image_format="BMP"))), "images.png.images[0]", "got BMP"),
    "samples negative": (
        encode(images(to_tensor(TWO_IMAGES)), samples_per_image=-1),
        "samples_per_image",
        "0 or more",
    ),
    "samples over limit": (
        encode(images(to_tensor(TWO_IMAGES)), samples_per_image=2049),
        "samples_per_image",
        "2 * 2049",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_invalid_argument_naming_the_field(
    stub: Stub, case: tuple[tuple[str, Any], str, str]
) -> None:
    (method, request), field, expected = case
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=10)
    error: Any = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: ")
    assert expected in error.details()
    assert "Traceback" not in error.details()
    # ... and the server keeps serving
    assert stub.Sample(vae_pb2.SampleRequest(count=1), timeout=10).images.tensor.data


class BrokenModel:
    """A model whose every call fails in a way nobody planned for."""

    info = ModelInfo("broken", 1, 4, (28, 28), ("CPUExecutionProvider",))

    async def encode(
        self, images: np.ndarray, *, deadline: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("secret: /srv/models/encoder.onnx exploded")

    async def decode(self, latents: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        raise RuntimeError("secret: /srv/models/decoder.onnx exploded")

    async def decode_uint8(
        self, latents: np.ndarray, *, deadline: float | None = None
    ) -> np.ndarray:
        raise RuntimeError("secret: /srv/models/decoder.onnx exploded")

    async def decode_logits(
        self, latents: np.ndarray, *, deadline: float | None = None
    ) -> np.ndarray:
        raise RuntimeError("secret: /srv/models/decoder.onnx exploded")

    async def offload(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


@pytest.fixture
def bare_server(tiny_model: Path) -> Iterator[tuple[Stub, Metrics, asyncio.Event]]:
    """create_server alone, around the broken model, with the readiness gate in our hands."""
    background = BackgroundLoop()
    metrics = Metrics()

    async def start() -> tuple[grpc.aio.Server, int, asyncio.Event]:
        ready = asyncio.Event()
        servicer = VaeServicer(pinned(BrokenModel()), metrics, max_items=8)
        interceptor = ServiceInterceptor(metrics, ready)
        server, port = create_server(
            tiny_settings(tiny_model), servicer, HealthServicer(), interceptor
        )
        await server.start()
        return server, port, ready

    server, port, ready = background.run(start())
    try:
        with open_channel(f"127.0.0.1:{port}") as channel:
            yield vae_pb2_grpc.VaeServiceStub(channel), metrics, ready
    finally:
        background.run(server.stop(None))
        background.close()


def test_unexpected_error_is_internal_and_leaks_nothing(
    bare_server: tuple[Stub, Metrics, asyncio.Event], caplog: pytest.LogCaptureFixture
) -> None:
    stub, metrics, ready = bare_server
    ready.set()
    with (
        caplog.at_level(logging.ERROR, logger="service.interceptors"),
        pytest.raises(grpc.RpcError) as info,
    ):
        stub.Sample(vae_pb2.SampleRequest(count=2), timeout=10)
    error: Any = info.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == INTERNAL_MESSAGE
    assert "secret" not in error.details()
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "decoder.onnx exploded" in str(logged[0].exc_info[1])  # type: ignore[index]
    # bad input is still judged before the model is called
    with pytest.raises(grpc.RpcError) as info:
        stub.Sample(vae_pb2.SampleRequest(count=9), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    count = metrics.registry.get_sample_value
    assert count("vae_requests_total", {"method": "Sample", "code": "INTERNAL"}) == 1
    assert count("vae_requests_total", {"method": "Sample", "code": "INVALID_ARGUMENT"}) == 1


def test_calls_before_warm_up_are_unavailable(
    bare_server: tuple[Stub, Metrics, asyncio.Event],
) -> None:
    stub, metrics, _ready = bare_server
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=10)
    error: Any = info.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "warming up" in error.details()
    labels = {"method": "GetModelInfo", "code": "UNAVAILABLE"}
    assert metrics.registry.get_sample_value("vae_requests_total", labels) == 1
