"""The exact paths agree: the span-of-rows (Gram) sweep against the plain sweep and the reference."""

from __future__ import annotations

import numpy as np
import pytest

import fastmaml
import reference as R
from fastmaml import _core
from tolerances import RTOL_F32, RTOL_F64, assert_rel


def batch(T=5, n=7, m=6, d=9, C=1, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    hi = 2 if C == 1 else C
    return (rng.random((T, n, d)).astype(dtype), rng.integers(0, hi, (T, n)),
            rng.random((T, m, d)).astype(dtype), rng.integers(0, hi, (T, m)))


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("lr_kind", ["scalar", "per_step"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("l2", [0.0, 0.3])
@pytest.mark.parametrize("K", [1, 4])
def test_gram_sweep_matches_plain_sweep_and_reference(C, lr_kind, first_order, l2, K):
    tasks = batch(C=C, seed=C + K)
    rng = np.random.default_rng(1)
    theta = 0.5 * rng.standard_normal(10 if C == 1 else (10, C))
    lr = 0.4 if lr_kind == "scalar" else np.linspace(0.2, 0.5, K).reshape((K, 1) if C == 1 else (K, 1, 1))
    kw = dict(inner_lr=lr, inner_steps=K, l2=l2, first_order=first_order)
    gram = fastmaml.meta_value_and_grad(theta, tasks, sweep="gram", **kw)
    plain = fastmaml.meta_value_and_grad(theta, tasks, sweep="plain", **kw)
    ref = R.meta_value_and_grad(theta, tasks, lr, K, l2, first_order)
    for name in ("loss", "grad", "grad_inner_lr", "grad_l2"):
        assert_rel(getattr(gram, name), getattr(plain, name), RTOL_F64)
        assert_rel(getattr(gram, name), getattr(ref, name), RTOL_F64)


def test_gram_sweep_on_ragged_index_tasks_and_float32():
    rng = np.random.default_rng(2)
    X = rng.random((60, 12))
    s_ptr = np.array([0, 3, 10, 14])
    q_ptr = np.array([0, 5, 9, 15])
    s_idx = rng.integers(0, 60, 14)
    q_idx = rng.integers(0, 60, 15)
    sy, qy = rng.integers(0, 2, 14), rng.integers(0, 2, 15)
    theta = 0.3 * rng.standard_normal(13)
    for dtype, tol in ((np.float64, RTOL_F64), (np.float32, RTOL_F32)):
        tasks = fastmaml.Tasks.from_index(X.astype(dtype), s_idx, sy, q_idx, qy, support_ptr=s_ptr, query_ptr=q_ptr)
        gram = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.5, inner_steps=6, l2=0.1, sweep="gram")
        ref = R.meta_value_and_grad(theta, [tasks.task(t) for t in range(3)], 0.5, 6, 0.1)
        assert gram.grad.dtype == dtype
        assert_rel(gram.grad, ref.grad, tol)
        assert_rel(gram.grad_inner_lr, ref.grad_inner_lr, tol)


def test_gram_sweep_is_thread_independent_and_diverges_cleanly():
    tasks = batch(T=140, seed=3)
    theta = np.zeros(10)
    a = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.3, inner_steps=3, sweep="gram", n_threads=1)
    b = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.3, inner_steps=3, sweep="gram", n_threads=2)
    assert np.array_equal(a.grad, b.grad) and a.loss == b.loss and a.grad_inner_lr == b.grad_inner_lr
    big = tuple(x * 1e3 if x.dtype.kind == "f" else x for x in batch(seed=4))
    with pytest.raises(fastmaml.DivergenceError, match="task"):
        fastmaml.meta_value_and_grad(theta, big, inner_lr=1e300, inner_steps=30, l2=1e6, sweep="gram")


def test_gram_sweep_refuses_cases_it_does_not_cover():
    tasks = batch()
    with pytest.raises(ValueError, match="sweep"):
        fastmaml.meta_value_and_grad(np.zeros(10), tasks, inner_lr=np.full(10, 0.1), inner_steps=2, sweep="gram")
    with pytest.raises(ValueError, match="sweep"):
        fastmaml.meta_value_and_grad(np.zeros(10), tasks, inner_lr=0.1, inner_steps=2, sweep="fast")


def test_cost_model_depends_on_shapes_only():
    # deep inner loops on few rows take the Gram path; many rows with few steps do not
    assert _core.uses_gram(20, 784, 1, 50)
    assert _core.uses_gram(20, 784, 1, 5)
    assert _core.uses_gram(100, 784, 1, 10)  # W2 (calibrated, docs/design.md)
    assert not _core.uses_gram(150, 784, 1, 10)
    assert not _core.uses_gram(200, 20, 1, 1)


