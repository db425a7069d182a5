"""The functional core: exact MAML maths for logistic regression, no state.

One call path: every entry point runs the same prologue (:func:`_prologue`),
which validates each argument once (naming it), converts once and returns a
:class:`_Call`; one call into the compiled core then serves the whole batch.
The core receives each side of the tasks as one ``_core.Side`` object, the
mode and the sweep as enums (``_core.Mode``, ``_core.Sweep``) and the rest
as named arguments; the bindings only re-check what guards memory.
:func:`choose_sweep` exposes the core's own choice between its exact paths.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import numpy as np

from . import _core, _links, _validation
from ._tasks import Tasks, _Side
from ._validation import (
    as_feature_array,
    as_labels,
    check_bool,
    check_float,
    check_int,
    check_memory,
    check_threads,
    shape_str,
)

__all__ = [
    "MetaGradient",
    "meta_value_and_grad",
    "adapt",
    "predict_proba",
    "loss_and_grad",
    "hessian_vector_product",
    "DivergenceError",
    "ForkWarning",
    "ReptileStep",
    "reptile_grad",
    "PreconditionedGradient",
    "precond_value_and_grad",
    "adapt_preconditioned",
    "ImplicitGradient",
    "imaml_value_and_grad",
    "ConvergenceWarning",
    "BlockSums",
    "REDUCE_BLOCK",
    "meta_block_sums",
    "combine_block_sums",
    "choose_sweep",
    "accumulate_feature_grads",
]

DivergenceError = _core.DivergenceError
# Warned once in a process forked after the core used OpenMP threads: calls
# there run serially, bitwise as before (docs/design.md section 4).
ForkWarning = _core.ForkWarning

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
        d loss / d inner_lr (a float when inner_lr was a Python scalar). With
        ``task_axis=True`` and a leading axis of length n_tasks, entry t is the
        derivative with respect to task t's own step sizes.
    grad_l2 : float or ndarray of shape (n_tasks,)
        d loss / d l2: a float for a scalar l2; for a per-task l2 of shape
        (n_tasks,), entry t is the derivative with respect to task t's own L2.
    grad_support_X : ndarray or None
        With ``grad_features=True``: d loss / d (every support feature value),
        one row per occurrence of a support row, shape (n_tasks, n_support,
        n_features) (dense tasks, and index-form tasks with one support size,
        in support_idx order) or (total_support, n_features) for ragged tasks
        (in flat support_idx order). None otherwise.
    grad_query_X : ndarray or None
        Likewise for the query rows: (n_tasks, n_query, n_features) or
        (total_query, n_features).
    """

    loss: float
    grad: np.ndarray
    grad_inner_lr: ArrayOrFloat
    grad_l2: ArrayOrFloat
    grad_support_X: Optional[np.ndarray] = None
    grad_query_X: Optional[np.ndarray] = None


def _as_tasks(tasks, check_finite: bool = True) -> Tasks:
    if isinstance(tasks, Tasks):
        return tasks
    if isinstance(tasks, (tuple, list)) and len(tasks) == 4:
        return Tasks(*tasks, check_finite=check_finite)
    raise TypeError(
        "tasks: expected a fastmaml.Tasks or a 4-tuple (support_X, support_y, query_X, query_y), "
        f"got {type(tasks).__name__}"
    )


def _all_finite(arr: np.ndarray) -> bool:
    """np.isfinite(arr).all(), in the core for C-contiguous float arrays (no temporary, no ufunc dispatch)."""
    ok = _core.all_finite(arr)
    return bool(np.isfinite(arr).all()) if ok is None else ok


def _prepare_theta(theta, n_features: int, dtype, name: str = "theta") -> np.ndarray:
    """theta as a C-contiguous array of the compute dtype: (d+1,) binary or (d+1, C) multinomial."""
    if isinstance(theta, (str, bytes)):
        raise TypeError(f"{name}: expected a numeric array, got {type(theta).__name__}")
    arr = np.asarray(theta)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    D = n_features + 1
    if not (arr.shape == (D,) or (arr.ndim == 2 and arr.shape[0] == D)):
        raise ValueError(
            f"{name}: expected shape ({D},) for a binary model or ({D}, n_classes) for a multinomial one "
            f"(n_features + 1 rows, the bias last), got {shape_str(arr.shape)}"
        )
    if arr.ndim == 2 and arr.shape[1] < 2:
        raise ValueError(f"{name}: a multinomial theta needs at least 2 class columns, got {arr.shape[1]}")
    if not _all_finite(arr):
        raise ValueError(f"{name}: contains NaN or infinity")
    if arr.dtype == dtype:  # finite already and nothing to round: no second pass
        return np.ascontiguousarray(arr)
    with np.errstate(over="ignore"):
        arr = np.ascontiguousarray(arr, dtype=dtype)
    if not _all_finite(arr):
        raise ValueError(f"{name}: values overflow the compute dtype {np.dtype(dtype)}")
    return arr


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_l2(l2, dtype) -> float:
    if type(l2) in (float, int) and 0.0 <= l2 <= _FLOAT32_MAX:  # the common case, in every compute dtype
        return float(l2)
    lam = check_float(l2, "l2", minimum=0.0)
    if lam > float(np.finfo(dtype).max):  # compared as Python floats: no cast, no overflow warning
        raise ValueError(f"l2: {lam} overflows the compute dtype {np.dtype(dtype)}")
    return lam


def _check_labels_in_range(y: np.ndarray, n_classes: int, name: str) -> None:
    """Labels of user arrays, checked here so that the message names the user's argument."""
    hi = 2 if n_classes == 1 else n_classes
    if y.size and (y.min() < 0 or y.max() >= hi):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        what = "0 or 1 (binary model)" if n_classes == 1 else f"integers in [0, {hi})"
        raise ValueError(f"{name}: labels must be {what}, got {bad}")


def _n_classes(theta: np.ndarray) -> int:
    """1 for a binary theta (sigmoid), C for a multinomial (d+1, C) theta."""
    return 1 if theta.ndim == 1 else int(theta.shape[1])


# The step-size tables of recent scalar inner_lr calls (read-only, at most
# _SCALAR_LR_CACHE_SIZE tables of up to 256 KB): a training loop asks for the
# same table every call, and making it (np.full) cost about 10 us a call
# right after a core call, with the caches cold (W1, 2 threads).
_SCALAR_LR_TABLES: dict = {}
_SCALAR_LR_CACHE_SIZE = 16
_SCALAR_LR_CACHE_BYTES = 1 << 18
_SCALAR_LR_LOCK = threading.Lock()


def _new_lr_lock() -> None:  # a fork while another thread held the lock must not leave it held in the child
    global _SCALAR_LR_LOCK
    _SCALAR_LR_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lr_lock)


