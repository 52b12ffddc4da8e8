"""Measure a trained VAE on the test set, and draw the pictures a person would look at.

`vae-evaluate` reports, per test image in nats: the negative ELBO with its reconstruction and
KL terms, the number of active latent units, and the importance-weighted estimate of -log p(x)
(Burda et al. 2016) with k samples: k=5000 for reported figures, smaller k for quick runs. The
test set is binarized once with a fixed seed, so figures compare run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from export.data import IMAGE_SHAPE, Dataset, binarized_test_set
from export.model import (
    VAE,
    gaussian_kl,
    importance_weighted_nll,
    reconstruction_nll,
)

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: Cov_x(E_q[z_u]) above this counts as active


@torch.no_grad()
def evaluate(
    model: VAE, x: torch.Tensor, k: int, *, seed: int = 0, progress: bool = True
) -> dict[str, float]:
    """Test-set figures for binarized images `x` [N, 784]; the global RNG is left untouched."""
    model.eval()
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, log_variance = model.encoder(x)
        z = model.reparameterize(mean, log_variance)
        rec = reconstruction_nll(model.decoder(z), x)
        kl = gaussian_kl(mean, log_variance)
        active = int((mean.var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum())
        # k samples for each of `batch` images at a time: [chunk, batch, 784] stays ~40 MB
        batch = max(1, min(len(x), 25_000 // min(k, 500)))
        iw = torch.cat(
            [
                importance_weighted_nll(model, x[i : i + batch], k)
                for i in tqdm(
                    range(0, len(x), batch),
                    desc=f"IW k={k}",
                    leave=False,
                    disable=None if progress else True,
                )
            ]
        )
    return {
        "negative_elbo": float((rec + kl).mean()),
        "reconstruction": float(rec.mean()),
        "kl": float(kl.mean()),
        "active_units": float(active),
        "iw_nll": float(iw.mean()),
        "iw_nll_stderr": float(iw.std() / len(iw) ** 0.5),  # spread over the test images
        "iw_k": float(k),
        "test_images": float(len(x)),
        "evaluation_seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------- pictures


def tile(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[rows * cols, 784] in [0, 1] -> one image with a 1-pixel light gap between digits."""
    h, w = IMAGE_SHAPE
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 0.5, dtype=np.float32)
    for i, image in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image.reshape(h, w)
    return grid


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
        ax.imshow(tile(images, 8, 8), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    save(fig, "reconstructions.png")

    z = torch.randn((100, model.config.latent_size), generator=generator)
    fig, ax = plt.subplots(figsize=(6, 6.3))
    ax.imshow(tile(torch.sigmoid(model.decoder(z)).numpy(), 10, 10), cmap="gray", vmin=0, vmax=1)
    ax.set_title("samples from the prior (Bernoulli means)")
    ax.axis("off")
    save(fig, "samples.png")

    if model.config.latent_size == 2:  # Kingma & Welling's figure: decode a grid of quantiles
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 20))
        grid = torch.stack(torch.meshgrid(q, -q, indexing="xy"), dim=-1).reshape(-1, 2)
        fig, ax = plt.subplots(figsize=(8, 8.3))
        ax.imshow(tile(torch.sigmoid(model.decoder(grid)).numpy(), 20, 20), cmap="gray")
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


# ---------------------------------------------------------------------------- command line


def evaluate_checkpoint(
    checkpoint: Path, k: int, data_dir: Path | None = None, seed: int = 0
) -> dict[str, Any]:
    """Load a checkpoint and its data, evaluate, and say how the model was trained."""
    from export.train import (  # the checkpoint format lives beside the code that writes it
        dataset_from_checkpoint,
        load_checkpoint,
        model_from_checkpoint,
        training_summary,
    )

    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    dataset = dataset_from_checkpoint(state, data_dir)
    x = torch.from_numpy(binarized_test_set(dataset))
    print(f"evaluating {checkpoint} on {len(x)} test images with k={k}", flush=True)
    metrics = evaluate(model, x, k, seed=seed)
    return {
        "metrics": metrics,
        "training": training_summary(state),
        "config": state["config"],
        "checkpoint": str(checkpoint),
        "test_data": dataset.description,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()),
        },
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vae-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, help="default: the data the checkpoint was trained on")
    p.add_argument("--k", type=int, default=5000, help="importance samples (5000 for reports)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 on free cores)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = evaluate_checkpoint(args.checkpoint, args.k, args.data_dir, args.seed)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
