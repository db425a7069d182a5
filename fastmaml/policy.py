"""Per-task hyperparameters from a task's own support set: :class:`HyperPolicy`.

A policy maps a descriptor of a task's support data to that task's inner
step sizes (one per inner step) and L2 strength (docs/design.md, "The
hyperparameter policy"):

    z_t = clip((descriptor(support_t) - mean) / scale, -Z_CLIP, Z_CLIP) / F
    log alpha_{t,j} = a_j + b . z_t            (j = 0 .. inner_steps - 1)
    log lam_t       = c + e . z_t

``mean`` and ``scale`` are fixed from the meta-training tasks when fit starts
(and saved with the model); (a, b, c, e) are meta-learned with the
initialization by the chain rule through the core's exact per-task
hypergradients (``task_axis=True`` inner_lr and a per-task l2 of
:func:`fastmaml.meta_value_and_grad`). The intercepts start at log(inner_lr)
and log(l2) and the slopes at 0, so the untrained policy is the global
setting.
"""

from __future__ import annotations

import math
import numbers
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
# Standardised descriptors (F features) are clipped to this many training standard
# deviations: a new task far outside the meta-training range gets the
# hyperparameters of the nearest edge of that range rather than an
# extrapolation of the affine map (exp of it could diverge the inner loop).
Z_CLIP = 4.0
_POWER_ITERATIONS = 30  # at most; each task stops when its estimate settles to _POWER_TOL
_POWER_TOL = 1e-9
_BLOCK_VALUES = 1 << 22  # feature values per block of tasks in support_descriptors (32 MB in float64)
# Parameter names of the policy inside MAML's parameter dict (saved as
# param.<name> and optimizer moments opt.m.<name> like every other parameter).
LR_INTERCEPT, LR_SLOPE = "policy_lr_intercept", "policy_lr_slope"
L2_INTERCEPT, L2_SLOPE = "policy_l2_intercept", "policy_l2_slope"
POLICY_KEYS = (LR_INTERCEPT, LR_SLOPE, L2_INTERCEPT, L2_SLOPE)


