"""Hostile input for VaeService, as hypothesis strategies: every field of every request, and raw
bytes sent as each method's message. Shared by the fast fuzz tests (`tests/reliability`, a few
hundred cases) and the campaign (`bench/reliability.py`, thousands).

Each strategy mixes anything-goes values (any int32 or int64, any bytes, unknown enum values,
NaN and infinities) with nearly valid ones (tensors whose byte length fits their shape, real
PNG files of the wrong size or mode, valid messages with a byte flipped or cut), so both the
first check and the ones behind it are reached. The only acceptable answers are OK and
INVALID_ARGUMENT (`ACCEPTABLE`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from hypothesis import strategies as st

from bench.hostile_files import mutated, png, png_files, right_size_png
from bench.hostile_files import png_header_only as png_header_only
from service.proto.vae.v1 import vae_pb2

SERVICE = "/vae.v1.VaeService/"
ACCEPTABLE = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT})
MAX_ROWS = 3  # rows of a nearly valid tensor: enough to reach every check, cheap to compute

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def mostly(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Valid about two times in three: a request then often gets past every check but one, and
    some get through to the model, so every check and the compute behind them are reached."""
    return st.one_of(valid, valid, hostile)


def counts(low: int) -> st.SearchStrategy[int]:
    """A count field whose valid values start at `low`: small ones (cheap to compute), or
    anything, the limits (4096) and int32's extremes included."""
    return mostly(st.integers(low, 48), st.one_of(st.sampled_from([-1, 0, 4096, 4097]), INT32))


def enums(values: list[int]) -> st.SearchStrategy[int]:
    """An enum field: a defined value, or any int32 (proto3 enums are open: unknown values
    arrive as they are)."""
    return mostly(st.sampled_from(values), INT32)


SEEDS = st.one_of(st.none(), UINT64)
FORMATS = enums(list(vae_pb2.ImageFormat.values()))
TEMPERATURES = mostly(st.one_of(st.none(), st.floats(0.125, 8, width=32)), FLOAT32)


@st.composite
def _fitting_tensor(
    draw: st.DrawFn, width: st.SearchStrategy[tuple[int, ...]], dtype: int, bad_values: bool
) -> vae_pb2.Tensor:
    """[1..MAX_ROWS, *width] of `dtype` whose bytes fit the shape; float32 values in [0, 1)
    unless `bad_values`, which plants a NaN, an infinity or an out-of-range value."""
    shape = (draw(st.integers(1, MAX_ROWS)), *draw(width))
    size = int(np.prod(shape))
    if dtype == vae_pb2.DATA_TYPE_UINT8:
        data = draw(st.binary(min_size=size, max_size=size))
    else:
        values = np.random.default_rng(draw(st.integers(0, 2**32))).random(size, np.float32)
        if bad_values and size:
            special = draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 2.0, 3e38]))
            values[draw(st.integers(0, size - 1))] = special
        data = values.astype("<f4").tobytes()
    return vae_pb2.Tensor(shape=shape, dtype=dtype, data=data)  # type: ignore[arg-type]


def tensors(widths: list[tuple[int, ...]], dtypes: list[int]) -> st.SearchStrategy[vae_pb2.Tensor]:
    """Mostly valid tensors (rows of one of `widths`, one of `dtypes`), else: fitting tensors
    of other widths, dtypes or values, or anything at all (any shape of up to 70 int64 sizes,
    any dtype, any bytes)."""
    all_dtypes = [vae_pb2.DATA_TYPE_FLOAT32, vae_pb2.DATA_TYPE_UINT8]
    valid = st.sampled_from(dtypes).flatmap(
        lambda d: _fitting_tensor(st.sampled_from(widths), d, False)
    )
    other_width = st.lists(st.integers(0, 5), max_size=3).map(tuple)
    nearly = st.one_of(
        st.sampled_from(all_dtypes).flatmap(lambda d: _fitting_tensor(other_width, d, False)),
        st.sampled_from(all_dtypes).flatmap(
            lambda d: _fitting_tensor(st.sampled_from(widths), d, True)
        ),
    )
    anything = st.builds(
        vae_pb2.Tensor,
        shape=st.lists(st.one_of(st.integers(-2, 800), INT64), max_size=70),
        dtype=INT32,
        data=st.binary(max_size=64),
    )
    return mostly(valid, st.one_of(nearly, anything))


