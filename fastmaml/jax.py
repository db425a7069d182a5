"""JAX front end: fastmaml's exact logistic-regression head as a differentiable JAX function.

:func:`meta_loss` returns the MAML meta-loss of a meta-batch as a JAX scalar
whose gradients (``jax.grad`` / ``jax.value_and_grad``) with respect to
``theta``, ``inner_lr``, ``l2`` and both feature arrays are fastmaml's exact
ones (docs/design.md, "Feature gradients"; "Framework front ends — JAX").
It is a ``jax.custom_vjp`` around one host callback (``jax.pure_callback``):
the forward pass makes ONE call into the compiled core, which returns the
loss and every gradient at once; the backward pass only scales them by the
cotangent. So a feature extractor written in JAX can be trained through
the head (ANIL): ``jax.grad(lambda W, th: meta_loss(th, f(W, xs), ys,
f(W, xq), yq, ...))``.

The core runs on the host CPU. Concrete arrays on another device raise a
ValueError; under ``jax.jit`` the callback receives the data on the host
(on a GPU or TPU backend that is a device-to-host copy per call).
Reverse mode only: forward-mode differentiation (``jax.jvp``,
``jax.jacfwd``) and derivatives of the gradient (``jax.hessian``) raise JAX's
error for callbacks. Under ``jax.vmap`` each batch element is its own
meta-batch (one core call per element, in order).

JAX users keep parameters in pytrees, so there is no module class: hold
``theta`` (and, to learn them, ``inner_lr`` / ``l2``, e.g. as ``exp`` of
log parameters) in your own pytree.
"""

from __future__ import annotations

import functools
import inspect
import numbers

import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without jax
    raise ImportError(
        'fastmaml.jax needs JAX, which is not installed: pip install "fastmaml[jax]" '
        f"(or pip install jax). Underlying error: {exc}"
    ) from exc

from . import functional as _functional
from ._validation import check_int, check_memory, check_threads, shape_str

__all__ = ["meta_loss", "adapt", "query_logits"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_SymbolicZero = getattr(jax.custom_derivatives, "SymbolicZero", ())
_Tracer = getattr(jax.core, "Tracer", None)
if _Tracer is None:  # pragma: no cover - older / newer layouts of jax.core
    from jax._src.core import Tracer as _Tracer

# "sequential": under jax.vmap the callback runs once per batch element, each
# a whole meta-batch. (jax < 0.4.34 has no vmap_method; its default,
# vectorized=False, is the same loop.)
_CALLBACK_KW = (
    {"vmap_method": "sequential"} if "vmap_method" in inspect.signature(jax.pure_callback).parameters else {}
)


# --------------------------------------------------------------------------
# validation: everything that shapes and dtypes decide is checked at trace
# time, in Python, naming the argument; values (non-finite features, labels
# out of range, a diverging inner loop) are checked by the core itself.
# --------------------------------------------------------------------------


def _check_host(x, name: str) -> None:
    """Concrete arrays must live on the CPU: the core never moves data silently."""
    if isinstance(x, _Tracer) or not hasattr(x, "devices"):
        return
    try:
        devices = x.devices()
    except Exception:  # noqa: BLE001 - anything without concrete placement (jit tracers) is not ours to check
        return
    off = sorted(str(dev) for dev in devices if getattr(dev, "platform", "cpu") != "cpu")
    if off:
        raise ValueError(
            f"{name}: is on device {', '.join(off)}, but fastmaml's core runs on the host CPU; move it there "
            f"explicitly with jax.device_put({name}, jax.devices('cpu')[0]) (under jax.jit the callback "
            "copies traced arrays to the host itself)"
        )


def _dtype_of(x):
    dt = getattr(x, "dtype", None)
    return None if dt is None else np.dtype(dt)


def _features(x, name: str, ndim: int):
    if isinstance(x, (str, bytes)) or _dtype_of(x) is None:
        raise TypeError(f"{name}: expected a float32 or float64 array, got {type(x).__name__}")
    dt = _dtype_of(x)
    if dt not in _FLOATS:
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {dt}")
    arr = _as_jax(x)
    if arr.dtype != dt:  # float64 data while jax_enable_x64 is off
        raise TypeError(
            f"{name}: float64 input needs jax_enable_x64 (jax.config.update('jax_enable_x64', True)); "
            "without it, pass float32"
        )
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {shape_str(arr.shape)}")
    return arr


def _labels(y, name: str, shape: tuple):
    dt = _dtype_of(y)
    if isinstance(y, (str, bytes)) or dt is None:
        raise TypeError(f"{name}: expected an integer or boolean label array, got {type(y).__name__}")
    if dt.kind not in "biu":
        raise TypeError(
            f"{name}: expected integer (or boolean) labels, got dtype {dt}; labels are not differentiable — "
            f"cast them, e.g. {name}.astype(jnp.int32)"
        )
    arr = _as_jax(y)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {shape_str(shape)}, got {shape_str(arr.shape)}")
    return arr.astype(jnp.int32) if arr.dtype == jnp.bool_ else arr


def _param(x, name: str, dtype):
    """theta / inner_lr / l2: a Python number or a float32/float64 array, cast to the compute dtype.

    The cast happens in JAX, outside the custom VJP, so a float32 theta used
    with float64 features gets its gradient back in float32.
    """
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) and _dtype_of(x) is None:
        return np.asarray(x, dtype=dtype)  # a Python number is a constant: no JAX dispatch needed
    dt = _dtype_of(x)
    if isinstance(x, (bool, np.bool_, str, bytes)) or dt is None:
        raise TypeError(f"{name}: expected a number or a float32/float64 array, got {type(x).__name__}")
    if dt not in _FLOATS and not (dt.kind in "iuf" and np.ndim(x) == 0 and isinstance(x, np.generic)):
        raise TypeError(f"{name}: expected a number or a float32/float64 array, got dtype {dt}")
    arr = _as_jax(x)
    return arr if arr.dtype == dtype else arr.astype(dtype)


