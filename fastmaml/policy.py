"""Per-task hyperparameters from a task's own support set: :class:`HyperPolicy`.

A policy maps a descriptor of a task's support data to that task's inner
step sizes (one per inner step) and L2 strength (docs/design.md, "The
hyperparameter policy"):

    z_t = clip((descriptor(support_t) - mean) / scale, -Z_CLIP, Z_CLIP)
    log alpha_{t,j} = a_j + B_j . z_t          (j = 0 .. inner_steps - 1)
    log lam_t       = c + e . z_t

``mean`` and ``scale`` are fixed from the meta-training tasks when fit starts
(and saved with the model); (a, B, c, e) are meta-learned with the
initialization by the chain rule through the core's exact per-task
hypergradients (``task_axis=True`` inner_lr and a per-task l2 of
:func:`fastmaml.meta_value_and_grad`). The intercepts start at log(inner_lr)
and log(l2) and the slopes at 0, so the untrained policy is the global
setting.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import numpy as np

from . import _core
from ._tasks import Tasks
from ._validation import check_bool, check_threads
from .functional import _prepare_theta, meta_value_and_grad

__all__ = ["HyperPolicy", "DESCRIPTOR_FEATURES", "support_descriptors", "task_descriptors"]

# The default descriptor's features, in column order.
DESCRIPTOR_FEATURES = (
    "log_support_size",
    "class_balance",
    "log_mean_sq_norm",
    "log_top_eigenvalue",
    "log_grad_norm_at_zero",
)
# Standardised descriptors are clipped to this many training standard
# deviations: a new task far outside the meta-training range gets the
# hyperparameters of the nearest edge of that range rather than an
# extrapolation of the affine map (exp of it could diverge the inner loop).
Z_CLIP = 4.0
_POWER_ITERATIONS = 12
# Parameter names of the policy inside MAML's parameter dict (saved as
# param.<name> and optimizer moments opt.m.<name> like every other parameter).
LR_INTERCEPT, LR_SLOPE = "policy_lr_intercept", "policy_lr_slope"
L2_INTERCEPT, L2_SLOPE = "policy_l2_intercept", "policy_l2_slope"
POLICY_KEYS = (LR_INTERCEPT, LR_SLOPE, L2_INTERCEPT, L2_SLOPE)


class HyperPolicy:
    """Per-task inner step sizes and L2 strength from a descriptor of the task's support set.

    Pass it to :class:`fastmaml.MAML` as ``hyper_policy``: the estimator then
    learns, jointly with the initialization, one log step size per inner step
    and (with ``learn_l2``) one log L2 strength per task, each an affine
    function of the task's standardised descriptor z_t:

    ``log alpha_{t,j} = a_j + B_j . z_t`` and ``log lam_t = c + e . z_t``.

    The intercepts start at ``log(inner_lr)`` and ``log(l2)`` and the slopes
    at 0, so before training every task gets the global setting. z_t is the
    descriptor minus its mean over the meta-training tasks, divided by its
    standard deviation there (both fixed when fit starts and saved with the
    model; a constant feature gets scale 1, so it is 0 for every task), and
    clipped to [-4, 4].

    Parameters
    ----------
    descriptor : "support" or callable, default="support"
        ``"support"``: the built-in features of the support set alone
        (:func:`support_descriptors`), five numbers per task:

        * ``log_support_size`` -- log n. How far a task's own gradient can be
          trusted: it averages n rows, so its noise shrinks like 1/sqrt(n) and
          a task with 4 rows wants shorter, more regularised steps than one
          with 400 (the losses are means, so the step's scale does not need
          n).
        * ``class_balance`` -- C times the smallest class's share of the
          support rows (1: balanced; towards 0: a class nearly absent). An
          unbalanced support set pulls the bias, and a few rows of the rare
          class are all the evidence there is.
        * ``log_mean_sq_norm`` -- log of the mean squared norm of the
          augmented rows [x, 1], i.e. log(trace(X~^T X~) / n): the scale of the
          curvature, an upper bound of the largest eigenvalue below.
        * ``log_top_eigenvalue`` -- log of the largest eigenvalue of
          X~^T X~ / n (power iteration, 12 steps from a fixed start). The
          support loss's Hessian is at most X~^T X~ / (4n) (binary; softmax
          likewise), so the stable step size is of order 1 / this eigenvalue:
          the natural unit of a step size. Its gap to ``log_mean_sq_norm``
          says how spread the spectrum is (how many directions a step moves).
        * ``log_grad_norm_at_zero`` -- log of the norm of the support loss's
          gradient at the zero start (binary: X~^T (1/2 - y) / n; softmax: the
          Frobenius norm of X~^T (1/C - Y) / n): how strongly the labels line
          up with the features, which falls with label noise and with n (the
          part due to chance shrinks like 1/sqrt(n)). It is taken at 0, not at
          theta, so it does not depend on the parameters being learned.

        None of these depends on theta, so theta's meta-gradient stays exact.
        Or a callable ``f(support_X, support_y) -> 1-D array`` of a fixed
        length (support_X of shape (n, n_features), float64; support_y of
        shape (n,), the task's integer class codes 0 .. C - 1). It is called
        once per task (Python), must return finite numbers and must not depend
        on the model. A saved model records its name (``__qualname__``) and
        :meth:`fastmaml.MAML.load` needs it passed again as ``descriptor=``.
    learn_l2 : bool, default=True
        Also learn a per-task L2 strength (needs ``MAML(l2=...) > 0`` to start,
        in log space). False keeps MAML's ``l2`` for every task.

    Examples
    --------
    >>> import fastmaml
    >>> X, y, groups = fastmaml.make_grouped_tasks(n_groups=60, n_per_group=(10, 200), random_state=0)
    >>> sampler = fastmaml.GroupedSampler(X, y, groups, support_size=0.5, random_state=0)
    >>> maml = fastmaml.MAML(hyper_policy=fastmaml.HyperPolicy(), inner_lr=0.3, l2=1e-3,
    ...                      n_iterations=20, meta_batch_size=8, random_state=0).fit(sampler)
    >>> model = maml.adapt(X[:12], y[:12])
    >>> model.inner_lr_.shape, model.descriptor_.shape
    ((5,), (5,))
    """

    def __init__(self, descriptor: Union[str, Callable] = "support", learn_l2: bool = True):
        self.descriptor = descriptor
        self.learn_l2 = learn_l2

    def get_params(self, deep: bool = True) -> dict:
        """``{"descriptor": ..., "learn_l2": ...}`` (scikit-learn's protocol, so ``clone`` works)."""
        return {"descriptor": self.descriptor, "learn_l2": self.learn_l2}

    def set_params(self, **params) -> "HyperPolicy":
        """Set ``descriptor`` and/or ``learn_l2``."""
        unknown = [k for k in params if k not in ("descriptor", "learn_l2")]
        if unknown:
            raise ValueError(f"set_params: unknown parameter(s) {', '.join(map(repr, unknown))} for HyperPolicy; "
                             "valid parameters are descriptor, learn_l2")
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        shown = []
        if not (isinstance(self.descriptor, str) and self.descriptor == "support"):
            shown.append(f"descriptor={self.descriptor_name if callable(self.descriptor) else repr(self.descriptor)}")
        if self.learn_l2 is not True:
            shown.append(f"learn_l2={self.learn_l2!r}")
        return f"HyperPolicy({', '.join(shown)})"

    def _check(self) -> None:
        """Raise a ValueError / TypeError naming the setting at fault."""
        d = self.descriptor
        if isinstance(d, str):
            if d != "support":
                raise ValueError(f"descriptor: expected 'support' or a callable f(support_X, support_y), got {d!r}")
        elif not callable(d):
            raise TypeError(f"descriptor: expected 'support' or a callable f(support_X, support_y), got {d!r}")
        check_bool(self.learn_l2, "learn_l2")

    @property
    def is_custom(self) -> bool:
        """Whether the descriptor is a user's callable (not the built-in ``"support"``)."""
        return not isinstance(self.descriptor, str)

    @property
    def descriptor_name(self) -> str:
        """``"support"`` or the callable's ``__qualname__`` (what a saved model records)."""
        d = self.descriptor
        if isinstance(d, str):
            return d
        return str(getattr(d, "__qualname__", None) or getattr(d, "__name__", None) or type(d).__name__)

    def _config(self) -> dict:
        """The JSON form saved with a model (a callable by name only)."""
        return {"descriptor": self.descriptor_name, "custom": self.is_custom, "learn_l2": bool(self.learn_l2)}

    @classmethod
    def _from_config(cls, cfg: dict, descriptor: Optional[Callable] = None, path=None) -> "HyperPolicy":
        """The policy of a saved configuration; a custom descriptor must be given again."""
        if not isinstance(cfg, dict) or not isinstance(cfg.get("descriptor"), str):
            raise ValueError(f"hyper_policy: unreadable saved policy {cfg!r}")
        where = f" {path!r}" if path is not None else ""
        if cfg.get("custom"):
            if descriptor is None:
                raise ValueError(
                    f"descriptor: the model{where} was saved with the custom descriptor {cfg['descriptor']!r}, "
                    f"which is not stored in the file; pass it again: MAML.load(path, descriptor={cfg['descriptor']})"
                )
            if not callable(descriptor):
                raise TypeError(f"descriptor: expected a callable f(support_X, support_y), got {descriptor!r}")
            desc = descriptor
        else:
            if descriptor is not None:
                raise ValueError(
                    f"descriptor: the model{where} uses the built-in {cfg['descriptor']!r} descriptor; "
                    "pass descriptor only for a model saved with a custom one"
                )
            desc = cfg["descriptor"]
        return cls(descriptor=desc, learn_l2=bool(cfg.get("learn_l2", True)))

    def describe(self, tasks: Tasks, n_classes: int = 2) -> np.ndarray:
        """The raw (not standardised) descriptor of every task: shape (n_tasks, n_descriptor)."""
        return task_descriptors(tasks, self.descriptor, n_classes=n_classes)


# ---------------------------------------------------------------------------
# descriptors
# ---------------------------------------------------------------------------


def _support_rows(side) -> tuple:
    """(rows float64 (R, d), labels (R,), ptr (T + 1,)) of a Tasks side, gathered once."""
    d = side.X.shape[-1]
    flat = side.X.reshape(-1, d)
    ptr = np.asarray(side.ptr, dtype=np.int64)
    rows = flat[side.idx] if side.idx is not None else flat[: int(ptr[-1])]
    return np.asarray(rows, dtype=np.float64), np.asarray(side.y), ptr


def _features_from_rows(rows: np.ndarray, y: np.ndarray, ptr: np.ndarray, n_classes: int) -> np.ndarray:
    """The built-in descriptor of T tasks given their flat support rows (vectorised, no Python per task).

    Every per-task number is a sum over that task's own rows in row order
    (``np.add.reduceat``) and per-row sums over features: the descriptor of a
    task does not depend on the other tasks of the batch nor on its form
    (dense, index, ragged), bitwise.
    """
    T = ptr.size - 1
    R, d = rows.shape
    D = d + 1
    n = np.diff(ptr).astype(np.float64)
    starts = ptr[:-1]
    seg = np.repeat(np.arange(T), np.diff(ptr))
    C = max(2, int(n_classes))
    aug = np.empty((R, D))
    aug[:, :d] = rows
    aug[:, d] = 1.0
    out = np.empty((T, len(DESCRIPTOR_FEATURES)))
    out[:, 0] = np.log(n)
    counts = np.bincount(seg * C + np.clip(y.astype(np.int64), 0, C - 1), minlength=T * C).reshape(T, C)
    out[:, 1] = C * counts.min(axis=1) / n
    sq = np.einsum("ij,ij->i", aug, aug)
    out[:, 2] = np.log(np.add.reduceat(sq, starts) / n)
    # power iteration on X~^T X~ / n, all tasks at once, from a fixed start
    # (positive, with a ramp so that it is not orthogonal to the top
    # eigenvector of any common structure)
    v = np.broadcast_to(1.0 + np.arange(D) / D, (T, D))
    v = v / np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
    lam = np.zeros(T)
    for _ in range(_POWER_ITERATIONS):
        r = np.einsum("ij,ij->i", aug, v[seg])
        u = np.add.reduceat(aug * r[:, None], starts, axis=0) / n[:, None]
        lam = np.einsum("ij,ij->i", u, v)
        norm = np.sqrt(np.einsum("ij,ij->i", u, u))
        norm[norm == 0] = 1.0
        v = u / norm[:, None]
    # X~^T X~ / n has the bias entry 1 on its diagonal, so lam >= 1 up to the power iteration's
    # convergence: the floor only guards a start orthogonal to every eigenvector with a large value
    out[:, 3] = np.log(np.maximum(lam, 1e-12))
    # support-loss gradient at phi = 0: X~^T (p0 - Y) / n with p0 = 1/2 (binary) or 1/C (softmax)
    if n_classes <= 2:
        resid = (0.5 - (y == 1)).astype(np.float64)
        g = np.add.reduceat(aug * resid[:, None], starts, axis=0) / n[:, None]
        gn = np.einsum("ij,ij->i", g, g)
    else:
        gn = np.zeros(T)
        for c in range(C):  # a loop over classes, not tasks
            resid = (1.0 / C - (y == c)).astype(np.float64)
            g = np.add.reduceat(aug * resid[:, None], starts, axis=0) / n[:, None]
            gn += np.einsum("ij,ij->i", g, g)
    out[:, 4] = np.log(np.sqrt(gn) + 1e-8)
    return out


def support_descriptors(tasks: Tasks, n_classes: int = 2) -> np.ndarray:
    """The built-in descriptor ``"support"`` of every task's support set.

    Parameters
    ----------
    tasks : Tasks
        Dense, index-form or ragged.
    n_classes : int, default=2
        The model's number of classes (2: binary).

    Returns
    -------
    ndarray of float64, shape (n_tasks, 5)
        Columns in the order of :data:`DESCRIPTOR_FEATURES` (see
        :class:`HyperPolicy` for what each measures and why).
    """
    if not isinstance(tasks, Tasks):
        raise TypeError(f"tasks: expected a Tasks, got {type(tasks).__name__}")
    rows, y, ptr = _support_rows(tasks.support)
    return _features_from_rows(rows, y, ptr, n_classes)


def _one_task_descriptor(X: np.ndarray, y: np.ndarray, descriptor, n_classes: int) -> np.ndarray:
    """The descriptor of one task (support_X (n, d), class codes y (n,)): shape (n_descriptor,)."""
    if isinstance(descriptor, str):
        rows = np.asarray(X, dtype=np.float64)
        return _features_from_rows(rows, np.asarray(y), np.array([0, rows.shape[0]], dtype=np.int64), n_classes)[0]
    return _call_descriptor(descriptor, np.asarray(X, dtype=np.float64), np.asarray(y), 0, None)


def _call_descriptor(f, X, y, t: int, length: Optional[int]) -> np.ndarray:
    """f(X, y) checked: a finite 1-D array of numbers (of ``length`` entries when given)."""
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__
    value = f(X, y)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"descriptor: {name}(support_X, support_y) must return a 1-D array of numbers, got {value!r} (task {t})"
        ) from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"descriptor: {name}(support_X, support_y) must return a non-empty 1-D array, got shape "
            f"{arr.shape} (task {t})"
        )
    if length is not None and arr.size != length:
        raise ValueError(
            f"descriptor: {name}(support_X, support_y) returned {arr.size} values for task {t}, expected {length} "
            "(a fixed length for every task, the length the model was fitted with)"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"descriptor: {name}(support_X, support_y) returned NaN or infinity for task {t}: {arr}")
    return arr


