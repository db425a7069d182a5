"""Intervals over groups of tasks and the selection rule that uses them (issue 15: the all-pairs sweep).

A digit-pair meta-learner's gain depends on which two digits a task holds, so validation episodes of one pair
are not independent evidence that it helps on a new pair: the interval must be over pairs (groups).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fastmaml.evaluation import Z95, _t95, mean_ci, paired_difference, select_candidate


# ------------------------------------------------------------------ Student's t quantile
@pytest.mark.parametrize("df, exact", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (30, 2.0423), (31, 2.0395),
                                       (40, 2.0211), (60, 2.0003), (120, 1.9799), (10000, 1.9602)])
def test_t95_matches_the_exact_student_quantile(df, exact):
    assert _t95(df) == pytest.approx(exact, abs=1e-3)


def test_t95_shrinks_towards_the_normal_quantile_and_refuses_no_degrees_of_freedom():
    values = [_t95(df) for df in range(1, 200)]
    assert all(a > b for a, b in zip(values, values[1:]))  # fewer groups: a wider interval, always
    assert values[-1] > Z95
    with pytest.raises(ValueError, match="df"):
        _t95(0)


# ------------------------------------------------------------------ the grouped interval
def test_grouped_interval_of_equal_groups_is_the_interval_of_the_group_means():
    # with equal group sizes the cluster-robust variance is exactly var(group means, ddof=1) / G
    rng = np.random.default_rng(0)
    G, m = 7, 9
    values = rng.normal(size=G * m) + np.repeat(rng.normal(size=G), m)
    groups = np.repeat(np.arange(G), m)
    order = rng.permutation(G * m)  # the order of the tasks does not matter
    mean, half = mean_ci(values[order], groups[order])
    group_means = values.reshape(G, m).mean(axis=1)
    assert mean == pytest.approx(values.mean(), abs=1e-12)
    assert half == pytest.approx(_t95(G - 1) * group_means.std(ddof=1) / math.sqrt(G), rel=1e-12)


def test_grouped_interval_with_one_task_per_group_is_the_task_interval_with_t_for_z():
    values = np.random.default_rng(1).random(12)
    _, plain = mean_ci(values)
    _, grouped = mean_ci(values, np.arange(12))
    assert grouped == pytest.approx(plain * _t95(11) / Z95, rel=1e-12)


def test_grouped_interval_counts_groups_not_tasks():
    # 3 groups of very different means: 300 tasks do not make the interval narrow, 3 groups say little
    values = np.concatenate([np.full(100, 0.0), np.full(100, 0.1), np.full(100, 0.2)])
    values += 1e-3 * np.random.default_rng(2).standard_normal(300)
    groups = np.repeat(["a", "b", "c"], 100)
    _, per_task = mean_ci(values)
    _, per_group = mean_ci(values, groups)
    assert per_group > 20 * per_task
    assert per_group == pytest.approx(_t95(2) * 0.1 / math.sqrt(3), rel=2e-2)


def test_a_single_group_supports_no_interval():
    mean, half = mean_ci([0.1, 0.2, 0.3, 0.4], ["pair 2,4"] * 4)
    assert mean == pytest.approx(0.25) and math.isnan(half)


def test_two_column_group_labels_are_one_label_per_row():
    values = np.array([1.0, 2.0, 3.0, 5.0])
    by_rows = mean_ci(values, np.array([[2, 4], [2, 4], [4, 6], [4, 6]]))
    by_ids = mean_ci(values, [0, 0, 1, 1])
    assert by_rows == by_ids
    assert paired_difference(values, np.zeros(4), groups=[[2, 4], [2, 4], [4, 6], [4, 6]])["n_groups"] == 2


def test_grouped_interval_errors_name_the_argument():
    with pytest.raises(ValueError, match="groups"):
        mean_ci([1.0, 2.0, 3.0], [0, 1])
    with pytest.raises(ValueError, match="groups"):
        paired_difference([1.0, 2.0], [0.0, 1.0], groups=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="groups"):
        select_candidate({"a": [1.0, 0.0], "b": [1.0, 1.0]}, ["a", "b"], groups=[0, 1, 2])


def test_without_groups_paired_difference_is_unchanged():
    a, b = np.array([0.5, 0.7, 0.9]), np.array([0.4, 0.7, 0.6])
    d = paired_difference(a, b)
    assert set(d) == {"mean", "ci95"}
    assert d["ci95"] == pytest.approx(Z95 * np.std(a - b, ddof=1) / math.sqrt(3))


# ------------------------------------------------------------------ the selection rule with groups
def _one_pair_win(rng, n_groups=6, per_group=20, gain=0.15, noise=0.01):
    """Per-episode validation scores where 'precond' beats 'zero' by `gain` on group 0 and ties elsewhere."""
    groups = np.repeat(np.arange(n_groups), per_group)
    base = 0.5 + 0.3 * rng.random(groups.size)
    zero = base
    precond = base + np.where(groups == 0, gain, 0.0) + noise * rng.standard_normal(groups.size)
    return {"zero": zero, "precond": precond}, groups


def test_a_win_on_one_validation_pair_is_clear_per_episode_but_not_per_pair():
    scores, groups = _one_pair_win(np.random.default_rng(3))
    # per episode, the one pair's 15 points look like a clear win (what picked the preconditioner for 5 vs 7)
    assert select_candidate(scores, ["zero", "precond"])[0] == "precond"
    chosen, details = select_candidate(scores, ["zero", "precond"], groups=groups)
    assert chosen == "zero"
    assert details["beaten_by"]["zero"] == [] and details["n_groups"] == 6


def test_a_win_on_every_validation_pair_is_still_selected():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(6), 20)
    zero = 0.5 + 0.3 * rng.random(groups.size)
    pair_gain = 0.04 + 0.01 * rng.random(6)  # different sizes, the same sign on every pair
    precond = zero + pair_gain[groups] + 0.02 * rng.standard_normal(groups.size)
    chosen, details = select_candidate({"zero": zero, "precond": precond}, ["zero", "precond"], groups=groups)
    assert chosen == "precond" and details["beaten_by"]["zero"] == ["precond"]


def test_one_validation_group_keeps_the_simplest_candidate_whatever_the_scores():
    rng = np.random.default_rng(5)
    zero = 0.5 + 0.1 * rng.random(50)
    scores = {"zero": zero, "precond": zero + 0.3}
    assert select_candidate(scores, ["zero", "precond"])[0] == "precond"
    assert select_candidate(scores, ["zero", "precond"], groups=np.zeros(50))[0] == "zero"


def test_grouped_selection_matches_the_grouped_paired_interval():
    scores, groups = _one_pair_win(np.random.default_rng(6), n_groups=12, gain=0.5)
    d = paired_difference(scores["precond"], scores["zero"], groups=groups)
    chosen, _ = select_candidate(scores, ["zero", "precond"], groups=groups)
    assert chosen == ("precond" if d["mean"] - d["ci95"] > 0 else "zero")
    assert_allclose(d["mean"], scores["precond"].mean() - scores["zero"].mean(), rtol=1e-12)
