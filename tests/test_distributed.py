"""Meta-training on Dask distributed (fastmaml.distributed).

A LocalCluster of 2 worker processes, one thread each, on the loopback
interface, shared by the module. Checks: the distributed meta-gradient and a
whole training run are bitwise equal to one process when shards align with
the core's reduction blocks; unaligned shards differ by a bounded rounding;
a worker killed during training changes nothing (not even a bit); checkpoints
resume exactly; without Dask the error says what to install.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("distributed")

import fastmaml
from fastmaml import MAML, Tasks, meta_value_and_grad
from fastmaml.distributed import (
    REDUCE_BLOCK,
    DaskTaskSource,
    UnalignedShardsWarning,
    distributed_meta_value_and_grad,
    load_shard_npz,
    npz_shards,
    save_shards_npz,
    split_tasks,
)

B = REDUCE_BLOCK  # 64


# --------------------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           host="127.0.0.1", silence_logs=50)
    cl = Client(cluster)
    try:
        cl.wait_for_workers(2, timeout=60)
        yield cl
    finally:
        cl.close()
        cluster.close()


@pytest.fixture(autouse=True)
def two_workers(client):
    """Every test starts with two live workers (a killed one is restarted by its nanny)."""
    _wait_for_two(client)
    yield


def _wait_for_two(client, gone=(), timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info()["workers"]
        if len(workers) == 2 and not set(gone) & set(workers):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster did not get back to 2 workers: {list(workers)}")
        time.sleep(0.05)


def only_one_copy(client, source, shard=0):
    """Drop extra copies of a shard: Dask may have copied a small shard to the other worker
    (when moving a computation was cheaper than waiting), and then killing one holder loses nothing."""
    client.replicate([source._futures[shard]], n=1)
    holders = source.who_has()[shard]
    assert len(holders) == 1
    return holders[0]


def kill(client, addr):
    """SIGKILL the worker process at `addr` (its nanny starts a new one)."""
    pid = client.run(os.getpid, workers=[addr])[addr]
    os.kill(pid, signal.SIGKILL)
    return addr


# --------------------------------------------------------------------------- data


def dense_pool(T=300, n=6, m=8, d=5, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    sX = rng.random((T, n, d)).astype(dtype)
    qX = rng.random((T, m, d)).astype(dtype)
    return sX, rng.integers(0, 2, (T, n)), qX, rng.integers(0, 2, (T, m))


def split(arrays, bounds):
    """Driver-held shards: 4-tuples of consecutive task ranges."""
    edges = [0, *bounds, arrays[0].shape[0]]
    return [tuple(a[lo:hi] for a in arrays) for lo, hi in zip(edges[:-1], edges[1:])]


def same(a, b):
    """Bitwise equality of two MetaGradients."""
    assert a.loss == b.loss
    assert a.grad.dtype == b.grad.dtype and np.array_equal(a.grad, b.grad)
    assert type(a.grad_inner_lr) is type(b.grad_inner_lr)
    assert np.array_equal(a.grad_inner_lr, b.grad_inner_lr)
    assert a.grad_l2 == b.grad_l2


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


LRS = {
    "scalar": lambda K, shape: 0.3,
    "per_parameter": lambda K, shape: np.linspace(0.1, 0.4, int(np.prod(shape))).reshape(shape),
    "per_step": lambda K, shape: np.linspace(0.2, 0.4, K).reshape((K,) + (1,) * len(shape)),
}

# --------------------------------------------------------------------------- (1) one meta-gradient


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["scatter", "npz"])
@pytest.mark.parametrize("lr", ["scalar", "per_parameter", "per_step"])
def test_meta_gradient_is_bitwise_equal_to_one_process_for_aligned_shards(client, tmp_path, dtype, kind, lr):
    arrays = dense_pool(dtype=dtype)
    pool = Tasks(*arrays)
    theta = np.linspace(-0.5, 0.5, 6)
    inner_lr = LRS[lr](3, theta.shape)
    ref = meta_value_and_grad(theta, pool, inner_lr=inner_lr, inner_steps=3, l2=0.01)
    if kind == "scatter":  # the driver holds the data: 2 blocks + the rest (4 blocks and 44 tasks)
        shards = split(arrays, [2 * B])
    else:  # the workers load their own shards
        shards = npz_shards(save_shards_npz(pool, tmp_path, shard_size=2 * B))
        assert len(shards) == 3
    got = distributed_meta_value_and_grad(client, shards, theta, inner_lr=inner_lr, inner_steps=3, l2=0.01)
    same(got, ref)


def test_index_form_shards_with_a_dataset_kernel_are_bitwise_equal(client, tmp_path):
    rng = np.random.default_rng(1)
    X = rng.random((400, 12))
    y = rng.integers(0, 4, 400)
    sampler = fastmaml.EpisodeSampler(X, y, n_way=2, k_shot=3, n_query=5, random_state=0, kernel_budget=2**24)
    pool = sampler.sample(3 * B + 10)
    assert pool.is_indexed and pool.kernel is not None
    theta = np.linspace(-0.3, 0.3, 13)
    ref = meta_value_and_grad(theta, pool, inner_lr=0.4, inner_steps=4, l2=0.02)
    paths = save_shards_npz(pool, tmp_path, shard_size=B)
    shard = load_shard_npz(paths[0])
    assert shard.is_indexed and shard.kernel is not None and shard.support.X.shape[0] < X.shape[0]
    with DaskTaskSource.from_npz(client, tmp_path) as source:
        assert source.n_tasks == pool.n_tasks and source.shard_sizes == [B, B, B, 10]
        got = source.meta_value_and_grad(theta, inner_lr=0.4, inner_steps=4, l2=0.02)
    same(got, ref)


def test_ragged_shards_keep_the_pools_choice_of_sweep(client):
    # Small support sets in shard 0, large ones in shard 1: alone, the core's cost
    # model would pick the Gram sweep for shard 0 and the plain sweep for the pool.
    rng = np.random.default_rng(2)
    d, K = 30, 5
    sizes = np.concatenate([rng.integers(2, 6, B), rng.integers(60, 80, B)])
    X = rng.random((500, d))
    s_ptr = np.concatenate([[0], np.cumsum(sizes)])
    s_idx = rng.integers(0, 500, s_ptr[-1])
    q_idx = rng.integers(0, 500, 2 * B * 7)
    pool = Tasks.from_index(X, s_idx, rng.integers(0, 2, s_idx.size), q_idx, rng.integers(0, 2, q_idx.size),
                            support_ptr=s_ptr, query_ptr=np.arange(2 * B + 1) * 7)
    uses = fastmaml._core.uses_gram
    assert uses(int(np.ceil(sizes[:B].mean())), d, 1, K) and not uses(int(np.ceil(sizes.mean())), d, 1, K)
    theta = np.linspace(-0.2, 0.2, d + 1)
    ref = meta_value_and_grad(theta, pool, inner_lr=0.2, inner_steps=K)
    shards = split_tasks(pool, shard_size=B)  # driver-held shards of a ragged pool
    assert [s.n_tasks for s in shards] == [B, B] and shards[0].support.X.shape[0] < X.shape[0]
    got = distributed_meta_value_and_grad(client, shards, theta, inner_lr=0.2, inner_steps=K)
    same(got, ref)


def test_ragged_shards_with_a_per_parameter_inner_lr_take_the_plain_sweep(client):
    # Meta-SGD on ragged shards whose mean support sizes differ: the cost model
    # alone would force the Gram sweep on every shard (the pool's choice for a
    # scalar inner_lr), which does not apply to a per-parameter inner_lr. The
    # driver must use the core's whole decision and match one process bitwise.
    from fastmaml.functional import choose_sweep

    rng = np.random.default_rng(4)
    d, K = 60, 4
    sizes = np.concatenate([rng.integers(2, 5, B), rng.integers(10, 14, B)])
    X = rng.random((300, d))
    s_ptr = np.concatenate([[0], np.cumsum(sizes)])
    s_idx = rng.integers(0, 300, s_ptr[-1])
    q_idx = rng.integers(0, 300, 2 * B * 5)
    pool = Tasks.from_index(X, s_idx, rng.integers(0, 2, s_idx.size), q_idx, rng.integers(0, 2, q_idx.size),
                            support_ptr=s_ptr, query_ptr=np.arange(2 * B + 1) * 5)
    shards = split_tasks(pool, shard_size=B)
    means = [int(np.ceil(s.support.sizes().mean())) for s in shards]
    assert means[0] != means[1]  # the driver has to choose one sweep for all shards
    theta = np.linspace(-0.2, 0.2, d + 1)
    meta_sgd = np.linspace(0.1, 0.3, d + 1)
    rows = int(sizes.sum())
    assert choose_sweep(rows, 2 * B, d, inner_steps=K, inner_lr=0.2) == "gram"
    assert choose_sweep(rows, 2 * B, d, inner_steps=K, inner_lr=meta_sgd) == "plain"
    ref = meta_value_and_grad(theta, pool, inner_lr=meta_sgd, inner_steps=K, l2=0.01)
    got = distributed_meta_value_and_grad(client, shards, theta, inner_lr=meta_sgd, inner_steps=K, l2=0.01)
    same(got, ref)


def test_multinomial_tasks(client):
    rng = np.random.default_rng(3)
    T, n, m, d, C = 2 * B + 5, 9, 6, 4, 3
    arrays = (rng.random((T, n, d)), rng.integers(0, C, (T, n)), rng.random((T, m, d)), rng.integers(0, C, (T, m)))
    theta = rng.standard_normal((d + 1, C)) * 0.1
    ref = meta_value_and_grad(theta, arrays, inner_lr=0.5, inner_steps=2, l2=0.1)
    with DaskTaskSource(client, split(arrays, [B, 2 * B])) as source:
        assert source.n_classes == C
        same(source.meta_value_and_grad(theta, inner_lr=0.5, inner_steps=2, l2=0.1), ref)


def test_split_tasks_and_close_releases_the_shards(client):
    arrays = dense_pool(T=5 * B + 3)
    shards = split_tasks(arrays, n_shards=2)
    assert [s.n_tasks for s in shards] == [3 * B, 2 * B + 3]
    assert [s.n_tasks for s in split_tasks(arrays, shard_size=2 * B)] == [2 * B, 2 * B, B + 3]
    with pytest.raises(ValueError, match="multiple of 64"):
        split_tasks(arrays, shard_size=50)
    before = set(client.who_has())
    source = DaskTaskSource(client, shards)
    keys = {f.key for f in source._futures}
    assert keys <= set(client.who_has())
    source.close()
    deadline = time.monotonic() + 10
    while keys & set(client.who_has()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not keys & set(client.who_has()) and set(client.who_has()) <= before | keys


# --------------------------------------------------------------------------- (2) training


def model(**kw):
    base = dict(inner_steps=3, inner_lr=0.3, meta_lr=0.05, n_iterations=20, progress=False)
    base.update(kw)
    return MAML(**base)


TRAIN_CASES = {
    "float64-scatter-scalar-lr-and-l2": (np.float64, "scatter", dict(learn_inner_lr="scalar", l2=0.01, learn_l2=True)),
    "float32-npz-per-step": (np.float32, "npz", dict(learn_inner_lr="per_step")),
    "float64-npz-fomaml-per-parameter": (np.float64, "npz", dict(algorithm="fomaml", learn_inner_lr="per_parameter")),
}


def make_source(client, arrays, kind, tmp_path, **kw):
    if kind == "scatter":
        return DaskTaskSource(client, split(arrays, [2 * B]), **kw)
    return DaskTaskSource.from_npz(client, save_shards_npz(Tasks(*arrays), tmp_path, shard_size=2 * B), **kw)


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_is_bitwise_equal_to_one_process(client, tmp_path, case):
    dtype, kind, kw = TRAIN_CASES[case]
    arrays = dense_pool(dtype=dtype)
    single = model(**kw).fit(Tasks(*arrays))
    with make_source(client, arrays, kind, tmp_path) as source:
        dist = model(**kw).fit(source)
    assert dist.n_iter_ == single.n_iter_ == 20
    assert np.array_equal(dist.theta_, single.theta_)
    assert np.array_equal(dist.inner_lr_, single.inner_lr_)
    assert dist.l2_ == single.l2_
    assert [r["loss"] for r in dist.history_] == [r["loss"] for r in single.history_]


def test_minibatches_are_whole_blocks_and_bitwise_equal_on_the_drawn_tasks(client):
    arrays = dense_pool(T=5 * B + 20)
    theta = np.linspace(-0.5, 0.5, 6)
    with DaskTaskSource(client, split(arrays, [2 * B]), meta_batch_size=2 * B, random_state=0) as source:
        seen = set()
        for _ in range(4):
            got = source.meta_value_and_grad(theta, inner_lr=0.3, inner_steps=3, l2=0.01)
            idx = source.last_batch_
            assert idx.size == 2 * B and np.all(np.diff(idx) > 0)
            starts = idx[::B]
            assert np.all(starts % B == 0) and np.array_equal(idx, (starts[:, None] + np.arange(B)).ravel())
            assert idx.max() < 5 * B  # the partial block at the end is never drawn
            seen.update(starts.tolist())
            ref = meta_value_and_grad(theta, tuple(a[idx] for a in arrays), inner_lr=0.3, inner_steps=3, l2=0.01)
            same(got, ref)
        assert len(seen) > 2


# --------------------------------------------------------------------------- (3) unaligned shards


def test_unaligned_shards_differ_from_one_process_by_bounded_rounding(client):
    # Shard 0 holds 100 tasks (not a multiple of 64): the per-block partial sums
    # are grouped differently, so the fold differs by float64 summation rounding:
    # documented bound 1e-12 (relative) for float64 data; for float32 data the
    # final values are float32, so at most about one float32 rounding (1e-6).
    theta = np.linspace(-0.5, 0.5, 6)
    for dtype, bound in ((np.float64, 1e-12), (np.float32, 1e-6)):
        arrays = dense_pool(dtype=dtype, T=3 * B + 70, seed=5)
        ref = meta_value_and_grad(theta, arrays, inner_lr=0.3, inner_steps=3, l2=0.01)
        with pytest.warns(UnalignedShardsWarning, match="not multiples of 64"):
            source = DaskTaskSource(client, split(arrays, [100, 150]))
        with source:
            assert not source.aligned
            got = source.meta_value_and_grad(theta, inner_lr=0.3, inner_steps=3, l2=0.01)
        assert abs(got.loss - ref.loss) <= bound * abs(ref.loss)
        assert rel(got.grad, ref.grad) <= bound
        assert abs(got.grad_inner_lr - ref.grad_inner_lr) <= bound * abs(ref.grad_inner_lr)
        assert abs(got.grad_l2 - ref.grad_l2) <= bound * abs(ref.grad_l2)
    # ... and a training run stays within rounding of one process too.
    arrays = dense_pool(T=3 * B + 70, seed=5)
    single = model(learn_inner_lr="scalar").fit(Tasks(*arrays))
    with pytest.warns(UnalignedShardsWarning):
        source = DaskTaskSource(client, split(arrays, [100, 150]))
    with source:
        dist = model(learn_inner_lr="scalar").fit(source)
    assert rel(dist.theta_, single.theta_) <= 1e-10
    assert abs(dist.inner_lr_ - single.inner_lr_) <= 1e-10 * single.inner_lr_


def test_minibatches_of_unaligned_shards_are_still_exact(client):
    arrays = dense_pool(T=4 * B + 30, seed=6)
    theta = np.linspace(-0.5, 0.5, 6)
    with pytest.warns(UnalignedShardsWarning):
        source = DaskTaskSource(client, split(arrays, [B + 30]), meta_batch_size=2 * B, random_state=1)
    with source:
        for _ in range(3):
            got = source.meta_value_and_grad(theta, inner_lr=0.3, inner_steps=3)
            idx = source.last_batch_
            same(got, meta_value_and_grad(theta, tuple(a[idx] for a in arrays), inner_lr=0.3, inner_steps=3))


# --------------------------------------------------------------------------- (4) a worker dies


class KillDuringIteration(DaskTaskSource):
    """Kills the worker holding shard 0 right after the shard computations of one call were submitted."""

    kill_at_call = 5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.killed = None

    def meta_value_and_grad(self, theta, **kw):
        self.calls += 1
        return super().meta_value_and_grad(theta, **kw)

    def _submit_iteration(self, *args):
        if self.calls == self.kill_at_call and self.killed is None:
            addr = only_one_copy(self.client, self)
            futs = super()._submit_iteration(*args)
            self.killed = kill(self.client, addr)
            return futs
        return super()._submit_iteration(*args)


@pytest.mark.parametrize("kind", ["scatter", "npz"])
@pytest.mark.parametrize("when", ["between", "during"])
def test_a_killed_worker_changes_nothing(client, tmp_path, kind, when):
    kw = dict(learn_inner_lr="scalar", l2=0.01, learn_l2=True)
    arrays = dense_pool()
    single = model(**kw).fit(Tasks(*arrays))
    killed = []
    if when == "between":
        source = make_source(client, arrays, kind, tmp_path)

        def kill_after_5(m, record):
            if record["iteration"] == 5:
                killed.append(kill(client, only_one_copy(client, source)))

        callbacks = [kill_after_5]
    else:
        if kind == "scatter":
            source = KillDuringIteration(client, split(arrays, [2 * B]))
        else:
            source = KillDuringIteration.from_npz(client, save_shards_npz(Tasks(*arrays), tmp_path, 2 * B))
        callbacks = []
    with source:
        dist = model(**kw, callbacks=callbacks).fit(source)
        if when == "during":
            killed.append(source.killed)
            assert source.calls == 20  # the estimator saw each iteration once
        assert killed[0] is not None
        if kind == "scatter":  # scattered data has no lineage: the driver scattered it again
            assert source.n_rescattered_ >= 1
    assert dist.n_iter_ == 20 and len(dist.history_) == 20
    assert [r["iteration"] for r in dist.history_] == list(range(1, 21))
    assert np.array_equal(dist.theta_, single.theta_)
    assert dist.inner_lr_ == single.inner_lr_ and dist.l2_ == single.l2_
    assert [r["loss"] for r in dist.history_] == [r["loss"] for r in single.history_]
    _wait_for_two(client, gone=killed)


def test_lost_scattered_data_is_scattered_again(client):
    # Deterministic form of the worker-loss case for driver-held shards: the
    # scheduler forgets shard 0's data (as when its only holder dies).
    arrays = dense_pool()
    theta = np.linspace(-0.5, 0.5, 6)
    ref = meta_value_and_grad(theta, arrays, inner_lr=0.3, inner_steps=3)
    with DaskTaskSource(client, split(arrays, [2 * B])) as source:
        client.cancel(source._futures[0])
        same(source.meta_value_and_grad(theta, inner_lr=0.3, inner_steps=3), ref)
        assert source.n_rescattered_ == 1
        same(source.meta_value_and_grad(theta, inner_lr=0.3, inner_steps=3), ref)
        assert source.n_rescattered_ == 1


# --------------------------------------------------------------------------- (5) checkpoints


@pytest.mark.parametrize("meta_batch_size", [None, 2 * B])
def test_checkpoint_and_resume_with_a_dask_source(client, tmp_path, meta_batch_size):
    arrays = dense_pool(T=5 * B + 20)
    kw = dict(learn_inner_lr="scalar", n_iterations=12, checkpoint_every=4)

    def source():
        return DaskTaskSource(client, split(arrays, [3 * B]), meta_batch_size=meta_batch_size, random_state=7)

    with source() as src:
        whole = model(**kw).fit(src)
    ckpt = str(tmp_path / "ckpt.npz")
    stop_at_7 = lambda m, record: record["iteration"] == 7
    with source() as src:
        first = model(**kw, checkpoint_path=ckpt, callbacks=[stop_at_7]).fit(src)
    assert first.n_iter_ == 7
    with source() as src:  # a new source (and RNG) on the cluster: the checkpoint restores the stream
        resumed = model(**kw, checkpoint_path=ckpt).fit(src, resume=True)
    assert resumed.n_iter_ == 12
    assert np.array_equal(resumed.theta_, whole.theta_)
    assert resumed.inner_lr_ == whole.inner_lr_
    assert [r["loss"] for r in resumed.history_] == [r["loss"] for r in whole.history_]
    if meta_batch_size is None:
        assert np.array_equal(whole.theta_, model(**kw).fit(Tasks(*arrays)).theta_)


# --------------------------------------------------------------------------- (6) errors and the optional extra


def test_without_dask_the_error_says_what_to_install(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["distributed"] = None  # as if Dask distributed were not installed
        sys.modules["dask"] = None
        import numpy as np
        import fastmaml
        import fastmaml.distributed as fd
        rng = np.random.default_rng(0)
        tasks = fastmaml.Tasks(rng.random((70, 4, 3)), rng.integers(0, 2, (70, 4)),
                               rng.random((70, 5, 3)), rng.integers(0, 2, (70, 5)))
        fastmaml.MAML(n_iterations=2, progress=False).fit(tasks)  # nothing else changes
        paths = fd.save_shards_npz(tasks, {str(tmp_path)!r}, 64)  # the NPZ helpers need NumPy only
        assert fd.load_shard_npz(paths[1]).n_tasks == 6
        try:
            fd.DaskTaskSource(object(), paths)
        except ImportError as exc:
            print(exc)
        """
    )
    # cwd outside the checkout: the installed package, never the source tree, is imported
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert 'pip install "fastmaml[distributed]"' in out.stdout


