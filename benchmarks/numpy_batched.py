"""The NumPy speed peer: exact second-order MAML meta-gradient, batched across tasks.

FROZEN. This is the "numpy" column of ``report.py`` and of the pytest-benchmark
groups (issue 13, item 5): the core is optimised *against* it, so it must not
be tuned afterwards to flatter (or to handicap) anyone. Change it only to fix
a wrong result, and say so in the commit.

What it computes is exactly ``fastmaml.meta_value_and_grad`` for the
benchmark workloads W1-W4 (docs/design.md section 1): binary logistic regression,
one scalar ``inner_lr``, ``l2 = 0``, K plain gradient steps on the support
loss, the mean over tasks of the query loss at phi_K, and its exact
(second-order) gradient with respect to theta by the reverse sweep

    gbar_K = grad l_q(phi_K) / T
    gbar_j = gbar_{j+1} - alpha H_j gbar_{j+1},   j = K-1 .. 0
    dL/dtheta = sum_t gbar_0

It is written the way a careful NumPy user would write it: no Python loop over
tasks, every product a batched matrix-vector product over the task axis
(``np.matmul`` on stacks, which NumPy hands to BLAS one task at a time, or
``np.einsum``, whichever is faster for the shape and thread count:
:func:`make_runner`), the
bias kept apart from the features (so X is never copied to append a column of
ones), the forward pass storing only what the reverse sweep needs (the logit
curvature s_j = p_j (1 - p_j), n numbers per task and step), and the first
step's logits as one matrix-vector product over all tasks' rows (every task
starts from the same theta). It computes in the dtype of the features
(float32 stays float32), like fastmaml and the JAX / torch peers. BLAS threads
are whatever the caller allows (``peers.limit_threads``).

``tests/reference.py`` (a Python loop over tasks and steps, always float64)
is the correctness oracle it is checked against
(``benchmarks/test_numpy_batched.py``), not a speed peer.
"""

from __future__ import annotations

import importlib.util
import os
import time
from types import SimpleNamespace

import numpy as np


def _sigmoid_and_curvature(z):
    """p = sigmoid(z) and s = p (1 - p) through tanh: no overflow (hence no warning) for any z."""
    t = np.tanh(0.5 * z)
    p = 0.5 + 0.5 * t
    s = 0.25 * (1.0 - t) * (1.0 + t)
    return p, s


# Two ways to write the per-task products; which is faster depends on the shape
# and dtype (measured on this machine: np.matmul, which calls BLAS once per task,
# wins on W1 and float32 W3; np.einsum's own loops win on W2 and float64 W3 by
# up to 2.5x), so a careful user measures both: see :func:`make_runner`.
KERNELS = ("matmul", "einsum")


def _rows_times(X, w, b, kernel):
    """Logits X w + b of every task: X (T, r, d), w (T, d), b (T,) -> (T, r)."""
    if kernel == "einsum":
        return np.einsum("trd,td->tr", X, w) + b[:, None]
    return np.matmul(X, w[:, :, None])[:, :, 0] + b[:, None]


def _rows_transpose_times(X, r, kernel):
    """X^T r of every task: X (T, r, d), r (T, r) -> (T, d)."""
    if kernel == "einsum":
        return np.einsum("tr,trd->td", r, X)
    return np.matmul(r[:, None, :], X)[:, 0, :]


