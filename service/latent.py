"""Paths through the latent space and image scores: the math behind Interpolate and Score.
numpy only (the serving image has neither torch nor scipy).

Paths return float32 latents ready for the decoder; scores are computed in float64
from the decoder's logits, never from its probabilities (log(sigmoid(l)) loses everything once
sigmoid(l) rounds to 0 or 1 in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# Scores


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), without overflow."""
    return np.logaddexp(0.0, x)


def bernoulli_log_likelihood(logits: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log p(x|z) per row, summed over pixels, from the decoder's logits l [..., pixels] and targets
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
    """Scores of images x [N, pixels] from m draws z [N, m, latent] of q(z|x) = N(mean,
    exp(log_variance)) ([N, latent] each) and the decoder's logits at them [N * m, pixels].

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
