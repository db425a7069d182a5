"""Feature gradients on the Gram path (binary, shared step sizes and l2).

With ``grad_features=True`` and nothing per task, a binary call may run the
sweep in the span of the support rows (fastsweep.hpp's FastGramWorker), which
never forms the inner iterates w_j or the adjoint steps u_j in d-space: it
keeps their coefficients on X, theta and gK and forms each task's support
rows' gradients at the end as one (n x (n + 2))((n + 2) x d) product. The
cost model (meta.hpp, ``CallShape::features``) counts that product against
the plain sweep's (n x 2K)(2K x d) one. These tests prove that the new path
computes the quantity of docs/design.md ("Feature gradients"): against the
NumPy reference and the plain sweep, finite differences, float32, thread
independence, index-form and ragged tasks, and the choice of path.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmaml
import reference
from problems import dense, ragged_index
from fastmaml import _core
from tolerances import FD_RTOL, FD_STEP, RTOL_F32, RTOL_F64, assert_rel

FIELDS = ("grad", "grad_inner_lr", "grad_l2", "grad_support_X", "grad_query_X")


def assert_same_numbers(a, b, rtol):
    assert a.loss == pytest.approx(b.loss, rel=rtol, abs=0)
    for f in FIELDS:
        assert_rel(getattr(a, f), getattr(b, f), rtol, f)


# Shapes: n, m, d off the 4-row and 8/16-lane tiles, n = 1, d = 1, n > d.
SHAPES = [(3, 5, 7, 13, 3), (2, 1, 3, 9, 2), (3, 6, 4, 1, 2), (3, 9, 2, 37, 4), (2, 13, 5, 8, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}n{}m{}d{}K{}".format(*s))
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("per_step", [False, True], ids=["scalar_lr", "per_step_lr"])
def test_gram_feature_gradients_match_the_reference(shape, first_order, per_step):
    T, n, m, d, K = shape
    theta, tasks = dense(T, n, m, d, seed=n + d)
    lr = np.random.default_rng(1).uniform(0.2, 0.6, (K, 1)) if per_step else 0.4
    kw = dict(inner_lr=lr, inner_steps=K, l2=0.05, first_order=first_order, grad_features=True)
    gram = fastmaml.meta_value_and_grad(theta, tasks, sweep="gram", **kw)
    ref = reference.meta_value_and_grad_ext(theta, tasks, lr, K, l2=0.05, first_order=first_order,
                                            grad_features=True)
    assert gram.loss == pytest.approx(ref.loss, rel=RTOL_F64, abs=0)
    for f in FIELDS:
        assert_rel(getattr(gram, f), getattr(ref, f), RTOL_F64, f)
    # ... and the plain sweep's numbers (the two paths agree to rounding).
    plain = fastmaml.meta_value_and_grad(theta, tasks, sweep="plain", **kw)
    assert_same_numbers(gram, plain, RTOL_F64)
    assert np.ptp(gram.grad_support_X) > 0 and np.ptp(gram.grad_query_X) > 0


def test_gram_feature_gradients_match_finite_differences():
    """Central differences of the meta-loss in a few support and query feature values (float64)."""
    T, n, m, d, K = 2, 6, 5, 9, 3
    theta, (Xs, ys, Xq, yq) = dense(T, n, m, d, seed=4)
    kw = dict(inner_lr=0.4, inner_steps=K, l2=0.1)
    got = fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), sweep="gram", grad_features=True, **kw)

    def fd(X, entry, make):
        vals = []
        for s in (-2, -1, 1, 2):
            Y = X.copy()
            Y[entry] += s * FD_STEP
            vals.append(fastmaml.meta_value_and_grad(theta, make(Y), sweep="gram", **kw).loss)
        return (vals[0] - 8.0 * vals[1] + 8.0 * vals[2] - vals[3]) / (12.0 * FD_STEP)

    for entry in [(0, 0, 0), (1, n - 1, d - 1), (1, 2, 4)]:
        want = fd(Xs, entry, lambda Y: (Y, ys, Xq, yq))
        assert got.grad_support_X[entry] == pytest.approx(want, rel=FD_RTOL, abs=FD_RTOL)
    for entry in [(0, 0, 3), (1, m - 1, d - 1)]:
        want = fd(Xq, entry, lambda Y: (Xs, ys, Y, yq))
        assert got.grad_query_X[entry] == pytest.approx(want, rel=FD_RTOL, abs=FD_RTOL)


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_float32_gram_features_within_tolerance_of_float64(first_order):
    """The benchmark's shape (n = 10, m = 30, d = 256, K = 5), where the cost model picks the Gram path."""
    T, n, m, d, K = 4, 10, 30, 256, 5
    rng = np.random.default_rng(11)
    theta = rng.normal(size=d + 1) * 0.1
    tasks = (rng.uniform(size=(T, n, d)), rng.integers(0, 2, (T, n)), rng.uniform(size=(T, m, d)),
             rng.integers(0, 2, (T, m)))
    kw = dict(inner_lr=0.05, inner_steps=K, first_order=first_order, grad_features=True, sweep="gram")
    r64 = fastmaml.meta_value_and_grad(theta, tasks, **kw)
    t32 = tuple(a.astype(np.float32) if i % 2 == 0 else a for i, a in enumerate(tasks))
    r32 = fastmaml.meta_value_and_grad(theta.astype(np.float32), t32, **kw)
    assert r32.grad_support_X.dtype == np.float32 and r32.grad_query_X.dtype == np.float32
    assert_same_numbers(r32, r64, RTOL_F32)


