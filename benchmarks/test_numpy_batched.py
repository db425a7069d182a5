"""The batched NumPy speed peer (numpy_batched.py) agrees with tests/reference.py.

The peer is what fastmaml's speed is claimed against, so it must compute the
same thing: the meta-loss and its exact second-order gradient, to docs/design.md's
tolerances (float64: 1e-10 relative to the per-task float64 loop; float32
inputs, computed in float32: 2e-4), on every benchmark workload's shape (T
shrunk as in the smoke run) and on edge cases (K = 0, K = 1, one task, one
support row, large logits).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.join(_HERE, "..", "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import numpy_batched  # noqa: E402
import peers  # noqa: E402
import reference  # noqa: E402
from tolerances import RTOL_F32, RTOL_F64, assert_rel  # noqa: E402

RTOL = {"float64": RTOL_F64, "float32": RTOL_F32}


def _check(theta, tasks, inner_lr, K, dtype):
    """The peer on dtype inputs against the float64 reference on the same (float64) values."""
    ref = reference.meta_value_and_grad(theta, tasks, inner_lr, K)
    Xs, ys, Xq, yq = tasks
    for kernel in numpy_batched.KERNELS:
        got = numpy_batched.meta_value_and_grad(
            theta.astype(dtype), (Xs.astype(dtype), ys, Xq.astype(dtype), yq), inner_lr, K, kernel=kernel
        )
        assert got.grad.dtype == np.dtype(dtype), "the peer computes in the features' dtype"
        assert isinstance(got.loss, float)
        assert_rel(got.grad, ref.grad, RTOL[dtype], f"grad, {dtype}, {kernel}")
        assert_rel(got.loss, ref.loss, RTOL[dtype], f"loss, {dtype}, {kernel}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(peers.WORKLOADS))
def test_batched_numpy_matches_reference_on_workloads(name, dtype):
    """Every benchmark workload (T as in the smoke run), both kernels: loss and exact meta-gradient."""
    w = peers.make_workload(name, "float64", T=peers.SMOKE_T[name])
    _check(w.theta, w.tasks, w.inner_lr, w.K, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "T, n, m, d, K",
    [(3, 7, 5, 11, 0), (3, 7, 5, 11, 1), (1, 4, 6, 9, 3), (5, 1, 2, 3, 4), (2, 6, 4, 1, 2)],
    ids=["K0", "K1", "one-task", "one-support-row", "one-feature"],
)
def test_batched_numpy_matches_reference_on_edge_shapes(T, n, m, d, K, dtype):
    """K = 0 (the query gradient only), K = 1, a single task, a single support row, d = 1."""
    rng = np.random.default_rng(T * 1000 + n * 100 + K)
    tasks = (rng.random((T, n, d)), rng.integers(0, 2, (T, n)), rng.random((T, m, d)), rng.integers(0, 2, (T, m)))
    theta = rng.standard_normal(d + 1)
    _check(theta, tasks, 0.3, K, dtype)


def test_batched_numpy_is_second_order():
    """Dropping the Hessian term would be first-order MAML: the peer must differ from it."""
    w = peers.make_workload("W1", "float64", T=4)
    first = reference.meta_value_and_grad(w.theta, w.tasks, w.inner_lr, w.K, first_order=True)
    got = numpy_batched.meta_value_and_grad(w.theta, w.tasks, w.inner_lr, w.K)
    diff = np.abs(got.grad - first.grad).max() / np.abs(first.grad).max()
    assert diff > 1e3 * RTOL_F64


def test_batched_numpy_large_logits_are_finite():
    """Logits of magnitude ~1e3 (saturated sigmoids): no overflow warning (warnings are errors), finite output."""
    rng = np.random.default_rng(7)
    T, n, m, d = 3, 6, 5, 4
    tasks = (rng.random((T, n, d)), rng.integers(0, 2, (T, n)), rng.random((T, m, d)), rng.integers(0, 2, (T, m)))
    theta = np.full(d + 1, 400.0) * np.sign(rng.standard_normal(d + 1))
    for dtype in ("float64", "float32"):
        Xs, ys, Xq, yq = tasks
        got = numpy_batched.meta_value_and_grad(
            theta.astype(dtype), (Xs.astype(dtype), ys, Xq.astype(dtype), yq), 0.1, 3
        )
        assert np.isfinite(got.loss) and np.all(np.isfinite(got.grad))
    ref = reference.meta_value_and_grad(theta, tasks, 0.1, 3)
    got = numpy_batched.meta_value_and_grad(theta, tasks, 0.1, 3)
    assert_rel(got.grad, ref.grad, RTOL_F64, "saturated logits, float64")


def test_runner_plans_once_per_cpu_count_and_returns_the_peer_result():
    """make_runner (the benchmarked callable) returns the peer's result and records the kernel it chose."""
    w = peers.make_workload("W1", "float64", T=4)
    run = numpy_batched.make_runner(w.theta, w.tasks, w.inner_lr, w.K, trials=1)
    loss, grad = run()
    ref = reference.meta_value_and_grad(w.theta, w.tasks, w.inner_lr, w.K)
    assert_rel(grad, ref.grad, RTOL_F64, "runner")
    assert len(run.plan) == 1 and set(run.plan.values()) <= {*numpy_batched.KERNELS, "matmul, 1 BLAS thread"}
    loss2, grad2 = run()
    assert len(run.plan) == 1
    assert_rel(grad2, ref.grad, RTOL_F64, "runner, second call")
