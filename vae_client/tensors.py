"""numpy arrays <-> the wire: tensors, image inputs and outputs, Interpolate endpoints, and the
names of the image formats and interpolation paths."""

from __future__ import annotations

from typing import Literal

import numpy as np

from service.proto.vae.v1 import vae_pb2

ImageFormatName = Literal["probabilities", "uint8", "binary", "png"]
FORMATS: dict[str, vae_pb2.ImageFormat.ValueType] = {
    "probabilities": vae_pb2.IMAGE_FORMAT_PROBABILITIES,
    "uint8": vae_pb2.IMAGE_FORMAT_UINT8,
    "binary": vae_pb2.IMAGE_FORMAT_BINARY,
    "png": vae_pb2.IMAGE_FORMAT_PNG,
}
PathName = Literal["linear", "spherical"]
PATHS: dict[str, vae_pb2.InterpolationPath.ValueType] = {
    "linear": vae_pb2.INTERPOLATION_PATH_LINEAR,
    "spherical": vae_pb2.INTERPOLATION_PATH_SPHERICAL,
}

# An Interpolate endpoint: PNG bytes or an image array ([28, 28] or [784], uint8 or float32 in
# [0, 1], optionally with a leading 1), encoded to its mean by the server; any other array is a
# latent ([latent] or [1, latent], float32).
EndpointLike = np.ndarray | bytes
IMAGE_SHAPES = ((28, 28), (784,), (1, 28, 28), (1, 784))


def to_tensor(array: np.ndarray) -> vae_pb2.Tensor:
    if array.dtype == np.uint8:
        dtype, little = vae_pb2.DATA_TYPE_UINT8, array
    else:
        dtype, little = vae_pb2.DATA_TYPE_FLOAT32, array.astype("<f4", copy=False)
    return vae_pb2.Tensor(
        shape=array.shape, dtype=dtype, data=np.ascontiguousarray(little).tobytes()
    )


def from_tensor(tensor: vae_pb2.Tensor) -> np.ndarray:
    dtype = np.uint8 if tensor.dtype == vae_pb2.DATA_TYPE_UINT8 else np.dtype("<f4")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def image_input(images: np.ndarray | list[bytes]) -> vae_pb2.ImageInput:
    """uint8 or float32 [N, 784] / [N, 28, 28] arrays, or a list of PNG files."""
    if isinstance(images, list):
        return vae_pb2.ImageInput(png=vae_pb2.PngImages(images=images))
    return vae_pb2.ImageInput(tensor=to_tensor(np.asarray(images)))


def images_from(output: vae_pb2.ImageOutput) -> np.ndarray | list[bytes]:
    if output.format == vae_pb2.IMAGE_FORMAT_PNG:
        return list(output.png)
    return from_tensor(output.tensor)


def endpoint(value: EndpointLike) -> vae_pb2.Endpoint:
    """PNG bytes or an image-shaped array -> an image endpoint; any other array -> a latent."""
    if isinstance(value, bytes):
        return vae_pb2.Endpoint(image=image_input([value]))
    array = np.asarray(value)
    if array.dtype == np.uint8 or array.shape in IMAGE_SHAPES:
        return vae_pb2.Endpoint(image=image_input(array.reshape(1, -1)))
    return vae_pb2.Endpoint(latent=to_tensor(array.astype(np.float32, copy=False)))
