"""The VaeService RPCs: decode the request (codec), call the model, encode the response.

No try/except here: the codec raises InvalidArgument, and the interceptor in `interceptors.py`
turns errors into status codes and counts every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

import grpc
import numpy as np

from service import codec
from service.metrics import Metrics
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.runtime import ModelInfo
from service.sampling import pick_seed, posterior_samples, prior_latents

P = ParamSpec("P")
T = TypeVar("T")

# Conversions above these sizes run in the inference pool instead of on the event loop
# (PNG costs about 45 us an image; the tensor formats about 1 us a row).
INLINE_PNG_IMAGES = 16
INLINE_ROWS = 512


class Model(Protocol):
    """What the servicer needs of the model: the Runtime, or a batcher in front of it."""

    info: ModelInfo

    async def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    async def decode(self, latents: np.ndarray) -> np.ndarray: ...

    async def offload(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...


def _seed(request: vae_pb2.EncodeRequest | vae_pb2.DecodeRequest | vae_pb2.SampleRequest) -> int:
    return request.seed if request.HasField("seed") else pick_seed()


class VaeServicer(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, model: Model, metrics: Metrics, *, max_items: int) -> None:
        self.model = model
        self.metrics = metrics
        self.max_items = max_items

    async def _images_out(
        self, probabilities: np.ndarray, image_format: codec.ImageFormat, seed: int
    ) -> vae_pb2.ImageOutput:
        n = probabilities.shape[0]
        png = image_format == vae_pb2.IMAGE_FORMAT_PNG
        if n > (INLINE_PNG_IMAGES if png else INLINE_ROWS):
            return await self.model.offload(codec.images_out, probabilities, image_format, seed)
        return codec.images_out(probabilities, image_format, seed)

    async def Encode(
        self, request: vae_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.EncodeResponse:
        limit = self.max_items
        if codec.png_count(request.images) > INLINE_PNG_IMAGES:
            images = await self.model.offload(
                codec.images_in, request.images, "images", limit=limit
            )
        else:
            images = codec.images_in(request.images, "images", limit=limit)
        n = images.shape[0]
        k = codec.samples_per_image_in(
            request.samples_per_image, n, "samples_per_image", limit=limit
        )
        seed = _seed(request)
        mean, log_variance = await self.model.encode(images)
        self.metrics.images_encoded.inc(n)
        return vae_pb2.EncodeResponse(
            mean=codec.tensor_out(mean),
            log_variance=codec.tensor_out(log_variance),
            samples=codec.tensor_out(posterior_samples(mean, log_variance, k, seed)) if k else None,
            seed=seed,
        )

    async def Decode(
        self, request: vae_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.DecodeResponse:
        latents = codec.latents_in(
            request.latents,
            "latents",
            latent_size=self.model.info.latent_size,
            limit=self.max_items,
        )
        image_format = codec.format_in(request.format, "format")
        seed = _seed(request)
        probabilities = await self.model.decode(latents)
        images = await self._images_out(probabilities, image_format, seed)
        self.metrics.images_generated.inc(latents.shape[0])
        return vae_pb2.DecodeResponse(images=images, seed=seed)

    async def Sample(
        self, request: vae_pb2.SampleRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.SampleResponse:
        count = codec.count_in(request.count, "count", limit=self.max_items)
        temperature = codec.temperature_in(request, "temperature")
        image_format = codec.format_in(request.format, "format")
        seed = _seed(request)
        latents = prior_latents(count, self.model.info.latent_size, seed, temperature)
        probabilities = await self.model.decode(latents)
        images = await self._images_out(probabilities, image_format, seed)
        self.metrics.images_generated.inc(count)
        return vae_pb2.SampleResponse(
            images=images,
            latents=codec.tensor_out(latents) if request.return_latents else None,
            seed=seed,
        )

    async def GetModelInfo(
        self, request: vae_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.ModelInfo:
        return codec.model_info_out(self.model.info, self.max_items)