def test_auto_takes_the_gram_path_at_the_head_benchmark_shape():
    """The feature-aware cost model picks gram for the torch head's shape and plain where n outgrows K."""
    kw = dict(lr_layout=(1, 1, 1), mode=_core.Mode.maml)
    assert _core.choose_sweep(32 * 10, 32, 256, 1, 5, features=True, **kw) == _core.Sweep.gram
    # n = 60, K = 2: the (n x (n + 2)) product costs far more than the plain (n x 2K) one.
    assert _core.choose_sweep(8 * 60, 8, 64, 1, 2, features=True, **kw) == _core.Sweep.plain
    # Softmax feature gradients never take it (the Gram path forms binary ones only).
    assert _core.choose_sweep(32 * 10, 32, 256, 3, 5, features=True, **kw) == _core.Sweep.plain
    assert _core.choose_sweep(32 * 10, 32, 256, 3, 5, features=False, **kw) == _core.Sweep.gram
    # ... and the call then runs it: auto gives the Gram path's bits.
    T, n, m, d, K = 3, 10, 30, 256, 5
    theta, tasks = dense(T, n, m, d, seed=2, dtype=np.float32)
    kw = dict(inner_lr=0.05, inner_steps=K, grad_features=True)
    auto = fastmaml.meta_value_and_grad(theta, tasks, **kw)
    gram = fastmaml.meta_value_and_grad(theta, tasks, sweep="gram", **kw)
    plain = fastmaml.meta_value_and_grad(theta, tasks, sweep="plain", **kw)
    for f in ("grad", "grad_support_X", "grad_query_X"):
        assert np.array_equal(getattr(auto, f), getattr(gram, f)), f
    assert not np.array_equal(gram.grad_support_X, plain.grad_support_X)  # really another path


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gram_features_bitwise_across_threads_and_independent_of_the_other_tasks(dtype):
    T, n, m, d, K = 130, 10, 12, 29, 3  # more than one 64-task reduction block
    theta, tasks = dense(T, n, m, d, seed=9, dtype=dtype)
    kw = dict(inner_lr=0.3, inner_steps=K, l2=0.1, grad_features=True, sweep="gram")
    one = fastmaml.meta_value_and_grad(theta, tasks, n_threads=1, **kw)
    two = fastmaml.meta_value_and_grad(theta, tasks, n_threads=2, **kw)
    assert one.loss == two.loss
    for f in FIELDS:
        assert np.array_equal(getattr(one, f), getattr(two, f)), f
    perm = np.r_[0, np.arange(T - 1, 0, -1)]
    other = fastmaml.meta_value_and_grad(theta, tuple(a[perm] for a in tasks), n_threads=2, **kw)
    for f in ("grad_support_X", "grad_query_X"):
        assert np.array_equal(getattr(other, f)[0], getattr(one, f)[0]), f
        assert np.array_equal(getattr(other, f)[1:], getattr(one, f)[1:][::-1]), f


