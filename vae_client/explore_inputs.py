"""What the exploration commands read and ask: image files, labelled data sets, and the
server's answers gathered in chunks it accepts (at most max_items_per_request rows a call).

Errors a person made (a missing file, a bad --dims) end the command with a one-line message.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vae_client import latent
from vae_client.client import EndpointLike, Scores, VaeClient
from vae_data.mnist import DataError, Split, load_dataset

ACTIVITY_SAMPLES = 512  # the model's own samples on which the most active dimensions are measured


# Inputs


def read_png(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SystemExit(f"vae-client: cannot read {path}: {e.strerror}") from e


def pngs_in(folder: Path) -> list[bytes]:
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not files:
        raise SystemExit(f"vae-client: {folder}: no .png files in it (or not a folder)")
    return [read_png(f) for f in files]


def endpoint_file(path: Path) -> EndpointLike:
    """A .npy file is a latent ([latent] or [1, latent]); anything else a PNG image."""
    if path.suffix != ".npy":
        return read_png(path)
    try:
        return np.load(path, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as e:
        raise SystemExit(f"vae-client: {path}: not a numeric .npy array ({e})") from e


def grey_of(files: Sequence[bytes]) -> np.ndarray:
    """PNG files (already accepted by the server) -> uint8 [N, 28, 28], for the pictures."""
    return np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("L")) for f in files])


def labelled(data_dir: Path | None, split: str) -> Split:
    try:
        dataset = load_dataset(data_dir, verbose=False)
    except DataError as e:
        raise SystemExit(f"vae-client: {e}") from e
    return dataset.train if split == "train" else dataset.test


def parse_dims(text: str, latent_size: int) -> list[int]:
    """'0-7', '3', '0,4,9-11' -> the dimensions, each checked against the latent size."""
    dims: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            dims += range(int(low), int(high or low) + 1)
    except ValueError as e:
        raise SystemExit(f"vae-client: --dims {text!r}: expected e.g. 0-7 or 0,3,5") from e
    bad = [d for d in dims if not 0 <= d < latent_size]
    if not dims or bad:
        raise SystemExit(f"vae-client: --dims {text!r}: expected dimensions 0 to {latent_size - 1}")
    return dims


# Calls in chunks the server accepts


def encode_means(vae: VaeClient, images: np.ndarray | list[bytes]) -> np.ndarray:
    limit = vae.info().max_items_per_request
    parts = [vae.encode(images[i : i + limit]).mean for i in range(0, len(images), limit)]
    return np.concatenate(parts)


def decode_grid(vae: VaeClient, latents: np.ndarray) -> np.ndarray:
    """float32 [R, C, latent] -> uint8 images [R, C, 28, 28]."""
    rows, columns, size = latents.shape
    limit = vae.info().max_items_per_request
    flat = latents.reshape(-1, size)
    parts = [vae.decode(flat[i : i + limit]).images for i in range(0, len(flat), limit)]
    return np.concatenate(parts).reshape(rows, columns, 28, 28)


def score_all(vae: VaeClient, images: np.ndarray | list[bytes], k: int, seed: int | None) -> Scores:
    """Score any number of images, N * max(k, 1) rows per call at most the server's limit."""
    chunk = max(1, vae.info().max_items_per_request // max(k, 1))
    if seed is None:  # one seed for every chunk, so the one printed reproduces them all
        seed = secrets.randbits(63)
    parts = [
        vae.score(images[i : i + chunk], importance_samples=k, seed=seed)
        for i in range(0, len(images), chunk)
    ]

    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    return Scores(
        joined("negative_elbo"),
        joined("reconstruction"),
        joined("kl"),
        joined("iw_nll") if k > 0 else None,
        parts[0].samples,
        parts[0].seed,
    )


def active_dims(vae: VaeClient, count: int) -> list[int]:
    """The `count` dimensions whose posterior means vary most over the model's own samples (no
    data set needed; the decoder ignores the rest, see `latent.most_active`)."""
    samples = vae.sample(min(ACTIVITY_SAMPLES, vae.info().max_items_per_request), seed=0).images
    return latent.most_active(encode_means(vae, samples), count)


def latent_of(vae: VaeClient, path: Path, size: int) -> np.ndarray:
    """The latent [size] of a .npy file, or the encoder's mean of a PNG."""
    start = endpoint_file(path)
    if not isinstance(start, np.ndarray):
        return encode_means(vae, [start])[0]
    if start.size != size:
        raise SystemExit(
            f"vae-client: {path}: expected {size} values (the latent size), got {start.size}"
        )
    return start.reshape(size)
