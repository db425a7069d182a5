"""Per-task hyperparameters and feature gradients on the fast binary plain sweep.

Binary calls with one step size per step (scalar or per-step inner_lr, shared
or per task through ``task_axis``) that ask for a per-task l2, per-task step
sizes or ``grad_features`` run fastsweep.hpp's FastPlainWorker with its extras;
softmax and per-parameter inner_lr keep the generic plain sweep (sweep.hpp +
features.hpp). extended.hpp makes that choice once, from shapes and options;
``_core.extended_path`` reports it and the private ``ext_generic=True`` of
``_core.meta_value_and_grad`` forces the generic sweep, so the two exact
paths can be compared on the same call. Shapes cover the kernels' tails
(n, m, d not multiples of the 4-row / 8- and 16-float tiles, n = 1, d = 1),
dense, index-form and ragged tasks.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmaml
import reference
from problems import dense, ragged_index
from fastmaml import _core
from tolerances import RTOL_F32, RTOL_F64, assert_rel

FIELDS = ("grad", "grad_inner_lr", "grad_l2", "grad_support_X", "grad_query_X")


def call(theta, tasks, *, generic=False, monkeypatch=None, **kw):
    """fastmaml.meta_value_and_grad, with the generic plain sweep forced when `generic`."""
    if not generic:
        return fastmaml.meta_value_and_grad(theta, tasks, **kw)
    core = _core.meta_value_and_grad

    def forced(*a, **k):
        return core(*a, **k, ext_generic=True)

    with monkeypatch.context() as mp:
        mp.setattr(_core, "meta_value_and_grad", forced)
        return fastmaml.meta_value_and_grad(theta, tasks, **kw)


def options(name, T, K, seed=7):
    rng = np.random.default_rng(seed)
    return {
        "features": dict(inner_lr=0.4, l2=0.05, grad_features=True),
        "features_step": dict(inner_lr=rng.uniform(0.2, 0.6, (K, 1)), grad_features=True),
        "l2_task": dict(inner_lr=0.4, l2=rng.uniform(0.0, 0.3, T)),
        "lr_task": dict(inner_lr=rng.uniform(0.2, 0.6, T), task_axis=True),
        "lr_task_step_l2_features": dict(inner_lr=rng.uniform(0.2, 0.6, (T, K, 1)), task_axis=True,
                                         l2=rng.uniform(0.0, 0.3, T), grad_features=True),
    }[name]


def assert_same_numbers(a, b, rtol):
    assert a.loss == pytest.approx(b.loss, rel=rtol, abs=0)
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert_rel(x, y, rtol, f)


def test_the_choice_reads_link_and_step_layout_only():
    maml, fo = _core.Mode.maml, _core.Mode.first_order
    assert _core.extended_path(1, 5) == "fast"
    assert _core.extended_path(1, 5, lr_layout=(5, 1, 1), mode=fo) == "fast"
    assert _core.extended_path(1, 0) == "fast"
    assert _core.extended_path(3, 5) == "generic"  # softmax
    assert _core.extended_path(1, 5, lr_layout=(5, 11, 1), mode=maml) == "generic"  # per-parameter inner_lr


SHAPES = [(5, 10, 30, 256, 5), (3, 1, 1, 1, 1), (4, 5, 7, 13, 3), (3, 7, 9, 37, 2), (2, 6, 3, 64, 0),
          (3, 9, 5, 19, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d_n%d_m%d_d%d_K%d" % s)
@pytest.mark.parametrize("opt", ["features", "features_step", "l2_task", "lr_task", "lr_task_step_l2_features"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_fast_sweep_equals_the_generic_sweep(shape, opt, first_order, monkeypatch):
    T, n, m, d, K = shape
    if K == 0 and opt in ("features_step", "lr_task_step_l2_features"):
        pytest.skip("no steps to size")
    theta, tasks = dense(T, n, m, d, seed=sum(shape))
    kw = dict(options(opt, T, K), inner_steps=K, first_order=first_order)
    fast = call(theta, tasks, **kw)
    generic = call(theta, tasks, generic=True, monkeypatch=monkeypatch, **kw)
    assert_same_numbers(fast, generic, RTOL_F64)
    if kw.get("grad_features") and K > 0:
        assert np.ptp(fast.grad_support_X) > 0  # a zero or constant support gradient would pass nothing


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_fast_sweep_matches_the_reference_with_tails(first_order):
    """Against the NumPy reference directly (not only the generic sweep)."""
    T, n, m, d, K = 3, 5, 7, 13, 3
    theta, tasks = dense(T, n, m, d, seed=3)
    kw = options("lr_task_step_l2_features", T, K)
    res = fastmaml.meta_value_and_grad(theta, tasks, inner_steps=K, first_order=first_order, **kw)
    ref = reference.meta_value_and_grad_ext(theta, tasks, kw["inner_lr"], K, l2=kw["l2"], first_order=first_order,
                                            task_axis=True, grad_features=True)
    assert res.loss == pytest.approx(ref.loss, rel=RTOL_F64, abs=0)
    for f in FIELDS:
        assert_rel(getattr(res, f), getattr(ref, f), RTOL_F64, f)


def test_float32_fast_sweep_within_tolerance_of_float64():
    T, n, m, d, K = 4, 10, 30, 256, 5
    theta, tasks = dense(T, n, m, d, seed=11)
    kw = dict(options("lr_task_step_l2_features", T, K), inner_steps=K)
    r64 = fastmaml.meta_value_and_grad(theta, tasks, **kw)
    t32 = tuple(a.astype(np.float32) if i % 2 == 0 else a for i, a in enumerate(tasks))
    r32 = fastmaml.meta_value_and_grad(theta.astype(np.float32), t32, **kw)
    assert r32.grad_support_X.dtype == np.float32
    assert_same_numbers(r32, r64, RTOL_F32)


def test_shared_values_give_the_shared_fast_sweep_bit_for_bit():
    """Proof that the extras run FastPlainWorker: with every task's l2 and step size equal, the loss is
    the bits of the shared call on the fast plain sweep (the generic sweep rounds differently) and the
    meta-gradient agrees to a few ulps, while the per-task outputs sum to the shared ones.

    The gradient is not compared bit for bit: the two calls are separate instantiations of the reverse
    sweep, and GCC's link-time optimisation may contract their multiply-adds differently from one build of
    the module to another (measured: 7e-18 after an unrelated kernel joined the module). Each build's
    bits are still a deterministic function of the inputs (thread counts, alignment: other tests)."""
    T, n, m, d, K = 6, 9, 11, 37, 3
    theta, tasks = dense(T, n, m, d, seed=5)
    shared = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.4, inner_steps=K, l2=0.1, sweep="plain")
    ext = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.full(T, 0.4), task_axis=True, inner_steps=K,
                                       l2=np.full(T, 0.1), grad_features=True)
    assert ext.loss == shared.loss
    np.testing.assert_allclose(ext.grad, shared.grad, rtol=0, atol=16 * np.finfo(float).eps * np.abs(shared.grad).max())
    assert ext.grad_inner_lr.shape == (T,) and ext.grad_l2.shape == (T,)
    assert ext.grad_inner_lr.sum() == pytest.approx(shared.grad_inner_lr, rel=1e-12)
    assert ext.grad_l2.sum() == pytest.approx(shared.grad_l2, rel=1e-12)


def test_index_form_and_ragged_tasks_on_the_fast_sweep(monkeypatch):
    d, K, T = 21, 3, 5
    tasks, theta, (X, sidx, sy, qidx, qy, sptr, qptr) = ragged_index(seed=2)
    kw = dict(options("lr_task_step_l2_features", T, K), inner_steps=K)
    fast = call(theta, tasks, **kw)
    generic = call(theta, tasks, generic=True, monkeypatch=monkeypatch, **kw)
    assert fast.grad_support_X.shape == (sptr[-1], d) and fast.grad_query_X.shape == (qptr[-1], d)
    assert_same_numbers(fast, generic, RTOL_F64)
    dense_tasks = reference.gather_index_tasks(X, sidx, sy, qidx, qy, sptr, qptr)
    ref = reference.meta_value_and_grad_ext(theta, dense_tasks, kw["inner_lr"], K, l2=kw["l2"], task_axis=True,
                                            grad_features=True)
    assert_rel(fast.grad_support_X, np.concatenate(ref.grad_support_X), RTOL_F64)
    assert_rel(fast.grad_query_X, np.concatenate(ref.grad_query_X), RTOL_F64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bitwise_across_threads_and_independent_of_the_other_tasks(dtype):
    T, n, m, d, K = 130, 10, 12, 29, 3  # more than one 64-task reduction block
    theta, tasks = dense(T, n, m, d, seed=9, dtype=dtype)
    kw = dict(options("lr_task_step_l2_features", T, K), inner_steps=K)
    one = fastmaml.meta_value_and_grad(theta, tasks, n_threads=1, **kw)
    two = fastmaml.meta_value_and_grad(theta, tasks, n_threads=2, **kw)
    assert one.loss == two.loss
    for f in FIELDS:
        assert np.array_equal(getattr(one, f), getattr(two, f)), f
    # Task 0 with other company (same batch size, so the same 1/T): the same bits.
    perm = np.r_[0, np.arange(T - 1, 0, -1)]
    other = fastmaml.meta_value_and_grad(theta, tuple(a[perm] for a in tasks), n_threads=2,
                                         inner_lr=kw["inner_lr"][perm], task_axis=True, l2=kw["l2"][perm],
                                         inner_steps=K, grad_features=True)
    for f in ("grad_inner_lr", "grad_l2", "grad_support_X", "grad_query_X"):
        assert np.array_equal(getattr(other, f)[0], getattr(one, f)[0]), f
        assert np.array_equal(getattr(other, f)[1:], getattr(one, f)[1:][::-1]), f


def test_divergence_and_non_finite_input_are_named_on_the_fast_sweep():
    T, n, m, d, K = 4, 5, 6, 13, 3
    theta, (Xs, ys, Xq, yq) = dense(T, n, m, d, seed=1)
    lr = np.full(T, 0.5)
    lr[2] = 1e300
    with pytest.raises(fastmaml.DivergenceError, match="task 2"):
        fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=lr, task_axis=True, inner_steps=K,
                                     grad_features=True)
    for side, arr in (("support_X", Xs), ("query_X", Xq)):
        bad = arr.copy()
        bad[3, 0, d - 1] = np.inf
        args = (Xs, ys, bad, yq) if side == "query_X" else (bad, ys, Xq, yq)
        with pytest.raises(ValueError, match=f"{side}: contains NaN or infinity"):
            fastmaml.meta_value_and_grad(theta, args, inner_lr=0.5, inner_steps=K, l2=np.full(T, 0.1),
                                         grad_features=True)