def _prepare_inner_lr(inner_lr, inner_steps: int, theta_shape: tuple, dtype):
    """Broadcast inner_lr to its (K, *theta_shape) table.

    Returns (table, layout, original shape, scalar_in), where layout =
    (lr_steps, lr_rows, lr_cols) says along which axes of the table the
    gradient varies; the core sums over the others.
    """
    if isinstance(inner_lr, bool) or isinstance(inner_lr, (str, bytes)):
        raise TypeError(f"inner_lr: expected a number or an array of numbers, got {inner_lr!r}")
    if type(inner_lr) is float or (type(inner_lr) is int and abs(inner_lr) < 2**53):
        # The common call, one Python number: the same table as below, without
        # the broadcasting machinery (about 12 us a call, a visible share of a
        # small meta-batch). Anything not finite takes the checks below.
        full = (inner_steps,) + tuple(theta_shape)
        key = (inner_lr, math.copysign(1.0, inner_lr), full, dtype)  # the sign keeps -0.0 apart from 0.0
        table = _SCALAR_LR_TABLES.get(key)
        if table is not None:
            return table, (1, 1, 1), (), True
        with np.errstate(over="ignore"):
            cast = np.asarray(inner_lr, dtype=dtype)
        if math.isfinite(inner_lr) and math.isfinite(cast):
            table = np.full(full, cast, dtype=dtype)
            if table.nbytes <= _SCALAR_LR_CACHE_BYTES:
                table.flags.writeable = False  # shared by later calls: the core only reads it
                with _SCALAR_LR_LOCK:  # threads evict and insert one at a time (lookups need no lock)
                    while len(_SCALAR_LR_TABLES) >= _SCALAR_LR_CACHE_SIZE:
                        del _SCALAR_LR_TABLES[next(iter(_SCALAR_LR_TABLES))]
                    _SCALAR_LR_TABLES[key] = table
            return table, (1, 1, 1), (), True
    scalar_in = isinstance(inner_lr, numbers.Real) and not isinstance(inner_lr, np.ndarray)
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
            per_step = "(%d, 1)" % arr.shape[0] if len(theta_shape) == 1 else "(%d, 1, 1)" % arr.shape[0]
            hint = (
                f"; a 1-d inner_lr is read as per parameter along theta's last axis and must have "
                f"{full[-1]} entries — for one step size per inner step use shape {per_step}"
            )
        raise ValueError(
            f"inner_lr: shape {shape_str(arr.shape)} does not broadcast to (inner_steps, *theta.shape) = "
            f"{shape_str(full)}{hint}"
        )
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype, copy=False)
    if not np.isfinite(cast).all():
        raise ValueError(f"inner_lr: values overflow the compute dtype {np.dtype(dtype)}")
    table = np.ascontiguousarray(np.broadcast_to(cast, full))
    return table, _lr_layout(arr.shape, full), arr.shape, scalar_in


def _lr_layout(lr_shape: tuple, full: tuple) -> tuple:
    """(lr_steps, lr_rows, lr_cols): the axes of the (K, D[, C]) table along which inner_lr varies."""
    padded = (1,) * (len(full) - len(lr_shape)) + tuple(lr_shape)
    full3 = full if len(full) == 3 else full + (1,)
    padded3 = padded if len(padded) == 3 else padded + (1,)
    return tuple(f if (p == f and f > 1) else 1 for p, f in zip(padded3, full3))


def _unreduce_lr_grad(grad_lr: np.ndarray, shape: tuple, scalar_in: bool):
    """The core's (lr_steps, lr_rows, lr_cols) gradient, in inner_lr's own shape."""
    if len(shape) == 0:
        value = grad_lr.reshape(())
        return float(value) if scalar_in else value.copy()
    if int(np.prod(shape)) == 0:  # inner_steps=0 with a per-step table: nothing to differentiate
        return np.zeros(shape, dtype=grad_lr.dtype)
    return grad_lr.reshape(shape)