@pytest.mark.parametrize("n, d, K", [(3, 60, 4), (30, 8, 2)])
@pytest.mark.parametrize("lr_kind", ["scalar", "per_step", "per_parameter"])
@pytest.mark.parametrize("first_order", [False, True])
def test_choose_sweep_is_the_path_the_dispatcher_takes(n, d, K, lr_kind, first_order):
    # The exported decision, forced on a call, reproduces "auto" bitwise; the
    # other path does not (so the comparison can tell them apart).
    from fastmaml.functional import choose_sweep

    tasks = batch(T=4, n=n, d=d, seed=n)
    theta = np.linspace(-0.3, 0.3, d + 1)
    lr = {"scalar": 0.3, "per_step": np.linspace(0.2, 0.4, K).reshape(K, 1),
          "per_parameter": np.linspace(0.1, 0.3, d + 1)}[lr_kind]
    kw = dict(inner_lr=lr, inner_steps=K, l2=0.1, first_order=first_order)
    chosen = choose_sweep(4 * n, 4, d, inner_steps=K, inner_lr=lr, first_order=first_order)
    assert chosen == ("plain" if lr_kind == "per_parameter" or n == 30 else "gram")
    auto = fastmaml.meta_value_and_grad(theta, tasks, **kw)
    forced = fastmaml.meta_value_and_grad(theta, tasks, sweep=chosen, **kw)
    bits = lambda r: (r.loss, r.grad.tobytes(), np.asarray(r.grad_inner_lr).tobytes(), r.grad_l2)  # noqa: E731
    assert bits(auto) == bits(forced)
    if lr_kind != "per_parameter":
        other = fastmaml.meta_value_and_grad(theta, tasks, sweep="gram" if chosen == "plain" else "plain", **kw)
        assert bits(auto) != bits(other)


def test_choose_sweep_applies_the_cores_applicability_check():
    from fastmaml.functional import choose_sweep

    # Few rows, many features, deep K: the cost model prefers the Gram sweep ...
    assert choose_sweep(20 * 8, 8, 784, inner_steps=10, inner_lr=0.1) == "gram"
    # ... but it applies only with one step size per step, without a preconditioner, for (FO)MAML.
    assert choose_sweep(20 * 8, 8, 784, inner_steps=10, inner_lr=np.full(785, 0.1)) == "plain"
    assert choose_sweep(20 * 8, 8, 784, inner_steps=10, preconditioned=True) == "plain"
    assert choose_sweep(20 * 8, 8, 784, inner_steps=0, inner_lr=0.1) == "plain"
    assert choose_sweep(20 * 8, 8, 784, inner_steps=10, inner_lr=0.1, sweep="plain") == "plain"
    assert choose_sweep(20 * 8, 8, 784, inner_steps=10, inner_lr=0.1, n_classes=3) == "gram"
    with pytest.raises(ValueError, match="sweep: 'gram' needs one step size per step"):
        choose_sweep(20 * 8, 8, 784, inner_steps=10, inner_lr=np.full(785, 0.1), sweep="gram")
    with pytest.raises(ValueError, match="inner_lr"):
        choose_sweep(20 * 8, 8, 784, inner_steps=10, inner_lr=np.full(7, 0.1))
    # The mean support size is rounded up, as in the core (161 rows over 8 tasks: 21 rows).
    assert _core.choose_sweep(161, 8, 784, 1, 10) == _core.choose_sweep(21, 1, 784, 1, 10) == _core.Sweep.gram


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dataset_kernel_gathers_the_same_gram_matrices(dtype):
    rng = np.random.default_rng(5)
    X = rng.random((200, 30)).astype(dtype)
    y = rng.integers(0, 4, 200)
    plain = fastmaml.EpisodeSampler(X, y, n_way=2, k_shot=3, n_query=4, random_state=0)
    cached = fastmaml.EpisodeSampler(X, y, n_way=2, k_shot=3, n_query=4, random_state=0, kernel_budget=10**7)
    assert cached.kernel is not None and cached.kernel.shape == (200, 200)
    a, b = plain.sample(20), cached.sample(20)
    theta = np.zeros(31)
    ref = fastmaml.meta_value_and_grad(theta, a, inner_lr=0.2, inner_steps=4, l2=0.1, sweep="plain")
    got = fastmaml.meta_value_and_grad(theta, b, inner_lr=0.2, inner_steps=4, l2=0.1, sweep="gram")
    tol = RTOL_F64 if dtype == np.float64 else RTOL_F32
    assert_rel(got.grad, ref.grad, tol)
    assert_rel(got.grad_inner_lr, ref.grad_inner_lr, tol)