class HyperPolicy:
    """Per-task inner step sizes and L2 strength from a descriptor of the task's support set.

    Pass it to :class:`fastmaml.MAML` as ``hyper_policy``: the estimator then
    learns, with the initialization (unless ``learn_init=False``), one log
    step size per inner step and (with ``learn_l2``) one log L2 strength per
    task, each an affine function of the task's standardised descriptor z_t:

    ``log alpha_{t,j} = a_j + b . z_t`` and ``log lam_t = c + e . z_t``:
    the schedule's shape (a_j) is learned per step, its scale (b . z_t) per
    task. One slope vector for every step rather than one per step (B_j):
    measured on the ragged family (20 steps, 1000 iterations), per-step
    slopes (20 x 5 parameters) lost 0.7 points of accuracy to the learned
    global per-step setting, a shared one (5 parameters) 0.4 (+- 0.3), at a
    lower meta-loss.

    The intercepts start at ``log(inner_lr)`` and ``log(l2)`` and the slopes
    at 0, so before training every task gets the global setting. Better
    (measured on the ragged family; docs/design.md, "Warm start"): fit a
    global model first and start the policy from it,
    ``MAML(hyper_policy=HyperPolicy(warmup=0), learn_init=False).fit(sampler,
    init=global_model)``: its theta is kept and the intercepts start at its
    learned step and L2. Trained from zero jointly with the initialization,
    the policy learned a weaker initialization than the global model and lost
    3 points to it there; warm-started it beat it by 0.5 (+- 0.3), about
    half of that from its per-step schedule, half from the per-task slopes.

    z_t is the descriptor minus its mean over the meta-training tasks,
    divided by its standard deviation there (both fixed when fit starts and
    saved with the model; a constant feature gets scale 1, so it is 0 for
    every task), clipped to [-4, 4] and divided by the number of features F
    (so that Adam moves a task's log step size about as far through the F
    slopes together as through the intercept; see :func:`standardise`).

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
          X~^T X~ / n (power iteration from the task's mean row until the
          estimate settles to 1e-9 relative, at most 30 steps). The
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
        shape (n,), the task's integer class codes 0 .. C - 1; both
        read-only, they may be views of your training data). It is called
        once per task (Python), must return finite numbers and must not depend
        on the model. A saved model records its name (``__qualname__``) and
        :meth:`fastmaml.MAML.load` needs it passed again as ``descriptor=``.
    learn_l2 : bool, default=True
        Also learn a per-task L2 strength (needs ``MAML(l2=...) > 0`` to start,
        in log space). False keeps MAML's ``l2`` for every task.
    warmup : float in [0, 1), default=0.5
        Fraction of ``n_iterations`` during which the slopes b and e stay at 0
        (their gradient is withheld): the policy is the global setting while
        the initialization and the intercepts settle, then becomes per task.
        Measured on the ragged family (20 inner steps, 500 iterations): with
        0.5 the policy matched the learned global setting's accuracy (-0.05 +-
        0.3 points) at a lower meta-loss; with 0 the slopes followed the
        early, poor initialization and it lost 0.6 points. A warm start from
        a fitted model (``fit(init=...)``, its initialization frozen) has
        nothing to wait for: use 0 there.

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

    def __init__(self, descriptor: Union[str, Callable] = "support", learn_l2: bool = True, warmup: float = 0.5):
        self.descriptor = descriptor
        self.learn_l2 = learn_l2
        self.warmup = warmup

    def get_params(self, deep: bool = True) -> dict:
        """``{"descriptor": ..., "learn_l2": ..., "warmup": ...}`` (scikit-learn's protocol, so ``clone`` works)."""
        return {"descriptor": self.descriptor, "learn_l2": self.learn_l2, "warmup": self.warmup}

    def set_params(self, **params) -> "HyperPolicy":
        """Set ``descriptor``, ``learn_l2`` and/or ``warmup``."""
        unknown = [k for k in params if k not in ("descriptor", "learn_l2", "warmup")]
        if unknown:
            raise ValueError(f"set_params: unknown parameter(s) {', '.join(map(repr, unknown))} for HyperPolicy; "
                             "valid parameters are descriptor, learn_l2, warmup")
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        shown = []
        if not (isinstance(self.descriptor, str) and self.descriptor == "support"):
            shown.append(f"descriptor={self.descriptor_name if callable(self.descriptor) else repr(self.descriptor)}")
        if self.learn_l2 is not True:
            shown.append(f"learn_l2={self.learn_l2!r}")
        if not (isinstance(self.warmup, numbers.Real) and self.warmup == 0.5):
            shown.append(f"warmup={self.warmup!r}")
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
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, numbers.Real):
            raise TypeError(f"warmup: expected a number in [0, 1), got {self.warmup!r}")
        if not 0.0 <= float(self.warmup) < 1.0:
            raise ValueError(f"warmup: expected a fraction of n_iterations in [0, 1), got {self.warmup!r}")

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
        return {"descriptor": self.descriptor_name, "custom": self.is_custom, "learn_l2": bool(self.learn_l2),
                "warmup": float(self.warmup)}

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
        return cls(descriptor=desc, learn_l2=bool(cfg.get("learn_l2", True)), warmup=float(cfg.get("warmup", 0.5)))

    def describe(self, tasks: Tasks, n_classes: int = 2) -> np.ndarray:
        """The raw (not standardised) descriptor of every task: shape (n_tasks, n_descriptor)."""
        return task_descriptors(tasks, self.descriptor, n_classes=n_classes)


# ---------------------------------------------------------------------------
# descriptors
# ---------------------------------------------------------------------------