def task_descriptors(tasks: Tasks, descriptor="support", *, n_classes: int = 2, length: Optional[int] = None):
    """Raw descriptors of every task of a meta-batch.

    Parameters
    ----------
    tasks : Tasks
    descriptor : "support" or callable
        As in :class:`HyperPolicy`. The built-in one is vectorised over the
        batch; a callable is called once per task.
    n_classes : int, default=2
    length : int, optional
        The number of values expected (a fitted model's).

    Returns
    -------
    ndarray of float64, shape (n_tasks, n_descriptor)

    Raises
    ------
    ValueError
        Naming ``descriptor``: a callable that returns something other than a
        finite 1-D array of one fixed length.
    """
    if isinstance(descriptor, str):
        if descriptor != "support":
            raise ValueError(f"descriptor: expected 'support' or a callable, got {descriptor!r}")
        out = support_descriptors(tasks, n_classes)
        if length is not None and out.shape[1] != length:
            raise ValueError(f"descriptor: 'support' gives {out.shape[1]} values, the model expects {length}")
        return out
    rows = []
    for t in range(tasks.n_tasks):
        sX, sy = tasks.support.rows(t)
        arr = _call_descriptor(descriptor, np.asarray(sX, dtype=np.float64), np.asarray(sy), t, length)
        length = arr.size
        rows.append(arr)
    return np.stack(rows)


