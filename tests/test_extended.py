"""Per-task hyperparameters and feature gradients in the core (issues 14 and 15, item 1).

``fastmaml.meta_value_and_grad`` with ``task_axis=True``, a per-task ``l2``
and/or ``grad_features=True`` against the NumPy reference
``reference.meta_value_and_grad_ext`` (itself checked against finite
differences in test_reference_extensions.py): float64 to RTOL_F64, float32 to
RTOL_F32 against the float64 reference, bitwise across thread counts, the
index-form accumulation helper against ``reference.accumulate_index_grads``,
finite differences through the public API, and the errors a user can cause.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmaml
import reference
from tolerances import FD_RTOL, FD_STEP, RTOL_F32, RTOL_F64, assert_rel

T, N_SUP, N_QRY, D_FEAT, C = 4, 5, 6, 3, 3


def make_theta(kind, rng):
    return rng.normal(size=D_FEAT + 1) * 0.5 if kind == "binary" else rng.normal(size=(D_FEAT + 1, C)) * 0.5


def labels(kind, rng, shape):
    return rng.integers(0, 2 if kind == "binary" else C, size=shape)


def dense_problem(kind, seed=0, n_tasks=T):
    """Stacked arrays: the 4-tuple the public API and the reference both take."""
    rng = np.random.default_rng(seed)
    Xs = rng.uniform(0.0, 1.0, size=(n_tasks, N_SUP, D_FEAT))
    Xq = rng.uniform(0.0, 1.0, size=(n_tasks, N_QRY, D_FEAT))
    return make_theta(kind, rng), (Xs, labels(kind, rng, Xs.shape[:2]), Xq, labels(kind, rng, Xq.shape[:2]))


def index_problem(kind, ragged, seed=0, n_tasks=T, n_rows=12):
    """Index-form Tasks into one dataset (rows repeat within and across tasks), and its gathered dense twin."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, size=(n_rows, D_FEAT))
    theta = make_theta(kind, rng)
    if ragged:
        ns, ms = rng.integers(1, 7, size=n_tasks), rng.integers(1, 7, size=n_tasks)
        ns[0], ns[1] = 1, 6  # make sure the sizes differ
        sptr = np.concatenate([[0], np.cumsum(ns)])
        qptr = np.concatenate([[0], np.cumsum(ms)])
        sidx, qidx = rng.integers(0, n_rows, size=sptr[-1]), rng.integers(0, n_rows, size=qptr[-1])
        sy, qy = labels(kind, rng, sidx.shape), labels(kind, rng, qidx.shape)
        tasks = fastmaml.Tasks.from_index(X, sidx, sy, qidx, qy, support_ptr=sptr, query_ptr=qptr)
        dense = reference.gather_index_tasks(X, sidx, sy, qidx, qy, sptr, qptr)
    else:
        sidx = rng.integers(0, n_rows, size=(n_tasks, N_SUP))
        qidx = rng.integers(0, n_rows, size=(n_tasks, N_QRY))
        sy, qy = labels(kind, rng, sidx.shape), labels(kind, rng, qidx.shape)
        tasks = fastmaml.Tasks.from_index(X, sidx, sy, qidx, qy)
        dense = reference.gather_index_tasks(X, sidx, sy, qidx, qy)
    return theta, tasks, dense, (X, sidx, qidx)


def lr_shape(layout, K, theta, n_tasks=T):
    return {
        "task_scalar": (n_tasks,),
        "task_step": (n_tasks, K) + (1,) * theta.ndim,
        "task_param": (n_tasks,) + theta.shape,
        "task_step_param": (n_tasks, K) + theta.shape,
        "shared_one": (1,),
        "task_class": (n_tasks, 1, C),
    }[layout]


def step_sizes(layout, K, theta, seed=1, n_tasks=T):
    return np.random.default_rng(seed).uniform(0.3, 1.2, size=lr_shape(layout, K, theta, n_tasks))


def per_task_l2(seed=2, n_tasks=T):
    return np.random.default_rng(seed).uniform(0.05, 0.3, size=n_tasks)


def flat(rows):
    """The reference's feature gradients as one array (stacked, or ragged lists concatenated)."""
    return rows if isinstance(rows, np.ndarray) else np.concatenate(rows)


