"""The functional core: exact MAML maths for binary logistic regression.

Every function validates its arguments here (naming the argument at fault),
converts once, and makes one call into the compiled core for the whole batch.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Union

import numpy as np

from . import _core
from ._tasks import Tasks
from ._validation import as_feature_array, as_labels, check_float, check_int, check_threads, shape_str

__all__ = [
    "MetaGradient",
    "meta_value_and_grad",
    "adapt",
    "predict_proba",
    "loss_and_grad",
    "hessian_vector_product",
    "DivergenceError",
]

DivergenceError = _core.DivergenceError

ArrayOrFloat = Union[float, np.ndarray]


@dataclass(frozen=True)
class MetaGradient:
    """Meta-loss and its exact gradients for one meta-batch.

    Attributes
    ----------
    loss : float
        Mean over tasks of the query loss after the inner loop.
    grad : ndarray, shaped like theta
        d loss / d theta.
    grad_inner_lr : float or ndarray, shaped like inner_lr
        d loss / d inner_lr (a float when inner_lr was a Python scalar).
    grad_l2 : float
        d loss / d l2.
    """

    loss: float
    grad: np.ndarray
    grad_inner_lr: ArrayOrFloat
    grad_l2: float


def _as_tasks(tasks) -> Tasks:
    if isinstance(tasks, Tasks):
        return tasks
    if isinstance(tasks, (tuple, list)) and len(tasks) == 4:
        return Tasks(*tasks)
    raise TypeError(
        "tasks: expected a fastmaml.Tasks or a 4-tuple (support_X, support_y, query_X, query_y), "
        f"got {type(tasks).__name__}"
    )


def _prepare_theta(theta, n_features: int, dtype) -> np.ndarray:
    if isinstance(theta, (str, bytes)):
        raise TypeError(f"theta: expected a numeric array, got {type(theta).__name__}")
    arr = np.asarray(theta)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"theta: expected a numeric array, got dtype {arr.dtype}")
    D = n_features + 1
    if arr.shape != (D,):
        if arr.ndim == 2 and arr.shape[0] == D:
            raise ValueError(
                f"theta: multinomial parameters of shape {shape_str(arr.shape)} are not supported by this "
                f"version; use a binary theta of shape ({D},)"
            )
        raise ValueError(
            f"theta: expected shape ({D},) = (n_features + 1,) with the bias last, got {shape_str(arr.shape)}"
        )
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        raise ValueError("theta: contains NaN or infinity")
    return arr


def _prepare_inner_lr(inner_lr, inner_steps: int, theta_shape: tuple, dtype):
    """Broadcast inner_lr to its (K, *theta_shape) table.

    Returns (table, lr_steps, lr_params, original shape, scalar_in).
    lr_steps / lr_params say whether the gradient varies along the step and
    the parameter axis; the core reduces over the others.
    """
    scalar_in = isinstance(inner_lr, numbers.Real) and not isinstance(inner_lr, np.ndarray)
    if isinstance(inner_lr, bool) or isinstance(inner_lr, (str, bytes)):
        raise TypeError(f"inner_lr: expected a number or an array of numbers, got {inner_lr!r}")
    arr = np.asarray(inner_lr)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"inner_lr: expected a number or an array of numbers, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("inner_lr: contains NaN or infinity")
    K = inner_steps
    full = (K,) + tuple(theta_shape)
    try:
        ok = np.broadcast_shapes(arr.shape, full) == full
    except ValueError:
        ok = False
    if not ok:
        hint = ""
        if arr.ndim == 1:
            hint = (
                f"; a 1-d inner_lr is read as per parameter and must have {full[-1]} entries"
                f" — for one step size per inner step use shape ({arr.shape[0]}, 1)"
            )
        raise ValueError(
            f"inner_lr: shape {shape_str(arr.shape)} does not broadcast to (inner_steps, *theta.shape) = "
            f"{shape_str(full)}{hint}"
        )
    padded = (1,) * (len(full) - arr.ndim) + arr.shape
    lr_steps = K if (K > 1 and padded[0] == K) else 1
    lr_params = full[1] if padded[1] == full[1] and full[1] > 1 else 1
    table = np.ascontiguousarray(np.broadcast_to(arr.astype(dtype, copy=False), full))
    return table, lr_steps, lr_params, arr.shape, scalar_in


def _unreduce_lr_grad(grad_lr: np.ndarray, lr_steps: int, lr_params: int, shape: tuple, inner_steps: int, scalar_in: bool):
    if len(shape) == 0:
        value = grad_lr.reshape(())
        return float(value) if scalar_in else value.copy()
    padded = (1,) * (2 - len(shape)) + tuple(shape)
    out = grad_lr.reshape(lr_steps, lr_params)
    # A length-1 axis of inner_lr that stands for K (or D) entries was summed
    # by the core already; what is left has inner_lr's own sizes.
    return out.reshape(padded).reshape(shape)


def meta_value_and_grad(
    theta,
    tasks,
    *,
    inner_lr,
    inner_steps: int,
    l2: float = 0.0,
    first_order: bool = False,
    n_threads=None,
) -> MetaGradient:
    """Exact MAML meta-loss and gradients for a meta-batch of binary tasks.

    For each task t the inner loop runs ``inner_steps`` gradient steps on the
    support loss (with L2 penalty ``l2/2 ||w||^2``, weights only) from
    ``theta``; the meta-loss is the mean over tasks of the query loss at the
    adapted parameters. Gradients are exact (second order) unless
    ``first_order`` is set (first-order MAML drops the Hessian terms).

    Parameters
    ----------
    theta : array_like of shape (n_features + 1,)
        Initial parameters ``[w, b]``, bias last.
    tasks : Tasks or tuple (support_X, support_y, query_X, query_y)
        Arrays of shape (n_tasks, n_support, n_features), (n_tasks, n_support),
        (n_tasks, n_query, n_features), (n_tasks, n_query). Labels are 0/1.
    inner_lr : float or array_like
        Inner step size, broadcast to (inner_steps, n_features + 1): a scalar,
        per parameter (n_features + 1,), per step (inner_steps, 1), or per step
        and parameter (inner_steps, n_features + 1). Its meaning depends on the
        feature scale (the bundled datasets scale features to [0, 1]).
    inner_steps : int
        Number of inner gradient steps K >= 0.
    l2 : float, default=0.0
        L2 strength of the support loss (weights only, never the bias).
    first_order : bool, default=False
        First-order MAML (drops the Hessian-vector products).
    n_threads : int or None
        OpenMP threads across tasks; None uses OpenMP's default. The result
        does not depend on it (bitwise).

    Returns
    -------
    MetaGradient
        ``.loss``, ``.grad`` (shaped like theta), ``.grad_inner_lr`` (shaped
        like inner_lr), ``.grad_l2``.

    Raises
    ------
    DivergenceError
        If the inner loop produces non-finite parameters (names task and step).
    """
    ts = _as_tasks(tasks)
    K = check_int(inner_steps, "inner_steps", minimum=0)
    lam = check_float(l2, "l2", minimum=0.0)
    nt = check_threads(n_threads)
    dtype = ts.dtype
    theta_c = _prepare_theta(theta, ts.n_features, dtype)
    table, ks, ps, lr_shape, scalar_in = _prepare_inner_lr(inner_lr, K, theta_c.shape, dtype)
    loss, grad, grad_lr, grad_l2 = _core.meta_value_and_grad(
        theta_c, table, ks, ps, K, lam, bool(first_order), nt, *ts.support.core_args(), *ts.query.core_args()
    )
    return MetaGradient(
        loss=float(loss),
        grad=grad.reshape(theta_c.shape),
        grad_inner_lr=_unreduce_lr_grad(grad_lr, ks, ps, lr_shape, K, scalar_in),
        grad_l2=float(grad_l2),
    )


def _support_side(X, y):
    """(side args, single) for adapt and the primitives: X (n,d) / (T,n,d) / Tasks."""
    if isinstance(X, Tasks):
        if y is not None:
            raise ValueError("y: must be None when X is a Tasks (its support labels are used)")
        return X.support, False, X.dtype, X.n_features, X.n_tasks
    Xa = as_feature_array(X, "X", ndim=(2, 3))
    single = Xa.ndim == 2
    if single:
        Xa = Xa[None]
    T, n, d = Xa.shape
    ya = as_labels(y, "y", shape=(n,) if single else (T, n))
    from ._tasks import _Side

    side = _Side(Xa, None, np.arange(T + 1, dtype=np.int64) * n, ya.reshape(-1))
    return side, single, Xa.dtype, d, T


def adapt(theta, X, y=None, *, inner_lr, inner_steps: int, l2: float = 0.0, return_path: bool = False, n_threads=None):
    """Run the inner loop: K gradient steps on the support loss from theta.

    Parameters
    ----------
    theta : array_like of shape (n_features + 1,)
    X : array_like of shape (n, n_features) for one task, (n_tasks, n, n_features)
        for a batch, or a Tasks (its support sets are used; pass y=None).
    y : array_like of shape (n,) or (n_tasks, n)
    inner_lr, inner_steps, l2, n_threads
        As in :func:`meta_value_and_grad`.
    return_path : bool, default=False
        Return every phi_j, j = 0..K, not just phi_K.

    Returns
    -------
    ndarray
        phi_K of shape theta.shape (one task) or (n_tasks, *theta.shape); with
        ``return_path`` an extra axis of length K + 1 before theta's axes.
    """
    side, single, dtype, d, T = _support_side(X, y)
    K = check_int(inner_steps, "inner_steps", minimum=0)
    lam = check_float(l2, "l2", minimum=0.0)
    nt = check_threads(n_threads)
    theta_c = _prepare_theta(theta, d, dtype)
    table, _, _, _, _ = _prepare_inner_lr(inner_lr, K, theta_c.shape, dtype)
    out = _core.adapt(theta_c, False, table, K, lam, bool(return_path), nt, *side.core_args())
    return out[0] if single else out


def predict_proba(params, X):
    """P(y = 1 | x) for binary logistic parameters.

    Parameters
    ----------
    params : array_like of shape (n_features + 1,) or (n_tasks, n_features + 1)
    X : array_like of shape (n, n_features) or (n_tasks, n, n_features)

    Returns
    -------
    ndarray of shape (n,) or (n_tasks, n)
    """
    Xa = as_feature_array(X, "X", ndim=(2, 3))
    P = np.asarray(params)
    if P.dtype.kind not in "biuf":
        raise TypeError(f"params: expected a numeric array, got dtype {P.dtype}")
    P = P.astype(Xa.dtype, copy=False)
    d = Xa.shape[-1]
    if P.shape[-1] != d + 1 or P.ndim not in (1, 2):
        raise ValueError(f"params: expected shape ({d + 1},) or (n_tasks, {d + 1}), got {shape_str(P.shape)}")
    if P.ndim == 2 and (Xa.ndim != 3 or Xa.shape[0] != P.shape[0]):
        raise ValueError(f"X: per-task params {shape_str(P.shape)} need X of shape ({P.shape[0]}, n, {d})")
    if P.ndim == 1:
        z = Xa @ P[:-1] + P[-1]
    else:
        z = np.einsum("tnd,td->tn", Xa, P[:, :-1]) + P[:, -1:]
    return _stable_sigmoid(z)


def _stable_sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _primitive(params, X, y, v, l2, n_threads):
    side, single, dtype, d, T = _support_side(X, y)
    lam = check_float(l2, "l2", minimum=0.0)
    nt = check_threads(n_threads)
    D = d + 1
    want = (D,) if single else (T, D)
    P = np.asarray(params)
    if P.dtype.kind not in "biuf":
        raise TypeError(f"params: expected a numeric array, got dtype {P.dtype}")
    if P.shape != want:
        raise ValueError(f"params: expected shape {shape_str(want)}, got {shape_str(P.shape)}")
    P = np.ascontiguousarray(P, dtype=dtype)
    if not np.isfinite(P).all():
        raise ValueError("params: contains NaN or infinity")
    V = None
    if v is not None:
        V = np.asarray(v)
        if V.shape != want:
            raise ValueError(f"v: expected shape {shape_str(want)}, got {shape_str(V.shape)}")
        V = np.ascontiguousarray(V, dtype=dtype)
        if not np.isfinite(V).all():
            raise ValueError("v: contains NaN or infinity")
    loss, out = _core.loss_grad_hvp(P, V, lam, nt, *side.core_args())
    if single:
        return float(loss[0]), out[0]
    return loss, out


def loss_and_grad(params, X, y=None, *, l2: float = 0.0, n_threads=None):
    """Support loss (with L2 on the weights) and its gradient, batched.

    Parameters
    ----------
    params : array_like of shape (n_features + 1,) or (n_tasks, n_features + 1)
        One parameter vector per task.
    X : array_like of shape (n, n_features) or (n_tasks, n, n_features), or Tasks
    y : array_like of shape (n,) or (n_tasks, n)

    Returns
    -------
    loss : float or ndarray of shape (n_tasks,)
    grad : ndarray shaped like params
    """
    return _primitive(params, X, y, None, l2, n_threads)


def hessian_vector_product(params, X, y=None, v=None, *, l2: float = 0.0, n_threads=None):
    """Hessian of the support loss (with L2) at params, times v; batched.

    Parameters
    ----------
    params, v : array_like of shape (n_features + 1,) or (n_tasks, n_features + 1)
    X, y : as in :func:`loss_and_grad`

    Returns
    -------
    ndarray shaped like params
    """
    if v is None:
        raise TypeError("v: the vector to multiply is required")
    return _primitive(params, X, y, v, l2, n_threads)[1]
