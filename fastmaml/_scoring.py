"""Scoring adapted parameters on the query sets of a meta-batch."""

from __future__ import annotations

import numpy as np

from ._tasks import Tasks


def query_logits(params: np.ndarray, tasks: Tasks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of every query row under its task's parameters.

    Parameters
    ----------
    params : ndarray of shape (n_tasks, n_features + 1) or (n_tasks, n_features + 1, C)
    tasks : Tasks

    Returns
    -------
    z : ndarray of shape (total_query,) (binary) or (total_query, C)
    y : ndarray of shape (total_query,)
    ptr : ndarray of shape (n_tasks + 1,)
    """
    q = tasks.query
    d = tasks.n_features
    flat = q.X.reshape(-1, d)
    rows = flat[q.idx] if q.idx is not None else flat
    owner = np.repeat(np.arange(tasks.n_tasks), np.diff(q.ptr))
    params = np.asarray(params, dtype=np.float64)
    if params.ndim == 2:
        z = np.einsum("ij,ij->i", rows, params[owner, :-1], dtype=np.float64) + params[owner, -1]
    else:
        z = np.einsum("ij,ijc->ic", rows, params[owner, :-1], dtype=np.float64) + params[owner, -1]
    return z, q.y, q.ptr


def query_scores(params: np.ndarray, tasks: Tasks) -> dict:
    """Per-task query accuracy and log-loss of per-task parameters (binary or multinomial).

    Returns
    -------
    dict with ``accuracy`` and ``loss``, each an ndarray of shape (n_tasks,).
    """
    z, y, ptr = query_logits(params, tasks)
    if z.ndim == 1:
        correct = ((z > 0).astype(np.int32) == y).astype(np.float64)
        nll = np.logaddexp(0.0, z) - y * z
    else:
        correct = (np.argmax(z, axis=1) == y).astype(np.float64)
        zmax = z.max(axis=1)
        lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
        nll = lse - z[np.arange(z.shape[0]), y]
    counts = np.diff(ptr).astype(np.float64)
    starts = ptr[:-1]
    return {
        "accuracy": np.add.reduceat(correct, starts) / counts,
        "loss": np.add.reduceat(nll, starts) / counts,
    }


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of a normal 95% confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(values.size))
