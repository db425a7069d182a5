"""Meta-training on a Dask distributed cluster.

When the task pool outgrows one machine, its tasks live on the workers in
*shards*; every meta-iteration sends the parameters out, each worker computes
its shard's per-block partial sums of the meta-gradient with the C++ core
(:func:`fastmaml.meta_block_sums`), and the driver folds them in task order
(:func:`fastmaml.combine_block_sums`) and updates the parameters. Task data
never travels back to the driver::

    from dask.distributed import Client
    from fastmaml import MAML
    from fastmaml.distributed import DaskTaskSource, save_shards_npz

    paths = save_shards_npz(tasks, "shards/", shard_size=4096)   # once
    with Client("tcp://scheduler:8786") as client:
        source = DaskTaskSource.from_npz(client, paths)           # workers load their shards
        model = MAML(learn_inner_lr="scalar", n_iterations=500).fit(source)

Shards
------
A shard spec is either

* a callable run *on a worker* that returns a :class:`fastmaml.Tasks` (or a
  4-tuple), e.g. ``functools.partial(load_shard_npz, path)``: the worker
  loads the data itself, and Dask recomputes the shard from this lineage if
  the worker holding it is lost; or
* a :class:`fastmaml.Tasks` / 4-tuple held by the driver (see
  :func:`split_tasks`): it is scattered to one worker
  (``client.scatter(..., broadcast=False)``); the driver keeps its reference
  so that it can scatter it again if that worker is lost.

The task pool is the concatenation of the shards, in order. Each iteration
runs one Dask task per shard, placed by Dask's scheduler where the shard's
data is; Dask may still copy a *small* shard to an idle worker when that is
cheaper than waiting (work stealing weighs transfer time against compute
time, so multi-megabyte shards stay put). Such a copy is harmless: results
do not depend on where a shard is computed.

Exactness
---------
The core sums per-task results in fixed blocks of ``REDUCE_BLOCK`` (64)
tasks. When every shard but the last holds a multiple of 64 tasks ("aligned"
shards), the distributed result is **bitwise equal** to
:func:`fastmaml.meta_value_and_grad` on the concatenated pool, and training
with :class:`DaskTaskSource` is bitwise equal to ``MAML.fit`` on the pool as
one :class:`fastmaml.Tasks` (same settings). Unaligned shards are accepted
with an :class:`UnalignedShardsWarning`: the partial sums are then folded in
task order but grouped differently, so results differ by float64 summation
rounding only -- a relative error (max |a - b| / max |b|) of at most a few
1e-16 for float64 data (tests bound it by 1e-12), and at most one float32
rounding of the final value for float32 data (bounded by 1e-6). Over many
iterations such differences can grow like any rounding difference.

Ragged tasks (groups of different sizes): the core chooses between two exact
sweeps by a cost model of the *mean* support size of the call; a shard's mean
can differ from the pool's, so the source computes the pool's choice and
passes it to every shard explicitly, keeping the result bitwise.

Fault tolerance
---------------
If a worker is lost during an iteration, the iteration is retried (up to
``max_retries`` times) on the remaining workers: shards loaded by workers are
recomputed by Dask from their lineage, driver-held shards are scattered
again. Shards whose partial sums already arrived are not recomputed; the
estimator only ever sees the one, complete result of an iteration, so no
meta-iteration is lost or counted twice. Checkpoints work as on one machine
(the source's state -- the minibatch generator -- is saved with them).

Dask is an optional dependency: ``pip install "fastmaml[distributed]"``
(which installs ``dask[distributed]``). Without it this module still imports,
and the NPZ shard helpers work; only :class:`DaskTaskSource` needs Dask.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import time
import uuid
import warnings
from typing import Any

import numpy as np

from .functional import (
    REDUCE_BLOCK,
    BlockSums,
    DivergenceError,
    MetaGradient,
    choose_sweep,
    combine_block_sums,
    meta_block_sums,
)
from ._tasks import Tasks, _Side

__all__ = [
    "DaskTaskSource",
    "UnalignedShardsWarning",
    "distributed_meta_value_and_grad",
    "load_shard_npz",
    "npz_shards",
    "save_shards_npz",
    "split_tasks",
]

logger = logging.getLogger("fastmaml.distributed")

_INSTALL_HINT = 'pip install "fastmaml[distributed]"  (or: pip install "dask[distributed]")'
_SHARD_FORMAT_VERSION = 1


class UnalignedShardsWarning(UserWarning):
    """Shards do not align with the core's reduction blocks: results match one process to rounding, not bitwise."""