def meta_value_and_grad(
    theta,
    tasks,
    *,
    inner_lr,
    inner_steps: int,
    l2=0.0,
    first_order: bool = False,
    n_threads=None,
    sweep: str = "auto",
    task_axis: bool = False,
    grad_features: bool = False,
) -> MetaGradient:
    """Exact MAML meta-loss and gradients for a meta-batch of tasks.

    For each task t the inner loop runs ``inner_steps`` gradient steps on the
    support loss (with L2 penalty ``l2/2 ||w||^2``, weights only) from
    ``theta``; the meta-loss is the mean over tasks of the query loss at the
    adapted parameters. Gradients are exact (second order) unless
    ``first_order`` is set: first-order MAML differentiates the surrogate
    whose inner gradients are taken at stopgrad(phi_j) (docs/design.md,
    "Feature gradients"), so it drops the Hessian terms and every output
    still receives its gradient.

    Parameters
    ----------
    theta : array_like of shape (n_features + 1,) or (n_features + 1, n_classes)
        Initial parameters ``[w, b]``, bias last (the last row for a
        multinomial theta).
    tasks : Tasks or tuple (support_X, support_y, query_X, query_y)
        Arrays of shape (n_tasks, n_support, n_features), (n_tasks, n_support),
        (n_tasks, n_query, n_features), (n_tasks, n_query). Labels are 0/1
        for a binary theta, integers in [0, n_classes) otherwise.
    inner_lr : float or array_like
        Inner step size, broadcast to (inner_steps, *theta.shape): a scalar,
        per parameter theta.shape, per step (inner_steps, 1) (binary) or
        (inner_steps, 1, 1) (multinomial), or per step and parameter
        (inner_steps, *theta.shape). With ``task_axis=True`` a leading axis of
        length n_tasks (or 1, shared) comes first: (n_tasks,) one step size
        per task, (n_tasks, inner_steps, 1) per task and step for a binary
        theta, (n_tasks, *theta.shape) per task and parameter,
        (n_tasks, inner_steps, *theta.shape), and so on. Its meaning depends
        on the feature scale (the bundled datasets scale features to [0, 1]).
    inner_steps : int
        Number of inner gradient steps K >= 0.
    l2 : float or array_like of shape (n_tasks,), default=0.0
        L2 strength of the support loss (weights only, never the bias): one
        for every task, or one per task.
    first_order : bool, default=False
        First-order MAML (drops the Hessian-vector products).
    n_threads : int or None
        OpenMP threads across tasks; None uses OpenMP's default. The result
        does not depend on it (bitwise).
    sweep : {"auto", "plain", "gram"}, default="auto"
        Which exact path computes the result. "gram" runs the inner loop and
        the reverse sweep in the span of the support rows through their
        n x n Gram matrix (one step size per step: scalar or per-step
        inner_lr); "plain" sweeps the features every step. "auto" picks by a
        cost model of the shapes (never of the thread count). Both agree to
        rounding. Calls with per-task step sizes (``task_axis=True``) or a
        per-task ``l2`` always run the plain sweep ("gram" is then an
        error); ``grad_features=True`` takes the Gram sweep only for a binary
        theta with shared step sizes and l2 (the cost model counts the
        feature gradients' own product).
    task_axis : bool, default=False
        Read inner_lr's leading axis as the task axis (see ``inner_lr``).
        Without it no shape of inner_lr is ever read as per task.
    grad_features : bool, default=False
        Also return the gradients with respect to every support and query
        feature value (not the bias column): ``.grad_support_X`` and
        ``.grad_query_X``. For index-form tasks they are per occurrence of a
        row; :func:`accumulate_feature_grads` sums them into the dataset's
        shape.

    Returns
    -------
    MetaGradient
        ``.loss``, ``.grad`` (shaped like theta), ``.grad_inner_lr`` (shaped
        like inner_lr), ``.grad_l2`` (a float, or shape (n_tasks,) for a
        per-task l2) and, with ``grad_features``, ``.grad_support_X`` and
        ``.grad_query_X``.

    Raises
    ------
    DivergenceError
        If the inner loop produces non-finite parameters (names task and step).
    ValueError
        For an inner_lr whose leading axis is neither n_tasks nor 1 (with
        ``task_axis``), an l2 of the wrong shape, or ``sweep="gram"`` with the
        per-task or feature-gradient options.

    Examples
    --------
    One step size and one L2 strength per task, and the features' gradients:

    >>> import numpy as np, fastmaml
    >>> rng = np.random.default_rng(0)
    >>> Xs, Xq = rng.uniform(size=(4, 5, 3)), rng.uniform(size=(4, 6, 3))
    >>> ys, yq = rng.integers(0, 2, (4, 5)), rng.integers(0, 2, (4, 6))
    >>> r = fastmaml.meta_value_and_grad(np.zeros(4), (Xs, ys, Xq, yq), inner_lr=np.full(4, 0.5),
    ...                                  inner_steps=3, l2=np.full(4, 0.1), task_axis=True,
    ...                                  grad_features=True)
    >>> r.grad_inner_lr.shape, r.grad_l2.shape, r.grad_support_X.shape
    ((4,), (4,), (4, 5, 3))
    """
    task_axis = _check_flag(task_axis, "task_axis")
    grad_features = _check_flag(grad_features, "grad_features")
    call = _prologue(theta, tasks, l2=l2, n_threads=n_threads, inner_steps=inner_steps, inner_lr=inner_lr,
                     task_axis=task_axis, per_task_l2=True)
    if task_axis or grad_features or call.l2_tasks is not None:
        return _run_meta_extended(call, _mode(first_order), sweep, grad_features)
    loss, grad, grad_lr, grad_l2 = _run_meta(call, _mode(first_order), sweep)
    return MetaGradient(
        loss=float(loss),
        grad=grad.reshape(call.theta.shape),
        grad_inner_lr=_unreduce_lr_grad(grad_lr, call.lr_shape, call.scalar_in),
        grad_l2=float(grad_l2),
    )


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _prepare_task_inner_lr(inner_lr, n_tasks: int, inner_steps: int, theta_shape: tuple, dtype):
    """inner_lr with a task axis (``task_axis=True``): task t's step sizes are inner_lr[t].

    Returns (table, layout, original shape, per_task): the (n_tasks, K,
    *theta_shape) table when the leading axis is n_tasks (per_task True), or
    the shared (K, *theta_shape) table when it is 1; layout as in
    :func:`_prepare_inner_lr`, for one task's step sizes.
    """
    if isinstance(inner_lr, bool) or isinstance(inner_lr, (str, bytes)):
        raise TypeError(f"inner_lr: expected an array of numbers, got {inner_lr!r}")
    arr = np.asarray(inner_lr)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"inner_lr: expected an array of numbers, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[0] not in (n_tasks, 1):
        got = "a scalar" if arr.ndim == 0 else f"shape {shape_str(arr.shape)}"
        raise ValueError(
            f"inner_lr: with task_axis=True expected a leading axis of length {n_tasks} (n_tasks) or 1 "
            f"(shared by every task), got {got}"
        )
    if not np.isfinite(arr).all():
        raise ValueError("inner_lr: contains NaN or infinity")
    full = (inner_steps,) + tuple(theta_shape)
    per_task_shape = arr.shape[1:]
    try:
        ok = np.broadcast_shapes(per_task_shape, full) == full
    except ValueError:
        ok = False
    if not ok:
        per_step = (arr.shape[0], inner_steps) + (1,) * len(theta_shape)
        raise ValueError(
            f"inner_lr: with task_axis=True each task's inner_lr[t] has shape {shape_str(per_task_shape)}, which "
            f"does not broadcast to (inner_steps, *theta.shape) = {shape_str(full)}; one step size per task is "
            f"shape ({arr.shape[0]},), per task and step {shape_str(per_step)}"
        )
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype, copy=False)
    if not np.isfinite(cast).all():
        raise ValueError(f"inner_lr: values overflow the compute dtype {np.dtype(dtype)}")
    layout = _lr_layout(per_task_shape, full)
    if arr.shape[0] == 1 and n_tasks > 1:
        return np.ascontiguousarray(np.broadcast_to(cast[0], full)), layout, arr.shape, False
    check_memory(n_tasks * int(np.prod(full)) * np.dtype(dtype).itemsize, "inner_lr",
                 f"the per-task step-size table of {n_tasks} tasks")
    lead = cast.reshape((n_tasks,) + (1,) * (len(full) - len(per_task_shape)) + per_task_shape)
    return np.ascontiguousarray(np.broadcast_to(lead, (n_tasks,) + full)), layout, arr.shape, True


def _check_task_l2(l2, n_tasks: int, dtype) -> np.ndarray:
    """A per-task l2 of shape (n_tasks,) as a float64 array (the core keeps L2 in float64)."""
    arr = np.asarray(l2)
    if arr.dtype.kind not in "iuf" or isinstance(l2, (str, bytes)):
        raise TypeError(f"l2: expected a number or an array of numbers, got dtype {arr.dtype}")
    if arr.shape != (n_tasks,):
        raise ValueError(
            f"l2: expected a scalar or shape ({n_tasks},) = (n_tasks,), one strength per task, got "
            f"{shape_str(arr.shape)}"
        )
    if not np.isfinite(arr).all():
        raise ValueError("l2: contains NaN or infinity")
    if arr.size and arr.min() < 0:
        raise ValueError(f"l2: expected numbers >= 0, got {float(arr.min())}")
    if arr.size and float(arr.max()) > np.finfo(dtype).max:
        raise ValueError(f"l2: {float(arr.max())} overflows the compute dtype {np.dtype(dtype)}")
    return np.ascontiguousarray(arr, dtype=np.float64)


_EXTENDED_GRAM = (
    "sweep: 'gram' does not apply with task_axis=True, a per-task l2, or grad_features=True on a softmax theta "
    "(these always run the plain sweep); use sweep='auto' or 'plain'"
)


