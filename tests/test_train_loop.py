"""The compiled training loop of MAML.fit (csrc/fastmaml/train.hpp, docs/design.md section 3).

MAML and first-order MAML meta-iterations run in blocks inside one compiled
call that draws the batches itself. The tests prove that this changes nothing
a user can see: the loop that draws every batch in Python (the samplers'
``sample``) and hands it to the compiled step gives bitwise the same
history_, parameters, checkpoints and resumed runs, for every learned
hyperparameter option; the step itself matches a NumPy Adam written from the
formulas; Ctrl-C in the middle of a block keeps every finished iteration.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from fastmaml import MAML, EpisodeSampler, GroupedSampler, _core, make_grouped_tasks
from fastmaml import estimator as est
from fastmaml import functional as F
from fastmaml.checkpoint import read as read_checkpoint
from fastmaml.optim import SGD, Adam
from tolerances import assert_rel

LEARNED = [None, "scalar", "per_step", "per_parameter", "per_step_parameter", "preconditioner"]


def _data(dtype=np.float32, n=300, d=10, n_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d)).astype(dtype), rng.integers(0, n_classes, n)


def _episodes(n_way=2, seed=3, **kw):
    X, y = _data(**kw)
    return EpisodeSampler(X, y, n_way=n_way, k_shot=3, n_query=4, random_state=seed)


def _grouped(seed=4, dtype=np.float64):
    X, y, groups = make_grouped_tasks(n_groups=20, n_per_group=12, n_features=6, random_state=0)
    return GroupedSampler(X.astype(dtype), y, groups, support_size=4, random_state=seed)


def _history(model):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in model.history_]


def _fit(make_source, compiled, monkeypatch, fit_kw=None, **params):
    monkeypatch.setattr(est, "_COMPILED_DRAWS", compiled)
    params.setdefault("progress", False)
    params.setdefault("meta_batch_size", 6)
    params.setdefault("n_iterations", 9)
    return MAML(**params).fit(make_source(), **(fit_kw or {}))


def _assert_same_run(a, b):
    assert _history(a) == _history(b)
    assert a.n_iter_ == b.n_iter_
    assert sorted(a._params) == sorted(b._params)
    for key in a._params:
        assert_array_equal(a._params[key], b._params[key], err_msg=key)
    for key in a._opt.m:
        assert_array_equal(a._opt.m[key], b._opt.m[key], err_msg=key)
        assert_array_equal(a._opt.v[key], b._opt.v[key], err_msg=key)


def _options(learn, algorithm):
    kw = dict(learn_inner_lr=learn, algorithm=algorithm, inner_lr=0.3, inner_steps=3, meta_lr=0.05)
    if learn == "preconditioner":
        kw["random_state"] = 0
    if learn in (None, "per_step"):
        kw.update(l2=0.05, learn_l2=True)
    return kw


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
@pytest.mark.parametrize("learn", LEARNED)
@pytest.mark.parametrize("n_way", [2, 3])
def test_compiled_draws_equal_python_draws_episodes(learn, algorithm, n_way, monkeypatch):
    """EpisodeSampler: batches drawn by the compiled loop are the ones sample() draws; every bit agrees."""
    kw = _options(learn, algorithm)
    a = _fit(lambda: _episodes(n_way), True, monkeypatch, **kw)
    b = _fit(lambda: _episodes(n_way), False, monkeypatch, **kw)
    _assert_same_run(a, b)
    assert a.history_[-1]["loss"] != a.history_[0]["loss"]  # it trained


@pytest.mark.parametrize("options", [dict(random_labels=False), dict(kernel_budget=10**7)])
def test_compiled_draws_equal_python_draws_episode_options(options, monkeypatch):
    """Sorted labels (random_labels=False) and the dataset kernel (Gram path) are drawn alike too."""
    X, y = _data(np.float64)
    make = lambda: EpisodeSampler(X, y, n_way=3, k_shot=3, n_query=4, random_state=3, **options)
    kw = _options("per_step", "maml")
    a = _fit(make, True, monkeypatch, **kw)
    b = _fit(make, False, monkeypatch, **kw)
    _assert_same_run(a, b)
    assert a.history_[-1]["loss"] != a.history_[0]["loss"]  # it trained


@pytest.mark.parametrize("learn", LEARNED)
def test_compiled_draws_equal_python_draws_grouped(learn, monkeypatch):
    """GroupedSampler: the compiled split (stable sort by uniform keys) is numpy.lexsort's; every bit agrees."""
    kw = _options(learn, "maml")
    a = _fit(_grouped, True, monkeypatch, **kw)
    b = _fit(_grouped, False, monkeypatch, **kw)
    _assert_same_run(a, b)


