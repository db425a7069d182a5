"""Multinomial (N-way) meta-gradient vs the NumPy reference.

Shape of the algorithm-family issue: T=32 tasks, 5-way 5-shot, 15 queries per
class, d=784, K=5. Run for real with

    pytest benchmarks/test_bench_multinomial.py --benchmark-enable --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import fastmaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import reference  # noqa: E402

SHAPE = dict(T=32, C=5, shots=5, queries=15, d=784, K=5)


def workload(dtype, disabled):
    T, C, k, q, d = SHAPE["T"], SHAPE["C"], SHAPE["shots"], SHAPE["queries"], SHAPE["d"]
    if disabled:  # smoke run inside the test suite: small
        T, d = 4, 64
    rng = np.random.default_rng(0)
    Xs = rng.random((T, C * k, d)).astype(dtype)
    Xq = rng.random((T, C * q, d)).astype(dtype)
    ys = np.tile(np.repeat(np.arange(C), k), (T, 1))
    yq = np.tile(np.repeat(np.arange(C), q), (T, 1))
    theta = (0.01 * rng.standard_normal((d + 1, C))).astype(dtype)
    return theta, (Xs, ys, Xq, yq)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_fastmaml_multinomial(benchmark, dtype, n_threads):
    benchmark.group = f"multinomial 5-way {dtype}"
    theta, tasks = workload(dtype, benchmark.disabled)
    tasks = fastmaml.Tasks(*tasks)
    res = benchmark(fastmaml.meta_value_and_grad, theta, tasks, inner_lr=0.1, inner_steps=SHAPE["K"],
                    n_threads=n_threads)
    assert np.isfinite(res.grad).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_reference_multinomial(benchmark, dtype):
    benchmark.group = f"multinomial 5-way {dtype}"
    theta, tasks = workload(dtype, benchmark.disabled)
    ours = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=SHAPE["K"])
    ref = benchmark.pedantic(reference.meta_value_and_grad, args=(theta, tasks, 0.1, SHAPE["K"]), rounds=3,
                             iterations=1) if not benchmark.disabled else benchmark(
        reference.meta_value_and_grad, theta, tasks, 0.1, SHAPE["K"])
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(ours.grad, ref.grad, rtol=0, atol=tol * np.abs(ref.grad).max())
