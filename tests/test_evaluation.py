"""Tests for fastmaml.evaluation: scores, intervals, paired comparisons and baselines on user tasks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import fastmaml
from fastmaml import MAML, GroupedSampler, make_grouped_tasks, split_groups
from fastmaml.evaluation import (
    accuracy,
    adaptation_accuracy,
    choose_C_on_validation,
    choose_inner_lr,
    grid_search_logistic_regression,
    log_loss,
    mean_ci,
    paired_difference,
    pretrained_start,
    query_logits,
    query_scores,
    random_search,
)


@pytest.fixture(scope="module")
def family():
    X, y, groups = make_grouped_tasks(n_groups=60, n_per_group=(20, 40), n_features=6, random_state=3)
    train_g, val_g, test_g = split_groups(groups, fractions=(0.5, 0.25, 0.25), random_state=3)
    return X, y, groups, train_g, val_g, test_g


def _tasks(family, which, seed=0, support=6):
    X, y, groups, train_g, val_g, test_g = family
    subset = {"train": train_g, "val": val_g, "test": test_g}[which]
    return GroupedSampler(X, y, groups, support_size=support, groups_subset=subset, random_state=seed)


# --------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------


def test_accuracy_of_binary_and_multinomial_logits():
    # z = 0.5 predicts class 1 (label 0: wrong); z = -1 predicts 0 (label 1: wrong)
    assert accuracy([2.0, -1.0, 0.5], [1, 1, 0]) == pytest.approx(1 / 3)
    assert accuracy([2.0, -1.0, -0.5], [1, 0, 0]) == 1.0
    assert accuracy([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], [1, 2]) == 0.5


def test_log_loss_matches_the_definition_and_is_stable_for_huge_logits():
    z = np.array([2.0, -1.0, 0.5])
    y = np.array([1, 1, 0])
    p = 1 / (1 + np.exp(-z))
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert_allclose(log_loss(z, y), expected, rtol=1e-14)
    Z = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.5]])
    yc = np.array([1, 2])
    P = np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True)
    assert_allclose(log_loss(Z, yc), -np.mean(np.log(P[[0, 1], yc])), rtol=1e-14)
    # a confident right answer costs ~0, a confident wrong one costs |z|, never inf or NaN
    assert log_loss([1000.0], [1]) == 0.0
    assert_allclose(log_loss([-1000.0], [1]), 1000.0)
    assert_allclose(log_loss([[1000.0, -1000.0]], [1]), 2000.0)


def test_scores_reject_labels_that_do_not_fit_the_logits():
    with pytest.raises(ValueError, match="y"):
        accuracy([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        log_loss(np.zeros((2, 3)), [0, 3])
    with pytest.raises(TypeError, match="y"):
        accuracy([0.1], [0.5])


def test_query_scores_are_per_task_means_on_ragged_tasks(family):
    tasks = _tasks(family, "test").tasks_for()
    assert len(set(np.diff(tasks.query.ptr))) > 1  # ragged: a pooled mean would differ
    rng = np.random.default_rng(0)
    params = rng.normal(size=(tasks.n_tasks, tasks.n_features + 1))
    scores = query_scores(params, tasks)
    for t in range(tasks.n_tasks):
        _, _, Xq, yq = tasks.task(t)
        z = Xq @ params[t, :-1] + params[t, -1]
        assert_allclose(scores["accuracy"][t], accuracy(z, yq), rtol=1e-14)
        assert_allclose(scores["loss"][t], log_loss(z, yq), rtol=1e-12)
    z, y, ptr = query_logits(params, tasks)
    assert z.shape == y.shape == (tasks.query.ptr[-1],)
    assert_array_equal(ptr, tasks.query.ptr)


def test_query_scores_of_multinomial_parameters():
    rng = np.random.default_rng(1)
    Xs, Xq = rng.random((3, 6, 4)), rng.random((3, 9, 4))
    ys, yq = rng.integers(0, 3, (3, 6)), rng.integers(0, 3, (3, 9))
    tasks = fastmaml.Tasks(Xs, ys, Xq, yq)
    params = rng.normal(size=(3, 5, 3))
    scores = query_scores(params, tasks)
    for t in range(3):
        Z = Xq[t] @ params[t, :-1] + params[t, -1]
        assert_allclose(scores["accuracy"][t], np.mean(np.argmax(Z, axis=1) == yq[t]), rtol=1e-14)
        assert_allclose(scores["loss"][t], log_loss(Z, yq[t]), rtol=1e-12)


def test_adaptation_accuracy_of_a_theta_and_of_a_fitted_model(family):
    tasks = _tasks(family, "val").tasks_for()
    theta = np.zeros(tasks.n_features + 1)
    final = adaptation_accuracy(theta, tasks, inner_lr=0.5, inner_steps=4)
    phi = fastmaml.adapt(theta, tasks, inner_lr=0.5, inner_steps=4)
    assert_array_equal(final, query_scores(phi, tasks)["accuracy"])
    path = adaptation_accuracy(theta, tasks, inner_lr=0.5, inner_steps=4, return_path=True)
    assert path.shape == (5, tasks.n_tasks)
    assert_array_equal(path[-1], final)
    assert_allclose(path[0], query_scores(np.zeros((tasks.n_tasks, tasks.n_features + 1)), tasks)["accuracy"])
    # an inner loop that diverges scores 0 instead of raising (logistic gradients are bounded, so
    # it takes the L2 term: each step multiplies w by 1 - inner_lr * l2)
    with pytest.raises(fastmaml.DivergenceError):
        fastmaml.adapt(theta, tasks, inner_lr=1e200, inner_steps=3, l2=1.0)
    assert_array_equal(adaptation_accuracy(theta, tasks, inner_lr=1e200, inner_steps=3, l2=1.0), 0.0)
    assert_array_equal(adaptation_accuracy(theta, tasks, inner_lr=1e200, inner_steps=3, l2=1.0, return_path=True),
                       np.zeros((4, tasks.n_tasks)))

    model = MAML(inner_steps=3, inner_lr=0.3, meta_lr=0.05, meta_batch_size=8, n_iterations=5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(_tasks(family, "train", 1))
    by_model = adaptation_accuracy(model, tasks, return_path=True)
    assert by_model.shape == (4, tasks.n_tasks)
    assert_array_equal(by_model[-1], query_scores(model.adapt_tasks(tasks), tasks)["accuracy"])
    with pytest.raises(ValueError, match="inner_lr"):
        adaptation_accuracy(model, tasks, inner_lr=0.1)
    with pytest.raises(ValueError, match="inner_lr"):
        adaptation_accuracy(theta, tasks, inner_steps=3)


# --------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------


def test_mean_ci_is_the_normal_95_percent_half_width():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert_allclose(half, 1.96 * math.sqrt(5 / 3) / 2, rtol=1e-15)
    m1, h1 = mean_ci([0.7])
    assert m1 == 0.7 and math.isnan(h1)


def test_paired_difference_pairs_tasks():
    a = np.array([0.9, 0.8, 0.7, 0.6])
    b = np.array([0.8, 0.8, 0.6, 0.5])
    d = paired_difference(a, b)
    diff = a - b
    assert_allclose(d["mean"], diff.mean(), rtol=1e-15)
    assert_allclose(d["ci95"], 1.96 * diff.std(ddof=1) / 2, rtol=1e-15)
    # pairing: the same shift on very different tasks is certain, unlike two separate intervals
    tasks = np.linspace(0.1, 0.9, 50)
    d = paired_difference(tasks + 0.01, tasks)
    assert d["ci95"] < 1e-12 and d["mean"] > 0.0099
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------


def test_choose_inner_lr_picks_the_best_of_the_grid_on_validation(family):
    val = [_tasks(family, "val", 1).sample(20), _tasks(family, "val", 2).sample(20)]
    zero = np.zeros(val[0].n_features + 1)
    grid = (0.01, 0.3, 1e200)  # 1e200 with l2 = 0.01 diverges: scores 0
    best, scores = choose_inner_lr(zero, val, grid, inner_steps=3, l2=0.01)
    for lr in grid:
        manual = np.concatenate([adaptation_accuracy(zero, v, inner_lr=lr, inner_steps=3, l2=0.01) for v in val])
        assert_allclose(scores[lr], manual.mean(), rtol=1e-15)
    assert scores[1e200] == 0.0
    assert best == max(grid, key=lambda lr: scores[lr]) and best != 1e200
    # one start per validation set (a start trained per fold)
    best2, scores2 = choose_inner_lr([zero, zero], val, grid, inner_steps=3, l2=0.01)
    assert best2 == best and scores2 == scores
    with pytest.raises(ValueError, match="one theta per validation set"):
        choose_inner_lr([zero], val, grid, inner_steps=3, l2=0.01)


def test_pretrained_start_is_zero_step_maml_and_fits_the_pool(family):
    train = _tasks(family, "train", 4).tasks_for()
    kw = dict(n_iterations=40, meta_lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theta = pretrained_start(train, **kw)
        same = MAML(inner_steps=0, progress=False, **kw).fit(train).theta_
    assert_array_equal(theta, same)
    loss = fastmaml.meta_value_and_grad(theta, train, inner_lr=0.1, inner_steps=0).loss
    loss0 = fastmaml.meta_value_and_grad(np.zeros_like(theta), train, inner_lr=0.1, inner_steps=0).loss
    assert loss < loss0 - 0.05
    with pytest.raises(TypeError, match="inner_steps"):
        pretrained_start(train, inner_steps=3)


def test_grid_search_chooses_C_by_cv_and_reports_what_it_chose(family):
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    tasks = _tasks(family, "test", 5, support=10).sample(6)
    grid = (0.01, 1.0, 100.0)
    res = grid_search_logistic_regression(tasks, grid, random_state=0)
    assert res.accuracy.shape == res.oracle_accuracy.shape == res.C.shape == (6,)
    assert np.all(res.oracle_accuracy >= res.accuracy)
    assert set(res.C) <= set(grid) and res.seconds_per_task > 0
    for t in range(tasks.n_tasks):
        Xs, ys, Xq, yq = tasks.task(t)
        if np.unique(ys).size < 2:
            continue
        clf = LogisticRegression(C=res.C[t], max_iter=1000).fit(Xs, ys)
        assert abs(np.mean(clf.predict(Xq) == yq) - res.accuracy[t]) <= 1 / yq.size + 1e-12
    fixed = grid_search_logistic_regression(tasks, grid, fixed_C=100.0)
    assert_array_equal(fixed.C, 100.0)
    with pytest.raises(ValueError, match="fixed_C"):
        grid_search_logistic_regression(tasks, grid, fixed_C=3.0)
    C, per_C = choose_C_on_validation([tasks], grid)
    assert C == grid[int(np.argmax(per_C))] and per_C.shape == (3,)


def test_random_search_is_reproducible_respects_the_budget_and_reports_the_best(family):
    val = [_tasks(family, "val", 3).sample(15)]
    zero = np.zeros(val[0].n_features + 1)
    kw = dict(budget=15 * 30, max_configs=50, inner_steps_range=(1, 6), random_state=7)
    res = random_search(zero, val, **kw)
    assert res == random_search(zero, val, **kw)
    assert res.spent >= 15 * 30 or res.configs_tried == 50
    assert res.spent < 15 * 30 + 15 * 6  # it stops as soon as the budget is spent
    assert 1 <= res.inner_steps <= 6 and 1e-3 <= res.inner_lr <= 10
    again = np.mean(adaptation_accuracy(zero, val[0], inner_lr=res.inner_lr, inner_steps=res.inner_steps, l2=res.l2))
    assert_allclose(res.accuracy, again, rtol=1e-15)
    # one configuration: the first draw of the stream, in the documented order
    one = random_search(zero, val, **dict(kw, max_configs=1))
    rng = np.random.default_rng(7)
    lr = 10 ** rng.uniform(-3, 1)
    l2 = 10 ** rng.uniform(-5, 0) if rng.random() < 0.5 else 0.0
    steps = int(rng.integers(1, 7))
    assert (one.inner_lr, one.l2, one.inner_steps, one.configs_tried) == (lr, l2, steps, 1)
    assert res.accuracy >= one.accuracy
