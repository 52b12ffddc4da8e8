"""A small Python client for VaeService, sync (`VaeClient`) and asyncio (`AsyncVaeClient`),
taking and returning numpy arrays.

Targets are gRPC names: `localhost:50051`, or `dns:///vae.default.svc:50051` for a Kubernetes
headless service, where the service config below spreads calls over every address the name
resolves to (round_robin; gRPC's default, pick_first, would pin one pod). Calls that fail with
UNAVAILABLE (a pod starting, draining or gone) are retried by gRPC itself, with backoff, per
the service config's retryPolicy; every call has a deadline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import numpy as np

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

ImageFormatName = Literal["probabilities", "uint8", "binary", "png"]
FORMATS: dict[str, vae_pb2.ImageFormat.ValueType] = {
    "probabilities": vae_pb2.IMAGE_FORMAT_PROBABILITIES,
    "uint8": vae_pb2.IMAGE_FORMAT_UINT8,
    "binary": vae_pb2.IMAGE_FORMAT_BINARY,
    "png": vae_pb2.IMAGE_FORMAT_PNG,
}
DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "vae.v1.VaeService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # gRPC retries only what it buffered (256 KiB by default): buffer whole requests.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    latent_size: int
    image_shape: tuple[int, ...]
    providers: tuple[str, ...]
    metrics: dict[str, float]
    max_items_per_request: int


@dataclass(frozen=True)
class Encoded:
    mean: np.ndarray  # float32 [N, latent]
    log_variance: np.ndarray  # float32 [N, latent]
    samples: np.ndarray | None  # float32 [N, samples_per_image, latent]
    seed: int


@dataclass(frozen=True)
class Images:
    images: np.ndarray | list[bytes]  # [N, 28, 28] (float32 or uint8), or PNG files
    seed: int
    latents: np.ndarray | None = None  # Sample with return_latents


def to_tensor(array: np.ndarray) -> vae_pb2.Tensor:
    if array.dtype == np.uint8:
        dtype, little = vae_pb2.DATA_TYPE_UINT8, array
    else:
        dtype, little = vae_pb2.DATA_TYPE_FLOAT32, array.astype("<f4", copy=False)
    return vae_pb2.Tensor(
        shape=array.shape, dtype=dtype, data=np.ascontiguousarray(little).tobytes()
    )


def from_tensor(tensor: vae_pb2.Tensor) -> np.ndarray:
    dtype = np.uint8 if tensor.dtype == vae_pb2.DATA_TYPE_UINT8 else np.dtype("<f4")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def image_input(images: np.ndarray | list[bytes]) -> vae_pb2.ImageInput:
    """uint8 or float32 [N, 784] / [N, 28, 28] arrays, or a list of PNG files."""
    if isinstance(images, list):
        return vae_pb2.ImageInput(png=vae_pb2.PngImages(images=images))
    return vae_pb2.ImageInput(tensor=to_tensor(np.asarray(images)))


def images_from(output: vae_pb2.ImageOutput) -> np.ndarray | list[bytes]:
    if output.format == vae_pb2.IMAGE_FORMAT_PNG:
        return list(output.png)
    return from_tensor(output.tensor)


def info_from(reply: vae_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=reply.name,
        version=reply.version,
        latent_size=reply.latent_size,
        image_shape=tuple(reply.image_shape),
        providers=tuple(reply.providers),
        metrics=dict(reply.metrics),
        max_items_per_request=reply.max_items_per_request,
    )


def encoded_from(reply: vae_pb2.EncodeResponse) -> Encoded:
    samples = from_tensor(reply.samples) if reply.HasField("samples") else None
    return Encoded(from_tensor(reply.mean), from_tensor(reply.log_variance), samples, reply.seed)


def sample_request(
    count: int, seed: int | None, temperature: float | None, image_format: str, return_latents: bool
) -> vae_pb2.SampleRequest:
    return vae_pb2.SampleRequest(
        count=count,
        seed=seed,
        temperature=temperature,
        format=FORMATS[image_format],
        return_latents=return_latents,
    )


def encode_request(
    images: np.ndarray | list[bytes], samples_per_image: int, seed: int | None
) -> vae_pb2.EncodeRequest:
    return vae_pb2.EncodeRequest(
        images=image_input(images), samples_per_image=samples_per_image, seed=seed
    )


def decode_request(
    latents: np.ndarray, image_format: str, seed: int | None
) -> vae_pb2.DecodeRequest:
    return vae_pb2.DecodeRequest(
        latents=to_tensor(np.asarray(latents, dtype=np.float32)),
        format=FORMATS[image_format],
        seed=seed,
    )


def decoded_from(reply: vae_pb2.DecodeResponse) -> Images:
    return Images(images_from(reply.images), reply.seed)


def sampled_from(reply: vae_pb2.SampleResponse) -> Images:
    latents = from_tensor(reply.latents) if reply.HasField("latents") else None
    return Images(images_from(reply.images), reply.seed, latents)


class VaeClient:
    """Blocking client. `with VaeClient("localhost:50051") as vae: vae.sample(16, seed=1)`."""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target, options=channel_options())
        self.stub = vae_pb2_grpc.VaeServiceStub(self.channel)

    def info(self) -> ModelInfo:
        return info_from(
            self.stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=self.timeout)
        )

    def sample(
        self,
        count: int,
        *,
        seed: int | None = None,
        temperature: float | None = None,
        image_format: ImageFormatName = "uint8",
        return_latents: bool = False,
    ) -> Images:
        request = sample_request(count, seed, temperature, image_format, return_latents)
        return sampled_from(self.stub.Sample(request, timeout=self.timeout))

    def encode(
        self,
        images: np.ndarray | list[bytes],
        *,
        samples_per_image: int = 0,
        seed: int | None = None,
    ) -> Encoded:
        request = encode_request(images, samples_per_image, seed)
        return encoded_from(self.stub.Encode(request, timeout=self.timeout))

    def decode(
        self,
        latents: np.ndarray,
        *,
        image_format: ImageFormatName = "uint8",
        seed: int | None = None,
    ) -> Images:
        request = decode_request(latents, image_format, seed)
        return decoded_from(self.stub.Decode(request, timeout=self.timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVaeClient:
    """asyncio client: `async with AsyncVaeClient(target) as vae: await vae.sample(16)`."""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(target, options=channel_options())
        self.stub = vae_pb2_grpc.VaeServiceStub(self.channel)

    async def info(self) -> ModelInfo:
        reply = await self.stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=self.timeout)
        return info_from(reply)

    async def sample(
        self,
        count: int,
        *,
        seed: int | None = None,
        temperature: float | None = None,
        image_format: ImageFormatName = "uint8",
        return_latents: bool = False,
    ) -> Images:
        request = sample_request(count, seed, temperature, image_format, return_latents)
        return sampled_from(await self.stub.Sample(request, timeout=self.timeout))

    async def encode(
        self,
        images: np.ndarray | list[bytes],
        *,
        samples_per_image: int = 0,
        seed: int | None = None,
    ) -> Encoded:
        request = encode_request(images, samples_per_image, seed)
        return encoded_from(await self.stub.Encode(request, timeout=self.timeout))

    async def decode(
        self,
        latents: np.ndarray,
        *,
        image_format: ImageFormatName = "uint8",
        seed: int | None = None,
    ) -> Images:
        request = decode_request(latents, image_format, seed)
        return decoded_from(await self.stub.Decode(request, timeout=self.timeout))

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> AsyncVaeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
