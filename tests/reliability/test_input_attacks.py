"""Hostile and unusual inputs against the real server (issue 13, items 6, 11 and 12): PNG files
whose metadata would inflate to megabytes, 16-bit and transparent PNGs, and finite values so
large the network would overflow. Each is answered correctly or refused INVALID_ARGUMENT naming
the field and what was expected; never INTERNAL, never NaN with OK.

The conventions checked here are documented in proto/vae/v1/vae.proto (ImageInput) and the
README: 16-bit greyscale is read at 16 bits; transparency is composited onto black (MNIST's
background), so intensity = luminance x alpha.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from reliability_harness import refusal
from service_harness import open_channel, running, tiny_settings

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

LATENT = 4  # the tiny model's


@pytest.fixture(scope="module")
def stub(tiny_model: Path) -> Iterator[vae_pb2_grpc.VaeServiceStub]:
    with running(tiny_settings(tiny_model)) as served, open_channel(served.target) as channel:
        yield vae_pb2_grpc.VaeServiceStub(channel)


def png(image: Image.Image, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_chunks(file: bytes, chunks: list[bytes]) -> bytes:
    """`file` with `chunks` inserted right after its IHDR (signature 8 + IHDR 25 bytes)."""
    return file[:33] + b"".join(chunks) + file[33:]


def stroke_mask() -> np.ndarray:
    """A 28x28 bool image: a thick vertical bar and a crossbar, something like a 7."""
    mask = np.zeros((28, 28), bool)
    mask[5:8, 6:22] = True
    mask[5:24, 18:22] = True
    return mask


def encode_png(stub: vae_pb2_grpc.VaeServiceStub, files: list[bytes]) -> np.ndarray:
    request = vae_pb2.EncodeRequest(images=vae_pb2.ImageInput(png=vae_pb2.PngImages(images=files)))
    reply = stub.Encode(request, timeout=30)
    return np.frombuffer(reply.mean.data, "<f4").reshape(len(files), LATENT)


def encode_intensities(stub: vae_pb2_grpc.VaeServiceStub, x: np.ndarray) -> np.ndarray:
    """The encoder's mean for float32 intensities [28, 28] sent as a tensor."""
    x = np.ascontiguousarray(x, dtype="<f4").reshape(1, 784)
    tensor = vae_pb2.Tensor(shape=[1, 784], dtype=vae_pb2.DATA_TYPE_FLOAT32, data=x.tobytes())
    reply = stub.Encode(vae_pb2.EncodeRequest(images=vae_pb2.ImageInput(tensor=tensor)), timeout=30)
    return np.frombuffer(reply.mean.data, "<f4").reshape(1, LATENT)


def assert_read_as(stub: vae_pb2_grpc.VaeServiceStub, file: bytes, intensities: np.ndarray) -> None:
    """The server read `file` as `intensities`: its encoding equals theirs sent as a tensor."""
    np.testing.assert_allclose(
        encode_png(stub, [file]), encode_intensities(stub, intensities), rtol=0, atol=1e-6
    )


# Item 6: metadata bombs


def ztxt_bomb(clean: bytes, chunks: int = 60) -> bytes:
    """`clean` plus `chunks` zTXt chunks of about 1 KB that each inflate to 1 MiB."""
    payload = b"Comment\x00\x00" + zlib.compress(b"\x00" * (1 << 20), 9)
    return with_chunks(clean, [chunk(b"zTXt", payload)] * chunks)


