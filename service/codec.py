"""Proto <-> numpy, with strict validation: every bad input raises InvalidArgument naming the
field and what was expected.

Copies on the hot path, counted: a request tensor's bytes are read out of the message once (upb
hands out a fresh copy of a bytes field on every read) and viewed with np.frombuffer, so a
float32 image tensor goes to ONNX Runtime as that one buffer. Replies are written into the
response message in place (`images_into`, `tensor_into`): a message handed to a constructor,
`SampleResponse(images=...)`, is copied whole, which at 1024 float32 images cost 0.6 ms a call.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, cast

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidArgument
from service.latent import Scores
from service.model.runtime import LATENT_LIMIT, SERVED_IMAGE_SHAPE, ModelInfo
from service.proto.vae.v1 import vae_pb2
from service.sampling import bernoulli, to_uint8

IMAGE_SHAPE = SERVED_IMAGE_SHAPE
IMAGE_SIZE = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
# Sample's temperature scales N(0, I): at this bound a draw would have to lie 10 standard
# deviations out to leave the latent range the decoder is checked on (LATENT_LIMIT).
MAX_TEMPERATURE = LATENT_LIMIT / 10

DTYPES: dict[int, np.dtype] = {
    vae_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    vae_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
}
FORMATS = frozenset(vae_pb2.ImageFormat.values())
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Named in the error when sent instead of a PNG (only the PNG parser ever sees request bytes).
OTHER_FORMATS = {
    b"BM": "BMP",
    b"GIF8": "GIF",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "RIFF (WebP?)",
}
MAX_DIMS = 8  # of any tensor in a request (the API's have 1 to 3; numpy allows 64)
# PNG input. Only the chunks that make the image reach Pillow: text (tEXt, zTXt, iTXt), ICC
# profiles, EXIF and the rest are dropped unread, so no compressed metadata is ever inflated
# (60 zTXt chunks in a 60 KB file made Pillow inflate 60 MB). A 28x28 image is at most 6.4 KB
# of pixel data (16-bit RGBA, uncompressed), so the size and chunk limits leave metadata room.
IMAGE_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
MAX_PNG_BYTES = 256 * 1024
MAX_PNG_CHUNKS = 256
# PNG requests above these are decoded on the inference threads, not on the event loop.
INLINE_PNG_IMAGES = 16
INLINE_PNG_BYTES = 64 * 1024
ImageFormat: TypeAlias = vae_pb2.ImageFormat.ValueType


# Requests -> numpy


def tensor_array(tensor: vae_pb2.Tensor, field: str, *, limit: int) -> np.ndarray:
    """A read-only view of the tensor's bytes with its shape, after checking dtype, shape
    (1 <= N <= limit, no negative dimensions) and byte length."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        got = _enum_name(vae_pb2.DataType, tensor.dtype)
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
            f"{_enum_name(vae_pb2.DataType, tensor.dtype)}, got {len(data)}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _check_finite(array: np.ndarray, field: str) -> tuple[float, float]:
    """min and max (NaN propagates through both; infinity shows in one of them)."""
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        where = np.argwhere(~np.isfinite(array))[0].tolist()
        raise InvalidArgument(
            f"{field}.data", f"expected finite values, found {array[tuple(where)]} at {where}"
        )
    return low, high


def images_from_tensor(tensor: vae_pb2.Tensor, field: str, *, limit: int) -> np.ndarray:
    """float32 [N, 784] in [0, 1] from a [N, 784] or [N, 28, 28] float32 or uint8 tensor."""
    array = tensor_array(tensor, field, limit=limit)
    if list(array.shape[1:]) not in ([IMAGE_SIZE], list(IMAGE_SHAPE)):
        raise InvalidArgument(
            f"{field}.shape", f"expected [N, {IMAGE_SIZE}] or [N, 28, 28], got {list(array.shape)}"
        )
    array = array.reshape(array.shape[0], IMAGE_SIZE)
    if array.dtype == np.uint8:
        return np.multiply(array, np.float32(1 / 255), dtype=np.float32)
    low, high = _check_finite(array, field)
    if low < 0.0 or high > 1.0:
        raise InvalidArgument(
            f"{field}.data", f"float32 images must lie in [0, 1], got values in [{low}, {high}]"
        )
    return array


