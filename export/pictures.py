"""The pictures a person looks at after training: reconstructions, samples from the prior, the
loss curves, and the latent manifold of a 2-D model (written by `vae-train` into its run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.model import VAE
from vae_client import pictures
from vae_data.mnist import IMAGE_SHAPE, Dataset


def sheet(images: np.ndarray, columns: int) -> np.ndarray:
    """[N, 784] in [0, 1] -> one image, the digits 1 pixel apart on mid-grey (laid out by the
    client's tiler, `vae_client.pictures.tile`, behind every grid of digits)."""
    return pictures.tile(images.reshape(-1, *IMAGE_SHAPE), columns, gap=1, fill=0.5)


@torch.no_grad()
def write_pictures(
    model: VAE, dataset: Dataset, history: dict[str, list[float]], out: Path
) -> list[Path]:
    """reconstructions.png, samples.png, loss.png (and manifold.png for a 2-D latent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    generator = torch.Generator().manual_seed(0)
    paths = []

    def save(fig: Any, name: str) -> None:
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)

    originals = dataset.test.images[:64].astype(np.float32) / 255
    mean, _ = model.encoder(torch.from_numpy(originals))
    reconstructions = torch.sigmoid(model.decoder(mean)).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, images, title in zip(
        axes,
        (originals, reconstructions),
        ("test images", "reconstructions (decoder of mean)"),
        strict=True,
    ):
        ax.imshow(sheet(images, 8), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    save(fig, "reconstructions.png")

    z = torch.randn((100, model.config.latent_size), generator=generator)
    fig, ax = plt.subplots(figsize=(6, 6.3))
    ax.imshow(sheet(torch.sigmoid(model.decoder(z)).numpy(), 10), cmap="gray", vmin=0, vmax=1)
    ax.set_title("samples from the prior (Bernoulli means)")
    ax.axis("off")
    save(fig, "samples.png")

    if model.config.latent_size == 2:  # Kingma & Welling's figure: decode a grid of quantiles
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 20))
        grid = torch.stack(torch.meshgrid(q, -q, indexing="xy"), dim=-1).reshape(-1, 2)
        fig, ax = plt.subplots(figsize=(8, 8.3))
        ax.imshow(sheet(torch.sigmoid(model.decoder(grid)).numpy(), 20), cmap="gray")
        ax.set_title("the 2-D latent manifold (decoded Gaussian quantiles)")
        ax.axis("off")
        save(fig, "manifold.png")

    if history.get("train_loss"):
        epochs = np.arange(1, len(history["train_loss"]) + 1)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(epochs, history["train_loss"], label="train (dynamically binarized)")
        ax.plot(epochs, history["val_loss"], label="validation (fixed binarization)")
        values = np.concatenate([history["train_loss"], history["val_loss"]])
        top = np.percentile(values[len(values) // 10 :], 95) if len(values) > 10 else values.max()
        ax.set_ylim(values.min() - 2, top + 2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("negative ELBO (nats per image)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss.png")
    return paths
