"""Random meta-batches shared by the fast-sweep test files (on sys.path through conftest.py)."""

from __future__ import annotations

import numpy as np

import fastmaml


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


def ragged_index(seed=2):
    """Five ragged index-form binary tasks over one (40, 21) dataset.

    Returns (tasks, theta, parts) with parts = (X, sidx, sy, qidx, qy, sptr,
    qptr) for the reference's gather; support sizes include 1, query sizes 1.
    """
    rng = np.random.default_rng(seed)
    d = 21
    X = rng.normal(size=(40, d))
    ns, ms = np.array([1, 6, 3, 9, 4]), np.array([2, 1, 7, 5, 3])
    sptr, qptr = np.r_[0, np.cumsum(ns)], np.r_[0, np.cumsum(ms)]
    sidx, qidx = rng.integers(0, 40, sptr[-1]), rng.integers(0, 40, qptr[-1])
    sy, qy = rng.integers(0, 2, sidx.shape), rng.integers(0, 2, qidx.shape)
    tasks = fastmaml.Tasks.from_index(X, sidx, sy, qidx, qy, support_ptr=sptr, query_ptr=qptr)
    theta = rng.normal(size=d + 1) * 0.3
    return tasks, theta, (X, sidx, sy, qidx, qy, sptr, qptr)


def fold(slots):
    """The core's reduction of per-task slots: per block of REDUCE_BLOCK tasks, added in task order from 0.0."""
    from fastmaml.functional import REDUCE_BLOCK

    out = []
    for b0 in range(0, len(slots), REDUCE_BLOCK):
        acc = np.zeros(slots.shape[1])
        for s in slots[b0:b0 + REDUCE_BLOCK]:
            acc = acc + s
        out.append(acc)
    return np.array(out)
