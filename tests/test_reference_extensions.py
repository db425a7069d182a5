"""The NumPy reference's extensions (issues 14 and 15) against finite differences.

``reference.meta_value_and_grad_ext`` adds per-task hyperparameters
(``l2`` of shape (T,), ``task_axis=True`` for ``inner_lr``) and feature
gradients (``grad_features=True``) to the reference; the C++ core will be
tested against it, so here it is checked against oracles that share none of its
reverse-sweep code:

* MAML: fourth-order central finite differences (float64) of the meta-loss,
  written directly from ``reference.adapt`` and ``reference.loss`` with each
  task's own hyperparameters, w.r.t. theta, every per-task l2, every inner_lr
  entry in each layout, and every support and query feature value.
* First-order MAML: finite differences of docs/design.md's surrogate
  phi_{j+1} = phi_j - alpha_j (*) grad l_s(stopgrad(phi_j); X_s, lam): the
  inner gradients are evaluated at the FROZEN phi_j of the unperturbed forward
  pass while theta, alpha, lam, X_s and X_q stay live. Its value equals the
  true meta-loss at the base point; its derivative is the surrogate's.
* Consistency with the existing shared-hyperparameter reference (identical
  per-task values sum to the shared gradient), the index-form accumulation
  helper, and the task descriptor on hand-computable inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference
from tolerances import FD_RTOL, FD_STEP, assert_rel, rel_error

T = 3
D_FEAT = 3
C = 3
TIGHT = 1e-12          # same maths, different summation order
FD_ZERO = 1e-10        # finite differences of a zero gradient: rounding noise only


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------

def make_problem(kind, K, *, ragged, seed=0, layout="task_param"):
    """A small meta-batch with per-task hyperparameters.

    Returns a dict: theta, Xs/ys/Xq/yq (lists of per-task arrays), lr (the
    task_axis inner_lr in the given layout), lam ((T,) L2 strengths > 0), K, kind.
    Features are uniform in [0, 1] (the datasets' scale)."""
    rng = np.random.default_rng(seed)
    d = D_FEAT
    if ragged:
        ns, ms = [2, 5, 4], [3, 6, 2]
    else:
        ns, ms = [4] * T, [5] * T
    Xs = [rng.uniform(0.0, 1.0, size=(n, d)) for n in ns]
    Xq = [rng.uniform(0.0, 1.0, size=(m, d)) for m in ms]
    if kind == "binary":
        theta = rng.normal(size=d + 1) * 0.5
        ys = [rng.integers(0, 2, size=n) for n in ns]
        yq = [rng.integers(0, 2, size=m) for m in ms]
    else:
        theta = rng.normal(size=(d + 1, C)) * 0.5
        ys = [rng.integers(0, C, size=n) for n in ns]
        yq = [rng.integers(0, C, size=m) for m in ms]
    lr_shapes = {
        "task_scalar": (T,),
        "task_step": (T, K) + (1,) * theta.ndim,
        "task_param": (T,) + theta.shape,
        "task_step_param": (T, K) + theta.shape,
        "shared_one": (1,),
        "shared_step": (1, K) + (1,) * theta.ndim,
    }
    if kind == "softmax":
        lr_shapes["task_class"] = (T, 1, C)          # per task and class
    lr = rng.uniform(0.3, 1.2, size=lr_shapes[layout])
    lam = rng.uniform(0.05, 0.3, size=T)
    return dict(theta=theta, Xs=Xs, ys=ys, Xq=Xq, yq=yq, lr=lr, lam=lam, K=K, kind=kind)


def tasks_of(P, stacked=False):
    if stacked:
        return (np.stack(P["Xs"]), np.stack(P["ys"]), np.stack(P["Xq"]), np.stack(P["yq"]))
    return list(zip(P["Xs"], P["ys"], P["Xq"], P["yq"]))


def lr_of_task(lr, t):
    """Task t's inner_lr under task_axis=True: lr[t], or lr[0] when the leading axis is 1."""
    return lr[0] if lr.shape[0] == 1 else lr[t]


# ---------------------------------------------------------------------------
# Oracles (no reverse sweep anywhere) and finite differences
# ---------------------------------------------------------------------------

def oracle_loss(P):
    """True meta-loss: mean over tasks of l_q(phi_K^(t)), each task with its own (alpha_t, lam_t)."""
    total = 0.0
    for t in range(len(P["Xs"])):
        phis = reference.adapt(P["theta"], P["Xs"][t], P["ys"][t], lr_of_task(P["lr"], t), P["K"], P["lam"][t])
        total += reference.loss(phis[-1], P["Xq"][t], P["yq"][t])
    return total / len(P["Xs"])


def frozen_trajectories(P):
    """phi_0..phi_K of every task at the unperturbed inputs (copies)."""
    return [
        [phi.copy() for phi in reference.adapt(P["theta"], P["Xs"][t], P["ys"][t], lr_of_task(P["lr"], t), P["K"], P["lam"][t])]
        for t in range(len(P["Xs"]))
    ]


def surrogate_loss(P, frozen):
    """First-order surrogate: phi_{j+1} = phi_j - alpha_j * grad l_s(FROZEN phi_j; X_s, lam)."""
    total = 0.0
    K = P["K"]
    for t in range(len(P["Xs"])):
        alpha = reference.broadcast_inner_lr(lr_of_task(P["lr"], t), K, P["theta"].shape)
        phi = np.array(P["theta"], dtype=np.float64)
        for j in range(K):
            phi = phi - alpha[j] * reference.grad(frozen[t][j], P["Xs"][t], P["ys"][t], P["lam"][t])
        total += reference.loss(phi, P["Xq"][t], P["yq"][t])
    return total / len(P["Xs"])


def _perturbed(P, key, t, index, delta):
    Q = dict(P)
    if t is None:
        arr = np.array(P[key], dtype=np.float64, copy=True)
        arr[index] += delta
        Q[key] = arr
    else:
        lst = list(P[key])
        arr = np.array(lst[t], dtype=np.float64, copy=True)
        arr[index] += delta
        lst[t] = arr
        Q[key] = lst
    return Q


def fd(f, P, key, t=None, h=FD_STEP):
    """Fourth-order central differences of f(P) w.r.t. every entry of P[key] (or P[key][t])."""
    x = np.asarray(P[key] if t is None else P[key][t], dtype=np.float64)
    out = np.zeros(x.shape)
    for index in np.ndindex(x.shape):
        fm2, fm1, fp1, fp2 = (f(_perturbed(P, key, t, index, s * h)) for s in (-2, -1, 1, 2))
        out[index] = (fm2 - 8.0 * fm1 + 8.0 * fp1 - fp2) / (12.0 * h)
    return out


def assert_fd(actual, desired, err_msg=""):
    """``assert_rel(actual, desired, FD_RTOL)``; when the exact gradient is zero (K = 0
    for alpha, lam and the support features), finite differences only return
    rounding noise (~1e-14): then ``actual`` must be exactly zero instead."""
    desired = np.asarray(desired)
    if desired.size and np.max(np.abs(desired)) < FD_ZERO:
        assert np.shape(actual) == desired.shape, err_msg
        assert np.all(np.asarray(actual) == 0.0), err_msg
        return
    assert_rel(actual, desired, FD_RTOL, err_msg)


def ext(P, *, first_order=False, grad_features=True, stacked=False):
    return reference.meta_value_and_grad_ext(
        P["theta"], tasks_of(P, stacked), P["lr"], P["K"], l2=P["lam"],
        first_order=first_order, task_axis=True, grad_features=grad_features)


def check_all_against(res, f, P, stacked=False, what=""):
    """Every output of ``res`` against finite differences of ``f``."""
    assert_fd(res.grad, fd(f, P, "theta"), f"grad {what}")
    assert_fd(res.grad_l2, fd(f, P, "lam"), f"grad_l2 {what}")
    assert_fd(res.grad_inner_lr, fd(f, P, "lr"), f"grad_inner_lr {what}")
    gs = [fd(f, P, "Xs", t) for t in range(T)]
    gq = [fd(f, P, "Xq", t) for t in range(T)]
    if stacked:
        assert isinstance(res.grad_support_X, np.ndarray) and isinstance(res.grad_query_X, np.ndarray)
        assert_fd(res.grad_support_X, np.stack(gs), f"grad_support_X {what}")
        assert_fd(res.grad_query_X, np.stack(gq), f"grad_query_X {what}")
    else:
        assert isinstance(res.grad_support_X, list) and len(res.grad_support_X) == T
        # the relative error is per array: the ragged per-task arrays, concatenated
        assert_fd(np.concatenate(res.grad_support_X), np.concatenate(gs), f"grad_support_X {what}")
        assert_fd(np.concatenate(res.grad_query_X), np.concatenate(gq), f"grad_query_X {what}")
        for t in range(T):
            assert res.grad_support_X[t].shape == P["Xs"][t].shape
            assert res.grad_query_X[t].shape == P["Xq"][t].shape


# ---------------------------------------------------------------------------
# MAML (second order): every new output against finite differences
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("stacked", [False, True], ids=["ragged", "stacked"])
def test_maml_all_outputs_match_finite_differences(kind, K, stacked):
    P = make_problem(kind, K, ragged=not stacked, seed=10 + K)
    res = ext(P, stacked=stacked)
    assert res.loss == pytest.approx(oracle_loss(P), rel=1e-13)
    check_all_against(res, oracle_loss, P, stacked=stacked, what=f"MAML {kind} K={K}")
    if K == 0:
        # no inner step: nothing depends on alpha, lam or the support features
        assert np.all(res.grad_l2 == 0.0) and np.all(res.grad_inner_lr == 0.0)
        sx = res.grad_support_X if stacked else np.concatenate(res.grad_support_X)
        assert np.all(sx == 0.0)


LAYOUTS = ("task_scalar", "task_step", "task_param", "task_step_param", "shared_one", "shared_step")


@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("kind,layout", [("binary", lay) for lay in LAYOUTS]
                         + [("softmax", lay) for lay in LAYOUTS + ("task_class",)])
def test_maml_inner_lr_layouts_match_finite_differences(kind, K, layout):
    P = make_problem(kind, K, ragged=True, seed=20 + K, layout=layout)
    res = ext(P, grad_features=False)
    assert res.grad_inner_lr.shape == P["lr"].shape
    assert res.grad_l2.shape == (T,)
    assert not hasattr(res, "grad_support_X")
    assert_fd(res.grad_inner_lr, fd(oracle_loss, P, "lr"), f"{layout} {kind} K={K}")


def test_per_task_gradients_are_per_task():
    """Entry t depends on task t alone: dropping task t's query loss changes only entry t (times T)."""
    P = make_problem("binary", 2, ragged=True, seed=3, layout="task_step")
    full = ext(P, grad_features=False)
    for t in range(T):
        one = reference.meta_value_and_grad_ext(
            P["theta"], [tasks_of(P)[t]], P["lr"][t:t + 1], 2, l2=P["lam"][t:t + 1], task_axis=True)
        assert_rel(full.grad_inner_lr[t] * T, one.grad_inner_lr[0], TIGHT)
        assert_rel(full.grad_l2[t] * T, one.grad_l2[0], TIGHT)


# ---------------------------------------------------------------------------
# First-order MAML: the surrogate's exact gradient
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("stacked", [False, True], ids=["ragged", "stacked"])
def test_first_order_matches_surrogate_finite_differences(kind, K, stacked):
    P = make_problem(kind, K, ragged=not stacked, seed=30 + K)
    frozen = frozen_trajectories(P)
    res = ext(P, first_order=True, stacked=stacked)
    # the surrogate's forward value is the true forward value
    assert surrogate_loss(P, frozen) == pytest.approx(oracle_loss(P), rel=1e-13)
    assert res.loss == pytest.approx(oracle_loss(P), rel=1e-13)
    check_all_against(res, lambda Q: surrogate_loss(Q, frozen), P, stacked=stacked,
                      what=f"first-order {kind} K={K}")
    # theta's surrogate gradient is gbar_K: the mean of the query gradients at phi_K
    gK = np.mean([reference.grad(frozen[t][-1], P["Xq"][t], P["yq"][t]) for t in range(T)], axis=0)
    assert_rel(res.grad, gK, TIGHT)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_first_order_differs_from_maml(kind):
    """The two oracles must be told apart (else the tests above prove little)."""
    P = make_problem(kind, 3, ragged=True, seed=5)
    fo, so = ext(P, first_order=True), ext(P)
    for name in ("grad", "grad_l2", "grad_inner_lr"):
        assert rel_error(getattr(fo, name), getattr(so, name)) > 1e-3, name
    assert rel_error(np.concatenate(fo.grad_support_X), np.concatenate(so.grad_support_X)) > 1e-3
    assert rel_error(np.concatenate(fo.grad_query_X), np.concatenate(so.grad_query_X)) == 0.0


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("lr_shape", ["scalar", "per_step", "per_parameter"])
def test_existing_first_order_is_the_surrogate(kind, lr_shape):
    """The existing reference's first_order grad / grad_inner_lr / grad_l2 are the surrogate's gradient."""
    K = 3
    P = make_problem(kind, K, ragged=True, seed=7, layout="shared_one")
    P["lam"] = np.full(T, 0.2)
    shape = {"scalar": (1,), "per_step": (1, K) + (1,) * P["theta"].ndim,
             "per_parameter": (1,) + P["theta"].shape}[lr_shape]
    P["lr"] = np.random.default_rng(8).uniform(0.3, 1.0, size=shape)
    old = reference.meta_value_and_grad(P["theta"], tasks_of(P), P["lr"][0], K, l2=0.2, first_order=True)
    frozen = frozen_trajectories(P)
    f = lambda Q: surrogate_loss(Q, frozen)                          # noqa: E731
    assert_fd(old.grad, fd(f, P, "theta"))
    assert_fd(np.asarray(old.grad_inner_lr).reshape(P["lr"].shape), fd(f, P, "lr"))
    assert_fd(old.grad_l2, fd(f, P, "lam").sum())


# ---------------------------------------------------------------------------
# Consistency with the shared-hyperparameter reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("layout", ["task_scalar", "task_step", "task_param", "task_step_param"])
def test_identical_per_task_values_sum_to_shared_gradients(kind, first_order, layout):
    K = 3
    P = make_problem(kind, K, ragged=True, seed=40, layout=layout)
    shared_lr = P["lr"][0]
    P["lr"] = np.broadcast_to(shared_lr, P["lr"].shape).copy()
    P["lam"] = np.full(T, 0.17)
    per_task = ext(P, first_order=first_order, grad_features=False)
    lr_in = float(shared_lr) if layout == "task_scalar" else shared_lr
    shared = reference.meta_value_and_grad(P["theta"], tasks_of(P), lr_in, K, l2=0.17, first_order=first_order)
    assert per_task.loss == pytest.approx(shared.loss, rel=TIGHT)
    assert_rel(per_task.grad, shared.grad, TIGHT)
    assert_rel(per_task.grad_l2.sum(), shared.grad_l2, TIGHT)
    assert_rel(per_task.grad_inner_lr.sum(axis=0), np.asarray(shared.grad_inner_lr), TIGHT)
    # and a shared leading axis of length 1 gives the sum directly
    P1 = dict(P, lr=shared_lr[None] if layout != "task_scalar" else np.array([float(shared_lr)]))
    one = ext(P1, first_order=first_order, grad_features=False)
    assert one.grad_inner_lr.shape == P1["lr"].shape
    assert_rel(one.grad_inner_lr[0], np.asarray(shared.grad_inner_lr), TIGHT)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_equal_per_task_l2_equals_scalar_l2(kind, first_order):
    P = make_problem(kind, 2, ragged=True, seed=41)
    kw = dict(inner_lr=0.7, inner_steps=2, first_order=first_order, grad_features=True)
    vec = reference.meta_value_and_grad_ext(P["theta"], tasks_of(P), l2=np.full(T, 0.25), **kw)
    sca = reference.meta_value_and_grad_ext(P["theta"], tasks_of(P), l2=0.25, **kw)
    assert isinstance(sca.grad_l2, float) and vec.grad_l2.shape == (T,)
    assert isinstance(sca.grad_inner_lr, float)
    assert vec.loss == sca.loss
    assert_rel(vec.grad, sca.grad, TIGHT)
    assert_rel(vec.grad_l2.sum(), sca.grad_l2, TIGHT)
    assert_rel(vec.grad_inner_lr, sca.grad_inner_lr, TIGHT)
    for a, b in zip(vec.grad_support_X + vec.grad_query_X, sca.grad_support_X + sca.grad_query_X):
        assert_rel(a, b, TIGHT)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("lr", ["python_float", "0d_array", "per_parameter", "per_step", "one"])
def test_defaults_reproduce_existing_reference(kind, first_order, lr):
    K = 2
    P = make_problem(kind, K, ragged=False, seed=42)
    D = P["theta"].shape
    lr_in = {"python_float": 0.6, "0d_array": np.array(0.6), "per_parameter": np.linspace(0.3, 0.9, D[-1]),
             "per_step": np.array([0.5, 0.8]).reshape((K,) + (1,) * len(D)), "one": np.array([0.6])}[lr]
    old = reference.meta_value_and_grad(P["theta"], tasks_of(P, True), lr_in, K, l2=0.1, first_order=first_order)
    new = reference.meta_value_and_grad_ext(P["theta"], tasks_of(P, True), lr_in, K, l2=0.1, first_order=first_order)
    assert new.loss == pytest.approx(old.loss, rel=TIGHT)
    assert_rel(new.grad, old.grad, TIGHT)
    assert type(new.grad_inner_lr) is type(old.grad_inner_lr)
    assert_rel(new.grad_inner_lr, old.grad_inner_lr, TIGHT)
    assert isinstance(new.grad_l2, float)
    assert_rel(new.grad_l2, old.grad_l2, TIGHT)


def test_without_task_axis_a_length_T_inner_lr_is_never_per_task():
    """T == d+1: a (T,) inner_lr is per parameter unless task_axis=True says otherwise."""
    P = make_problem("binary", 2, ragged=True, seed=43)
    lr = np.array([0.3, 0.5, 0.7, 0.9])
    assert lr.shape == (T + 1,) == P["theta"].shape
    P4 = dict(P, Xs=P["Xs"] + [P["Xs"][0]], ys=P["ys"] + [P["ys"][0]], Xq=P["Xq"] + [P["Xq"][1]], yq=P["yq"] + [P["yq"][1]])
    tasks = tasks_of(P4)
    old = reference.meta_value_and_grad(P["theta"], tasks, lr, 2)
    plain = reference.meta_value_and_grad_ext(P["theta"], tasks, lr, 2)
    per_task = reference.meta_value_and_grad_ext(P["theta"], tasks, lr, 2, task_axis=True)
    assert_rel(plain.grad_inner_lr, old.grad_inner_lr, TIGHT)
    assert plain.loss == pytest.approx(old.loss, rel=TIGHT)
    assert abs(per_task.loss - plain.loss) > 1e-4
    assert per_task.loss == pytest.approx(
        np.mean([reference.loss(reference.adapt(P["theta"], Xs, ys, lr[t], 2)[-1], Xq, yq)
                 for t, (Xs, ys, Xq, yq) in enumerate(tasks)]), rel=1e-13)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

def test_errors_name_the_argument_and_the_task():
    P = make_problem("binary", 2, ragged=True, seed=44)
    tasks = tasks_of(P)
    with pytest.raises(ValueError, match="inner_lr.*leading axis of length 3"):
        reference.meta_value_and_grad_ext(P["theta"], tasks, np.ones(2) * 0.1, 2, task_axis=True)
    with pytest.raises(ValueError, match="inner_lr.*scalar"):
        reference.meta_value_and_grad_ext(P["theta"], tasks, 0.1, 2, task_axis=True)
    with pytest.raises(ValueError, match=r"l2.*\(3,\)"):
        reference.meta_value_and_grad_ext(P["theta"], tasks, 0.1, 2, l2=np.ones(2))
    with pytest.raises(ValueError, match="per-step schedule"):
        reference.meta_value_and_grad_ext(P["theta"], tasks, np.ones((T, 2)) * 0.1, 2, task_axis=True)
    # task 1's weights are multiplied by (1 - alpha lam) = 1 - 1e6 each step: overflow
    lr = np.array([0.1, 1e6, 0.1])
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="step [0-9]+ of task 1"):
        reference.meta_value_and_grad_ext(P["theta"], tasks, lr, 80, l2=1.0, task_axis=True)


