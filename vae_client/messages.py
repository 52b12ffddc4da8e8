"""The SDK's requests and replies: each method's request built from Python values, and each
reply read into a small dataclass of numpy arrays. Shared by the blocking and asyncio clients,
so the two send the same messages."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.proto.vae.v1 import vae_pb2
from vae_client.tensors import (
    FORMATS,
    PATHS,
    EndpointLike,
    endpoint,
    from_tensor,
    image_input,
    images_from,
    to_tensor,
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


# Requests


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


def score_request(
    images: np.ndarray | list[bytes], importance_samples: int, seed: int | None
) -> vae_pb2.ScoreRequest:
    return vae_pb2.ScoreRequest(
        images=image_input(images), importance_samples=importance_samples, seed=seed
    )


# Replies


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


def decoded_from(reply: vae_pb2.DecodeResponse) -> Images:
    return Images(images_from(reply.images), reply.seed)


def sampled_from(reply: vae_pb2.SampleResponse) -> Images:
    latents = from_tensor(reply.latents) if reply.HasField("latents") else None
    return Images(images_from(reply.images), reply.seed, latents)


def interpolated_from(reply: vae_pb2.InterpolateResponse) -> Images:
    latents = from_tensor(reply.latents) if reply.HasField("latents") else None
    return Images(images_from(reply.images), reply.seed, latents)


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
