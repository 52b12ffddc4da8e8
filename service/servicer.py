"""The VaeService RPCs: decode the request (codec), call the model, encode the response.

Each RPC leases the live model version once, at its top (`with self.lease() as model:`), and
runs on that version to its end, even if a hot reload swaps in another meanwhile.

No try/except here: the codec raises InvalidArgument, and the interceptor in `interceptors.py`
turns errors into status codes and counts every call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import ParamSpec, Protocol, TypeVar

import grpc
import numpy as np

from service import codec, latent
from service.images import INLINE_PNG_IMAGES
from service.methods import not_inference
from service.metrics import Metrics
from service.model.runtime import ModelInfo
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.sampling import pick_seed, posterior_samples, prior_latents

P = ParamSpec("P")
T = TypeVar("T")

# Conversions above these sizes run in the inference pool instead of on the event loop
# (PNG costs about 45 us an image, either way: `images.INLINE_PNG_IMAGES`; the tensor formats
# about 1 us a row).
INLINE_ROWS = 512


class Model(Protocol):
    """What a call needs of one model version (`service.model.served.ServedModel`). `deadline`
    is the call's, in `time.monotonic()` seconds: work not started by then is dropped."""

    info: ModelInfo

    async def encode(
        self, images: np.ndarray, *, deadline: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    async def decode(self, latents: np.ndarray, *, deadline: float | None = None) -> np.ndarray: ...

    async def decode_uint8(
        self, latents: np.ndarray, *, deadline: float | None = None
    ) -> np.ndarray: ...

    async def decode_logits(
        self, latents: np.ndarray, *, deadline: float | None = None
    ) -> np.ndarray: ...

    async def offload(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...


Lease = Callable[[], AbstractContextManager[Model]]
"""Leases the live model version for one call (`ModelHolder.lease`)."""


def pinned(model: Model) -> Lease:
    """A lease of one fixed model version: a servicer without hot reload (tests, benchmarks)."""
    return lambda: nullcontext(model)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline in `time.monotonic()` seconds, None if it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _seed(
    request: vae_pb2.EncodeRequest
    | vae_pb2.DecodeRequest
    | vae_pb2.SampleRequest
    | vae_pb2.InterpolateRequest
    | vae_pb2.ScoreRequest,
) -> int:
    return request.seed if request.HasField("seed") else pick_seed()


class VaeServicer(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, lease: Lease, metrics: Metrics, *, max_items: int) -> None:
        self.lease = lease
        self.metrics = metrics
        self.max_items = max_items

    async def _decode_into(
        self,
        model: Model,
        output: vae_pb2.ImageOutput,
        latents: np.ndarray,
        image_format: codec.ImageFormat,
        seed: int,
        deadline: float | None,
    ) -> None:
        """Decode the latents into `output`, a field of the reply, in the requested format:
        uint8 and PNG from the decoder's uint8 images, the others from its probabilities
        (large conversions off the event loop)."""
        png = image_format == vae_pb2.IMAGE_FORMAT_PNG
        if png or image_format == vae_pb2.IMAGE_FORMAT_UINT8:
            images = await model.decode_uint8(latents, deadline=deadline)
        else:
            images = await model.decode(latents, deadline=deadline)
        if images.shape[0] > (INLINE_PNG_IMAGES if png else INLINE_ROWS):
            await model.offload(codec.images_into, output, images, image_format, seed)
        else:
            codec.images_into(output, images, image_format, seed)

    async def _images_in(self, model: Model, images: vae_pb2.ImageInput) -> np.ndarray:
        """The request's images as float32 [N, 784] (many or large PNGs are decoded off the event
        loop)."""
        if not codec.png_inline(images):
            return await model.offload(codec.images_in, images, "images", limit=self.max_items)
        return codec.images_in(images, "images", limit=self.max_items)

    async def Encode(
        self, request: vae_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.EncodeResponse:
        with self.lease() as model:
            limit = self.max_items
            images = await self._images_in(model, request.images)
            n = images.shape[0]
            k = codec.samples_per_image_in(
                request.samples_per_image, n, "samples_per_image", limit=limit
            )
            seed = _seed(request)
            mean, log_variance = await model.encode(images, deadline=_deadline(context))
            self.metrics.images_encoded.inc(n)
            response = vae_pb2.EncodeResponse(seed=seed)  # filled in place: no message copies
            codec.tensor_into(response.mean, mean)
            codec.tensor_into(response.log_variance, log_variance)
            if k:
                codec.tensor_into(response.samples, posterior_samples(mean, log_variance, k, seed))
            return response

    async def Decode(
        self, request: vae_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.DecodeResponse:
        with self.lease() as model:
            latents = codec.latents_in(
                request.latents,
                "latents",
                latent_size=model.info.latent_size,
                limit=self.max_items,
            )
            image_format = codec.format_in(request.format, "format")
            seed = _seed(request)
            response = vae_pb2.DecodeResponse(seed=seed)
            deadline = _deadline(context)
            await self._decode_into(model, response.images, latents, image_format, seed, deadline)
            self.metrics.images_generated.inc(latents.shape[0])
            return response

    async def Sample(
        self, request: vae_pb2.SampleRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.SampleResponse:
        with self.lease() as model:
            count = codec.count_in(request.count, "count", limit=self.max_items)
            temperature = codec.temperature_in(request, "temperature")
            image_format = codec.format_in(request.format, "format")
            seed = _seed(request)
            latents = prior_latents(count, model.info.latent_size, seed, temperature)
            response = vae_pb2.SampleResponse(seed=seed)
            deadline = _deadline(context)
            await self._decode_into(model, response.images, latents, image_format, seed, deadline)
            if request.return_latents:
                codec.tensor_into(response.latents, latents)
            self.metrics.images_generated.inc(count)
            return response

    @not_inference
    async def GetModelInfo(
        self, request: vae_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.ModelInfo:
        with self.lease() as model:
            return codec.model_info_out(model.info, self.max_items)

    async def Interpolate(
        self, request: vae_pb2.InterpolateRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.InterpolateResponse:
        with self.lease() as model:
            size, limit = model.info.latent_size, self.max_items
            ends = [
                codec.endpoint_in(request.start, "start", latent_size=size, limit=limit),
                codec.endpoint_in(request.end, "end", latent_size=size, limit=limit),
            ]
            steps = codec.steps_in(request.steps, "steps", limit=limit)
            path = latent.slerp if codec.spherical_in(request.path, "path") else latent.lerp
            image_format = codec.format_in(request.format, "format")
            seed = _seed(request)
            deadline = _deadline(context)
            images = [end.array for end in ends if end.is_image]
            if images:  # both image endpoints go to the encoder in one call
                means = iter((await model.encode(np.concatenate(images), deadline=deadline))[0])
                self.metrics.images_encoded.inc(len(images))
            start, end = (next(means) if e.is_image else e.array for e in ends)
            latents = path(start, end, steps)
            output = vae_pb2.ImageOutput()
            await self._decode_into(model, output, latents, image_format, seed, deadline)
            self.metrics.images_generated.inc(steps)
            return vae_pb2.InterpolateResponse(
                images=output,
                latents=codec.tensor_out(latents) if request.return_latents else None,
                seed=seed,
            )

    async def Score(
        self, request: vae_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.ScoreResponse:
        with self.lease() as model:
            limit = self.max_items
            images = await self._images_in(model, request.images)
            n = images.shape[0]
            k = codec.importance_samples_in(
                request.importance_samples, n, "importance_samples", limit=limit
            )
            samples = max(k, 1)
            seed = _seed(request)
            deadline = _deadline(context)
            mean, log_variance = await model.encode(images, deadline=deadline)
            z = posterior_samples(mean, log_variance, samples, seed)  # Encode's draws, same seed
            logits = await model.decode_logits(z.reshape(n * samples, -1), deadline=deadline)
            args = (images, mean, log_variance, z, logits)
            if n * samples > INLINE_ROWS:
                scores = await model.offload(latent.score, *args, importance_weighted=k > 0)
            else:
                scores = latent.score(*args, importance_weighted=k > 0)
            self.metrics.images_encoded.inc(n)
            return codec.scores_out(scores, samples, seed)