def _run_meta_extended(call: "_Call", mode, sweep, grad_features: bool) -> MetaGradient:
    """The one call into the core for per-task hyperparameters and feature gradients.

    Per-task hyperparameters run the plain sweep; binary feature gradients
    with shared ones take the path ``sweep`` asks for (the cost model for
    "auto"), as a plain call does.
    """
    requested = _sweep_arg(sweep)
    shared = grad_features and not call.task_lr and call.l2_tasks is None
    if requested == _core.Sweep.gram:
        # Name the rule the call breaks: the Gram path's own (inner_steps,
        # step-size layout, mode) before the feature-specific one.
        if shared and _choose(call, mode, requested) != _core.Sweep.gram:
            raise ValueError(_GRAM_NEEDS)
        if not (shared and _choose(call, mode, requested, features=True) == _core.Sweep.gram):
            raise ValueError(_EXTENDED_GRAM)
    if grad_features:
        rows = int(call.support.ptr[-1]) + int(call.query.ptr[-1])
        check_memory(rows * call.n_features * call.dtype.itemsize, "grad_features",
                     f"the gradients of {rows} support and query rows")
    out = _core.meta_value_and_grad(
        call.theta, call.support, call.query, n_classes=call.n_classes, inner_steps=call.inner_steps, l2=call.l2,
        mode=mode, sweep=requested if shared else _core.Sweep.plain, n_threads=call.n_threads,
        inner_lr=call.inner_lr, lr_layout=call.lr_layout, task_lr=call.task_lr, l2_per_task=call.l2_tasks,
        grad_features=grad_features,
    )
    # With nothing per task (a leading axis of 1, a scalar l2, no feature
    # gradients) the core runs today's call on the plain sweep: 4 outputs.
    loss, grad, grad_lr, grad_l2 = out[:4]
    gsx, gqx = out[4:] if len(out) == 6 else (None, None)
    if call.task_axis:
        grad_lr = (np.zeros(call.lr_shape, dtype=grad_lr.dtype) if int(np.prod(call.lr_shape)) == 0
                   else grad_lr.reshape(call.lr_shape))
    else:
        grad_lr = _unreduce_lr_grad(grad_lr, call.lr_shape, call.scalar_in)
    if grad_features:
        d = call.n_features
        # Dense (T, n, d) sides have equal sizes by construction; only the
        # index form needs the offsets read (a measurable part of a small call).
        dense = all(side.X.ndim == 3 and side.idx is None for side in (call.support, call.query))
        ragged = not dense and bool(
            np.ptp(np.diff(call.support.ptr)) or np.ptp(np.diff(call.query.ptr)))
        if not ragged:
            T = call.n_tasks
            gsx = gsx.reshape(T, -1, d)
            gqx = gqx.reshape(T, -1, d)
    return MetaGradient(
        loss=float(loss), grad=grad.reshape(call.theta.shape), grad_inner_lr=grad_lr,
        grad_l2=grad_l2 if call.l2_tasks is not None else float(grad_l2),
        grad_support_X=gsx, grad_query_X=gqx,
    )


def accumulate_feature_grads(tasks: Tasks, grad_support_X, grad_query_X) -> np.ndarray:
    """Sum per-occurrence feature gradients of index-form tasks into the dataset's shape.

    An index-form meta-batch may use a row of the shared dataset X several
    times (in several tasks, or on both sides); :func:`meta_value_and_grad`
    with ``grad_features=True`` returns one gradient row per occurrence. This
    adds them up: row k of X receives the gradient of every occurrence of k,
    support occurrences first in flat support_idx order, then query
    occurrences in flat query_idx order, summed in float64 — a fixed order,
    so the result does not depend on threads.

    Parameters
    ----------
    tasks : Tasks
        The index-form meta-batch (:meth:`Tasks.from_index`) the gradients
        were computed for.
    grad_support_X : ndarray of shape (n_tasks, n_support, n_features) or (total_support, n_features)
        ``MetaGradient.grad_support_X`` of that call.
    grad_query_X : ndarray of shape (n_tasks, n_query, n_features) or (total_query, n_features)
        ``MetaGradient.grad_query_X`` of that call.

    Returns
    -------
    ndarray of shape (n_samples, n_features)
        d loss / d X, in the gradients' dtype; rows no task uses are zero.

    Examples
    --------
    >>> import numpy as np, fastmaml
    >>> X = np.random.default_rng(0).uniform(size=(10, 3))
    >>> tasks = fastmaml.Tasks.from_index(X, [[0, 1, 2], [2, 3, 4]], [[0, 1, 0], [1, 0, 1]],
    ...                                   [[5, 6], [2, 7]], [[1, 0], [0, 1]])
    >>> r = fastmaml.meta_value_and_grad(np.zeros(4), tasks, inner_lr=0.5, inner_steps=2, grad_features=True)
    >>> fastmaml.accumulate_feature_grads(tasks, r.grad_support_X, r.grad_query_X).shape
    (10, 3)
    """
    if not isinstance(tasks, Tasks):
        raise TypeError(f"tasks: expected a fastmaml.Tasks in index form, got {type(tasks).__name__}")
    if not tasks.is_indexed:
        raise ValueError(
            "tasks: expected index-form Tasks (Tasks.from_index); the feature gradients of dense tasks are already "
            "shaped like their support_X and query_X"
        )
    X = tasks.support.X
    d = tasks.n_features
    out = np.zeros((X.shape[0], d), dtype=np.float64)
    dtype = None
    for name, side, grads in (("grad_support_X", tasks.support, grad_support_X),
                              ("grad_query_X", tasks.query, grad_query_X)):
        g = np.asarray(grads)
        if g.dtype.kind != "f":
            raise TypeError(f"{name}: expected a float array, got dtype {g.dtype}")
        total = int(side.ptr[-1])
        if g.ndim not in (2, 3) or g.shape[-1] != d or g.size != total * d:
            raise ValueError(
                f"{name}: expected {total} rows of {d} features (one per occurrence in the tasks' index), got "
                f"shape {shape_str(g.shape)}"
            )
        dtype = g.dtype if dtype is None else np.promote_types(dtype, g.dtype)
        np.add.at(out, side.idx, g.reshape(total, d))  # unbuffered, in index order
    return out.astype(dtype, copy=False)


# --------------------------------------------------------------------------
# the one call path: a prologue that validates once, and the calls it serves
# --------------------------------------------------------------------------

_SWEEPS = {"auto": _core.Sweep.auto, "plain": _core.Sweep.plain, "gram": _core.Sweep.gram}
_GRAM_NEEDS = (
    "sweep: 'gram' needs one step size per step (scalar or per-step inner_lr), no preconditioner, "
    "MAML or first-order MAML, and inner_steps >= 1"
)


def _mode(first_order) -> "_core.Mode":
    """The core's mode for a public ``first_order`` flag (Reptile has its own entry point)."""
    return _core.Mode.first_order if check_bool(first_order, "first_order") else _core.Mode.maml


def _sweep_arg(sweep) -> "_core.Sweep":
    if not isinstance(sweep, str) or sweep not in _SWEEPS:
        raise ValueError(f"sweep: expected one of {tuple(_SWEEPS)}, got {sweep!r}")
    return _SWEEPS[sweep]


class _Call(NamedTuple):
    """Everything one call into the core needs, validated and converted once."""

    support: "_core.Side"
    query: Optional["_core.Side"]  # None for support-only calls (adapt, primitives)
    kernel: Optional[np.ndarray]
    single: bool  # X was one task (n, d): drop the task axis of the result
    n_tasks: int
    n_features: int
    dtype: np.dtype
    support_rows: int
    theta: Optional[np.ndarray]
    n_classes: int
    inner_steps: int
    l2: float
    n_threads: int
    inner_lr: Optional[np.ndarray] = None  # the (K, *theta.shape) step-size table
    lr_layout: tuple = (1, 1, 1)
    lr_shape: tuple = ()
    scalar_in: bool = False
    log_scale: Optional[np.ndarray] = None
    U: Optional[np.ndarray] = None
    task_axis: bool = False  # inner_lr has a leading task axis (n_tasks or 1)
    task_lr: bool = False  # inner_lr is one (K, *theta.shape) table per task
    l2_tasks: Optional[np.ndarray] = None  # per-task L2 strengths (n_tasks,), float64


