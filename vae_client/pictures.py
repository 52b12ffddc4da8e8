"""Pictures a person can read, with numpy and Pillow alone (the client needs no matplotlib): the
one plain tiler of digits (`tile`, also behind the CLI's PNG grids and the training pictures),
grids of digits with row and column labels, an animated GIF, and a histogram with marks.

Digits are drawn as they come (white on black), enlarged `scale` times with nearest-neighbour
so the pixels stay visible, on a white page with black captions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAGE = (255, 255, 255)
INK = (0, 0, 0)
MARK = (200, 30, 30)  # threshold lines and flagged captions
FRAME = (170, 170, 170)  # a thin line around each tile, so a white-ground image keeps its edge
GAP = 4  # pixels between tiles
MARGIN = 8  # pixels around the whole picture
FONT_SIZE = 12

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@cache
def font(size: int = FONT_SIZE) -> Font:
    """Pillow's bundled font (no font files needed on the machine)."""
    return ImageFont.load_default(size=size)


def text_size(text: str, size: int = FONT_SIZE) -> tuple[int, int]:
    left, top, right, bottom = font(size).getbbox(text)
    return int(right - left), int(bottom - top)


def enlarge(image: np.ndarray, scale: int) -> Image.Image:
    """uint8 [H, W] -> an RGB image `scale` times larger, pixels kept sharp."""
    tile = Image.fromarray(np.ascontiguousarray(image), mode="L").convert("RGB")
    if scale == 1:
        return tile
    return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)


def tile(
    images: np.ndarray, columns: int | None = None, *, gap: int, border: int = 0, fill: float = 0
) -> np.ndarray:
    """[N, H, W] -> one [H', W'] array of the same dtype, the tiles row-major (`columns` of
    them, a square by default), `gap` pixels of `fill` between them and `border` around."""
    n, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    shape = (2 * border + rows * (h + gap) - gap, 2 * border + cols * (w + gap) - gap)
    out = np.full(shape, fill, dtype=images.dtype)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        y, x = border + r * (h + gap), border + c * (w + gap)
        out[y : y + h, x : x + w] = image
    return out


