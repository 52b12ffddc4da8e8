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

The requests and the reply types live in `vae_client.messages`, the array conversions in
`vae_client.tensors`; what SDK users need of them is importable from here too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.messages import (
    Encoded,
    Images,
    ModelInfo,
    Scores,
    decode_request,
    decoded_from,
    encode_request,
    encoded_from,
    info_from,
    interpolate_request,
    interpolated_from,
    sample_request,
    sampled_from,
    score_request,
    scores_from,
)
from vae_client.messages import bits_per_pixel as bits_per_pixel
from vae_client.tensors import FORMATS as FORMATS
from vae_client.tensors import EndpointLike, ImageFormatName, PathName
from vae_client.tensors import endpoint as endpoint
from vae_client.tensors import from_tensor as from_tensor
from vae_client.tensors import images_from as images_from
from vae_client.tensors import to_tensor as to_tensor

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
