"""Directions and grids in the latent space, for the exploration commands of `vae-client`:
attribute vectors, traversals, the prior's quantile grid, the most active dimensions. Client-side
numpy: the server only decodes the latents these build.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np


def attribute_vector(group_a: np.ndarray, group_b: np.ndarray) -> np.ndarray:
    """The mean latent of group A minus that of group B ([N_a, latent], [N_b, latent]): adding
    it to a latent moves the decoded image from B's look towards A's (White 2016, "Sampling
    generative networks"; the smile and glasses vectors)."""
    return (
        group_a.astype(np.float64).mean(axis=0) - group_b.astype(np.float64).mean(axis=0)
    ).astype(np.float32)


def add_attribute(
    latents: np.ndarray, vector: np.ndarray, strengths: Sequence[float]
) -> np.ndarray:
    """latents [N, latent] + s * vector for each strength s: float32 [N, len(strengths), latent]."""
    s = np.asarray(strengths, dtype=np.float64)[None, :, None]
    return (latents.astype(np.float64)[:, None, :] + s * vector.astype(np.float64)).astype(
        np.float32
    )


def traversal(latent: np.ndarray, dims: Sequence[int], values: Sequence[float]) -> np.ndarray:
    """Row r sets dimension dims[r] of `latent` [latent] to each of `values` in turn, the other
    dimensions kept: float32 [len(dims), len(values), latent]."""
    grid = np.repeat(latent.astype(np.float32)[None, None, :], len(values), axis=1)
    grid = np.repeat(grid, len(dims), axis=0)
    for row, dim in enumerate(dims):
        grid[row, :, dim] = values
    return grid


def prior_quantiles(n: int) -> np.ndarray:
    """The standard normal's quantiles at (i + 1/2) / n, i = 0..n-1: float64 [n].

    The classic AEVB manifold picture (Kingma & Welling 2014, figure 4) spaces its grid this
    way, so each cell covers an equal share of the prior's mass.
    """
    normal = NormalDist()
    return np.array([normal.inv_cdf((i + 0.5) / n) for i in range(n)])


def plane(
    origin: np.ndarray, across: np.ndarray, down: np.ndarray, coordinates: np.ndarray
) -> np.ndarray:
    """A grid on the plane through `origin` spanned by `across` and `down` [latent]: cell (r, c)
    is origin + coordinates[c] * across + coordinates[-1 - r] * down, so the `down` coordinate
    grows upwards as on a plot. float32 [n, n, latent]."""
    c = coordinates.astype(np.float64)
    grid = (
        origin.astype(np.float64)[None, None, :]
        + c[None, :, None] * across.astype(np.float64)[None, None, :]
        + c[::-1][:, None, None] * down.astype(np.float64)[None, None, :]
    )
    return grid.astype(np.float32)


def manifold(latent_size: int, n: int, dims: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The n x n grid over the prior's quantiles in latent dimensions `dims`, the others 0 (for
    a 2-D latent, the whole latent space): float32 [n, n, latent_size]."""
    axes = np.eye(latent_size)
    return plane(np.zeros(latent_size), axes[dims[0]], axes[dims[1]], prior_quantiles(n))


def most_active(means: np.ndarray, count: int) -> list[int]:
    """The `count` latent dimensions whose posterior means vary most over a set of images
    [N, latent] (the "active units" of Burda et al. 2016; the rest the decoder ignores)."""
    variance = means.astype(np.float64).var(axis=0)
    return [int(d) for d in np.argsort(-variance, kind="stable")[:count]]


def ink_groups(
    images: np.ndarray, labels: np.ndarray, fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of thick- and thin-stroked digits: within each label, the `fraction` of images
    with the most ink and the `fraction` with the least, so both groups hold every digit alike
    and their difference is stroke weight rather than digit class."""
    ink = images.reshape(len(images), -1).astype(np.float64).sum(axis=1)
    thick, thin = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = members[np.argsort(ink[members], kind="stable")]
        take = max(1, int(len(order) * fraction))
        thin.append(order[:take])
        thick.append(order[-take:])
    return np.concatenate(thick), np.concatenate(thin)
