"""Interpolate and Score through the real server: paths, formats, bad input, metrics and the
clients on the tiny model; attribute vectors and likelihood scores on the trained default one."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from default_model import default_dataset, default_version, serving_default
from PIL import Image
from service_harness import Served, scrape

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client import latent
from vae_client.client import AsyncVaeClient, VaeClient, endpoint, from_tensor, to_tensor
from vae_client.explore_attribute import move_along
from vae_client.explore_inputs import encode_means, score_all
from vae_client.gallery import letter
from vae_data.mnist import binarized_test_set

Stub = vae_pb2_grpc.VaeServiceStub
LINEAR, SPHERICAL = vae_pb2.INTERPOLATION_PATH_LINEAR, vae_pb2.INTERPOLATION_PATH_SPHERICAL
P, U8, BIN, PNG = (
    vae_pb2.IMAGE_FORMAT_PROBABILITIES,
    vae_pb2.IMAGE_FORMAT_UINT8,
    vae_pb2.IMAGE_FORMAT_BINARY,
    vae_pb2.IMAGE_FORMAT_PNG,
)


def blobs(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 28, 28]: a bright blob somewhere on each image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    cy, cx = rng.uniform(8, 20, (2, n, 1, 1))
    return np.rint(255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def latent_endpoint(values: Any) -> vae_pb2.Endpoint:
    return vae_pb2.Endpoint(latent=to_tensor(np.asarray(values, dtype=np.float32)))


def interpolate(stub: Stub, start: Any, end: Any, **fields: Any) -> vae_pb2.InterpolateResponse:
    request = vae_pb2.InterpolateRequest(start=endpoint(start), end=endpoint(end), **fields)
    return stub.Interpolate(request, timeout=30)


def code_and_details(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), str(error.details())


# Interpolate


@pytest.mark.parametrize("path", [LINEAR, SPHERICAL])
def test_interpolation_endpoints_decode_to_the_endpoints_images(
    served: Served, stub: Stub, path: int
) -> None:
    a, b = blobs(2, seed=1)
    with VaeClient(served.target) as vae:
        means = vae.encode(np.stack([a, b])).mean
        expected = vae.decode(means, image_format="probabilities").images
    # One endpoint as a uint8 tensor, the other as a PNG file: both are encoded to their mean.
    reply = interpolate(stub, a, png(b), steps=7, path=path, format=P, return_latents=True)
    images, latents = from_tensor(reply.images.tensor), from_tensor(reply.latents)
    assert images.shape == (7, 28, 28) and latents.shape == (7, 4)
    np.testing.assert_allclose(latents[[0, -1]], means, atol=1e-6)
    assert isinstance(expected, np.ndarray)
    np.testing.assert_allclose(images[[0, -1]], expected, atol=1e-5)
    assert np.abs(images[3] - images[0]).max() > 1e-3  # the middle is not an endpoint


def test_latent_endpoints_are_the_paths_ends_exactly(stub: Stub) -> None:
    start = np.array([[1.5, -0.5, 0.25, 2.0]], np.float32)
    end = np.array([-1.0, 0.5, 3.0, -0.75], np.float32)
    for path in (LINEAR, SPHERICAL):
        reply = interpolate(stub, start, end, steps=5, path=path, return_latents=True)
        latents = from_tensor(reply.latents)
        np.testing.assert_array_equal(latents[0], start[0])
        np.testing.assert_array_equal(latents[-1], end)
    linear = from_tensor(interpolate(stub, start, end, steps=5, return_latents=True).latents)
    np.testing.assert_allclose(linear[2], (start[0] + end) / 2, atol=1e-6)  # unset = linear


def test_slerp_keeps_the_norm_between_the_endpoints_norms(stub: Stub) -> None:
    rng = np.random.default_rng(0)
    pairs = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(5)]
    pairs.append(np.array([[1, 2, 3, 4], [-1.1, -2, -3, -4]], np.float32))  # nearly opposite
    for start, end in pairs:
        reply = interpolate(stub, start, end, steps=11, path=SPHERICAL, return_latents=True)
        norms = np.linalg.norm(from_tensor(reply.latents), axis=1)
        low, high = sorted(np.linalg.norm([start, end], axis=1))
        assert norms.min() >= low * (1 - 1e-5) and norms.max() <= high * (1 + 1e-5)
        assert np.all(np.diff(norms) * np.sign(norms[-1] - norms[0]) >= -1e-5)  # monotone
    start, end = pairs[-1]
    middle = from_tensor(interpolate(stub, start, end, steps=3, return_latents=True).latents)[1]
    assert np.linalg.norm(middle) < 0.1 * np.linalg.norm(start)  # linear cuts through the ball


@pytest.mark.parametrize(("image_format", "steps"), [(0, 2), (P, 3), (U8, 9), (BIN, 4), (PNG, 5)])
def test_interpolation_steps_and_formats(stub: Stub, image_format: int, steps: int) -> None:
    start, end = np.zeros(4, np.float32), np.ones(4, np.float32)
    reply = interpolate(stub, start, end, steps=steps, format=image_format, seed=5)
    assert reply.seed == 5 and not reply.HasField("latents")
    assert reply.images.format == (image_format or P)
    if image_format == PNG:
        assert len(reply.images.png) == steps
        with Image.open(io.BytesIO(reply.images.png[0])) as first:
            assert (first.format, first.mode, first.size) == ("PNG", "L", (28, 28))
        return
    images = from_tensor(reply.images.tensor)
    assert images.shape == (steps, 28, 28)
    assert images.dtype == (np.float32 if image_format in (0, P) else np.uint8)
    if image_format == BIN:
        assert set(np.unique(images)) <= {0, 1}
        again = interpolate(stub, start, end, steps=steps, format=image_format, seed=5)
        np.testing.assert_array_equal(from_tensor(again.images.tensor), images)


def images_of(array: np.ndarray) -> vae_pb2.ImageInput:
    return vae_pb2.ImageInput(tensor=to_tensor(array.astype(np.uint8)))


def image_input(n: int) -> vae_pb2.ImageInput:
    return images_of(blobs(n))


GOOD = latent_endpoint(np.zeros(4))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"start": None}, "start: expected an image or a latent, got neither"),
        ({"end": None}, "end: expected an image or a latent, got neither"),
        (
            {"start": vae_pb2.Endpoint(image=image_input(2)), "end": GOOD},
            "start.image: expected exactly one image, got 2",
        ),
        (
            {"start": GOOD, "end": vae_pb2.Endpoint(image=vae_pb2.ImageInput())},
            "end.image: expected images as a tensor or as png files, got neither",
        ),
        (
            {"start": GOOD, "end": vae_pb2.Endpoint(image=images_of(np.zeros((1, 27, 27))))},
            "end.image.tensor.shape: expected [N, 784] or [N, 28, 28], got [1, 27, 27]",
        ),
        (
            {"start": latent_endpoint(np.zeros(3)), "end": GOOD},
            "start.latent.shape: expected [4] or [1, 4] (the latent size), got [3]",
        ),
        (
            {"start": latent_endpoint(np.zeros(0)), "end": GOOD},
            "start.latent.shape: expected [4] or [1, 4] (the latent size), got [0]",
        ),
        (
            {"start": GOOD, "end": latent_endpoint(np.zeros((2, 4)))},
            "end.latent.shape: expected [4] or [1, 4] (the latent size), got [2, 4]",
        ),
        (
            {"start": GOOD, "end": latent_endpoint([0, np.nan, 0, 0])},
            "end.latent.data: expected finite values, found nan at [1]",
        ),
        (
            {"start": vae_pb2.Endpoint(latent=to_tensor(np.zeros(4, np.uint8))), "end": GOOD},
            "start.latent.dtype: expected DATA_TYPE_FLOAT32, got DATA_TYPE_UINT8",
        ),
        ({"steps": 0}, "steps: expected 2 to 4096 points (both endpoints included), got 0"),
        ({"steps": 1}, "steps: expected 2 to 4096 points (both endpoints included), got 1"),
        ({"steps": 4097}, "steps: expected 2 to 4096 points (both endpoints included), got 4097"),
        ({"path": 7}, "path: unknown path 7; expected INTERPOLATION_PATH_LINEAR or"),
        ({"format": 9}, "format: unknown image format 9"),
    ],
)
def test_bad_interpolations_are_invalid_argument(
    stub: Stub, fields: dict[str, Any], message: str
) -> None:
    request = vae_pb2.InterpolateRequest(**{"start": GOOD, "end": GOOD, "steps": 3, **fields})
    code, details = code_and_details(lambda: stub.Interpolate(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(message), details
    assert stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=10).latent_size == 4


# Score


def test_score_replies_per_image_and_reproduces_with_its_seed(stub: Stub) -> None:
    images = vae_pb2.ImageInput(png=vae_pb2.PngImages(images=[png(b) for b in blobs(3)]))
    plain = stub.Score(vae_pb2.ScoreRequest(images=images, seed=4), timeout=30)
    assert (plain.samples, plain.seed, len(plain.iw_nll)) == (1, 4, 0)
    weighted = stub.Score(
        vae_pb2.ScoreRequest(images=images, importance_samples=16, seed=4), timeout=30
    )
    again = stub.Score(
        vae_pb2.ScoreRequest(images=images, importance_samples=16, seed=4), timeout=30
    )
    assert weighted == again
    assert weighted.samples == 16
    for reply in (plain, weighted):
        elbo, rec, kl = (np.array(v) for v in (reply.negative_elbo, reply.reconstruction, reply.kl))
        assert elbo.shape == (3,) and np.all(np.isfinite(elbo)) and np.all(rec > 0)
        np.testing.assert_allclose(elbo, rec + kl, rtol=1e-9)
    assert np.all(np.array(weighted.iw_nll) <= np.array(weighted.negative_elbo))
    fresh = stub.Score(vae_pb2.ScoreRequest(images=images), timeout=30)
    assert fresh.seed != 0  # the server picked one and says which


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "images: expected images as a tensor or as png files, got neither"),
        (
            {"images": image_input(3), "importance_samples": -1},
            "importance_samples: expected 0 or more, got -1",
        ),
        (
            {"images": image_input(3), "importance_samples": 2000},
            "importance_samples: N * max(importance_samples, 1) = 3 * 2000 is above the limit",
        ),
        (
            {"images": vae_pb2.ImageInput(png=vae_pb2.PngImages(images=[b"not a png"]))},
            "images.png.images[0]: not a decodable PNG file",
        ),
        (
            {"images": vae_pb2.ImageInput(tensor=to_tensor(np.full((1, 784), 2, np.float32)))},
            "images.tensor.data: float32 images must lie in [0, 1]",
        ),
    ],
)
def test_bad_scores_are_invalid_argument(stub: Stub, fields: dict[str, Any], message: str) -> None:
    request = vae_pb2.ScoreRequest(**fields)
    code, details = code_and_details(lambda: stub.Score(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(message), details


# Metrics and clients


def test_interpolate_and_score_are_counted(served: Served, stub: Stub) -> None:
    before = scrape(served.metrics_url)
    a = blobs(1)[0]
    interpolate(stub, a, np.zeros(4, np.float32), steps=6)
    interpolate(stub, a, a, steps=3)
    with pytest.raises(grpc.RpcError):
        interpolate(stub, a, a, steps=1)
    stub.Score(vae_pb2.ScoreRequest(images=image_input(5), importance_samples=3), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Score(vae_pb2.ScoreRequest(images=image_input(5), importance_samples=-2))
    after = scrape(served.metrics_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests = "vae_requests_total"
    assert delta(requests, method="Interpolate", code="OK") == 2
    assert delta(requests, method="Interpolate", code="INVALID_ARGUMENT") == 1
    assert delta(requests, method="Score", code="OK") == 1
    assert delta(requests, method="Score", code="INVALID_ARGUMENT") == 1
    assert delta("vae_request_duration_seconds_count", method="Score") == 2
    assert delta("vae_images_generated_total") == 6 + 3
    assert delta("vae_images_encoded_total") == 1 + 2 + 5  # image endpoints, scored images
    assert delta("vae_batch_runs_total", queue="decoder_logits") >= 1  # Score's own queue


def test_clients_interpolate_and_score(served: Served) -> None:
    a, b = blobs(2, seed=3)
    with VaeClient(served.target, timeout=30) as vae:
        path = vae.interpolate(a, png(b), steps=4, path="spherical", return_latents=True)
        scores = vae.score(np.stack([a, b]), importance_samples=8, seed=2)
        plain = vae.score([png(a)], seed=2)
    assert isinstance(path.images, np.ndarray) and path.images.shape == (4, 28, 28)
    assert path.images.dtype == np.uint8 and path.latents is not None
    assert scores.iw_nll is not None and scores.samples == 8 and scores.seed == 2
    np.testing.assert_array_equal(scores.best, scores.iw_nll)
    assert plain.iw_nll is None and plain.best is plain.negative_elbo

    async def main() -> tuple[Any, Any]:
        async with AsyncVaeClient(served.target, timeout=30) as vae:
            return await asyncio.gather(
                vae.interpolate(a, png(b), steps=4, path="spherical", return_latents=True),
                vae.score(np.stack([a, b]), importance_samples=8, seed=2),
            )

    async_path, async_scores = asyncio.run(main())
    np.testing.assert_array_equal(async_path.images, path.images)
    np.testing.assert_array_equal(async_scores.negative_elbo, scores.negative_elbo)


# The trained default model


def test_attribute_vector_moves_the_encoders_mean_towards_group_a() -> None:
    version = default_version()
    data = default_dataset(version)
    thick, thin = latent.ink_groups(data.train.images, data.train.labels)
    test = data.test.images[:50]
    with serving_default(version) as served, VaeClient(served.target, timeout=60) as vae:
        group_a = encode_means(vae, data.train.images[thick])
        group_b = encode_means(vae, data.train.images[thin])
        vector = latent.attribute_vector(group_a, group_b)
        z = encode_means(vae, test)
        images, along = move_along(vae, z, vector, [0.0, 1.0])
        moved = encode_means(vae, images[:, 1].reshape(-1, 784))
        unmoved = encode_means(vae, images[:, 0].reshape(-1, 784))
    centre_a, centre_b = group_a.mean(axis=0), group_b.mean(axis=0)

    def towards_a(means: np.ndarray) -> np.ndarray:
        """How much nearer group A's centre than group B's (squared distances)."""
        return ((means - centre_b) ** 2).sum(axis=1) - ((means - centre_a) ** 2).sum(axis=1)

    # The encoder's mean of the decoded z + v is nearer A (relative to B) than that of the
    # decoded z for nearly every image, and the moved images' centre is nearer A's centre.
    assert np.mean(towards_a(moved) > towards_a(unmoved)) > 0.95
    distance = np.linalg.norm(moved.mean(axis=0) - centre_a)
    assert distance < np.linalg.norm(unmoved.mean(axis=0) - centre_a)
    assert np.mean(along[:, 1] > along[:, 0] + 0.5) > 0.9
    assert along[:, 1].mean() > 0.7  # most of the added vector survives decoding + encoding
    ink = images.reshape(len(test), 2, -1).astype(np.float64).sum(axis=2)
    assert np.mean(ink[:, 1] > ink[:, 0]) > 0.9  # and the strokes got thicker


def test_scores_rank_test_digits_below_noise_and_letters() -> None:
    version = default_version()
    data = default_dataset(version)
    digits = data.test.images[:200]
    noise = np.random.default_rng(0).integers(0, 256, (20, 784), dtype=np.uint8)
    letters = np.stack([letter(c).reshape(784) for c in "ABCDEFGHJKLMNPRSTUVWXYZ"])
    with serving_default(version) as served, VaeClient(served.target, timeout=60) as vae:
        groups = {"digits": digits, "noise": noise, "letters": letters}
        scores = {name: score_all(vae, x, 50, 0) for name, x in groups.items()}
    for s in scores.values():  # the IW estimate is at most the negative ELBO, image by image
        assert s.iw_nll is not None and np.all(s.iw_nll <= s.negative_elbo)
    typical = np.median(scores["digits"].best)
    assert scores["noise"].best.min() > scores["digits"].best.max()
    assert np.median(scores["letters"].best) > typical + 20
    assert np.mean(scores["letters"].best > typical) > 0.8


def test_scores_match_the_manifests_test_metrics() -> None:
    """Score on the binarized test digits agrees with the PyTorch evaluation in the manifest."""
    version = default_version()
    data = default_dataset(version)
    metrics = load_manifest_metrics(version)
    x = binarized_test_set(data)
    with serving_default(version) as served, VaeClient(served.target, timeout=60) as vae:
        s = score_all(vae, x, 50, 0)
    assert s.iw_nll is not None
    # The manifest: one draw per image (and the KL in closed form); here 50 per image.
    assert s.negative_elbo.mean() == pytest.approx(metrics["negative_elbo"], abs=1.5)
    # k=50 is a looser bound than the manifest's k=1000, never a tighter one (up to noise).
    assert metrics["iw_nll"] - 0.5 < s.iw_nll.mean() < metrics["iw_nll"] + 2.5
    assert s.iw_nll.mean() < s.negative_elbo.mean() - 2


def load_manifest_metrics(version: Path) -> dict[str, float]:
    return dict(json.loads((version / "manifest.json").read_text())["metrics"])