def assert_matches(res, ref, rtol, features):
    assert res.loss == pytest.approx(ref.loss, rel=rtol, abs=0)
    assert_rel(res.grad, ref.grad, rtol, "grad")
    assert_rel(res.grad_inner_lr, ref.grad_inner_lr, rtol, "grad_inner_lr")
    assert_rel(res.grad_l2, ref.grad_l2, rtol, "grad_l2")
    if features:
        assert_rel(res.grad_support_X, flat(ref.grad_support_X), rtol, "grad_support_X")
        assert_rel(res.grad_query_X, flat(ref.grad_query_X), rtol, "grad_query_X")
    else:
        assert res.grad_support_X is None and res.grad_query_X is None


def both(theta, tasks, ref_tasks, lr, K, l2, first_order, task_axis, features, dtype=np.float64, **kw):
    """(core result, reference result) of the same call; tasks given to the core in `dtype`."""
    if isinstance(tasks, tuple):
        tasks = tuple(a.astype(dtype) if i % 2 == 0 else a for i, a in enumerate(tasks))
    res = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=l2, first_order=first_order,
                                       task_axis=task_axis, grad_features=features, **kw)
    ref = reference.meta_value_and_grad_ext(theta, ref_tasks, lr, K, l2=l2, first_order=first_order,
                                            task_axis=task_axis, grad_features=features)
    return res, ref


# ---------------------------------------------------------------------------
# Per-task hyperparameters against the reference
# ---------------------------------------------------------------------------

LAYOUTS = ["task_scalar", "task_step", "task_param", "shared_one", "task_step_param"]


@pytest.mark.parametrize("kind,layout", [("binary", lay) for lay in LAYOUTS]
                         + [("softmax", lay) for lay in LAYOUTS + ["task_class"]])
@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_per_task_step_sizes_and_l2_match_reference(kind, layout, K, first_order):
    theta, tasks = dense_problem(kind, seed=K)
    lr, l2 = step_sizes(layout, K, theta), per_task_l2()
    res, ref = both(theta, tasks, tasks, lr, K, l2, first_order, True, False)
    assert res.grad_inner_lr.shape == lr.shape and res.grad_l2.shape == (T,)
    assert_matches(res, ref, RTOL_F64, features=False)
    if K > 0:
        # a plausible wrong answer (the mean gradient spread over tasks) would fail
        assert np.ptp(res.grad_l2) > 0


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_per_task_l2_alone_with_a_shared_inner_lr(kind, first_order):
    """A (T,) l2 without task_axis: inner_lr keeps today's meaning, only the L2 is per task."""
    theta, tasks = dense_problem(kind, seed=5)
    K = 3
    lr = np.full((K,) + (1,) * theta.ndim, 0.6)
    res, ref = both(theta, tasks, tasks, lr, K, per_task_l2(), first_order, False, False)
    assert res.grad_inner_lr.shape == lr.shape
    assert_matches(res, ref, RTOL_F64, features=False)


def test_task_axis_with_scalar_l2_returns_a_float():
    theta, tasks = dense_problem("binary")
    res = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.full(T, 0.5), inner_steps=2, l2=0.1,
                                       task_axis=True)
    ref = reference.meta_value_and_grad_ext(theta, tasks, np.full(T, 0.5), 2, l2=0.1, task_axis=True)
    assert isinstance(res.grad_l2, float)
    assert_rel(res.grad_l2, ref.grad_l2, RTOL_F64)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_shared_leading_axis_is_the_plain_call_bit_for_bit(kind):
    """task_axis with a leading axis of 1 runs the same arithmetic as today's call on the plain sweep."""
    theta, tasks = dense_problem(kind, seed=3)
    K = 3
    lr = step_sizes("task_step_param", K, theta, n_tasks=1)
    new = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=0.2, task_axis=True)
    old = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr[0], inner_steps=K, l2=0.2, sweep="plain")
    assert new.loss == old.loss and new.grad_l2 == old.grad_l2
    assert np.array_equal(new.grad, old.grad)
    assert np.array_equal(new.grad_inner_lr[0], old.grad_inner_lr)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_each_entry_belongs_to_its_own_task(kind):
    """Entry t of the per-task gradients is task t's: alone in a batch of one it is T times larger."""
    theta, tasks = dense_problem(kind, seed=4)
    K = 2
    lr, l2 = step_sizes("task_step", K, theta), per_task_l2()
    full = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=l2, task_axis=True)
    for t in range(T):
        one_task = tuple(a[t:t + 1] for a in tasks)
        one = fastmaml.meta_value_and_grad(theta, one_task, inner_lr=lr[t:t + 1], inner_steps=K, l2=l2[t:t + 1],
                                           task_axis=True)
        assert_rel(full.grad_inner_lr[t] * T, one.grad_inner_lr[0], RTOL_F64)
        assert_rel(full.grad_l2[t] * T, one.grad_l2[0], RTOL_F64)


