"""The per-task hyperparameter policy (issue 15, item 2): ``fastmaml.HyperPolicy`` and ``MAML(hyper_policy=...)``.

The policy's gradient (chain rule through the core's per-task
hypergradients) against finite differences of the meta-loss; the untrained
policy is the global setting; the built-in descriptor against a direct
computation and independent of the batch and the task form; adaptation with
each task's own hyperparameters against ``fastmaml.adapt``; save/load and
bitwise resume; every sampler and task form; the errors a user can cause; and
that on a family whose best step depends on the support size the fitted
policy learns that dependence.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmaml
from fastmaml import policy as P
from tolerances import FD_RTOL, FD_STEP, RTOL_F64, assert_rel

K = 3


def dense_tasks(kind="binary", T=5, n=7, m=6, d=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    C = 2 if kind == "binary" else 3
    Xs = rng.uniform(size=(T, n, d)).astype(dtype)
    Xq = rng.uniform(size=(T, m, d)).astype(dtype)
    ys = rng.integers(0, C, (T, n))
    yq = rng.integers(0, C, (T, m))
    ys[:, :C] = np.arange(C)  # every class in every support set
    return fastmaml.Tasks(Xs, ys, Xq, yq)


def ragged_tasks(kind="binary", T=5, d=3, seed=0):
    rng = np.random.default_rng(seed)
    C = 2 if kind == "binary" else 3
    X = rng.uniform(size=(40, d))
    ns, ms = rng.integers(C, 12, size=T), rng.integers(1, 6, size=T)
    ns[0], ns[1] = C, 12
    sptr, qptr = np.concatenate([[0], np.cumsum(ns)]), np.concatenate([[0], np.cumsum(ms)])
    sidx, qidx = rng.integers(0, 40, sptr[-1]), rng.integers(0, 40, qptr[-1])
    sy, qy = rng.integers(0, C, sidx.size), rng.integers(0, C, qidx.size)
    for t in range(T):
        sy[sptr[t]:sptr[t] + C] = np.arange(C)
    return fastmaml.Tasks.from_index(X, sidx, sy, qidx, qy, support_ptr=sptr, query_ptr=qptr)


def random_policy(K, F, learn_l2, seed=1):
    rng = np.random.default_rng(seed)
    params = P.initial_params(np.full(K, 0.4), 0.05, F, learn_l2)
    params[P.LR_INTERCEPT] = params[P.LR_INTERCEPT] + 0.3 * rng.normal(size=K)
    params[P.LR_SLOPE] = 0.3 * rng.normal(size=F)
    if learn_l2:
        params[P.L2_SLOPE] = 0.3 * rng.normal(size=F)
    return params


def grouped_sampler(seed=0, n_groups=40, sizes=(8, 60), d=5, data_seed=None, **kw):
    X, y, g = fastmaml.make_grouped_tasks(n_groups=n_groups, n_per_group=sizes, n_features=d, noise=0.5,
                                          random_state=seed if data_seed is None else data_seed)
    return fastmaml.GroupedSampler(X, y, g, support_size=0.5, random_state=seed, **kw), (X, y, g)


def policy_maml(**kw):
    base = dict(hyper_policy=fastmaml.HyperPolicy(warmup=0.0), inner_steps=K, inner_lr=0.3, l2=0.01, meta_batch_size=8,
                meta_lr=1e-2, n_iterations=6, progress=False)
    base.update(kw)
    return fastmaml.MAML(**base)


# ---------------------------------------------------------------------------
# the gradient: chain rule through the per-task hypergradients
# ---------------------------------------------------------------------------

def _fd(f, x, idx, h=FD_STEP):
    vals = []
    for s in (-2, -1, 1, 2):
        y = x.copy()
        y[idx] += s * h
        vals.append(f(y))
    return (vals[0] - 8.0 * vals[1] + 8.0 * vals[2] - vals[3]) / (12.0 * h)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("form", ["dense", "ragged"])
@pytest.mark.parametrize("learn_l2", [True, False])
def test_policy_gradient_matches_finite_differences(kind, form, learn_l2):
    """Every policy parameter's gradient (and theta's) against 4th-order central differences of the meta-loss."""
    tasks = dense_tasks(kind) if form == "dense" else ragged_tasks(kind)
    rng = np.random.default_rng(3)
    theta = 0.5 * rng.normal(size=(4,) if kind == "binary" else (4, 3))
    z = rng.normal(size=(tasks.n_tasks, 4))
    params = random_policy(K, 4, learn_l2)

    def loss(p, th=theta):
        return P.policy_value_and_grad(th, tasks, p, z, inner_steps=K, l2=0.02)[0]

    _, grad_theta, grads, _ = P.policy_value_and_grad(theta, tasks, params, z, inner_steps=K, l2=0.02)
    assert set(grads) == set(params)
    for key, value in params.items():
        fd = np.array([_fd(lambda v: loss(dict(params, **{key: v})), value, idx) for idx in np.ndindex(value.shape)])
        assert_rel(np.asarray(grads[key]).reshape(-1), fd, FD_RTOL, key)
    fd = np.array([_fd(lambda v: loss(params, v), theta, idx) for idx in np.ndindex(theta.shape)])
    assert_rel(grad_theta.reshape(-1), fd, FD_RTOL, "theta")


@pytest.mark.parametrize("first_order", [False, True])
def test_chain_rule_is_the_per_task_hypergradient_summed(first_order):
    """dL/da_j = sum_t dL/dalpha_tj alpha_tj and dL/db = sum_tj ... z_t, from the core's task_axis result.

    First-order MAML differentiates a surrogate (docs/design.md, "Feature
    gradients"), so finite differences of the loss do not apply to it; its
    policy gradient is checked as this chain rule of the core's hypergradients.
    """
    tasks = dense_tasks()
    z = np.random.default_rng(5).normal(size=(tasks.n_tasks, 2))
    params = random_policy(K, 2, True)
    alpha, lam = P.hyperparameters(params, z, 0.0)
    theta = np.zeros(4)
    res = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=alpha[:, :, None], inner_steps=K, l2=lam,
                                       task_axis=True, first_order=first_order)
    loss, grad_theta, grads, _ = P.policy_value_and_grad(theta, tasks, params, z, inner_steps=K, l2=0.0,
                                                         first_order=first_order)
    assert loss == res.loss and np.array_equal(grad_theta, res.grad)
    g = res.grad_inner_lr[:, :, 0] * alpha
    assert_rel(grads[P.LR_INTERCEPT], g.sum(0), RTOL_F64)
    assert_rel(grads[P.LR_SLOPE], g.sum(1) @ z, RTOL_F64)
    assert_rel(grads[P.L2_SLOPE], (res.grad_l2 * lam) @ z, RTOL_F64)


# ---------------------------------------------------------------------------
# the untrained policy is the global setting
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("inner_lr", [0.3, [[0.2], [0.3], [0.4]]])
def test_iteration_zero_equals_the_global_setting(inner_lr):
    """Before training every task gets inner_lr and l2; the first iteration's loss and step match the global run."""
    s1, (X, y, g) = grouped_sampler(seed=2)
    s2, _ = grouped_sampler(seed=2)
    test = fastmaml.GroupedSampler(X, y, g, support_size=0.5).tasks_for()
    common = dict(inner_steps=K, inner_lr=inner_lr, l2=0.01, meta_batch_size=8, meta_lr=1e-2, progress=False)
    pol = fastmaml.MAML(hyper_policy=fastmaml.HyperPolicy(), n_iterations=0, **common).fit(s1)
    glob = fastmaml.MAML(n_iterations=0, **common).fit(s2)
    hyper = pol.task_hyperparameters(test)
    lr = np.broadcast_to(np.asarray(inner_lr, dtype=float).reshape(-1), (K,))
    assert_rel(hyper["inner_lr"], np.broadcast_to(lr, (test.n_tasks, K)), RTOL_F64)
    assert_rel(hyper["l2"], np.full(test.n_tasks, 0.01), RTOL_F64)
    assert_rel(pol.inner_lr_, lr.reshape(K, 1), RTOL_F64)  # the mean task's (z = 0) step sizes
    assert_rel(pol.l2_, 0.01, RTOL_F64)
    assert_rel(pol.adapt_tasks(test), glob.adapt_tasks(test), RTOL_F64)
    assert pol.evaluate(test)["accuracy"] == glob.evaluate(test)["accuracy"]
    pol.set_params(n_iterations=1).fit(grouped_sampler(seed=2)[0])
    glob.set_params(n_iterations=1).fit(grouped_sampler(seed=2)[0])
    assert_rel(pol.history_[0]["loss"], glob.history_[0]["loss"], RTOL_F64)
    assert_rel(pol.theta_, glob.theta_, RTOL_F64)


# ---------------------------------------------------------------------------
# descriptors
# ---------------------------------------------------------------------------

def _direct_descriptor(X, y, C):
    n = X.shape[0]
    A = np.column_stack([X, np.ones(n)])
    counts = np.bincount(y, minlength=C)
    S = A.T @ A / n
    if C == 2:
        g = A.T @ (0.5 - (y == 1)) / n
    else:
        g = A.T @ (1.0 / C - np.eye(C)[y]) / n
    return np.array([np.log(n), C * counts.min() / n, np.log(np.trace(S)), np.log(np.linalg.eigvalsh(S)[-1]),
                     np.log(np.linalg.norm(g) + 1e-8)])


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_support_descriptor_matches_a_direct_computation(kind):
    """Each column against its definition (the top eigenvalue from LAPACK, not the power iteration)."""
    tasks = ragged_tasks(kind, T=6, seed=4)
    C = 2 if kind == "binary" else 3
    got = P.support_descriptors(tasks, n_classes=C)
    assert got.shape == (6, len(P.DESCRIPTOR_FEATURES))
    for t in range(6):
        sX, sy, _, _ = tasks.task(t)
        assert_rel(got[t], _direct_descriptor(sX, sy, C), 1e-6, f"task {t}")


def test_descriptor_of_a_task_depends_on_that_task_only():
    """Bitwise the same descriptor for a task alone, in a dense batch, in an index batch and in a ragged batch."""
    tasks = dense_tasks(T=4, n=9, d=6, seed=7)
    dense = P.support_descriptors(tasks)
    N = 4 * 9
    X = tasks.support.X.reshape(N, 6)
    idx = np.arange(N)[::-1].copy()  # the rows in another order of the dataset
    Xr = X[idx]
    back = np.argsort(idx)
    indexed = fastmaml.Tasks.from_index(Xr, back.reshape(4, 9), tasks.support.y.reshape(4, 9),
                                        back.reshape(4, 9)[:, :2], tasks.support.y.reshape(4, 9)[:, :2])
    assert np.array_equal(P.support_descriptors(indexed), dense)
    for t in range(4):
        sX, sy, _, _ = tasks.task(t)
        assert np.array_equal(P._one_task_descriptor(sX, sy, "support", 2), dense[t])
    # task 2 among ragged neighbours of other sizes
    sX, sy, _, _ = tasks.task(2)
    other = np.random.default_rng(0).uniform(size=(5, 6))
    Xall = np.concatenate([other, sX])
    ragged = fastmaml.Tasks.from_index(Xall, np.concatenate([np.arange(5), 5 + np.arange(9)]),
                                       np.concatenate([[0, 1, 0, 1, 0], sy]), np.array([0, 1]), np.array([0, 1]),
                                       support_ptr=[0, 5, 14], query_ptr=[0, 1, 2])
    assert np.array_equal(P.support_descriptors(ragged)[1], dense[2])


@pytest.mark.parametrize("d", [1, 2, 3, 6, 9, 16])
def test_each_tasks_descriptor_alone_equals_it_in_a_ragged_batch(d):
    """Random ragged batches, many feature counts: every task's descriptor alone is bitwise its batch row."""
    rng = np.random.default_rng(d)
    sizes = rng.integers(2, 30, size=11)
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    X = rng.uniform(size=(ptr[-1], d)) * rng.uniform(0.1, 3.0)
    y = rng.integers(0, 2, ptr[-1])
    tasks = fastmaml.Tasks.from_index(X, np.arange(ptr[-1]), y, np.array([0] * 11), np.zeros(11, dtype=int),
                                      support_ptr=ptr, query_ptr=np.arange(12))
    batch = P.support_descriptors(tasks)
    for t in range(11):
        alone = P._one_task_descriptor(X[ptr[t]:ptr[t + 1]], y[ptr[t]:ptr[t + 1]], "support", 2)
        assert np.array_equal(alone, batch[t]), t


def test_descriptors_in_blocks_of_tasks_are_bitwise_the_same(monkeypatch):
    """A large pool is described in blocks of whole tasks (bounded memory); the blocks change no bit."""
    tasks = ragged_tasks(T=9, seed=3)
    whole = P.support_descriptors(tasks)
    monkeypatch.setattr(P, "_BLOCK_VALUES", 20)  # about 5 rows of 4 values: one or two tasks per block
    assert np.array_equal(P.support_descriptors(tasks), whole)


def test_descriptor_standardisation_is_fixed_at_fit_start_and_saved(tmp_path):
    """mean/scale come from the meta-training tasks (a constant feature gets scale 1) and survive save/load."""
    tasks = dense_tasks(T=12, n=8, d=4, seed=1)
    model = policy_maml(n_iterations=2, meta_batch_size=4).fit(tasks)
    desc = P.support_descriptors(tasks)
    assert_rel(model._policy_mean, desc.mean(0), RTOL_F64)
    assert model._policy_scale[0] == 1.0  # every support set has 8 rows: log n is constant
    assert_rel(model._policy_scale[2:], desc.std(0)[2:], RTOL_F64)
    model.save(tmp_path / "m.npz")
    loaded = fastmaml.MAML.load(tmp_path / "m.npz")
    assert np.array_equal(loaded._policy_mean, model._policy_mean)
    assert np.array_equal(loaded._policy_scale, model._policy_scale)


# ---------------------------------------------------------------------------
# adaptation: each task with its own hyperparameters
# ---------------------------------------------------------------------------

def _trained_policy(kind="binary", form="ragged"):
    tasks = ragged_tasks(kind, T=8, seed=9) if form == "ragged" else dense_tasks(kind, T=8, seed=9)
    model = policy_maml(n_iterations=3, meta_batch_size=8).fit(tasks)
    # slopes far from 0, so that a task adapted with another's hyperparameters would differ
    rng = np.random.default_rng(0)
    model._params[P.LR_SLOPE] = 0.4 * rng.normal(size=model._params[P.LR_SLOPE].shape)
    model._params[P.L2_SLOPE] = 0.4 * rng.normal(size=model._params[P.L2_SLOPE].shape)
    return model, tasks


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("form", ["dense", "ragged"])
def test_adapt_tasks_uses_each_tasks_own_hyperparameters(kind, form):
    """Row t of adapt_tasks is fastmaml.adapt on task t with inner_lr = alpha_t per step and l2 = lam_t."""
    model, tasks = _trained_policy(kind, form)
    hyper = model.task_hyperparameters(tasks)
    assert np.ptp(hyper["inner_lr"][:, 0]) > 0 and np.ptp(hyper["l2"]) > 0
    phi = model.adapt_tasks(tasks)
    path = model.adapt_tasks(tasks, return_path=True)
    ones = (1,) * model.theta_.ndim
    for t in range(tasks.n_tasks):
        sX, sy, _, _ = tasks.task(t)
        ref = fastmaml.adapt(model.theta_, sX, sy, inner_lr=hyper["inner_lr"][t].reshape((K,) + ones),
                             inner_steps=K, l2=float(hyper["l2"][t]), return_path=True)
        assert_rel(phi[t], ref[-1], RTOL_F64, f"task {t}")
        assert_rel(path[t], ref, RTOL_F64, f"task {t}")
    scores = model.evaluate(tasks)
    acc = []
    for t in range(tasks.n_tasks):
        _, _, qX, qy = tasks.task(t)
        logits = qX @ phi[t][:-1] + phi[t][-1]
        pred = (logits > 0).astype(int) if kind == "binary" else np.argmax(logits, axis=1)
        acc.append(np.mean(pred == qy))
    assert_rel(scores["per_task_accuracy"], np.array(acc), RTOL_F64)


def test_adapt_reports_the_tasks_hyperparameters_and_descriptor():
    """maml.adapt(X, y) computes the descriptor, the hyperparameters and adapts with them."""
    model, tasks = _trained_policy()
    sX, sy, qX, qy = tasks.task(3)
    fitted = model.adapt(sX, np.where(sy == 1, "yes", "no"))  # any labels: codes are what the descriptor sees
    hyper = model.task_hyperparameters(tasks)
    assert fitted.inner_lr_.shape == (K,)
    assert isinstance(fitted.l2_, float)
    assert fitted.descriptor_.shape == (len(P.DESCRIPTOR_FEATURES),)
    assert np.array_equal(fitted.inner_lr_, hyper["inner_lr"][3])
    assert fitted.l2_ == hyper["l2"][3]
    assert np.array_equal(fitted.descriptor_, hyper["descriptor"][3])
    one = model.task_hyperparameters(sX, sy)
    assert np.array_equal(one["inner_lr"], fitted.inner_lr_) and one["l2"] == fitted.l2_
    assert_rel(np.concatenate([fitted.coef_[0], fitted.intercept_]), model.adapt_tasks(tasks)[3], RTOL_F64)


def test_adapting_with_other_inner_steps_is_an_error_naming_it():
    model, tasks = _trained_policy()
    sX, sy, _, _ = tasks.task(0)
    with pytest.raises(ValueError, match=r"inner_steps: the hyper_policy learned one step size per step for 3"):
        model.adapt(sX, sy, inner_steps=5)
    with pytest.raises(ValueError, match=r"inner_steps"):
        model.evaluate(tasks, inner_steps=2)


def test_float32_tasks_adapt_in_float32():
    model, _ = _trained_policy(form="dense")
    tasks = dense_tasks(T=8, seed=9, dtype=np.float32)
    phi = model.adapt_tasks(tasks)
    assert phi.dtype == np.float32
    ref = model.adapt_tasks(dense_tasks(T=8, seed=9))
    assert_rel(phi, ref, 2e-4)


# ---------------------------------------------------------------------------
# samplers, task forms, threads
# ---------------------------------------------------------------------------

def _sources():
    X, y, g = fastmaml.make_grouped_tasks(n_groups=30, n_per_group=(8, 40), n_features=4, random_state=0)
    rng = np.random.default_rng(0)
    Xe, ye = rng.uniform(size=(120, 4)), np.repeat(np.arange(4), 30)
    return {
        "episode": lambda: fastmaml.EpisodeSampler(Xe, ye, n_way=2, k_shot=3, n_query=4, random_state=0),
        "episode_3way": lambda: fastmaml.EpisodeSampler(Xe, ye, n_way=3, k_shot=3, n_query=4, random_state=0),
        "grouped": lambda: fastmaml.GroupedSampler(X, y, g, support_size=0.5, random_state=0),
        "tasks_dense": lambda: dense_tasks(T=6, d=4),
        "tasks_ragged": lambda: ragged_tasks(T=6, d=4),
    }


@pytest.mark.parametrize("source", sorted(_sources()))
def test_fits_and_evaluates_on_every_sampler_and_task_form(source):
    """fit, evaluate and adapt run on EpisodeSampler, GroupedSampler, dense and ragged Tasks; the policy moves."""
    make = _sources()[source]
    model = policy_maml(n_iterations=5, meta_batch_size=4, validate_every=5).fit(make(), validation=make())
    assert model.n_iter_ == 5 and len([r for r in model.history_ if "loss" in r]) == 5
    assert np.any(model._params[P.LR_SLOPE] != 0)  # the slopes received gradients
    probe = make() if isinstance(make(), fastmaml.Tasks) else make().sample(4)
    scores = model.evaluate(probe)
    assert np.isfinite(scores["loss"]) and 0 <= scores["accuracy"] <= 1
    sX, sy, _, _ = probe.task(0)
    assert model.adapt(sX, sy).inner_lr_.shape == (K,)


def test_results_do_not_depend_on_threads():
    runs = [policy_maml(n_iterations=4, n_threads=k).fit(grouped_sampler(seed=3)[0]) for k in (1, 2)]
    for key in runs[0]._params:
        assert np.array_equal(runs[0]._params[key], runs[1]._params[key]), key


# ---------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------

def _summary(model, tasks):
    h = model.task_hyperparameters(tasks)
    return model.adapt_tasks(tasks), h["inner_lr"], h["l2"], h["descriptor"]


def test_save_load_round_trips_the_policy(tmp_path):
    sampler, (X, y, g) = grouped_sampler(seed=4)
    test = fastmaml.GroupedSampler(X, y, g, support_size=0.5).tasks_for()
    model = policy_maml(n_iterations=5, hyper_policy=fastmaml.HyperPolicy(learn_l2=False)).fit(sampler)
    model.save(tmp_path / "m.npz")
    loaded = fastmaml.MAML.load(tmp_path / "m.npz")
    assert loaded.get_params()["inner_steps"] == K and loaded.hyper_policy._config() == model.hyper_policy._config()
    assert loaded.hyper_policy.learn_l2 is False and loaded.hyper_policy.descriptor == "support"
    for a, b in zip(_summary(model, test), _summary(loaded, test)):
        assert np.array_equal(a, b)


def _size_and_balance(support_X, support_y):
    return np.array([np.log(len(support_y)), np.mean(support_y), support_X.mean()])


def test_custom_descriptor_is_saved_by_name_and_must_be_passed_again(tmp_path):
    sampler, (X, y, g) = grouped_sampler(seed=5)
    test = fastmaml.GroupedSampler(X, y, g, support_size=0.5).tasks_for()
    model = policy_maml(hyper_policy=fastmaml.HyperPolicy(descriptor=_size_and_balance)).fit(sampler)
    assert model.task_hyperparameters(test)["descriptor"].shape == (test.n_tasks, 3)
    model.save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match=r"descriptor: .*custom descriptor '_size_and_balance'.*pass it again"):
        fastmaml.MAML.load(tmp_path / "m.npz")
    loaded = fastmaml.MAML.load(tmp_path / "m.npz", descriptor=_size_and_balance)
    for a, b in zip(_summary(model, test), _summary(loaded, test)):
        assert np.array_equal(a, b)
    policy_maml(n_iterations=1).fit(sampler).save(tmp_path / "builtin.npz")
    with pytest.raises(ValueError, match=r"descriptor: .*built-in 'support' descriptor"):
        fastmaml.MAML.load(tmp_path / "builtin.npz", descriptor=_size_and_balance)
    fastmaml.MAML(n_iterations=1, progress=False).fit(sampler).save(tmp_path / "plain.npz")
    with pytest.raises(ValueError, match=r"descriptor: .*has no hyper_policy"):
        fastmaml.MAML.load(tmp_path / "plain.npz", descriptor=_size_and_balance)


