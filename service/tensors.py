"""vae.v1 `Tensor` messages <-> numpy: the framing every tensor field is checked for (dtype,
shape, byte length, finite values) before the field's own meaning is.

Copies, counted: a request tensor's bytes are read out of the message once (upb hands out a
fresh copy of a bytes field on every read) and viewed with np.frombuffer, so a float32 tensor
goes to ONNX Runtime as that one buffer. A reply's tensor is written into the message in place
(`tensor_into`): a message handed to a constructor, `SampleResponse(images=...)`, is copied
whole, which at 1024 float32 images cost 0.6 ms a call.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np

from service.errors import InvalidArgument
from service.proto.vae.v1 import vae_pb2

DTYPES: dict[int, np.dtype] = {
    vae_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    vae_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
}
MAX_DIMS = 8  # of any tensor in a request (the API's have 1 to 3; numpy allows 64)


def tensor_array(tensor: vae_pb2.Tensor, field: str, *, limit: int) -> np.ndarray:
    """A read-only view of the tensor's bytes with its shape, after checking dtype, shape
    (1 <= N <= limit, no negative dimensions) and byte length."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        got = enum_name(vae_pb2.DataType, tensor.dtype)
        raise InvalidArgument(
            f"{field}.dtype", f"expected DATA_TYPE_FLOAT32 or DATA_TYPE_UINT8, got {got}"
        )
    if len(tensor.shape) > MAX_DIMS:  # checked first: the shape is not echoed back in full
        raise InvalidArgument(
            f"{field}.shape",
            f"expected at most {MAX_DIMS} dimensions, got {len(tensor.shape)}",
        )
    shape = list(tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidArgument(
            f"{field}.shape", f"expected [N, ...] of non-negative sizes, got {shape}"
        )
    if shape[0] == 0:
        raise InvalidArgument(f"{field}.shape", "empty batch: expected at least one row (N >= 1)")
    if shape[0] > limit:
        raise InvalidArgument(
            f"{field}.shape", f"N = {shape[0]} is above the limit of {limit} per request"
        )
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # a copy of the field's bytes on each read: read it once
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}.data",
            f"expected {expected} bytes for shape {shape} of "
            f"{enum_name(vae_pb2.DataType, tensor.dtype)}, got {len(data)}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def check_finite(array: np.ndarray, field: str) -> tuple[float, float]:
    """min and max, after checking every value is finite (NaN propagates through both;
    infinity shows in one of them)."""
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        where = np.argwhere(~np.isfinite(array))[0].tolist()
        raise InvalidArgument(
            f"{field}.data", f"expected finite values, found {array[tuple(where)]} at {where}"
        )
    return low, high


def enum_name(enum: object, value: int) -> str:
    """The enum value's name, or "unknown value N" for a number the enum does not define."""
    try:
        return cast(str, enum.Name(value))  # type: ignore[attr-defined]
    except ValueError:
        return f"unknown value {value}"


def tensor_into(tensor: vae_pb2.Tensor, array: np.ndarray) -> None:
    """Write `array` into `tensor`, a field of the reply being built (in place: no message
    copy). `tobytes` is the one copy: protobuf takes bytes, not a buffer."""
    dtype = vae_pb2.DATA_TYPE_UINT8 if array.dtype == np.uint8 else vae_pb2.DATA_TYPE_FLOAT32
    little = array.astype(DTYPES[dtype], copy=False)  # a no-op on little-endian hosts
    tensor.shape[:] = array.shape
    tensor.dtype = dtype
    tensor.data = little.tobytes()


def tensor_out(array: np.ndarray) -> vae_pb2.Tensor:
    """`tensor_into` a new Tensor (for a field set by the reply's constructor)."""
    tensor = vae_pb2.Tensor()
    tensor_into(tensor, array)
    return tensor
