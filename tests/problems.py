"""Random meta-batches shared by the fast-sweep test files (on sys.path through conftest.py)."""

from __future__ import annotations

import numpy as np


def dense(T, n, m, d, seed, dtype=np.float64):
    """(theta, (support_X, support_y, query_X, query_y)) of T dense binary tasks.

    Standard-normal features (so float32 sums are not helped by a [0, 1]
    scale), labels uniform in {0, 1}, theta with entries of scale 0.3.
    """
    rng = np.random.default_rng(seed)
    Xs = rng.normal(size=(T, n, d)).astype(dtype)
    Xq = rng.normal(size=(T, m, d)).astype(dtype)
    theta = (rng.normal(size=d + 1) * 0.3).astype(dtype)
    return theta, (Xs, rng.integers(0, 2, (T, n)), Xq, rng.integers(0, 2, (T, m)))