def test_checkpoint_resume_is_bitwise(tmp_path):
    """10 iterations straight equal 5 + a resumed 5 (parameters, optimizer moments, history losses)."""
    val = dense_tasks(T=6, d=5, seed=8)
    kw = dict(validate_every=5, select="best_loss")  # a run that stops at 5 validates there
    full = policy_maml(n_iterations=10, **kw).fit(grouped_sampler(seed=6)[0], validation=val)
    ck = str(tmp_path / "ck.npz")
    policy_maml(n_iterations=5, checkpoint_path=ck, checkpoint_every=5, **kw).fit(grouped_sampler(seed=6)[0],
                                                                                 validation=val)
    # the sampler's stream comes from the checkpoint, not from its seed
    resumed = policy_maml(n_iterations=10, checkpoint_path=ck, checkpoint_every=5, **kw).fit(
        grouped_sampler(seed=99, data_seed=6)[0], validation=val, resume=True)
    for key in full._params:
        assert np.array_equal(full._params[key], resumed._params[key]), key
    for key in full._final_params:
        assert np.array_equal(full._final_params[key], resumed._final_params[key]), key
    for key in full._opt.m:
        assert np.array_equal(full._opt.m[key], resumed._opt.m[key]), key
    assert [r.get("loss") for r in full.history_] == [r.get("loss") for r in resumed.history_]
    assert full.best_iteration_ == resumed.best_iteration_