def _import_distributed():
    """The `distributed` package, or an ImportError that says how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            "fastmaml.distributed needs Dask distributed, which is not installed. Install the optional extra: "
            + _INSTALL_HINT
        ) from exc
    return distributed


def _retryable_errors(distributed) -> tuple:
    """Exceptions that mean "a worker or a connection was lost", not "the computation failed"."""
    import concurrent.futures

    # Not OSError at large: a shard loader's FileNotFoundError is an error of the data, not of the cluster.
    errs: list = [ConnectionError, concurrent.futures.CancelledError]
    for mod, name in (
        ("distributed.client", "FutureCancelledError"),
        ("distributed.client", "FuturesCancelledError"),
        ("distributed.scheduler", "KilledWorker"),
        ("distributed.comm.core", "CommClosedError"),
    ):
        try:
            module = __import__(mod, fromlist=[name])
            cls = getattr(module, name, None)
        except ImportError:  # pragma: no cover - layout differs between versions
            cls = None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errs.append(cls)
    return tuple(errs)


# --------------------------------------------------------------------------
# Tasks helpers (pure NumPy; also run on the workers)
# --------------------------------------------------------------------------


def _as_tasks(obj, name="shard") -> Tasks:
    if isinstance(obj, Tasks):
        return obj
    if isinstance(obj, tuple) and len(obj) == 4:
        return Tasks(*obj)
    raise TypeError(f"{name}: expected a fastmaml.Tasks or a 4-tuple (Xs, ys, Xq, yq), got {type(obj).__name__}")


def _positions(ptr: np.ndarray, task_idx: np.ndarray):
    """Flat positions of the rows of tasks `task_idx` (in that order) and the new offsets."""
    sizes = (ptr[1:] - ptr[:-1])[task_idx]
    new_ptr = np.zeros(task_idx.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=new_ptr[1:])
    starts = np.repeat(ptr[:-1][task_idx] - new_ptr[:-1], sizes)
    return np.arange(new_ptr[-1], dtype=np.int64) + starts, new_ptr


def _take_tasks(tasks: Tasks, task_idx) -> Tasks:
    """Tasks `task_idx` of `tasks`, as an index-form view: no feature row is copied.

    Each task keeps its rows, labels and order of rows, so the core computes
    exactly what it computes for these tasks in any other form.
    """
    task_idx = np.asarray(task_idx, dtype=np.int64)
    out = Tasks.__new__(Tasks)
    sides = []
    for side in (tasks.support, tasks.query):
        pos, ptr = _positions(side.ptr, task_idx)
        d = side.X.shape[-1]
        X2 = side.X.reshape(-1, d)  # a view (the arrays are C-contiguous)
        idx = pos if side.idx is None else side.idx[pos]
        sides.append(_Side(X2, np.ascontiguousarray(idx, dtype=np.int64), ptr, np.ascontiguousarray(side.y[pos])))
    out.support, out.query = sides
    out.n_tasks = int(task_idx.size)
    out.n_features = tasks.n_features
    out.dtype = tasks.dtype
    out.is_indexed = True
    # the dataset kernel (if any) is indexed by the support rows, which keep their numbering
    out.kernel = getattr(tasks, "kernel", None)
    return out


def _shard_arrays(tasks: Tasks, start: int, stop: int) -> dict:
    """Self-contained arrays for tasks [start, stop) (index form keeps only the rows it uses)."""
    if not tasks.is_indexed:
        n = int(tasks.support.ptr[1] - tasks.support.ptr[0])
        m = int(tasks.query.ptr[1] - tasks.query.ptr[0])
        return {
            "format": np.array("dense"),
            "support_X": tasks.support.X[start:stop],
            "support_y": tasks.support.y[start * n:stop * n].reshape(-1, n),
            "query_X": tasks.query.X[start:stop],
            "query_y": tasks.query.y[start * m:stop * m].reshape(-1, m),
        }
    sub = _take_tasks(tasks, np.arange(start, stop))
    s, q = sub.support, sub.query
    extra = {}
    if tasks.support.X is tasks.query.X:  # one shared dataset (Tasks.from_index)
        rows = np.unique(np.concatenate([s.idx, q.idx]))
        X = s.X[rows]
        s_idx, q_idx = np.searchsorted(rows, s.idx), np.searchsorted(rows, q.idx)
        kernel = getattr(tasks, "kernel", None)
        if kernel is not None:  # keep the kernel entries (gathered Gram values differ from recomputed ones)
            extra = {"kernel": np.ascontiguousarray(kernel[np.ix_(rows, rows)])}
    else:  # separate support and query arrays (not made by the public constructors); no kernel
        s_rows, q_rows = np.unique(s.idx), np.unique(q.idx)
        X = np.concatenate([s.X[s_rows], q.X[q_rows]])
        s_idx = np.searchsorted(s_rows, s.idx)
        q_idx = s_rows.size + np.searchsorted(q_rows, q.idx)
    return {
        "format": np.array("index"),
        "X": X,
        "support_idx": s_idx.astype(np.int64),
        "support_y": s.y,
        "support_ptr": s.ptr,
        "query_idx": q_idx.astype(np.int64),
        "query_y": q.y,
        "query_ptr": q.ptr,
        **extra,
    }


def _check_shard_size(shard_size, name="shard_size") -> int:
    if isinstance(shard_size, bool) or not isinstance(shard_size, numbers.Integral) or shard_size < 1:
        raise ValueError(f"{name}: expected a positive integer, got {shard_size!r}")
    shard_size = int(shard_size)
    if shard_size % REDUCE_BLOCK:
        lo = max(REDUCE_BLOCK, shard_size // REDUCE_BLOCK * REDUCE_BLOCK)
        raise ValueError(
            f"{name}: expected a multiple of {REDUCE_BLOCK} tasks (the core's reduction block) so that "
            f"distributed results are bitwise equal to one process; got {shard_size}, use e.g. {lo} or "
            f"{lo + REDUCE_BLOCK}"
        )
    return int(shard_size)


def _tasks_from_arrays(arrays: dict, check_finite: bool = False) -> Tasks:
    if str(arrays["format"]) == "dense":
        return Tasks(arrays["support_X"], arrays["support_y"], arrays["query_X"], arrays["query_y"],
                     check_finite=check_finite)
    return Tasks.from_index(
        arrays["X"], arrays["support_idx"], arrays["support_y"], arrays["query_idx"], arrays["query_y"],
        support_ptr=arrays["support_ptr"], query_ptr=arrays["query_ptr"], check_finite=check_finite,
        kernel=arrays.get("kernel"),
    )


def split_tasks(tasks, *, shard_size=None, n_shards=None) -> list:
    """Split a task pool held by the driver into shards of whole reduction blocks.

    Give ``shard_size`` (a multiple of 64) or ``n_shards`` (the pool is cut
    into that many shards of whole blocks, as even as blocks allow). Dense
    shards are views; an index-form shard keeps only the dataset rows (and
    kernel entries) its tasks use, so that scattering it ships its own data
    only. Pass the list to :class:`DaskTaskSource`.
    """
    ts = _as_tasks(tasks, "tasks")
    if (shard_size is None) == (n_shards is None):
        raise ValueError("split_tasks: give exactly one of shard_size and n_shards")
    if n_shards is not None:
        if isinstance(n_shards, bool) or not isinstance(n_shards, numbers.Integral) or n_shards < 1:
            raise ValueError(f"n_shards: expected a positive integer, got {n_shards!r}")
        blocks = -(-ts.n_tasks // REDUCE_BLOCK)
        shard_size = max(1, -(-blocks // int(n_shards))) * REDUCE_BLOCK
    size = _check_shard_size(shard_size)
    out = []
    for start in range(0, ts.n_tasks, size):
        out.append(_tasks_from_arrays(_shard_arrays(ts, start, min(ts.n_tasks, start + size))))
    return out


def save_shards_npz(tasks, folder, shard_size: int, *, prefix: str = "shard") -> list:
    """Write a task pool as NPZ shards of whole reduction blocks, for workers to load.

    Parameters
    ----------
    tasks : Tasks or tuple (Xs, ys, Xq, yq)
        Dense or index-form. An index-form shard stores only the dataset rows
        its tasks use (indices remapped), so every file is self-contained.
    folder : str or path
        Created if needed.
    shard_size : int
        Tasks per shard, a positive multiple of ``fastmaml.distributed.REDUCE_BLOCK``
        (64) so that the shards align with the core's reduction blocks (the
        last shard holds the remainder).
    prefix : str, default="shard"

    Returns
    -------
    list of str
        The paths, in task order (``{prefix}-00000.npz``, ...). Each is
        written atomically and read with ``allow_pickle=False`` by
        :func:`load_shard_npz`.
    """
    ts = _as_tasks(tasks, "tasks")
    shard_size = _check_shard_size(shard_size)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, start in enumerate(range(0, ts.n_tasks, int(shard_size))):
        stop = min(ts.n_tasks, start + int(shard_size))
        arrays = _shard_arrays(ts, start, stop)
        arrays["fastmaml_shard_version"] = np.array(_SHARD_FORMAT_VERSION)
        path = os.path.join(folder, f"{prefix}-{k:05d}.npz")
        tmp = path + f".tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def load_shard_npz(path, *, check_finite: bool = True) -> Tasks:
    """Read one shard written by :func:`save_shards_npz` (``allow_pickle=False``)."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise OSError(f"path: cannot read {path!r} as a fastmaml shard ({exc})") from exc
    version = int(arrays.get("fastmaml_shard_version", -1))
    if version != _SHARD_FORMAT_VERSION or "format" not in arrays:
        raise ValueError(f"path: {path!r} is not a fastmaml shard (format version {version})")
    fmt = str(arrays["format"])
    if fmt not in ("dense", "index"):
        raise ValueError(f"path: {path!r} has an unknown shard format {fmt!r}")
    return _tasks_from_arrays(arrays, check_finite=check_finite)


