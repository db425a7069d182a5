"""The link functions of the logistic model, in NumPy: one implementation for every caller.

:class:`fastmaml.LogisticModel`, :func:`fastmaml.predict_proba` and the scores
of :mod:`fastmaml.evaluation` turn logits into probabilities or losses here.
All are stable for any logit magnitude (no overflow, no NaN from ``exp`` of a
large logit) and compute in the dtype of the logits they are given.
"""

from __future__ import annotations

import math

import numpy as np


def sigmoid(z: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """P(y = 1) of binary logits ``scale * z`` (any shape): ``exp(-log(1 + exp(-scale z)))``.

    ``scale`` lets a caller whose logits overflow pass them scaled down
    (see :func:`logits`); the product may then be infinite, which gives
    exactly 0 or 1.
    """
    if scale != 1.0:
        with np.errstate(over="ignore"):
            z64 = z.astype(np.float64) * scale
        return np.exp(-np.logaddexp(0.0, -z64)).astype(z.dtype)
    return np.exp(-np.logaddexp(0.0, -z))


def softmax(z: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Class probabilities of multinomial logits ``scale * z`` with the classes on the last axis.

    Infinite logits give their limit: the classes whose logit is +inf share
    the probability, the others get 0 (never NaN).
    """
    if scale != 1.0:
        # Scaled logits come from an overflow: compute in float64, where the scale is finite.
        return _softmax(z.astype(np.float64), scale).astype(z.dtype, copy=False)
    return _softmax(z, 1.0)


def _softmax(z: np.ndarray, scale: float) -> np.ndarray:
    zmax = z.max(axis=-1, keepdims=True)
    if not np.isfinite(zmax).all():
        # +inf: the +inf classes share the mass; all -inf: the limit of equal logits (uniform).
        top, bottom = np.isposinf(zmax), np.isneginf(zmax)
        z = np.where(top, np.where(z == zmax, 0.0, -np.inf), np.where(bottom, 0.0, z)).astype(z.dtype, copy=False)
        zmax = np.where(top | bottom, 0.0, zmax).astype(z.dtype, copy=False)
    with np.errstate(over="ignore"):
        # z - zmax <= 0: scaled up it can only reach -inf, whose exp is 0.
        z = (z - zmax) * scale if scale != 1.0 else z - zmax
    ez = np.exp(z)
    return ez / ez.sum(axis=-1, keepdims=True)


def logits(X: np.ndarray, W: np.ndarray, b: np.ndarray, *, per_task: bool) -> tuple[np.ndarray, float]:
    """Logits ``X W + b`` as ``(z, scale)`` with ``scale * z`` the logits, never NaN for finite inputs.

    Parameters
    ----------
    X : ndarray of shape (n, d) or, with ``per_task``, (n_tasks, n, d)
    W : ndarray of shape (d,) / (d, C), or with ``per_task`` (n_tasks, d) / (n_tasks, d, C)
    b : ndarray of shape () / (C,), or with ``per_task`` (n_tasks,) / (n_tasks, C)
    per_task : bool
        Whether W and b lead with a task axis matching X's.

    Returns
    -------
    z : ndarray
        (n,) / (n, C), or (n_tasks, n) / (n_tasks, n, C) with ``per_task``.
    scale : float
        1.0 whenever the logits are finite (then z is exactly ``X W + b``).
        Finite but huge parameters or features can overflow ``X W`` (to inf,
        or NaN from inf - inf); then z is computed from X and the parameters
        scaled down by powers of two and ``scale`` restores the magnitude, so
        that :func:`sigmoid` and :func:`softmax` return the limit instead of NaN.
    """
    def product(Xs, Ws, bs):
        if per_task:
            return np.einsum("tnd,td...->tn...", Xs, Ws) + bs[:, None]
        return Xs @ Ws + bs

    with np.errstate(over="ignore", invalid="ignore"):
        z = product(X, W, b)
    if np.isfinite(z).all():
        return z, 1.0
    # Powers of two scale exactly; afterwards every term of the sum is at most 2 in magnitude.
    def exponent(a, dtype):
        top = max(float(np.abs(a).max(initial=0.0)), 1.0)
        return min(math.ceil(math.log2(top)), np.finfo(dtype).maxexp - 1)

    ex, ep = exponent(X, X.dtype), max(exponent(W, W.dtype), exponent(b, b.dtype))
    with np.errstate(under="ignore"):
        Xs = X / X.dtype.type(math.ldexp(1.0, ex))
        Ws = W / W.dtype.type(math.ldexp(1.0, ep))
        bs = b / b.dtype.type(math.ldexp(1.0, ep)) / b.dtype.type(math.ldexp(1.0, ex))
        z = product(Xs, Ws, bs)
    # A finite float64 scale (at most 2**1023): 0 * scale stays 0.
    return z, math.ldexp(1.0, min(ex + ep, 1023))


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