# ---------------------------------------------------------------------------
# Feature gradients against the reference: dense, index-form, ragged
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("per_task", [False, True], ids=["shared", "per_task"])
def test_dense_feature_gradients_match_reference(kind, K, first_order, per_task):
    theta, tasks = dense_problem(kind, seed=10 + K)
    if per_task:
        lr, l2, task_axis = step_sizes("task_param", K, theta), per_task_l2(), True
    else:
        lr, l2, task_axis = np.full((K, 1) if kind == "binary" else (K, 1, 1), 0.7), 0.15, False
    res, ref = both(theta, tasks, tasks, lr, K, l2, first_order, task_axis, True)
    assert res.grad_support_X.shape == tasks[0].shape and res.grad_query_X.shape == tasks[2].shape
    assert_matches(res, ref, RTOL_F64, features=True)
    if K == 0:
        assert np.all(res.grad_support_X == 0.0)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("ragged", [False, True], ids=["index", "ragged"])
def test_index_feature_gradients_are_per_occurrence(kind, K, first_order, ragged):
    theta, tasks, dense, (X, sidx, qidx) = index_problem(kind, ragged, seed=20 + K)
    lr, l2 = step_sizes("task_step", K, theta), per_task_l2()
    res, ref = both(theta, tasks, dense, lr, K, l2, first_order, True, True)
    d = D_FEAT
    want_s = (sidx.size, d) if ragged else sidx.shape + (d,)
    want_q = (qidx.size, d) if ragged else qidx.shape + (d,)
    assert res.grad_support_X.shape == want_s and res.grad_query_X.shape == want_q
    assert_matches(res, ref, RTOL_F64, features=True)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("ragged", [False, True], ids=["index", "ragged"])
def test_accumulated_feature_gradients_match_reference(kind, ragged):
    theta, tasks, dense, (X, sidx, qidx) = index_problem(kind, ragged, seed=7)
    res = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.6, inner_steps=3, l2=0.1, grad_features=True)
    got = fastmaml.accumulate_feature_grads(tasks, res.grad_support_X, res.grad_query_X)
    want = reference.accumulate_index_grads(X.shape[0], sidx, res.grad_support_X)
    want = reference.accumulate_index_grads(X.shape[0], qidx, res.grad_query_X, out=want)
    assert got.shape == X.shape and got.dtype == np.float64
    assert np.array_equal(got, want)  # same fixed order: bit for bit
    # and it is the gradient with respect to the shared X itself
    ref = reference.meta_value_and_grad_ext(theta, dense, 0.6, 3, l2=0.1, grad_features=True)
    ref_X = reference.accumulate_index_grads(X.shape[0], sidx, flat(ref.grad_support_X).reshape(sidx.shape + (-1,)))
    ref_X = reference.accumulate_index_grads(X.shape[0], qidx, flat(ref.grad_query_X).reshape(qidx.shape + (-1,)),
                                             out=ref_X)
    assert_rel(got, ref_X, RTOL_F64)


def test_accumulate_rejects_dense_tasks_and_wrong_shapes():
    theta, tasks, _, _ = index_problem("binary", False)
    res = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.5, inner_steps=1, grad_features=True)
    with pytest.raises(ValueError, match="index-form"):
        fastmaml.accumulate_feature_grads(fastmaml.Tasks(*dense_problem("binary")[1]), res.grad_support_X,
                                          res.grad_query_X)
    with pytest.raises(ValueError, match="grad_query_X"):
        fastmaml.accumulate_feature_grads(tasks, res.grad_support_X, res.grad_query_X[:, :-1])
    with pytest.raises(TypeError, match="tasks"):
        fastmaml.accumulate_feature_grads(None, res.grad_support_X, res.grad_query_X)


