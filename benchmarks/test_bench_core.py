"""Core meta-gradient vs the NumPy reference (and JAX / torch.func when installed).

Run for real with::

    pytest benchmarks/ --benchmark-enable --benchmark-only --benchmark-group-by=group

The test command runs these with --benchmark-disable (each once, as a smoke
test, with the peers' gradients checked against fastmaml's).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import fastmaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402


def make_w1(dtype):
    """W1 of the performance issue: T=32 tasks, n=20 support, m=30 query, d=784, K=5."""
    w = peers.make_workload("W1", dtype)
    return w.theta, (w.Xs, w.ys, w.Xq, w.yq), w.K, w.inner_lr


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_fastmaml_w1(benchmark, dtype, n_threads):
    benchmark.group = f"W1 {dtype}"
    theta, tasks, K, lr = make_w1(dtype)
    tasks = fastmaml.Tasks(*tasks)
    result = benchmark(fastmaml.meta_value_and_grad, theta, tasks, inner_lr=lr, inner_steps=K, n_threads=n_threads)
    assert np.isfinite(result.loss)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_reference_w1(benchmark, dtype):
    benchmark.group = f"W1 {dtype}"
    theta, tasks, K, lr = make_w1(dtype)
    ours = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K)
    ref = benchmark(reference.meta_value_and_grad, theta, tasks, lr, K)
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(ours.grad, ref.grad, rtol=0, atol=tol * np.abs(ref.grad).max())
