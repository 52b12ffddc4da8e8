"""The VAE (Kingma & Welling, 2014): an MLP encoder to a diagonal Gaussian q(z|x), an MLP
decoder to 784 Bernoulli logits p(x|z), and the negative ELBO that trains both."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SHAPE = (28, 28)
IMAGE_SIZE = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}


@dataclass(frozen=True)
class VAEConfig:
    latent_size: int = 32  # 2 works too, for the 2-D manifold pictures
    hidden_sizes: tuple[int, ...] = (512, 256)  # encoder widths; the decoder mirrors them
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.latent_size < 1:
            raise ValueError(f"latent_size must be >= 1, got {self.latent_size}")
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be positive widths, got {self.hidden_sizes}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "hidden_sizes": list(self.hidden_sizes)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> VAEConfig:
        return cls(
            latent_size=int(d["latent_size"]),  # type: ignore[call-overload]
            hidden_sizes=tuple(int(h) for h in d["hidden_sizes"]),  # type: ignore[attr-defined]
            activation=str(d["activation"]),
        )


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with the activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """image [N, 784] -> (mean, log_variance) [N, latent] of q(z|x)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.latent_size = config.latent_size
        self.body = mlp([IMAGE_SIZE, *config.hidden_sizes], config.activation)
        self.act = ACTIVATIONS[config.activation]()
        self.head = nn.Linear(config.hidden_sizes[-1], 2 * config.latent_size)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.act(self.body(image)))  # [N, 2 * latent]
        # Slices with constant bounds, not chunk(): the ONNX graph then declares [N, latent]
        # outputs (chunk exports a Split whose output widths ONNX leaves symbolic).
        return out[:, : self.latent_size], out[:, self.latent_size :]


class Decoder(nn.Module):
    """latent [N, latent] -> Bernoulli logits [N, 784] of p(x|z)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        sizes = [config.latent_size, *reversed(config.hidden_sizes), IMAGE_SIZE]
        self.net = mlp(sizes, config.activation)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @staticmethod
    def reparameterize(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        """z = mean + sigma * eps: the sample stays differentiable in mean and log_variance."""
        return mean + torch.exp(0.5 * log_variance) * torch.randn_like(mean)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_variance = self.encoder(x)
        logits = self.decoder(self.reparameterize(mean, log_variance))
        return logits, mean, log_variance


def reconstruction_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per image: Bernoulli NLL summed over pixels, from logits (stable)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def gaussian_kl(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_variance)) || N(0, I)) per image, in closed form.

    Kingma & Welling 2014, Appendix B: -1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2).
    """
    return -0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp()).sum(-1)


def negative_elbo(
    logits: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, kl) per image in nats; loss = reconstruction + kl."""
    rec = reconstruction_nll(logits, x)
    kl = gaussian_kl(mean, log_variance)
    return rec + kl, rec, kl


def log_normal(z: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(log_variance))), summed over the last axis."""
    return -0.5 * (
        math.log(2 * math.pi) + log_variance + (z - mean).pow(2) / log_variance.exp()
    ).sum(-1)


@torch.no_grad()
def importance_weighted_nll(model: VAE, x: torch.Tensor, k: int, chunk: int = 500) -> torch.Tensor:
    """-log p(x) per image, estimated with k importance samples from q(z|x) (Burda et al., 2016):
    -(logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log k). Tightens as k grows;
    with k=1 it is the (single-sample) negative ELBO."""
    mean, log_variance = model.encoder(x)
    zero = torch.zeros_like(mean)
    log_weights = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = torch.randn((n, *mean.shape), dtype=mean.dtype, device=mean.device)
        z = mean + torch.exp(0.5 * log_variance) * eps  # [n, N, latent]
        log_px_z = -reconstruction_nll(model.decoder(z), x.expand(n, *x.shape))
        log_pz = log_normal(z, zero, zero)
        log_qz_x = log_normal(z, mean, log_variance)
        log_weights.append(log_px_z + log_pz - log_qz_x)
    return -(torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k))