def test_dataset_kernel_respects_the_memory_budget_and_shape():
    from fastmaml.datasets import dataset_kernel

    X = np.random.default_rng(0).random((100, 5))
    assert dataset_kernel(X, memory_budget=100 * 100 * 8 - 1) is None
    np.testing.assert_allclose(dataset_kernel(X, memory_budget=10**6), X @ X.T)
    assert _core.uses_gram(30, 784, 1, 3, kernel=True) and not _core.uses_gram(30, 784, 1, 3)
    with pytest.raises(ValueError, match="kernel"):
        fastmaml.Tasks.from_index(X, [[0, 1]], [[0, 1]], [[2]], [[1]], kernel=np.zeros((5, 5)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lr", [0.3, "per_parameter", "per_step"])
def test_block_sums_of_aligned_shards_reproduce_the_whole_batch_bitwise(dtype, lr):
    T = 150
    Xs, ys, Xq, yq = batch(T=T, seed=6, dtype=dtype)
    inner_lr = {"per_parameter": np.linspace(0.1, 0.3, 10), "per_step": np.full((3, 1), 0.2)}.get(lr, lr)
    theta = np.linspace(-0.2, 0.2, 10)
    full = fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=inner_lr, inner_steps=3, l2=0.1)
    B = fastmaml.REDUCE_BLOCK if hasattr(fastmaml, "REDUCE_BLOCK") else 64
    cuts = [0, B, 2 * B, T]
    parts = [fastmaml.meta_block_sums(theta, (Xs[a:b], ys[a:b], Xq[a:b], yq[a:b]), inner_lr=inner_lr,
                                      inner_steps=3, l2=0.1, n_threads=1 + i % 2)
             for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    got = fastmaml.combine_block_sums(parts)
    assert got.loss == full.loss and got.grad_l2 == full.grad_l2
    assert np.array_equal(got.grad, full.grad) and np.array_equal(got.grad_inner_lr, full.grad_inner_lr)
    assert got.grad.dtype == dtype
    with pytest.raises(ValueError, match="multiple of"):
        fastmaml.combine_block_sums([parts[2], parts[0]])


# --------------------------------------------------------------- properties
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def layouts(draw):
    T, n, m, d = (draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 5)))
    K = draw(st.integers(0, 4))
    C = draw(st.sampled_from([1, 2, 3]))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    layout = draw(st.sampled_from(["c", "fortran", "strided", "index", "int_features"]))
    lr_kind = draw(st.sampled_from(["scalar", "per_step", "per_parameter", "per_class"]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return T, n, m, d, K, C, dtype, layout, lr_kind, scale, seed


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(layouts())
def test_property_any_layout_dtype_and_step_shape_matches_reference(case):
    T, n, m, d, K, C, dtype, layout, lr_kind, scale, seed = case
    rng = np.random.default_rng(seed)
    hi = 2 if C == 1 else C
    Xs = rng.uniform(-1, 1, (T, n, d)) * scale
    Xq = rng.uniform(-1, 1, (T, m, d)) * scale
    ys, yq = rng.integers(0, hi, (T, n)), rng.integers(0, hi, (T, m))
    theta = rng.uniform(-1, 1, (d + 1,) if C == 1 else (d + 1, C))
    if layout == "int_features":
        Xs, Xq = np.round(Xs * 3).astype(np.int16), np.round(Xq * 3).astype(np.int16)
    ref = R.meta_value_and_grad
    step = 0.5 / (1.0 + scale**2 * d * (9 if layout == "int_features" else 1))  # a stable step size
    lr = {"scalar": step, "per_step": np.full((K, 1) if C == 1 else (K, 1, 1), step),
          "per_parameter": np.full(theta.shape, step),
          "per_class": np.full((1, C) if C > 1 else (1,), step)}[lr_kind]
    want = ref(theta, (Xs.astype(np.float64), ys, Xq.astype(np.float64), yq), lr, K, 0.1)
    Xs_c, Xq_c = (Xs.astype(dtype), Xq.astype(dtype)) if layout != "int_features" else (Xs, Xq)
    if layout == "fortran":
        tasks = (np.asfortranarray(Xs_c), ys, np.asfortranarray(Xq_c), yq)
    elif layout == "strided":
        tasks = (np.repeat(Xs_c, 2, axis=2)[:, :, ::2], ys, np.repeat(Xq_c, 2, axis=2)[:, :, ::2], yq)
    elif layout == "index":
        X = np.concatenate([Xs_c.reshape(-1, d), Xq_c.reshape(-1, d)])
        s_idx = np.arange(T * n).reshape(T, n)
        tasks = fastmaml.Tasks.from_index(X, s_idx, ys, T * n + np.arange(T * m).reshape(T, m), yq)
    else:
        tasks = (Xs_c, ys, Xq_c, yq)
    one = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=0.1, n_threads=1)
    two = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=0.1, n_threads=2)
    assert np.array_equal(one.grad, two.grad) and one.loss == two.loss
    assert np.isfinite(one.grad).all() and np.isfinite(one.loss)
    tol = RTOL_F32 if (dtype == np.float32 and layout != "int_features") else RTOL_F64
    assert_rel(one.grad, want.grad, tol)
    assert_rel(one.grad_inner_lr, want.grad_inner_lr, tol)
