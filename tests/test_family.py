"""Multinomial tasks, Reptile, iMAML and the learned preconditioner against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

import fastmaml
import reference as R
from tolerances import RTOL_F32, RTOL_F64, assert_rel


def make_tasks(T=3, n=6, m=5, d=4, C=3, seed=0, dtype=np.float64, ragged=False):
    rng = np.random.default_rng(seed)
    Xs = rng.random((T, n, d)).astype(dtype)
    Xq = rng.random((T, m, d)).astype(dtype)
    hi = 2 if C == 1 else C
    ys = rng.integers(0, hi, (T, n))
    yq = rng.integers(0, hi, (T, m))
    return Xs, ys, Xq, yq


def theta_for(d, C, seed=1, scale=0.5):
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal(d + 1 if C == 1 else (d + 1, C))


K = 3
LR_SHAPES_MULTI = {
    "scalar": 0.3,
    "per_step": np.array([0.2, 0.3, 0.25]).reshape(K, 1, 1),
    "per_parameter": 0.2 + 0.1 * np.random.default_rng(5).random((5, 3)),
    "per_step_parameter": 0.2 + 0.1 * np.random.default_rng(6).random((K, 5, 3)),
    "per_class": np.array([[0.2, 0.3, 0.4]]),
    "per_class_1d": np.array([0.2, 0.3, 0.4]),
    "per_row": np.linspace(0.2, 0.4, 5).reshape(5, 1),
    "per_step_class": 0.2 + 0.1 * np.random.default_rng(7).random((K, 1, 3)),
}


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_name", sorted(LR_SHAPES_MULTI))
def test_multinomial_meta_gradient_matches_reference_for_every_inner_lr_shape(lr_name, first_order):
    tasks = make_tasks()
    theta = theta_for(4, 3)
    lr = LR_SHAPES_MULTI[lr_name]
    ours = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=0.1, first_order=first_order)
    ref = R.meta_value_and_grad(theta, tasks, lr, K, 0.1, first_order)
    assert_rel(ours.loss, ref.loss, RTOL_F64)
    assert_rel(ours.grad, ref.grad, RTOL_F64)
    assert np.shape(ours.grad_inner_lr) == np.shape(lr)
    assert_rel(ours.grad_inner_lr, ref.grad_inner_lr, RTOL_F64)
    assert_rel(ours.grad_l2, ref.grad_l2, RTOL_F64)


def test_multinomial_meta_gradient_matches_finite_differences():
    tasks = make_tasks(seed=3)
    theta = theta_for(4, 3, seed=4)
    lr = LR_SHAPES_MULTI["per_step_parameter"]
    res = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=0.2)

    def f(th=theta, a=lr, lam=0.2):
        return fastmaml.meta_value_and_grad(th, tasks, inner_lr=a, inner_steps=K, l2=lam).loss

    h = 1e-5
    fd = np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        e = np.zeros_like(theta)
        e[idx] = h
        fd[idx] = (f(th=theta + e) - f(th=theta - e)) / (2 * h)
    assert_rel(res.grad, fd, 1e-7)
    fda = np.zeros_like(lr)
    for idx in np.ndindex(lr.shape):
        e = np.zeros_like(lr)
        e[idx] = h
        fda[idx] = (f(a=lr + e) - f(a=lr - e)) / (2 * h)
    assert_rel(res.grad_inner_lr, fda, 1e-7)
    assert_rel(res.grad_l2, (f(lam=0.2 + h) - f(lam=0.2 - h)) / (2 * h), 1e-7)


def test_multinomial_float32_agrees_with_float64_reference_and_threads_are_bitwise_equal():
    tasks64 = make_tasks(T=150, seed=8)
    tasks32 = tuple(a.astype(np.float32) if a.dtype.kind == "f" else a for a in tasks64)
    theta = theta_for(4, 3)
    ref = R.meta_value_and_grad(theta, tasks64, 0.3, K, 0.1)
    r32 = fastmaml.meta_value_and_grad(theta, tasks32, inner_lr=0.3, inner_steps=K, l2=0.1, n_threads=1)
    assert r32.grad.dtype == np.float32
    assert_rel(r32.grad, ref.grad, RTOL_F32)
    r32b = fastmaml.meta_value_and_grad(theta, tasks32, inner_lr=0.3, inner_steps=K, l2=0.1, n_threads=2)
    assert np.array_equal(r32.grad, r32b.grad) and r32.loss == r32b.loss
    a = fastmaml.meta_value_and_grad(theta, tasks64, inner_lr=0.3, inner_steps=K, l2=0.1, n_threads=1)
    b = fastmaml.meta_value_and_grad(theta, tasks64, inner_lr=0.3, inner_steps=K, l2=0.1, n_threads=2)
    assert np.array_equal(a.grad, b.grad) and a.grad_l2 == b.grad_l2


def test_multinomial_is_stable_for_huge_logits():
    Xs, ys, Xq, yq = make_tasks(seed=9)
    theta = theta_for(4, 3, scale=3000.0)
    res = fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=1e-3, inner_steps=2)
    ref = R.meta_value_and_grad(theta, (Xs, ys, Xq, yq), 1e-3, 2)
    assert np.isfinite(res.loss) and np.isfinite(res.grad).all()
    assert_rel(res.grad, ref.grad, RTOL_F64)
    p = fastmaml.predict_proba(theta, Xq[0])
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_softmax_with_two_classes_matches_sigmoid_with_doubled_step_and_halved_l2():
    rng = np.random.default_rng(11)
    Xs, ys, Xq, yq = make_tasks(C=2, seed=11)
    w = rng.standard_normal(5)
    alpha, lam = 0.3, 0.2
    soft = np.column_stack([-w / 2, w / 2])
    path_soft = fastmaml.adapt(soft, Xs, ys, inner_lr=alpha, inner_steps=4, l2=lam, return_path=True)
    path_sig = fastmaml.adapt(w, Xs, ys, inner_lr=2 * alpha, inner_steps=4, l2=lam / 2, return_path=True)
    np.testing.assert_allclose(path_soft[..., 1] - path_soft[..., 0], path_sig, rtol=0, atol=1e-13)
    a = fastmaml.meta_value_and_grad(soft, (Xs, ys, Xq, yq), inner_lr=alpha, inner_steps=4, l2=lam)
    b = fastmaml.meta_value_and_grad(w, (Xs, ys, Xq, yq), inner_lr=2 * alpha, inner_steps=4, l2=lam / 2)
    assert abs(a.loss - b.loss) < 1e-13
    # the softmax meta-loss is the sigmoid one at w = W1 - W0, so dL/dW1 = -dL/dW0 = dL_sig/dw
    np.testing.assert_allclose(a.grad[:, 1], b.grad, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.grad[:, 0], -b.grad, rtol=0, atol=1e-12)
    assert abs(a.grad_inner_lr - 2 * b.grad_inner_lr) < 1e-12
    assert abs(a.grad_l2 - b.grad_l2 / 2) < 1e-12


@pytest.mark.parametrize("C", [1, 3])
def test_multinomial_and_binary_labels_out_of_range_name_the_argument(C):
    Xs, ys, Xq, yq = make_tasks(C=C)
    theta = theta_for(4, C)
    bad = ys.copy()
    bad[0, 0] = 2 if C == 1 else 3
    with pytest.raises(ValueError, match="support_y"):
        fastmaml.meta_value_and_grad(theta, (Xs, bad, Xq, yq), inner_lr=0.1, inner_steps=1)
    badq = yq.copy()
    badq[1, 1] = -1
    with pytest.raises(ValueError, match="query_y"):
        fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, badq), inner_lr=0.1, inner_steps=1)


def test_multinomial_theta_with_one_class_is_rejected():
    Xs, ys, Xq, yq = make_tasks(C=1)
    with pytest.raises(ValueError, match="theta"):
        fastmaml.meta_value_and_grad(np.zeros((5, 1)), (Xs, ys, Xq, yq), inner_lr=0.1, inner_steps=1)


@pytest.mark.parametrize("C", [1, 3])
def test_reptile_direction_matches_reference_and_points_from_phi_to_theta(C):
    tasks = make_tasks(C=C, seed=12)
    theta = theta_for(4, C)
    res = fastmaml.reptile_grad(theta, tasks, inner_lr=0.3, inner_steps=4, l2=0.1)
    ref = R.reptile_grad(theta, tasks, 0.3, 4, 0.1)
    assert_rel(res.grad, ref, RTOL_F64)
    phi = fastmaml.adapt(theta, tasks[0], tasks[1], inner_lr=0.3, inner_steps=4, l2=0.1)
    np.testing.assert_allclose(res.grad, theta - phi.mean(axis=0), rtol=0, atol=1e-14)
    # a small step against .grad moves theta toward the adapted weights
    before = np.linalg.norm(theta - phi.mean(axis=0))
    after = np.linalg.norm(theta - 0.1 * res.grad - phi.mean(axis=0))
    assert after < before


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_imaml_matches_reference_and_reports_convergence(C, l2):
    tasks = make_tasks(C=C, seed=13)
    theta = theta_for(4, C)
    res = fastmaml.imaml_value_and_grad(theta, tasks, mu=0.7, l2=l2)
    ref = R.imaml_value_and_grad(theta, tasks, 0.7, l2)
    assert res.converged and res.inner_converged.all() and res.cg_converged.all()
    assert (res.inner_residual <= 1e-10).all()
    assert_rel(res.loss, ref.loss, RTOL_F64)
    assert_rel(res.grad, ref.grad, 1e-9)


def test_imaml_gradient_matches_a_long_unrolled_proximal_solution():
    """The implicit gradient equals d/dtheta of the query loss at the converged inner solution."""
    tasks = make_tasks(T=2, C=1, seed=14)
    theta = theta_for(4, 1)
    mu = 2.0
    res = fastmaml.imaml_value_and_grad(theta, tasks, mu=mu, l2=0.1)
    # Unrolled gradient descent on l_s + mu/2||phi - theta||^2 is MAML on a shifted problem;
    # its theta-gradient through a long unroll converges to the implicit gradient.
    Xs, ys, Xq, yq = tasks

    def unrolled_loss(th, steps=400, lr=0.2):
        total = 0.0
        for t in range(Xs.shape[0]):
            phi = th.copy()
            for _ in range(steps):
                phi = phi - lr * (R.grad(phi, Xs[t], ys[t], 0.1) + mu * (phi - th))
            total += R.loss(phi, Xq[t], yq[t])
        return total / Xs.shape[0]

    h = 1e-5
    fd = np.array([(unrolled_loss(theta + h * e) - unrolled_loss(theta - h * e)) / (2 * h) for e in np.eye(5)])
    assert_rel(res.grad, fd, 1e-6)


def test_imaml_non_convergence_is_reported_and_warned():
    tasks = make_tasks(C=3, seed=15)
    with pytest.warns(fastmaml.ConvergenceWarning, match="did not converge"):
        res = fastmaml.imaml_value_and_grad(theta_for(4, 3), tasks, mu=0.01, max_iter=1, cg_max_iter=1)
    assert not res.converged
    assert (~res.inner_converged).any()


def test_imaml_rejects_bad_mu_and_tolerances():
    tasks = make_tasks(C=1)
    for kw, match in [(dict(mu=0.0), "mu"), (dict(mu=-1.0), "mu"), (dict(mu=1.0, tol=-1.0), "tol"),
                      (dict(mu=1.0, max_iter=-1), "max_iter"), (dict(mu=1.0, cg_max_iter=0), "cg_max_iter")]:
        with pytest.raises(ValueError, match=match):
            fastmaml.imaml_value_and_grad(theta_for(4, 1), tasks, **kw)


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_preconditioner_gradients_match_reference(C, first_order):
    tasks = make_tasks(C=C, seed=16)
    theta = theta_for(4, C)
    rng = np.random.default_rng(17)
    s = np.log(0.2) + 0.3 * rng.standard_normal(5)
    U = 0.3 * rng.standard_normal((5, 2))
    res = fastmaml.precond_value_and_grad(theta, tasks, log_scale=s, U=U, inner_steps=K, l2=0.1,
                                          first_order=first_order)
    ref = R.precond_value_and_grad(theta, tasks, s, U, K, 0.1, first_order)
    for name in ("loss", "grad", "grad_log_scale", "grad_U", "grad_l2"):
        assert_rel(getattr(res, name), getattr(ref, name), RTOL_F64)


def test_preconditioner_gradients_match_finite_differences_including_the_full_dU():
    tasks = make_tasks(C=3, seed=18)
    theta = theta_for(4, 3)
    rng = np.random.default_rng(19)
    s = np.log(0.2) + 0.3 * rng.standard_normal(5)
    U = 0.3 * rng.standard_normal((5, 2))
    res = fastmaml.precond_value_and_grad(theta, tasks, log_scale=s, U=U, inner_steps=K, l2=0.1)

    def f(ss=s, UU=U):
        return fastmaml.precond_value_and_grad(theta, tasks, log_scale=ss, U=UU, inner_steps=K, l2=0.1).loss

    h = 1e-5
    fd_s = np.array([(f(ss=s + h * e) - f(ss=s - h * e)) / (2 * h) for e in np.eye(5)])
    fd_U = np.zeros_like(U)
    for idx in np.ndindex(U.shape):
        e = np.zeros_like(U)
        e[idx] = h
        fd_U[idx] = (f(UU=U + e) - f(UU=U - e)) / (2 * h)
    assert_rel(res.grad_log_scale, fd_s, 1e-7)
    assert_rel(res.grad_U, fd_U, 1e-7)  # (M + M^T) U: half of it would be off by 50%


def test_preconditioner_with_zero_U_equals_per_parameter_step_sizes():
    tasks = make_tasks(C=1, seed=20)
    theta = theta_for(4, 1)
    alpha = 0.1 + 0.2 * np.random.default_rng(21).random(5)
    pre = fastmaml.precond_value_and_grad(theta, tasks, log_scale=np.log(alpha), U=np.zeros((5, 1)), inner_steps=K)
    msgd = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=alpha, inner_steps=K)
    assert_rel(pre.grad, msgd.grad, RTOL_F64)
    assert_rel(pre.grad_log_scale, msgd.grad_inner_lr * alpha, RTOL_F64)
    phi = fastmaml.adapt_preconditioned(theta, tasks[0], tasks[1], log_scale=np.log(alpha), U=np.zeros((5, 1)),
                                        inner_steps=K)
    np.testing.assert_allclose(phi, fastmaml.adapt(theta, tasks[0], tasks[1], inner_lr=alpha, inner_steps=K),
                               rtol=0, atol=1e-14)


def test_preconditioner_validation_names_the_argument():
    tasks = make_tasks(C=1)
    theta = theta_for(4, 1)
    with pytest.raises(ValueError, match="log_scale"):
        fastmaml.precond_value_and_grad(theta, tasks, log_scale=np.zeros(4), U=np.zeros((5, 1)), inner_steps=1)
    with pytest.raises(ValueError, match="U"):
        fastmaml.precond_value_and_grad(theta, tasks, log_scale=np.zeros(5), U=np.zeros((4, 1)), inner_steps=1)
    with pytest.raises(ValueError, match="U"):
        fastmaml.precond_value_and_grad(theta, tasks, log_scale=np.zeros(5), U=np.full((5, 1), np.nan),
                                        inner_steps=1)


@pytest.mark.parametrize("algorithm, kw", [
    ("maml", {}), ("fomaml", {}), ("reptile", {}), ("imaml", {"imaml_mu": 1.0}),
    ("maml", {"learn_inner_lr": "preconditioner", "precond_rank": 2}),
    ("maml", {"learn_inner_lr": "per_step_parameter"}),
])
def test_estimator_runs_every_algorithm_on_three_way_tasks(algorithm, kw, tmp_path):
    rng = np.random.default_rng(22)
    X = rng.random((600, 8))
    y = rng.integers(0, 6, 600)
    X[np.arange(600), y] += 1.0  # class c lights up feature c
    train = fastmaml.EpisodeSampler(X, y, n_way=3, k_shot=3, n_query=5, classes=[0, 1, 2, 3], random_state=0)
    val = fastmaml.EpisodeSampler(X, y, n_way=3, k_shot=3, n_query=5, classes=[3, 4, 5], random_state=1)
    model = fastmaml.MAML(algorithm=algorithm, inner_steps=3, inner_lr=0.3, meta_lr=0.02, n_iterations=20,
                          validate_every=10, progress=False, random_state=0, **kw)
    model.fit(train, validation=val, val_episodes=20)
    assert model.theta_.shape == (9, 3)
    scores = model.evaluate(val.sample(30))
    assert 0.0 <= scores["accuracy"] <= 1.0
    Xs, ys, Xq, yq = val.sample(1).task(0)
    clf = model.adapt(Xs, ys + 10)
    assert set(clf.predict(Xq)) <= {10, 11, 12}
    assert clf.predict_proba(Xq).shape == (Xq.shape[0], 3)
    model.save(tmp_path / "m.npz")
    loaded = fastmaml.MAML.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.adapt(Xs, ys).coef_, model.adapt(Xs, ys).coef_)