def _as_jax(x):
    """x itself when it is already a JAX array or tracer (eager jnp.asarray costs a dispatch per call)."""
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _prepare(theta, support_X, support_y, *, inner_lr, inner_steps, l2, task_axis, n_threads, query=None):
    """Validate and convert the arguments shared by meta_loss and adapt (shapes and dtypes only)."""
    names = [("theta", theta), ("support_X", support_X), ("support_y", support_y), ("inner_lr", inner_lr),
             ("l2", l2)]
    if query is not None:
        names += [("query_X", query[0]), ("query_y", query[1])]
    for name, x in names:
        _check_host(x, name)
    Xs = _features(support_X, "support_X", 3)
    dtype = Xs.dtype
    T, n, d = Xs.shape
    ys = _labels(support_y, "support_y", (T, n))
    out = {}
    if query is not None:
        Xq = _features(query[0], "query_X", 3)
        if Xq.dtype != dtype:
            raise TypeError(
                f"query_X: dtype {Xq.dtype} differs from support_X's {dtype}; both feature arrays share the "
                "compute dtype"
            )
        if Xq.shape[0] != T or Xq.shape[2] != d:
            raise ValueError(
                f"query_X: expected shape ({T}, n_query, {d}) to match support_X {shape_str(Xs.shape)}, got "
                f"{shape_str(Xq.shape)}"
            )
        out["Xq"] = Xq
        out["yq"] = _labels(query[1], "query_y", Xq.shape[:2])
    th = _param(theta, "theta", dtype)
    D = d + 1
    if not (th.shape == (D,) or (th.ndim == 2 and th.shape[0] == D and th.shape[1] >= 2)):
        raise ValueError(
            f"theta: expected shape ({D},) for a binary head or ({D}, n_classes) with n_classes >= 2 for a "
            f"softmax head (n_features + 1 rows, the bias last), got {shape_str(th.shape)}"
        )
    K = check_int(inner_steps, "inner_steps", minimum=0)
    task_axis = _functional._check_flag(task_axis, "task_axis")
    nt = check_threads(n_threads)
    lr = _param(inner_lr, "inner_lr", dtype)
    # The probe below builds the (K, *theta.shape) table: fail as the NumPy API does, naming inner_steps,
    # rather than with NumPy's unnamed MemoryError.
    check_memory(K * int(np.prod(th.shape)) * 8, "inner_steps",
                 f"the step-size table of {K} inner steps x {int(np.prod(th.shape))} parameters",
                 hint="use fewer inner_steps")
    # The core's own broadcasting rules and messages, applied to the shape only.
    probe = np.zeros(lr.shape, dtype=np.float64)
    if task_axis:
        _functional._prepare_task_inner_lr(probe, T, K, th.shape, np.float64)
    else:
        _functional._prepare_inner_lr(probe, K, th.shape, np.float64)
    lam = _param(l2, "l2", dtype)
    if lam.shape not in ((), (T,)):
        raise ValueError(
            f"l2: expected a scalar or shape ({T},) = (n_tasks,), one strength per task, got {shape_str(lam.shape)}"
        )
    out.update(theta=th, Xs=Xs, ys=ys, lr=lr, lam=lam, K=K, task_axis=task_axis, n_threads=nt, dtype=dtype)
    return out