# ---------------------------------------------------------------------------
# the policy's maps and its chain rule
# ---------------------------------------------------------------------------


def standardisation(descriptors: np.ndarray) -> tuple:
    """(mean, scale) of meta-training descriptors (T, F); a constant feature gets scale 1."""
    mean = descriptors.mean(axis=0)
    scale = descriptors.std(axis=0)
    tiny = scale <= 1e-12 * np.maximum(1.0, np.abs(mean))
    scale[tiny] = 1.0
    return mean, scale


def standardise(descriptors: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """z = clip((descriptor - mean) / scale, -Z_CLIP, Z_CLIP), shape (T, F)."""
    return np.clip((np.asarray(descriptors, dtype=np.float64) - mean) / scale, -Z_CLIP, Z_CLIP)


def initial_params(inner_lr: np.ndarray, l2: float, n_descriptor: int, learn_l2: bool) -> dict:
    """The untrained policy: intercepts log(inner_lr) (per step) and log(l2), slopes 0."""
    K = inner_lr.size
    params = {LR_INTERCEPT: np.log(np.asarray(inner_lr, dtype=np.float64).reshape(K)),
              LR_SLOPE: np.zeros((K, n_descriptor))}
    if learn_l2:
        params[L2_INTERCEPT] = np.asarray(math.log(l2))
        params[L2_SLOPE] = np.zeros(n_descriptor)
    return params


def hyperparameters(params: dict, z: np.ndarray, l2: float) -> tuple:
    """(alpha (T, K), lam) of standardised descriptors z (T, F).

    lam is an array (T,) when the policy learns l2, else the float ``l2``.
    """
    alpha = np.exp(params[LR_INTERCEPT][None, :] + np.einsum("kf,tf->tk", params[LR_SLOPE], z))
    if L2_INTERCEPT in params:
        lam = np.exp(params[L2_INTERCEPT] + np.einsum("f,tf->t", params[L2_SLOPE], z))
    else:
        lam = float(l2)
    return alpha, lam


def chain_rule(params: dict, z: np.ndarray, alpha: np.ndarray, lam, grad_alpha: np.ndarray, grad_lam) -> dict:
    """Gradients of the policy's parameters from per-task hypergradients.

    With g_{t,j} = dL/dalpha_{t,j} * alpha_{t,j} (the gradient in log space):
    dL/da_j = sum_t g_{t,j}, dL/dB_j = sum_t g_{t,j} z_t, and likewise for
    (c, e) with dL/dlam_t * lam_t.
    """
    g = np.asarray(grad_alpha, dtype=np.float64).reshape(alpha.shape) * alpha
    grads = {LR_INTERCEPT: g.sum(axis=0), LR_SLOPE: np.einsum("tk,tf->kf", g, z)}
    if L2_INTERCEPT in params:
        h = np.asarray(grad_lam, dtype=np.float64).reshape(-1) * lam
        grads[L2_INTERCEPT] = np.asarray(h.sum())
        grads[L2_SLOPE] = np.einsum("t,tf->f", h, z)
    return grads


def policy_value_and_grad(theta, tasks: Tasks, params: dict, z: np.ndarray, *, inner_steps: int, l2: float,
                          first_order: bool = False, n_threads=None):
    """Meta-loss and gradients of theta and the policy's parameters for one meta-batch.

    Parameters
    ----------
    theta : ndarray of shape (n_features + 1,) or (n_features + 1, n_classes)
    tasks : Tasks
    params : dict
        The policy's parameters (:func:`initial_params`).
    z : ndarray of shape (n_tasks, n_descriptor)
        Standardised descriptors of the tasks.
    inner_steps : int
    l2 : float
        The fixed L2 strength when the policy does not learn it.

    Returns
    -------
    loss : float
    grad_theta : ndarray shaped like theta
    grads : dict
        Gradients of the policy's parameters (same keys and shapes).
    stats : dict
        ``inner_lr_mean`` and ``l2`` (mean over tasks) for the history.
    """
    theta = np.asarray(theta)
    alpha, lam = hyperparameters(params, z, l2)
    T, K = alpha.shape
    lr = alpha.reshape((T, K) + (1,) * theta.ndim)
    res = meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=inner_steps, l2=lam, task_axis=True,
                              first_order=first_order, n_threads=n_threads)
    grads = chain_rule(params, z, alpha, lam, res.grad_inner_lr, res.grad_l2)
    stats = {"inner_lr_mean": float(alpha.mean()), "l2": float(np.mean(lam))}
    return res.loss, np.asarray(res.grad, dtype=np.float64), grads, stats