_FROM_TASKS = object()  # the prologue's `y` when `data` is a Tasks / 4-tuple with its query sets
_NO_INNER_LOOP = object()  # the prologue's `inner_steps` for calls without an inner loop


def _prologue(theta, data, y=_FROM_TASKS, *, l2, n_threads, inner_steps=_NO_INNER_LOOP, inner_lr=None,
              log_scale=None, U=None, preconditioned=False, task_axis=False, per_task_l2=False) -> _Call:
    """Validate and convert every argument of a call once; the one prologue of every entry point.

    ``data`` is a Tasks or a 4-tuple (meta-gradients: support and query), or
    with ``y`` given, the ``X`` of :func:`adapt` and the primitives (support
    only: (n, d), (T, n, d) or a Tasks). ``theta`` None skips the parameters
    (the primitives check their own ``params``). Without ``inner_steps`` there
    is no inner loop (iMAML, primitives); otherwise either ``inner_lr`` or, with
    ``preconditioned``, ``log_scale`` and ``U`` describe the step. With
    ``task_axis`` inner_lr leads with a task axis; with ``per_task_l2`` l2 may
    be an array of shape (n_tasks,) (docs/design.md, "Per-task hyperparameters").
    """
    inner_loop = inner_steps is not _NO_INNER_LOOP
    if y is _FROM_TASKS:
        # Tasks with an inner loop go to the core's meta-gradient, which finds
        # non-finite features in its own pass and raises the same ValueError
        # (meta.hpp, name_nonfinite_input): no separate NumPy pass over a tuple.
        ts = _as_tasks(data, check_finite=not inner_loop)
        side, query, single, user_labels = ts.support, ts.query, False, False
        dtype, d, T, kernel = ts.dtype, ts.n_features, ts.n_tasks, ts.kernel
    else:
        side, single, dtype, d, T = _support_side(data, y)
        query, kernel, user_labels = None, None, not isinstance(data, Tasks)
    K = check_int(inner_steps, "inner_steps", minimum=0) if inner_loop else 0
    l2_tasks = None
    if per_task_l2 and type(l2) not in (float, int) and not isinstance(l2, (str, bytes)) and np.ndim(l2) > 0:
        lam, l2_tasks = 0.0, _check_task_l2(l2, T, dtype)
    else:
        lam = _check_l2(l2, dtype)
    nt = check_threads(n_threads)
    theta_c, C = None, 1
    if theta is not None:
        theta_c = _prepare_theta(theta, d, dtype)
        C = _n_classes(theta_c)
        if user_labels:
            _check_labels_in_range(side.y, C, "y")
    step = {}
    if inner_loop and theta_c is not None:
        if not preconditioned:
            # The (K, *theta.shape) table is made in full below (the core reads one row per step).
            check_memory(K * theta_c.size * np.dtype(dtype).itemsize, "inner_steps",
                         f"the step-size table of {K} inner steps x {theta_c.size} parameters",
                         hint="use fewer inner_steps")
        if preconditioned:
            step["log_scale"], step["U"] = _prepare_precond(log_scale, U, d + 1, dtype)
        elif task_axis:
            table, layout, lr_shape, task_lr = _prepare_task_inner_lr(inner_lr, T, K, theta_c.shape, dtype)
            step.update(inner_lr=table, lr_layout=layout, lr_shape=lr_shape, task_axis=True, task_lr=task_lr)
        else:
            table, layout, lr_shape, scalar_in = _prepare_inner_lr(inner_lr, K, theta_c.shape, dtype)
            step.update(inner_lr=table, lr_layout=layout, lr_shape=lr_shape, scalar_in=scalar_in)
    return _Call(
        support=side.core(), query=None if query is None else query.core(), kernel=kernel, single=single,
        n_tasks=T, n_features=d, dtype=dtype, support_rows=int(side.ptr[-1]), theta=theta_c, n_classes=C,
        inner_steps=K, l2=lam, n_threads=nt, l2_tasks=l2_tasks, **step,
    )


def _run_meta(call: _Call, mode, sweep="auto", block_sums: bool = False) -> tuple:
    """The one meta-gradient call into the core (MAML, first-order MAML, Reptile, preconditioned)."""
    requested = _sweep_arg(sweep)
    if requested == _core.Sweep.gram and _choose(call, mode, requested) != _core.Sweep.gram:
        raise ValueError(_GRAM_NEEDS)
    _check_path_memory(call)
    return _core.meta_value_and_grad(
        call.theta, call.support, call.query, n_classes=call.n_classes, inner_steps=call.inner_steps, l2=call.l2,
        mode=mode, sweep=requested, n_threads=call.n_threads, inner_lr=call.inner_lr, lr_layout=call.lr_layout,
        log_scale=call.log_scale, U=call.U, kernel=call.kernel, block_sums=block_sums,
    )


def _check_path_memory(call: _Call) -> None:
    """Fail before the core allocates the inner-loop path that the reverse sweep reads back.

    Each worker thread keeps, for the task it runs, phi_0..phi_K and the K
    support gradients (parameters in the compute dtype) and K rows of
    curvature per support row and class (float64) on the plain path, or
    about four (K + 1) x n x C float64 tables and the n x n Gram matrix on
    the Gram path; both are bounded here, for as many workers as can run.
    """
    K, P, C = call.inner_steps, (call.n_features + 1) * call.n_classes, call.n_classes
    itemsize = np.dtype(call.dtype).itemsize
    workers = min(call.n_threads or int(_core.max_threads()), call.n_tasks)

    def need(n: int) -> int:  # bytes for tasks of at most n support rows
        plain = (2 * K + 1) * P * itemsize + K * n * C * 8
        gram = 4 * (K + 1) * n * C * 8 + n * n * 8
        return workers * max(plain, gram)

    # Every support row in one task bounds the largest task without a pass
    # over the offsets (about 10 us a call, cold, at W1); usually that fits.
    if need(call.support_rows) <= _validation._ALWAYS_FITS:
        return
    ptr = call.support.ptr
    check_memory(need(int((ptr[1:] - ptr[:-1]).max())), "inner_steps",
                 f"the inner-loop path kept for the reverse sweep ({K} steps, {workers} worker thread(s))",
                 hint="use fewer inner_steps or n_threads")


def _run_adapt(call: _Call, return_path: bool):
    """The one inner-loop call into the core (plain step sizes or a preconditioner); shaped like theta."""
    if return_path:
        T, K, theta = call.n_tasks, call.inner_steps, call.theta
        check_memory(T * (K + 1) * theta.size * theta.itemsize, "return_path", f"the path of {T} tasks")
    out = _core.adapt(
        call.theta, call.support, n_classes=call.n_classes, inner_steps=call.inner_steps, l2=call.l2,
        keep_path=bool(return_path), n_threads=call.n_threads, inner_lr=call.inner_lr, log_scale=call.log_scale,
        U=call.U,
    )
    out = out.reshape(out.shape[:-1] + call.theta.shape)
    return out[0] if call.single else out