# ---------------------------------------------------------------------------
# Index form: per-occurrence gradients accumulated into the shared X
# ---------------------------------------------------------------------------

def _index_problem(kind, seed=50):
    rng = np.random.default_rng(seed)
    N, d = 7, D_FEAT
    X = rng.uniform(0.0, 1.0, size=(N, d))
    s_idx = np.array([[0, 1, 1, 2], [3, 0, 4, 5], [6, 2, 0, 3]])      # repeats within and across tasks
    q_idx = np.array([[1, 6, 5], [0, 0, 2], [4, 5, 1]])                # overlaps the support rows
    if kind == "binary":
        theta = rng.normal(size=d + 1) * 0.5
        s_y, q_y = rng.integers(0, 2, size=s_idx.shape), rng.integers(0, 2, size=q_idx.shape)
    else:
        theta = rng.normal(size=(d + 1, C)) * 0.5
        s_y, q_y = rng.integers(0, C, size=s_idx.shape), rng.integers(0, C, size=q_idx.shape)
    return X, s_idx, s_y, q_idx, q_y, theta


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("form", ["2d", "flat_ptr"])
def test_index_accumulation_matches_dense_gradient_of_shared_X(kind, first_order, form):
    X, s_idx, s_y, q_idx, q_y, theta = _index_problem(kind)
    K, lr, lam = 2, np.array([0.5, 0.9, 0.7]), np.array([0.1, 0.2, 0.05])
    if form == "2d":
        args, kw = (s_idx, s_y, q_idx, q_y), {}
    else:   # ragged: drop a row from task 0's support and task 2's query
        keep_s = np.ones(s_idx.shape, bool)
        keep_s[0, 3] = False
        keep_q = np.ones(q_idx.shape, bool)
        keep_q[2, 0] = False
        args = (s_idx[keep_s], s_y[keep_s], q_idx[keep_q], q_y[keep_q])
        kw = dict(support_ptr=np.r_[0, np.cumsum(keep_s.sum(1))], query_ptr=np.r_[0, np.cumsum(keep_q.sum(1))])
    tasks = reference.gather_index_tasks(X, *args, **kw)
    res = reference.meta_value_and_grad_ext(theta, tasks, lr, K, l2=lam, first_order=first_order,
                                            task_axis=True, grad_features=True)
    if form == "2d":
        gs_rows, gq_rows = res.grad_support_X, res.grad_query_X
        assert gs_rows.shape == s_idx.shape + (D_FEAT,) and gq_rows.shape == q_idx.shape + (D_FEAT,)
    else:
        gs_rows, gq_rows = np.concatenate(res.grad_support_X), np.concatenate(res.grad_query_X)
        assert gs_rows.shape == args[0].shape + (D_FEAT,)
    shared = reference.accumulate_index_grads(X.shape[0], args[0], gs_rows)
    shared = reference.accumulate_index_grads(X.shape[0], args[2], gq_rows, out=shared)

    # the fixed order: occurrence by occurrence in index order, support then query (bitwise)
    manual = np.zeros_like(X)
    for i, r in zip(args[0].reshape(-1), gs_rows.reshape(-1, D_FEAT)):
        manual[i] += r
    for i, r in zip(args[2].reshape(-1), gq_rows.reshape(-1, D_FEAT)):
        manual[i] += r
    assert np.array_equal(shared, manual)

    # against finite differences of the meta-loss as a function of the shared X
    P = dict(X=X)
    if first_order:
        P0 = _dense_P(reference.gather_index_tasks(X, *args, **kw), theta, lr, lam, K)
        frozen = frozen_trajectories(P0)
        f = lambda Q: surrogate_loss(_dense_P(reference.gather_index_tasks(Q["X"], *args, **kw), theta, lr, lam, K), frozen)  # noqa: E731
    else:
        f = lambda Q: oracle_loss(_dense_P(reference.gather_index_tasks(Q["X"], *args, **kw), theta, lr, lam, K))  # noqa: E731
    assert_fd(shared, fd(f, P, "X"))


