"""Task samplers: meta-batches of episodes or groups as index-form `Tasks`.

Every sampler keeps one dataset ``X`` (checked once, never copied) and returns
:class:`fastmaml.Tasks` built with :meth:`Tasks.from_index`, so a meta-batch
costs a few small integer arrays, not copies of feature rows.

* :class:`EpisodeSampler` -- N-way K-shot episodes with Q queries per class
  from any labelled table ``(X, y)``, restricted to a class split
  (``classes`` or 2-way ``pairs``) and a row split (``rows``), with random
  label assignment per episode.
* :class:`GroupedSampler` -- one task per group of a table ``(X, y, groups)``
  (per-customer, per-patient, per-device models), with a random
  support/query split inside each group; ragged tasks.

Splits of groups, classes and rows live in :mod:`fastmaml.splits`, the
synthetic task family :func:`~fastmaml.datasets.make_grouped_tasks` and the
dataset kernel :func:`~fastmaml.datasets.dataset_kernel` in
:mod:`fastmaml.datasets`, the random-state helpers in ``fastmaml._random``.

Randomness
----------
Every sampler draws from one :class:`numpy.random.Generator` (``random_state``
is an int seed, None or a Generator, which is then used -- and advanced -- in
place). ``get_state()`` returns the bit generator's state as a JSON-serialisable
dict and ``set_state(state)`` restores it, so a checkpointed training run
resumes the exact same stream of meta-batches. The stream of a seed depends
only on the seed and the sampler's arguments (not on the platform), but may
change between NumPy or fastmaml versions.

Every draw is vectorised over all tasks of a meta-batch: sampling without
replacement runs in the compiled core, driven by the Generator's bit generator.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import numpy as np

from ._random import RandomState, check_random_state, get_rng_state, set_rng_state, sample_without_replacement
from ._tasks import Tasks
from ._validation import as_feature_array, as_labels, check_int, shape_str
from .datasets import dataset_kernel

__all__ = ["EpisodeSampler", "GroupedSampler"]


# --------------------------------------------------------------------------
# argument helpers
# --------------------------------------------------------------------------


def _as_class_ids(y, name: str, n_rows: Optional[int] = None) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {shape_str(arr.shape)}")
    if n_rows is not None and arr.shape[0] != n_rows:
        raise ValueError(f"{name}: expected {n_rows} entries (one per row of X), got {arr.shape[0]}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name}: expected integer class ids, got non-integer values")
    elif arr.dtype.kind not in "biu":
        raise TypeError(f"{name}: expected integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _as_rows(rows, n_rows: int) -> np.ndarray:
    """Row selection: None, a boolean mask of length n_rows or distinct indices."""
    if rows is None:
        return np.arange(n_rows, dtype=np.int64)
    arr = np.asarray(rows)
    if arr.ndim != 1:
        raise ValueError(f"rows: expected a 1-d index array or boolean mask, got shape {shape_str(arr.shape)}")
    if arr.dtype == bool:
        if arr.shape[0] != n_rows:
            raise ValueError(f"rows: a boolean mask needs {n_rows} entries (one per row of X), got {arr.shape[0]}")
        if not arr.any():
            raise ValueError("rows: the boolean mask selects no rows")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        raise ValueError("rows: expected at least one row, got an empty array")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"rows: expected an integer index array or boolean mask, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= n_rows:
        raise ValueError(f"rows: indices must lie in [0, {n_rows}) for X with {n_rows} rows")
    if np.unique(arr).size != arr.size:
        raise ValueError("rows: contains repeated indices; each row may be selected once")
    return arr


def _fmt_list(values, limit: int = 8) -> str:
    values = list(values)
    s = ", ".join(str(v) for v in values[:limit])
    if len(values) > limit:
        s += f", ... ({len(values)} in all)"
    return s


# --------------------------------------------------------------------------


class EpisodeSampler:
    """N-way K-shot episodes with Q queries per class, from any ``(X, y)``.

    Each episode (task) draws ``n_way`` distinct classes, then ``k_shot``
    support rows and ``n_query`` query rows of each class, all distinct (no row
    is used twice within an episode; episodes are independent of each other).
    The episode's own labels ``0 .. n_way - 1`` stand for its classes: in a
    random order per episode (``random_labels=True``, the standard protocol)
    or in increasing order of class id (``random_labels=False``).

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
        The dataset, shared by every episode. Checked for NaN/infinity once,
        here; used in place when C-contiguous float32/float64 (no copy).
    y : array_like of int, shape (n_samples,)
        Class id of each row (any integers).
    n_way : int, default=2
        Classes per episode, ``2 <= n_way <=`` number of allowed classes. The
        binary core needs ``n_way=2``; other values give labels in
        ``[0, n_way)``.
    k_shot : int, default=5
        Support rows per class (>= 1).
    n_query : int, default=15
        Query rows per class (>= 1).
    classes : array_like of int, optional
        The class ids episodes may draw from (a class split: meta-train,
        meta-val and meta-test classes). Default: every class present in the
        allowed rows.
    pairs : array_like of int, shape (n_pairs, 2), optional
        For 2-way episodes, an alternative to ``classes``: the allowed
        (unordered) class pairs; each episode picks one uniformly. Repeating a
        pair weights it.
    rows : array_like of int or bool, optional
        The rows episodes may use (a row split: e.g. meta-train and meta-test
        images never overlap), as distinct indices or a boolean mask of length
        n_samples. Default: all rows.
    random_labels : bool, default=True
        Random label assignment per episode; otherwise label j is the j-th
        smallest class id of the episode (e.g. pair (2, 3): 2 -> 0, 3 -> 1).
    random_state : None, int or numpy.random.Generator
        Seed of the sampler's Generator (a Generator is used in place).

    Attributes
    ----------
    classes : ndarray of int64, shape (n_classes,)
        Allowed class ids, sorted.
    pairs : ndarray of int64, shape (n_pairs, 2) or None
        Allowed pairs (each sorted), when given.
    class_counts : ndarray of int64, shape (n_classes,)
        Allowed rows per class.
    episode_classes : ndarray of int64, shape (n_tasks, n_way) or None
        Original class ids of the last :meth:`sample`, in label order:
        label j of episode t is class ``episode_classes[t, j]``.

    Raises
    ------
    ValueError
        With the argument at fault named: a class with fewer than
        ``k_shot + n_query`` allowed rows (the class and both counts are
        named), ``n_way`` out of range, repeated or out-of-range ``rows``, ...

    Examples
    --------
    >>> import numpy as np
    >>> from fastmaml import EpisodeSampler, split_groups
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.random((1000, 16)), rng.integers(0, 10, size=1000)
    >>> train_classes, test_classes = split_groups(y, fractions=(0.5, 0.5), random_state=0)
    >>> sampler = EpisodeSampler(X, y, n_way=2, k_shot=10, n_query=15,
    ...                          classes=train_classes, random_state=0)
    >>> tasks = sampler.sample(32)      # Tasks in index form, 32 episodes
    >>> tasks.n_tasks, tasks.support.idx.size, sampler.episode_classes.shape
    (32, 640, (32, 2))
    """

    def __init__(
        self,
        X,
        y,
        *,
        n_way: int = 2,
        k_shot: int = 5,
        n_query: int = 15,
        classes=None,
        pairs=None,
        rows=None,
        random_labels: bool = True,
        random_state: RandomState = None,
        kernel_budget: Optional[int] = None,
    ):
        self.X = as_feature_array(X, "X", ndim=2, check_finite=True)
        # X X^T of the dataset, computed once when it fits the budget: episodes
        # then gather their Gram matrices instead of computing them.
        self.kernel = dataset_kernel(self.X, memory_budget=kernel_budget) if kernel_budget else None
        N = self.X.shape[0]
        self.y = _as_class_ids(y, "y", N)
        self.n_way = check_int(n_way, "n_way", minimum=2)
        self.k_shot = check_int(k_shot, "k_shot", minimum=1)
        self.n_query = check_int(n_query, "n_query", minimum=1)
        if not isinstance(random_labels, (bool, np.bool_)):
            raise TypeError(f"random_labels: expected a bool, got {random_labels!r}")
        self.random_labels = bool(random_labels)
        self.rows = _as_rows(rows, N)
        y_rows = self.y[self.rows]

        if classes is not None and pairs is not None:
            raise ValueError("pairs: give either classes or pairs, not both")
        self.pairs = None
        if pairs is not None:
            if self.n_way != 2:
                raise ValueError(f"n_way: pairs need 2-way episodes, got n_way={self.n_way}")
            p = np.asarray(pairs)
            if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] == 0:
                raise ValueError(f"pairs: expected shape (n_pairs, 2) with n_pairs >= 1, got {shape_str(p.shape)}")
            p = _as_class_ids(p.reshape(-1), "pairs").reshape(-1, 2)
            same = p[:, 0] == p[:, 1]
            if same.any():
                raise ValueError(f"pairs: a pair needs two different classes, got ({p[same][0, 0]}, {p[same][0, 1]})")
            self.pairs = np.sort(p, axis=1)
            cls = np.unique(self.pairs)
        elif classes is not None:
            c = np.asarray(classes)
            if c.ndim == 0:
                raise ValueError("classes: expected a 1-d array of class ids, got a scalar")
            cls = _as_class_ids(c, "classes")
            if cls.size == 0:
                raise ValueError("classes: expected at least n_way class ids, got none")
            if np.unique(cls).size != cls.size:
                raise ValueError("classes: contains repeated class ids")
            cls = np.sort(cls)
        else:
            cls = np.unique(y_rows)
        if self.pairs is None and self.n_way > cls.size:
            raise ValueError(f"n_way: {self.n_way}-way episodes need at least {self.n_way} classes, got {cls.size}")

        # rows of the allowed classes, grouped by class (classes sorted)
        in_cls = np.isin(y_rows, cls)
        sel = self.rows[in_cls]
        order = np.argsort(self.y[sel], kind="stable")
        self._flat = np.ascontiguousarray(sel[order], dtype=np.int64)
        ys = self.y[self._flat]
        start = np.searchsorted(ys, cls, side="left")
        stop = np.searchsorted(ys, cls, side="right")
        counts = (stop - start).astype(np.int64)
        need = self.k_shot + self.n_query
        short = counts < need
        if short.any():
            where = "allowed rows" if rows is not None else "rows"
            bad = ", ".join(f"class {c} has {n}" for c, n in zip(cls[short][:8], counts[short][:8]))
            more = f" ({int(short.sum())} classes in all)" if short.sum() > 8 else ""
            raise ValueError(
                f"k_shot + n_query: every class needs at least k_shot + n_query = {self.k_shot} + {self.n_query} "
                f"= {need} {where}, but {bad}{more}; lower k_shot/n_query or leave these classes out "
                f"(classes=...)"
            )
        self.classes = cls
        self.class_counts = counts
        self._start = start.astype(np.int64)
        if self.pairs is not None:
            self._pair_idx = np.searchsorted(cls, self.pairs)
        self._rng = check_random_state(random_state)
        self.episode_classes: Optional[np.ndarray] = None
        # labels are the same for every meta-batch: class-by-class blocks
        self._sy_row = np.repeat(np.arange(self.n_way, dtype=np.int32), self.k_shot)
        self._qy_row = np.repeat(np.arange(self.n_way, dtype=np.int32), self.n_query)

    @property
    def n_features(self) -> int:
        """Number of feature columns of X."""
        return int(self.X.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.classes.size)

    def _draw_classes(self, T: int) -> np.ndarray:
        """Class positions (into self.classes) per episode, in label order: (T, n_way)."""
        rng = self._rng
        if self.pairs is not None:
            ci = self._pair_idx[rng.integers(0, self._pair_idx.shape[0], size=T)]
            if self.random_labels:
                ci = np.where((rng.random(T) < 0.5)[:, None], ci[:, ::-1], ci)
            return ci
        ci = sample_without_replacement(rng, np.full(T, self.classes.size, dtype=np.int64), self.n_way)
        if not self.random_labels:
            ci.sort(axis=1)  # classes are sorted, so positions sort like ids
        return ci

    def sample(self, n_tasks: int) -> Tasks:
        """Draw a meta-batch of ``n_tasks`` episodes.

        Parameters
        ----------
        n_tasks : int
            Number of episodes T >= 1.

        Returns
        -------
        Tasks
            Index-form tasks into ``X``: support indices and labels of shape
            (T, n_way * k_shot), query of shape (T, n_way * n_query), ordered
            class by class (label 0's rows first). The class ids behind the
            labels are in :attr:`episode_classes`.
        """
        T = check_int(n_tasks, "n_tasks", minimum=1)
        W, k, q = self.n_way, self.k_shot, self.n_query
        ci = self._draw_classes(T)
        slots = ci.reshape(-1)
        pos = sample_without_replacement(self._rng, self.class_counts[slots], k + q)
        rows = self._flat[self._start[slots][:, None] + pos].reshape(T, W, k + q)
        support_idx = np.ascontiguousarray(rows[:, :, :k]).reshape(-1)
        query_idx = np.ascontiguousarray(rows[:, :, k:]).reshape(-1)
        self.episode_classes = self.classes[ci]
        return Tasks._from_sampler(
            self.X, support_idx, np.tile(self._sy_row, T), np.arange(T + 1, dtype=np.int64) * (W * k),
            query_idx, np.tile(self._qy_row, T), np.arange(T + 1, dtype=np.int64) * (W * q), kernel=self.kernel,
        )

    def get_state(self) -> dict:
        """The Generator's bit generator state, as a JSON-serialisable dict."""
        return get_rng_state(self._rng)

    def set_state(self, state: dict) -> None:
        """Restore a state from :meth:`get_state` (resumes the same stream)."""
        self._rng = set_rng_state(self._rng, state)

    def __repr__(self) -> str:
        what = f"pairs={self.pairs.shape[0]}" if self.pairs is not None else f"classes={self.classes.size}"
        return (
            f"EpisodeSampler(n_way={self.n_way}, k_shot={self.k_shot}, n_query={self.n_query}, {what}, "
            f"rows={self.rows.size}, random_labels={self.random_labels})"
        )


# --------------------------------------------------------------------------
# GroupedSampler
# --------------------------------------------------------------------------


def _check_size(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an int >= 1 or a float in (0, 1), got {value!r}")
    if isinstance(value, numbers.Integral):
        return check_int(value, name, minimum=1)
    if isinstance(value, numbers.Real):
        v = float(value)
        if not 0.0 < v < 1.0:
            raise ValueError(f"{name}: a fraction must lie in (0, 1), got {v}")
        return v
    raise TypeError(f"{name}: expected an int >= 1 or a float in (0, 1), got {value!r}")


class GroupedSampler:
    """One task per group of a table ``(X, y, groups)``.

    For per-customer, per-patient or per-device models: every group is a task
    with its own labels, and each time a group is drawn its rows are split at
    random into a support set (to adapt on) and a query set (to score).

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
        Features; checked once, used in place when C-contiguous float32/64.
    y : array_like of int, shape (n_samples,)
        Labels, passed through as given (0/1 for the binary core).
    groups : array_like, shape (n_samples,)
        Group id of each row (ints, strings, ...).
    support_size : int or float, default=0.5
        Support rows per task: an int (the same number for every group) or a
        fraction in (0, 1) of the group's rows, rounded and kept within
        [1, group size - 1].
    query_size : int, float or None, default=None
        Query rows per task: None for all rows not in the support, an int, or
        a fraction in (0, 1) of the group's rows (rounded, at least 1).
    groups_subset : array_like, optional
        Only these group ids are used (a group split, see :func:`split_groups`).
    random_state : None, int or numpy.random.Generator
        Seed of the sampler's Generator (a Generator is used in place).

    Attributes
    ----------
    groups : ndarray, shape (n_groups,)
        The sampler's group ids, sorted.
    group_sizes, support_sizes, query_sizes : ndarray of int64, shape (n_groups,)
        Rows per group and the support and query sizes of its tasks.
    task_groups : ndarray, shape (n_tasks,) or None
        Group ids of the tasks of the last :meth:`sample` / :meth:`tasks_for`.

    Raises
    ------
    ValueError
        If a group cannot fill a support set and a query set (fewer than 2
        rows, or fewer than ``support_size`` + ``query_size`` rows); the
        message names the groups and their sizes. Leave them out with
        ``groups_subset``.

    Examples
    --------
    >>> from fastmaml import GroupedSampler, make_grouped_tasks, split_groups
    >>> X, y, groups = make_grouped_tasks(n_groups=100, n_per_group=40, random_state=0)
    >>> train_groups, test_groups = split_groups(groups, fractions=(0.8, 0.2), random_state=0)
    >>> sampler = GroupedSampler(X, y, groups, support_size=5, groups_subset=train_groups,
    ...                          random_state=0)
    >>> tasks = sampler.sample(32)      # ragged index-form Tasks
    >>> tasks.support.ptr[:3], tasks.query.ptr[:3]
    (array([ 0,  5, 10]), array([ 0, 35, 70]))
    >>> test = GroupedSampler(X, y, groups, support_size=5, groups_subset=test_groups).tasks_for()
    >>> test.n_tasks
    20
    """

    def __init__(
        self,
        X,
        y,
        groups,
        *,
        support_size: Union[int, float] = 0.5,
        query_size: Union[int, float, None] = None,
        groups_subset=None,
        random_state: RandomState = None,
    ):
        self.X = as_feature_array(X, "X", ndim=2, check_finite=True)
        N = self.X.shape[0]
        ya = np.asarray(y)
        if ya.ndim != 1 or ya.shape[0] != N:
            raise ValueError(f"y: expected shape ({N},) (one label per row of X), got {shape_str(ya.shape)}")
        self.y = as_labels(ya, "y")
        g = np.asarray(groups)
        if g.ndim != 1 or g.shape[0] != N:
            raise ValueError(f"groups: expected shape ({N},) (one group id per row of X), got {shape_str(g.shape)}")
        if g.dtype.kind == "f" and not np.isfinite(g).all():
            raise ValueError("groups: contains NaN or infinity")
        ids, codes = np.unique(g, return_inverse=True)
        codes = codes.reshape(-1)
        if groups_subset is not None:
            sub = np.asarray(groups_subset)
            if sub.ndim != 1 or sub.size == 0:
                raise ValueError(f"groups_subset: expected a non-empty 1-d array of group ids, got {sub!r}")
            sub_u = np.unique(sub)
            if sub_u.size != sub.size:
                raise ValueError("groups_subset: contains repeated group ids")
            missing = sub_u[~np.isin(sub_u, ids)]
            if missing.size:
                raise ValueError(f"groups_subset: group ids not found in groups: {_fmt_list(missing)}")
            keep = np.searchsorted(ids, sub_u)
        else:
            keep = np.arange(ids.size)
        self.support_size = _check_size(support_size, "support_size")
        self.query_size = _check_size(query_size, "query_size", allow_none=True)

        order = np.argsort(codes, kind="stable")
        all_start = np.searchsorted(codes[order], np.arange(ids.size), side="left")
        all_count = np.bincount(codes, minlength=ids.size)
        self.groups = ids[keep]
        self._order = order.astype(np.int64)
        self._start = all_start[keep].astype(np.int64)
        n = all_count[keep].astype(np.int64)
        self.group_sizes = n

        tiny = n < 2
        if tiny.any():
            raise ValueError(
                "groups: every group needs at least 2 rows (one support, one query), but "
                + ", ".join(f"group {gid} has {c}" for gid, c in zip(self.groups[tiny][:8], n[tiny][:8]))
                + (f" ({int(tiny.sum())} groups in all)" if tiny.sum() > 8 else "")
                + "; leave them out with groups_subset"
            )
        s = self.support_size
        if isinstance(s, int):
            ns = np.full(n.shape, s, dtype=np.int64)
        else:
            ns = np.clip(np.rint(s * n), 1, n - 1).astype(np.int64)
        qs = self.query_size
        if qs is None:
            nq = n - ns
        elif isinstance(qs, int):
            nq = np.full(n.shape, qs, dtype=np.int64)
        else:
            nq = np.maximum(np.rint(qs * n), 1).astype(np.int64)
        bad = (ns + nq > n) | (nq < 1)
        if bad.any():
            what = "support_size" if qs is None else "support_size + query_size"
            raise ValueError(
                f"{what}: some groups cannot fill a support set of {s} and a query set of "
                f"{'at least 1' if qs is None else qs} rows: "
                + ", ".join(
                    f"group {gid} has {c} rows" for gid, c in zip(self.groups[bad][:8], n[bad][:8])
                )
                + (f" ({int(bad.sum())} groups in all)" if bad.sum() > 8 else "")
                + "; lower the sizes or leave these groups out with groups_subset"
            )
        self.support_sizes = ns
        self.query_sizes = nq
        self._rng = check_random_state(random_state)
        self.task_groups = None

    @property
    def n_features(self) -> int:
        """Number of feature columns of X."""
        return int(self.X.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.groups.size)

    def _build(self, gi: np.ndarray, rng: np.random.Generator) -> Tasks:
        """Tasks for group positions `gi` (into self.groups), split with `rng`."""
        cnt = self.group_sizes[gi]
        T = gi.size
        R = int(cnt.sum())
        seg = np.repeat(np.arange(T), cnt)
        seg_start = np.zeros(T, dtype=np.int64)
        np.cumsum(cnt[:-1], out=seg_start[1:])
        within = np.arange(R, dtype=np.int64) - seg_start[seg]
        rows = self._order[self._start[gi][seg] + within]
        # random order inside each group: sort by (group slot, random key)
        shuffled = rows[np.lexsort((rng.random(R), seg))]
        ns = self.support_sizes[gi]
        nq = self.query_sizes[gi]
        s_mask = within < ns[seg]
        q_mask = ~s_mask & (within < (ns + nq)[seg])
        support_idx = shuffled[s_mask]
        query_idx = shuffled[q_mask]
        support_ptr = np.zeros(T + 1, dtype=np.int64)
        np.cumsum(ns, out=support_ptr[1:])
        query_ptr = np.zeros(T + 1, dtype=np.int64)
        np.cumsum(nq, out=query_ptr[1:])
        self.task_groups = self.groups[gi]
        return Tasks.from_index(
            self.X,
            support_idx,
            self.y[support_idx],
            query_idx,
            self.y[query_idx],
            support_ptr=support_ptr,
            query_ptr=query_ptr,
            check_finite=False,
        )

    def sample(self, n_tasks: int) -> Tasks:
        """Draw a meta-batch of ``n_tasks`` groups, each split at random.

        Groups are drawn without replacement when ``n_tasks <= n_groups``,
        with replacement otherwise.

        Parameters
        ----------
        n_tasks : int
            Number of tasks T >= 1.

        Returns
        -------
        Tasks
            Ragged index-form tasks: flat support and query index/label arrays
            with offsets ``support.ptr``, ``query.ptr`` of shape (T + 1,); the
            labels are the rows' own ``y``. Group ids in :attr:`task_groups`.
        """
        T = check_int(n_tasks, "n_tasks", minimum=1)
        G = self.groups.size
        if T <= G:
            gi = sample_without_replacement(self._rng, np.array([G]), T)[0]
        else:
            gi = self._rng.integers(0, G, size=T)
        return self._build(gi, self._rng)

    def tasks_for(self, groups=None, *, seed: int = 0) -> Tasks:
        """Every (or the given) group once, with a reproducible split, for evaluation.

        The split depends only on ``seed`` and the groups, not on the
        sampler's stream (which is not advanced).

        Parameters
        ----------
        groups : array_like, optional
            Group ids (of this sampler), in the order wanted. Default: all, sorted.
        seed : int, default=0
            Seed of the support/query split.

        Returns
        -------
        Tasks
            Ragged index-form tasks, task t for group ``groups[t]``.
        """
        if groups is None:
            gi = np.arange(self.groups.size)
        else:
            req = np.asarray(groups)
            if req.ndim == 0:
                req = req.reshape(1)
            if req.ndim != 1 or req.size == 0:
                raise ValueError("groups: expected a non-empty 1-d array of group ids")
            gi = np.searchsorted(self.groups, req)
            gi = np.minimum(gi, self.groups.size - 1)
            missing = self.groups[gi] != req
            if missing.any():
                raise ValueError(f"groups: not groups of this sampler: {_fmt_list(req[missing])}")
        return self._build(gi, check_random_state(seed, "seed"))

    def get_state(self) -> dict:
        """The Generator's bit generator state, as a JSON-serialisable dict."""
        return get_rng_state(self._rng)

    def set_state(self, state: dict) -> None:
        """Restore a state from :meth:`get_state` (resumes the same stream)."""
        self._rng = set_rng_state(self._rng, state)

    def __repr__(self) -> str:
        return (
            f"GroupedSampler(n_groups={self.groups.size}, support_size={self.support_size}, "
            f"query_size={self.query_size})"
        )

