"""Adversarial tests of the lock-step lanes and the 8-row / 8-vector tile kernels.

Targets commits 8ffca97, 3bac49f and 24d62ea: ``tile::dot_col8`` / ``dot_rows``,
``fused_rows_body`` in 8-row blocks, ``xtr_body`` in 8-vector strips,
X theta from the Gram tiles and ``blocked_dot`` (fastsweep.hpp), and the packed path of
the lock-step Gram groups (``lanes_packed``: d <= 128 and (n + m) d <= 8192;
``lockstep_applies``: n <= 32 and 2 K n >= d), which packs 8 tasks' rows
lane-major and computes every pass over d elementwise over the lanes.

How a task's own result is seen inside a batch: ``meta_block_sums`` returns
the core's float64 block sums, and for a meta-batch of one task that sum is
the task's own slot (0.0 + slot). A batch's block sums must then equal the
in-order fold of its tasks' own slots, bit for bit: a task whose slot moved
by one ulp because of its lane, its group, its block or the thread count
changes the fold.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import fastmaml
import reference
from problems import dense, fold
from fastmaml import Tasks
from fastmaml.functional import meta_block_sums
from tolerances import RTOL_F32, RTOL_F64, assert_rel

FIELDS = ("grad", "grad_inner_lr", "grad_l2")


def lockstep(n, d, K):
    return n <= 32 and 2 * K * n >= d


def packed(n, m, d):
    return d <= 128 and (n + m) * d <= 8192


def own_slots(theta, one_task, T, **kw):
    """Each task's slot from a meta-batch holding only that task."""
    return np.array([meta_block_sums(theta, one_task(t), **kw).blocks[0] for t in range(T)])


def assert_matches_reference(got, theta, tasks, lr, K, l2, first_order):
    ref = reference.meta_value_and_grad(theta, tasks, lr, K, l2=l2, first_order=first_order)
    assert got.loss == pytest.approx(ref.loss, rel=RTOL_F64, abs=0)
    for f in FIELDS:
        assert_rel(getattr(got, f), getattr(ref, f), RTOL_F64, f)


def as64(tasks):
    return tuple(a.astype(np.float64) if a.dtype.kind == "f" else a for a in tasks)


# (T, n, m, d, K) at the packing and lock-step boundaries. Comments: which path.
BOUNDARY = [
    (9, 1, 1, 1, 1),        # packed, n = m = d = 1
    (10, 2, 1, 7, 2),       # packed, d below one 8 x 8 transpose, m = 1
    (11, 4, 3, 8, 1),       # packed, d = one transpose, n % 4 == 0
    (9, 5, 2, 9, 1),        # packed, transpose + scalar column
    (13, 3, 5, 63, 11),     # packed
    (9, 8, 1, 64, 4),       # packed, n = 8 (one 8-row lanes_xv block)
    (10, 9, 4, 65, 4),      # packed, n = 9 (8 + 1 rows)
    (9, 31, 2, 127, 3),     # packed, n = 31
    (9, 32, 32, 128, 2),    # packed, (n + m) d = 8192 exactly
    (9, 32, 33, 128, 2),    # lock-step, not packed: (n + m) d = 8320
    (9, 16, 49, 128, 4),    # lock-step, not packed: 8320
    (9, 3, 2, 129, 22),     # lock-step, not packed: d = 129
    (9, 32, 3, 129, 3),     # lock-step, not packed, n % 4 == 0 (theta does not ride)
    (9, 33, 3, 65, 3),      # alone (n = 33 > 32), a partial last row tile
    (9, 36, 3, 300, 2),     # alone, n % 4 == 0: separate X theta pass
]
IDS = ["T{}n{}m{}d{}K{}".format(*s) for s in BOUNDARY]


def test_the_boundary_shapes_cover_every_path():
    kinds = {(lockstep(n, d, K), lockstep(n, d, K) and packed(n, m, d)) for _, n, m, d, K in BOUNDARY}
    assert kinds == {(True, True), (True, False), (False, False)}


@pytest.mark.parametrize("shape", BOUNDARY, ids=IDS)
@pytest.mark.parametrize("variant", ["scalar", "per_step_fo", "l2"])
def test_gram_path_matches_the_reference_at_the_packing_boundaries(shape, variant):
    T, n, m, d, K = shape
    theta, tasks = dense(T, n, m, d, seed=n * 131 + d)
    lr = np.linspace(0.1, 0.5, K).reshape(K, 1) if variant == "per_step_fo" else 0.3
    l2 = 0.07 if variant == "l2" else 0.0
    fo = variant == "per_step_fo"
    got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=l2, first_order=fo,
                                       sweep="gram")
    assert_matches_reference(got, theta, tasks, lr, K, l2, fo)
    plain = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=l2, first_order=fo,
                                         sweep="plain")
    assert plain.loss == pytest.approx(got.loss, rel=RTOL_F64, abs=0)
    for f in FIELDS:
        assert_rel(getattr(plain, f), getattr(got, f), RTOL_F64, f)