def test_sampler_state_and_attributes_after_compiled_block(monkeypatch):
    """After fit, the sampler's Generator and its last-batch attributes are where sample() would leave them."""
    sa, sb = _episodes(3), _episodes(3)
    monkeypatch.setattr(est, "_COMPILED_DRAWS", True)
    MAML(n_iterations=5, meta_batch_size=4, progress=False).fit(sa)
    monkeypatch.setattr(est, "_COMPILED_DRAWS", False)
    MAML(n_iterations=5, meta_batch_size=4, progress=False).fit(sb)
    assert sa.get_state() == sb.get_state()
    assert_array_equal(sa.episode_classes, sb.episode_classes)
    ga, gb = _grouped(), _grouped()
    monkeypatch.setattr(est, "_COMPILED_DRAWS", True)
    MAML(n_iterations=5, meta_batch_size=4, progress=False).fit(ga)
    monkeypatch.setattr(est, "_COMPILED_DRAWS", False)
    MAML(n_iterations=5, meta_batch_size=4, progress=False).fit(gb)
    assert ga.get_state() == gb.get_state()
    assert_array_equal(ga.task_groups, gb.task_groups)


@pytest.mark.parametrize("learn", ["per_step_parameter", "preconditioner"])
def test_tasks_pool_blocks_equal_single_iterations(learn, monkeypatch):
    """A Tasks pool in one block gives what one iteration per call (callbacks) gives."""
    pool = _episodes(dtype=np.float64).sample(8)
    kw = _options(learn, "maml")
    a = _fit(lambda: pool, True, monkeypatch, **kw)
    b = _fit(lambda: pool, True, monkeypatch, callbacks=[lambda model, record: False], **kw)
    _assert_same_run(a, b)


def _numpy_adam(params, grads, state, lr=0.05, b1=0.9, b2=0.999, eps=1e-8):
    state["t"] += 1
    t = state["t"]
    for k, g in grads.items():
        m = state.setdefault("m." + k, np.zeros_like(g))
        v = state.setdefault("v." + k, np.zeros_like(g))
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        params[k] = params[k] - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


@pytest.mark.parametrize("learn", ["per_step_parameter", "preconditioner"])
def test_compiled_step_matches_numpy_formulas(learn):
    """Chain rule of the log-hyperparameters and Adam, against NumPy written from the formulas (float64)."""
    pool = _episodes(dtype=np.float64).sample(8)
    n_iter, K = 6, 3
    model = MAML(n_iterations=n_iter, progress=False, **dict(_options(learn, "maml"), l2=0.05, learn_l2=True)).fit(pool)
    D = pool.n_features + 1
    params = {"theta": np.zeros(D), "log_l2": np.array(np.log(0.05))}
    if learn == "preconditioner":
        params["log_scale"] = np.full(D, np.log(0.3))
        params["U"] = 1e-3 * np.random.default_rng(0).standard_normal((D, 4))
    else:
        params["log_inner_lr"] = np.full((K, D), np.log(0.3))
    state = {"t": 0}
    for _ in range(n_iter):
        l2 = float(np.exp(params["log_l2"]))
        if learn == "preconditioner":
            r = F.precond_value_and_grad(params["theta"], pool, log_scale=params["log_scale"], U=params["U"],
                                         inner_steps=K, l2=l2)
            grads = {"theta": r.grad, "log_scale": r.grad_log_scale, "U": r.grad_U}
        else:
            lr = np.exp(params["log_inner_lr"])
            r = F.meta_value_and_grad(params["theta"], pool, inner_lr=lr, inner_steps=K, l2=l2)
            grads = {"theta": r.grad, "log_inner_lr": r.grad_inner_lr * lr}
        grads["log_l2"] = np.asarray(r.grad_l2 * l2)
        _numpy_adam(params, grads, state)
    for key in params:
        assert_rel(model._params[key], params[key], 1e-10)