def adapt_per_task(theta, side, alpha: np.ndarray, lam, *, inner_steps: int, n_threads=None,
                   return_path: bool = False) -> np.ndarray:
    """Adapt theta on every task of a support side, task t with its own step sizes alpha[t] and lam[t].

    One call of the core's inner loop per task (``fastmaml._core.adapt`` on a
    one-task view of the rows; no data is copied beyond the task's index and
    label slices): about as fast per task as one batched call for small
    tasks, and exactly the inner loop of :func:`fastmaml.adapt`.

    Parameters
    ----------
    theta : ndarray
    side : the ``support`` side of a Tasks
    alpha : ndarray of shape (n_tasks, inner_steps)
    lam : float or ndarray of shape (n_tasks,)

    Returns
    -------
    ndarray of shape (n_tasks, *theta.shape) or, with ``return_path``,
    (n_tasks, inner_steps + 1, *theta.shape)
    """
    X = side.X
    d = X.shape[-1]
    dtype = X.dtype
    th = _prepare_theta(theta, d, dtype)
    C = 1 if th.ndim == 1 else int(th.shape[1])
    T, K = alpha.shape
    if K != inner_steps:
        raise ValueError(f"inner_steps: the policy gives {K} step sizes per task, got inner_steps={inner_steps}")
    nt = check_threads(n_threads)
    flat = X.reshape(-1, d)
    ptr = np.asarray(side.ptr, dtype=np.int64)
    lam_t = np.broadcast_to(np.asarray(lam, dtype=np.float64), (T,))
    full = (K,) + th.shape
    ones = (K,) + (1,) * th.ndim
    with np.errstate(over="ignore"):
        tables = alpha.astype(dtype)
    if not np.isfinite(tables).all():
        raise ValueError(f"inner_lr: the policy's step sizes overflow the compute dtype {np.dtype(dtype)}")
    out = np.empty((T, K + 1) + th.shape if return_path else (T,) + th.shape, dtype=dtype)
    for t in range(T):
        lo, hi = int(ptr[t]), int(ptr[t + 1])
        local = np.array([0, hi - lo], dtype=np.int64)
        if side.idx is not None:
            task = _core.Side(flat, np.ascontiguousarray(side.idx[lo:hi]), local, np.ascontiguousarray(side.y[lo:hi]))
        else:
            task = _core.Side(flat[lo:hi], None, local, np.ascontiguousarray(side.y[lo:hi]))
        table = np.ascontiguousarray(np.broadcast_to(tables[t].reshape(ones), full))
        phi = _core.adapt(th, task, n_classes=C, inner_steps=K, l2=float(lam_t[t]), keep_path=bool(return_path),
                          n_threads=nt, inner_lr=table)
        out[t] = phi.reshape(out.shape[1:])
    return out
