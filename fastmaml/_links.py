"""The link functions of the logistic model, in NumPy: one implementation for every caller.

:class:`fastmaml.LogisticModel`, :func:`fastmaml.predict_proba` and the scores
of :mod:`fastmaml.evaluation` turn logits into probabilities or losses here.
All are stable for any logit magnitude (no overflow, no NaN from ``exp`` of a
large logit) and compute in the dtype of the logits they are given.
"""

from __future__ import annotations

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    """P(y = 1) of binary logits ``z`` (any shape): ``exp(-log(1 + exp(-z)))``."""
    return np.exp(-np.logaddexp(0.0, -z))


def softmax(z: np.ndarray) -> np.ndarray:
    """Class probabilities of multinomial logits ``z`` with the classes on the last axis."""
    z = z - z.max(axis=-1, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=-1, keepdims=True)


def row_log_loss(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each row.

    Parameters
    ----------
    z : ndarray of shape (n,) (binary) or (n, C) (multinomial)
        Logits.
    y : ndarray of int, shape (n,)
        Labels, 0/1 for binary logits, in ``[0, C)`` for multinomial ones.

    Returns
    -------
    ndarray of shape (n,)
        ``softplus(z) - y z`` (binary) or ``logsumexp(z) - z[y]`` (multinomial).
    """
    if z.ndim == 1:
        return np.logaddexp(0.0, z) - y * z
    zmax = z.max(axis=1)
    lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
    return lse - z[np.arange(z.shape[0]), y]


def row_correct(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1.0 where the most probable class of each row is its label, else 0.0: shape (n,)."""
    if z.ndim == 1:
        return ((z > 0).astype(np.int32) == y).astype(np.float64)
    return (np.argmax(z, axis=1) == y).astype(np.float64)