def _features_from_rows(rows: np.ndarray, y: np.ndarray, ptr: np.ndarray, n_classes: int) -> np.ndarray:
    """The built-in descriptor of T tasks given their flat support rows (vectorised, no Python per task).

    Every per-task number is a sum over that task's own rows in row order
    (``np.add.reduceat`` over contiguous segments) and per-row sums over
    features: the descriptor of a task does not depend on the other tasks of
    the batch nor on its form (dense, index, ragged), bitwise.
    """
    T = ptr.size - 1
    R, d = rows.shape
    D = d + 1
    counts = np.diff(ptr)
    n = counts.astype(np.float64)
    starts = ptr[:-1]
    C = max(2, int(n_classes))
    # both layouts of the augmented rows [x, 1]: per-row dot products read rows, and the per-task sums
    # (reduceat) are ten times faster along contiguous segments of the transposed one
    aug = np.empty((R, D))
    aug[:, :d] = rows
    aug[:, d] = 1.0
    aug_t = np.ascontiguousarray(aug.T)

    def task_sums(weights):  # (T, D): sum over each task's rows of weights_i * x~_i
        # C order: einsum over a strided view takes another summation order than over contiguous rows,
        # and a one-task block's view would be contiguous, a batch's not
        return np.ascontiguousarray(np.add.reduceat(aug_t * weights, starts, axis=1).T)

    out = np.empty((T, len(DESCRIPTOR_FEATURES)))
    out[:, 0] = np.log(n)
    seg = np.repeat(np.arange(T), counts)
    label = np.clip(y.astype(np.int64), 0, C - 1)
    class_counts = np.bincount(seg * C + label, minlength=T * C).reshape(T, C)
    out[:, 1] = C * class_counts.min(axis=1) / n
    out[:, 2] = np.log(np.add.reduceat(np.einsum("ij,ij->i", aug, aug), starts) / n)
    # power iteration on X~^T X~ / n for all tasks at once, from each task's mean row (the top
    # eigenvector's direction when the features share a sign, as on the bundled datasets; never 0, its
    # bias entry is 1)
    v = task_sums(np.ones(R)) / n[:, None]
    v /= np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
    lam = np.zeros(T)
    active = np.ones(T, dtype=bool)
    for _ in range(_POWER_ITERATIONS):
        u = task_sums(np.einsum("ij,ij->i", aug, np.repeat(v, counts, axis=0))) / n[:, None]
        new = np.einsum("ij,ij->i", u, v)
        norm = np.sqrt(np.einsum("ij,ij->i", u, u))
        norm[norm == 0] = 1.0
        # a task stops once its own Rayleigh quotient has settled, so its value never depends on how
        # long the other tasks of the batch take
        settled = np.abs(new - lam) <= _POWER_TOL * np.abs(new)
        lam[active] = new[active]
        v[active] = u[active] / norm[active, None]
        active &= ~settled
        if not active.any():
            break
    # X~^T X~ / n has the bias entry 1 on its diagonal, so lam >= 1 once converged: the floor only guards
    # a start orthogonal to every large eigenvector
    out[:, 3] = np.log(np.maximum(lam, 1e-12))
    # support-loss gradient at phi = 0: X~^T (p0 - Y) / n with p0 = 1/2 (binary) or 1/C (softmax)
    if n_classes <= 2:
        g = task_sums((0.5 - (label == 1)).astype(np.float64)) / n[:, None]
        gn = np.einsum("ij,ij->i", g, g)
    else:
        gn = np.zeros(T)
        for c in range(C):  # a loop over classes, not tasks
            g = task_sums((1.0 / C - (label == c)).astype(np.float64)) / n[:, None]
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
    side = tasks.support
    ptr = np.asarray(side.ptr, dtype=np.int64)
    d = side.X.shape[-1]
    flat = side.X.reshape(-1, d)
    # Blocks of whole tasks of at most _BLOCK_VALUES feature values, so that the few (rows, d + 1)
    # temporaries stay small for a large evaluation pool; a task's numbers come from its own rows
    # only, so the blocks change no result.
    out = np.empty((ptr.size - 1, len(DESCRIPTOR_FEATURES)))
    start = 0
    while start < ptr.size - 1:
        stop = max(start + 1, int(np.searchsorted(ptr, ptr[start] + _BLOCK_VALUES // (d + 1), side="right")) - 1)
        lo, hi = int(ptr[start]), int(ptr[stop])
        rows = flat[side.idx[lo:hi]] if side.idx is not None else flat[lo:hi]
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is named below
            out[start:stop] = _features_from_rows(np.asarray(rows, dtype=np.float64), np.asarray(side.y[lo:hi]),
                                                  ptr[start:stop + 1] - lo, n_classes)
        start = stop
    _check_builtin(out)
    return out


def _check_builtin(out: np.ndarray) -> None:
    """The built-in descriptor must be finite: name the support rows at fault, not a later step-size error."""
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise ValueError(
            f"support_X: the support rows of task {int(np.flatnonzero(bad)[0])} give a non-finite descriptor "
            "(NaN or infinite features, or features so large that their squares overflow)"
        )


def _one_task_descriptor(X: np.ndarray, y: np.ndarray, descriptor, n_classes: int) -> np.ndarray:
    """The descriptor of one task (support_X (n, d), class codes y (n,)): shape (n_descriptor,)."""
    if isinstance(descriptor, str):
        rows = np.asarray(X, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            out = _features_from_rows(rows, np.asarray(y), np.array([0, rows.shape[0]], dtype=np.int64), n_classes)
        _check_builtin(out)
        return out[0]
    return _call_descriptor(descriptor, np.asarray(X, dtype=np.float64), np.asarray(y), 0, None)


def _call_descriptor(f, X, y, t: int, length: Optional[int]) -> np.ndarray:
    """f(X, y) checked: a finite 1-D array of numbers (of ``length`` entries when given)."""
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__
    # Read-only views: the rows may be the caller's own training data (a dense Tasks is used in place),
    # which a descriptor writing into its argument would otherwise change silently.
    X, y = X.view(), y.view()
    X.flags.writeable = y.flags.writeable = False
    value = f(X, y)
    if np.iscomplexobj(value):  # np.asarray(..., float64) would drop the imaginary part with only a warning
        raise TypeError(
            f"descriptor: {name}(support_X, support_y) must return real numbers, got complex values (task {t})"
        )
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
    with np.errstate(over="ignore", invalid="ignore"):  # named below
        mean = descriptors.mean(axis=0)
        scale = descriptors.std(axis=0)
    bad = ~(np.isfinite(mean) & np.isfinite(scale))
    if bad.any():
        # else the feature would be silently ignored (z = 0) and the saved model would not load
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"descriptor: feature {j} of the meta-training tasks' descriptors is too large for its mean and "
            f"standard deviation in float64 (largest magnitude {np.max(np.abs(descriptors[:, j])):.3g}); "
            "return a rescaled value (e.g. its log)"
        )
    tiny = scale <= 1e-12 * np.maximum(1.0, np.abs(mean))
    scale[tiny] = 1.0
    return mean, scale


def standardise(descriptors: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """z = clip((descriptor - mean) / scale, -Z_CLIP, Z_CLIP) / F, shape (T, F).

    The division by the number of features F is a preconditioning for Adam,
    which moves every parameter by about ``meta_lr`` per step whatever its
    gradient's scale: without it the F slopes together move a task's log step
    size about F times as far per step as the intercept does, and fits on the
    ragged family were unstable (training loss spikes, measured); with it the
    two move about equally.
    """
    F = np.shape(mean)[0]
    return np.clip((np.asarray(descriptors, dtype=np.float64) - mean) / scale, -Z_CLIP, Z_CLIP) / F


def initial_params(inner_lr: np.ndarray, l2: float, n_descriptor: int, learn_l2: bool) -> dict:
    """The untrained policy: intercepts log(inner_lr) (per step) and log(l2), slopes 0."""
    K = inner_lr.size
    params = {LR_INTERCEPT: np.log(np.asarray(inner_lr, dtype=np.float64).reshape(K)),
              LR_SLOPE: np.zeros(n_descriptor)}
    if learn_l2:
        params[L2_INTERCEPT] = np.asarray(math.log(l2))
        params[L2_SLOPE] = np.zeros(n_descriptor)
    return params


def hyperparameters(params: dict, z: np.ndarray, l2: float) -> tuple:
    """(alpha (T, K), lam) of standardised descriptors z (T, F).

    lam is an array (T,) when the policy learns l2, else the float ``l2``.
    """
    alpha = np.exp(params[LR_INTERCEPT][None, :] + np.einsum("f,tf->t", params[LR_SLOPE], z)[:, None])
    if L2_INTERCEPT in params:
        lam = np.exp(params[L2_INTERCEPT] + np.einsum("f,tf->t", params[L2_SLOPE], z))
    else:
        lam = float(l2)
    return alpha, lam


def chain_rule(params: dict, z: np.ndarray, alpha: np.ndarray, lam, grad_alpha: np.ndarray, grad_lam) -> dict:
    """Gradients of the policy's parameters from per-task hypergradients.

    With g_{t,j} = dL/dalpha_{t,j} * alpha_{t,j} (the gradient in log space):
    dL/da_j = sum_t g_{t,j}, dL/db = sum_t (sum_j g_{t,j}) z_t, and likewise for
    (c, e) with dL/dlam_t * lam_t.
    """
    g = np.asarray(grad_alpha, dtype=np.float64).reshape(alpha.shape) * alpha
    grads = {LR_INTERCEPT: g.sum(axis=0), LR_SLOPE: np.einsum("t,tf->f", g.sum(axis=1), z)}
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
