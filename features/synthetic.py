"""Synthetic two-task regression data with controlled task correlation.

Follows Ma et al., "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts" (KDD 2018), section 4.1:

1. draw two orthogonal unit vectors u1, u2 in R^d;
2. w1 = c * u1 and w2 = c * (rho * u1 + sqrt(1 - rho^2) * u2), so the cosine
   similarity of the two tasks' weight vectors is rho;
3. draw x ~ N(0, I_d);
4. y_i = w_i^T x + sum_{j=1..m} sin(alpha_j * w_i^T x + beta_j) + eps_i, with
   alpha_j, beta_j ~ N(0, 1) shared by both tasks and eps_i ~ N(0, noise^2).

The sine terms make the tasks non-linear so that rho is only a proxy for the
label correlation; the paper uses it to show MMoE's advantage grows as task
correlation drops.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def make_synthetic(n: int, rho: float, dim: int = 100, num_sin: int = 10, c: float = 1.0, seed: int = 0,
                   noise: float = 0.01) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (X [n, dim] float32, y1 [n] float32, y2 [n] float32).

    rho in [-1, 1] is the cosine similarity between the tasks' weight vectors;
    `noise` is the standard deviation of the Gaussian label noise (the paper
    writes N(0, 0.01)).  The same seed always gives the same data.
    """
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not -1.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [-1, 1], got {rho!r}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2 (two orthogonal directions are needed), got {dim!r}")
    if num_sin < 0:
        raise ValueError(f"num_sin must be >= 0, got {num_sin!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    # QR of a Gaussian matrix gives an orthonormal pair, uniformly oriented.
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = c * u1
    w2 = c * (rho * u1 + np.sqrt(1.0 - rho ** 2) * u2)
    alpha = rng.standard_normal(num_sin)
    beta = rng.standard_normal(num_sin)
    x = rng.standard_normal((n, dim))

    def label(w: np.ndarray) -> np.ndarray:
        z = x @ w
        return z + np.sin(np.outer(z, alpha) + beta).sum(axis=1) + noise * rng.standard_normal(n)

    y1, y2 = label(w1), label(w2)
    return x.astype(np.float32), y1.astype(np.float32), y2.astype(np.float32)
