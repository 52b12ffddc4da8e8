"""A real quality check on the trained default model (`make model`), through the server:
Decode(Encode(x)) reconstructs held-out test digits better than the mean training image does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from service_harness import running, tiny_settings

from export.manifest import ModelError, resolve_version
from vae_client.client import VaeClient

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "mnist-vae"


def bernoulli_nll(p: np.ndarray, x: np.ndarray) -> np.ndarray:
    """-log p(x) per image, in nats, of grey targets x under pixel Bernoullis p."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(axis=1)


def test_reconstructions_beat_the_mean_image() -> None:
    try:
        version = resolve_version(MODEL_DIR.parent, MODEL_DIR.name)
    except ModelError:
        pytest.skip(f"no trained default model in {MODEL_DIR} (`make model` trains one)")
    from vae_data.mnist import load_dataset

    data = json.loads((version / "manifest.json").read_text())["training"].get("data", {})
    data_dir = data.get("data_dir")
    if data_dir is not None and not Path(data_dir).is_dir():
        pytest.skip(f"the model was trained on {data_dir}, which is not here for its test set")
    dataset = load_dataset(Path(data_dir) if data_dir else None, verbose=False)
    x = dataset.test.images.astype(np.float32) / 255  # held out from training
    mean_image = dataset.train.images.mean(axis=0) / 255

    settings = tiny_settings(version, model_name=MODEL_DIR.name, metrics_port=-1)
    with running(settings) as served, VaeClient(served.target, timeout=60) as vae:
        latents = vae.encode(dataset.test.images).mean
        reconstructions = vae.decode(latents, image_format="probabilities").images
    assert isinstance(reconstructions, np.ndarray)
    recon = reconstructions.reshape(len(x), 784)

    nll_model, nll_mean = bernoulli_nll(recon, x), bernoulli_nll(mean_image[None, :], x)
    mse_model = ((recon - x) ** 2).mean(axis=1)
    mse_mean = ((mean_image[None, :] - x) ** 2).mean(axis=1)
    assert nll_model.mean() < nll_mean.mean()
    assert mse_model.mean() < mse_mean.mean()
    assert (nll_model < nll_mean).mean() > 0.5  # better on most digits, not only on average