def _l2_arg(lam: np.ndarray):
    return float(lam) if lam.ndim == 0 else lam


# --------------------------------------------------------------------------
# meta_loss: custom VJP around one host call
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _meta_loss_fn(inner_steps: int, first_order: bool, task_axis: bool, n_threads: int):
    """The custom-VJP meta-loss for one static configuration (cached: jit sees one function per config)."""
    nt = n_threads or None

    def host(features, *args):
        # pure_callback may hand over jax.Arrays (recent JAX) or NumPy arrays: views of the host buffers either way
        theta, lr, lam, Xs, ys, Xq, yq = (np.asarray(x) for x in args)
        dtype = Xs.dtype
        r = _functional.meta_value_and_grad(
            theta, (Xs, ys, Xq, yq), inner_lr=lr, inner_steps=inner_steps, l2=_l2_arg(lam),
            first_order=first_order, task_axis=task_axis, n_threads=nt, grad_features=features,
        )
        out = (
            np.asarray(r.loss, dtype=dtype),
            np.asarray(r.grad, dtype=dtype),
            np.asarray(r.grad_inner_lr, dtype=dtype).reshape(lr.shape),
            np.asarray(r.grad_l2, dtype=dtype).reshape(lam.shape),
        )
        if features:
            out += (np.asarray(r.grad_support_X, dtype=dtype), np.asarray(r.grad_query_X, dtype=dtype))
        return out

    def call(features, theta, lr, lam, Xs, ys, Xq, yq):
        """(loss, d/dtheta, d/dinner_lr, d/dl2[, d/dsupport_X, d/dquery_X]) from one core call."""
        args = (theta, lr, lam, Xs, ys, Xq, yq)
        if not any(isinstance(x, _Tracer) for x in args):
            # Eager (also inside an eager jax.grad, whose custom-VJP forward sees
            # concrete arrays): call the core directly, so that its exceptions
            # (ValueError, DivergenceError) reach the caller as they are.
            return tuple(jnp.asarray(o) for o in host(features, *args))
        shapes = [(), theta.shape, lr.shape, lam.shape] + ([Xs.shape, Xq.shape] if features else [])
        return jax.pure_callback(functools.partial(host, features),
                                 tuple(jax.ShapeDtypeStruct(s, Xs.dtype) for s in shapes), *args, **_CALLBACK_KW)

    # Without differentiation: the loss alone, by the core's fastest exact path.
    @jax.custom_vjp
    def f(theta, lr, lam, Xs, ys, Xq, yq):
        return call(False, theta, lr, lam, Xs, ys, Xq, yq)[0]

    def fwd(theta, lr, lam, Xs, ys, Xq, yq):
        # symbolic_zeros: each argument says whether it is differentiated. The
        # feature gradients cost a pass of their own (the plain sweep's feature
        # pass), so they are computed only when a feature array is perturbed.
        features = Xs.perturbed or Xq.perturbed
        loss, *grads = call(features, *(a.value for a in (theta, lr, lam, Xs, ys, Xq, yq)))
        return loss, tuple(grads)  # 3 or 5 gradients: the length says which (static)

    def bwd(grads, ct):
        features = len(grads) == 5
        if isinstance(ct, _SymbolicZero):  # pragma: no cover - JAX skips a backward with a zero cotangent
            ct = jnp.zeros((), grads[0].dtype)
        g_theta, g_lr, g_lam = (ct * g for g in grads[:3])
        g_xs, g_xq = (ct * grads[3], ct * grads[4]) if features else (None, None)
        # None: a zero cotangent (the labels, and features that are not differentiated).
        return (g_theta, g_lr, g_lam, g_xs, None, g_xq, None)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def meta_loss(theta, support_X, support_y, query_X, query_y, *, inner_lr, inner_steps: int, l2=0.0,
              first_order: bool = False, task_axis: bool = False, n_threads=None):
    """Exact MAML meta-loss of a meta-batch, differentiable in JAX (reverse mode).

    For each task t the head runs ``inner_steps`` gradient steps on the
    support loss (plus ``l2/2 ||w||^2``) from ``theta``; the result is the
    mean over tasks of the query loss at the adapted parameters
    (docs/design.md, section 1). ``jax.grad`` gives fastmaml's exact
    gradients with respect to ``theta``, ``inner_lr``, ``l2``, ``support_X``
    and ``query_X``, all from the one core call of the forward pass.

    Parameters
    ----------
    theta : jax.Array of shape (d + 1,) or (d + 1, C)
        Initial head ``[w, b]``, bias last: binary (sigmoid) or softmax with
        C >= 2 classes. float32 or float64; cast to the features' dtype.
    support_X : jax.Array of shape (T, n, d)
        Support features, float32 or float64 (float64 needs
        ``jax_enable_x64``); their dtype is the compute dtype.
    support_y : jax.Array of shape (T, n)
        Integer or boolean labels: 0/1 (binary) or in [0, C).
    query_X : jax.Array of shape (T, m, d)
        Query features, the same dtype as support_X.
    query_y : jax.Array of shape (T, m)
    inner_lr : float or jax.Array
        Inner step size, as in :func:`fastmaml.meta_value_and_grad`: a
        scalar, per parameter ``theta.shape``, per step ``(K, 1)`` (binary) /
        ``(K, 1, 1)`` (softmax), ...; with ``task_axis=True`` a leading axis
        of length T (or 1): ``(T,)``, ``(T, K, 1)``, ...
    inner_steps : int
        Number of inner steps K >= 0 (static).
    l2 : float or jax.Array of shape () or (T,), default=0.0
        L2 strength of the support loss, one for all tasks or one per task.
    first_order : bool, default=False
        First-order MAML: the surrogate whose inner gradients are taken at
        ``lax.stop_gradient(phi_j)`` (every argument still gets a gradient).
    task_axis : bool, default=False
        Read inner_lr's leading axis as the task axis.
    n_threads : int or None
        OpenMP threads of the core; the result does not depend on it.

    Returns
    -------
    jax.Array of shape ()
        The meta-loss, in the compute dtype.

    Raises
    ------
    TypeError
        For a dtype other than float32 / float64 (features, theta, inner_lr,
        l2), non-integer labels, or float64 features without
        ``jax_enable_x64``; the message names the argument.
    ValueError
        For wrong shapes, or a concrete array on a non-CPU device.
    ValueError or fastmaml.DivergenceError
        From the core, which checks values when it runs (NaN or infinite
        features, labels out of range, a diverging inner loop), naming the
        argument, task and step. Called eagerly (also inside an eager
        ``jax.grad``) the core's exception is raised as it is; under
        ``jax.jit`` JAX re-raises a failed callback as its own runtime error
        (``jax.errors.JaxRuntimeError`` in current releases), whose message
        ends with the core's.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, fastmaml.jax as fj
    >>> kx, ky = jax.random.split(jax.random.PRNGKey(0))
    >>> xs, xq = jax.random.uniform(kx, (4, 5, 3)), jax.random.uniform(ky, (4, 6, 3))
    >>> ys, yq = jnp.arange(20).reshape(4, 5) % 2, jnp.arange(24).reshape(4, 6) % 2
    >>> loss, (g_theta, g_xs) = jax.value_and_grad(
    ...     lambda th, xs: fj.meta_loss(th, xs, ys, xq, yq, inner_lr=0.5, inner_steps=3), argnums=(0, 1)
    ... )(jnp.zeros(4), xs)
    >>> g_theta.shape, g_xs.shape
    ((4,), (4, 5, 3))
    """
    first_order = _functional._check_flag(first_order, "first_order")
    a = _prepare(theta, support_X, support_y, inner_lr=inner_lr, inner_steps=inner_steps, l2=l2,
                 task_axis=task_axis, n_threads=n_threads, query=(query_X, query_y))
    f = _meta_loss_fn(a["K"], first_order, a["task_axis"], a["n_threads"])
    return f(a["theta"], a["lr"], a["lam"], a["Xs"], a["ys"], a["Xq"], a["yq"])