def _choose(call: _Call, mode, requested, features: bool = False) -> "_core.Sweep":
    kernel = call.kernel is not None and call.support.idx is not None
    return _core.choose_sweep(
        call.support_rows, call.n_tasks, call.n_features, call.n_classes, call.inner_steps,
        lr_layout=call.lr_layout, preconditioned=call.log_scale is not None, mode=mode, kernel=kernel,
        requested=requested, features=features,
    )


def choose_sweep(support_rows: int, n_tasks: int, n_features: int, *, inner_steps: int, inner_lr=None,
                 n_classes: int = 1, first_order: bool = False, preconditioned: bool = False,
                 kernel: bool = False, sweep: str = "auto") -> str:
    """The exact path the core takes for a meta-gradient of these shapes: ``"plain"`` or ``"gram"``.

    The core's own rule (a cost model of shapes, never of threads, and the
    check that the Gram sweep applies at all), for anyone who must know the
    decision before a call, such as a driver that splits a batch into shards
    and wants every shard to take the path of the whole batch.

    Parameters
    ----------
    support_rows : int
        Support rows of the whole meta-batch (the sum over its tasks).
    n_tasks : int
        Tasks in the meta-batch; the cost model reads the ceiling of the mean
        support size.
    n_features : int
    inner_steps : int
    inner_lr : float or array_like, optional
        The step size as passed to :func:`meta_value_and_grad` (only its
        shape matters); required unless ``preconditioned``.
    n_classes : int, default=1
        1 for a binary theta of shape (n_features + 1,), C for a multinomial
        theta of shape (n_features + 1, C).
    first_order : bool, default=False
    preconditioned : bool, default=False
        A learned preconditioner replaces inner_lr (never the Gram sweep).
    kernel : bool, default=False
        An index-form batch whose Tasks carry the dataset's kernel matrix.
    sweep : {"auto", "plain", "gram"}, default="auto"
        The request, as passed to :func:`meta_value_and_grad`.

    Returns
    -------
    str
        ``"plain"`` or ``"gram"``.

    Raises
    ------
    ValueError
        For ``sweep="gram"`` where the Gram sweep does not apply (a
        per-parameter inner_lr, say), as :func:`meta_value_and_grad` would.
    """
    support_rows = check_int(support_rows, "support_rows", minimum=1)
    n_tasks = check_int(n_tasks, "n_tasks", minimum=1)
    n_features = check_int(n_features, "n_features", minimum=1)
    K = check_int(inner_steps, "inner_steps", minimum=0)
    C = check_int(n_classes, "n_classes", minimum=1)
    theta_shape = (n_features + 1,) if C == 1 else (n_features + 1, C)
    layout = (1, 1, 1)
    if not preconditioned:
        if inner_lr is None:
            raise TypeError("inner_lr: required unless preconditioned=True")
        layout = _prepare_inner_lr(inner_lr, K, theta_shape, np.float64)[1]
    requested = _sweep_arg(sweep)
    mode = _mode(first_order)
    got = _core.choose_sweep(support_rows, n_tasks, n_features, C, K, lr_layout=layout,
                             preconditioned=bool(preconditioned), mode=mode, kernel=bool(kernel),
                             requested=requested)
    if requested == _core.Sweep.gram and got != _core.Sweep.gram:
        raise ValueError(_GRAM_NEEDS)
    return "gram" if got == _core.Sweep.gram else "plain"


def _support_side(X, y):
    """(side, single, dtype, n_features, n_tasks) for adapt and the primitives: X (n,d) / (T,n,d) / Tasks."""
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
    call = _prologue(theta, X, y, l2=l2, n_threads=n_threads, inner_steps=inner_steps, inner_lr=inner_lr)
    return _run_adapt(call, return_path)


def predict_proba(params, X, *, per_task=None):
    """Class probabilities of logistic-regression parameters.

    Parameters
    ----------
    params : array_like
        Binary: (n_features + 1,) or per task (n_tasks, n_features + 1).
        Multinomial: (n_features + 1, C) or per task (n_tasks, n_features + 1, C).
    X : array_like of shape (n, n_features) or (n_tasks, n, n_features)
    per_task : bool or None
        Whether params has a leading task axis. None infers it from the
        shapes and raises when both readings fit (a (d+1, d+1) params with
        d+1 tasks).

    Returns
    -------
    ndarray
        Binary: P(y = 1), shape (n,) or (n_tasks, n). Multinomial: shape
        (n, C) or (n_tasks, n, C).
    """
    Xa = as_feature_array(X, "X", ndim=(2, 3))
    P = np.asarray(params)
    if P.dtype.kind not in "biuf":
        raise TypeError(f"params: expected a numeric array, got dtype {P.dtype}")
    if not np.isfinite(P).all():
        raise ValueError("params: contains NaN or infinity")
    d = Xa.shape[-1]
    # A task axis exists when X is batched and params lead with the same count.
    task_ok = Xa.ndim == 3 and P.ndim >= 2 and P.shape[0] == Xa.shape[0] and P.shape[1] == d + 1
    shared_ok = P.ndim in (1, 2) and P.shape[0] == d + 1
    if per_task is None:
        if task_ok and shared_ok:
            raise ValueError(
                f"params: shape {shape_str(P.shape)} with X {shape_str(Xa.shape)} reads both as per-task binary "
                "parameters and as one shared multinomial theta; pass per_task=True or per_task=False"
            )
        per_task = task_ok
    elif per_task and not task_ok:
        raise ValueError(f"params: per_task=True needs shape (n_tasks, {d + 1}[, C]) matching X {shape_str(Xa.shape)}")
    elif not per_task and not shared_ok:
        task_ok = shared_ok = False
    if not per_task and not shared_ok:
        raise ValueError(
            f"params: expected shape ({d + 1},), ({d + 1}, C), (n_tasks, {d + 1}) or (n_tasks, {d + 1}, C), "
            f"got {shape_str(P.shape)}"
        )
    with np.errstate(over="ignore"):
        P = P.astype(Xa.dtype, copy=False)
    if not np.isfinite(P).all():
        raise ValueError(f"params: values overflow the dtype of X ({Xa.dtype})")
    W, b = (P[:, :-1], P[:, -1]) if per_task else (P[:-1], P[-1])
    z, scale = _links.logits(Xa, W, b, per_task=per_task)
    binary = (P.ndim == 1) or (per_task and P.ndim == 2)
    if binary:
        return _links.sigmoid(z, scale)
    return _links.softmax(z, scale)