def _dense_P(tasks, theta, lr, lam, K):
    Xs, ys, Xq, yq = (list(z) for z in zip(*reference._task_list(tasks)))
    return dict(theta=theta, Xs=Xs, ys=ys, Xq=Xq, yq=yq, lr=lr, lam=lam, K=K)


def test_accumulate_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="rows"):
        reference.accumulate_index_grads(5, np.array([[0, 1]]), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="idx"):
        reference.accumulate_index_grads(5, np.array([0, 5]), np.zeros((2, 3)))


# ---------------------------------------------------------------------------
# Task descriptor
# ---------------------------------------------------------------------------

def test_descriptor_hand_computed_binary():
    # X~ = [[1,0,1],[0,1,1]]: trace = (2 + 2)/2 = 2; Gram [[2,1],[1,2]] has eigenvalues 3, 1 -> 3/2
    desc = reference.task_descriptor(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 0]))
    np.testing.assert_allclose(desc, [np.log(2.0), 0.5, 2.0, 1.5], rtol=1e-14, atol=1e-14)
    # X~ = [[2,1],[0,1],[0,1],[0,1]]: trace = (5+1+1+1)/4 = 2; X~^T X~/4 = [[1,.5],[.5,1]] -> 1.5
    desc = reference.task_descriptor(np.array([[2.0], [0.0], [0.0], [0.0]]), np.array([1, 1, 1, 0]))
    np.testing.assert_allclose(desc, [np.log(4.0), 0.75, 2.0, 1.5], rtol=1e-14, atol=1e-14)
    # all-zero features: only the bias column -> trace 1, largest eigenvalue 1; no label 1 -> 0
    desc = reference.task_descriptor(np.zeros((3, 2)), np.array([0, 0, 0]))
    np.testing.assert_allclose(desc, [np.log(3.0), 0.0, 1.0, 1.0], rtol=1e-14, atol=1e-14)


