"""Fixtures for the export stage: a small slice of the embedded digits and one tiny trained VAE
shared by the tests, so no test waits for real training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from export.model import VAEConfig
from export.train import TrainSettings, train
from vae_data.mnist import Dataset, Split, load_dataset


def _head(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


@pytest.fixture(scope="session")
def small_dataset() -> Dataset:
    """600 train, 200 validation and 300 test images (enough for parity at batch 257)."""
    full = load_dataset(verbose=False)
    return Dataset(
        _head(full.train, 600),
        _head(full.validation, 200),
        _head(full.test, 300),
        {**full.description, "train": 600, "validation": 200, "test": 300},
    )


@pytest.fixture(scope="session")
def tiny_config() -> VAEConfig:
    return VAEConfig(latent_size=4, hidden_sizes=(64,), activation="gelu")


@pytest.fixture(scope="session")
def tiny_settings() -> TrainSettings:
    return TrainSettings(epochs=6, batch_size=50, lr=3e-3, kl_warmup_epochs=1, seed=0, threads=1)


@pytest.fixture(scope="session")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    small_dataset: Dataset,
    tiny_config: VAEConfig,
    tiny_settings: TrainSettings,
) -> tuple[Path, dict[str, Any]]:
    """(run directory, final state) of a tiny VAE trained for a few seconds."""
    out = tmp_path_factory.mktemp("tiny-run")
    state = train(tiny_settings, tiny_config, small_dataset, out)
    return out, state
