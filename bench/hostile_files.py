"""Hostile image files for the fuzzing strategies (bench/hostile_input.py): real PNGs of every
size and mode, broken ones, headers that lie about their size (a decompression bomb), other
formats, and any bytes damaged by flips, cuts and insertions."""

from __future__ import annotations

import io
import struct
import zlib

from hypothesis import strategies as st
from PIL import Image


def png(width: int, height: int, mode: str, fill: int) -> bytes:
    """A real PNG, `width` x `height`, in `mode`, of one `fill` value."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height), fill).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` with a one-byte image stream: what a
    decompression bomb or a lying file looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with bytes flipped, cut or inserted."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def right_size_png() -> st.SearchStrategy[bytes]:
    return st.builds(
        png, st.just(28), st.just(28), st.sampled_from(["L", "RGB", "P", "1"]), st.integers(0, 255)
    )


def png_files() -> st.SearchStrategy[bytes]:
    """Real PNGs of every size and mode, broken ones, headers that lie, other formats, noise."""
    real = st.builds(
        png,
        st.integers(1, 40),
        st.integers(1, 40),
        st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16", "LA"]),
        st.integers(0, 255),
    )
    right_size = right_size_png()
    liars = st.builds(png_header_only, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
    return st.one_of(
        right_size,
        real,
        right_size.flatmap(mutated),
        liars,
        st.just(png_header_only(28, 28)),
        st.just(png_header_only(100_000, 100_000)),  # 10^10 pixels: a decompression bomb
        st.just(gif()),
        st.binary(max_size=64),
    )


def gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="GIF")
    return buffer.getvalue()
