"""Tests for fastmaml.samplers (episode and grouped task samplers) and fastmaml._random."""

import json
from collections import Counter

import numpy as np
import pytest

import fastmaml
from fastmaml._random import sample_without_replacement
from fastmaml.datasets import make_grouped_tasks
from fastmaml.samplers import EpisodeSampler, GroupedSampler
from fastmaml.splits import split_rows


@pytest.fixture(scope="module")
def data():
    """10 classes (ids 0..9, 40..112 rows each, shuffled), 6 features."""
    rng = np.random.default_rng(123)
    sizes = np.arange(40, 113, 8)
    y = rng.permutation(np.repeat(np.arange(10), sizes))
    X = rng.random((y.size, 6))
    return X, y


def _support_query(tasks):
    T = tasks.n_tasks
    s_idx = tasks.support.idx.reshape(T, -1)
    q_idx = tasks.query.idx.reshape(T, -1)
    s_y = tasks.support.y.reshape(T, -1)
    q_y = tasks.query.y.reshape(T, -1)
    return s_idx, s_y, q_idx, q_y


# --------------------------------------------------------------------------
# EpisodeSampler
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n_way,k_shot,n_query", [(2, 5, 15), (3, 1, 2), (5, 10, 20)])
def test_episode_class_balance_and_disjoint(data, n_way, k_shot, n_query):
    X, y = data
    s = EpisodeSampler(X, y, n_way=n_way, k_shot=k_shot, n_query=n_query, random_state=0)
    tasks = s.sample(40)
    assert isinstance(tasks, fastmaml.Tasks) and tasks.is_indexed and not tasks.is_ragged
    assert tasks.n_tasks == 40
    s_idx, s_y, q_idx, q_y = _support_query(tasks)
    assert s_idx.shape == (40, n_way * k_shot) and q_idx.shape == (40, n_way * n_query)
    assert s.episode_classes.shape == (40, n_way)
    for t in range(40):
        assert np.array_equal(np.bincount(s_y[t], minlength=n_way), np.full(n_way, k_shot))
        assert np.array_equal(np.bincount(q_y[t], minlength=n_way), np.full(n_way, n_query))
        rows = np.concatenate([s_idx[t], q_idx[t]])
        assert np.unique(rows).size == rows.size  # no replacement, support/query disjoint
        assert np.unique(s.episode_classes[t]).size == n_way  # distinct classes
        # label j of episode t stands for class episode_classes[t, j]
        assert np.array_equal(y[s_idx[t]], s.episode_classes[t][s_y[t]])
        assert np.array_equal(y[q_idx[t]], s.episode_classes[t][q_y[t]])


def test_episode_shares_X_without_copy(data):
    X, y = data
    s = EpisodeSampler(X, y, random_state=0)
    assert s.X is X
    tasks = s.sample(3)
    assert tasks.support.X is X and tasks.query.X is X
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    t32 = EpisodeSampler(X32, y, random_state=0).sample(2)
    assert t32.dtype == np.float32 and t32.support.X is X32


