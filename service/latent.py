"""Walking the latent space and scoring images: the math behind Interpolate, Score and the
exploration commands of `vae-client`. numpy only (the serving image has neither torch nor scipy).

Paths and grids return float32 latents ready for the decoder; scores are computed in float64
from the decoder's logits, never from its probabilities (log(sigmoid(l)) loses everything once
sigmoid(l) rounds to 0 or 1 in float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LOG_2PI = math.log(2 * math.pi)
# Below this angle (radians) between two directions, slerp's 1/sin(omega) only amplifies
# rounding: the path is taken as linear (at 1e-4 rad the two differ by less than 1e-8).
PARALLEL_ANGLE = 1e-4
# Below this norm, a latent has no direction to interpolate: the path is linear.
TINY_NORM = 1e-12


# Paths


def _fractions(steps: int) -> np.ndarray:
    """t = 0, 1/(steps-1), ..., 1 as a float64 column [steps, 1]."""
    if steps < 2:
        raise ValueError(f"a path needs at least 2 steps (its endpoints), got {steps}")
    return np.linspace(0.0, 1.0, steps)[:, None]


def lerp(start: np.ndarray, end: np.ndarray, steps: int) -> np.ndarray:
    """The straight line from start to end [latent] in `steps` points: float32 [steps, latent]."""
    t = _fractions(steps)
    a, b = start.astype(np.float64), end.astype(np.float64)
    return ((1 - t) * a + t * b).astype(np.float32)


def _perpendicular(unit: np.ndarray) -> np.ndarray:
    """A fixed unit vector perpendicular to `unit` (Gram-Schmidt on the axis least along it)."""
    axis = np.zeros_like(unit)
    axis[np.argmin(np.abs(unit))] = 1.0
    other = axis - (axis @ unit) * unit
    return other / np.linalg.norm(other)


def slerp(start: np.ndarray, end: np.ndarray, steps: int) -> np.ndarray:
    """The spherical path from start to end [latent] in `steps` points: float32 [steps, latent].

    The direction turns along the great circle from start's to end's at a constant rate (slerp,
    Shoemake 1985) while the norm moves linearly between theirs, so every point's norm lies
    between the endpoints' norms; the plain slerp formula applied to vectors of unequal norms
    overshoots both once the angle passes 90 degrees. Near-parallel directions (or a zero
    endpoint, or a 1-D latent) take the linear path; opposite ones turn through a fixed
    perpendicular direction.
    """
    t = _fractions(steps)
    a, b = start.astype(np.float64), end.astype(np.float64)
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if a.size < 2 or min(norm_a, norm_b) < TINY_NORM:
        return lerp(start, end, steps)
    unit_a, unit_b = a / norm_a, b / norm_b
    omega = math.acos(min(1.0, max(-1.0, float(unit_a @ unit_b))))
    if omega < PARALLEL_ANGLE:
        directions = (1 - t) * unit_a + t * unit_b
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    elif math.pi - omega < PARALLEL_ANGLE:
        turn = math.pi * t
        directions = np.cos(turn) * unit_a + np.sin(turn) * _perpendicular(unit_a)
    else:
        directions = (np.sin((1 - t) * omega) * unit_a + np.sin(t * omega) * unit_b) / math.sin(
            omega
        )
    path = ((1 - t) * norm_a + t * norm_b) * directions
    path[0], path[-1] = a, b  # the endpoints exactly, not up to rounding
    return path.astype(np.float32)


# Directions and grids


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


# Scores


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), without overflow."""
    return np.logaddexp(0.0, x)


def bernoulli_log_likelihood(logits: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log p(x|z) per row, summed over pixels, from the decoder's logits l [..., 784] and targets
    x in [0, 1]: x log sigmoid(l) + (1 - x) log sigmoid(-l) = -x softplus(-l) - (1 - x)
    softplus(l), float64 and finite for any finite logits."""
    l64, x64 = logits.astype(np.float64), x.astype(np.float64)
    return -(x64 * softplus(-l64) + (1 - x64) * softplus(l64)).sum(axis=-1)


def log_normal(z: np.ndarray, mean: np.ndarray, log_variance: np.ndarray) -> np.ndarray:
    """log N(z; mean, diag(exp(log_variance))), summed over the last axis, float64."""
    z, mean, log_variance = (a.astype(np.float64) for a in (z, mean, log_variance))
    return -0.5 * (LOG_2PI + log_variance + (z - mean) ** 2 * np.exp(-log_variance)).sum(axis=-1)


def log_standard_normal(z: np.ndarray) -> np.ndarray:
    """log N(z; 0, I), summed over the last axis, float64."""
    z = z.astype(np.float64)
    return -0.5 * (LOG_2PI + z**2).sum(axis=-1)


def logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(a))) along `axis`, shifted by the maximum so nothing overflows."""
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(a - top), axis=axis))


@dataclass(frozen=True)
class Scores:
    """Per image, in nats: float64 [N] each; iw_nll is None when not asked for."""

    negative_elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    iw_nll: np.ndarray | None


def score(
    x: np.ndarray,
    mean: np.ndarray,
    log_variance: np.ndarray,
    z: np.ndarray,
    logits: np.ndarray,
    *,
    importance_weighted: bool,
) -> Scores:
    """Scores of images x [N, 784] from m draws z [N, m, latent] of q(z|x) = N(mean,
    exp(log_variance)) ([N, latent] each) and the decoder's logits at them [N * m, 784].

    With log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x): negative_elbo = -mean_i log w_i
    (= reconstruction + kl, both averaged over the same draws) and iw_nll = -log mean_i w_i
    (Burda et al. 2016). By Jensen's inequality iw_nll <= negative_elbo for every image, for
    the draws at hand, not only in expectation.
    """
    n, m, _ = z.shape
    log_px_z = bernoulli_log_likelihood(logits.reshape(n, m, -1), x[:, None, :])  # [N, m]
    log_pz = log_standard_normal(z)  # [N, m]
    log_qz_x = log_normal(z, mean[:, None, :], log_variance[:, None, :])  # [N, m]
    log_w = log_px_z + log_pz - log_qz_x
    negative_elbo = -log_w.mean(axis=1)
    iw_nll = None
    if importance_weighted:
        # Jensen holds exactly; the minimum only removes a last-bit rounding difference when
        # the weights are (nearly) equal.
        iw_nll = np.minimum(-(logsumexp(log_w, axis=1) - math.log(m)), negative_elbo)
    return Scores(
        negative_elbo=negative_elbo,
        reconstruction=-log_px_z.mean(axis=1),
        kl=(log_qz_x - log_pz).mean(axis=1),
        iw_nll=iw_nll,
    )