def images_from_png(files: Sequence[bytes], field: str, *, limit: int) -> np.ndarray:
    """float32 [N, 784] in [0, 1] from one 28x28 PNG per image (see `_intensities`)."""
    if not files:
        raise InvalidArgument(field, "empty batch: expected at least one PNG")
    if len(files) > limit:
        raise InvalidArgument(
            field, f"{len(files)} images is above the limit of {limit} per request"
        )
    out = np.empty((len(files), IMAGE_SIZE), dtype=np.float32)
    for i, data in enumerate(files):
        name = f"{field}[{i}]"
        if not data.startswith(PNG_SIGNATURE):
            raise InvalidArgument(name, _not_png(data))
        if len(data) > MAX_PNG_BYTES:
            raise InvalidArgument(
                name, f"expected a 28x28 PNG file of at most {MAX_PNG_BYTES} bytes, got {len(data)}"
            )
        try:
            # Only Pillow's PNG parser sees the caller's bytes, and only the image's own chunks;
            # a header claiming a huge image is refused before anything is decoded.
            with Image.open(io.BytesIO(_image_chunks(data, name)), formats=["PNG"]) as image:
                if image.size != IMAGE_SHAPE[::-1]:
                    raise InvalidArgument(
                        name, f"expected a 28x28 image, got {image.size[0]}x{image.size[1]}"
                    )
                out[i] = _intensities(image)
        except UnidentifiedImageError as e:  # its message shows a server object's address
            raise InvalidArgument(name, "not a decodable PNG file (its header is broken)") from e
        except (
            Image.DecompressionBombError,
            OSError,
            ValueError,
            SyntaxError,
        ) as e:
            raise InvalidArgument(name, f"not a decodable PNG file ({e})") from e
    return out


def _image_chunks(data: bytes, field: str) -> bytes:
    """The PNG with only IMAGE_CHUNKS kept (walked by their length fields, nothing inflated);
    at most MAX_PNG_CHUNKS chunks. Pillow checks each kept chunk's CRC."""
    kept = [PNG_SIGNATURE]
    pos, chunks, end_of_file = len(PNG_SIGNATURE), 0, len(data)
    while pos < end_of_file:
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise InvalidArgument(field, f"expected a PNG file of at most {MAX_PNG_CHUNKS} chunks")
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length  # length, type, data, CRC
        if end > end_of_file:
            raise InvalidArgument(field, "not a decodable PNG file (a chunk is cut short)")
        if kind in IMAGE_CHUNKS:
            kept.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return b"".join(kept)


def _intensities(image: Image.Image) -> np.ndarray:
    """float32 [784] in [0, 1] from a decoded 28x28 PNG; 1 is ink (white), as in MNIST.

    - 16-bit greyscale keeps its 16 bits: v / 65535 (Pillow's convert("L") would clip it).
    - Colour becomes luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B); 16-bit colour is read
      at 8 bits a channel.
    - Transparency (an alpha channel, or a tRNS colour or palette entry) is composited onto
      black, MNIST's background: intensity = luminance x alpha. A transparent pixel is
      background whatever its colour; white (or light) strokes on a transparent canvas are
      ink; black strokes are not, as on an opaque black canvas (invert such a drawing first).
    """
    transparency = image.info.get("transparency")
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit greyscale
        grey = np.asarray(image, dtype=np.float32).reshape(IMAGE_SIZE) / np.float32(65535)
        if isinstance(transparency, int):
            grey[np.asarray(image).reshape(IMAGE_SIZE) == transparency] = 0.0
        return grey
    if "A" in image.mode or transparency is not None:  # RGBA, LA, PA; P, L, RGB with tRNS
        rgba = image.convert("RGBA")
        luminance = np.asarray(rgba.convert("L"), dtype=np.float32).reshape(IMAGE_SIZE)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32).reshape(IMAGE_SIZE)
        return luminance * alpha / np.float32(255 * 255)
    grey = np.asarray(image.convert("L"), dtype=np.float32).reshape(IMAGE_SIZE)
    return grey / np.float32(255)


def _not_png(data: bytes) -> str:
    for signature, name in OTHER_FORMATS.items():
        if data.startswith(signature):
            return f"expected a PNG file, got {name}"
    return "not a decodable PNG file (it does not start with the PNG signature)"


def png_count(images: vae_pb2.ImageInput) -> int:
    return len(images.png.images) if images.WhichOneof("images") == "png" else 0


def png_inline(images: vae_pb2.ImageInput) -> bool:
    """Whether the request's PNGs (if any) are few and small enough to decode on the event
    loop (about 50 us each); larger batches go to the inference threads."""
    if images.WhichOneof("images") != "png":
        return True
    files = images.png.images
    return len(files) <= INLINE_PNG_IMAGES and sum(map(len, files)) <= INLINE_PNG_BYTES