def npz_shards(paths_or_folder, *, check_finite: bool = True) -> list:
    """Shard specs (``functools.partial(load_shard_npz, path)``) for NPZ shards, in task order.

    ``paths_or_folder`` is a list of paths (used in the given order) or a folder
    (its ``*.npz`` files in sorted name order, as :func:`save_shards_npz` names them).
    """
    if isinstance(paths_or_folder, (str, os.PathLike)):
        folder = os.fspath(paths_or_folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"paths_or_folder: no such folder {folder!r}")
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".npz"))
        if not paths:
            raise FileNotFoundError(f"paths_or_folder: no .npz shards in {folder!r}")
    else:
        paths = [os.fspath(p) for p in paths_or_folder]
    return [functools.partial(load_shard_npz, p, check_finite=check_finite) for p in paths]


# --------------------------------------------------------------------------
# functions run on the workers
# --------------------------------------------------------------------------


def _load_shard(spec) -> Tasks:
    return _as_tasks(spec(), "shard (returned by the shard callable)")


def _shard_info(tasks: Tasks) -> dict:
    ys = tasks.support.y
    yq = tasks.query.y
    top = max(int(ys.max()) if ys.size else 0, int(yq.max()) if yq.size else 0)
    return {
        "n_tasks": int(tasks.n_tasks),
        "n_features": int(tasks.n_features),
        "dtype": str(tasks.dtype),
        "max_label": top,
        "kernel": getattr(tasks, "kernel", None) is not None and tasks.support.idx is not None,
        "support_sizes": np.diff(tasks.support.ptr).astype(np.int64),
    }