def test_warmup_keeps_the_slopes_at_zero_then_learns_them():
    """HyperPolicy(warmup=0.4) with 10 iterations: the slopes are exactly 0 after iterations 1-4, not after 5."""
    seen = []
    model = policy_maml(n_iterations=10, hyper_policy=fastmaml.HyperPolicy(warmup=0.4),
                        callbacks=[lambda m, r: seen.append(np.abs(m._params[P.LR_SLOPE]).max()
                                                            + np.abs(m._params[P.L2_SLOPE]).max())])
    model.fit(grouped_sampler(seed=3)[0])
    assert seen[:4] == [0.0] * 4 and all(v > 0 for v in seen[4:])
    assert np.any(model._params[P.LR_INTERCEPT] != np.log(0.3))  # the intercepts learn from the start


def test_resume_during_warmup_is_bitwise(tmp_path):
    """Stopped at 3 of 10 (a callback, like Ctrl-C) inside the warm-up and resumed: equal to the straight run."""
    policy = fastmaml.HyperPolicy(warmup=0.5)
    full = policy_maml(n_iterations=10, hyper_policy=policy).fit(grouped_sampler(seed=6)[0])
    ck = str(tmp_path / "ck.npz")
    policy_maml(n_iterations=10, hyper_policy=policy, checkpoint_path=ck,
                callbacks=[lambda m, r: r["iteration"] == 3]).fit(grouped_sampler(seed=6)[0])
    resumed = policy_maml(n_iterations=10, hyper_policy=policy, checkpoint_path=ck).fit(
        grouped_sampler(seed=99, data_seed=6)[0], resume=True)
    for key in full._params:
        assert np.array_equal(full._params[key], resumed._params[key]), key
    with pytest.raises(ValueError, match=r"resume: .*n_iterations=10 in the checkpoint, 20 in this model"):
        policy_maml(n_iterations=20, hyper_policy=policy, checkpoint_path=ck).fit(
            grouped_sampler(seed=6)[0], resume=True)


