"""Shared fixtures: a tiny VAE exported to ONNX once per session, so no test waits for training."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The version directory `<repo>/tiny-vae/1/` of a random 784-32-4 VAE (exports in well
    under a second). Read-only: copy it to tamper with it."""
    import torch

    from export.model import VAE, VAEConfig
    from export.onnx_export import export_version

    repo = tmp_path_factory.mktemp("model-repo")
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_size=4, hidden_sizes=(32,)))
    return export_version(model, repo, "tiny-vae", metrics={"negative_elbo": 543.21})