def test_bad_arguments(client, tmp_path):
    arrays = dense_pool(T=2 * B)
    with pytest.raises(ValueError, match="multiple of 64"):
        save_shards_npz(Tasks(*arrays), tmp_path, shard_size=100)
    with pytest.raises(ValueError, match="multiple of 64"):
        DaskTaskSource(client, split(arrays, [B]), meta_batch_size=100)
    with pytest.raises(ValueError, match="whole blocks"):
        DaskTaskSource(client, split(arrays, [B]), meta_batch_size=4 * B)
    with pytest.raises(TypeError, match="shards\\[1\\]"):
        DaskTaskSource(client, [arrays, 3])
    with pytest.raises(TypeError, match="Client"):
        DaskTaskSource(object(), [arrays])
    other = dense_pool(T=B, d=7)
    with pytest.raises(ValueError, match="same number of features"):
        DaskTaskSource(client, [split(arrays, [])[0], other])
    # a shard a worker cannot load is an error of the data: raised at once, not retried
    missing = npz_shards([str(tmp_path / "nope.npz")])
    with pytest.raises(OSError, match="nope.npz"):
        DaskTaskSource(client, missing)
    with DaskTaskSource(client, [arrays]) as source:
        with pytest.raises(ValueError, match="inner_lr"):
            source.meta_value_and_grad(np.zeros(6), inner_lr=np.ones(4), inner_steps=3)
    with pytest.raises(RuntimeError, match="closed"):
        source.meta_value_and_grad(np.zeros(6), inner_lr=0.1, inner_steps=3)


# --------------------------------------------------------------------------- command line


def test_cli_train_on_the_cluster(client, tmp_path):
    from fastmaml import cli

    if "--scheduler" not in cli._build_parser()._subparsers._group_actions[0].choices["train"].format_help():
        pytest.skip("fastmaml train has no --scheduler option")
    X, y, groups = fastmaml.make_grouped_tasks(n_groups=200, n_per_group=(20, 30), n_features=6, random_state=0)
    data = str(tmp_path / "table.npz")
    np.savez(data, X=X, y=y, groups=groups)
    address = client.scheduler.address
    out = str(tmp_path / "model.npz")
    assert cli.main(["train", data, "--out", out, "--iterations", "10", "--scheduler", address, "--no-progress"]) == 0
    assert MAML.load(out).n_iter_ == 10
    assert cli.main(["train", data, "--out", out, "--iterations", "10", "--shard-size", "64", "--no-progress"]) == 2