def meta_value_and_grad(theta, tasks, inner_lr: float, inner_steps: int, kernel: str = "matmul"):
    """Meta-loss and its exact gradient with respect to theta, vectorised across tasks.

    Parameters
    ----------
    theta : ndarray of shape (n_features + 1,)
        Initialization [w, b] (bias last).
    tasks : tuple (support_X, support_y, query_X, query_y)
        support_X of shape (n_tasks, n_support, n_features), support_y of
        shape (n_tasks, n_support) in {0, 1}, query_X of shape
        (n_tasks, n_query, n_features), query_y of shape (n_tasks, n_query).
    inner_lr : float
        The inner step size (one scalar).
    inner_steps : int
        K, the number of inner gradient steps.
    kernel : {"matmul", "einsum"}, default="matmul"
        How the per-task products are written (same result up to rounding).

    Returns
    -------
    SimpleNamespace
        ``loss`` (float) and ``grad`` (ndarray of shape (n_features + 1,), in
        the features' dtype).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    support_X, support_y, query_X, query_y = tasks
    dtype = support_X.dtype if support_X.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    support_X = np.asarray(support_X, dtype=dtype)
    query_X = np.asarray(query_X, dtype=dtype)
    support_y = np.asarray(support_y, dtype=dtype)
    query_y = np.asarray(query_y, dtype=dtype)
    theta = np.asarray(theta, dtype=dtype)
    n_tasks, n_support, n_features = support_X.shape
    n_query = query_X.shape[1]
    lr = dtype.type(inner_lr)
    K = int(inner_steps)

    # Forward: K steps on every task at once, keeping the curvature s_j of each step.
    w = np.broadcast_to(theta[:-1], (n_tasks, n_features))
    b = np.broadcast_to(theta[-1], (n_tasks,))
    curvature = np.empty((K, n_tasks, n_support), dtype=dtype)
    if K > 0:  # all tasks share theta: one product over every support row
        z = (support_X.reshape(-1, n_features) @ theta[:-1]).reshape(n_tasks, n_support) + theta[-1]
    for j in range(K):
        if j > 0:
            z = _rows_times(support_X, w, b, kernel)
        p, curvature[j] = _sigmoid_and_curvature(z)
        r = (p - support_y) / dtype.type(n_support)
        w = w - lr * _rows_transpose_times(support_X, r, kernel)
        b = b - lr * r.sum(axis=1)

    # Query loss and its gradient at phi_K (the adjoint gbar_K, with the 1/T of the mean).
    zq = _rows_times(query_X, w, b, kernel)
    loss = float(np.mean(np.logaddexp(dtype.type(0), zq) - query_y * zq, dtype=np.float64))
    pq, _ = _sigmoid_and_curvature(zq)
    rq = (pq - query_y) / dtype.type(n_query * n_tasks)
    gbar_w = _rows_transpose_times(query_X, rq, kernel)
    gbar_b = rq.sum(axis=1)

    # Reverse sweep: gbar_j = gbar_{j+1} - H_j (alpha gbar_{j+1}), batched Hessian-vector products.
    for j in range(K - 1, -1, -1):
        u_w, u_b = lr * gbar_w, lr * gbar_b
        q = curvature[j] * _rows_times(support_X, u_w, u_b, kernel) / dtype.type(n_support)
        gbar_w = gbar_w - _rows_transpose_times(support_X, q, kernel)
        gbar_b = gbar_b - q.sum(axis=1)

    # The sum over tasks accumulates in float64 (T may be thousands; docs/design.md's float32 rule).
    grad = np.empty(n_features + 1, dtype=dtype)
    grad[:-1] = gbar_w.sum(axis=0, dtype=np.float64)
    grad[-1] = gbar_b.sum(dtype=np.float64)
    return SimpleNamespace(loss=loss, grad=grad)


def make_runner(theta, tasks, inner_lr: float, inner_steps: int, trials: int = 3):
    """A zero-argument callable returning (loss, grad), using the fastest variant for the CPUs it may use.

    Variants: each kernel of :data:`KERNELS` with the BLAS threads the caller
    allows, and, when more than one CPU is usable, np.matmul with BLAS held to
    one thread (OpenBLAS splits even a 20 x 784 matrix-vector product across
    threads; with one small product per task, the synchronisation can cost
    more than it saves). The first call under a given number of usable CPUs
    (the process's CPU affinity, which ``peers.limit_threads`` narrows) times
    every variant, best of ``trials`` calls each, and keeps the fastest for
    that CPU count; later calls run it directly. The timing happens in warm-up
    calls, never inside a measurement (report.py and the benchmarks warm up
    every implementation under the row's thread limit first).
    ``runner.plan`` maps CPU count -> chosen variant.
    """
    args = (theta, tasks, inner_lr, inner_steps)
    plan: dict = {}

    def usable_cpus() -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def variant(name: str):
        if name == "matmul, 1 BLAS thread":
            import threadpoolctl

            blas = threadpoolctl.ThreadpoolController().select(user_api="blas")

            def call():
                with blas.limit(limits=1):
                    return meta_value_and_grad(*args, kernel="matmul")

            return call
        return lambda: meta_value_and_grad(*args, kernel=name)

    def candidates(cpus: int):
        one_thread = cpus > 1 and importlib.util.find_spec("threadpoolctl") is not None
        return list(KERNELS) + (["matmul, 1 BLAS thread"] if one_thread else [])

    chosen: dict = {}

    def run():
        cpus = usable_cpus()
        call = chosen.get(cpus)
        if call is None:
            best = {}
            calls = {name: variant(name) for name in candidates(cpus)}
            for name, candidate in calls.items():
                for _ in range(trials):
                    t0 = time.perf_counter()
                    candidate()
                    best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
            plan[cpus] = min(best, key=best.get)
            chosen[cpus] = call = calls[plan[cpus]]
        r = call()
        return r.loss, r.grad

    run.plan = plan
    return run
