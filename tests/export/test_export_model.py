"""The loss: closed-form KL, Bernoulli likelihood, and the importance-weighted bound."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from export.checkpoint import model_from_checkpoint
from export.model import (
    VAE,
    VAEConfig,
    gaussian_kl,
    importance_weighted_nll,
    log_normal,
    negative_elbo,
    reconstruction_nll,
)
from vae_data.mnist import Dataset, binarized_test_set


def test_kl_closed_form_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 5, generator=g, dtype=torch.float64)
    log_variance = torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.5
    n = 200_000
    z = mean + torch.exp(0.5 * log_variance) * torch.randn(
        n, 3, 5, generator=g, dtype=torch.float64
    )
    log_ratio = log_normal(z, mean, log_variance) - log_normal(z, torch.zeros(5), torch.zeros(5))
    monte_carlo = log_ratio.mean(0)
    tolerance = 5 * log_ratio.std(0) / math.sqrt(n)
    closed_form = gaussian_kl(mean, log_variance)
    assert torch.all((monte_carlo - closed_form).abs() < tolerance), (monte_carlo, closed_form)


def test_reconstruction_is_the_bernoulli_nll_and_stable() -> None:
    logits = torch.tensor([[-200.0, -3.0, 0.0, 2.5, 200.0]])
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]])
    expected = -torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    assert torch.allclose(reconstruction_nll(logits, x), expected)
    assert torch.isfinite(reconstruction_nll(logits, x)).all()


def test_negative_elbo_is_reconstruction_plus_kl() -> None:
    model = VAE(VAEConfig(latent_size=2, hidden_sizes=(16,)))
    x = (torch.rand(7, 784) < 0.2).float()
    loss, rec, kl = negative_elbo(*_forward(model, x))
    assert loss.shape == rec.shape == kl.shape == (7,)
    assert torch.allclose(loss, rec + kl)
    assert (kl >= 0).all()


def _forward(model: VAE, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    logits, mean, log_variance = model(x)
    return logits, x, mean, log_variance


@pytest.fixture(scope="module")
def fixed_model_and_images(
    trained: tuple[Path, dict[str, Any]], small_dataset: Dataset
) -> tuple[VAE, torch.Tensor]:
    _, state = trained
    return model_from_checkpoint(state), torch.from_numpy(binarized_test_set(small_dataset))[:100]


@torch.no_grad()
def test_elbo_is_below_the_iw_bound(fixed_model_and_images: tuple[VAE, torch.Tensor]) -> None:
    model, x = fixed_model_and_images
    torch.manual_seed(0)
    # E_q[-ELBO], averaged over 20 posterior samples an image, against k=50
    elbo_nll = torch.stack([negative_elbo(*_forward(model, x))[0] for _ in range(20)]).mean()
    iw_nll = importance_weighted_nll(model, x, k=50).mean()
    assert iw_nll < elbo_nll - 0.5, (float(iw_nll), float(elbo_nll))


@torch.no_grad()
def test_iw_bound_tightens_as_k_grows(fixed_model_and_images: tuple[VAE, torch.Tensor]) -> None:
    model, x = fixed_model_and_images
    torch.manual_seed(0)
    estimates = [float(importance_weighted_nll(model, x, k).mean()) for k in (1, 10, 100, 1000)]
    assert all(b <= a + 0.05 for a, b in itertools.pairwise(estimates)), estimates
    assert estimates[-1] < estimates[0] - 1.0, estimates


def test_config_round_trips_and_rejects_nonsense() -> None:
    config = VAEConfig(latent_size=2, hidden_sizes=(32, 16), activation="tanh")
    assert VAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="latent_size"):
        VAEConfig(latent_size=0)
    with pytest.raises(ValueError, match="activation"):
        VAEConfig(activation="sigmoidish")


def test_a_2d_latent_works() -> None:
    model = VAE(VAEConfig(latent_size=2, hidden_sizes=(32,)))
    logits, mean, log_variance = model(torch.rand(5, 784))
    assert logits.shape == (5, 784) and mean.shape == log_variance.shape == (5, 2)
