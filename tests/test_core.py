"""The functional core (binary logistic regression) against the NumPy reference.

Every public function of the functional API is checked against
``tests/reference.py`` (float64 to ``RTOL_F64``, float32 to ``RTOL_F32``), the
meta-gradient also against central finite differences of the meta-loss, and
the promises of docs/design.md section 2 are checked directly: dtypes, no copy of
C-contiguous features, results independent of ``n_threads`` (bitwise), errors
that name the argument at fault, and a ``DivergenceError`` instead of NaN.

The last tests of each section pin bugs found (and fixed) while writing
this file: K = 0 with a per-step inner_lr, cancellation for confidently
correct points, overflow in the reverse sweep, labels and dtypes named wrongly.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmaml
import reference
from fastmaml import Tasks
from tolerances import FD_RTOL, FD_STEP, RTOL_F32, RTOL_F64, assert_rel

# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------

# Every inner_lr shape docs/design.md names for a binary theta of shape (D,).
LR_KINDS = ("python_float", "0d_array", "per_parameter", "per_step", "per_step_parameter", "one", "one_by_D")
PER_STEP_KINDS = ("per_step", "per_step_parameter")



def make_dense(rng, T, n, m, d, *, scale=1.0, dtype=np.float64):
    """A dense meta-batch (Xs, ys, Xq, yq) with N(0, scale^2) features and random 0/1 labels."""
    Xs = (rng.normal(size=(T, n, d)) * scale).astype(dtype)
    ys = rng.integers(0, 2, size=(T, n))
    Xq = (rng.normal(size=(T, m, d)) * scale).astype(dtype)
    yq = rng.integers(0, 2, size=(T, m))
    return Xs, ys, Xq, yq


def make_theta(rng, d, scale=0.5):
    return rng.normal(size=d + 1) * scale


def make_inner_lr(kind, K, D, rng, low=0.05, high=0.4):
    """inner_lr of the given kind, values uniform in [low, high]."""
    shapes = {
        "0d_array": (),
        "per_parameter": (D,),
        "per_step": (K, 1),
        "per_step_parameter": (K, D),
        "one": (1,),
        "one_by_D": (1, D),
    }
    if kind == "python_float":
        return float(rng.uniform(low, high))
    return rng.uniform(low, high, size=shapes[kind])


def make_index_batch(rng, T, N, d, *, ragged, n=4, m=5):
    """(Tasks.from_index(...), the same tasks as a list of dense (Xs, ys, Xq, yq)).

    Rows are drawn with replacement from a small dataset, so the same row
    appears in several tasks with different (episode-specific) labels.
    """
    X = rng.normal(size=(N, d))
    if not ragged:
        sidx = rng.integers(0, N, size=(T, n))
        qidx = rng.integers(0, N, size=(T, m))
        sy = rng.integers(0, 2, size=(T, n))
        qy = rng.integers(0, 2, size=(T, m))
        tasks = Tasks.from_index(X, sidx, sy, qidx, qy)
        per_task = [(X[sidx[t]], sy[t], X[qidx[t]], qy[t]) for t in range(T)]
        return X, tasks, per_task
    sizes_s = rng.integers(1, 7, size=T)
    sizes_q = rng.integers(1, 6, size=T)
    sptr = np.concatenate([[0], np.cumsum(sizes_s)])
    qptr = np.concatenate([[0], np.cumsum(sizes_q)])
    sidx = rng.integers(0, N, size=sptr[-1])
    qidx = rng.integers(0, N, size=qptr[-1])
    sy = rng.integers(0, 2, size=sptr[-1])
    qy = rng.integers(0, 2, size=qptr[-1])
    tasks = Tasks.from_index(X, sidx, sy, qidx, qy, support_ptr=sptr, query_ptr=qptr)
    per_task = [
        (
            X[sidx[sptr[t] : sptr[t + 1]]],
            sy[sptr[t] : sptr[t + 1]],
            X[qidx[qptr[t] : qptr[t + 1]]],
            qy[qptr[t] : qptr[t + 1]],
        )
        for t in range(T)
    ]
    return X, tasks, per_task


def assert_matches_reference(got, want, inner_lr, rtol, err_msg=""):
    """Compare a MetaGradient with reference.meta_value_and_grad, including types and shapes."""
    assert isinstance(got.loss, float)
    assert isinstance(got.grad_l2, float)
    assert isinstance(got.grad, np.ndarray) and got.grad.shape == want.grad.shape
    if isinstance(inner_lr, float):
        assert type(got.grad_inner_lr) is float, "a Python float inner_lr gives a Python float gradient"
    else:
        assert isinstance(got.grad_inner_lr, np.ndarray), "an array inner_lr gives an array gradient"
        assert got.grad_inner_lr.shape == np.shape(inner_lr)
    assert_rel(got.loss, want.loss, rtol, err_msg=f"loss {err_msg}")
    assert_rel(got.grad, want.grad, rtol, err_msg=f"grad {err_msg}")
    assert_rel(got.grad_inner_lr, want.grad_inner_lr, rtol, err_msg=f"grad_inner_lr {err_msg}")
    assert_rel(got.grad_l2, want.grad_l2, rtol, err_msg=f"grad_l2 {err_msg}")


def assert_all_finite(result):
    for name in ("loss", "grad", "grad_inner_lr", "grad_l2"):
        assert np.all(np.isfinite(getattr(result, name))), name


def assert_bitwise_equal(a, b):
    assert a.loss == b.loss
    assert a.grad_l2 == b.grad_l2
    assert np.array_equal(a.grad, b.grad)
    assert np.array_equal(np.asarray(a.grad_inner_lr), np.asarray(b.grad_inner_lr))


# ---------------------------------------------------------------------------
# meta_value_and_grad against the reference, float64
# ---------------------------------------------------------------------------

GRID = [(kind, K) for kind in LR_KINDS for K in (0, 1, 5)]


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("l2", [0.0, 0.3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("kind,K", GRID)
def test_meta_value_and_grad_matches_reference_for_every_inner_lr_shape(kind, K, first_order, l2, T):
    rng = np.random.default_rng([T, K, int(first_order), int(l2 * 10), LR_KINDS.index(kind)])
    d = 4
    tasks = make_dense(rng, T, 5, 6, d)
    theta = make_theta(rng, d)
    inner_lr = make_inner_lr(kind, K, d + 1, rng)
    got = fastmaml.meta_value_and_grad(
        theta, tasks, inner_lr=inner_lr, inner_steps=K, l2=l2, first_order=first_order
    )
    want = reference.meta_value_and_grad(theta, tasks, inner_lr, K, l2, first_order)
    assert_matches_reference(got, want, inner_lr, RTOL_F64)


@pytest.mark.parametrize("kind", PER_STEP_KINDS)
def test_zero_inner_steps_with_a_per_step_inner_lr_gives_an_empty_gradient(kind):
    rng = np.random.default_rng(11)
    d = 3
    tasks = make_dense(rng, 2, 4, 4, d)
    theta = make_theta(rng, d)
    inner_lr = make_inner_lr(kind, 0, d + 1, rng)
    got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=inner_lr, inner_steps=0)
    want = reference.meta_value_and_grad(theta, tasks, inner_lr, 0)
    assert_matches_reference(got, want, inner_lr, RTOL_F64)


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("kind", LR_KINDS)
def test_one_example_per_support_and_query_set_matches_reference(kind, T):
    rng = np.random.default_rng([3, T, LR_KINDS.index(kind)])
    d, K = 3, 4
    tasks = make_dense(rng, T, 1, 1, d)
    theta = make_theta(rng, d)
    inner_lr = make_inner_lr(kind, K, d + 1, rng)
    for first_order in (False, True):
        got = fastmaml.meta_value_and_grad(
            theta, tasks, inner_lr=inner_lr, inner_steps=K, l2=0.2, first_order=first_order
        )
        want = reference.meta_value_and_grad(theta, tasks, inner_lr, K, 0.2, first_order)
        assert_matches_reference(got, want, inner_lr, RTOL_F64)


def test_numpy_scalar_inner_lr_gives_a_python_float_gradient_and_list_gives_an_array():
    rng = np.random.default_rng(5)
    d, K = 3, 2
    tasks = make_dense(rng, 3, 4, 4, d)
    theta = make_theta(rng, d)
    got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.float64(0.2), inner_steps=K)
    assert type(got.grad_inner_lr) is float
    got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=[[0.1], [0.2]], inner_steps=K)
    want = reference.meta_value_and_grad(theta, tasks, np.array([[0.1], [0.2]]), K)
    assert isinstance(got.grad_inner_lr, np.ndarray) and got.grad_inner_lr.shape == (K, 1)
    assert_rel(got.grad_inner_lr, want.grad_inner_lr, RTOL_F64)
    got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.array([0.1, 0.2, 0.3, 0.4]), inner_steps=K)
    assert got.grad_inner_lr.shape == (d + 1,)


@pytest.mark.parametrize("form", ["dense_tuple", "dense_Tasks", "index", "index_ragged"])
@pytest.mark.parametrize("kind", ["python_float", "per_step", "per_parameter", "per_step_parameter"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_every_task_form_matches_reference_on_the_per_task_list(form, kind, first_order):
    rng = np.random.default_rng([17, ["dense_tuple", "dense_Tasks", "index", "index_ragged"].index(form)])
    d, K, T, l2 = 3, 3, 6, 0.25
    if form.startswith("dense"):
        Xs, ys, Xq, yq = make_dense(rng, T, 5, 4, d)
        tasks = (Xs, ys, Xq, yq) if form == "dense_tuple" else Tasks(Xs, ys, Xq, yq)
        per_task = [(Xs[t], ys[t], Xq[t], yq[t]) for t in range(T)]
    else:
        _, tasks, per_task = make_index_batch(rng, T, 12, d, ragged=form == "index_ragged")
    theta = make_theta(rng, d)
    inner_lr = make_inner_lr(kind, K, d + 1, rng)
    got = fastmaml.meta_value_and_grad(
        theta, tasks, inner_lr=inner_lr, inner_steps=K, l2=l2, first_order=first_order
    )
    want = reference.meta_value_and_grad(theta, per_task, inner_lr, K, l2, first_order)
    assert_matches_reference(got, want, inner_lr, RTOL_F64, err_msg=form)


def test_ragged_meta_loss_is_the_mean_over_tasks_of_each_task_mean_query_loss():
    rng = np.random.default_rng(23)
    d, K, T = 2, 2, 5
    _, tasks, per_task = make_index_batch(rng, T, 10, d, ragged=True)
    assert tasks.is_ragged
    theta = make_theta(rng, d)
    got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.3, inner_steps=K)
    per_task_losses = [
        fastmaml.meta_value_and_grad(theta, tuple(a[None] for a in task), inner_lr=0.3, inner_steps=K).loss
        for task in per_task
    ]
    assert_rel(got.loss, np.mean(per_task_losses), RTOL_F64)


def test_labels_given_as_bool_or_whole_floats_mean_the_same_as_integers():
    rng = np.random.default_rng(29)
    d = 3
    Xs, ys, Xq, yq = make_dense(rng, 3, 5, 5, d)
    theta = make_theta(rng, d)
    want = fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=0.2, inner_steps=2)
    for cast in (bool, np.float64, np.uint8):
        got = fastmaml.meta_value_and_grad(
            theta, (Xs, ys.astype(cast), Xq, yq.astype(cast)), inner_lr=0.2, inner_steps=2
        )
        assert_bitwise_equal(got, want)


# ---------------------------------------------------------------------------
# Finite differences (float64 only)
# ---------------------------------------------------------------------------


def central_difference(f, x, h=FD_STEP):
    """Fourth-order central differences of a scalar f at every entry of x (a copy is perturbed)."""
    x = np.array(x, dtype=np.float64)
    out = np.empty_like(x)
    for i in np.ndindex(x.shape):
        def at(delta, i=i):
            xp = x.copy()
            xp[i] += delta
            return f(xp)

        out[i] = (at(-2 * h) - 8 * at(-h) + 8 * at(h) - at(2 * h)) / (12 * h)
    return out


def test_meta_gradient_matches_central_finite_differences_of_the_meta_loss():
    rng = np.random.default_rng(31)
    d, K, T = 3, 3, 4
    tasks = make_dense(rng, T, 5, 6, d)
    theta = make_theta(rng, d)
    inner_lr = rng.uniform(0.1, 0.5, size=(K, d + 1))  # per step and parameter
    l2 = 0.2

    def meta_loss(theta_, inner_lr_, l2_):
        return fastmaml.meta_value_and_grad(theta_, tasks, inner_lr=inner_lr_, inner_steps=K, l2=l2_).loss

    got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=inner_lr, inner_steps=K, l2=l2)
    assert_rel(got.grad, central_difference(lambda v: meta_loss(v, inner_lr, l2), theta), FD_RTOL)
    assert_rel(got.grad_inner_lr, central_difference(lambda v: meta_loss(theta, v, l2), inner_lr), FD_RTOL)
    fd_l2 = central_difference(lambda v: meta_loss(theta, inner_lr, float(v[0])), np.array([l2]))
    assert_rel(got.grad_l2, fd_l2[0], FD_RTOL)


def test_first_order_gradient_differs_from_the_exact_one_only_by_the_hessian_terms():
    # A plausible wrong answer for second order is the first-order one: they must differ when K > 0,
    # and agree exactly when K == 0 (no Hessian term exists).
    rng = np.random.default_rng(37)
    d = 3
    tasks = make_dense(rng, 3, 5, 5, d)
    theta = make_theta(rng, d)
    exact = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.4, inner_steps=3)
    first = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.4, inner_steps=3, first_order=True)
    assert exact.loss == first.loss
    assert np.max(np.abs(exact.grad - first.grad)) > 1e-3 * np.max(np.abs(exact.grad))
    exact0 = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.4, inner_steps=0)
    first0 = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.4, inner_steps=0, first_order=True)
    assert_bitwise_equal(exact0, first0)


# ---------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["python_float", "per_step", "per_parameter", "per_step_parameter"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("d", [4, 200])
def test_float32_features_compute_in_float32_and_match_the_float64_reference(kind, first_order, d):
    rng = np.random.default_rng([41, d, int(first_order)])
    K, T, l2 = 5, 7, 0.3
    scale = 1.0 / np.sqrt(d)  # keeps logits O(1) for any d
    Xs, ys, Xq, yq = make_dense(rng, T, 10, 8, d, scale=scale, dtype=np.float32)
    theta32 = make_theta(rng, d).astype(np.float32)
    inner_lr = make_inner_lr(kind, K, d + 1, rng)
    # Values exactly representable in float32, so the reference sees the very same inputs.
    inner_lr = float(np.float32(inner_lr)) if isinstance(inner_lr, float) else inner_lr.astype(np.float32)
    got = fastmaml.meta_value_and_grad(
        theta32.astype(np.float64), (Xs, ys, Xq, yq), inner_lr=inner_lr, inner_steps=K, l2=l2,
        first_order=first_order,
    )
    assert got.grad.dtype == np.float32
    if not isinstance(inner_lr, float):
        assert got.grad_inner_lr.dtype == np.float32
    f64 = (Xs.astype(np.float64), ys, Xq.astype(np.float64), yq)
    inner_lr64 = inner_lr if isinstance(inner_lr, float) else inner_lr.astype(np.float64)
    want = reference.meta_value_and_grad(theta32.astype(np.float64), f64, inner_lr64, K, l2, first_order)
    assert_matches_reference(got, want, inner_lr, RTOL_F32)


def test_float32_adapt_predict_and_primitives_return_float32():
    rng = np.random.default_rng(43)
    d = 3
    Xs, ys, _, _ = make_dense(rng, 2, 5, 5, d, dtype=np.float32)
    theta = make_theta(rng, d)
    phi = fastmaml.adapt(theta, Xs, ys, inner_lr=0.2, inner_steps=3)
    assert phi.dtype == np.float32
    assert_rel(phi[1], reference.adapt(theta.astype(np.float32), Xs[1], ys[1], np.float32(0.2), 3)[-1], RTOL_F32)
    assert fastmaml.predict_proba(theta, Xs[0]).dtype == np.float32
    loss, grad = fastmaml.loss_and_grad(phi, Xs, ys, l2=0.1)
    assert loss.dtype == np.float32 and grad.dtype == np.float32
    assert fastmaml.hessian_vector_product(phi, Xs, ys, phi).dtype == np.float32


def test_mixed_float32_and_float64_sets_compute_in_float64():
    rng = np.random.default_rng(47)
    d = 3
    Xs, ys, Xq, yq = make_dense(rng, 2, 4, 4, d)
    theta = make_theta(rng, d)
    got = fastmaml.meta_value_and_grad(theta, (Xs.astype(np.float32), ys, Xq, yq), inner_lr=0.2, inner_steps=2)
    assert got.grad.dtype == np.float64
    want = reference.meta_value_and_grad(theta, (Xs.astype(np.float32).astype(np.float64), ys, Xq, yq), 0.2, 2)
    assert_matches_reference(got, want, 0.2, RTOL_F64)


# ---------------------------------------------------------------------------
# Determinism: n_threads does not change a single bit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_dense_result_is_bitwise_identical_for_any_thread_count_across_reduction_blocks(first_order):
    rng = np.random.default_rng(53)
    d, K, T = 5, 3, 200  # 200 tasks = three full reduction blocks of 64 and a partial one
    assert T > 3 * fastmaml._core.reduce_block
    tasks = make_dense(rng, T, 6, 5, d)
    theta = make_theta(rng, d)
    inner_lr = rng.uniform(0.05, 0.4, size=(K, d + 1))
    results = [
        fastmaml.meta_value_and_grad(
            theta, tasks, inner_lr=inner_lr, inner_steps=K, l2=0.1, first_order=first_order, n_threads=nt
        )
        for nt in (1, 2, None)
    ]
    for other in results[1:]:
        assert_bitwise_equal(other, results[0])
    want = reference.meta_value_and_grad(theta, tasks, inner_lr, K, 0.1, first_order)
    assert_matches_reference(results[0], want, inner_lr, RTOL_F64)


def test_ragged_index_result_is_bitwise_identical_for_any_thread_count():
    rng = np.random.default_rng(59)
    d, K, T = 4, 3, 150
    _, tasks, per_task = make_index_batch(rng, T, 60, d, ragged=True)
    theta = make_theta(rng, d)
    results = [
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.3, inner_steps=K, l2=0.05, n_threads=nt)
        for nt in (1, 2, None)
    ]
    for other in results[1:]:
        assert_bitwise_equal(other, results[0])
    want = reference.meta_value_and_grad(theta, per_task, 0.3, K, 0.05)
    assert_matches_reference(results[0], want, 0.3, RTOL_F64)


def test_adapt_and_primitives_are_bitwise_identical_for_any_thread_count():
    rng = np.random.default_rng(61)
    d, T = 4, 130
    Xs, ys, _, _ = make_dense(rng, T, 5, 1, d)
    theta = make_theta(rng, d)
    paths = [fastmaml.adapt(theta, Xs, ys, inner_lr=0.3, inner_steps=3, return_path=True, n_threads=nt)
             for nt in (1, 2, None)]
    prims = [fastmaml.loss_and_grad(paths[0][:, -1], Xs, ys, l2=0.1, n_threads=nt) for nt in (1, 2, None)]
    for nt_index in (1, 2):
        assert np.array_equal(paths[nt_index], paths[0])
        assert np.array_equal(prims[nt_index][0], prims[0][0])
        assert np.array_equal(prims[nt_index][1], prims[0][1])


# ---------------------------------------------------------------------------
# No copy of features that are already C-contiguous float32 / float64
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_c_contiguous_dense_features_are_used_in_place(dtype):
    rng = np.random.default_rng(67)
    Xs, ys, Xq, yq = make_dense(rng, 3, 4, 5, 2, dtype=dtype)
    tasks = Tasks(Xs, ys, Xq, yq)
    assert tasks.support.X is Xs
    assert tasks.query.X is Xq
    assert tasks.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_c_contiguous_dataset_is_shared_by_index_form_tasks(dtype):
    rng = np.random.default_rng(71)
    X = rng.normal(size=(20, 3)).astype(dtype)
    tasks = Tasks.from_index(X, [[0, 1], [2, 3]], [[0, 1], [1, 0]], [[4, 5, 6], [7, 8, 9]], [[1, 0, 1], [0, 0, 1]])
    assert tasks.support.X is X
    assert tasks.query.X is X
    assert np.shares_memory(tasks.support.X, X)


def test_the_core_reads_the_callers_buffer_not_a_copy():
    # Mutating X after building Tasks changes the result: the core reads the caller's memory.
    rng = np.random.default_rng(73)
    d, K = 3, 2
    X = rng.normal(size=(12, d))
    sidx, qidx = rng.integers(0, 12, size=(3, 4)), rng.integers(0, 12, size=(3, 4))
    sy, qy = rng.integers(0, 2, size=(3, 4)), rng.integers(0, 2, size=(3, 4))
    tasks = Tasks.from_index(X, sidx, sy, qidx, qy)
    theta = make_theta(rng, d)
    before = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.2, inner_steps=K)
    X *= 2.0
    after = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.2, inner_steps=K)
    assert after.loss != before.loss
    per_task = [(X[sidx[t]], sy[t], X[qidx[t]], qy[t]) for t in range(3)]
    assert_matches_reference(after, reference.meta_value_and_grad(theta, per_task, 0.2, K), 0.2, RTOL_F64)


@pytest.mark.parametrize("layout", ["fortran", "strided", "int64", "float16"])
def test_other_layouts_and_dtypes_are_accepted_and_converted(layout):
    rng = np.random.default_rng(79)
    d, K = 3, 2
    Xs, ys, Xq, yq = make_dense(rng, 3, 4, 5, d)
    if layout == "fortran":
        sX = np.asfortranarray(Xs)
    elif layout == "strided":
        wide = np.repeat(Xs, 2, axis=2)
        sX = wide[:, :, ::2]
    elif layout == "int64":
        Xs = np.round(Xs * 3)
        sX = Xs.astype(np.int64)
    else:
        Xs = Xs.astype(np.float16).astype(np.float64)
        sX = Xs.astype(np.float16)
    tasks = Tasks(sX, ys, Xq, yq)
    assert tasks.support.X.flags.c_contiguous
    assert tasks.support.X.dtype == np.float64
    assert not np.shares_memory(tasks.support.X, sX)
    theta = make_theta(rng, d)
    got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.2, inner_steps=K)
    want = reference.meta_value_and_grad(theta, (Xs, ys, Xq, yq), 0.2, K)
    assert_matches_reference(got, want, 0.2, RTOL_F64)


def test_fortran_ordered_dataset_is_accepted_by_from_index():
    rng = np.random.default_rng(83)
    d = 3
    X = np.asfortranarray(rng.normal(size=(10, d)))
    sidx, qidx = rng.integers(0, 10, size=(2, 3)), rng.integers(0, 10, size=(2, 3))
    sy, qy = rng.integers(0, 2, size=(2, 3)), rng.integers(0, 2, size=(2, 3))
    tasks = Tasks.from_index(X, sidx, sy, qidx, qy)
    theta = make_theta(rng, d)
    got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.2, inner_steps=2)
    per_task = [(X[sidx[t]], sy[t], X[qidx[t]], qy[t]) for t in range(2)]
    assert_matches_reference(got, reference.meta_value_and_grad(theta, per_task, 0.2, 2), 0.2, RTOL_F64)


# ---------------------------------------------------------------------------
# adapt
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LR_KINDS)
def test_adapt_one_task_returns_the_reference_phi_K_and_path(kind):
    rng = np.random.default_rng([89, LR_KINDS.index(kind)])
    d, K = 4, 4
    Xs, ys, _, _ = make_dense(rng, 1, 6, 1, d)
    theta = make_theta(rng, d)
    inner_lr = make_inner_lr(kind, K, d + 1, rng)
    want_path = np.stack(reference.adapt(theta, Xs[0], ys[0], inner_lr, K, 0.3))
    phi = fastmaml.adapt(theta, Xs[0], ys[0], inner_lr=inner_lr, inner_steps=K, l2=0.3)
    assert phi.shape == theta.shape
    assert_rel(phi, want_path[-1], RTOL_F64)
    path = fastmaml.adapt(theta, Xs[0], ys[0], inner_lr=inner_lr, inner_steps=K, l2=0.3, return_path=True)
    assert path.shape == (K + 1, d + 1)
    assert_rel(path, want_path, RTOL_F64)
    assert np.array_equal(path[0], theta)


@pytest.mark.parametrize("K", [0, 1, 5])
def test_adapt_batch_returns_one_phi_K_and_path_per_task(K):
    rng = np.random.default_rng([97, K])
    d, T = 3, 5
    Xs, ys, _, _ = make_dense(rng, T, 4, 1, d)
    theta = make_theta(rng, d)
    inner_lr = rng.uniform(0.05, 0.4, size=d + 1)
    want = np.stack([np.stack(reference.adapt(theta, Xs[t], ys[t], inner_lr, K, 0.1)) for t in range(T)])
    phi = fastmaml.adapt(theta, Xs, ys, inner_lr=inner_lr, inner_steps=K, l2=0.1)
    assert phi.shape == (T, d + 1)
    assert_rel(phi, want[:, -1], RTOL_F64)
    path = fastmaml.adapt(theta, Xs, ys, inner_lr=inner_lr, inner_steps=K, l2=0.1, return_path=True)
    assert path.shape == (T, K + 1, d + 1)
    assert_rel(path, want, RTOL_F64)


@pytest.mark.parametrize("ragged", [False, True])
def test_adapt_on_tasks_uses_their_support_sets(ragged):
    rng = np.random.default_rng([101, int(ragged)])
    d, K, T = 3, 3, 4
    _, tasks, per_task = make_index_batch(rng, T, 15, d, ragged=ragged)
    theta = make_theta(rng, d)
    phi = fastmaml.adapt(theta, tasks, inner_lr=0.3, inner_steps=K)
    path = fastmaml.adapt(theta, tasks, None, inner_lr=0.3, inner_steps=K, return_path=True)
    want = np.stack([np.stack(reference.adapt(theta, sX, sy, 0.3, K)) for sX, sy, _, _ in per_task])
    assert phi.shape == (T, d + 1) and path.shape == (T, K + 1, d + 1)
    assert_rel(phi, want[:, -1], RTOL_F64)
    assert_rel(path, want, RTOL_F64)


# ---------------------------------------------------------------------------
# predict_proba, loss_and_grad, hessian_vector_product
# ---------------------------------------------------------------------------


def test_predict_proba_matches_reference_single_and_batched():
    rng = np.random.default_rng(103)
    d, T = 4, 3
    X = rng.normal(size=(T, 7, d))
    params = rng.normal(size=(T, d + 1))
    single = fastmaml.predict_proba(params[0], X[0])
    assert single.shape == (7,)
    assert_rel(single, reference.predict_proba(params[0], X[0]), RTOL_F64)
    batched = fastmaml.predict_proba(params, X)
    assert batched.shape == (T, 7)
    for t in range(T):
        assert_rel(batched[t], reference.predict_proba(params[t], X[t]), RTOL_F64)
    shared = fastmaml.predict_proba(params[0], X)
    assert shared.shape == (T, 7)
    assert_rel(shared[2], reference.predict_proba(params[0], X[2]), RTOL_F64)


def test_predict_proba_gives_exact_zero_and_one_for_extreme_logits_without_warnings():
    rng = np.random.default_rng(107)
    d = 3
    signs = rng.choice([-1.0, 1.0], size=20)
    X = np.column_stack([signs * rng.uniform(4000, 6000, size=20), rng.normal(size=(20, d - 1))])
    theta = np.array([1.0, 0.1, -0.1, 0.5])  # |z| ~ 5000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = fastmaml.predict_proba(theta, X)
        pb = fastmaml.predict_proba(np.stack([theta, -theta]), np.stack([X, X]))
    assert np.array_equal(p, (signs > 0).astype(np.float64))
    assert np.array_equal(pb[0], p) and np.array_equal(pb[1], 1.0 - p)


def test_loss_and_grad_single_task_matches_reference_with_l2():
    rng = np.random.default_rng(109)
    d = 4
    X, y = rng.normal(size=(8, d)), rng.integers(0, 2, size=8)
    params = make_theta(rng, d)
    loss, grad = fastmaml.loss_and_grad(params, X, y, l2=0.7)
    assert isinstance(loss, float) and grad.shape == (d + 1,)
    assert_rel(loss, reference.loss(params, X, y, 0.7), RTOL_F64)
    assert_rel(grad, reference.grad(params, X, y, 0.7), RTOL_F64)


def test_loss_and_grad_batched_matches_reference_per_task():
    rng = np.random.default_rng(113)
    d, T = 3, 6
    X, y, _, _ = make_dense(rng, T, 5, 1, d)
    params = rng.normal(size=(T, d + 1))
    loss, grad = fastmaml.loss_and_grad(params, X, y, l2=0.4)
    assert loss.shape == (T,) and grad.shape == (T, d + 1)
    assert_rel(loss, [reference.loss(params[t], X[t], y[t], 0.4) for t in range(T)], RTOL_F64)
    assert_rel(grad, np.stack([reference.grad(params[t], X[t], y[t], 0.4) for t in range(T)]), RTOL_F64)


def test_hessian_vector_product_matches_reference_single_batched_and_on_tasks():
    rng = np.random.default_rng(127)
    d, T = 4, 5
    X, y, _, _ = make_dense(rng, T, 6, 1, d)
    params, v = rng.normal(size=(T, d + 1)), rng.normal(size=(T, d + 1))
    single = fastmaml.hessian_vector_product(params[0], X[0], y[0], v[0], l2=0.6)
    assert single.shape == (d + 1,)
    assert_rel(single, reference.hvp(params[0], X[0], y[0], v[0], 0.6), RTOL_F64)
    batched = fastmaml.hessian_vector_product(params, X, y, v, l2=0.6)
    want = np.stack([reference.hvp(params[t], X[t], y[t], v[t], 0.6) for t in range(T)])
    assert batched.shape == (T, d + 1)
    assert_rel(batched, want, RTOL_F64)
    _, tasks, per_task = make_index_batch(rng, T, 20, d, ragged=True)
    on_tasks = fastmaml.hessian_vector_product(params, tasks, None, v, l2=0.6)
    want = np.stack([reference.hvp(params[t], sX, sy, v[t], 0.6) for t, (sX, sy, _, _) in enumerate(per_task)])
    assert_rel(on_tasks, want, RTOL_F64)
    loss, grad = fastmaml.loss_and_grad(params, tasks, l2=0.6)
    assert_rel(grad, np.stack([reference.grad(params[t], sX, sy, 0.6) for t, (sX, sy, _, _) in enumerate(per_task)]),
               RTOL_F64)


def test_hessian_vector_product_is_linear_in_v_and_penalises_weights_only():
    # HVP(v) with l2 minus HVP(v) without l2 is l2 * [v_w; 0]: the bias is never penalised.
    rng = np.random.default_rng(131)
    d = 3
    X, y = rng.normal(size=(6, d)), rng.integers(0, 2, size=6)
    params, v = make_theta(rng, d), rng.normal(size=d + 1)
    with_l2 = fastmaml.hessian_vector_product(params, X, y, v, l2=0.5)
    without = fastmaml.hessian_vector_product(params, X, y, v)
    expected = 0.5 * v
    expected[-1] = 0.0
    assert_rel(with_l2 - without, expected, RTOL_F64)


# ---------------------------------------------------------------------------
# Numerical robustness
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_meta_value_and_grad_is_finite_and_exact_for_logits_in_the_thousands(first_order):
    rng = np.random.default_rng(137)
    T, n, m, K = 4, 6, 6, 3

    def features(rows):
        signs = rng.choice([-1.0, 1.0], size=(T, rows))
        return np.stack([signs * rng.uniform(2000, 5000, size=(T, rows)), rng.normal(size=(T, rows))], axis=-1)

    Xs, Xq = features(n), features(m)
    ys, yq = rng.integers(0, 2, size=(T, n)), rng.integers(0, 2, size=(T, m))
    theta = np.array([1.0, 0.5, 0.2])
    assert np.min(np.abs(Xs @ theta[:-1] + theta[-1])) > 1000
    inner_lr = 1e-4  # moves w_0 by ~0.1 a step: logits stay in the thousands
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fastmaml.meta_value_and_grad(
            theta, (Xs, ys, Xq, yq), inner_lr=inner_lr, inner_steps=K, l2=0.1, first_order=first_order
        )
    assert_all_finite(got)
    want = reference.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr, K, 0.1, first_order)
    assert_matches_reference(got, want, inner_lr, RTOL_F64)
    assert got.loss > 100  # misclassified points at |z| ~ 1000s cost that much, without overflow


def test_loss_and_gradients_keep_relative_accuracy_for_confidently_correct_points():
    X, y = np.array([[30.0], [25.0]]), np.array([1, 1])
    params, v = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    loss, grad = fastmaml.loss_and_grad(params, X, y)
    assert_rel(loss, reference.loss(params, X, y), RTOL_F64)
    assert_rel(grad, reference.grad(params, X, y), RTOL_F64)
    assert_rel(fastmaml.hessian_vector_product(params, X, y, v), reference.hvp(params, X, y, v), RTOL_F64)
    got = fastmaml.meta_value_and_grad(params, (X[None], y[None], X[None], y[None]), inner_lr=0.0, inner_steps=1)
    want = reference.meta_value_and_grad(params, (X[None], y[None], X[None], y[None]), 0.0, 1)
    assert_matches_reference(got, want, 0.0, RTOL_F64)


def _divergent_batch():
    """Four tasks; only task 3 (features ~1e3) overflows in its first step at inner_lr = 1e307."""
    rng = np.random.default_rng(3)
    T, n, m, d = 4, 5, 5, 3
    Xs = rng.normal(size=(T, n, d)) * 1e-3
    Xq = rng.normal(size=(T, m, d)) * 1e-3
    ys, yq = rng.integers(0, 2, size=(T, n)), rng.integers(0, 2, size=(T, m))
    Xs[3] = rng.normal(size=(n, d)) * 1e3
    theta = rng.normal(size=d + 1) * 0.1
    return theta, (Xs, ys, Xq, yq)


def test_divergent_inner_loop_raises_an_error_naming_the_task_and_step():
    theta, (Xs, ys, Xq, yq) = _divergent_batch()
    inner_lr = 1e307
    # The reference agrees that only task 3 diverges, in its first step.
    with np.errstate(all="ignore"):
        for t in range(3):
            reference.adapt(theta, Xs[t], ys[t], inner_lr, 1)
        with pytest.raises(FloatingPointError, match="step 1"):
            reference.adapt(theta, Xs[3], ys[3], inner_lr, 1)
    healthy = fastmaml.meta_value_and_grad(theta, (Xs[:3], ys[:3], Xq[:3], yq[:3]), inner_lr=inner_lr, inner_steps=1)
    assert_all_finite(healthy)
    with pytest.raises(fastmaml.DivergenceError, match=r"task 3\b") as excinfo:
        fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=inner_lr, inner_steps=1)
    assert re.search(r"step \d+", str(excinfo.value))
    assert isinstance(excinfo.value, FloatingPointError)
    with pytest.raises(fastmaml.DivergenceError, match=r"task 3\b"):
        fastmaml.adapt(theta, Xs, ys, inner_lr=inner_lr, inner_steps=1)


def test_divergence_error_names_the_step_that_overflowed():
    # inner_lr * l2 = 10: the weights grow by |1 - 10| = 9 per step until they overflow.
    rng = np.random.default_rng(139)
    d, K = 3, 400
    tasks = make_dense(rng, 1, 4, 4, d)
    theta = make_theta(rng, d)
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError) as ref_info:
        reference.adapt(theta, tasks[0][0], tasks[1][0], 10.0, K, 1.0)
    ref_step = int(re.search(r"step (\d+)", str(ref_info.value)).group(1))  # 1-based: phi_{ref_step}
    assert 100 < ref_step < K
    with pytest.raises(fastmaml.DivergenceError, match="task 0") as excinfo:
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=10.0, inner_steps=K, l2=1.0)
    step = int(re.search(r"step (\d+)", str(excinfo.value)).group(1))
    # The core numbers steps j = 0..K-1 as docs/design.md does (phi_{j+1} = phi_j - alpha_j g_j).
    assert step == ref_step - 1


def test_non_finite_query_loss_raises_divergence_error_naming_the_task():
    rng = np.random.default_rng(3)
    n, m, d = 5, 5, 3
    Xs, Xq = rng.normal(size=(2, n, d)), rng.normal(size=(2, m, d))
    Xq[1] *= 1e5
    ys, yq = rng.integers(0, 2, size=(2, n)), rng.integers(0, 2, size=(2, m))
    theta = make_theta(rng, d, 0.1)
    with pytest.raises(fastmaml.DivergenceError, match=r"task 1\b"):
        fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=1e305, inner_steps=1)


def test_overflow_in_the_reverse_sweep_never_returns_non_finite_values():
    rng = np.random.default_rng(1)
    n, m, d = 4, 4, 3
    theta = rng.normal(size=d + 1) * 0.1
    Xs, Xq = rng.normal(size=(1, n, d)) * 1e-3, rng.normal(size=(1, m, d)) * 1e-3
    ys, yq = rng.integers(0, 2, size=(1, n)), rng.integers(0, 2, size=(1, m))
    try:
        got = fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=1e305, inner_steps=2)
    except fastmaml.DivergenceError:
        return
    assert_all_finite(got)


# ---------------------------------------------------------------------------
# Validation: every user error is a ValueError / TypeError naming the argument
# ---------------------------------------------------------------------------

_RNG = np.random.default_rng(149)
D_FEAT, T_TASKS, N_SUP, M_QRY, K_STEPS = 3, 3, 4, 5, 2
XS, YS, XQ, YQ = make_dense(_RNG, T_TASKS, N_SUP, M_QRY, D_FEAT)
THETA = make_theta(_RNG, D_FEAT)
DATASET = _RNG.normal(size=(10, D_FEAT))
SIDX, QIDX = _RNG.integers(0, 10, size=(T_TASKS, N_SUP)), _RNG.integers(0, 10, size=(T_TASKS, M_QRY))


def call(theta=THETA, Xs=XS, ys=YS, Xq=XQ, yq=YQ, tasks=None, inner_lr=0.1, inner_steps=K_STEPS, l2=0.0,
         n_threads=None):
    if tasks is None:
        tasks = (Xs, ys, Xq, yq)
    return fastmaml.meta_value_and_grad(
        theta, tasks, inner_lr=inner_lr, inner_steps=inner_steps, l2=l2, n_threads=n_threads
    )


def with_value(a, index, value):
    out = np.array(a, dtype=np.float64)
    out[index] = value
    return out


def from_index(**kw):
    args = dict(X=DATASET, support_idx=SIDX, support_y=YS, query_idx=QIDX, query_y=YQ)
    args.update(kw)
    return Tasks.from_index(
        args.pop("X"), args.pop("support_idx"), args.pop("support_y"), args.pop("query_idx"), args.pop("query_y"),
        **args,
    )



VALIDATION_CASES = [
    # shapes and task counts
    ("support_X_2d", lambda: call(Xs=XS[0]), ValueError, "support_X"),
    ("query_X_4d", lambda: call(Xq=XQ[None]), ValueError, "query_X"),
    ("support_y_wrong_shape", lambda: call(ys=YS[:, :-1]), ValueError, "support_y"),
    ("support_y_1d", lambda: call(ys=YS.ravel()), ValueError, "support_y"),
    ("query_y_wrong_shape", lambda: call(yq=YQ[:, :-1]), ValueError, "query_y"),
    ("query_task_count", lambda: call(Xq=XQ[:-1], yq=YQ[:-1]), ValueError, "query_X"),
    ("support_label_task_count", lambda: call(ys=YS[:-1]), ValueError, "support_y"),
    ("feature_count_mismatch", lambda: call(Xq=XQ[..., :-1]), ValueError, "query_X"),
    ("theta_too_short", lambda: call(theta=THETA[:-1]), ValueError, "theta"),
    ("theta_too_long", lambda: call(theta=np.append(THETA, 0.0)), ValueError, "theta"),
    ("theta_transposed_2d", lambda: call(theta=np.ones((2, D_FEAT + 1))), ValueError, "theta"),
    ("theta_scalar", lambda: call(theta=0.0), ValueError, "theta"),
    ("theta_string", lambda: call(theta="zeros"), TypeError, "theta"),
    ("theta_object", lambda: call(theta=np.array([None] * (D_FEAT + 1))), TypeError, "theta"),
    ("theta_nan", lambda: call(theta=with_value(THETA, 0, np.nan)), ValueError, "theta"),
    ("theta_inf", lambda: call(theta=with_value(THETA, -1, np.inf)), ValueError, "theta"),
    # labels
    ("support_label_2", lambda: call(ys=with_value(YS, (1, 2), 2).astype(int)), ValueError, "support_y"),
    ("support_label_minus_1", lambda: call(ys=with_value(YS, (0, 0), -1).astype(int)), ValueError, "support_y"),
    ("query_label_2", lambda: call(yq=with_value(YQ, (2, 1), 2).astype(int)), ValueError, "query_y"),
    ("query_label_minus_1", lambda: call(yq=with_value(YQ, (0, 3), -1).astype(int)), ValueError, "query_y"),
    ("support_label_nan", lambda: call(ys=with_value(YS, (0, 1), np.nan)), ValueError, "support_y"),
    ("query_label_nan", lambda: call(yq=with_value(YQ, (1, 1), np.nan)), ValueError, "query_y"),
    ("support_label_fractional", lambda: call(ys=with_value(YS, (0, 1), 0.5)), ValueError, "support_y"),
    ("query_label_fractional", lambda: call(yq=with_value(YQ, (2, 0), 0.999)), ValueError, "query_y"),
    ("support_label_strings", lambda: call(ys=YS.astype(str)), TypeError, "support_y"),
    # features
    ("support_X_nan", lambda: call(Xs=with_value(XS, (1, 1, 1), np.nan)), ValueError, "support_X"),
    ("query_X_inf", lambda: call(Xq=with_value(XQ, (0, 0, 0), -np.inf)), ValueError, "query_X"),
    ("support_X_strings", lambda: call(Xs=XS.astype(str)), TypeError, "support_X"),
    ("query_X_object", lambda: call(Xq=XQ.astype(object)), TypeError, "query_X"),
    ("support_X_complex", lambda: call(Xs=XS.astype(complex)), TypeError, "support_X"),
    ("support_X_string_scalar", lambda: call(Xs="data.csv"), TypeError, "support_X"),
    # empty batches
    ("zero_tasks", lambda: call(Xs=XS[:0], ys=YS[:0], Xq=XQ[:0], yq=YQ[:0]), ValueError, "support_X"),
    ("zero_support_rows", lambda: call(Xs=XS[:, :0], ys=YS[:, :0]), ValueError, "support_X"),
    ("zero_query_rows", lambda: call(Xq=XQ[:, :0], yq=YQ[:, :0]), ValueError, "query_X"),
    # inner_lr
    ("inner_lr_nan", lambda: call(inner_lr=float("nan")), ValueError, "inner_lr"),
    ("inner_lr_inf_entry", lambda: call(inner_lr=with_value(np.full((K_STEPS, 1), 0.1), 1, np.inf)), ValueError,
     "inner_lr"),
    ("inner_lr_too_many_steps", lambda: call(inner_lr=np.full((K_STEPS + 1, 1), 0.1)), ValueError, "inner_lr"),
    ("inner_lr_too_many_params", lambda: call(inner_lr=np.full((K_STEPS, D_FEAT + 2), 0.1)), ValueError,
     "inner_lr"),
    ("inner_lr_3d", lambda: call(inner_lr=np.full((2, K_STEPS, D_FEAT + 1), 0.1)), ValueError, "inner_lr"),
    ("inner_lr_string", lambda: call(inner_lr="0.1"), TypeError, "inner_lr"),
    ("inner_lr_bool", lambda: call(inner_lr=True), TypeError, "inner_lr"),
    ("inner_lr_none", lambda: call(inner_lr=None), TypeError, "inner_lr"),
    ("inner_lr_object", lambda: call(inner_lr=np.array([0.1, None])), TypeError, "inner_lr"),
    # inner_steps
    ("inner_steps_negative", lambda: call(inner_steps=-1), ValueError, "inner_steps"),
    ("inner_steps_fractional", lambda: call(inner_steps=2.5), TypeError, "inner_steps"),
    ("inner_steps_float_whole", lambda: call(inner_steps=2.0), TypeError, "inner_steps"),
    ("inner_steps_bool", lambda: call(inner_steps=True), TypeError, "inner_steps"),
    ("inner_steps_string", lambda: call(inner_steps="3"), TypeError, "inner_steps"),
    ("inner_steps_none", lambda: call(inner_steps=None), TypeError, "inner_steps"),
    # l2
    ("l2_negative", lambda: call(l2=-0.1), ValueError, "l2"),
    ("l2_nan", lambda: call(l2=float("nan")), ValueError, "l2"),
    ("l2_inf", lambda: call(l2=float("inf")), ValueError, "l2"),
    ("l2_string", lambda: call(l2="0.1"), TypeError, "l2"),
    ("l2_array", lambda: call(l2=np.array([0.1, 0.2])), TypeError, "l2"),
    # n_threads
    ("n_threads_zero", lambda: call(n_threads=0), ValueError, "n_threads"),
    ("n_threads_negative", lambda: call(n_threads=-1), ValueError, "n_threads"),
    ("n_threads_fractional", lambda: call(n_threads=1.5), TypeError, "n_threads"),
    ("n_threads_string", lambda: call(n_threads="2"), TypeError, "n_threads"),
    # tasks container
    ("tasks_dict", lambda: call(tasks={"support_X": XS}), TypeError, "tasks"),
    ("tasks_three_tuple", lambda: call(tasks=(XS, YS, XQ)), TypeError, "tasks"),
    ("tasks_array", lambda: call(tasks=XS), TypeError, "tasks"),
    ("tasks_none_like", lambda: fastmaml.meta_value_and_grad(THETA, None, inner_lr=0.1, inner_steps=1), TypeError,
     "tasks"),
    # index form
    ("from_index_support_out_of_range", lambda: from_index(support_idx=with_value(SIDX, (0, 0), 10).astype(int)),
     ValueError, "support_idx"),
    ("from_index_support_negative", lambda: from_index(support_idx=with_value(SIDX, (1, 0), -1).astype(int)),
     ValueError, "support_idx"),
    ("from_index_query_out_of_range", lambda: from_index(query_idx=with_value(QIDX, (2, 4), 99).astype(int)),
     ValueError, "query_idx"),
    ("from_index_float_index", lambda: from_index(support_idx=SIDX.astype(float)), TypeError, "support_idx"),
    ("from_index_label_shape", lambda: from_index(support_y=YS[:, :-1]), ValueError, "support_y"),
    ("from_index_task_count", lambda: from_index(query_idx=QIDX[:-1], query_y=YQ[:-1]), ValueError, "query_idx"),
    ("from_index_X_1d", lambda: from_index(X=DATASET[:, 0]), ValueError, "X"),
    ("from_index_X_nan", lambda: from_index(X=with_value(DATASET, (3, 1), np.nan)), ValueError, "X"),
    ("from_index_ptr_wrong_end", lambda: from_index(support_idx=SIDX.ravel(), support_y=YS.ravel(),
                                                    support_ptr=[0, 4, 8, 11]), ValueError, "support_ptr"),
    ("from_index_ptr_empty_task", lambda: from_index(support_idx=SIDX.ravel(), support_y=YS.ravel(),
                                                     support_ptr=[0, 4, 4, 12]), ValueError, "support_ptr"),
    ("from_index_ptr_with_2d_idx", lambda: from_index(support_ptr=[0, 4, 8, 12]), ValueError, "support_idx"),
    ("from_index_query_label_2", lambda: call(tasks=from_index(query_y=with_value(YQ, (1, 1), 2).astype(int))),
     ValueError, "query_y"),
    ("from_index_support_label_minus_1",
     lambda: call(tasks=from_index(support_y=with_value(YS, (2, 3), -1).astype(int))), ValueError, "support_y"),
    # adapt, predict_proba, primitives
    ("adapt_y_shape", lambda: fastmaml.adapt(THETA, XS, YS[:, :-1], inner_lr=0.1, inner_steps=1), ValueError, "y"),
    ("adapt_X_4d", lambda: fastmaml.adapt(THETA, XS[None], YS, inner_lr=0.1, inner_steps=1), ValueError, "X"),
    ("adapt_tasks_with_y", lambda: fastmaml.adapt(THETA, Tasks(XS, YS, XQ, YQ), YS, inner_lr=0.1, inner_steps=1),
     ValueError, "y"),
    ("adapt_label_2", lambda: fastmaml.adapt(THETA, XS[0], with_value(YS[0], 0, 2).astype(int), inner_lr=0.1,
                                             inner_steps=1), ValueError, "y"),
    ("loss_label_2", lambda: fastmaml.loss_and_grad(THETA, XS[0], with_value(YS[0], 1, 2).astype(int)), ValueError,
     "y"),
    ("adapt_theta_shape", lambda: fastmaml.adapt(THETA[:-1], XS, YS, inner_lr=0.1, inner_steps=1), ValueError,
     "theta"),
    ("adapt_inner_lr_shape", lambda: fastmaml.adapt(THETA, XS, YS, inner_lr=np.ones((3, 1)), inner_steps=2),
     ValueError, "inner_lr"),
    ("adapt_inner_steps", lambda: fastmaml.adapt(THETA, XS, YS, inner_lr=0.1, inner_steps=-2), ValueError,
     "inner_steps"),
    ("predict_params_length", lambda: fastmaml.predict_proba(THETA[:-1], XS[0]), ValueError, "params"),
    ("predict_params_3d", lambda: fastmaml.predict_proba(np.ones((1, 2, D_FEAT + 1)), XS), ValueError, "params"),
    ("predict_per_task_params_with_2d_X", lambda: fastmaml.predict_proba(np.ones((T_TASKS, D_FEAT + 1)), XS[0]),
     ValueError, "params"),
    ("predict_params_strings", lambda: fastmaml.predict_proba(np.array(["a"] * (D_FEAT + 1)), XS[0]), TypeError,
     "params"),
    ("predict_X_strings", lambda: fastmaml.predict_proba(THETA, XS[0].astype(str)), TypeError, "X"),
    ("loss_params_shape", lambda: fastmaml.loss_and_grad(THETA, XS, YS), ValueError, "params"),
    ("loss_params_nan", lambda: fastmaml.loss_and_grad(with_value(THETA, 0, np.nan), XS[0], YS[0]), ValueError,
     "params"),
    ("loss_l2_negative", lambda: fastmaml.loss_and_grad(THETA, XS[0], YS[0], l2=-1.0), ValueError, "l2"),
    ("loss_n_threads", lambda: fastmaml.loss_and_grad(THETA, XS[0], YS[0], n_threads=0), ValueError, "n_threads"),
    ("hvp_v_shape", lambda: fastmaml.hessian_vector_product(THETA, XS[0], YS[0], THETA[:-1]), ValueError, "v"),
    ("hvp_v_nan", lambda: fastmaml.hessian_vector_product(THETA, XS[0], YS[0], with_value(THETA, 1, np.nan)),
     ValueError, "v"),
    ("hvp_v_missing", lambda: fastmaml.hessian_vector_product(THETA, XS[0], YS[0]), TypeError, "v"),
]


@pytest.mark.parametrize(
    "make_call,error,argument",
    [pytest.param(*case[1:4], id=case[0], marks=case[4:]) for case in VALIDATION_CASES],
)
def test_invalid_argument_raises_an_error_naming_it(make_call, error, argument):
    with pytest.raises(error, match=rf"\b{re.escape(argument)}\b"):
        make_call()


def test_one_dimensional_inner_lr_of_the_wrong_length_suggests_the_per_step_shape():
    K = 5  # != d + 1 = 4
    with pytest.raises(ValueError, match="inner_lr") as excinfo:
        call(inner_lr=np.full(K, 0.1), inner_steps=K)
    assert f"({K}, 1)" in str(excinfo.value)


def test_one_dimensional_inner_lr_of_length_d_plus_1_is_per_parameter_even_when_it_equals_K():
    K = D_FEAT + 1
    inner_lr = np.linspace(0.05, 0.2, K)
    got = call(inner_lr=inner_lr, inner_steps=K, l2=0.1)
    want = reference.meta_value_and_grad(THETA, (XS, YS, XQ, YQ), inner_lr, K, 0.1)
    assert got.grad_inner_lr.shape == (K,)
    assert_rel(got.grad_inner_lr, want.grad_inner_lr, RTOL_F64)


def test_float_labels_beyond_int32_are_rejected_naming_the_argument():
    with pytest.raises(ValueError, match="support_y"):
        call(ys=np.full(YS.shape, 1e10))


def test_non_numeric_v_raises_a_type_error_naming_v():
    with pytest.raises(TypeError, match="v"):
        fastmaml.hessian_vector_product(THETA, XS[0], YS[0], np.array(["a"] * (D_FEAT + 1)))


def test_inner_lr_not_representable_in_float32_is_rejected_naming_it():
    with pytest.raises(ValueError, match="inner_lr"):
        call(Xs=XS.astype(np.float32), Xq=XQ.astype(np.float32), inner_lr=1e39)


# ---------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------


@st.composite
def problems(draw):
    T = draw(st.integers(1, 5))
    n = draw(st.integers(1, 6))
    m = draw(st.integers(1, 6))
    d = draw(st.integers(1, 6))
    K = draw(st.integers(0, 4))
    # inner_steps = 0 with a per-step shape is the known bug pinned above.
    kinds = LR_KINDS
    kind = draw(st.sampled_from(kinds))
    lr_high = draw(st.floats(0.0, 1.0))
    l2 = draw(st.floats(0.0, 1.0))
    first_order = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tasks = (
        rng.uniform(-1, 1, size=(T, n, d)),
        rng.integers(0, 2, size=(T, n)),
        rng.uniform(-1, 1, size=(T, m, d)),
        rng.integers(0, 2, size=(T, m)),
    )
    theta = rng.uniform(-1, 1, size=d + 1)
    inner_lr = lr_high if kind == "python_float" else make_inner_lr(kind, K, d + 1, rng, 0.0, lr_high)
    return theta, tasks, inner_lr, K, l2, first_order


@settings(max_examples=30, deadline=None, database=None, derandomize=True)
@given(problems())
def test_property_core_matches_reference_is_finite_and_thread_independent(problem):
    theta, tasks, inner_lr, K, l2, first_order = problem
    kw = dict(inner_lr=inner_lr, inner_steps=K, l2=l2, first_order=first_order)
    one = fastmaml.meta_value_and_grad(theta, tasks, n_threads=1, **kw)
    two = fastmaml.meta_value_and_grad(theta, tasks, n_threads=2, **kw)
    assert_all_finite(one)
    assert_bitwise_equal(one, two)
    want = reference.meta_value_and_grad(theta, tasks, inner_lr, K, l2, first_order)
    assert_matches_reference(one, want, inner_lr, RTOL_F64)


def test_the_core_guards_memory_on_its_own_without_the_python_checks():
    # The Python layer validates and names each argument; the bindings keep the
    # checks that protect memory, so a direct call with bad offsets, indices or
    # labels raises instead of reading out of bounds.
    from fastmaml import _core

    rng = np.random.default_rng(0)
    X = rng.random((10, 3))
    ptr = np.array([0, 2, 4], dtype=np.int64)
    idx = np.array([0, 1, 2, 3], dtype=np.int64)
    y = np.array([0, 1, 1, 0], dtype=np.int32)
    good = _core.Side(X, idx, ptr, y)
    kw = dict(n_classes=1, inner_steps=2, l2=0.0, mode=_core.Mode.maml, sweep=_core.Sweep.auto, n_threads=1,
              inner_lr=np.full((2, 4), 0.1), lr_layout=(1, 1, 1))
    theta = np.zeros(4)
    loss, grad, _, _ = _core.meta_value_and_grad(theta, good, good, **kw)
    assert np.isfinite(loss) and grad.shape == (4,)
    bad_sides = {
        "support_idx": _core.Side(X, np.array([0, 1, 2, 10], dtype=np.int64), ptr, y),
        "support_y": _core.Side(X, idx, ptr, np.array([0, 1, 2, 0], dtype=np.int32)),
        "support_ptr": _core.Side(X, idx, np.array([0, 2, 5], dtype=np.int64), y),
    }
    for name, side in bad_sides.items():
        with pytest.raises(ValueError, match=name):
            _core.meta_value_and_grad(theta, side, good, **kw)
    with pytest.raises(ValueError, match="theta"):
        _core.meta_value_and_grad(np.zeros(3), good, good, **kw)
    with pytest.raises(ValueError, match="inner_lr"):
        _core.meta_value_and_grad(theta, good, good, **{**kw, "inner_lr": np.full((1, 4), 0.1)})
    with pytest.raises(TypeError):
        _core.meta_value_and_grad(theta, good, good, **{**kw, "mode": 2})  # enums, not magic integers
