"""`Tasks`: a meta-batch of classification tasks, dense or by index."""

from __future__ import annotations

import numpy as np

from . import _core
from ._validation import as_feature_array, as_index, as_labels, shape_str

__all__ = ["Tasks"]


class _Side:
    """One side (support or query) of every task: rows, offsets, labels."""

    __slots__ = ("X", "idx", "ptr", "y")

    def __init__(self, X, idx, ptr, y):
        self.X = X
        self.idx = idx
        self.ptr = ptr
        self.y = y

    def core(self) -> "_core.Side":
        """This side as the compiled core takes it (no array is copied)."""
        return _core.Side(self.X, self.idx, self.ptr, self.y)

    def sizes(self) -> np.ndarray:
        return np.diff(self.ptr)

    def rows(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.ptr[t]), int(self.ptr[t + 1])
        d = self.X.shape[-1]
        flat = self.X.reshape(-1, d)
        rows = flat[self.idx[lo:hi]] if self.idx is not None else flat[lo:hi]
        return rows, self.y[lo:hi]


class Tasks:
    """A meta-batch of T tasks, each with a support set and a query set.

    Two forms hold the same information:

    * dense: ``Tasks(support_X, support_y, query_X, query_y)`` with arrays of
      shape (T, n, d), (T, n), (T, m, d), (T, m);
    * by index into one shared dataset: :meth:`Tasks.from_index`, so that
      episodes sampled from a large dataset are never copied. Each episode
      carries its own labels (episodes relabel classes).

    Features are used in place when they are C-contiguous float32 or float64;
    any other numeric dtype becomes float64 (one conversion, here).

    Parameters
    ----------
    support_X : array_like of shape (n_tasks, n_support, n_features)
    support_y : array_like of shape (n_tasks, n_support)
        Labels, 0/1 for binary tasks, integers in [0, C) for C classes.
    query_X : array_like of shape (n_tasks, n_query, n_features)
    query_y : array_like of shape (n_tasks, n_query)
    check_finite : bool, default=True
        Reject NaN or infinite features here, once, with a NumPy pass (for a
        pool reused across many calls). The meta-gradient calls
        (:func:`~fastmaml.meta_value_and_grad`, Reptile, preconditioned, block
        sums) raise the same ValueError either way: the core finds a
        non-finite feature in its own pass over the rows, which is why a
        4-tuple handed to them is not pre-checked. With False, the other
        calls (adapt, iMAML, the primitives) do not check the features.
    """

    __slots__ = ("support", "query", "n_tasks", "n_features", "dtype", "is_indexed", "kernel")

    def __init__(self, support_X, support_y, query_X, query_y, *, check_finite: bool = True):
        sX = as_feature_array(support_X, "support_X", ndim=3, check_finite=check_finite)
        qX = as_feature_array(query_X, "query_X", ndim=3, check_finite=check_finite)
        T, n, d = sX.shape
        Tq, m, dq = qX.shape
        if Tq != T:
            raise ValueError(
                f"query_X: expected {T} tasks like support_X {shape_str(sX.shape)}, got {shape_str(qX.shape)}"
            )
        if dq != d:
            raise ValueError(f"query_X: expected {d} features like support_X, got {dq}")
        if qX.dtype != sX.dtype:
            # One compute dtype per call: the wider one wins.
            common = np.promote_types(sX.dtype, qX.dtype)
            sX, qX = sX.astype(common), qX.astype(common)
        sy = as_labels(support_y, "support_y", shape=(T, n))
        qy = as_labels(query_y, "query_y", shape=(T, m))
        self.support = _Side(sX, None, np.arange(T + 1, dtype=np.int64) * n, sy.reshape(-1))
        self.query = _Side(qX, None, np.arange(T + 1, dtype=np.int64) * m, qy.reshape(-1))
        self.n_tasks = T
        self.n_features = d
        self.dtype = sX.dtype
        self.is_indexed = False
        self.kernel = None

    @classmethod
    def from_index(
        cls,
        X,
        support_idx,
        support_y,
        query_idx,
        query_y,
        *,
        support_ptr=None,
        query_ptr=None,
        check_finite: bool = True,
        kernel=None,
    ) -> "Tasks":
        """Tasks given by row indices into one dataset X (no rows are copied).

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            The shared dataset.
        support_idx : array_like of int, shape (n_tasks, n_support), or flat
            shape (total_support,) together with ``support_ptr``.
        support_y : array_like of int, same shape as ``support_idx``
            The episode's own labels for those rows.
        query_idx, query_y : array_like
            Likewise for the query sets.
        support_ptr, query_ptr : array_like of int, shape (n_tasks + 1,), optional
            Offsets for ragged tasks (groups of different sizes): task t owns
            positions ``ptr[t]:ptr[t+1]`` of the flat index and label arrays.
        check_finite : bool, default=True
            Check X for NaN/infinity here. A sampler that checked X once passes
            False; the meta-gradient calls still name a non-finite row of X
            that a task uses (found in the core's own pass, as for Tasks).
        kernel : ndarray of shape (n_samples, n_samples), optional
            X X^T in X's dtype (see :func:`fastmaml.datasets.dataset_kernel`):
            the Gram path then gathers each episode's Gram matrix from it.
        """
        self = cls.__new__(cls)
        Xa = as_feature_array(X, "X", ndim=2, check_finite=check_finite)
        sides = []
        n_tasks = None
        for side, idx, y, ptr in (("support", support_idx, support_y, support_ptr), ("query", query_idx, query_y, query_ptr)):
            ia = as_index(idx, f"{side}_idx")
            if ptr is None:
                if ia.ndim != 2:
                    raise ValueError(
                        f"{side}_idx: expected shape (n_tasks, n_{side}) or a flat array with {side}_ptr, "
                        f"got {shape_str(ia.shape)}"
                    )
                T, n = ia.shape
                pa = np.arange(T + 1, dtype=np.int64) * n
            else:
                if ia.ndim != 1:
                    raise ValueError(f"{side}_idx: with {side}_ptr expected a flat array, got {shape_str(ia.shape)}")
                pa = as_index(ptr, f"{side}_ptr")
                if pa.ndim != 1 or pa.size < 2:
                    raise ValueError(f"{side}_ptr: expected shape (n_tasks + 1,), got {shape_str(pa.shape)}")
                if pa[0] != 0 or pa[-1] != ia.size or np.any(np.diff(pa) < 1):
                    raise ValueError(
                        f"{side}_ptr: expected increasing offsets from 0 to {ia.size} with every task non-empty"
                    )
                T = pa.size - 1
            ya = as_labels(y, f"{side}_y", shape=ia.shape)
            if ia.size and (ia.min() < 0 or ia.max() >= Xa.shape[0]):
                raise ValueError(f"{side}_idx: indices must lie in [0, {Xa.shape[0]}) for X with {Xa.shape[0]} rows")
            if n_tasks is not None and T != n_tasks:
                raise ValueError(f"query_idx: expected {n_tasks} tasks like support_idx, got {T}")
            if T == 0 or ia.size == 0:
                raise ValueError(f"{side}_idx: expected at least one task with at least one row")
            n_tasks = T
            sides.append(_Side(Xa, ia.reshape(-1), pa, ya.reshape(-1)))
        self.support, self.query = sides
        self.n_tasks = n_tasks
        self.n_features = Xa.shape[1]
        self.dtype = Xa.dtype
        self.is_indexed = True
        self.kernel = None
        if kernel is not None:
            K = np.asarray(kernel)
            N = Xa.shape[0]
            if K.shape != (N, N):
                raise ValueError(f"kernel: expected shape ({N}, {N}) = (n_samples, n_samples), got {shape_str(K.shape)}")
            if K.dtype != Xa.dtype or not K.flags.c_contiguous:
                K = np.ascontiguousarray(K, dtype=Xa.dtype)
            _check_kernel_diagonal(K, Xa)
            self.kernel = K
        return self

    @classmethod
    def _from_sampler(cls, X, support_idx, support_y, support_ptr, query_idx, query_y, query_ptr, kernel=None):
        """Index-form tasks from a sampler's own arrays, without re-validating them.

        X was checked once by the sampler; the arrays are C-contiguous int64
        (indices, offsets) and int32 (labels) made by it. The compiled core
        still checks index bounds and labels on every call, so nothing unsafe
        can reach the kernels.
        """
        self = cls.__new__(cls)
        self.support = _Side(X, support_idx, support_ptr, support_y)
        self.query = _Side(X, query_idx, query_ptr, query_y)
        self.n_tasks = int(support_ptr.shape[0] - 1)
        self.n_features = int(X.shape[1])
        self.dtype = X.dtype
        self.is_indexed = True
        self.kernel = kernel
        return self

    @property
    def is_ragged(self) -> bool:
        return bool(np.ptp(self.support.sizes()) or np.ptp(self.query.sizes()))

    def __len__(self) -> int:
        return self.n_tasks

    def task(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Dense copies (support_X, support_y, query_X, query_y) of task t."""
        if not -self.n_tasks <= t < self.n_tasks:
            raise IndexError(f"t: task {t} out of range for {self.n_tasks} tasks")
        t %= self.n_tasks
        sX, sy = self.support.rows(t)
        qX, qy = self.query.rows(t)
        return sX, sy, qX, qy

    def __repr__(self) -> str:
        form = "indexed" if self.is_indexed else "dense"
        return f"Tasks(n_tasks={self.n_tasks}, n_features={self.n_features}, dtype={self.dtype}, {form})"


def _check_kernel_diagonal(K: np.ndarray, X: np.ndarray) -> None:
    """Reject a kernel that is not X X^T, by its diagonal (O(N d), not O(N^2 d)).

    A kernel of another dataset, or of X before an edit, would give silently
    wrong Gram matrices; its diagonal (the squared row norms) almost always
    shows it. Rounding of a product formed by BLAS stays far inside the bound.
    """
    norms = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    diag = np.diagonal(K).astype(np.float64)
    if not np.all(np.isfinite(diag)):
        raise ValueError("kernel: expected X X^T, but its diagonal holds NaN or infinity")
    tol = (1e-3 if X.dtype == np.float32 else 1e-9) * max(1.0, float(norms.max(initial=0.0)))
    bad = np.flatnonzero(np.abs(diag - norms) > tol)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"kernel: expected X X^T (see fastmaml.datasets.dataset_kernel), but kernel[{i}, {i}] = {diag[i]:.6g} "
            f"differs from the squared norm of X's row {i}, {norms[i]:.6g}"
        )