def _worker_threads():
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except Exception:
        try:
            from distributed import get_worker

            return int(get_worker().nthreads)
        except Exception:
            return None


def _shard_block_sums(tasks, shard_index, selection, theta, inner_lr, inner_steps, l2, first_order, n_threads,
                      sweep) -> BlockSums:
    if selection is not None:
        tasks = _take_tasks(tasks, selection)
    nt = n_threads if n_threads is not None else _worker_threads()
    try:
        return meta_block_sums(theta, tasks, inner_lr=inner_lr, inner_steps=inner_steps, l2=l2,
                               first_order=first_order, n_threads=nt, sweep=sweep)
    except DivergenceError as exc:
        raise DivergenceError(f"shard {shard_index} (task numbers are within the shard's batch): {exc}") from None


# --------------------------------------------------------------------------
# the driver side
# --------------------------------------------------------------------------


def _fold_unaligned(parts) -> MetaGradient:
    """Fold every block of every shard in task order (for shards that do not align with blocks)."""
    first = parts[0]
    total = np.zeros(first.blocks.shape[1])
    for p in parts:
        for row in p.blocks:
            total += row
    one = BlockSums(blocks=total[None, :], n_tasks=sum(p.n_tasks for p in parts), theta_shape=first.theta_shape,
                    dtype=first.dtype, lr_shape=first.lr_shape, scalar_in=first.scalar_in)
    return combine_block_sums([one])


def _sweep_for(n_rows: int, n_tasks: int, d: int, C: int, K: int, kernel: bool, inner_lr, first_order: bool) -> str:
    """The exact path the core takes for a whole batch with `n_rows` support rows in all.

    The core's own decision (:func:`fastmaml.functional.choose_sweep`): its
    cost model and its check that the Gram sweep applies (never for a
    per-parameter inner_lr), so the forced sweep is one the core accepts.
    """
    return choose_sweep(n_rows, n_tasks, d, inner_steps=K, inner_lr=inner_lr, n_classes=C,
                        first_order=first_order, kernel=kernel)