@pytest.mark.parametrize("shape", BOUNDARY, ids=IDS)
@pytest.mark.parametrize("sweep", ["gram", "plain"])
def test_float32_stays_within_tolerance_of_float64(shape, sweep):
    T, n, m, d, K = shape
    theta, tasks = dense(T, n, m, d, seed=n * 7 + d, dtype=np.float32)
    kw = dict(inner_lr=np.linspace(0.1, 0.4, K).reshape(K, 1), inner_steps=K, l2=0.05, sweep=sweep)
    got = fastmaml.meta_value_and_grad(theta, tasks, **kw)
    ref = fastmaml.meta_value_and_grad(theta.astype(np.float64), as64(tasks), **kw)
    assert got.grad.dtype == np.float32
    assert got.loss == pytest.approx(ref.loss, rel=RTOL_F32, abs=0)
    for f in FIELDS:
        assert_rel(getattr(got, f), getattr(ref, f), RTOL_F32, f)


@pytest.mark.parametrize("shape", [(70, 10, 10, 64, 5), (20, 5, 1, 9, 1), (13, 32, 32, 128, 2),
                                   (13, 3, 2, 129, 22), (12, 12, 7, 257, 1)],
                         ids=["packed_W3", "packed_m1", "packed_8192", "lockstep_unpacked", "alone"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_a_tasks_slot_does_not_depend_on_its_lane_group_or_threads(shape, dtype, first_order):
    T, n, m, d, K = shape
    theta, (Xs, ys, Xq, yq) = dense(T, n, m, d, seed=T + d, dtype=dtype)
    kw = dict(inner_lr=0.3, inner_steps=K, l2=0.05, first_order=first_order, sweep="gram")
    own = own_slots(theta, lambda t: (Xs[t:t + 1], ys[t:t + 1], Xq[t:t + 1], yq[t:t + 1]), T, **kw)
    assert np.all(np.isfinite(own)) and np.ptp(own[:, 0]) > 0
    for nt in (1, 2, 3, 4):
        got = meta_block_sums(theta, (Xs, ys, Xq, yq), n_threads=nt, **kw).blocks
        np.testing.assert_array_equal(got, fold(own), err_msg=f"n_threads={nt}")
    # every task at another lane: the batch reversed, and shifted by 3 (a short first group)
    for perm in (np.arange(T)[::-1], np.r_[np.arange(3, T), np.arange(3)]):
        got = meta_block_sums(theta, (Xs[perm], ys[perm], Xq[perm], yq[perm]), n_threads=2, **kw).blocks
        np.testing.assert_array_equal(got, fold(own[perm]))


def _ragged(sizes, d, seed, dtype, reuse):
    """Index-form parts: X and per-task (support_idx, support_y, query_idx, query_y)."""
    rng = np.random.default_rng(seed)
    N = 40 if reuse else sum(n + m for n, m in sizes)
    X = rng.normal(size=(N, d)).astype(dtype)
    parts, pos = [], 0
    for n, m in sizes:
        if reuse:  # drawn with replacement: rows repeat inside a task and across tasks
            s, q = rng.integers(0, N, n), rng.integers(0, N, m)
        else:
            s, q = np.arange(pos, pos + n), np.arange(pos + n, pos + n + m)
            pos += n + m
        parts.append((s, rng.integers(0, 2, n), q, rng.integers(0, 2, m)))
    theta = (rng.normal(size=d + 1) * 0.3).astype(dtype)
    return theta, X, parts


def _from_parts(X, parts, order):
    sel = [parts[t] for t in order]
    ptr = lambda k: np.cumsum([0] + [len(p[k]) for p in sel])  # noqa: E731
    cat = lambda k: np.concatenate([p[k] for p in sel])  # noqa: E731
    return Tasks.from_index(X, cat(0), cat(1), cat(2), cat(3), support_ptr=ptr(0), query_ptr=ptr(2))


def _runs(T, seed, shapes):
    """Runs of equal (n, m) of random lengths: lock-step groups cut by shape changes and blocks."""
    rng = np.random.default_rng(seed)
    sizes = []
    while len(sizes) < T:
        sizes += [shapes[int(rng.integers(0, len(shapes)))]] * int(rng.integers(1, 12))
    return sizes[:T]


@pytest.mark.parametrize("T", [63, 64, 65, 70, 129])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reuse", [False, True], ids=["distinct_rows", "repeated_rows"])
def test_ragged_index_tasks_keep_their_own_bits_across_blocks(T, dtype, reuse):
    # (1, 1) and (2, 1) run alone (2 K n < d), the others in lock-step groups
    sizes = _runs(T, T, [(5, 3), (5, 4), (4, 3), (10, 10), (1, 1), (2, 1)])
    theta, X, parts = _ragged(sizes, 16, T, dtype, reuse)
    kw = dict(inner_lr=np.array([[0.3], [0.1], [0.4]]), inner_steps=3, l2=0.05, sweep="gram")
    own = own_slots(theta, lambda t: _from_parts(X, parts, [t]), T, **kw)
    for nt in (1, 4):
        got = meta_block_sums(theta, _from_parts(X, parts, range(T)), n_threads=nt, **kw).blocks
        np.testing.assert_array_equal(got, fold(own), err_msg=f"n_threads={nt}")
    perm = np.arange(T)[::-1]
    got = meta_block_sums(theta, _from_parts(X, parts, perm), n_threads=2, **kw).blocks
    np.testing.assert_array_equal(got, fold(own[perm]))


def test_ragged_index_tasks_match_the_reference():
    sizes = _runs(70, 1, [(5, 3), (4, 3), (10, 10), (1, 1)]) + [(32, 32)] * 9 + [(32, 33)] * 3
    theta, X, parts = _ragged(sizes, 16, 5, np.float64, True)
    lr = np.array([[0.3], [0.1], [0.4]])
    got = fastmaml.meta_value_and_grad(theta, _from_parts(X, parts, range(len(sizes))), inner_lr=lr,
                                       inner_steps=3, l2=0.05, sweep="gram", n_threads=2)
    dense_list = [(X[s], ys, X[q], yq) for s, ys, q, yq in parts]
    assert_matches_reference(got, theta, dense_list, lr, 3, 0.05, False)


@pytest.mark.parametrize("shape", [(10, 10, 64, 5), (4, 1, 8, 1), (1, 1, 1, 1), (32, 32, 128, 2), (32, 33, 128, 2)],
                         ids=["W3", "n4m1d8", "n1m1d1", "packed_8192", "unpacked"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("side", ["support_X", "query_X"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_nonfinite_feature_in_any_lane_is_named(shape, dtype, side, bad):
    n, m, d, K = shape
    for lane in (0, 5, 10):  # first lane, inside the first group, the single-task tail group (T = 11)
        theta, tasks = dense(11, n, m, d, seed=3, dtype=dtype)
        tasks = list(tasks)
        k = 0 if side == "support_X" else 2
        tasks[k] = tasks[k].copy()
        tasks[k][lane, -1, (lane * 3) % d] = bad
        for fo in (False, True):
            with pytest.raises(ValueError, match=f"^{side}: contains NaN or infinity"):
                fastmaml.meta_value_and_grad(theta, tuple(tasks), inner_lr=0.3, inner_steps=K, sweep="gram",
                                             first_order=fo)


@pytest.mark.parametrize("dtype,scale", [(np.float64, 1e160), (np.float32, 1e20)])
def test_one_diverging_lane_names_its_task_and_spares_the_others(dtype, scale):
    # Support rows of one task so large that its Gram matrix overflows: that
    # lane diverges, the others of its group must not be touched.
    theta, (Xs, ys, Xq, yq) = dense(11, 10, 10, 64, seed=3, dtype=dtype)
    kw = dict(inner_lr=0.3, inner_steps=5, sweep="gram")
    for lane in (0, 5, 10):
        bad = Xs.copy()
        bad[lane] *= dtype(scale)
        with pytest.raises(fastmaml.DivergenceError, match=f"task {lane}[;: ]"):
            fastmaml.meta_value_and_grad(theta, (bad, ys, Xq, yq), **kw)
    # the same lanes' neighbours, computed with the bad task replaced, are unchanged bitwise
    keep = np.r_[0:5, 6:11]
    own = own_slots(theta, lambda t: (Xs[t:t + 1], ys[t:t + 1], Xq[t:t + 1], yq[t:t + 1]), 11, **kw)
    got = meta_block_sums(theta, (Xs[keep], ys[keep], Xq[keep], yq[keep]), **kw).blocks
    np.testing.assert_array_equal(got, fold(own[keep]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_packed_path_does_not_depend_on_alignment(dtype):
    """theta and the features at every element offset of a 64-byte line give the same bits."""
    theta, tasks = dense(11, 10, 10, 64, seed=8, dtype=dtype)

    def at_offset(a, off):
        buf = np.zeros(a.size + 32, dtype=a.dtype)
        base = (-buf.ctypes.data % 64) // a.itemsize
        out = buf[base + off: base + off + a.size].reshape(a.shape)
        out[...] = a
        return out

    kw = dict(inner_lr=0.3, inner_steps=5, l2=0.05, sweep="gram")
    first = meta_block_sums(theta, tasks, **kw).blocks
    for off in range(1, 64 // np.dtype(dtype).itemsize):
        moved = (at_offset(tasks[0], off), tasks[1], at_offset(tasks[2], off), tasks[3])
        got = meta_block_sums(at_offset(theta, off), moved, **kw).blocks
        np.testing.assert_array_equal(got, first, err_msg=f"offset {off}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_eight_row_kernels_keep_every_row_exact(dtype):
    """Plain sweep (fused_rows in 8-row blocks, dot_col8) and Gram tasks run alone (xv, xtr in 8-vector
    strips) for n across the 8-row blocks and d across the strips and the 256-feature float32 block."""
    rng = np.random.default_rng(2)
    for n in (1, 4, 5, 7, 8, 9, 12, 15, 16, 17):
        d = int(rng.choice([31, 63, 64, 65, 257, 300]))
        theta, tasks = dense(3, n, 6, d, seed=n, dtype=dtype)
        for sweep in ("plain", "gram"):
            kw = dict(inner_lr=0.2, inner_steps=2, l2=0.05, sweep=sweep)
            got = fastmaml.meta_value_and_grad(theta, tasks, **kw)
            if dtype == np.float64:
                assert_matches_reference(got, theta, tasks, 0.2, 2, 0.05, False)
            else:
                ref = fastmaml.meta_value_and_grad(theta.astype(np.float64), as64(tasks), **kw)
                for f in FIELDS:
                    assert_rel(getattr(got, f), getattr(ref, f), RTOL_F32, f)


_FORK_SCRIPT = r"""
import os, warnings, numpy as np
from fastmaml.functional import meta_block_sums
rng = np.random.default_rng(4)
T, n, m, d = 70, 10, 10, 64  # packed lock-step groups, one cut at the 64-task block
tasks = (rng.normal(size=(T, n, d)), rng.integers(0, 2, (T, n)), rng.normal(size=(T, m, d)), rng.integers(0, 2, (T, m)))
theta = rng.normal(size=d + 1) * 0.3
kw = dict(inner_lr=0.3, inner_steps=5, sweep="gram", n_threads=2)
parent = meta_block_sums(theta, tasks, **kw).blocks  # starts the thread pool
pid = os.fork()
if pid == 0:
    code = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the core's ForkWarning: the child runs serially
            code = 0 if np.array_equal(meta_block_sums(theta, tasks, **kw).blocks, parent) else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_computes_the_same_bits():
    """A child forked after a threaded call runs the packed lanes and gets the parent's bits (fresh
    interpreter: other tests' imports, e.g. jax, hook os.fork with warnings)."""
    out = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stdout + out.stderr[-3000:]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_packed_and_unpacked_groups_mixed_in_one_ragged_batch(dtype):
    # d = 128: (32, 32) is packed ((n + m) d = 8192), (32, 33) is not, (3, 2) runs alone.
    sizes = _runs(40, 9, [(3, 2), (32, 32), (32, 33)])
    theta, X, parts = _ragged(sizes, 128, 9, dtype, True)
    kw = dict(inner_lr=0.02, inner_steps=2, l2=0.05, sweep="gram")
    own = own_slots(theta, lambda t: _from_parts(X, parts, [t]), len(sizes), **kw)
    for nt in (1, 3):
        got = meta_block_sums(theta, _from_parts(X, parts, range(len(sizes))), n_threads=nt, **kw).blocks
        np.testing.assert_array_equal(got, fold(own), err_msg=f"n_threads={nt}")
    if dtype == np.float64:
        got = fastmaml.meta_value_and_grad(theta, _from_parts(X, parts, range(len(sizes))), **kw)
        dense_list = [(X[s], ys, X[q], yq) for s, ys, q, yq in parts]
        assert_matches_reference(got, theta, dense_list, 0.02, 2, 0.05, False)


@pytest.mark.parametrize("n", [7, 8, 12, 13])
def test_kernel_tasks_with_full_and_partial_row_tiles(n):
    """A dataset kernel gives the Gram matrix; X theta is then its own pass, whatever n % 4."""
    from fastmaml.datasets import dataset_kernel

    rng = np.random.default_rng(n)
    d, T, m, K = 40, 6, 5, 3
    X = rng.normal(size=(60, d))
    sidx, qidx = rng.integers(0, 60, (T, n)), rng.integers(0, 60, (T, m))
    ys, yq = rng.integers(0, 2, (T, n)), rng.integers(0, 2, (T, m))
    theta = rng.normal(size=d + 1) * 0.3
    kw = dict(inner_lr=0.2, inner_steps=K, l2=0.05, sweep="gram")
    with_k = fastmaml.meta_value_and_grad(
        theta, Tasks.from_index(X, sidx, ys, qidx, yq, kernel=dataset_kernel(X)), **kw)
    dense_list = [(X[sidx[t]], ys[t], X[qidx[t]], yq[t]) for t in range(T)]
    assert_matches_reference(with_k, theta, dense_list, 0.2, K, 0.05, False)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_feature_gradients_of_a_task_do_not_depend_on_its_position(dtype, first_order):
    """grad_features on lock-step shapes runs FastGramWorker (blocked_dot for <gK, theta>): per-task rows
    of grad_support_X / grad_query_X are the same bits at any position and thread count."""
    for T, n, m, d, K in [(11, 10, 10, 64, 5), (9, 4, 3, 8, 1), (70, 5, 3, 9, 2), (9, 8, 5, 300, 2)]:
        theta, (Xs, ys, Xq, yq) = dense(T, n, m, d, seed=d, dtype=dtype)
        kw = dict(inner_lr=0.3, inner_steps=K, l2=0.05, first_order=first_order, grad_features=True, sweep="gram")
        full = fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), n_threads=3, **kw)
        perm = np.r_[np.arange(3, T), np.arange(3)][::-1]
        moved = fastmaml.meta_value_and_grad(theta, (Xs[perm], ys[perm], Xq[perm], yq[perm]), n_threads=1, **kw)
        np.testing.assert_array_equal(full.grad_support_X[perm], moved.grad_support_X)
        np.testing.assert_array_equal(full.grad_query_X[perm], moved.grad_query_X)


@pytest.mark.parametrize("learn", ["scalar", "per_step"])
def test_compiled_fit_on_lockstep_episodes_is_thread_independent(learn):
    """MAML.fit's compiled loop on 2-way 3-shot episodes of 16 features (n = 6, K = 3: packed lock-step
    groups) over meta-batches of 70 (a group cut at the 64-task block): same run for 1 and 3 threads."""
    from fastmaml import MAML, EpisodeSampler
    from fastmaml.functional import choose_sweep

    assert choose_sweep(6, 70, 16, inner_steps=3, inner_lr=0.3) == "gram"  # so lock-step groups run
    rng = np.random.default_rng(0)
    X, y = rng.random((300, 16)), rng.integers(0, 5, 300)
    runs = []
    for nt in (1, 3):
        sampler = EpisodeSampler(X, y, n_way=2, k_shot=3, n_query=4, random_state=3)
        model = MAML(learn_inner_lr=learn, inner_lr=0.3, inner_steps=3, meta_lr=0.05, l2=0.05, learn_l2=True,
                     meta_batch_size=70, n_iterations=3, n_threads=nt, progress=False)
        runs.append(model.fit(sampler))
    a, b = runs
    assert [r["loss"] for r in a.history_] == [r["loss"] for r in b.history_]
    for key in a._params:
        np.testing.assert_array_equal(a._params[key], b._params[key], err_msg=key)


@pytest.mark.parametrize("shape", [(9, 10, 10, 64, 5), (9, 3, 1, 5, 2), (9, 32, 32, 128, 2)],
                         ids=["W3", "n3m1d5", "packed_8192"])
@pytest.mark.parametrize("lr,l2", [(0.0, 0.0), (0.0, 1.0), (0.5, 2.0), (0.5, 4.0), ("steps", 2.0)],
                         ids=["lr0", "lr0_l2", "rho0", "rho-1", "per_step_rho0"])
def test_packed_path_at_degenerate_step_sizes(shape, lr, l2):
    """inner_lr = 0 (a_j = 1, nothing moves), inner_lr l2 = 1 (rho = 0: beta and a_K vanish) and = 2
    (rho = -1), scalar and per step: the lanes' scalars rho, a_j, beta against the reference."""
    T, n, m, d, K = shape
    theta, tasks = dense(T, n, m, d, seed=K + d)
    if lr == "steps":
        lr = np.array([[0.0], [0.5]] + [[0.1]] * (K - 2))
    for fo in (False, True):
        got = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=K, l2=l2, first_order=fo,
                                           sweep="gram")
        assert_matches_reference(got, theta, tasks, lr, K, l2, fo)