def image_inputs() -> st.SearchStrategy[vae_pb2.ImageInput]:
    """Images as a tensor ([N, 784] or [N, 28, 28], float32 or uint8) or as PNG files."""
    image_tensors = tensors(
        [(784,), (28, 28)], [vae_pb2.DATA_TYPE_FLOAT32, vae_pb2.DATA_TYPE_UINT8]
    )
    png_list = st.lists(mostly(right_size_png(), png_files()), min_size=1, max_size=MAX_ROWS)
    return mostly(
        st.one_of(
            st.builds(vae_pb2.ImageInput, tensor=image_tensors),
            png_list.map(lambda files: vae_pb2.ImageInput(png=vae_pb2.PngImages(images=files))),
        ),
        st.one_of(
            st.just(vae_pb2.ImageInput()),  # neither
            st.just(vae_pb2.ImageInput(png=vae_pb2.PngImages())),  # no files
        ),
    )


def requests(latent_size: int) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy of request messages for every VaeService method, for a model whose latent
    size is `latent_size` (the valid latents then fit it)."""
    latents = tensors([(latent_size,)], [vae_pb2.DATA_TYPE_FLOAT32])
    one_latent = mostly(
        st.builds(
            lambda z: vae_pb2.Tensor(
                shape=z.shape[1:], dtype=z.dtype, data=z.data[: 4 * latent_size]
            ),
            latents,
        ),
        latents,
    )
    one_image = mostly(
        right_size_png().map(lambda f: vae_pb2.ImageInput(png=vae_pb2.PngImages(images=[f]))),
        image_inputs(),
    )
    endpoint = mostly(
        st.one_of(
            st.builds(vae_pb2.Endpoint, image=one_image),
            st.builds(vae_pb2.Endpoint, latent=one_latent),
        ),
        st.just(vae_pb2.Endpoint()),  # neither
    )
    return {
        "Encode": st.builds(
            vae_pb2.EncodeRequest,
            images=image_inputs(),
            samples_per_image=counts(0),
            seed=SEEDS,
        ),
        "Decode": st.builds(vae_pb2.DecodeRequest, latents=latents, format=FORMATS, seed=SEEDS),
        "Sample": st.builds(
            vae_pb2.SampleRequest,
            count=counts(1),
            seed=SEEDS,
            temperature=TEMPERATURES,
            format=FORMATS,
            return_latents=st.booleans(),
        ),
        "GetModelInfo": st.just(vae_pb2.GetModelInfoRequest()),
        "Interpolate": st.builds(
            vae_pb2.InterpolateRequest,
            start=endpoint,
            end=endpoint,
            steps=counts(2),
            path=enums(list(vae_pb2.InterpolationPath.values())),
            format=FORMATS,
            seed=SEEDS,
            return_latents=st.booleans(),
        ),
        "Score": st.builds(
            vae_pb2.ScoreRequest,
            images=image_inputs(),
            importance_samples=counts(0),
            seed=SEEDS,
        ),
    }


def raw_messages(valid: bytes) -> st.SearchStrategy[bytes]:
    """Bytes sent as a message: noise, or the serialized `valid` request damaged."""
    return st.one_of(st.binary(max_size=256), mutated(valid), st.just(valid))


VALID_BYTES = {
    "Encode": vae_pb2.EncodeRequest(
        images=vae_pb2.ImageInput(
            tensor=vae_pb2.Tensor(shape=[1, 784], dtype=vae_pb2.DATA_TYPE_UINT8, data=bytes(784))
        ),
        samples_per_image=2,
    ).SerializeToString(),
    "Sample": vae_pb2.SampleRequest(count=2, seed=1, temperature=0.5).SerializeToString(),
    "GetModelInfo": b"",
    "Score": vae_pb2.ScoreRequest(
        images=vae_pb2.ImageInput(png=vae_pb2.PngImages(images=[png(28, 28, "L", 7)]))
    ).SerializeToString(),
}


def valid_bytes(method: str, latent_size: int) -> bytes:
    """A valid serialized request of `method`, to damage."""
    latent = vae_pb2.Tensor(
        shape=[1, latent_size], dtype=vae_pb2.DATA_TYPE_FLOAT32, data=bytes(4 * latent_size)
    )
    if method == "Decode":
        return vae_pb2.DecodeRequest(
            latents=latent, format=vae_pb2.IMAGE_FORMAT_UINT8
        ).SerializeToString()
    if method == "Interpolate":
        return vae_pb2.InterpolateRequest(
            start=vae_pb2.Endpoint(latent=latent), end=vae_pb2.Endpoint(latent=latent), steps=3
        ).SerializeToString()
    return VALID_BYTES[method]


METHODS = ("Encode", "Decode", "Sample", "GetModelInfo", "Interpolate", "Score")


def raw_caller(channel: grpc.Channel, method: str) -> Callable[..., bytes]:
    """A call of `method` that sends and returns bytes as they are (identity serializers)."""
    return channel.unary_unary(SERVICE + method)  # type: ignore[call-arg,no-any-return]


def status_of(
    call: Callable[..., Any], request: Any, timeout: float = 60.0
) -> tuple[grpc.StatusCode, str]:
    """The call's status code and details (OK, "" on success)."""
    try:
        call(request, timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""
