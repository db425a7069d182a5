"""Meta-iterations per second: one process vs a Dask LocalCluster (fastmaml.distributed).

A script, not a pytest module (needs ``pip install "fastmaml[distributed]"``)::

    python benchmarks/bench_distributed.py                 # 8192 tasks, d=784, float32, full batch
    python benchmarks/bench_distributed.py --tasks 2048    # smaller
    python benchmarks/bench_distributed.py --scheduler tcp://host:8786   # an existing cluster

It reports, for the same task pool and settings (MAML, K inner steps, learned
scalar inner_lr, Adam), the median seconds per meta-iteration of

* one process using all its cores (OpenMP) and one process on one thread;
* the pool sharded over the cluster's workers (shards generated *on* the
  workers from a seed, so the driver never ships the pool; the single-process
  runs build the same tasks locally);

checks that the distributed run ends with bitwise the same parameters, and
measures the engine's own per-iteration cost on a tiny pool (2 shards of 64
tasks, where the computation itself is negligible).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import warnings

import numpy as np

import fastmaml
from fastmaml import MAML, Tasks, meta_value_and_grad


def make_shard(seed: int, index: int, size: int, n: int, m: int, d: int, dtype: str) -> Tasks:
    """Shard `index` of a synthetic pool: features in [0, 1) like the bundled datasets, labels from a teacher."""
    rng = np.random.default_rng([seed, index])
    teacher = np.random.default_rng(seed).standard_normal(d) / np.sqrt(d)
    sX = rng.random((size, n, d), dtype=np.float32).astype(dtype, copy=False)
    qX = rng.random((size, m, d), dtype=np.float32).astype(dtype, copy=False)
    shift = rng.standard_normal((size, 1)) * 0.5  # task-specific offset of the decision boundary
    sy = ((sX - 0.5) @ teacher + shift > 0).astype(np.int32)
    qy = ((qX - 0.5) @ teacher + shift > 0).astype(np.int32)
    return Tasks(sX, sy, qX, qy, check_finite=False)


def pool_of(shards) -> Tasks:
    return Tasks(
        np.concatenate([s.support.X for s in shards]),
        np.concatenate([s.support.y.reshape(s.n_tasks, -1) for s in shards]),
        np.concatenate([s.query.X for s in shards]),
        np.concatenate([s.query.y.reshape(s.n_tasks, -1) for s in shards]),
        check_finite=False,
    )


def per_iteration(model) -> float:
    """Median seconds per meta-iteration, first iteration excluded (warm-up)."""
    secs = [r["seconds"] for r in model.history_][1:]
    return statistics.median(secs)


def train(source, args, n_threads=None):
    model = MAML(inner_steps=args.K, inner_lr=args.inner_lr, learn_inner_lr="scalar", meta_lr=1e-3,
                 n_iterations=args.iterations, n_threads=n_threads, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a step-size warning must not stop a benchmark
        model.fit(source)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=8192)
    p.add_argument("--n", type=int, default=20, help="support rows per task")
    p.add_argument("--m", type=int, default=30, help="query rows per task")
    p.add_argument("--d", type=int, default=784)
    p.add_argument("--K", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (1 thread each)")
    p.add_argument("--scheduler", default=None, help="use this cluster instead of a LocalCluster")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    try:
        from distributed import Client, LocalCluster
    except ImportError:
        print('needs Dask distributed: pip install "fastmaml[distributed]"', file=sys.stderr)
        return 2
    from fastmaml.distributed import REDUCE_BLOCK, DaskTaskSource

    n_workers = args.workers
    if args.scheduler:  # ask the cluster how many workers it has (one shard each)
        with Client(args.scheduler) as probe:
            n_workers = len(probe.scheduler_info()["workers"])
    # one shard per worker, whole reduction blocks
    blocks = -(-args.tasks // REDUCE_BLOCK)
    per = -(-blocks // n_workers) * REDUCE_BLOCK
    sizes = [min(per, args.tasks - i * per) for i in range(n_workers) if args.tasks - i * per > 0]
    specs = [functools.partial(make_shard, args.seed, i, s, args.n, args.m, args.d, args.dtype)
             for i, s in enumerate(sizes)]
    gb = args.tasks * (args.n + args.m) * args.d * np.dtype(args.dtype).itemsize / 1e9
    print(f"fastmaml {fastmaml.__version__}; {os.cpu_count()} cores; pool {args.tasks} tasks, n={args.n}, "
          f"m={args.m}, d={args.d}, K={args.K}, {args.dtype} ({gb:.2f} GB of features), full batch; "
          f"{args.iterations} meta-iterations, median s/it after the first")

    # One process first, before any cluster exists (so that nothing else competes for the cores).
    rows = []
    pool = pool_of([spec() for spec in specs])
    single_all = train(pool, args)
    rows.append((f"1 process, {fastmaml._core.max_threads()} OpenMP threads", per_iteration(single_all)))
    single_one = train(pool, args, n_threads=1)
    rows.append(("1 process, 1 thread", per_iteration(single_one)))
    del pool
    tiny = [make_shard(args.seed, 100 + i, REDUCE_BLOCK, 5, 5, 10, "float64") for i in range(2)]
    tpool = pool_of(tiny)
    theta = np.zeros(11)
    t_one = []
    for _ in range(200):
        t = time.perf_counter()
        meta_value_and_grad(theta, tpool, inner_lr=0.1, inner_steps=3)
        t_one.append(time.perf_counter() - t)

    if args.scheduler:
        cluster = None
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", host="127.0.0.1", silence_logs=40)
        client = Client(cluster)
    try:
        t0 = time.perf_counter()
        source = DaskTaskSource(client, specs)
        setup = time.perf_counter() - t0
        dist = train(source, args)
        source.close()
        rows.append((f"Dask: {n_workers} workers x 1 thread ({len(sizes)} shards {sizes})", per_iteration(dist)))
        print(f"  (cluster: shards generated on the workers in {setup:.1f} s)")
        equal = np.array_equal(dist.theta_, single_all.theta_) and dist.inner_lr_ == single_all.inner_lr_

        # Engine overhead: a pool so small that the computation itself is negligible.
        with DaskTaskSource(client, tiny) as tsrc:
            for _ in range(5):
                tsrc.meta_value_and_grad(theta, inner_lr=0.1, inner_steps=3)
            t_dist = []
            for _ in range(50):
                t = time.perf_counter()
                tsrc.meta_value_and_grad(theta, inner_lr=0.1, inner_steps=3)
                t_dist.append(time.perf_counter() - t)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

    print()
    print(f"{'setup':<58} {'s / meta-it':>12} {'meta-it / s':>12}")
    for name, sec in rows:
        print(f"{name:<58} {sec:12.3f} {1 / sec:12.2f}")
    base = rows[0][1]
    print(f"speed-up of the cluster over 1 process (all cores): {base / rows[-1][1]:.2f}x; "
          f"over 1 process on 1 thread: {rows[1][1] / rows[-1][1]:.2f}x")
    print(f"distributed theta bitwise equal to 1 process: {equal}")
    od, oo = statistics.median(t_dist), statistics.median(t_one)
    print(f"engine overhead per meta-iteration (2 shards x 64 tasks, d=10): distributed {1e3 * od:.1f} ms vs "
          f"in-process {1e3 * oo:.2f} ms -> {1e3 * (od - oo):.1f} ms")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