def test_resume_with_another_policy_is_refused(tmp_path):
    ck = str(tmp_path / "ck.npz")
    policy_maml(n_iterations=2, checkpoint_path=ck).fit(grouped_sampler(seed=6)[0])
    with pytest.raises(ValueError, match=r"resume: .*hyper_policy"):
        policy_maml(n_iterations=4, checkpoint_path=ck, hyper_policy=fastmaml.HyperPolicy(learn_l2=False)).fit(
            grouped_sampler(seed=6)[0], resume=True)


# ---------------------------------------------------------------------------
# the estimator's parameter protocol and the errors a user can cause
# ---------------------------------------------------------------------------

def test_parameter_protocol():
    policy = fastmaml.HyperPolicy(learn_l2=False)
    model = fastmaml.MAML(hyper_policy=policy)
    assert model.get_params()["hyper_policy"] is policy
    assert "hyper_policy=HyperPolicy(learn_l2=False)" in repr(model)
    assert repr(fastmaml.HyperPolicy(warmup=0.0)) == "HyperPolicy(warmup=0.0)"
    assert model.set_params(hyper_policy=None).hyper_policy is None
    assert "hyper_policy" in fastmaml.MAML.__doc__
    sklearn_base = pytest.importorskip("sklearn.base")
    clone = sklearn_base.clone(fastmaml.MAML(hyper_policy=policy))
    assert isinstance(clone.hyper_policy, fastmaml.HyperPolicy) and clone.hyper_policy.learn_l2 is False


