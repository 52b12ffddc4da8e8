"""A minimal grpc.aio client for the Open Inference Protocol (KServe V2), as Triton and MLServer
speak it: readiness, and one ModelInfer call with raw tensor bytes (the fast path, no per-element
protobuf fields). The stubs are the service's own (service/proto/inference/v2, `make proto`)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from bench/peers: make the checkout importable
    sys.path.insert(0, str(ROOT))

from service.proto.inference.v2 import grpc_predict_v2_pb2 as pb  # noqa: E402
from service.proto.inference.v2.grpc_predict_v2_pb2_grpc import (  # noqa: E402
    GRPCInferenceServiceStub as GRPCInferenceServiceStub,
)
from vae_client.client import MAX_MESSAGE_BYTES  # noqa: E402

if TYPE_CHECKING:  # the stubs' asyncio flavour exists in the .pyi only
    from service.proto.inference.v2.grpc_predict_v2_pb2_grpc import (
        GRPCInferenceServiceAsyncStub,
    )

IMAGE_SIZE = 784
ITEMSIZE = {"FP32": 4, "UINT8": 1}  # bytes per element of the outputs we ask for
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class InvalidResponse(Exception):
    """The server answered OK with a reply that does not hold the images asked for."""


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


async def wait_ready(stub: GRPCInferenceServiceAsyncStub, model: str, timeout: float) -> float:
    """Poll ServerReady then ModelReady until both say ready; return the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            server = await stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0)
            if server.ready:
                reply = await stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1.0)
                if reply.ready:
                    return time.monotonic() - start
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{model} not ready after {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def infer_once(
    stub: GRPCInferenceServiceAsyncStub,
    model: str,
    latents: np.ndarray,
    output_name: str,
    timeout: float = 30.0,
) -> int:
    """Decode `latents` [N, L] float32 on `model`; check the reply; return N (images)."""
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="latent", datatype="FP32", shape=latents.shape
            )
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=output_name)],
        raw_input_contents=[latents.tobytes()],
    )
    reply = await stub.ModelInfer(request, timeout=timeout)
    n = latents.shape[0]
    if len(reply.outputs) != 1 or len(reply.raw_output_contents) != 1:
        raise InvalidResponse(f"expected one raw output, got {len(reply.raw_output_contents)}")
    out = reply.outputs[0]
    expected = n * IMAGE_SIZE * ITEMSIZE.get(out.datatype, 0)
    if list(out.shape) != [n, IMAGE_SIZE] or len(reply.raw_output_contents[0]) != expected:
        raise InvalidResponse(
            f"expected {out.datatype} [{n}, {IMAGE_SIZE}] ({expected} bytes), got shape "
            f"{list(out.shape)} and {len(reply.raw_output_contents[0])} bytes"
        )
    return n
