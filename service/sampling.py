"""Seeded randomness and pixel conversions: pure numpy, shared by the servicer and the codec.

Every draw comes from its own stream of the request's seed (numpy's SeedSequence with a spawn
key per purpose), so the latents of Sample and the Bernoulli draws of IMAGE_FORMAT_BINARY never
share random numbers, and a result depends on the seed and the request alone: never on how
requests were batched together. Draws are row-major, so the first k rows of Sample(n, seed) are
Sample(k, seed).
"""

from __future__ import annotations

import secrets

import numpy as np

# Spawn keys: one independent stream per purpose.
PRIOR_STREAM = 0  # z ~ N(0, I) for Sample
POSTERIOR_STREAM = 1  # eps for Encode's samples
BERNOULLI_STREAM = 2  # pixel draws for IMAGE_FORMAT_BINARY


def pick_seed() -> int:
    """A fresh uint64 seed for a request that sent none (returned to the caller)."""
    return secrets.randbits(64)


def generator(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream,))))


def prior_latents(count: int, latent_size: int, seed: int, temperature: float) -> np.ndarray:
    """z ~ N(0, temperature^2 I): float32 [count, latent_size]."""
    z = generator(seed, PRIOR_STREAM).standard_normal((count, latent_size), dtype=np.float32)
    if temperature != 1.0:
        z *= np.float32(temperature)
    return z


def posterior_samples(
    mean: np.ndarray, log_variance: np.ndarray, samples_per_image: int, seed: int
) -> np.ndarray:
    """z = mean + exp(log_variance / 2) * eps (the reparameterization trick):
    float32 [N, samples_per_image, latent]."""
    n, latent = mean.shape
    eps = generator(seed, POSTERIOR_STREAM).standard_normal(
        (n, samples_per_image, latent), dtype=np.float32
    )
    std = np.exp(log_variance * np.float32(0.5))
    eps *= std[:, None, :]
    eps += mean[:, None, :]
    return eps


def to_uint8(probabilities: np.ndarray) -> np.ndarray:
    """round(255 * p) as uint8, p in [0, 1]: one scratch buffer, no Python loop."""
    scratch = np.multiply(probabilities, np.float32(255.0), dtype=np.float32)
    scratch += np.float32(0.5)
    out = np.empty(probabilities.shape, dtype=np.uint8)
    np.copyto(out, scratch, casting="unsafe")  # truncation of p*255 + 0.5 rounds half up
    return out


def bernoulli(probabilities: np.ndarray, seed: int) -> np.ndarray:
    """One binary image per row drawn from the pixel Bernoullis: uint8 of 0 and 1."""
    uniform = generator(seed, BERNOULLI_STREAM).random(probabilities.shape, dtype=np.float32)
    return np.less(uniform, probabilities).view(np.uint8)


def sigmoid_(logits: np.ndarray) -> np.ndarray:
    """The logistic function in place (the decoder's logits become Bernoulli probabilities)."""
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: 1/(1+inf) = 0
        np.negative(logits, out=logits)
        np.exp(logits, out=logits)
        logits += np.float32(1.0)
        np.reciprocal(logits, out=logits)
    return logits