def test_index_form_and_ragged_tasks_on_the_gram_path():
    d, K = 21, 3
    tasks, theta, (X, sidx, sy, qidx, qy, sptr, qptr) = ragged_index(seed=2)
    kw = dict(inner_lr=np.array([[0.3], [0.5], [0.2]]), inner_steps=K, l2=0.1, grad_features=True)
    gram = fastmaml.meta_value_and_grad(theta, tasks, sweep="gram", **kw)
    assert gram.grad_support_X.shape == (sptr[-1], d) and gram.grad_query_X.shape == (qptr[-1], d)
    dense_tasks = reference.gather_index_tasks(X, sidx, sy, qidx, qy, sptr, qptr)
    ref = reference.meta_value_and_grad_ext(theta, dense_tasks, kw["inner_lr"], K, l2=0.1, grad_features=True)
    assert_rel(gram.grad, ref.grad, RTOL_F64)
    assert_rel(gram.grad_support_X, np.concatenate(ref.grad_support_X), RTOL_F64)
    assert_rel(gram.grad_query_X, np.concatenate(ref.grad_query_X), RTOL_F64)


def test_gram_sweep_with_features_is_refused_where_it_does_not_apply():
    """sweep='gram' with grad_features needs a binary theta and shared step sizes and l2.

    A per-parameter inner_lr breaks the Gram path's own rule (one step size
    per step), which is named as it is without feature gradients.
    """
    T, n, m, d, K = 3, 4, 5, 6, 2
    theta, tasks = dense(T, n, m, d, seed=3)
    rng = np.random.default_rng(0)
    for kw in (dict(inner_lr=np.full(T, 0.3), task_axis=True), dict(inner_lr=0.3, l2=np.full(T, 0.1))):
        with pytest.raises(ValueError, match="sweep: 'gram' does not apply"):
            fastmaml.meta_value_and_grad(theta, tasks, inner_steps=K, grad_features=True, sweep="gram", **kw)
    with pytest.raises(ValueError, match="sweep: 'gram' needs one step size per step"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_steps=K, grad_features=True, sweep="gram",
                                     inner_lr=rng.uniform(0.1, 0.3, (K, d + 1)))
    Xs, ys, Xq, yq = tasks
    softmax = (Xs, rng.integers(0, 3, (T, n)), Xq, rng.integers(0, 3, (T, m)))
    with pytest.raises(ValueError, match="sweep: 'gram' does not apply"):
        fastmaml.meta_value_and_grad(np.zeros((d + 1, 3)), softmax, inner_lr=0.3, inner_steps=K,
                                     grad_features=True, sweep="gram")


def test_divergence_and_non_finite_input_are_named_on_the_gram_path():
    T, n, m, d, K = 4, 5, 6, 13, 3
    theta, (Xs, ys, Xq, yq) = dense(T, n, m, d, seed=1)
    with pytest.raises(fastmaml.DivergenceError):
        fastmaml.meta_value_and_grad(theta, (Xs * 1e3, ys, Xq, yq), inner_lr=1e300, inner_steps=K,
                                     grad_features=True, sweep="gram")
    for side, arr in (("support_X", Xs), ("query_X", Xq)):
        bad = arr.copy()
        bad[3, 0, d - 1] = np.inf
        args = (Xs, ys, bad, yq) if side == "query_X" else (bad, ys, Xq, yq)
        with pytest.raises(ValueError, match=f"{side}: contains NaN or infinity"):
            fastmaml.meta_value_and_grad(theta, args, inner_lr=0.5, inner_steps=K, grad_features=True,
                                         sweep="gram")
