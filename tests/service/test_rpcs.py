"""Every RPC and output format against the real in-process server, through real stubs."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import from_tensor, to_tensor

Stub = vae_pb2_grpc.VaeServiceStub
P, U8, BIN, PNG = (
    vae_pb2.IMAGE_FORMAT_PROBABILITIES,
    vae_pb2.IMAGE_FORMAT_UINT8,
    vae_pb2.IMAGE_FORMAT_BINARY,
    vae_pb2.IMAGE_FORMAT_PNG,
)


def digits(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 28, 28] blobs: not digits, but images with structure and every grey level."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    cy, cx = rng.uniform(8, 20, (2, n, 1, 1))
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
    return np.rint(255 * blob).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def sample(stub: Stub, **fields: Any) -> vae_pb2.SampleResponse:
    return stub.Sample(vae_pb2.SampleRequest(**fields), timeout=30)


def test_model_info(stub: Stub) -> None:
    info = stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=10)
    assert (info.name, info.version, info.latent_size) == ("tiny-vae", 1, 4)
    assert list(info.image_shape) == [28, 28]
    assert list(info.providers) == ["CPUExecutionProvider"]
    assert dict(info.metrics) == {"negative_elbo": pytest.approx(543.21)}
    assert info.max_items_per_request == 4096


@pytest.mark.parametrize("image_format", [0, P, U8, BIN])
def test_sample_tensor_formats(stub: Stub, image_format: int) -> None:
    reply = sample(stub, count=5, seed=7, format=image_format)
    assert reply.seed == 7
    assert reply.images.format == (image_format or P)  # UNSPECIFIED means probabilities
    images = from_tensor(reply.images.tensor)
    assert images.shape == (5, 28, 28)
    if image_format in (0, P):
        assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
    elif image_format == BIN:
        assert images.dtype == np.uint8 and set(np.unique(images)) <= {0, 1}
    else:
        assert images.dtype == np.uint8


def test_formats_agree(stub: Stub) -> None:
    """uint8 = round(255 p) (made in the decoder's graph: a level apart where ONNX Runtime's
    sigmoid and numpy's differ in the last bit, rare); PNG = the uint8 image; binary pixels
    are Bernoulli(p) draws."""
    p = from_tensor(sample(stub, count=3, seed=11, format=P).images.tensor)
    grey = from_tensor(sample(stub, count=3, seed=11, format=U8).images.tensor)
    difference = np.abs(grey - np.floor(p.astype(np.float64) * 255 + 0.5))
    assert grey.dtype == np.uint8 and difference.max() <= 1 and np.count_nonzero(difference) <= 1
    pngs = sample(stub, count=3, seed=11, format=PNG).images
    assert pngs.format == PNG and len(pngs.png) == 3
    for data, expected in zip(pngs.png, grey, strict=True):
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))
            np.testing.assert_array_equal(np.asarray(image), expected)


def test_binary_draws_follow_the_probabilities(stub: Stub) -> None:
    z = np.zeros((4096, 4), np.float32)  # one latent, 4096 independent draws of its image
    p = from_tensor(stub.Decode(vae_pb2.DecodeRequest(latents=to_tensor(z[:1]))).images.tensor)
    reply = stub.Decode(vae_pb2.DecodeRequest(latents=to_tensor(z), format=BIN, seed=3))
    frequency = from_tensor(reply.images.tensor).mean(axis=0)
    # binomial standard error at n=4096 is at most 0.0078: 5 of them
    assert np.abs(frequency - p[0]).max() < 0.04


def test_sample_seeds_reproduce(stub: Stub) -> None:
    for image_format in (P, BIN):
        a = sample(stub, count=8, seed=123, format=image_format, return_latents=True)
        b = sample(stub, count=8, seed=123, format=image_format, return_latents=True)
        assert a.images.tensor.data == b.images.tensor.data
        assert a.latents.data == b.latents.data
    other = sample(stub, count=8, seed=124, return_latents=True)
    assert other.latents.data != a.latents.data


def test_unseeded_sample_returns_a_seed_that_reproduces_it(stub: Stub) -> None:
    first = sample(stub, count=4, format=BIN, return_latents=True)
    second = sample(stub, count=4, format=BIN, return_latents=True)
    assert first.seed != second.seed
    again = sample(stub, count=4, format=BIN, return_latents=True, seed=first.seed)
    assert again.latents.data == first.latents.data
    assert again.images.tensor.data == first.images.tensor.data


def test_sample_prefix_and_temperature(stub: Stub) -> None:
    """z depends on the seed and the row only: the first rows of a larger request are the same
    images, and temperature scales z."""
    big = sample(stub, count=10, seed=5, return_latents=True)
    small = sample(stub, count=3, seed=5, return_latents=True)
    np.testing.assert_array_equal(from_tensor(big.latents)[:3], from_tensor(small.latents))
    np.testing.assert_array_equal(
        from_tensor(big.images.tensor)[:3], from_tensor(small.images.tensor)
    )
    cool = sample(stub, count=10, seed=5, temperature=0.5, return_latents=True)
    np.testing.assert_allclose(from_tensor(cool.latents), 0.5 * from_tensor(big.latents))
    assert list(big.latents.shape) == [10, 4]
    assert not sample(stub, count=2, seed=1).HasField("latents")


def test_decode_of_sampled_latents_gives_the_sampled_images(stub: Stub) -> None:
    s = sample(stub, count=6, seed=9, return_latents=True)
    d = stub.Decode(vae_pb2.DecodeRequest(latents=s.latents, format=P))
    assert d.images.tensor.data == s.images.tensor.data
    z = from_tensor(s.latents)
    one = stub.Decode(vae_pb2.DecodeRequest(latents=to_tensor(z[2:3])))
    np.testing.assert_array_equal(
        from_tensor(one.images.tensor)[0], from_tensor(d.images.tensor)[2]
    )


def test_decode_every_format(stub: Stub) -> None:
    z = to_tensor(np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32))
    for image_format in (P, U8, BIN):
        reply = stub.Decode(vae_pb2.DecodeRequest(latents=z, format=image_format, seed=2))
        assert reply.images.format == image_format and reply.seed == 2
        assert list(reply.images.tensor.shape) == [3, 28, 28]
    reply = stub.Decode(vae_pb2.DecodeRequest(latents=z, format=PNG))
    assert len(reply.images.png) == 3 and not reply.images.HasField("tensor")


def test_encode_every_input_form_agrees(stub: Stub) -> None:
    grey = digits(5)
    inputs = {
        "uint8 [N, 28, 28]": to_tensor(grey),
        "uint8 [N, 784]": to_tensor(grey.reshape(5, 784)),
        "float32 [N, 784]": to_tensor(grey.reshape(5, 784).astype(np.float32) / 255),
    }
    means = {}
    for name, tensor in inputs.items():
        reply = stub.Encode(vae_pb2.EncodeRequest(images=vae_pb2.ImageInput(tensor=tensor)))
        means[name] = from_tensor(reply.mean)
        assert means[name].shape == (5, 4) and from_tensor(reply.log_variance).shape == (5, 4)
        assert not reply.HasField("samples")
    request = vae_pb2.EncodeRequest(
        images=vae_pb2.ImageInput(png=vae_pb2.PngImages(images=[png(g) for g in grey]))
    )
    means["png"] = from_tensor(stub.Encode(request).mean)
    for name, mean in means.items():
        np.testing.assert_allclose(mean, means["uint8 [N, 28, 28]"], atol=1e-5, err_msg=name)


def test_encode_is_per_image(stub: Stub) -> None:
    """A row's result does not depend on the other rows of the batch."""
    grey = digits(6, seed=1)
    batch = stub.Encode(vae_pb2.EncodeRequest(images=vae_pb2.ImageInput(tensor=to_tensor(grey))))
    single = stub.Encode(
        vae_pb2.EncodeRequest(images=vae_pb2.ImageInput(tensor=to_tensor(grey[4:5])))
    )
    np.testing.assert_allclose(from_tensor(single.mean)[0], from_tensor(batch.mean)[4], atol=1e-6)


def test_encode_samples_are_seeded_reparameterized_draws(stub: Stub) -> None:
    images = vae_pb2.ImageInput(tensor=to_tensor(digits(2)))
    reply = stub.Encode(vae_pb2.EncodeRequest(images=images, samples_per_image=2000, seed=42))
    again = stub.Encode(vae_pb2.EncodeRequest(images=images, samples_per_image=2000, seed=42))
    assert reply.seed == 42 and reply.samples.data == again.samples.data
    samples = from_tensor(reply.samples)
    assert samples.shape == (2, 2000, 4)
    mean, sigma = from_tensor(reply.mean), np.exp(from_tensor(reply.log_variance) / 2)
    # standard error of a 2000-draw average is sigma / 44.7: allow 5 of them
    assert np.all(np.abs(samples.mean(axis=1) - mean) < 5 * sigma / np.sqrt(2000))
    np.testing.assert_allclose(samples.std(axis=1), sigma, rtol=0.1)


def test_largest_request_fits_the_message_limits(stub: Stub) -> None:
    """4096 float32 images each way (12.8 MB) are above gRPC's 4 MiB default."""
    reply = sample(stub, count=4096, seed=1, format=P, return_latents=True)
    assert len(reply.images.tensor.data) == 4096 * 784 * 4
    images = vae_pb2.ImageInput(tensor=reply.images.tensor)
    encoded = stub.Encode(vae_pb2.EncodeRequest(images=images), timeout=30)
    assert list(encoded.mean.shape) == [4096, 4]