def _primitive(params, X, y, v, l2, n_threads):
    call = _prologue(None, X, y, l2=l2, n_threads=n_threads)
    single, dtype, d, T = call.single, call.dtype, call.n_features, call.n_tasks
    D = d + 1
    P = np.asarray(params)
    if P.dtype.kind not in "biuf":
        raise TypeError(f"params: expected a numeric array, got dtype {P.dtype}")
    inner = P.shape if single else P.shape[1:]
    if not (inner == (D,) or (len(inner) == 2 and inner[0] == D and inner[1] >= 2)) or (not single and P.shape[0] != T):
        want = f"({D},) or ({D}, C)" if single else f"({T}, {D}) or ({T}, {D}, C)"
        raise ValueError(f"params: expected shape {want}, got {shape_str(P.shape)}")
    C = 1 if len(inner) == 1 else inner[1]
    if not isinstance(X, Tasks):
        _check_labels_in_range(call.support.y, C, "y")
    P = np.ascontiguousarray(P, dtype=dtype)
    if not np.isfinite(P).all():
        raise ValueError("params: contains NaN or infinity")
    V = None
    if v is not None:
        V = np.asarray(v)
        if V.dtype.kind not in "biuf":
            raise TypeError(f"v: expected a numeric array, got dtype {V.dtype}")
        if V.shape != P.shape:
            raise ValueError(f"v: expected shape {shape_str(P.shape)} like params, got {shape_str(V.shape)}")
        V = np.ascontiguousarray(V, dtype=dtype)
        if not np.isfinite(V).all():
            raise ValueError("v: contains NaN or infinity")
    loss, out = _core.loss_grad_hvp(P, call.support, n_classes=C, l2=call.l2, n_threads=call.n_threads, v=V)
    out = out.reshape((T,) + inner)
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


@dataclass(frozen=True)
class ReptileStep:
    """Reptile's meta-update direction for one meta-batch.

    Attributes
    ----------
    loss : float
        Mean query loss after adaptation (for monitoring).
    grad : ndarray, shaped like theta
        mean over tasks of (theta - phi_K): a plain or Adam step on it moves
        theta toward the adapted weights.
    """

    loss: float
    grad: np.ndarray


def reptile_grad(theta, tasks, *, inner_lr, inner_steps: int, l2: float = 0.0, n_threads=None) -> ReptileStep:
    """Reptile direction mean_t (theta - phi_K^(t)) from one call into the core.

    Parameters are as in :func:`meta_value_and_grad`; binary or multinomial theta.
    """
    call = _prologue(theta, tasks, l2=l2, n_threads=n_threads, inner_steps=inner_steps, inner_lr=inner_lr)
    loss, grad, _, _ = _run_meta(call, _core.Mode.reptile)
    return ReptileStep(loss=float(loss), grad=grad.reshape(call.theta.shape))


@dataclass(frozen=True)
class PreconditionedGradient:
    """Meta-loss and exact gradients with a learned preconditioner P = diag(exp(log_scale)) + U U^T.

    Attributes
    ----------
    loss : float
    grad : ndarray shaped like theta
    grad_log_scale : ndarray of shape (n_features + 1,)
    grad_U : ndarray of shape (n_features + 1, rank)
    grad_l2 : float
    """

    loss: float
    grad: np.ndarray
    grad_log_scale: np.ndarray
    grad_U: np.ndarray
    grad_l2: float


