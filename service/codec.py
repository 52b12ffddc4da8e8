"""vae.v1 requests -> numpy and numpy -> replies, with strict validation: every bad input
raises InvalidArgument naming the field and what was expected.

Each field's meaning is checked here (latents, counts, temperature, formats, interpolation
endpoints, score samples); the framing of every tensor is checked in `service.tensors`, images
and PNG files are read and written in `service.images`. The servicer converts through this one
module: the functions of those two that it calls are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np

from service.errors import InvalidArgument

# images_into, png_inline, tensor_into and tensor_out are re-exported for the servicer.
from service.images import ImageFormat, images_in, images_into, png_inline  # noqa: F401
from service.latent import Scores
from service.model.graphs import LATENT_LIMIT
from service.model.runtime import ModelInfo
from service.proto.vae.v1 import vae_pb2
from service.tensors import check_finite, tensor_array, tensor_into, tensor_out  # noqa: F401

# Sample's temperature scales N(0, I): at this bound a draw would have to lie 10 standard
# deviations out to leave the latent range the decoder is checked on (LATENT_LIMIT).
MAX_TEMPERATURE = LATENT_LIMIT / 10
FORMATS = frozenset(vae_pb2.ImageFormat.values())


# Requests -> numpy


def _check_latent_range(array: np.ndarray, field: str) -> None:
    """Finite and within +-LATENT_LIMIT (beyond it the decoder's float32 arithmetic is not
    checked, and at 3.4e38 it overflows to NaN)."""
    low, high = check_finite(array, field)
    if max(-low, high) > LATENT_LIMIT:
        where = np.argwhere(np.abs(array) > LATENT_LIMIT)[0].tolist()
        raise InvalidArgument(
            f"{field}.data",
            f"expected values in [-{LATENT_LIMIT:g}, {LATENT_LIMIT:g}], found "
            f"{array[tuple(where)]} at {where}",
        )


def latents_in(tensor: vae_pb2.Tensor, field: str, *, latent_size: int, limit: int) -> np.ndarray:
    """float32 [N, latent_size], finite, each value within +-LATENT_LIMIT."""
    array = tensor_array(tensor, field, limit=limit)
    if array.dtype != np.float32:
        raise InvalidArgument(
            f"{field}.dtype",
            f"expected DATA_TYPE_FLOAT32, got {vae_pb2.DataType.Name(tensor.dtype)}",
        )
    if array.ndim != 2 or array.shape[1] != latent_size:
        raise InvalidArgument(
            f"{field}.shape",
            f"expected [N, {latent_size}] (the latent size), got {list(array.shape)}",
        )
    _check_latent_range(array, field)
    return array


def count_in(count: int, field: str, *, limit: int) -> int:
    if not 1 <= count <= limit:
        raise InvalidArgument(field, f"expected 1 to {limit}, got {count}")
    return count


def samples_per_image_in(samples: int, n: int, field: str, *, limit: int) -> int:
    if samples < 0:
        raise InvalidArgument(field, f"expected 0 or more, got {samples}")
    if n * samples > limit:
        raise InvalidArgument(
            field,
            f"N * samples_per_image = {n} * {samples} is above the limit of {limit} per request",
        )
    return samples


def temperature_in(request: vae_pb2.SampleRequest, field: str) -> float:
    if not request.HasField("temperature"):
        return 1.0
    t = request.temperature
    if not (math.isfinite(t) and 0 < t <= MAX_TEMPERATURE):
        raise InvalidArgument(
            field, f"expected a finite number > 0 and at most {MAX_TEMPERATURE:g}, got {t:g}"
        )
    return t


def format_in(image_format: int, field: str) -> ImageFormat:
    if image_format not in FORMATS:
        names = ", ".join(vae_pb2.ImageFormat.Name(f) for f in sorted(FORMATS) if f)
        raise InvalidArgument(
            field, f"unknown image format {image_format}; expected one of {names}"
        )
    if image_format == vae_pb2.IMAGE_FORMAT_UNSPECIFIED:
        return vae_pb2.IMAGE_FORMAT_PROBABILITIES
    return cast(ImageFormat, image_format)


# numpy -> responses


def model_info_out(info: ModelInfo, max_items: int) -> vae_pb2.ModelInfo:
    return vae_pb2.ModelInfo(
        name=info.name,
        version=info.version,
        latent_size=info.latent_size,
        image_shape=info.image_shape,
        providers=info.providers,
        metrics=info.metrics,
        max_items_per_request=max_items,
        precision=info.precision,
    )


# Interpolate and Score


@dataclass(frozen=True)
class Endpoint:
    """One end of an interpolation: an image to encode ([1, pixels]) or a latent ([latent])."""

    array: np.ndarray
    is_image: bool


def endpoint_in(
    endpoint: vae_pb2.Endpoint, field: str, *, latent_size: int, limit: int
) -> Endpoint:
    kind = endpoint.WhichOneof("endpoint")
    if kind == "image":
        images = images_in(endpoint.image, f"{field}.image", limit=limit)
        if images.shape[0] != 1:
            raise InvalidArgument(
                f"{field}.image", f"expected exactly one image, got {images.shape[0]}"
            )
        return Endpoint(images, is_image=True)
    if kind == "latent":
        sub = f"{field}.latent"
        # The shape first: tensor_array's messages speak of batches, a latent is one vector.
        shape = list(endpoint.latent.shape)
        if shape not in ([latent_size], [1, latent_size]):
            raise InvalidArgument(
                f"{sub}.shape",
                f"expected [{latent_size}] or [1, {latent_size}] (the latent size), got {shape}",
            )
        array = tensor_array(endpoint.latent, sub, limit=latent_size)
        if array.dtype != np.float32:
            raise InvalidArgument(
                f"{sub}.dtype",
                f"expected DATA_TYPE_FLOAT32, got {vae_pb2.DataType.Name(endpoint.latent.dtype)}",
            )
        _check_latent_range(array, sub)
        return Endpoint(array.reshape(latent_size), is_image=False)
    raise InvalidArgument(field, "expected an image or a latent, got neither")


def steps_in(steps: int, field: str, *, limit: int) -> int:
    if not 2 <= steps <= limit:
        raise InvalidArgument(
            field, f"expected 2 to {limit} points (both endpoints included), got {steps}"
        )
    return steps


def spherical_in(path: int, field: str) -> bool:
    """True for INTERPOLATION_PATH_SPHERICAL, False for LINEAR (or unset)."""
    if path not in vae_pb2.InterpolationPath.values():
        raise InvalidArgument(
            field,
            f"unknown path {path}; expected INTERPOLATION_PATH_LINEAR or "
            "INTERPOLATION_PATH_SPHERICAL",
        )
    return path == vae_pb2.INTERPOLATION_PATH_SPHERICAL


def importance_samples_in(samples: int, n: int, field: str, *, limit: int) -> int:
    if samples < 0:
        raise InvalidArgument(field, f"expected 0 or more, got {samples}")
    if n * max(samples, 1) > limit:
        raise InvalidArgument(
            field,
            f"N * max(importance_samples, 1) = {n} * {max(samples, 1)} is above the limit of "
            f"{limit} per request",
        )
    return samples


def scores_out(scores: Scores, samples: int, seed: int) -> vae_pb2.ScoreResponse:
    return vae_pb2.ScoreResponse(
        negative_elbo=scores.negative_elbo.tolist(),
        reconstruction=scores.reconstruction.tolist(),
        kl=scores.kl.tolist(),
        iw_nll=scores.iw_nll.tolist() if scores.iw_nll is not None else [],
        samples=samples,
        seed=seed,
    )