class DaskTaskSource:
    """A task pool sharded over a Dask cluster, usable as ``MAML.fit(source)``.

    Parameters
    ----------
    client : distributed.Client
    shards : list
        Shard specs, in task order: callables that return a
        :class:`fastmaml.Tasks` when run on a worker (e.g.
        ``functools.partial(load_shard_npz, path)``, see :func:`npz_shards`),
        or Tasks / 4-tuples held by the driver (scattered to the workers).
        Every shard but the last should hold a multiple of
        ``REDUCE_BLOCK`` (64) tasks for results bitwise equal to one process
        (otherwise an :class:`UnalignedShardsWarning`; see the module docs).
        All shards must have the same number of features and the same dtype.
    meta_batch_size : int, optional
        None (default): every iteration uses the whole pool ("full batch";
        then ``MAML(...).fit(source)`` equals ``MAML(...).fit(pool)``
        bitwise). An int, a multiple of 64: every iteration uses that many
        tasks, whole blocks of 64 consecutive tasks of a shard, drawn without
        replacement by a seeded generator on the driver; a shard's trailing
        partial block is never drawn. The result equals
        :func:`fastmaml.meta_value_and_grad` on the drawn tasks (in pool
        order, see ``last_batch_``) bitwise.
    random_state : int, numpy.random.Generator or None
        Seeds the minibatch draws.
    n_threads_per_worker : int, optional
        OpenMP threads of each shard's computation. None: the Dask worker's
        thread count (``--nthreads``; note that Dask sets OMP_NUM_THREADS=1 in
        worker processes, so OpenMP's own default would be one thread).
    max_retries : int, default=5
        How often an iteration is retried after losing a worker.
    timeout : float, optional
        Seconds to wait for one iteration's results (None: no limit).

    Attributes
    ----------
    n_features : int
    n_classes : int
        2 for binary tasks.
    n_tasks : int
        Tasks in the pool.
    shard_sizes : list of int
    aligned : bool
        Whether the shards align with the reduction blocks.
    last_batch_ : ndarray of int or None
        Pool indices of the tasks used by the last call (None for full batch).
    n_retries_ : int
        Iteration attempts repeated after a lost worker (diagnostics).
    n_rescattered_ : int
        Driver-held shards scattered again after their worker was lost.
    """

    client: Any
    _futures: list
    _rng: np.random.Generator
    _closed: bool

    def __init__(self, client, shards, *, meta_batch_size=None, random_state=None, n_threads_per_worker=None,
                 max_retries: int = 5, timeout=None) -> None:
        distributed = _import_distributed()
        from ._random import check_random_state as _check_random_state

        for attr in ("submit", "scatter", "gather"):
            if not callable(getattr(client, attr, None)):
                raise TypeError(f"client: expected a dask.distributed.Client, got {type(client).__name__}")
        shards = list(shards)
        if not shards:
            raise ValueError("shards: expected at least one shard")
        if n_threads_per_worker is not None:
            if isinstance(n_threads_per_worker, bool) or not isinstance(n_threads_per_worker, numbers.Integral) \
                    or n_threads_per_worker < 1:
                raise ValueError(f"n_threads_per_worker: expected None or an integer >= 1, got {n_threads_per_worker!r}")
            n_threads_per_worker = int(n_threads_per_worker)
        if isinstance(max_retries, bool) or not isinstance(max_retries, numbers.Integral) or max_retries < 0:
            raise ValueError(f"max_retries: expected an integer >= 0, got {max_retries!r}")
        self.client = client
        self.n_threads_per_worker = n_threads_per_worker
        self.max_retries = int(max_retries)
        self.timeout = timeout
        self._distributed = distributed
        self._retryable = _retryable_errors(distributed)
        self._token = uuid.uuid4().hex[:12]
        self._rng = _check_random_state(random_state)
        self.last_batch_ = None
        self.n_retries_ = 0
        self.n_rescattered_ = 0

        # Which shards the driver holds (kept for re-scattering) and which the workers load.
        self._driver_data = {}
        self._loaders = {}
        for i, spec in enumerate(shards):
            if isinstance(spec, (Tasks, tuple)):
                self._driver_data[i] = _as_tasks(spec, f"shards[{i}]")
            elif callable(spec):
                self._loaders[i] = spec
            else:
                raise TypeError(
                    f"shards[{i}]: expected a callable returning Tasks (run on a worker), a Tasks or a 4-tuple, "
                    f"got {type(spec).__name__}"
                )
        self._futures = [None] * len(shards)
        self._closed = False
        try:
            self._place_all()
            self._set_metadata(self._gather_infos())
            self._set_batching(meta_batch_size)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------- placement
    def _workers(self) -> list:
        try:
            return sorted(self.client.scheduler_info()["workers"])
        except Exception:
            return []

    def _scatter(self, indices):
        if not indices:
            return
        futs = self.client.scatter([self._driver_data[i] for i in indices], broadcast=False, hash=False)
        for i, f in zip(indices, futs):
            self._futures[i] = f

    def _submit_loader(self, i, workers):
        kw = {}
        if workers:  # spread the loads round-robin; Dask may move them (e.g. to recompute a lost shard)
            kw = {"workers": [workers[i % len(workers)]], "allow_other_workers": True}
        key = f"fastmaml-shard-{i}-{self._token}-{uuid.uuid4().hex[:8]}"
        self._futures[i] = self.client.submit(_load_shard, self._loaders[i], key=key, pure=False, **kw)

    def _place_all(self):
        self._scatter(sorted(self._driver_data))
        workers = self._workers()
        for i in sorted(self._loaders):
            self._submit_loader(i, workers)

    def _gather_infos(self):
        futs = [self.client.submit(_shard_info, f, pure=False) for f in self._futures]
        try:
            return self.client.gather(futs)
        finally:
            for f in futs:
                f.release()

    def _repair(self):
        """Put back shards whose data was lost (scattered data has no lineage; Dask recomputes loaded shards)."""
        lost_scattered, lost_loaded = [], []
        for i, f in enumerate(self._futures):
            status = f.status
            if status == "error" and not isinstance(f.exception(), self._retryable):
                f.result()  # the shard cannot be loaded: raise its error
            if status in ("cancelled", "lost", "error"):  # error here: its workers kept dying (KilledWorker)
                (lost_scattered if i in self._driver_data else lost_loaded).append(i)
        if lost_scattered:
            logger.warning("fastmaml.distributed: scattering shards %s again (their worker was lost)", lost_scattered)
            self._scatter(lost_scattered)
            self.n_rescattered_ += len(lost_scattered)
        if lost_loaded:
            workers = self._workers()
            for i in lost_loaded:
                self._submit_loader(i, workers)

    def who_has(self) -> list:
        """The worker addresses holding each shard, in shard order (diagnostics)."""
        held = self.client.who_has(self._futures)
        return [tuple(held.get(f.key, ())) for f in self._futures]

    # ------------------------------------------------------------ metadata
    def _set_metadata(self, infos):
        feats = {info["n_features"] for info in infos}
        if len(feats) != 1:
            raise ValueError(f"shards: every shard must have the same number of features, got {[i['n_features'] for i in infos]}")
        dtypes = {info["dtype"] for info in infos}
        if len(dtypes) != 1:
            raise ValueError(
                f"shards: every shard must have the same dtype (one compute dtype for the pool), got "
                f"{[i['dtype'] for i in infos]}"
            )
        self.n_features = feats.pop()
        self.dtype = np.dtype(dtypes.pop())
        self.n_classes = max(2, max(info["max_label"] for info in infos) + 1)
        self.shard_sizes = [info["n_tasks"] for info in infos]
        self.n_tasks = sum(self.shard_sizes)
        self._offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._support_sizes = [info["support_sizes"] for info in infos]
        self._kernel = all(info["kernel"] for info in infos)
        if any(info["kernel"] for info in infos) and not self._kernel:
            warnings.warn(
                "shards: some shards carry a dataset kernel matrix and others do not; the Gram sweep gathers from "
                "the kernel where there is one, so results match one process to rounding only",
                UnalignedShardsWarning,
                stacklevel=3,
            )
        self.aligned = all(s % REDUCE_BLOCK == 0 for s in self.shard_sizes[:-1])
        if not self.aligned:
            bad = [i for i, s in enumerate(self.shard_sizes[:-1]) if s % REDUCE_BLOCK]
            warnings.warn(
                f"shards {bad} hold {[self.shard_sizes[i] for i in bad]} tasks, not multiples of {REDUCE_BLOCK} "
                "(the core's reduction block): the distributed meta-gradient will equal one process's only to "
                "float64 summation rounding, not bitwise. Use shards of whole blocks (save_shards_npz does).",
                UnalignedShardsWarning,
                stacklevel=3,
            )

    def _set_batching(self, meta_batch_size):
        self.meta_batch_size = meta_batch_size
        if meta_batch_size is None:
            self._chunks = None
            return
        if isinstance(meta_batch_size, bool) or not isinstance(meta_batch_size, numbers.Integral) \
                or meta_batch_size < 1:
            raise ValueError(f"meta_batch_size: expected None or a positive integer, got {meta_batch_size!r}")
        if meta_batch_size % REDUCE_BLOCK:
            lo = max(REDUCE_BLOCK, meta_batch_size // REDUCE_BLOCK * REDUCE_BLOCK)
            raise ValueError(
                f"meta_batch_size: expected a multiple of {REDUCE_BLOCK} (whole reduction blocks are drawn), got "
                f"{meta_batch_size}; use e.g. {lo}"
            )
        # (shard, first task within the shard) of every whole block
        chunks = [(s, c * REDUCE_BLOCK) for s, size in enumerate(self.shard_sizes) for c in range(size // REDUCE_BLOCK)]
        need = meta_batch_size // REDUCE_BLOCK
        if need > len(chunks):
            raise ValueError(
                f"meta_batch_size: {meta_batch_size} tasks need {need} whole blocks of {REDUCE_BLOCK}; the shards "
                f"hold {len(chunks)}"
            )
        self._chunks = np.array(chunks, dtype=np.int64).reshape(-1, 2)

    # --------------------------------------------------------------- state
    def get_state(self) -> dict:
        """JSON-serialisable state: the minibatch generator's (``{}`` in full-batch mode)."""
        if self._chunks is None:
            return {}
        from ._random import get_rng_state as _get_rng_state

        return {"rng": _get_rng_state(self._rng)}

    def set_state(self, state) -> None:
        """Restore :meth:`get_state` (e.g. from a checkpoint)."""
        if not isinstance(state, dict):
            raise ValueError(f"state: expected a dict from get_state(), got {type(state).__name__}")
        if self._chunks is None or not state:
            return
        from ._random import set_rng_state as _set_rng_state

        self._rng = _set_rng_state(self._rng, state["rng"])

    # --------------------------------------------------------------- calls
    def _draw(self):
        """Per-shard task selections (None: the whole shard) for one iteration."""
        if self._chunks is None:
            self.last_batch_ = None
            return [None] * len(self.shard_sizes)
        picks = np.sort(self._rng.choice(len(self._chunks), size=self.meta_batch_size // REDUCE_BLOCK,
                                         replace=False))
        chosen = self._chunks[picks]
        block = np.arange(REDUCE_BLOCK, dtype=np.int64)
        sel = []
        for s in range(len(self.shard_sizes)):
            starts = chosen[chosen[:, 0] == s, 1]
            sel.append((starts[:, None] + block).reshape(-1) if starts.size else np.empty(0, np.int64))
        self.last_batch_ = np.concatenate([self._offsets[s] + idx for s, idx in enumerate(sel)])
        return sel

    def _sweeps(self, selections, K: int, theta_ndim: int, theta_cols: int, inner_lr, first_order: bool) -> list:
        """"auto" for every shard, unless ragged shards would make a shard's cost model differ from the batch's."""
        C = 1 if theta_ndim == 1 else theta_cols
        totals, counts = [], []
        for sizes, sel in zip(self._support_sizes, selections):
            part = sizes if sel is None else sizes[sel]
            totals.append(int(part.sum()))
            counts.append(int(part.size))
        used = [i for i, c in enumerate(counts) if c]
        batch_rows, batch_tasks = sum(totals), sum(counts)
        whole = math.ceil(batch_rows / batch_tasks)
        if all(math.ceil(totals[i] / counts[i]) == whole for i in used):
            return ["auto"] * len(selections)
        return [_sweep_for(batch_rows, batch_tasks, self.n_features, C, K, self._kernel, inner_lr,
                           first_order)] * len(selections)

    def _submit_iteration(self, todo, selections, sweeps, args):
        """Submit one shard computation per index in `todo`; returns {shard: future}."""
        theta, inner_lr, K, l2, first_order = args
        futs = {}
        for i in todo:
            futs[i] = self.client.submit(
                _shard_block_sums, self._futures[i], i, selections[i], theta, inner_lr, K, l2, first_order,
                self.n_threads_per_worker, sweeps[i], pure=False,
            )
        return futs

    def _collect(self, futs, results, iteration):
        """Gather what finished into `results` {shard: BlockSums}; return the failure to retry after, if any.

        Errors of the computation itself (bad arguments, divergence, a shard
        that cannot be loaded) are raised; lost workers or data are returned
        as the reason to retry the shards that did not finish.
        """
        order = list(futs)
        if self.timeout is not None:
            try:
                self._distributed.wait(list(futs.values()), timeout=self.timeout)
            except TimeoutError:
                for f in futs.values():
                    f.cancel()
                raise TimeoutError(
                    f"iteration {iteration}: the workers did not return the meta-gradient within {self.timeout} s"
                ) from None
        try:  # the common case: one round trip
            results.update(zip(order, self.client.gather([futs[i] for i in order])))
            return None
        except self._retryable as exc:
            failure = exc
        # Something was lost: wait for the rest to settle, keep what finished.
        try:
            self._distributed.wait(list(futs.values()))
        except self._retryable:  # wait() raises when some futures were cancelled; they are retried
            pass
        done = []
        for i in order:
            f = futs[i]
            if f.status == "finished":
                done.append(i)
            elif f.status == "error" and not isinstance(f.exception(), self._retryable):
                f.result()  # a real error of the computation: raise it with its traceback
        if done:
            try:
                results.update(zip(done, self.client.gather([futs[i] for i in done])))
            except self._retryable as exc:  # a result was lost on its way back: retry those shards too
                failure = exc
        return failure

    def meta_value_and_grad(self, theta, *, inner_lr, inner_steps, l2=0.0, first_order=False, iteration=None):
        """The meta-loss and its gradients on the pool (or this iteration's minibatch).

        Same arguments and result as :func:`fastmaml.meta_value_and_grad`
        (``iteration`` is accepted for the estimator and otherwise unused).
        Only the parameters go to the workers and only per-block partial sums
        come back.
        """
        if self._closed:
            raise RuntimeError("this DaskTaskSource is closed")
        theta = np.array(theta)  # a private copy: the caller may update it in place
        if isinstance(inner_lr, np.ndarray):
            inner_lr = inner_lr.copy()
        selections = self._draw()
        sweeps = self._sweeps(selections, int(inner_steps), theta.ndim, theta.shape[-1] if theta.ndim > 1 else 1,
                              inner_lr, bool(first_order))
        args = (theta, inner_lr, inner_steps, l2, bool(first_order))
        todo = [i for i, sel in enumerate(selections) if sel is None or sel.size]
        results = {}
        attempt = 0
        while True:
            self._repair()
            futs = self._submit_iteration(todo, selections, sweeps, args)
            try:
                failure = self._collect(futs, results, iteration)
            finally:
                for f in futs.values():
                    f.release()
            todo = [i for i in todo if i not in results]
            if not todo:
                break
            attempt += 1
            self.n_retries_ += 1
            if attempt > self.max_retries:
                raise RuntimeError(
                    f"iteration {iteration}: gave up after {self.max_retries} retries; the last failure was "
                    f"{type(failure).__name__}: {failure}"
                ) from failure
            logger.warning("fastmaml.distributed: iteration %s: retrying shards %s after %s: %s", iteration, todo,
                           type(failure).__name__, failure)
            time.sleep(min(0.05 * 2 ** attempt, 2.0))
        parts = [results[i] for i in sorted(results)]
        if self._chunks is not None or self.aligned:
            return combine_block_sums(parts)
        return _fold_unaligned(parts)

    # ----------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the shards on the workers (the client stays open)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for f in self._futures:
            if f is not None:
                try:
                    f.release()
                except Exception:
                    pass
        self._futures = [None] * len(self._futures)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    @classmethod
    def from_npz(cls, client, paths_or_folder, *, check_finite: bool = True, **kwargs) -> DaskTaskSource:
        """A source whose workers load the NPZ shards of :func:`save_shards_npz` themselves."""
        return cls(client, npz_shards(paths_or_folder, check_finite=check_finite), **kwargs)

    def __repr__(self) -> str:
        mode = "full batch" if self.meta_batch_size is None else f"meta_batch_size={self.meta_batch_size}"
        return (
            f"DaskTaskSource(n_tasks={self.n_tasks}, shards={len(self.shard_sizes)}, n_features={self.n_features}, "
            f"dtype={self.dtype}, {mode}{'' if self.aligned else ', unaligned'})"
        )


def distributed_meta_value_and_grad(client, shards, theta, *, inner_lr, inner_steps, l2=0.0, first_order=False,
                                    n_threads_per_worker=None) -> MetaGradient:
    """One meta-gradient of a sharded pool on a Dask cluster (the functional core's distributed form).

    Equivalent to ``fastmaml.meta_value_and_grad(theta, pool, ...)`` where
    ``pool`` is the concatenation of ``shards`` (bitwise, for shards of whole
    blocks; see :class:`DaskTaskSource`). For many iterations on the same
    shards, build one :class:`DaskTaskSource` instead: this helper places the
    shards on the workers and releases them again on every call.
    """
    with DaskTaskSource(client, shards, n_threads_per_worker=n_threads_per_worker) as source:
        return source.meta_value_and_grad(theta, inner_lr=inner_lr, inner_steps=inner_steps, l2=l2,
                                          first_order=first_order)