def test_optimizer_step_matches_numpy_formulas():
    """Adam (bias-corrected, cosine schedule) and SGD of fastmaml.optim, against NumPy."""
    rng = np.random.default_rng(0)
    p = {"a": rng.standard_normal(5), "b": np.array(0.3)}
    want, state = {k: v.copy() for k, v in p.items()}, {"t": 0}
    opt = Adam(lr=0.05)
    for _ in range(4):
        g = {"a": rng.standard_normal(5), "b": np.array(rng.standard_normal())}
        opt.step(p, g)
        _numpy_adam(want, g, state)
    for k in p:
        assert_rel(p[k], want[k], 1e-14)
    sgd = SGD(lr=0.5, schedule="cosine", total_steps=4)
    x = {"a": np.ones(3)}
    sgd.step(x, {"a": np.ones(3)})
    sgd.step(x, {"a": np.ones(3)})
    # step sizes 0.5 * 0.5 * (1 + cos(0)) and 0.5 * 0.5 * (1 + cos(pi / 4))
    assert_rel(x["a"], np.full(3, 1 - 0.5 - 0.25 * (1 + np.cos(np.pi / 4))), 1e-15)
    assert sgd.current_lr() == pytest.approx(0.25 * (1 + np.cos(np.pi / 2)))


def test_validation_checkpoints_and_best_equal(tmp_path, monkeypatch):
    """validate_every / checkpoint_every / select: same history, best iterate and checkpoint files."""
    paths = []
    models = []
    for compiled in (True, False):
        path = tmp_path / f"ck{compiled}.npz"
        paths.append(path)
        val = _episodes(seed=9)
        models.append(_fit(_episodes, compiled, monkeypatch, fit_kw=dict(validation=val, val_episodes=10),
                           **_options("per_parameter", "maml"), n_iterations=11, validate_every=3,
                           checkpoint_every=4, checkpoint_path=str(path), select="best_loss"))
    a, b = models
    _assert_same_run(a, b)
    assert [r["iteration"] for r in a.history_ if "val_loss" in r] == [0, 3, 6, 9, 11]
    assert a.best_iteration_ == b.best_iteration_
    arrays_a, meta_a = read_checkpoint(str(paths[0]))
    arrays_b, meta_b = read_checkpoint(str(paths[1]))
    assert sorted(arrays_a) == sorted(arrays_b)
    for key in arrays_a:
        assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    assert meta_a["sampler_state"] == meta_b["sampler_state"]


