"""Core meta-gradient vs the batched NumPy peer, at W1 (JAX / torch.func: test_bench_workloads.py).

Run for real with::

    pytest benchmarks/ --benchmark-enable --benchmark-only --benchmark-group-by=group

The test command runs these with --benchmark-disable (each once, as a smoke
test). The NumPy peer is numpy_batched.py (vectorised across tasks); the
per-task loop of tests/reference.py checks both results here, untimed.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import fastmaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import reference  # noqa: E402
from tolerances import RTOL_F32, RTOL_F64, assert_rel  # noqa: E402

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
@pytest.mark.parametrize("n_threads", [1, 2])
def test_numpy_batched_w1(benchmark, dtype, n_threads):
    benchmark.group = f"W1 {dtype}"
    w = peers.make_workload("W1", dtype)
    run = peers.prepare_numpy(w)
    with peers.limit_threads(n_threads):
        run()  # warm-up: picks the faster kernel for this thread count
        _, grad = benchmark(run)
    ours = fastmaml.meta_value_and_grad(w.theta, w.tasks, inner_lr=w.inner_lr, inner_steps=w.K)
    ref = reference.meta_value_and_grad(w.theta, w.tasks, w.inner_lr, w.K)  # the oracle, untimed
    tol = RTOL_F64 if dtype == "float64" else RTOL_F32
    assert_rel(ours.grad, ref.grad, tol, "fastmaml")
    assert_rel(grad, ref.grad, tol, "batched numpy")