def images_in(images: vae_pb2.ImageInput, field: str, *, limit: int) -> np.ndarray:
    kind = images.WhichOneof("images")
    if kind == "tensor":
        return images_from_tensor(images.tensor, f"{field}.tensor", limit=limit)
    if kind == "png":
        return images_from_png(images.png.images, f"{field}.png.images", limit=limit)
    raise InvalidArgument(field, "expected images as a tensor or as png files, got neither")


def _check_latent_range(array: np.ndarray, field: str) -> None:
    """Finite and within +-LATENT_LIMIT (beyond it the decoder's float32 arithmetic is not
    checked, and at 3.4e38 it overflows to NaN)."""
    low, high = _check_finite(array, field)
    if max(-low, high) > LATENT_LIMIT:
        where = np.argwhere(np.abs(array) > LATENT_LIMIT)[0].tolist()
        raise InvalidArgument(
            f"{field}.data",
            f"expected values in [-{LATENT_LIMIT:g}, {LATENT_LIMIT:g}], found "
            f"{array[tuple(where)]} at {where}",
        )


def latents_in(tensor: vae_pb2.Tensor, field: str, *, latent_size: int, limit: int) -> np.ndarray:
    """float32 [N, latent_size], finite, each value within +-LATENT_LIMIT."""
    array = tensor_array(tensor, field, limit=limit)
    if array.dtype != np.float32:
        raise InvalidArgument(
            f"{field}.dtype",
            f"expected DATA_TYPE_FLOAT32, got {vae_pb2.DataType.Name(tensor.dtype)}",
        )
    if array.ndim != 2 or array.shape[1] != latent_size:
        raise InvalidArgument(
            f"{field}.shape",
            f"expected [N, {latent_size}] (the latent size), got {list(array.shape)}",
        )
    _check_latent_range(array, field)
    return array


def count_in(count: int, field: str, *, limit: int) -> int:
    if not 1 <= count <= limit:
        raise InvalidArgument(field, f"expected 1 to {limit}, got {count}")
    return count


def samples_per_image_in(samples: int, n: int, field: str, *, limit: int) -> int:
    if samples < 0:
        raise InvalidArgument(field, f"expected 0 or more, got {samples}")
    if n * samples > limit:
        raise InvalidArgument(
            field,
            f"N * samples_per_image = {n} * {samples} is above the limit of {limit} per request",
        )
    return samples


def temperature_in(request: vae_pb2.SampleRequest, field: str) -> float:
    if not request.HasField("temperature"):
        return 1.0
    t = request.temperature
    if not (math.isfinite(t) and 0 < t <= MAX_TEMPERATURE):
        raise InvalidArgument(
            field, f"expected a finite number > 0 and at most {MAX_TEMPERATURE:g}, got {t:g}"
        )
    return t


def format_in(image_format: int, field: str) -> ImageFormat:
    if image_format not in FORMATS:
        names = ", ".join(vae_pb2.ImageFormat.Name(f) for f in sorted(FORMATS) if f)
        raise InvalidArgument(
            field, f"unknown image format {image_format}; expected one of {names}"
        )
    if image_format == vae_pb2.IMAGE_FORMAT_UNSPECIFIED:
        return vae_pb2.IMAGE_FORMAT_PROBABILITIES
    return cast(ImageFormat, image_format)


def _enum_name(enum: object, value: int) -> str:
    try:
        return cast(str, enum.Name(value))  # type: ignore[attr-defined]
    except ValueError:
        return f"unknown value {value}"


# numpy -> responses


def tensor_into(tensor: vae_pb2.Tensor, array: np.ndarray) -> None:
    """Write `array` into `tensor`, a field of the reply being built (in place: no message
    copy). `tobytes` is the one copy: protobuf takes bytes, not a buffer."""
    dtype = vae_pb2.DATA_TYPE_UINT8 if array.dtype == np.uint8 else vae_pb2.DATA_TYPE_FLOAT32
    little = array.astype(DTYPES[dtype], copy=False)  # a no-op on little-endian hosts
    tensor.shape[:] = array.shape
    tensor.dtype = dtype
    tensor.data = little.tobytes()