@pytest.mark.parametrize("kw, exc, match", [
    (dict(learn_inner_lr="scalar"), ValueError, r"hyper_policy: .*learn_inner_lr=None and learn_l2=False"),
    (dict(learn_l2=True), ValueError, r"hyper_policy: .*learn_inner_lr=None and learn_l2=False"),
    (dict(algorithm="reptile"), ValueError, r"hyper_policy: needs algorithm 'maml' or 'fomaml'"),
    (dict(algorithm="imaml"), ValueError, r"hyper_policy: needs algorithm 'maml' or 'fomaml'"),
    (dict(inner_steps=0), ValueError, r"inner_steps: hyper_policy .* needs inner_steps >= 1"),
    (dict(l2=0.0), ValueError, r"l2: must be > 0 when HyperPolicy\(learn_l2=True\)"),
    (dict(inner_lr=-0.1), ValueError, r"inner_lr: must be > 0 with hyper_policy"),
    (dict(inner_lr=[0.1, 0.2]), ValueError, r"inner_lr: hyper_policy starts from a scalar inner_lr or one per step"),
    (dict(hyper_policy="support"), TypeError, r"hyper_policy: expected None or a fastmaml.HyperPolicy"),
    (dict(hyper_policy=fastmaml.HyperPolicy(descriptor="size")), ValueError, r"descriptor: expected 'support'"),
    (dict(hyper_policy=fastmaml.HyperPolicy(descriptor=3)), TypeError, r"descriptor: expected 'support'"),
    (dict(hyper_policy=fastmaml.HyperPolicy(learn_l2="yes")), TypeError, r"learn_l2"),
    (dict(hyper_policy=fastmaml.HyperPolicy(warmup=1.0)), ValueError, r"warmup: expected a fraction of n_iterations"),
    (dict(hyper_policy=fastmaml.HyperPolicy(warmup=-0.1)), ValueError, r"warmup: expected a fraction"),
    (dict(hyper_policy=fastmaml.HyperPolicy(warmup="half")), TypeError, r"warmup: expected a number"),
])
def test_bad_settings_are_named(kw, exc, match):
    with pytest.raises(exc, match=match):
        policy_maml(**kw).fit(dense_tasks())