def _prepare_precond(log_scale, U, D: int, dtype):
    s = np.asarray(log_scale)
    if s.dtype.kind not in "iuf":
        raise TypeError(f"log_scale: expected a numeric array, got dtype {s.dtype}")
    if s.shape != (D,):
        raise ValueError(f"log_scale: expected shape ({D},) = (n_features + 1,), got {shape_str(s.shape)}")
    Ua = np.asarray(U)
    if Ua.dtype.kind not in "iuf":
        raise TypeError(f"U: expected a numeric array, got dtype {Ua.dtype}")
    if Ua.ndim != 2 or Ua.shape[0] != D:
        raise ValueError(f"U: expected shape ({D}, rank) = (n_features + 1, rank), got {shape_str(Ua.shape)}")
    for name, a in (("log_scale", s), ("U", Ua)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains NaN or infinity")
    return np.ascontiguousarray(s, dtype=dtype), np.ascontiguousarray(Ua, dtype=dtype)


def precond_value_and_grad(
    theta, tasks, *, log_scale, U, inner_steps: int, l2: float = 0.0, first_order: bool = False, n_threads=None
) -> PreconditionedGradient:
    """Exact MAML gradients with a learned preconditioned inner update.

    The inner loop is phi_{j+1} = phi_j - P grad l_s(phi_j) with
    P = diag(exp(log_scale)) + U U^T acting on the (n_features + 1) axis (for
    a multinomial theta, on each class column alike). Beyond Meta-SGD's
    diagonal, U U^T lets the update move along learned directions — what can
    still transfer when random labels make the meta-objective even in theta.

    Parameters
    ----------
    theta : array_like of shape (n_features + 1,) or (n_features + 1, C)
    tasks : Tasks or tuple
    log_scale : array_like of shape (n_features + 1,)
    U : array_like of shape (n_features + 1, rank)
    inner_steps, l2, first_order, n_threads
        As in :func:`meta_value_and_grad`.
    """
    call = _prologue(theta, tasks, l2=l2, n_threads=n_threads, inner_steps=inner_steps, log_scale=log_scale, U=U,
                     preconditioned=True)
    loss, grad, hyper, grad_l2 = _run_meta(call, _mode(first_order))
    D = call.n_features + 1
    return PreconditionedGradient(
        loss=float(loss), grad=grad.reshape(call.theta.shape), grad_log_scale=hyper[:D].copy(),
        grad_U=hyper[D:].reshape(call.U.shape), grad_l2=float(grad_l2),
    )


def adapt_preconditioned(theta, X, y=None, *, log_scale, U, inner_steps: int, l2: float = 0.0,
                         return_path: bool = False, n_threads=None):
    """The preconditioned inner loop (see :func:`precond_value_and_grad`); shapes as in :func:`adapt`."""
    call = _prologue(theta, X, y, l2=l2, n_threads=n_threads, inner_steps=inner_steps, log_scale=log_scale, U=U,
                     preconditioned=True)
    return _run_adapt(call, return_path)


@dataclass(frozen=True)
class ImplicitGradient:
    """iMAML meta-loss, implicit gradient and solver report.

    Attributes
    ----------
    loss : float
        Mean query loss at the proximal solutions phi*.
    grad : ndarray shaped like theta
    inner_residual : ndarray of shape (n_tasks,)
        ||grad of the proximal objective||_2 at each phi*.
    inner_iterations : ndarray of shape (n_tasks,)
    inner_converged : ndarray of bool, shape (n_tasks,)
    cg_residual : ndarray of shape (n_tasks,)
        Relative residual of each (I + H/mu) x = grad l_q solve.
    cg_iterations : ndarray of shape (n_tasks,)
    cg_converged : ndarray of bool, shape (n_tasks,)
    converged : bool
        Every solve of every task converged.
    """

    loss: float
    grad: np.ndarray
    inner_residual: np.ndarray
    inner_iterations: np.ndarray
    inner_converged: np.ndarray
    cg_residual: np.ndarray
    cg_iterations: np.ndarray
    cg_converged: np.ndarray
    converged: bool


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


def imaml_value_and_grad(
    theta, tasks, *, mu: float, l2: float = 0.0, tol=None, max_iter: int = 50, cg_tol=None,
    cg_max_iter: int = 200, n_threads=None,
) -> ImplicitGradient:
    """iMAML: implicit meta-gradient of the proximal inner problem.

    phi* = argmin_phi l_s(phi) + mu/2 ||phi - theta||^2 (l_s with its L2 term)
    is solved by Newton-CG until ||grad||_2 <= ``tol``; the meta-gradient is
    the mean over tasks of (I + H(phi*)/mu)^{-1} grad l_q(phi*), by conjugate
    gradient on Hessian-vector products. Memory does not grow with the number
    of solver iterations.

    Parameters
    ----------
    theta : array_like of shape (n_features + 1,) or (n_features + 1, C)
    tasks : Tasks or tuple
    mu : float
        Proximal strength (> 0).
    l2 : float, default=0.0
    tol : float, optional
        Inner tolerance on the gradient norm; default 1e-10 (float64) or 1e-4 (float32).
    max_iter : int, default=50
        Newton iterations.
    cg_tol : float, optional
        Relative residual of the meta-gradient solve; default 1e-10 (float64) or 1e-5 (float32).
    cg_max_iter : int, default=200

    Returns
    -------
    ImplicitGradient
        Non-convergence is reported in the result (``converged`` False and the
        per-task flags) and warned about (:class:`ConvergenceWarning`), never silent.
    """
    mu = check_float(mu, "mu")
    if not mu > 0:
        raise ValueError(f"mu: expected a number > 0, got {mu}")
    call = _prologue(theta, tasks, l2=l2, n_threads=n_threads)
    f32 = call.dtype == np.float32
    tol = (1e-4 if f32 else 1e-10) if tol is None else check_float(tol, "tol", minimum=0.0)
    cg_tol = (1e-5 if f32 else 1e-10) if cg_tol is None else check_float(cg_tol, "cg_tol", minimum=0.0)
    max_iter = check_int(max_iter, "max_iter", minimum=0)
    cg_max_iter = check_int(cg_max_iter, "cg_max_iter", minimum=1)
    loss, grad, rep = _core.imaml_value_and_grad(
        call.theta, call.support, call.query, n_classes=call.n_classes, mu=mu, l2=call.l2, tol=tol,
        max_iter=max_iter, cg_tol=cg_tol, cg_max_iter=cg_max_iter, n_threads=call.n_threads,
    )
    inner_ok = rep["inner_converged"].astype(bool)
    cg_ok = rep["cg_converged"].astype(bool)
    converged = bool(inner_ok.all() and cg_ok.all())
    if not converged:
        import warnings

        warnings.warn(
            f"iMAML solvers did not converge for {int((~inner_ok).sum())} inner problems (max residual "
            f"{rep['inner_residual'].max():.3g} > tol {tol:g}) and {int((~cg_ok).sum())} meta-gradient solves "
            f"(max relative residual {rep['cg_residual'].max():.3g}); raise max_iter / cg_max_iter or loosen tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return ImplicitGradient(
        loss=float(loss), grad=grad.reshape(call.theta.shape), inner_residual=rep["inner_residual"],
        inner_iterations=rep["inner_iterations"], inner_converged=inner_ok, cg_residual=rep["cg_residual"],
        cg_iterations=rep["cg_iterations"], cg_converged=cg_ok, converged=converged,
    )


@dataclass(frozen=True)
class BlockSums:
    """Per-block partial sums of a meta-gradient, for combining shards exactly.

    The core sums per-task results in fixed blocks of ``REDUCE_BLOCK`` tasks;
    a shard whose tasks are whole blocks of the full meta-batch returns its
    block sums, and :func:`combine_block_sums` folds the blocks of all shards,
    in order, exactly as one call on the whole batch would: the result is
    bitwise identical.

    Attributes
    ----------
    blocks : ndarray of shape (n_blocks, slot_len), float64
        Rows: [loss, grad (theta.size), grad_inner_lr (core layout), grad_l2].
    n_tasks : int
    theta_shape, dtype, lr_shape, scalar_in
        What is needed to shape the combined result like a MetaGradient.
    """

    blocks: np.ndarray
    n_tasks: int
    theta_shape: tuple
    dtype: np.dtype
    lr_shape: tuple
    scalar_in: bool


REDUCE_BLOCK = int(_core.reduce_block)


def meta_block_sums(theta, tasks, *, inner_lr, inner_steps: int, l2: float = 0.0, first_order: bool = False,
                    n_threads=None, sweep: str = "auto") -> BlockSums:
    """Like :func:`meta_value_and_grad`, but return the per-block sums (see :class:`BlockSums`)."""
    call = _prologue(theta, tasks, l2=l2, n_threads=n_threads, inner_steps=inner_steps, inner_lr=inner_lr)
    out = _run_meta(call, _mode(first_order), sweep, block_sums=True)
    return BlockSums(blocks=out[-1], n_tasks=call.n_tasks, theta_shape=call.theta.shape, dtype=call.theta.dtype,
                     lr_shape=call.lr_shape, scalar_in=call.scalar_in)


def combine_block_sums(parts) -> MetaGradient:
    """Combine :class:`BlockSums` of consecutive shards (in task order) into one MetaGradient.

    Every shard but the last must hold a whole number of blocks
    (a multiple of ``REDUCE_BLOCK`` tasks); then the result is bitwise equal
    to one call on the concatenated meta-batch.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("parts: expected at least one BlockSums")
    first = parts[0]
    for i, p in enumerate(parts):
        if not isinstance(p, BlockSums):
            raise TypeError(f"parts: expected BlockSums, got {type(p).__name__} at position {i}")
        if p.theta_shape != first.theta_shape or p.blocks.shape[1] != first.blocks.shape[1]:
            raise ValueError(f"parts: shard {i} was computed with a different theta or inner_lr layout")
        if i < len(parts) - 1 and p.n_tasks % REDUCE_BLOCK:
            raise ValueError(
                f"parts: shard {i} holds {p.n_tasks} tasks, not a multiple of {REDUCE_BLOCK}; only the last "
                "shard may hold a partial block"
            )
    for i, p in enumerate(parts):
        if not np.all(np.isfinite(p.blocks)):
            raise ValueError(f"parts: shard {i} holds non-finite sums (a corrupted or hand-made BlockSums)")
    total = np.zeros(first.blocks.shape[1])
    for p in parts:
        for row in p.blocks:
            total += row  # the core's fold, element by element, in block order
    n_tasks = sum(p.n_tasks for p in parts)
    inv_T = 1.0 / n_tasks
    P = int(np.prod(first.theta_shape))
    grad = (total[1:1 + P] * inv_T).astype(first.dtype).reshape(first.theta_shape)
    grad_lr = (total[1 + P:-1] * inv_T).astype(first.dtype)
    return MetaGradient(
        loss=float(total[0] * inv_T),
        grad=grad,
        grad_inner_lr=_unreduce_lr_grad(grad_lr, first.lr_shape, first.scalar_in),
        grad_l2=float(total[-1] * inv_T),
    )