def tensor_out(array: np.ndarray) -> vae_pb2.Tensor:
    tensor = vae_pb2.Tensor()
    tensor_into(tensor, array)
    return tensor


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def images_into(
    output: vae_pb2.ImageOutput, probabilities: np.ndarray, image_format: ImageFormat, seed: int
) -> None:
    """Probabilities float32 [N, 784] -> the images in the requested (validated) format,
    written into `output`, a field of the reply being built."""
    images = probabilities.reshape(-1, *IMAGE_SHAPE)
    output.format = image_format
    if image_format == vae_pb2.IMAGE_FORMAT_PNG:
        output.png.extend(png_bytes(g) for g in to_uint8(images))
        return
    if image_format == vae_pb2.IMAGE_FORMAT_UINT8:
        images = to_uint8(images)
    elif image_format == vae_pb2.IMAGE_FORMAT_BINARY:
        images = bernoulli(images, seed)
    tensor_into(output.tensor, images)


def images_out(
    probabilities: np.ndarray, image_format: ImageFormat, seed: int
) -> vae_pb2.ImageOutput:
    """`images_into` a new ImageOutput (for replies not built in place)."""
    output = vae_pb2.ImageOutput()
    images_into(output, probabilities, image_format, seed)
    return output


def model_info_out(info: ModelInfo, max_items: int) -> vae_pb2.ModelInfo:
    return vae_pb2.ModelInfo(
        name=info.name,
        version=info.version,
        latent_size=info.latent_size,
        image_shape=info.image_shape,
        providers=info.providers,
        metrics=info.metrics,
        max_items_per_request=max_items,
        precision=info.precision,
    )


# Interpolate and Score


@dataclass(frozen=True)
class Endpoint:
    """One end of an interpolation: an image to encode ([1, 784]) or a latent ([latent])."""

    array: np.ndarray
    is_image: bool


def endpoint_in(
    endpoint: vae_pb2.Endpoint, field: str, *, latent_size: int, limit: int
) -> Endpoint:
    kind = endpoint.WhichOneof("endpoint")
    if kind == "image":
        images = images_in(endpoint.image, f"{field}.image", limit=limit)
        if images.shape[0] != 1:
            raise InvalidArgument(
                f"{field}.image", f"expected exactly one image, got {images.shape[0]}"
            )
        return Endpoint(images, is_image=True)
    if kind == "latent":
        sub = f"{field}.latent"
        # The shape first: tensor_array's messages speak of batches, a latent is one vector.
        shape = list(endpoint.latent.shape)
        if shape not in ([latent_size], [1, latent_size]):
            raise InvalidArgument(
                f"{sub}.shape",
                f"expected [{latent_size}] or [1, {latent_size}] (the latent size), got {shape}",
            )
        array = tensor_array(endpoint.latent, sub, limit=latent_size)
        if array.dtype != np.float32:
            raise InvalidArgument(
                f"{sub}.dtype",
                f"expected DATA_TYPE_FLOAT32, got {vae_pb2.DataType.Name(endpoint.latent.dtype)}",
            )
        _check_latent_range(array, sub)
        return Endpoint(array.reshape(latent_size), is_image=False)
    raise InvalidArgument(field, "expected an image or a latent, got neither")


def steps_in(steps: int, field: str, *, limit: int) -> int:
    if not 2 <= steps <= limit:
        raise InvalidArgument(
            field, f"expected 2 to {limit} points (both endpoints included), got {steps}"
        )
    return steps


def spherical_in(path: int, field: str) -> bool:
    """True for INTERPOLATION_PATH_SPHERICAL, False for LINEAR (or unset)."""
    if path not in vae_pb2.InterpolationPath.values():
        raise InvalidArgument(
            field,
            f"unknown path {path}; expected INTERPOLATION_PATH_LINEAR or "
            "INTERPOLATION_PATH_SPHERICAL",
        )
    return path == vae_pb2.INTERPOLATION_PATH_SPHERICAL


def importance_samples_in(samples: int, n: int, field: str, *, limit: int) -> int:
    if samples < 0:
        raise InvalidArgument(field, f"expected 0 or more, got {samples}")
    if n * max(samples, 1) > limit:
        raise InvalidArgument(
            field,
            f"N * max(importance_samples, 1) = {n} * {max(samples, 1)} is above the limit of "
            f"{limit} per request",
        )
    return samples


def scores_out(scores: Scores, samples: int, seed: int) -> vae_pb2.ScoreResponse:
    return vae_pb2.ScoreResponse(
        negative_elbo=scores.negative_elbo.tolist(),
        reconstruction=scores.reconstruction.tolist(),
        kl=scores.kl.tolist(),
        iw_nll=scores.iw_nll.tolist() if scores.iw_nll is not None else [],
        samples=samples,
        seed=seed,
    )