def test_policy_on_a_plain_model_is_an_error():
    model = fastmaml.MAML(n_iterations=1, progress=False).fit(dense_tasks())
    with pytest.raises(ValueError, match=r"hyper_policy: this model has no hyperparameter policy"):
        model.task_hyperparameters(dense_tasks())


def test_distributed_sources_are_refused():
    class Source:
        n_features = 3

        def meta_value_and_grad(self, *a, **k):  # pragma: no cover - never reached
            raise AssertionError

        def get_state(self):
            return {}

        def set_state(self, state):
            pass

    with pytest.raises(ValueError, match=r"tasks: a distributed task source does not support hyper_policy"):
        policy_maml().fit(Source())


def _wrong_length(X, y):
    return np.zeros(1 + len(y) % 2)


def _non_finite(X, y):
    return np.array([np.log(len(y)), np.nan if len(y) > 10 else 0.0])


@pytest.mark.parametrize("descriptor, exc, match", [
    (_wrong_length, ValueError, r"descriptor: _wrong_length\(support_X, support_y\) returned \d values for task \d+, "
                                r"expected \d"),
    (_non_finite, ValueError, r"descriptor: _non_finite\(support_X, support_y\) returned NaN or infinity"),
    (lambda X, y: np.zeros((2, 2)), ValueError, r"descriptor: .* must return a non-empty 1-D array"),
    (lambda X, y: "abc", TypeError, r"descriptor: .* must return a 1-D array of numbers"),
])
def test_bad_descriptors_are_named(descriptor, exc, match):
    with pytest.raises(exc, match=match):
        policy_maml(hyper_policy=fastmaml.HyperPolicy(descriptor=descriptor)).fit(grouped_sampler(seed=1)[0])