# ---------------------------------------------------------------------------
# float32, threads, finite differences
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("form", ["dense", "ragged"])
def test_float32_within_tolerance_of_float64_reference(kind, first_order, form):
    K = 3
    if form == "dense":
        theta, tasks = dense_problem(kind, seed=30)
        ref_tasks = tasks
    else:
        theta, t64, ref_tasks, (X, _, _) = index_problem(kind, True, seed=31)
        tasks = fastmaml.Tasks.from_index(X.astype(np.float32), t64.support.idx, t64.support.y, t64.query.idx,
                                          t64.query.y, support_ptr=t64.support.ptr, query_ptr=t64.query.ptr)
    lr, l2 = step_sizes("task_step_param", K, theta), per_task_l2()
    res, ref = both(theta, tasks, ref_tasks, lr, K, l2, first_order, True, True, dtype=np.float32)
    for name in ("grad", "grad_inner_lr", "grad_l2", "grad_support_X", "grad_query_X"):
        assert getattr(res, name).dtype == np.float32, name
    assert_matches(res, ref, RTOL_F32, features=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_results_do_not_depend_on_threads(dtype, kind):
    """Enough ragged tasks (several 64-task blocks) that two threads really split them: bit for bit."""
    theta, tasks, _, _ = index_problem(kind, True, seed=40, n_tasks=1000, n_rows=50)
    tasks = fastmaml.Tasks.from_index(tasks.support.X.astype(dtype), tasks.support.idx, tasks.support.y,
                                      tasks.query.idx, tasks.query.y, support_ptr=tasks.support.ptr,
                                      query_ptr=tasks.query.ptr)
    lr, l2 = step_sizes("task_param", 3, theta, n_tasks=1000), per_task_l2(n_tasks=1000)
    runs = [fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=3, l2=l2, task_axis=True,
                                         grad_features=True, n_threads=k) for k in (1, 2)]
    a, b = runs
    assert a.loss == b.loss
    for name in ("grad", "grad_inner_lr", "grad_l2", "grad_support_X", "grad_query_X"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def _fd(f, x, entries, h=FD_STEP):
    """Fourth-order central differences of f w.r.t. the given entries of x (perturbed in a copy)."""
    out = []
    for idx in entries:
        vals = []
        for s in (-2, -1, 1, 2):
            y = x.copy()
            y[idx] += s * h
            vals.append(f(y))
        out.append((vals[0] - 8.0 * vals[1] + 8.0 * vals[2] - vals[3]) / (12.0 * h))
    return np.array(out)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_public_gradients_match_finite_differences(kind):
    """Every new output against finite differences of the public API's own loss (float64, MAML)."""
    theta, (Xs, ys, Xq, yq) = dense_problem(kind, seed=50, n_tasks=3)
    K = 2
    lr, l2 = step_sizes("task_step", K, theta, n_tasks=3), per_task_l2(n_tasks=3)

    def loss(lr=lr, l2=l2, Xs=Xs, Xq=Xq):
        return fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=lr, inner_steps=K, l2=l2,
                                            task_axis=True).loss

    res = fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=lr, inner_steps=K, l2=l2, task_axis=True,
                                       grad_features=True)
    lr_entries = list(np.ndindex(lr.shape))
    assert_rel([res.grad_inner_lr[e] for e in lr_entries], _fd(lambda v: loss(lr=v), lr, lr_entries), FD_RTOL)
    assert_rel(res.grad_l2, _fd(lambda v: loss(l2=v), l2, [(t,) for t in range(3)]), FD_RTOL)
    rows = [(t, i, k) for t in range(3) for i in (0, N_SUP - 1) for k in range(D_FEAT)]
    assert_rel([res.grad_support_X[e] for e in rows], _fd(lambda v: loss(Xs=v), Xs, rows), FD_RTOL)
    rows = [(t, i, k) for t in range(3) for i in (0, N_QRY - 1) for k in range(D_FEAT)]
    assert_rel([res.grad_query_X[e] for e in rows], _fd(lambda v: loss(Xq=v), Xq, rows), FD_RTOL)


# ---------------------------------------------------------------------------
# Errors a user can cause
# ---------------------------------------------------------------------------