# --------------------------------------------------------------------------
# evaluation: adapted parameters and their logits
# --------------------------------------------------------------------------


def _adapt_host(*args, inner_steps, task_axis, n_threads):
    theta, lr, lam, Xs, ys = (np.asarray(x) for x in args)
    nt = n_threads or None
    per_task_lr = task_axis and lr.shape[0] == Xs.shape[0] and Xs.shape[0] > 1
    if not per_task_lr and lam.ndim == 0:
        shared = lr[0] if task_axis else lr
        out = _functional.adapt(theta, Xs, ys, inner_lr=shared, inner_steps=inner_steps, l2=float(lam),
                                n_threads=nt)
    else:
        # fastmaml.adapt takes one (inner_lr, l2) for the batch: per-task values run task by task
        # (evaluation only; the meta-gradient's core call handles them in one batch).
        out = np.stack([
            _functional.adapt(theta, Xs[t], ys[t], inner_lr=lr[t] if per_task_lr else (lr[0] if task_axis else lr),
                              inner_steps=inner_steps, l2=float(lam if lam.ndim == 0 else lam[t]), n_threads=nt)
            for t in range(Xs.shape[0])
        ])
    return np.asarray(out, dtype=Xs.dtype).reshape((Xs.shape[0],) + theta.shape)