def tile_grid(
    images: np.ndarray,
    *,
    scale: int = 2,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
    caption_colours: Sequence[tuple[int, int, int]] | None = None,
    title: str | None = None,
) -> Image.Image:
    """uint8 [rows, columns, H, W] -> one RGB picture: a title on top, column labels above the
    columns, row labels on the left, and an optional caption under each tile (row-major)."""
    rows, columns, h, w = images.shape
    tile_w, tile_h = w * scale, h * scale
    line = text_size("Ag0.9")[1] + 4
    left = max((text_size(t)[0] for t in row_labels or []), default=-GAP) + GAP
    if captions is not None:
        tile_w = max(tile_w, *(text_size(c)[0] + 2 for c in captions))
    top = (line if title else 0) + (line if column_labels else 0)
    cell_h = tile_h + (line if captions is not None else 0)
    width = 2 * MARGIN + left + columns * tile_w + (columns - 1) * GAP
    if title:
        width = max(width, 2 * MARGIN + text_size(title)[0])
    height = 2 * MARGIN + top + rows * cell_h + (rows - 1) * GAP
    page = Image.new("RGB", (width, height), PAGE)
    draw = ImageDraw.Draw(page)
    if title:
        draw.text((MARGIN, MARGIN), title, fill=INK, font=font())
    x0, y0 = MARGIN + left, MARGIN + top
    for c, label in enumerate(column_labels or []):
        x = x0 + c * (tile_w + GAP) + tile_w // 2
        draw.text((x, y0 - 2), label, fill=INK, font=font(), anchor="md")
    for r in range(rows):
        y = y0 + r * (cell_h + GAP)
        if row_labels:
            draw.text((MARGIN, y + tile_h // 2), row_labels[r], fill=INK, font=font(), anchor="lm")
        for c in range(columns):
            x = x0 + c * (tile_w + GAP)
            tx = x + (tile_w - w * scale) // 2
            page.paste(enlarge(images[r, c], scale), (tx, y))
            draw.rectangle((tx - 1, y - 1, tx + w * scale, y + tile_h), outline=FRAME)
            if captions is not None:
                i = r * columns + c
                colour = caption_colours[i] if caption_colours is not None else INK
                at = (x + tile_w // 2, y + tile_h + 2)
                draw.text(at, captions[i], fill=colour, font=font(), anchor="ma")
    return page


def stack(pictures: Sequence[Image.Image]) -> Image.Image:
    """Pictures one above the other, left-aligned, on one page."""
    width = max(p.width for p in pictures)
    page = Image.new("RGB", (width, sum(p.height for p in pictures)), PAGE)
    y = 0
    for picture in pictures:
        page.paste(picture, (0, y))
        y += picture.height
    return page


def save(picture: Image.Image, path: Path) -> tuple[int, int]:
    """Write a PNG; returns its (width, height)."""
    picture.save(path, format="PNG")
    return picture.size


def save_reported(picture: Image.Image, path: Path, what: str) -> None:
    """Write a PNG and print what it shows, where it went and its size in pixels."""
    width, height = save(picture, path)
    print(f"{what} -> {path} ({width}x{height} px)")


def save_gif(frames: np.ndarray, path: Path, *, scale: int = 4, frame_ms: int = 120) -> int:
    """uint8 [N, H, W] -> an animated GIF that plays forwards then back, looping forever.
    Returns the number of frames written."""
    sequence = [*frames, *frames[-2:0:-1]]  # there and back, each end shown once
    images = [enlarge(f, scale).convert("L") for f in sequence]
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0
    )
    return len(images)


def nice_step(span: float, ticks: int = 6) -> float:
    """A round tick spacing (1, 2 or 5 times a power of ten) giving about `ticks` ticks."""
    raw = span / ticks
    power = 10 ** np.floor(np.log10(raw))
    return float(min((m * power for m in (1, 2, 5, 10) if m * power >= raw), default=raw))


def histogram(
    values: np.ndarray,
    *,
    marks: Sequence[tuple[float, str]] = (),
    threshold: float | None = None,
    title: str = "",
    bins: int = 40,
    size: tuple[int, int] = (480, 180),
) -> Image.Image:
    """Bars of `values` (e.g. held-out scores), a red line at `threshold`, and a blue tick with
    a label at each mark (e.g. the scored images). The axis covers the values and the threshold
    with some room; marks beyond it sit at the right edge, their label giving the value."""
    width, height = size
    line = text_size("Ag0.9")[1] + 4
    plot_top, plot_bottom = MARGIN + 2 * line, height - MARGIN - line
    x_left, x_right = MARGIN + 10, width - MARGIN - 10
    low = min(float(values.min()), *(m for m, _ in marks))
    high = max(float(values.max()), threshold if threshold is not None else -np.inf)
    high = low + 1.25 * (high - low) if high > low else low + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(low, high))

    def x_of(v: float) -> float:
        return x_left + (min(v, high) - low) / (high - low) * (x_right - x_left)

    page = Image.new("RGB", size, PAGE)
    draw = ImageDraw.Draw(page)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=font())
    tallest = max(int(counts.max()), 1)
    for count, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if count:
            top = plot_bottom - count / tallest * (plot_bottom - plot_top - line)
            draw.rectangle((x_of(a), top, max(x_of(b) - 1, x_of(a)), plot_bottom), fill=(150,) * 3)
    draw.line((x_left, plot_bottom, x_right, plot_bottom), fill=INK)
    step = nice_step(high - low)
    for tick in np.arange(np.ceil(low / step) * step, high, step):
        x = x_of(float(tick))
        draw.line((x, plot_bottom, x, plot_bottom + 3), fill=INK)
        draw.text((x, plot_bottom + 3), f"{tick:g}", fill=INK, font=font(10), anchor="ma")
    if threshold is not None:
        x = x_of(threshold)
        draw.line((x, plot_top, x, plot_bottom), fill=MARK, width=2)
        draw.text((x + 4, plot_top), f"threshold {threshold:.1f}", fill=MARK, font=font())
    blue = (30, 90, 200)
    for n, (value, label) in enumerate(sorted(marks)):  # labels staggered on three heights
        x = x_of(value)
        y = plot_bottom - 14 - (n % 3) * 12
        draw.line((x, y + 2, x, plot_bottom + 2), fill=blue, width=2)
        text = label if value <= high else f"{label}: {value:.0f} >"
        draw.text((x, y), text, fill=blue, font=font(10), anchor="rd" if value > high else "md")
    return page