def test_episode_rows_restricted(data):
    X, y = data
    rows = np.random.default_rng(1).permutation(y.size)[: y.size // 2]
    s = EpisodeSampler(X, y, k_shot=3, n_query=4, rows=rows, random_state=0)
    s_idx, _, q_idx, _ = _support_query(s.sample(200))
    assert np.isin(s_idx, rows).all() and np.isin(q_idx, rows).all()
    # a boolean mask means the same
    mask = np.zeros(y.size, bool)
    mask[rows] = True
    s2 = EpisodeSampler(X, y, k_shot=3, n_query=4, rows=mask, random_state=0)
    s_idx2, _, q_idx2, _ = _support_query(s2.sample(200))
    assert np.isin(s_idx2, rows).all() and np.isin(q_idx2, rows).all()


def test_episode_classes_restricted(data):
    X, y = data
    s = EpisodeSampler(X, y, n_way=3, classes=[7, 2, 5, 9], random_state=0)
    assert np.array_equal(s.classes, [2, 5, 7, 9])
    tasks = s.sample(300)
    assert np.isin(s.episode_classes, [2, 5, 7, 9]).all()
    assert set(np.unique(s.episode_classes)) == {2, 5, 7, 9}
    s_idx, _, q_idx, _ = _support_query(tasks)
    assert np.isin(y[s_idx], [2, 5, 7, 9]).all() and np.isin(y[q_idx], [2, 5, 7, 9]).all()


def test_episode_pairs(data):
    X, y = data
    pairs = [(1, 0), (4, 8), (3, 6)]
    s = EpisodeSampler(X, y, pairs=pairs, random_state=0)
    s.sample(300)
    got = Counter(tuple(sorted(p)) for p in s.episode_classes.tolist())
    assert set(got) == {(0, 1), (4, 8), (3, 6)}
    assert min(got.values()) > 60  # each pair picked about 100 times


def test_fixed_labels_sorted_by_class_id(data):
    X, y = data
    s = EpisodeSampler(X, y, n_way=3, random_labels=False, random_state=0)
    s.sample(100)
    assert (np.diff(s.episode_classes, axis=1) > 0).all()
    p = EpisodeSampler(X, y, pairs=[(3, 2)], random_labels=False, random_state=0)
    tasks = p.sample(50)
    assert (p.episode_classes == [2, 3]).all()
    s_idx, s_y, _, _ = _support_query(tasks)
    assert np.array_equal(y[s_idx] == 3, s_y == 1)  # 2 -> 0, 3 -> 1


def test_random_labels_both_assignments(data):
    X, y = data
    p = EpisodeSampler(X, y, pairs=[(2, 3)], random_labels=True, random_state=0)
    tasks = p.sample(200)
    orders = Counter(map(tuple, p.episode_classes.tolist()))
    assert set(orders) == {(2, 3), (3, 2)}
    assert min(orders.values()) > 60
    s_idx, s_y, _, _ = _support_query(tasks)
    assert np.array_equal(y[s_idx], p.episode_classes[np.arange(200)[:, None], s_y])
    s = EpisodeSampler(X, y, n_way=2, classes=[4, 7], random_state=0)
    s.sample(200)
    assert set(map(tuple, s.episode_classes.tolist())) == {(4, 7), (7, 4)}


def test_episode_reproducible_from_seed(data):
    X, y = data

    def draw(seed):
        s = EpisodeSampler(X, y, n_way=3, k_shot=2, n_query=3, random_state=seed)
        t = s.sample(10)
        return t.support.idx, t.query.idx, s.episode_classes

    a, b, c = draw(5), draw(5), draw(6)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    # a Generator is used in place
    g = np.random.default_rng(5)
    s = EpisodeSampler(X, y, n_way=3, k_shot=2, n_query=3, random_state=g)
    assert np.array_equal(s.sample(10).support.idx, a[0])


def test_episode_state_round_trip_json(data):
    X, y = data
    s = EpisodeSampler(X, y, k_shot=4, n_query=6, random_state=0)
    s.sample(7)
    state = json.loads(json.dumps(s.get_state()))
    first = [s.sample(9) for _ in range(3)]
    classes_first = s.episode_classes.copy()
    s.set_state(state)
    again = [s.sample(9) for _ in range(3)]
    for a, b in zip(first, again):
        assert np.array_equal(a.support.idx, b.support.idx) and np.array_equal(a.query.idx, b.query.idx)
    assert np.array_equal(classes_first, s.episode_classes)
    # resuming a checkpoint in a fresh sampler (other seed) gives the same stream
    fresh = EpisodeSampler(X, y, k_shot=4, n_query=6, random_state=99)
    fresh.set_state(state)
    assert np.array_equal(fresh.sample(9).support.idx, first[0].support.idx)


@pytest.mark.parametrize("bit_generator", [np.random.MT19937, np.random.Philox, np.random.SFC64])
def test_state_round_trip_other_bit_generators(data, bit_generator):
    X, y = data
    s = EpisodeSampler(X, y, random_state=np.random.Generator(bit_generator(3)))
    state = json.loads(json.dumps(s.get_state()))
    a = s.sample(5).support.idx
    fresh = EpisodeSampler(X, y, random_state=0)  # PCG64
    fresh.set_state(state)
    assert np.array_equal(fresh.sample(5).support.idx, a)


def test_set_state_rejects_garbage(data):
    X, y = data
    s = EpisodeSampler(X, y, random_state=0)
    with pytest.raises(ValueError, match="state"):
        s.set_state({"nope": 1})
    with pytest.raises(ValueError, match="state"):
        s.set_state({"bit_generator": "NotAGenerator", "state": {}})


def test_episode_validation_errors(data):
    X, y = data
    with pytest.raises(ValueError, match="k_shot"):
        EpisodeSampler(X, y, k_shot=0)
    with pytest.raises(ValueError, match="n_query"):
        EpisodeSampler(X, y, n_query=0)
    with pytest.raises(ValueError, match="n_way"):
        EpisodeSampler(X, y, n_way=1)
    with pytest.raises(ValueError, match="n_way"):
        EpisodeSampler(X, y, n_way=4, classes=[0, 1, 2])
    # class 0 has 40 rows: k_shot + n_query = 45 is too many; the message names it
    with pytest.raises(ValueError, match=r"k_shot.*class 0 has 40"):
        EpisodeSampler(X, y, k_shot=20, n_query=25)
    with pytest.raises(ValueError, match=r"class 11 has 0"):
        EpisodeSampler(X, y, classes=[1, 11])
    with pytest.raises(ValueError, match="rows"):
        EpisodeSampler(X, y, rows=[0, 1, y.size])
    with pytest.raises(ValueError, match="rows"):
        EpisodeSampler(X, y, rows=[0, 1, 1])
    with pytest.raises(ValueError, match="rows"):
        EpisodeSampler(X, y, rows=np.ones(3, bool))
    with pytest.raises(ValueError, match="pairs"):
        EpisodeSampler(X, y, classes=[0, 1], pairs=[(0, 1)])
    with pytest.raises(ValueError, match="n_way"):
        EpisodeSampler(X, y, n_way=3, pairs=[(0, 1)])
    with pytest.raises(ValueError, match="pairs"):
        EpisodeSampler(X, y, pairs=[(0, 0)])
    with pytest.raises(ValueError, match="pairs"):
        EpisodeSampler(X, y, pairs=[0, 1])
    with pytest.raises(ValueError, match="classes"):
        EpisodeSampler(X, y, classes=[0, 1, 1])
    with pytest.raises(ValueError, match="y"):
        EpisodeSampler(X, y[:-1])
    Xbad = X.copy()
    Xbad[3, 2] = np.nan
    with pytest.raises(ValueError, match="X"):
        EpisodeSampler(Xbad, y)
    with pytest.raises(TypeError, match="random_state"):
        EpisodeSampler(X, y, random_state="seed")
    with pytest.raises(TypeError, match="k_shot"):
        EpisodeSampler(X, y, k_shot=2.5)
    s = EpisodeSampler(X, y, random_state=0)
    with pytest.raises(ValueError, match="n_tasks"):
        s.sample(0)


def test_meta_gradient_on_sampled_episodes_matches_dense(data):
    X, y = data
    s = EpisodeSampler(X, y, n_way=2, k_shot=5, n_query=7, random_state=0)
    tasks = s.sample(12)
    dense = tuple(np.stack(parts) for parts in zip(*(tasks.task(t) for t in range(tasks.n_tasks))))
    assert dense[0].shape == (12, 10, X.shape[1]) and dense[2].shape == (12, 14, X.shape[1])
    theta = np.random.default_rng(0).normal(size=X.shape[1] + 1)
    a = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=2)
    b = fastmaml.meta_value_and_grad(theta, dense, inner_lr=0.1, inner_steps=2)
    assert np.isfinite(a.loss)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(a.grad_inner_lr, b.grad_inner_lr, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------
# sampling without replacement (the compiled core is exact)
# --------------------------------------------------------------------------


def test_sample_without_replacement_uniform():
    rng = np.random.default_rng(0)
    S, n, m = 24000, 5, 2
    out = sample_without_replacement(rng, np.full(S, n), m)
    assert out.shape == (S, m) and (out[:, 0] != out[:, 1]).all()
    assert out.min() == 0 and out.max() == n - 1
    counts = Counter(map(tuple, out.tolist()))
    assert len(counts) == n * (n - 1)  # every ordered pair
    expected = S / (n * (n - 1))  # 1200, sd ~ 34
    assert all(abs(c - expected) < 6 * np.sqrt(expected) for c in counts.values())


def test_sample_without_replacement_mixed_sizes_and_full():
    rng = np.random.default_rng(1)
    n = np.array([7, 30, 7, 1000, 9])
    out = sample_without_replacement(rng, n, 7)
    assert (out >= 0).all() and (out < n[:, None]).all()
    assert all(np.unique(r).size == 7 for r in out)
    # m == n: a full permutation of every row
    full = sample_without_replacement(rng, np.full(50, 12), 12)
    assert (np.sort(full, axis=1) == np.arange(12)).all()


# --------------------------------------------------------------------------
# GroupedSampler
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped():
    X, y, g = make_grouped_tasks(30, (4, 25), 5, random_state=3)
    return X, y, g


def test_grouped_ragged_offsets_and_labels(grouped):
    X, y, g = grouped
    s = GroupedSampler(X, y, g, support_size=3, random_state=0)
    tasks = s.sample(20)
    assert tasks.is_indexed and tasks.n_tasks == 20
    gi = np.searchsorted(s.groups, s.task_groups)
    assert np.unique(s.task_groups).size == 20  # without replacement
    sp, qp = tasks.support.ptr, tasks.query.ptr
    assert sp[0] == 0 and qp[0] == 0 and sp.shape == qp.shape == (21,)
    assert np.array_equal(np.diff(sp), np.full(20, 3))
    assert np.array_equal(np.diff(qp), s.group_sizes[gi] - 3)
    assert np.array_equal(tasks.support.y, y[tasks.support.idx])
    assert np.array_equal(tasks.query.y, y[tasks.query.idx])
    for t in range(20):
        si = tasks.support.idx[sp[t] : sp[t + 1]]
        qi = tasks.query.idx[qp[t] : qp[t + 1]]
        both = np.concatenate([si, qi])
        assert (g[both] == s.task_groups[t]).all()
        # support + query = all the group's rows, each once
        assert np.array_equal(np.sort(both), np.flatnonzero(g == s.task_groups[t]))


def test_grouped_fraction_query_size_and_replacement(grouped):
    X, y, g = grouped
    s = GroupedSampler(X, y, g, support_size=0.25, query_size=2, random_state=0)
    n = s.group_sizes
    assert np.array_equal(s.support_sizes, np.clip(np.rint(0.25 * n), 1, n - 1))
    assert (s.query_sizes == 2).all()
    tasks = s.sample(100)  # more tasks than groups: with replacement
    assert np.unique(s.task_groups).size < 100
    gi = np.searchsorted(s.groups, s.task_groups)
    assert np.array_equal(np.diff(tasks.support.ptr), s.support_sizes[gi])
    assert (np.diff(tasks.query.ptr) == 2).all()
    for t in range(100):
        si = tasks.support.idx[tasks.support.ptr[t] : tasks.support.ptr[t + 1]]
        qi = tasks.query.idx[tasks.query.ptr[t] : tasks.query.ptr[t + 1]]
        assert not np.intersect1d(si, qi).size


def test_grouped_subset_tasks_for_and_state(grouped):
    X, y, g = grouped
    sub = [3, 1, 8, 20]
    s = GroupedSampler(X, y, g, groups_subset=sub, random_state=0)
    assert np.array_equal(s.groups, [1, 3, 8, 20])
    s.sample(3)
    assert np.isin(s.task_groups, sub).all()
    state = json.loads(json.dumps(s.get_state()))
    a = s.tasks_for()
    b = s.tasks_for()
    assert np.array_equal(s.task_groups, [1, 3, 8, 20])
    assert np.array_equal(a.support.idx, b.support.idx) and np.array_equal(a.query.idx, b.query.idx)
    assert not np.array_equal(s.tasks_for(seed=1).support.idx, a.support.idx)
    c = s.tasks_for([20, 3])
    assert np.array_equal(s.task_groups, [20, 3]) and c.n_tasks == 2
    # tasks_for does not advance the stream
    x = s.sample(4)
    s.set_state(state)
    x2 = s.sample(4)
    assert np.array_equal(x.support.idx, x2.support.idx) and np.array_equal(x.query.ptr, x2.query.ptr)
    with pytest.raises(ValueError, match="groups"):
        s.tasks_for([2])


def test_grouped_string_group_ids():
    rng = np.random.default_rng(0)
    g = np.array(["ann", "bob", "cy"])[rng.integers(0, 3, 40)]
    X = rng.random((40, 3))
    y = rng.integers(0, 2, 40)
    s = GroupedSampler(X, y, g, support_size=2, random_state=0)
    s.sample(3)
    assert set(s.task_groups) == {"ann", "bob", "cy"}


def test_grouped_validation_errors(grouped):
    X, y, g = grouped
    g1 = g.copy()
    g1[0] = 999  # a group of one row
    with pytest.raises(ValueError, match=r"groups: .*group 999 has 1"):
        GroupedSampler(X, y, g1)
    GroupedSampler(X, y, g1, groups_subset=np.unique(g))  # fine without it
    with pytest.raises(ValueError, match="support_size"):
        GroupedSampler(X, y, g, support_size=4)  # some groups have 4 rows
    with pytest.raises(ValueError, match="support_size"):
        GroupedSampler(X, y, g, support_size=1.0)
    with pytest.raises(ValueError, match="support_size"):
        GroupedSampler(X, y, g, support_size=0)
    with pytest.raises(ValueError, match="query_size"):
        GroupedSampler(X, y, g, support_size=2, query_size=3)
    with pytest.raises(ValueError, match="groups_subset"):
        GroupedSampler(X, y, g, groups_subset=[0, 12345])
    with pytest.raises(ValueError, match="groups"):
        GroupedSampler(X, y, g[:-1])
    with pytest.raises(ValueError, match="y"):
        GroupedSampler(X, y[:-1], g)
    with pytest.raises(ValueError, match="n_tasks"):
        GroupedSampler(X, y, g).sample(0)


def test_meta_gradient_on_grouped_tasks_matches_dense(grouped):
    X, y, g = grouped
    s = GroupedSampler(X, y, g, support_size=3, random_state=0)
    tasks = s.sample(8)
    assert tasks.is_ragged
    theta = np.random.default_rng(1).normal(size=X.shape[1] + 1)
    a = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=2)
    # the meta-loss is the mean over tasks of each task's own result
    per_task = [
        fastmaml.meta_value_and_grad(
            theta, tuple(np.asarray(p)[None] for p in tasks.task(t)), inner_lr=0.1, inner_steps=2
        )
        for t in range(tasks.n_tasks)
    ]
    np.testing.assert_allclose(a.loss, np.mean([r.loss for r in per_task]), rtol=1e-12)
    np.testing.assert_allclose(a.grad, np.mean([r.grad for r in per_task], axis=0), rtol=1e-10, atol=1e-14)


def test_row_split_feeds_episode_samplers(data):
    X, y = data
    tr, te = split_rows(y, fractions=(0.5, 0.5), random_state=0)
    a = EpisodeSampler(X, y, k_shot=2, n_query=3, rows=tr, random_state=0).sample(50)
    b = EpisodeSampler(X, y, k_shot=2, n_query=3, rows=te, random_state=0).sample(50)
    used_a = np.concatenate([a.support.idx, a.query.idx])
    used_b = np.concatenate([b.support.idx, b.query.idx])
    assert not np.intersect1d(used_a, used_b).size


def test_core_sampling_follows_the_generator_state():
    """The compiled sampler draws from the Generator's own bit generator: same state, same stream."""
    a = np.random.default_rng(7)
    b = np.random.default_rng(7)
    x = sample_without_replacement(a, np.full(10, 50), 5)
    y = sample_without_replacement(b, np.full(10, 50), 5)
    np.testing.assert_array_equal(x, y)
    # it advanced the generator: the next draws differ from a fresh one's
    assert a.integers(0, 2**62) != np.random.default_rng(7).integers(0, 2**62)
    with pytest.raises(ValueError, match="counts"):
        sample_without_replacement(a, np.array([3, 10]), 5)
