"""Synthetic two-task regression data with controlled task correlation.

Follows Ma et al., "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts" (KDD 2018), section 4.1:

1. draw two orthogonal unit vectors u1, u2 in R^d;
2. w1 = c * u1 and w2 = c * (rho * u1 + sqrt(1 - rho^2) * u2), so the cosine
   similarity of the two tasks' weight vectors is rho;
3. draw x ~ N(0, I_d);
4. y_i = w_i^T x + sum_{j=1..m} sin(alpha_j * w_i^T x + beta_j) + eps_i, where
   "alpha_j, beta_j, j = 1..m are given parameters that control the shape of
   the sinusoidal functions" and eps_1, eps_2 ~ i.i.d. N(0, 0.01).

Choices where the paper leaves room, and why:

- alpha, beta are *given* parameters, so they are drawn once from N(0, 1)
  (as the drawbridge/keras-mmoe reference does, once per script) with their
  own seed `sin_seed` and are the same for every `seed` and every `rho`. Only
  u1, u2, x and the noise change with `seed` ("independent random data
  generation" per run). Both tasks then share one label function
  f(z) = z + sum_j sin(alpha_j z + beta_j) of a N(0, c^2) projection, so the
  tasks differ only by the direction they project on, and the losses of
  different rho and seeds are on one scale.
- N(0, 0.01) is read as variance 0.01 (the usual N(mean, variance)), i.e.
  noise standard deviation 0.1, which is also the reference's `scale=0.1`.
- c = 1 and m = 10 are defaults (arguments); the reference uses c = 0.3, m = 5.
- For one `seed`, u1, u2, x and the noise do not depend on rho (common random
  numbers), so datasets of different rho differ only through w2.

The sine terms make the tasks non-linear so that rho is only a proxy for the
label correlation (the paper's figure 2 plots one against the other).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

SIN_SEED = 0  # seed of the fixed sine parameters; not tuned (the first seed)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def sine_parameters(num_sin: int = 10, sin_seed: int = SIN_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """The fixed (alpha [m], beta [m]) of the label function, each drawn from N(0, 1)."""
    _check_int("num_sin", num_sin, 0)
    rng = np.random.default_rng(sin_seed)
    alpha = rng.standard_normal(num_sin)
    beta = rng.standard_normal(num_sin)
    return alpha, beta


def label_function(z: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """f(z) = z + sum_j sin(alpha_j * z + beta_j), without noise."""
    z = np.asarray(z, dtype=np.float64)
    return z + np.sin(np.multiply.outer(z, alpha) + beta).sum(axis=-1)


def task_weights(rho: float, dim: int = 100, c: float = 1.0, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(w1, w2): |w1| = |w2| = c and cos(w1, w2) = rho (steps 1 and 2)."""
    if not (isinstance(rho, (int, float, np.floating, np.integer)) and -1.0 <= rho <= 1.0):
        raise ValueError(f"rho must be in [-1, 1], got {rho!r}")
    _check_int("dim", dim, 2)  # two orthogonal directions are needed
    if not (isinstance(c, (int, float, np.floating, np.integer)) and math.isfinite(c) and c > 0):
        raise ValueError(f"c must be a finite number > 0, got {c!r}")
    rng = np.random.default_rng(seed)
    # QR of a Gaussian matrix gives an orthonormal pair, uniformly oriented.
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    return c * u1, c * (rho * u1 + math.sqrt(1.0 - rho ** 2) * u2)


def make_synthetic(n: int, rho: float, dim: int = 100, num_sin: int = 10, c: float = 1.0, seed: int = 0,
                   noise: float = 0.1, sin_seed: int = SIN_SEED) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (X [n, dim] float32, y1 [n] float32, y2 [n] float32).

    rho in [-1, 1] is the cosine similarity between the tasks' weight vectors;
    `noise` is the standard deviation of the Gaussian label noise (the paper's
    N(0, 0.01) is variance 0.01, so 0.1). `seed` draws the directions, inputs
    and noise; `sin_seed` the sine parameters shared by all seeds and rhos.
    The same arguments always give the same data.
    """
    _check_int("n", n, 1)
    if not (isinstance(noise, (int, float, np.floating, np.integer)) and noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    w1, w2 = task_weights(rho, dim=dim, c=c, seed=seed)
    alpha, beta = sine_parameters(num_sin, sin_seed)
    # A separate stream for x and noise, so they do not depend on rho or on the sine parameters.
    rng = np.random.default_rng([seed, 1])
    x = rng.standard_normal((n, dim))
    eps = noise * rng.standard_normal((2, n))
    y1 = label_function(x @ w1, alpha, beta) + eps[0]
    y2 = label_function(x @ w2, alpha, beta) + eps[1]
    return x.astype(np.float32), y1.astype(np.float32), y2.astype(np.float32)