def test_wrong_leading_axis_is_named():
    theta, tasks = dense_problem("binary")
    with pytest.raises(ValueError, match=r"inner_lr: with task_axis=True expected a leading axis of length 4"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.full(T + 1, 0.5), inner_steps=2, task_axis=True)
    with pytest.raises(ValueError, match=r"got a scalar"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.5, inner_steps=2, task_axis=True)
    with pytest.raises(ValueError, match=r"inner_lr\[t\] has shape \(3,\)"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.full((T, 3), 0.5), inner_steps=2, task_axis=True)
    with pytest.raises(ValueError, match="inner_lr: contains NaN"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.array([0.5, np.nan, 0.5, 0.5]), inner_steps=2,
                                     task_axis=True)


def test_without_task_axis_no_shape_is_read_per_task():
    """A (T,) inner_lr without task_axis keeps today's meaning (per parameter), hence its error here."""
    theta, tasks = dense_problem("binary")
    with pytest.raises(ValueError, match="does not broadcast"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.full(T + 1, 0.5), inner_steps=2)


@pytest.mark.parametrize("l2,match", [(np.full(T + 1, 0.1), r"l2: expected a scalar or shape \(4,\)"),
                                      (np.full((T, 1), 0.1), r"l2: expected a scalar or shape \(4,\)"),
                                      (np.array([0.1, -0.1, 0.1, 0.1]), "l2: expected numbers >= 0"),
                                      (np.array([0.1, np.nan, 0.1, 0.1]), "l2: contains NaN")])
def test_bad_per_task_l2_is_named(l2, match):
    theta, tasks = dense_problem("binary")
    with pytest.raises(ValueError, match=match):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.5, inner_steps=2, l2=l2)


# A per-parameter inner_lr breaks the Gram path's own rule, named as without features.
@pytest.mark.parametrize("options, match", [
    (dict(task_axis=True, inner_lr=np.full(T, 0.5)), "sweep: 'gram' does not apply"),
    (dict(l2=np.full(T, 0.1)), "sweep: 'gram' does not apply"),
    (dict(grad_features=True, inner_lr=np.full((2, D_FEAT + 1), 0.5)), "sweep: 'gram' needs one step size per step")],
    ids=["task_axis", "per_task_l2", "grad_features_per_parameter_lr"])
def test_gram_sweep_with_the_new_options_is_an_error(options, match):
    theta, tasks = dense_problem("binary")
    kw = dict(inner_lr=0.5, inner_steps=2)
    kw.update(options)
    with pytest.raises(ValueError, match=match):
        fastmaml.meta_value_and_grad(theta, tasks, sweep="gram", **kw)
    fastmaml.meta_value_and_grad(theta, tasks, sweep="auto", **kw)  # auto takes the plain sweep


def test_flags_must_be_booleans():
    theta, tasks = dense_problem("binary")
    with pytest.raises(TypeError, match="task_axis"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.full(T, 0.5), inner_steps=2, task_axis=1)
    with pytest.raises(TypeError, match="grad_features"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.5, inner_steps=2, grad_features="yes")


def test_divergence_names_the_task_with_the_huge_step():
    theta, tasks = dense_problem("binary")
    lr = np.full(T, 0.5)
    lr[2] = 1e300
    with pytest.raises(fastmaml.DivergenceError, match="task 2"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=5, task_axis=True, grad_features=True)


@pytest.mark.parametrize("side", ["support_X", "query_X"])
@pytest.mark.parametrize("options", [dict(grad_features=True), dict(l2=np.full(T, 0.1)),
                                     dict(task_axis=True, inner_lr=np.full(T, 0.5))],
                         ids=["grad_features", "per_task_l2", "task_axis"])
def test_non_finite_features_are_named_not_reported_as_divergence(side, options):
    """As on the default path (meta.hpp): a NaN feature is a ValueError naming the array, not a DivergenceError."""
    theta, (Xs, ys, Xq, yq) = dense_problem("binary")
    (Xs if side == "support_X" else Xq)[1, 2, 0] = np.nan
    kw = dict(inner_lr=0.5, inner_steps=2)
    kw.update(options)
    with pytest.raises(ValueError, match=f"{side}: contains NaN or infinity"):
        fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), **kw)
