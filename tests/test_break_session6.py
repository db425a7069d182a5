"""Adversarial tests of the 2026-12-01 kernel changes (git diff 65bb421..5032ad5 -- csrc/).

Targets: ``tile::RowPrefetch`` (query rows prefetched during the Gram tiles;
LockstepGram's ``prefetch_next_group``), ``Lanes<float>::kGramBlock = 1024``,
X theta per row tile inside ``gram_body`` (``theta_rides`` removed),
``gram_mul_sym_body`` (n >= 64: G in from G's lower block triangle),
``tile::finite_body`` as the fast sweeps' per-task finite check, and the cost
model's Gram term (W2, n = 100, K = 10, d = 784, now takes the Gram sweep).

A task's own bits inside a batch are seen as in test_break_lanes.py: the
block sums of a batch must be the in-order fold of each task's slot computed
alone, for any n_threads.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmaml
import reference
from fastmaml import Tasks, meta_value_and_grad
from fastmaml._core import uses_gram
from fastmaml.datasets import dataset_kernel
from fastmaml.functional import meta_block_sums
from problems import fold
from tolerances import RTOL_F32, RTOL_F64, assert_rel

FIELDS = ("grad", "grad_inner_lr", "grad_l2")


def _index_tasks(X, parts, order, kernel=None):
    sel = [parts[t] for t in order]
    ptr = lambda k: np.cumsum([0] + [len(p[k]) for p in sel])  # noqa: E731
    cat = lambda k: np.concatenate([p[k] for p in sel])  # noqa: E731
    return Tasks.from_index(X, cat(0), cat(1), cat(2), cat(3), support_ptr=ptr(0), query_ptr=ptr(2), kernel=kernel)


def _parts(sizes, N, rng):
    return [(rng.integers(0, N, n), rng.integers(0, 2, n), rng.integers(0, N, m), rng.integers(0, 2, m))
            for n, m in sizes]


def _assert_reference(got, theta, dense_list, lr, K, l2):
    ref = reference.meta_value_and_grad(theta, dense_list, lr, K, l2=l2)
    assert got.loss == pytest.approx(ref.loss, rel=RTOL_F64, abs=0)
    for f in FIELDS:
        assert_rel(getattr(got, f), getattr(ref, f), RTOL_F64, f)


# n across gram_mul_sym_body's range: whole 32-column strips, one column past
# a strip, one short of a strip, only tail columns past one strip (n < 96).
SYM_N = [64, 65, 70, 95, 96, 97, 127, 128, 131, 160, 191, 200]


@pytest.mark.parametrize("d", [1, 9])
def test_symmetric_gram_product_matches_the_reference_for_n_64_to_200(d):
    """G in from G's lower block triangle (n >= 64) gives the exact meta-gradient, tail columns included.

    Each task has its own n, so every strip / tail split of SYM_N runs; d = 1
    leaves the Gram tiles nothing but the scalar feature tail. A dropped tail
    column, a strip's missing dot product or a wrong triangle shows at ~1e-2.
    """
    rng = np.random.default_rng(d)
    dense_list = []
    for n in SYM_N:
        dense_list.append((rng.normal(size=(n, d)), rng.integers(0, 2, n), rng.normal(size=(3, d)),
                           rng.integers(0, 2, 3)))
    theta = rng.normal(size=d + 1) * 0.3
    lr = np.array([[0.4], [0.2], [0.3]])
    for t, task in enumerate(dense_list):
        Xs, ys, Xq, yq = task
        got = meta_value_and_grad(theta, (Xs[None], ys[None], Xq[None], yq[None]), inner_lr=lr, inner_steps=3,
                                  l2=0.05, sweep="gram")
        _assert_reference(got, theta, [task], lr, 3, 0.05)


def test_symmetric_gram_product_on_the_dataset_kernel_matches_the_reference():
    """Index-form tasks with n >= 64 take G from the dataset kernel (repeated rows): the same exact answer."""
    rng = np.random.default_rng(7)
    d, N = 12, 90
    X = rng.normal(size=(N, d))
    sizes = [(64, 2), (99, 1), (131, 5), (70, 40)]
    parts = _parts(sizes, N, rng)
    theta = rng.normal(size=d + 1) * 0.3
    tasks = _index_tasks(X, parts, range(len(sizes)), kernel=dataset_kernel(X))
    got = meta_value_and_grad(theta, tasks, inner_lr=0.2, inner_steps=4, l2=0.01, sweep="gram", n_threads=2)
    dense_list = [(X[s], ys, X[q], yq) for s, ys, q, yq in parts]
    _assert_reference(got, theta, dense_list, 0.2, 4, 0.01)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_tasks_keep_their_own_bits_with_query_prefetch_at_any_thread_count(dtype):
    """A Gram-path task's slot is the same alone, at any position and for n_threads 1, 2, 3.

    Ragged index-form batch over two blocks: n from 33 to 140 (full and partial
    row tiles, both gram_mul forms), query sides of 1 row (prefetch of a
    single line set) to 300 rows (more than 32 lines a tile: prefetch off),
    d = 45 (not a multiple of 8 or 16). The last task has the largest query.
    """
    rng = np.random.default_rng(11)
    d, N = 45, 400
    shapes = [(33, 1), (40, 300), (64, 7), (67, 2), (100, 30), (140, 1), (96, 128)]
    sizes = [shapes[int(i)] for i in rng.integers(0, len(shapes), 70)] + [(70, 300)]
    X = rng.normal(size=(N, d)).astype(dtype)
    parts = _parts(sizes, N, rng)
    theta = (rng.normal(size=d + 1) * 0.3).astype(dtype)
    kw = dict(inner_lr=np.array([[0.2], [0.1]]), inner_steps=2, l2=0.02, sweep="gram")
    T = len(sizes)
    own = np.array([meta_block_sums(theta, _index_tasks(X, parts, [t]), **kw).blocks[0] for t in range(T)])
    for nt in (1, 2, 3):
        got = meta_block_sums(theta, _index_tasks(X, parts, range(T)), n_threads=nt, **kw).blocks
        np.testing.assert_array_equal(got, fold(own), err_msg=f"n_threads={nt}")
    perm = rng.permutation(T)
    got = meta_block_sums(theta, _index_tasks(X, parts, perm), n_threads=3, **kw).blocks
    np.testing.assert_array_equal(got, fold(own[perm]))


@pytest.mark.parametrize("T", [9, 17, 66])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_lockstep_groups_keep_their_own_bits_with_next_group_prefetch(T, dtype):
    """Packed lock-step groups prefetch the next group's rows: the slots stay each task's own.

    T leaves a partial last group (nothing or a partial group to prefetch)
    and crosses a 64-task block; the shapes alternate so groups are cut by
    shape changes and the "next group" of t0 + 8 is not the next one run.
    """
    rng = np.random.default_rng(T)
    d, N = 30, 60  # packed: d <= 128, (n + m) d <= 8192; lock-step: n <= 32, 2 K n >= d
    shapes = [(10, 5), (10, 5), (16, 1), (7, 20)]
    sizes = [shapes[int(i)] for i in rng.integers(0, len(shapes), T)]
    X = rng.normal(size=(N, d)).astype(dtype)
    parts = _parts(sizes, N, rng)
    theta = (rng.normal(size=d + 1) * 0.3).astype(dtype)
    kw = dict(inner_lr=0.2, inner_steps=3, sweep="gram")
    own = np.array([meta_block_sums(theta, _index_tasks(X, parts, [t]), **kw).blocks[0] for t in range(T)])
    for nt in (1, 2, 3):
        got = meta_block_sums(theta, _index_tasks(X, parts, range(T)), n_threads=nt, **kw).blocks
        np.testing.assert_array_equal(got, fold(own), err_msg=f"n_threads={nt}")


@pytest.mark.parametrize("n, d, K, lr", [(20, 3001, 5, 1e-4), (70, 4999, 4, 2e-5), (100, 2048, 10, 2e-5)],
                         ids=["n20d3001", "n70d4999", "n100d2048"])
def test_float32_gram_blocks_of_1024_stay_within_the_float32_tolerance_on_offset_features(n, d, K, lr):
    """Features N(3, 1) at d in 2000-5000: every float32 product is positive, so the 1024-feature
    float32 blocks of the Gram tiles carry the largest rounding; still within RTOL_F32 of float64.

    The step sizes move the inner logits by O(1) (the inner loop matters);
    a dropped, repeated or mis-split 1024-feature block fails by far.
    """
    rng = np.random.default_rng(d)
    T, m = 2, 9
    Xs, Xq = rng.normal(3, 1, size=(T, n, d)), rng.normal(3, 1, size=(T, m, d))
    ys, yq = rng.integers(0, 2, (T, n)), rng.integers(0, 2, (T, m))
    theta = rng.normal(size=d + 1) * 0.01
    r64 = meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=lr, inner_steps=K, sweep="gram")
    f = lambda a: a.astype(np.float32)  # noqa: E731
    r32 = meta_value_and_grad(f(theta), (f(Xs), ys, f(Xq), yq), inner_lr=lr, inner_steps=K, sweep="gram")
    assert r32.loss == pytest.approx(r64.loss, rel=RTOL_F32)
    for fld in ("grad", "grad_inner_lr"):
        assert_rel(getattr(r32, fld), getattr(r64, fld), RTOL_F32, fld)


def test_w2_shape_takes_the_gram_sweep_with_the_gram_answer():
    """W2 (n = 100, K = 10, d = 784) now picks the Gram sweep: auto gives sweep="gram"'s bits,
    and both sweeps agree with the float64 reference (float64) and within RTOL_F32 (float32)."""
    assert uses_gram(100, 784, 1, 10) and not uses_gram(150, 784, 1, 10)
    rng = np.random.default_rng(2)
    T, n, m, d, K = 2, 100, 10, 784, 10
    Xs, Xq = rng.normal(size=(T, n, d)), rng.normal(size=(T, m, d))
    ys, yq = rng.integers(0, 2, (T, n)), rng.integers(0, 2, (T, m))
    theta = rng.normal(size=d + 1) * 0.02
    f = lambda a: a.astype(np.float32)  # noqa: E731
    t32 = (f(Xs), ys, f(Xq), yq)
    auto = meta_value_and_grad(f(theta), t32, inner_lr=0.002, inner_steps=K)
    gram = meta_value_and_grad(f(theta), t32, inner_lr=0.002, inner_steps=K, sweep="gram")
    assert auto.loss == gram.loss
    np.testing.assert_array_equal(auto.grad, gram.grad)
    r64 = meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=0.002, inner_steps=K, sweep="gram")
    _assert_reference(r64, theta, list(zip(Xs, ys, Xq, yq)), 0.002, K, 0.0)
    assert_rel(gram.grad, r64.grad, RTOL_F32, "grad")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("side", ["support_X", "query_X"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nonfinite_feature_in_the_last_row_of_the_last_task_on_the_w2_gram_path_is_named(dtype, side, bad):
    """A NaN / inf in the last feature (a tile tail: d = 785) of the last row of the last task,
    on the Gram path with query prefetch (n = 100): the named ValueError, not a silent NaN."""
    rng = np.random.default_rng(3)
    T, n, m, d = 3, 100, 12, 785
    Xs, Xq = rng.normal(size=(T, n, d)).astype(dtype), rng.normal(size=(T, m, d)).astype(dtype)
    (Xs if side == "support_X" else Xq)[T - 1, -1, d - 1] = bad
    with pytest.raises(ValueError, match=f"^{side}: contains NaN or infinity"):
        meta_value_and_grad(np.zeros(d + 1, dtype), (Xs, rng.integers(0, 2, (T, n)), Xq, rng.integers(0, 2, (T, m))),
                            inner_lr=0.002, inner_steps=10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", ["support", "query"])
@pytest.mark.parametrize("n", [10, 70, 100])
def test_a_nonfinite_row_of_the_last_index_task_is_named_x_by_the_core(n, where, dtype):
    """Unchecked index-form tasks (no NumPy pass): a NaN row used only by the last task's
    support or query side, on the packed lock-step (n = 10, next-group prefetch), the Gram sweep
    alone (n = 70) and W2's shape (n = 100, query prefetch), gives the core's "X: contains NaN"."""
    rng = np.random.default_rng(n)
    T, m, d, N = 9, 3, 24, 300
    X = rng.normal(size=(N, d)).astype(dtype)
    X[N - 1, d - 1] = np.nan
    sizes = [(n, m)] * T
    parts = _parts(sizes, N - 1, rng)
    s, ys, q, yq = parts[-1]
    if where == "support":
        s[-1] = N - 1
    else:
        q[-1] = N - 1
    sel = parts
    ptr = lambda k: np.cumsum([0] + [len(p[k]) for p in sel])  # noqa: E731
    cat = lambda k: np.concatenate([p[k] for p in sel])  # noqa: E731
    tasks = Tasks.from_index(X, cat(0), cat(1), cat(2), cat(3), support_ptr=ptr(0), query_ptr=ptr(2),
                             check_finite=False)
    with pytest.raises(ValueError, match="^X: contains NaN"):
        meta_value_and_grad(np.zeros(d + 1, dtype), tasks, inner_lr=0.05, inner_steps=3, sweep="gram", n_threads=2)


@pytest.mark.parametrize("n", [64, 97, 131])
def test_feature_gradients_with_the_symmetric_gram_product_match_the_reference(n):
    """grad_features on the Gram sweep (FastGramWorker<Feat>: G in forward and reverse from the lower
    block triangle) for n >= 64 with tail columns: loss, gradients and both feature gradients exact."""
    rng = np.random.default_rng(n)
    T, m, d, K = 2, 4, 11, 3
    Xs, Xq = rng.normal(size=(T, n, d)), rng.normal(size=(T, m, d))
    tasks = (Xs, rng.integers(0, 2, (T, n)), Xq, rng.integers(0, 2, (T, m)))
    theta = rng.normal(size=d + 1) * 0.3
    lr = np.array([[0.3], [0.5], [0.2]])
    got = meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=0.05, sweep="gram", grad_features=True)
    ref = reference.meta_value_and_grad_ext(theta, tasks, lr, K, l2=0.05, grad_features=True)
    assert got.loss == pytest.approx(ref.loss, rel=RTOL_F64, abs=0)
    for f in FIELDS + ("grad_support_X", "grad_query_X"):
        assert_rel(getattr(got, f), getattr(ref, f), RTOL_F64, f)


@pytest.mark.parametrize("nt", [1, 2, 3])
def test_unpacked_lockstep_and_alone_tasks_past_one_float32_block_keep_their_own_bits(nt):
    """d = 300 > 256: the Gram tiles (1024-feature float32 blocks) and X theta (256-feature blocks,
    per row tile in gram_body) are summed differently; unpacked lock-step groups (n <= 32, 2 K n >= d)
    and tasks alone (n = 13: 2 K n < d; n = 40) still give each task its own slot at any n_threads."""
    rng = np.random.default_rng(5)
    d, N, T = 300, 200, 21
    shapes = [(20, 3), (32, 1), (13, 9), (40, 2)]
    sizes = [shapes[int(i)] for i in rng.integers(0, len(shapes), T)]
    X = rng.normal(size=(N, d)).astype(np.float32)
    parts = _parts(sizes, N, rng)
    theta = (rng.normal(size=d + 1) * 0.05).astype(np.float32)
    kw = dict(inner_lr=0.01, inner_steps=8, l2=0.01, sweep="gram")
    own = np.array([meta_block_sums(theta, _index_tasks(X, parts, [t]), **kw).blocks[0] for t in range(T)])
    got = meta_block_sums(theta, _index_tasks(X, parts, range(T)), n_threads=nt, **kw).blocks
    np.testing.assert_array_equal(got, fold(own))


@pytest.mark.parametrize("n", [20, 70])
def test_a_kernel_is_read_by_one_triangle_at_every_n(n):
    """A hand-made kernel that is not exactly symmetric: the Gram path reads one triangle of each episode's
    Gram matrix and mirrors it, below n = 64 as from 64 on (where the n-space products read one triangle).
    With each task's rows in ascending dataset order that is the kernel's lower triangle, so perturbing the
    kernel's upper triangle changes no bit."""
    rng = np.random.default_rng(n)
    N, d, T, m, K = 150, 12, 3, 4, 3
    X = rng.normal(size=(N, d))
    sidx = np.sort(rng.integers(0, N, (T, n)), axis=1)
    qidx = rng.integers(0, N, (T, m))
    ys, yq = rng.integers(0, 2, (T, n)), rng.integers(0, 2, (T, m))
    sym = dataset_kernel(X)
    skew = sym + np.triu(rng.normal(scale=1e-2, size=(N, N)), 1)
    theta = rng.normal(size=d + 1) * 0.2
    kw = dict(inner_lr=0.05, inner_steps=K, l2=0.01, sweep="gram")
    a = meta_value_and_grad(theta, Tasks.from_index(X, sidx, ys, qidx, yq, kernel=skew), **kw)
    b = meta_value_and_grad(theta, Tasks.from_index(X, sidx, ys, qidx, yq, kernel=sym), **kw)
    np.testing.assert_array_equal(a.grad, b.grad)
    assert a.loss == b.loss and np.array_equal(a.grad_inner_lr, b.grad_inner_lr)