def test_descriptor_of_another_length_at_adaptation_is_named():
    state = {"n": 2}

    def changing(X, y):
        return np.zeros(state["n"])

    model = policy_maml(hyper_policy=fastmaml.HyperPolicy(descriptor=changing), n_iterations=1).fit(dense_tasks())
    state["n"] = 3
    sX, sy, _, _ = dense_tasks().task(0)
    with pytest.raises(ValueError, match=r"descriptor: returned 3 values, the model was fitted with 2"):
        model.adapt(sX, sy)
    with pytest.raises(ValueError, match=r"descriptor: .*returned 3 values for task 0, expected 2"):
        model.evaluate(dense_tasks())


# ---------------------------------------------------------------------------
# it learns what the data needs
# ---------------------------------------------------------------------------

def test_learns_the_step_size_dependence_on_support_size():
    """A family built to need it: noisy labels, support sets of 3 to 300 rows (log-uniform), 5 steps from the
    zero start (a small support set overfits its noise with a large step, a large one underfits with a small
    step). The fitted policy gives larger support sets larger steps (the largest fifth of the held-out tasks
    e^1 times those of the smallest fifth, at least; measured over 5 sampler seeds: e^2 to e^2.8), and the data
    agrees: on held-out groups its meta-loss is at least 10% below that of the same policy with its slopes set
    to 0, the same intercepts for every task (measured: 19% to 39% below)."""
    G = 160
    X, y, g = fastmaml.make_grouped_tasks(n_groups=G, n_per_group=600, n_features=10, noise=1.0, random_state=0)
    sizes = np.exp(np.random.default_rng(2).uniform(np.log(6), np.log(600), size=G)).astype(int)
    keep = np.concatenate([np.flatnonzero(g == k)[:sizes[k]] for k in range(G)])
    X, y, g = X[keep], y[keep], g[keep]
    sampler = fastmaml.GroupedSampler(X, y, g, support_size=0.5, groups_subset=np.arange(120), random_state=0)
    # slopes learned from the first iteration (the zero start is fixed: nothing to wait for)
    model = fastmaml.MAML(hyper_policy=fastmaml.HyperPolicy(learn_l2=False, warmup=0.0), inner_lr=0.3, inner_steps=5,
                          learn_init=False, n_iterations=300, meta_batch_size=16, meta_lr=3e-2,
                          progress=False).fit(sampler)
    held_out = fastmaml.GroupedSampler(X, y, g, support_size=0.5, groups_subset=np.arange(120, G)).tasks_for()
    hyper = model.task_hyperparameters(held_out)
    n = np.diff(held_out.support.ptr)
    small, large = n <= np.quantile(n, 0.2), n >= np.quantile(n, 0.8)
    log_alpha = np.log(hyper["inner_lr"]).mean(axis=1)
    assert log_alpha[large].mean() - log_alpha[small].mean() > 1.0

    z = P.standardise(hyper["descriptor"], model._policy_mean, model._policy_scale)
    fitted = model._policy_params()
    flat = dict(fitted, **{P.LR_SLOPE: np.zeros_like(fitted[P.LR_SLOPE])})
    loss = P.policy_value_and_grad(model.theta_, held_out, fitted, z, inner_steps=5, l2=0.0)[0]
    loss_flat = P.policy_value_and_grad(model.theta_, held_out, flat, z, inner_steps=5, l2=0.0)[0]
    assert loss < 0.9 * loss_flat


def test_features_too_large_for_a_descriptor_are_named():
    """Finite features whose squares overflow give no descriptor: a ValueError naming support_X, not a NaN step."""
    model, tasks = _trained_policy(form="dense")
    sX, sy, qX, qy = tasks.task(0)
    with pytest.raises(ValueError, match=r"support_X: the support rows of task 0 give a non-finite descriptor"):
        model.adapt(sX * 1e200, sy)
    huge = fastmaml.Tasks(sX[None] * 1e200, sy[None], qX[None], qy[None])
    with pytest.raises(ValueError, match=r"support_X: the support rows of task 0 give a non-finite descriptor"):
        model.evaluate(huge)


# ---------------------------------------------------------------------------
# the warm start: fit(init=a fitted model)
# ---------------------------------------------------------------------------

def _global_model(n_iterations=5, **kw):
    base = dict(inner_steps=K, inner_lr=0.3, learn_inner_lr="scalar", l2=0.01, learn_l2=True, meta_batch_size=8,
                meta_lr=1e-2, n_iterations=n_iterations, progress=False)
    base.update(kw)
    return fastmaml.MAML(**base).fit(grouped_sampler(seed=2)[0])


def test_warm_started_policy_starts_at_the_fitted_global_setting():
    """Before any iteration the policy is the fitted global model: its theta, intercepts at its learned step
    (one per step) and L2, slopes 0; so every task adapts exactly as with the global model."""
    glob = _global_model()
    warm = policy_maml(n_iterations=0, learn_init=False).fit(grouped_sampler(seed=3)[0], init=glob)
    assert np.array_equal(warm.theta_, glob.theta_)
    assert np.array_equal(warm._params[P.LR_INTERCEPT], np.full(K, np.log(glob.inner_lr_for(K))))
    assert float(warm._params[P.L2_INTERCEPT]) == np.log(glob.l2_)
    assert not warm._params[P.LR_SLOPE].any() and not warm._params[P.L2_SLOPE].any()
    tasks = ragged_tasks(d=5, seed=4)
    assert_rel(warm.adapt_tasks(tasks), glob.adapt_tasks(tasks), RTOL_F64)
    assert glob.theta_ is not warm.theta_ and glob.n_iter_ == 5  # the start is copied, not changed


