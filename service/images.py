"""Images in and out of vae.v1 messages: a tensor or PNG files in, float32 [N, pixels] in [0, 1]
out of them; and back, the probabilities in the format asked for (IMAGE_FORMAT_*).

Every image is IMAGE_SHAPE (`service.settings`); every size and message here derives from it.
PNG files are read defensively: only Pillow's PNG parser sees the caller's bytes, and only the
chunks that make the image (see IMAGE_CHUNKS).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidArgument
from service.proto.vae.v1 import vae_pb2
from service.sampling import bernoulli, to_uint8
from service.settings import IMAGE_SHAPE, IMAGE_SIZE
from service.tensors import check_finite, tensor_array, tensor_into

HEIGHT, WIDTH = IMAGE_SHAPE
ImageFormat: TypeAlias = vae_pb2.ImageFormat.ValueType
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
# PNG input. Only the chunks that make the image reach Pillow: text (tEXt, zTXt, iTXt), ICC
# profiles, EXIF and the rest are dropped unread, so no compressed metadata is ever inflated
# (60 zTXt chunks in a 60 KB file made Pillow inflate 60 MB). An image's pixel data is at most
# IMAGE_SIZE x 8 bytes (16-bit RGBA, uncompressed), so the size and chunk limits leave metadata
# room.
IMAGE_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
MAX_PNG_BYTES = 256 * 1024
MAX_PNG_CHUNKS = 256
# PNG requests and replies above these are decoded and encoded on the inference threads, not on
# the event loop (about 45 us an image).
INLINE_PNG_IMAGES = 16
INLINE_PNG_BYTES = 64 * 1024


# Requests -> numpy


def images_in(images: vae_pb2.ImageInput, field: str, *, limit: int) -> np.ndarray:
    """float32 [N, pixels] in [0, 1] from the request's images, as a tensor or as PNG files."""
    kind = images.WhichOneof("images")
    if kind == "tensor":
        return images_from_tensor(images.tensor, f"{field}.tensor", limit=limit)
    if kind == "png":
        return images_from_png(images.png.images, f"{field}.png.images", limit=limit)
    raise InvalidArgument(field, "expected images as a tensor or as png files, got neither")


def png_inline(images: vae_pb2.ImageInput) -> bool:
    """Whether the request's PNGs (if any) are few and small enough to decode on the event
    loop (about 50 us each); larger batches go to the inference threads."""
    if images.WhichOneof("images") != "png":
        return True
    files = images.png.images
    return len(files) <= INLINE_PNG_IMAGES and sum(map(len, files)) <= INLINE_PNG_BYTES


def images_from_tensor(tensor: vae_pb2.Tensor, field: str, *, limit: int) -> np.ndarray:
    """float32 [N, pixels] in [0, 1] from a [N, pixels] or [N, height, width] float32 or uint8
    tensor."""
    array = tensor_array(tensor, field, limit=limit)
    if list(array.shape[1:]) not in ([IMAGE_SIZE], list(IMAGE_SHAPE)):
        raise InvalidArgument(
            f"{field}.shape",
            f"expected [N, {IMAGE_SIZE}] or [N, {HEIGHT}, {WIDTH}], got {list(array.shape)}",
        )
    array = array.reshape(array.shape[0], IMAGE_SIZE)
    if array.dtype == np.uint8:
        return np.multiply(array, np.float32(1 / 255), dtype=np.float32)
    low, high = check_finite(array, field)
    if low < 0.0 or high > 1.0:
        raise InvalidArgument(
            f"{field}.data", f"float32 images must lie in [0, 1], got values in [{low}, {high}]"
        )
    return array


def images_from_png(files: Sequence[bytes], field: str, *, limit: int) -> np.ndarray:
    """float32 [N, pixels] in [0, 1] from one PNG of IMAGE_SHAPE per image (see
    `_intensities`)."""
    if not files:
        raise InvalidArgument(field, "empty batch: expected at least one PNG")
    if len(files) > limit:
        raise InvalidArgument(
            field, f"{len(files)} images is above the limit of {limit} per request"
        )
    out = np.empty((len(files), IMAGE_SIZE), dtype=np.float32)
    for i, data in enumerate(files):
        out[i] = _png_intensities(data, f"{field}[{i}]")
    return out


def _png_intensities(data: bytes, field: str) -> np.ndarray:
    """One PNG file's float32 [pixels], or InvalidArgument naming what is wrong with it."""
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidArgument(field, _not_png(data))
    if len(data) > MAX_PNG_BYTES:
        raise InvalidArgument(
            field,
            f"expected a {WIDTH}x{HEIGHT} PNG file of at most {MAX_PNG_BYTES} bytes, "
            f"got {len(data)}",
        )
    try:
        # Only Pillow's PNG parser sees the caller's bytes, and only the image's own chunks;
        # a header claiming a huge image is refused before anything is decoded.
        with Image.open(io.BytesIO(_image_chunks(data, field)), formats=["PNG"]) as image:
            if image.size != (WIDTH, HEIGHT):
                raise InvalidArgument(
                    field,
                    f"expected a {WIDTH}x{HEIGHT} image, got {image.size[0]}x{image.size[1]}",
                )
            return _intensities(image)
    except UnidentifiedImageError as e:  # its message shows a server object's address
        raise InvalidArgument(field, "not a decodable PNG file (its header is broken)") from e
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise InvalidArgument(field, f"not a decodable PNG file ({e})") from e


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
    """float32 [pixels] in [0, 1] from a decoded PNG; 1 is ink (white), as in MNIST.

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


# numpy -> responses


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 [height, width] image as a greyscale PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def images_into(
    output: vae_pb2.ImageOutput, decoded: np.ndarray, image_format: ImageFormat, seed: int
) -> None:
    """The decoder's probabilities float32 [N, pixels] (or, for uint8 and PNG, its uint8 images)
    -> the images in the requested (validated) format, written into `output`, a field of the
    reply being built (in place: no message copy)."""
    images = decoded.reshape(-1, *IMAGE_SHAPE)
    output.format = image_format
    if image_format in (vae_pb2.IMAGE_FORMAT_PNG, vae_pb2.IMAGE_FORMAT_UINT8):
        images = images if images.dtype == np.uint8 else to_uint8(images)
    if image_format == vae_pb2.IMAGE_FORMAT_PNG:
        output.png.extend(png_bytes(g) for g in images)
        return
    if image_format == vae_pb2.IMAGE_FORMAT_BINARY:
        images = bernoulli(images, seed)
    tensor_into(output.tensor, images)
