"""Non-finite features are found by the core's own pass (issue 13, item 4).

A 4-tuple reaches the meta-gradient without a NumPy finite-check pre-pass; the
core reports a NaN or infinite feature as the same ValueError naming the array
(support_X, query_X, or X for index-form tasks) on every path, and still tells
a too-large inner_lr on finite data (DivergenceError) from bad input.
"""

import numpy as np
import pytest

import fastmaml
from fastmaml import Tasks, meta_value_and_grad
from fastmaml.functional import meta_block_sums, precond_value_and_grad, reptile_grad


def _data(T=9, n=10, m=7, d=64, C=1, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    Xs = rng.normal(size=(T, n, d)).astype(dtype)
    Xq = rng.normal(size=(T, m, d)).astype(dtype)
    ys = rng.integers(0, max(C, 2), (T, n))
    yq = rng.integers(0, max(C, 2), (T, m))
    theta = rng.normal(scale=0.05, size=(d + 1,) if C == 1 else (d + 1, C)).astype(dtype)
    return theta, Xs, ys, Xq, yq


# (n, d, K): the plain sweep, the Gram sweep one task at a time, and the Gram
# sweep in lock-step groups (n <= 32 and K n >= d / 2).
SHAPES = {"plain": (40, 16, 3), "gram": (20, 300, 3), "lockstep": (10, 64, 5)}


@pytest.mark.parametrize("path", sorted(SHAPES))
@pytest.mark.parametrize("sweep", ["auto", "plain", "gram"])
@pytest.mark.parametrize("side", ["support_X", "query_X"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_nonfinite_feature_of_a_tuple_is_named_on_every_path(path, sweep, side, bad, dtype):
    n, d, K = SHAPES[path]
    theta, Xs, ys, Xq, yq = _data(n=n, d=d, dtype=dtype)
    X = Xs if side == "support_X" else Xq
    X[5, 3, d - 1] = bad  # one value, in the last feature (a tile tail) of a task inside a group
    with pytest.raises(ValueError, match=f"^{side}: contains NaN or infinity"):
        meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=0.05, inner_steps=K, sweep=sweep)


@pytest.mark.parametrize("first_order", [False, True])
def test_other_meta_calls_on_a_tuple_name_the_array_too(first_order):
    theta, Xs, ys, Xq, yq = _data(d=20)
    Xs[0, 0, 0] = np.nan
    tasks = (Xs, ys, Xq, yq)
    with pytest.raises(ValueError, match="^support_X: contains NaN"):
        meta_value_and_grad(theta, tasks, inner_lr=np.full((3, 21), 0.05), inner_steps=3, first_order=first_order)
    with pytest.raises(ValueError, match="^support_X: contains NaN"):
        reptile_grad(theta, tasks, inner_lr=0.05, inner_steps=3)
    with pytest.raises(ValueError, match="^support_X: contains NaN"):
        meta_block_sums(theta, tasks, inner_lr=0.05, inner_steps=3, first_order=first_order)
    with pytest.raises(ValueError, match="^support_X: contains NaN"):
        precond_value_and_grad(theta, tasks, log_scale=np.full(21, -3.0), U=np.zeros((21, 1)), inner_steps=3)
    thetaC, Xs, ys, Xq, yq = _data(d=20, C=3)
    Xq[8, 6, 19] = np.inf
    with pytest.raises(ValueError, match="^query_X: contains NaN"):
        meta_value_and_grad(thetaC, (Xs, ys, Xq, yq), inner_lr=0.05, inner_steps=3, first_order=first_order)


def test_no_inner_step_still_checks_the_support_rows():
    # With inner_steps=0 the sweep never reads the support rows; the core checks them.
    theta, Xs, ys, Xq, yq = _data(d=20)
    Xs[2, 1, 4] = np.nan
    with pytest.raises(ValueError, match="^support_X: contains NaN"):
        meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=0.05, inner_steps=0)


def test_divergence_on_finite_data_is_still_a_divergence():
    theta, Xs, ys, Xq, yq = _data(d=20)
    # (1 - inner_lr * l2) = -1e5 per step: the weights overflow after ~60 steps
    for sweep in ("plain", "gram"):
        with pytest.raises(fastmaml.DivergenceError):
            meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=1e5, l2=1.0, inner_steps=80, sweep=sweep)


def test_unchecked_tasks_get_the_same_error_from_the_core():
    theta, Xs, ys, Xq, yq = _data(d=20)
    Xq[1, 2, 3] = np.nan
    tasks = Tasks(Xs, ys, Xq, yq, check_finite=False)  # no NumPy pass here
    with pytest.raises(ValueError, match="^query_X: contains NaN"):
        meta_value_and_grad(theta, tasks, inner_lr=0.05, inner_steps=3)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 20))
    X[7, 2] = -np.inf
    idx = np.tile(np.arange(5, 10), (4, 1))  # every task holds row 7
    pool = Tasks.from_index(X, idx, np.zeros_like(idx), idx, np.ones_like(idx), check_finite=False)
    with pytest.raises(ValueError, match="^X: contains NaN"):
        meta_value_and_grad(theta, pool, inner_lr=0.05, inner_steps=3)


def test_a_finite_tuple_gives_the_prebuilt_tasks_result_bitwise():
    theta, Xs, ys, Xq, yq = _data(d=20)
    a = meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=0.05, inner_steps=3)
    b = meta_value_and_grad(theta, Tasks(Xs, ys, Xq, yq), inner_lr=0.05, inner_steps=3)
    assert a.loss == b.loss and np.array_equal(a.grad, b.grad) and a.grad_inner_lr == b.grad_inner_lr