def test_compressed_metadata_is_never_inflated(
    stub: vae_pb2_grpc.VaeServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 PNGs of 60 KB, each with 60 zTXt chunks that would inflate to 60 MiB (Pillow spent
    0.27 s an image, partly on the event loop): read as the image alone, and Pillow's
    decompressor for text and ICC chunks is never called (the server runs in this process)."""
    inflated: list[int] = []
    real = PngImagePlugin._safe_zlib_decompress

    def counting(data: bytes) -> bytes:
        inflated.append(len(data))
        return real(data)

    monkeypatch.setattr(PngImagePlugin, "_safe_zlib_decompress", counting)
    digit = Image.fromarray(np.where(stroke_mask(), 255, 0).astype(np.uint8))
    clean = png(digit)
    bomb = ztxt_bomb(clean)
    assert 55_000 < len(bomb) < 70_000
    means = encode_png(stub, [bomb] * 16)
    assert inflated == []
    np.testing.assert_array_equal(means, encode_png(stub, [clean] * 16))
    # An ICC profile and iTXt are dropped unread too (pixels unchanged).
    icc = chunk(b"iCCP", b"profile\x00\x00" + zlib.compress(b"\x00" * (1 << 20)))
    itxt = chunk(b"iTXt", b"XML\x00\x01\x00\x00\x00" + zlib.compress(b"<x/>" * 100_000))
    np.testing.assert_array_equal(
        encode_png(stub, [with_chunks(clean, [icc, itxt])]), encode_png(stub, [clean])
    )
    assert inflated == []


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda clean: with_chunks(clean, [chunk(b"tEXt", b"k\x00v")] * 300),
            "images.png.images[1]: expected a PNG file of at most 256 chunks",
        ),
        (
            lambda clean: with_chunks(clean, [chunk(b"tEXt", b"k\x00" + b"v" * 300_000)]),
            "images.png.images[1]: expected a 28x28 PNG file of at most 262144 bytes, got 300",
        ),
        (
            lambda clean: clean[:40],
            "images.png.images[1]: not a decodable PNG file (a chunk is cut short)",
        ),
        (
            lambda clean: clean[:33] + chunk(b"IEND", b""),
            "images.png.images[1]: not a decodable PNG file",
        ),
    ],
    ids=["too-many-chunks", "too-large", "cut-short", "no-pixels"],
)
def test_malformed_or_oversized_pngs_are_refused_naming_the_image(
    stub: vae_pb2_grpc.VaeServiceStub, make: Callable[[bytes], bytes], expected: str
) -> None:
    clean = png(Image.new("L", (28, 28)))
    request = vae_pb2.EncodeRequest(
        images=vae_pb2.ImageInput(png=vae_pb2.PngImages(images=[clean, make(clean)]))
    )
    error: Any = refusal(stub.Encode, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(expected), error.details()


# Item 11: 16-bit greyscale and transparency


def test_16_bit_greyscale_is_read_at_16_bits(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    """0.25 and 0.5 of full scale used to be clipped to 8 bits, i.e. to 1.0."""
    levels = np.zeros((28, 28), np.uint16)
    levels[:, :14] = 16384  # 0.25
    levels[:, 14:] = 32768  # 0.5
    levels[10:18, 10:18] = 65535
    file = png(Image.fromarray(levels))
    with Image.open(io.BytesIO(file)) as check:
        assert check.mode == "I;16"
    assert_read_as(stub, file, levels.astype(np.float32) / np.float32(65535))


def test_transparent_pixels_are_background_whatever_their_colour(
    stub: vae_pb2_grpc.VaeServiceStub,
) -> None:
    """White strokes on a transparent canvas whose pixels are white too (as some editors
    store them): the canvas is black, not the white its colour channels say."""
    rgba = np.full((28, 28, 4), 255, np.uint8)
    rgba[..., 3] = np.where(stroke_mask(), 255, 0)
    assert_read_as(stub, png(Image.fromarray(rgba, "RGBA")), stroke_mask().astype(np.float32))


def test_alpha_scales_the_luminance(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    """intensity = luminance x alpha: half-transparent white is 0.5-grey ink; a half-transparent
    mid-grey (LA) a quarter."""
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[stroke_mask()] = (255, 255, 255, 128)
    expected = np.where(stroke_mask(), 128 / 255, 0).astype(np.float32)
    assert_read_as(stub, png(Image.fromarray(rgba, "RGBA")), expected)
    la = np.zeros((28, 28, 2), np.uint8)
    la[stroke_mask()] = (128, 128)
    expected = np.where(stroke_mask(), np.float32(128 * 128) / np.float32(255 * 255), 0)
    assert_read_as(stub, png(Image.fromarray(la, "LA")), expected.astype(np.float32))


def test_black_strokes_on_a_transparent_canvas_read_as_on_a_black_one(
    stub: vae_pb2_grpc.VaeServiceStub,
) -> None:
    """The convention's other side, stated by a test: black ink composited onto black is no
    ink, as it would be on an opaque black canvas (invert such a drawing before sending it)."""
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = np.where(stroke_mask(), 255, 0)
    opaque_black = png(Image.new("L", (28, 28)))
    np.testing.assert_array_equal(
        encode_png(stub, [png(Image.fromarray(rgba, "RGBA"))]), encode_png(stub, [opaque_black])
    )


def test_transparency_by_trns_colour_and_palette(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    grey = np.where(stroke_mask(), 200, 90).astype(np.uint8)  # background 90 made transparent
    expected = np.where(stroke_mask(), 200 / 255, 0).astype(np.float32)
    assert_read_as(stub, png(Image.fromarray(grey), transparency=90), expected)
    palette = Image.fromarray(np.where(stroke_mask(), 1, 0).astype(np.uint8), "P")
    palette.putpalette([255, 255, 255, 255, 255, 255])  # both entries white ...
    assert_read_as(stub, png(palette, transparency=0), stroke_mask().astype(np.float32))


# Item 12: values that overflow float32 inside the network


def latent_tensor(values: np.ndarray) -> vae_pb2.Tensor:
    array = np.ascontiguousarray(values, dtype="<f4")
    return vae_pb2.Tensor(
        shape=list(array.shape), dtype=vae_pb2.DATA_TYPE_FLOAT32, data=array.tobytes()
    )


def images_of(output: vae_pb2.ImageOutput) -> np.ndarray:
    return np.frombuffer(output.tensor.data, "<f4")


@pytest.mark.parametrize("value", [3.4e38, -3.4e38, 1.0001e4])
def test_decode_refuses_latents_beyond_the_limit(
    stub: vae_pb2_grpc.VaeServiceStub, value: float
) -> None:
    latents = np.zeros((2, LATENT), np.float32)
    latents[1, 2] = value
    error: Any = refusal(stub.Decode, vae_pb2.DecodeRequest(latents=latent_tensor(latents)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"latents.data: expected values in [-10000, 10000], found {np.float32(value)} at [1, 2]"
    )


def test_latents_at_the_limit_decode_to_finite_probabilities(
    stub: vae_pb2_grpc.VaeServiceStub,
) -> None:
    latents = np.array([[1e4] * LATENT, [-1e4] * LATENT, [1e4, -1e4, 1e4, -1e4]], np.float32)
    reply = stub.Decode(vae_pb2.DecodeRequest(latents=latent_tensor(latents)), timeout=30)
    probabilities = images_of(reply.images)
    assert probabilities.size == 3 * 784
    assert np.isfinite(probabilities).all() and probabilities.min() >= 0 <= probabilities.max() <= 1


@pytest.mark.parametrize("temperature", [3.4e38, 1000.5])
def test_sample_refuses_a_temperature_above_1000(
    stub: vae_pb2_grpc.VaeServiceStub, temperature: float
) -> None:
    error: Any = refusal(stub.Sample, vae_pb2.SampleRequest(count=4, temperature=temperature))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"temperature: expected a finite number > 0 and at most 1000, "
        f"got {float(np.float32(temperature)):g}"
    )


def test_sample_at_the_largest_temperature_is_finite(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    reply = stub.Sample(
        vae_pb2.SampleRequest(count=256, seed=3, temperature=1000, return_latents=True), timeout=30
    )
    assert np.isfinite(images_of(reply.images)).all()
    latents = np.frombuffer(reply.latents.data, "<f4")
    assert np.abs(latents).max() < 1e4


def interpolate(start: np.ndarray, end: np.ndarray) -> vae_pb2.InterpolateRequest:
    return vae_pb2.InterpolateRequest(
        start=vae_pb2.Endpoint(latent=latent_tensor(start)),
        end=vae_pb2.Endpoint(latent=latent_tensor(end)),
        steps=5,
        path=vae_pb2.INTERPOLATION_PATH_SPHERICAL,
    )


def test_spherical_interpolation_refuses_huge_endpoints(
    stub: vae_pb2_grpc.VaeServiceStub,
) -> None:
    start = np.full(LATENT, 3e38, np.float32)
    end = -start
    end[0] = 3e38
    error: Any = refusal(stub.Interpolate, interpolate(start, end))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"start.latent.data: expected values in [-10000, 10000], found {np.float32(3e38)} at [0]"
    )


def test_spherical_interpolation_at_the_limit_is_finite(
    stub: vae_pb2_grpc.VaeServiceStub,
) -> None:
    start = np.full(LATENT, 1e4, np.float32)
    end = np.array([1e4, -1e4, -1e4, 1e4], np.float32)
    reply = stub.Interpolate(interpolate(start, end), timeout=30)
    assert np.isfinite(images_of(reply.images)).all()