def test_descriptor_hand_computed_multinomial():
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    desc = reference.task_descriptor(np.vstack([X, X]), np.array([2, 2, 0, 2]), n_classes=3)
    np.testing.assert_allclose(desc, [np.log(4.0), 0.75, 2.0, 1.5], rtol=1e-14, atol=1e-14)
    desc = reference.task_descriptor(np.zeros((3, 1)), np.array([0, 1, 2]), n_classes=3)
    np.testing.assert_allclose(desc, [np.log(3.0), 1.0 / 3.0, 1.0, 1.0], rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="labels"):
        reference.task_descriptor(X, np.array([0, 3]), n_classes=3)


def test_descriptors_of_a_batch_and_the_gram_identity():
    P = make_problem("binary", 1, ragged=True, seed=60)
    D = reference.task_descriptors(tasks_of(P))
    assert D.shape == (T, 4)
    for t in range(T):
        Xt = reference.augment(P["Xs"][t])
        n = Xt.shape[0]
        G = Xt @ Xt.T / n                                  # the n x n Gram matrix, independently
        assert D[t, 0] == np.log(n)
        assert D[t, 1] == np.mean(P["ys"][t] == 1)
        assert D[t, 2] == pytest.approx(np.trace(G), rel=1e-14)
        assert D[t, 3] == pytest.approx(np.linalg.eigvalsh(G)[-1], rel=1e-12)
