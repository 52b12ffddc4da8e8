"""The transport floor: a VaeService that answers without inference.

Sample, Decode and Encode parse their request like the real service and answer with a reply of
the same size as the real one (zeros; PNG images of incompressible noise, about as large as real
digit PNGs), built once per shape and cached; GetModelInfo answers a fixed latent size. What a
load test measures against it is gRPC's own cost, the ceiling the real service can approach.

    python -m bench.noop_server --port 50052 [--latent-size 32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
from collections.abc import Hashable

import grpc
import numpy as np
from google.protobuf.message import Message
from PIL import Image

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from service.settings import IMAGE_SHAPE
from vae_client.client import MAX_MESSAGE_BYTES

# A seed of typical varint size: the real service returns a random 64-bit one.
SEED = 0x9E3779B97F4A7C15

logger = logging.getLogger("bench.noop_server")


def _tensor(shape: tuple[int, ...], dtype: vae_pb2.DataType.ValueType) -> vae_pb2.Tensor:
    itemsize = 4 if dtype == vae_pb2.DATA_TYPE_FLOAT32 else 1
    return vae_pb2.Tensor(shape=shape, dtype=dtype, data=bytes(int(np.prod(shape)) * itemsize))


def _noise_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


class NoopVaeService(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, latent_size: int = 32) -> None:
        self.latent_size = latent_size
        self._replies: dict[Hashable, Message] = {}
        self._png = _noise_png()

    def _images(self, n: int, image_format: vae_pb2.ImageFormat.ValueType) -> vae_pb2.ImageOutput:
        image_format = image_format or vae_pb2.IMAGE_FORMAT_PROBABILITIES
        if image_format == vae_pb2.IMAGE_FORMAT_PNG:
            return vae_pb2.ImageOutput(format=image_format, png=[self._png] * n)
        dtype = (
            vae_pb2.DATA_TYPE_FLOAT32
            if image_format == vae_pb2.IMAGE_FORMAT_PROBABILITIES
            else vae_pb2.DATA_TYPE_UINT8
        )
        return vae_pb2.ImageOutput(format=image_format, tensor=_tensor((n, *IMAGE_SHAPE), dtype))

    def _latents(self, *shape: int) -> vae_pb2.Tensor:
        return _tensor((*shape, self.latent_size), vae_pb2.DATA_TYPE_FLOAT32)

    async def Sample(
        self, request: vae_pb2.SampleRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.SampleResponse:
        key = ("sample", request.count, request.format, request.return_latents)
        reply = self._replies.get(key)
        if reply is None:
            reply = vae_pb2.SampleResponse(images=self._images(request.count, request.format))
            if request.return_latents:
                reply.latents.CopyFrom(self._latents(request.count))
            reply.seed = SEED
            self._replies[key] = reply
        return reply  # type: ignore[return-value]

    async def Decode(
        self, request: vae_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.DecodeResponse:
        n = request.latents.shape[0] if request.latents.shape else 0
        key = ("decode", n, request.format)
        reply = self._replies.get(key)
        if reply is None:
            reply = vae_pb2.DecodeResponse(images=self._images(n, request.format), seed=SEED)
            self._replies[key] = reply
        return reply  # type: ignore[return-value]

    async def Encode(
        self, request: vae_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.EncodeResponse:
        images = request.images
        if images.HasField("png"):
            n = len(images.png.images)
        else:
            n = images.tensor.shape[0] if images.tensor.shape else 0
        samples = request.samples_per_image
        key = ("encode", n, samples)
        reply = self._replies.get(key)
        if reply is None:
            reply = vae_pb2.EncodeResponse(
                mean=self._latents(n), log_variance=self._latents(n), seed=SEED
            )
            if samples > 0:
                reply.samples.CopyFrom(self._latents(n, samples))
            self._replies[key] = reply
        return reply  # type: ignore[return-value]

    async def GetModelInfo(
        self, request: vae_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.ModelInfo:
        return vae_pb2.ModelInfo(
            name="noop",
            version=1,
            latent_size=self.latent_size,
            image_shape=IMAGE_SHAPE,
            providers=["none"],
            max_items_per_request=4096,
        )

    async def Interpolate(
        self, request: vae_pb2.InterpolateRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.InterpolateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the no-op server has no Interpolate")

    async def Score(
        self, request: vae_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> vae_pb2.ScoreResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the no-op server has no Score")


def create_server(address: str, latent_size: int = 32) -> tuple[grpc.aio.Server, int]:
    """A started-later server bound to `address` ("[::]:0" picks a port); returns the port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    vae_pb2_grpc.add_VaeServiceServicer_to_server(NoopVaeService(latent_size), server)
    port = server.add_insecure_port(address)
    return server, port


async def serve(host: str, port: int, latent_size: int) -> None:
    server, bound = create_server(f"{host}:{port}", latent_size)
    await server.start()
    print(f"noop server listening on port {bound}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="[::]")
    parser.add_argument("--port", type=int, default=50052, help="0 picks a free port")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="asyncio",
        help="event loop: match the service's (asyncio today), so the floor is a fair one",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    coroutine = serve(args.host, args.port, args.latent_size)
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(coroutine)
        else:
            asyncio.run(coroutine)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