def test_checkpoint_every_writes_at_block_ends(tmp_path, monkeypatch):
    """A checkpoint written at iteration 4 of a compiled run resumes to the uninterrupted result."""
    path = tmp_path / "ck.npz"
    kw = dict(_options("per_step", "fomaml"), checkpoint_path=str(path), checkpoint_every=4)
    full = _fit(_episodes, True, monkeypatch, n_iterations=10, **kw)
    _fit(_episodes, True, monkeypatch, n_iterations=4, **kw)
    sampler = _episodes()
    resumed = MAML(progress=False, meta_batch_size=6, n_iterations=10, **kw).fit(sampler, resume=True)
    _assert_same_run(full, resumed)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_thread_count_does_not_change_the_run(n_threads, monkeypatch):
    """Results of the compiled loop are bitwise independent of n_threads."""
    kw = _options("per_step_parameter", "maml")
    a = _fit(lambda: _episodes(3), True, monkeypatch, n_threads=n_threads, meta_batch_size=70, n_iterations=3, **kw)
    b = _fit(lambda: _episodes(3), True, monkeypatch, n_threads=3, meta_batch_size=70, n_iterations=3, **kw)
    _assert_same_run(a, b)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_inside_a_compiled_block_keeps_finished_iterations(monkeypatch):
    """SIGINT while the compiled loop runs: fit stops between iterations, keeping each finished one exactly."""
    make = lambda: _episodes(dtype=np.float64)
    installed = signal.getsignal(signal.SIGINT)

    def interrupt_when_fit_listens():
        deadline = time.time() + 30
        while signal.getsignal(signal.SIGINT) is installed and time.time() < deadline:
            time.sleep(0.001)
        time.sleep(0.2)  # well inside the block
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_when_fit_listens)
    thread.start()
    try:
        with pytest.warns(RuntimeWarning, match="interrupted after"):
            a = _fit(make, True, monkeypatch, n_iterations=10**7, **_options("scalar", "maml"))
    finally:
        thread.join()
    assert a.interrupted_
    assert 0 < a.n_iter_ < 10**7
    assert len(a.history_) == a.n_iter_
    b = _fit(make, True, monkeypatch, n_iterations=a.n_iter_, **_options("scalar", "maml"))
    assert _history(a) == _history(b)
    assert_array_equal(a.theta_, b.theta_)


def test_exception_in_a_block_keeps_finished_iterations():
    """An exception raised while a block runs (here by should_stop) propagates; the iterations done are reported."""
    pool = _episodes(dtype=np.float64).sample(4)
    params, m, v = {"theta": np.zeros(11)}, {"theta": np.zeros(11)}, {"theta": np.zeros(11)}
    records, progress = np.zeros((10**7, 5)), np.array([0, 0], dtype=np.int64)

    def should_stop():
        raise ZeroDivisionError("from should_stop")

    with pytest.raises(ZeroDivisionError, match="from should_stop"):
        _core.train_block(params, m, v, fixed_lr=np.array(0.1), lr_extent=(1, 1, 1), l2=0.0, learn_init=True,
                          n_classes=1, inner_steps=2, mode=_core.Mode.maml,
                          optimizer=(True, 1e-3, 0.9, 0.999, 1e-8, False, 1), t=0, n_iterations=10**7,
                          records=records, progress=progress, n_threads=1, support=pool.support.core(),
                          query=pool.query.core(), should_stop=should_stop)
    done = int(progress[0])
    assert 0 < done < 10**7 and progress[1] == done  # one optimizer step per finished iteration
    assert np.all(records[:done, 0] > 0) and np.all(records[done:, 0] == 0)
    assert np.any(params["theta"] != 0)


def test_train_block_checks_its_arrays():
    """The binding refuses parameter arrays it could not update in place, naming them."""
    pool = _episodes(dtype=np.float64).sample(2)
    args = dict(fixed_lr=np.array(0.1), lr_extent=(1, 1, 1), l2=0.0, learn_init=True, n_classes=1,
                inner_steps=1, mode=_core.Mode.maml, optimizer=(True, 1e-3, 0.9, 0.999, 1e-8, False, 1), t=0,
                n_iterations=1, records=np.zeros((1, 5)), progress=np.zeros(2, dtype=np.int64), n_threads=1,
                support=pool.support.core(), query=pool.query.core())
    with pytest.raises(TypeError, match=r"params\[theta\]: expected a float64 array"):
        _core.train_block({"theta": np.zeros(11, np.float32)}, {}, {}, **args)
    with pytest.raises(ValueError, match=r"m, v: Adam needs moments for 'theta'"):
        _core.train_block({"theta": np.zeros(11)}, {}, {}, **args)
    with pytest.raises(ValueError, match=r"theta: expected 11 rows"):
        _core.train_block({"theta": np.zeros(5)}, {"theta": np.zeros(5)}, {"theta": np.zeros(5)}, **args)
