"""A small Python client for VaeService, sync (`VaeClient`) and asyncio (`AsyncVaeClient`),
taking and returning numpy arrays.

Targets are gRPC names: `localhost:50051`, or `dns:///vae.default.svc:50051` for a Kubernetes
headless service, where the service config below spreads calls over every address the name
resolves to (round_robin; gRPC's default, pick_first, would pin one pod). Calls that fail with
UNAVAILABLE (a pod starting, draining or gone) are retried by gRPC itself, with backoff, per
the service config's retryPolicy; every call has a deadline. The policy also retries CANCELLED
coming from the server: gRPC core answers it to a call that reached a pod in the instant the pod
began to shut down, before the server had taken the call up (grpc/grpc#41785). Every VaeService
method is a pure function of its request, so a retry on another pod is always safe; a call the
client cancels or whose deadline passes is never retried.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
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
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
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


def tls_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a channel, from PEM files: `ca` verifies the server (the system roots if None);
    `cert` and `key`, the client's certificate for a server that asks for one (mutual TLS).
    The target's host name must be one the server's certificate names."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key: give both cert and key, or neither")
    root, chain, private = (p.read_bytes() if p is not None else None for p in (ca, cert, key))
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=private, certificate_chain=chain
    )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    latent_size: int
    image_shape: tuple[int, ...]
    providers: tuple[str, ...]
    metrics: dict[str, float]
    max_items_per_request: int
    precision: str


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
    latents: np.ndarray | None = None  # Sample and Interpolate with return_latents


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
        precision=reply.precision or "fp32",
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


# An Interpolate endpoint: PNG bytes or an image array ([28, 28] or [784], uint8 or float32 in
# [0, 1], optionally with a leading 1), encoded to its mean by the server; any other array is a
# latent ([latent] or [1, latent], float32).
EndpointLike = np.ndarray | bytes
PathName = Literal["linear", "spherical"]
PATHS: dict[str, vae_pb2.InterpolationPath.ValueType] = {
    "linear": vae_pb2.INTERPOLATION_PATH_LINEAR,
    "spherical": vae_pb2.INTERPOLATION_PATH_SPHERICAL,
}
IMAGE_SHAPES = ((28, 28), (784,), (1, 28, 28), (1, 784))


@dataclass(frozen=True)
class Scores:
    """Per image, in nats (float64 [N] each); `iw_nll` is None without importance samples."""

    negative_elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    iw_nll: np.ndarray | None
    samples: int  # draws per image behind the estimates
    seed: int

    @property
    def best(self) -> np.ndarray:
        """The tightest estimate of -log p(x) the reply has: iw_nll if present, else the
        negative ELBO."""
        return self.iw_nll if self.iw_nll is not None else self.negative_elbo


def bits_per_pixel(nats: np.ndarray | float, pixels: int = 784) -> np.ndarray:
    """nats per image -> bits per pixel (divide by pixels * ln 2)."""
    return np.asarray(nats, dtype=np.float64) / (pixels * math.log(2))


def endpoint(value: EndpointLike) -> vae_pb2.Endpoint:
    """PNG bytes or an image-shaped array -> an image endpoint; any other array -> a latent."""
    if isinstance(value, bytes):
        return vae_pb2.Endpoint(image=image_input([value]))
    array = np.asarray(value)
    if array.dtype == np.uint8 or array.shape in IMAGE_SHAPES:
        return vae_pb2.Endpoint(image=image_input(array.reshape(1, -1)))
    return vae_pb2.Endpoint(latent=to_tensor(array.astype(np.float32, copy=False)))


def interpolate_request(
    start: EndpointLike,
    end: EndpointLike,
    steps: int,
    path: str,
    image_format: str,
    seed: int | None,
    return_latents: bool,
) -> vae_pb2.InterpolateRequest:
    return vae_pb2.InterpolateRequest(
        start=endpoint(start),
        end=endpoint(end),
        steps=steps,
        path=PATHS[path],
        format=FORMATS[image_format],
        seed=seed,
        return_latents=return_latents,
    )


def interpolated_from(reply: vae_pb2.InterpolateResponse) -> Images:
    latents = from_tensor(reply.latents) if reply.HasField("latents") else None
    return Images(images_from(reply.images), reply.seed, latents)


def score_request(
    images: np.ndarray | list[bytes], importance_samples: int, seed: int | None
) -> vae_pb2.ScoreRequest:
    return vae_pb2.ScoreRequest(
        images=image_input(images), importance_samples=importance_samples, seed=seed
    )


def scores_from(reply: vae_pb2.ScoreResponse) -> Scores:
    def column(values: Any) -> np.ndarray:
        return np.array(values, dtype=np.float64)

    return Scores(
        negative_elbo=column(reply.negative_elbo),
        reconstruction=column(reply.reconstruction),
        kl=column(reply.kl),
        iw_nll=column(reply.iw_nll) if len(reply.iw_nll) else None,
        samples=reply.samples,
        seed=reply.seed,
    )


class VaeClient:
    """Blocking client. `with VaeClient("localhost:50051") as vae: vae.sample(16, seed=1)`.
    `credentials` (e.g. `tls_credentials(ca=Path("ca.pem"))`) makes the channel TLS; without
    them it is plaintext, for local development."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.timeout = timeout
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=channel_options())
        else:
            self.channel = grpc.secure_channel(target, credentials, options=channel_options())
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

    def interpolate(
        self,
        start: EndpointLike,
        end: EndpointLike,
        *,
        steps: int = 10,
        path: PathName = "linear",
        image_format: ImageFormatName = "uint8",
        seed: int | None = None,
        return_latents: bool = False,
    ) -> Images:
        """`steps` images from start to end, both included; each end PNG bytes, an image array
        or a latent (see `endpoint`)."""
        request = interpolate_request(start, end, steps, path, image_format, seed, return_latents)
        return interpolated_from(self.stub.Interpolate(request, timeout=self.timeout))

    def score(
        self,
        images: np.ndarray | list[bytes],
        *,
        importance_samples: int = 0,
        seed: int | None = None,
    ) -> Scores:
        """Negative ELBO (reconstruction + KL) per image, and the importance-weighted -log p(x)
        when importance_samples > 0; in nats."""
        request = score_request(images, importance_samples, seed)
        return scores_from(self.stub.Score(request, timeout=self.timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVaeClient:
    """asyncio client: `async with AsyncVaeClient(target) as vae: await vae.sample(16)`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.timeout = timeout
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=channel_options())
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=channel_options())
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

    async def interpolate(
        self,
        start: EndpointLike,
        end: EndpointLike,
        *,
        steps: int = 10,
        path: PathName = "linear",
        image_format: ImageFormatName = "uint8",
        seed: int | None = None,
        return_latents: bool = False,
    ) -> Images:
        request = interpolate_request(start, end, steps, path, image_format, seed, return_latents)
        return interpolated_from(await self.stub.Interpolate(request, timeout=self.timeout))

    async def score(
        self,
        images: np.ndarray | list[bytes],
        *,
        importance_samples: int = 0,
        seed: int | None = None,
    ) -> Scores:
        request = score_request(images, importance_samples, seed)
        return scores_from(await self.stub.Score(request, timeout=self.timeout))

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> AsyncVaeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