def test_warm_start_with_learn_init_false_learns_only_the_hyperparameters():
    """learn_init=False keeps init's theta bitwise while the slopes (from the first iteration) move."""
    glob = _global_model()
    warm = policy_maml(n_iterations=6, learn_init=False).fit(grouped_sampler(seed=3)[0], init=glob)
    assert np.array_equal(warm.theta_, glob.theta_)
    assert np.abs(warm._params[P.LR_SLOPE]).max() > 0
    joint = policy_maml(n_iterations=6).fit(grouped_sampler(seed=3)[0], init=glob)
    assert not np.array_equal(joint.theta_, glob.theta_)


@pytest.mark.parametrize("mode", ["scalar", "per_step", "per_parameter"])
def test_warm_start_of_a_global_learner_starts_from_inits_learned_values(mode):
    """Without a policy: theta and, for what the model learns, init's values broadcast to its shape; a fixed
    step size stays the model's own."""
    glob = _global_model()
    model = fastmaml.MAML(inner_steps=K, inner_lr=0.05, learn_inner_lr=mode, l2=0.5, learn_l2=True, n_iterations=0,
                          progress=False).fit(grouped_sampler(seed=3)[0], init=glob)
    assert np.array_equal(model.theta_, glob.theta_)
    lr = np.broadcast_to(model.inner_lr_for(K), model._params["log_inner_lr"].shape)
    assert np.allclose(lr, glob.inner_lr_for(K), rtol=1e-15) and np.isclose(model.l2_, glob.l2_, rtol=1e-15)
    fixed = fastmaml.MAML(inner_steps=K, inner_lr=0.05, n_iterations=0, progress=False).fit(
        grouped_sampler(seed=3)[0], init=glob)
    assert fixed.inner_lr_for(K) == 0.05 and fixed.l2_ == 0.0 and np.array_equal(fixed.theta_, glob.theta_)


def test_warm_started_fit_saves_loads_and_resumes_bitwise(tmp_path):
    """A warm-started fit stopped at 3 of 8 and resumed from its checkpoint (no init: the checkpoint holds the
    start) equals the straight run; the fitted model round-trips through save/load."""
    glob = _global_model()
    full = policy_maml(n_iterations=8, learn_init=False).fit(grouped_sampler(seed=6)[0], init=glob)
    ck = str(tmp_path / "ck.npz")
    policy_maml(n_iterations=8, learn_init=False, checkpoint_path=ck,
                callbacks=[lambda m, r: r["iteration"] == 3]).fit(grouped_sampler(seed=6)[0], init=glob)
    resumed = policy_maml(n_iterations=8, learn_init=False, checkpoint_path=ck).fit(
        grouped_sampler(seed=99, data_seed=6)[0], resume=True)
    for key in full._params:
        assert np.array_equal(full._params[key], resumed._params[key]), key
    for key in full._opt.m:
        assert np.array_equal(full._opt.m[key], resumed._opt.m[key]), key
    full.save(tmp_path / "m.npz")
    loaded = fastmaml.MAML.load(tmp_path / "m.npz")
    for key in full._params:
        assert np.array_equal(full._params[key], loaded._params[key]), key
    assert loaded.get_params()["learn_init"] is False


def test_bad_warm_starts_are_named(tmp_path):
    glob = _global_model()
    sampler = grouped_sampler(seed=3)[0]
    with pytest.raises(TypeError, match=r"init: expected a fitted fastmaml.MAML"):
        policy_maml().fit(sampler, init=glob.theta_)
    with pytest.raises(ValueError, match=r"init: the model is not fitted"):
        policy_maml().fit(sampler, init=fastmaml.MAML())
    with pytest.raises(ValueError, match=r"init: the model was fitted on 5 features"):
        policy_maml().fit(grouped_sampler(seed=3, d=4)[0], init=glob)
    with pytest.raises(ValueError, match=r"init: a resumed fit"):
        policy_maml(checkpoint_path=str(tmp_path / "ck.npz")).fit(sampler, init=glob, resume=True)
    no_l2 = _global_model(learn_l2=False, l2=0.0)
    with pytest.raises(ValueError, match=r"init: the model's l2 is 0.0"):
        policy_maml().fit(sampler, init=no_l2)
    per_param = _global_model(learn_inner_lr="per_parameter")
    with pytest.raises(ValueError, match=r"init: the model's step size has shape \(6,\)"):
        policy_maml().fit(sampler, init=per_param)
    per_step = _global_model(learn_inner_lr="per_step")
    with pytest.raises(ValueError, match=r"init: inner_steps: .*3 steps"):
        policy_maml(inner_steps=4).fit(sampler, init=per_step)
    with pytest.raises(ValueError, match=r"init: .*preconditioner"):
        fastmaml.MAML(learn_inner_lr="preconditioner", inner_steps=K, progress=False).fit(sampler, init=glob)
