"""Results never depend on batching: many concurrent calls (held into shared runs, split, run
inline or on the workers) get the very bytes that one call at a time gets from a server with
batching off."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from service_harness import open_channel, running, scrape, tiny_settings

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import to_tensor

FORMATS = (
    vae_pb2.IMAGE_FORMAT_UINT8,
    vae_pb2.IMAGE_FORMAT_PROBABILITIES,
    vae_pb2.IMAGE_FORMAT_BINARY,
)
Request = vae_pb2.SampleRequest | vae_pb2.DecodeRequest


def requests() -> list[Request]:
    """Sample and Decode calls of 1 to 40 rows: below and above inline_max_rows (16) and the
    batch size (32)."""
    calls: list[Request] = []
    for i in range(96):
        count, image_format = (1, 1, 1, 3, 17, 40)[i % 6], FORMATS[i % 3]
        calls.append(vae_pb2.SampleRequest(count=count, seed=i, format=image_format))
        if i % 4 == 0:
            latents = np.random.default_rng(i).standard_normal((count, 4), dtype=np.float32)
            calls.append(
                vae_pb2.DecodeRequest(latents=to_tensor(latents), format=image_format, seed=i)
            )
    return calls


def rows(request: Request) -> int:
    return request.count if isinstance(request, vae_pb2.SampleRequest) else request.latents.shape[0]


def call(stub: vae_pb2_grpc.VaeServiceStub, request: Request) -> bytes:
    if isinstance(request, vae_pb2.SampleRequest):
        return bytes(stub.Sample(request, timeout=60).SerializeToString(deterministic=True))
    return bytes(stub.Decode(request, timeout=60).SerializeToString(deterministic=True))


def test_concurrent_batched_calls_equal_unbatched_ones(tiny_model: Path) -> None:
    calls = requests()
    unbatched = tiny_settings(tiny_model, batching=False)
    with running(unbatched) as served, open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        alone = [call(stub, r) for r in calls]

    with running(tiny_settings(tiny_model, max_batch_size=32)) as served:
        with open_channel(served.target) as channel, ThreadPoolExecutor(24) as callers:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            batched = list(callers.map(lambda r: call(stub, r), calls))
        generated = scrape(served.metrics_url)[("vae_images_generated_total", ())]

    assert batched == alone
    assert generated == sum(rows(r) for r in calls)