def adapt(theta, support_X, support_y, *, inner_lr, inner_steps: int, l2=0.0, task_axis: bool = False,
          n_threads=None):
    """Adapted head of every task: ``inner_steps`` steps on its support set from ``theta``.

    Parameters are those of :func:`meta_loss` (without the query set). For
    evaluation: the result is a constant for JAX's autodiff (like a
    detached tensor; no gradient flows through it; differentiate
    :func:`meta_loss` to train).

    Returns
    -------
    jax.Array of shape (T, *theta.shape)
        phi_K of each task, in the features' dtype; equal to
        :func:`fastmaml.adapt` on the same NumPy arrays.
    """
    a = _prepare(theta, support_X, support_y, inner_lr=inner_lr, inner_steps=inner_steps, l2=l2,
                 task_axis=task_axis, n_threads=n_threads)
    th, lr, lam, Xs = (jax.lax.stop_gradient(a[k]) for k in ("theta", "lr", "lam", "Xs"))
    host = functools.partial(_adapt_host, inner_steps=a["K"], task_axis=a["task_axis"], n_threads=a["n_threads"])
    args = (th, lr, lam, Xs, a["ys"])
    if not any(isinstance(x, _Tracer) for x in args):
        return jnp.asarray(host(*args))
    shape = jax.ShapeDtypeStruct((Xs.shape[0],) + th.shape, a["dtype"])
    return jax.pure_callback(host, shape, *args, **_CALLBACK_KW)


def query_logits(phi, query_X):
    """Logits of adapted heads on each task's query rows (plain JAX, differentiable).

    Parameters
    ----------
    phi : jax.Array of shape (T, d + 1) or (T, d + 1, C)
        Per-task heads, bias last (as returned by :func:`adapt`).
    query_X : jax.Array of shape (T, m, d)

    Returns
    -------
    jax.Array of shape (T, m) (binary: the logit of class 1) or (T, m, C)
    """
    for name, x in (("phi", phi), ("query_X", query_X)):
        _check_host(x, name)
    X = _features(query_X, "query_X", 3)
    T, m, d = X.shape
    p = _param(phi, "phi", X.dtype)
    if p.ndim == 2 and p.shape == (T, d + 1):
        return jnp.einsum("tmd,td->tm", X, p[:, :d]) + p[:, None, d]
    if p.ndim == 3 and p.shape[:2] == (T, d + 1):
        return jnp.einsum("tmd,tdc->tmc", X, p[:, :d, :]) + p[:, None, d, :]
    raise ValueError(
        f"phi: expected shape ({T}, {d + 1}) (binary) or ({T}, {d + 1}, n_classes) (softmax) for query_X "
        f"{shape_str(X.shape)}, got {shape_str(p.shape)}"
    )
