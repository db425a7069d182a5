"""Disjoint random splits of group (or class) ids and of rows.

* :func:`split_groups` -- meta-train / meta-val / meta-test groups (customers,
  patients, devices) or classes (``split_groups(y)`` splits the class ids);
* :func:`split_rows` -- row splits, stratified by class when labels are given,
  so that e.g. meta-train and meta-test episodes never share a row.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

from ._random import RandomState, check_random_state
from ._validation import check_int, shape_str

__all__ = ["split_groups", "split_rows"]


def _check_fractions(fractions) -> np.ndarray:
    try:
        f = np.asarray(fractions, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"fractions: expected a sequence of numbers, got {fractions!r}") from None
    if f.ndim != 1 or f.size < 1:
        raise ValueError(f"fractions: expected a non-empty 1-d sequence, got {fractions!r}")
    if not np.isfinite(f).all() or (f <= 0).any():
        raise ValueError(f"fractions: expected positive numbers, got {fractions!r}")
    if abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions: expected numbers summing to 1, got {fractions!r} (sum {f.sum():g})")
    return f


def _largest_remainder(total: int, fractions: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `fractions`."""
    raw = fractions * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        # stable: ties go to the earlier part
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def _fill_empty_parts(counts: np.ndarray) -> np.ndarray:
    """Move one item from the largest part into every empty part."""
    counts = counts.copy()
    for i in np.flatnonzero(counts == 0):
        counts[int(np.argmax(counts))] -= 1
        counts[i] += 1
    return counts


# --------------------------------------------------------------------------
# EpisodeSampler


def split_groups(groups, *, fractions: Sequence[float] = (0.6, 0.2, 0.2), random_state: RandomState = None):
    """Split group ids (or class ids) at random into disjoint parts.

    Use it for a group split (meta-train / meta-val / meta-test customers)
    or a class split for episodes (``split_groups(y)`` splits the classes).

    Parameters
    ----------
    groups : array_like, shape (n_samples,) or (n_groups,)
        Group ids, repeated or not (the distinct ids are split).
    fractions : sequence of float, default=(0.6, 0.2, 0.2)
        Positive fractions summing to 1, one per part. Counts are rounded by
        largest remainder; every part gets at least one id.
    random_state : None, int or numpy.random.Generator

    Returns
    -------
    tuple of ndarray
        One sorted array of distinct ids per fraction; disjoint, covering all
        ids.
    """
    f = _check_fractions(fractions)
    ids = np.unique(np.asarray(groups).reshape(-1))
    G = ids.size
    if G < f.size:
        raise ValueError(f"groups: {f.size} parts need at least {f.size} distinct ids, got {G}")
    rng = check_random_state(random_state)
    counts = _fill_empty_parts(_largest_remainder(G, f))
    perm = rng.permutation(G)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return tuple(np.sort(ids[perm[a:b]]) for a, b in zip(bounds[:-1], bounds[1:]))


def split_rows(
    n_rows_or_y,
    *,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    stratify: bool = True,
    random_state: RandomState = None,
):
    """Split row indices at random into disjoint parts.

    Use it for a row split of an episode dataset: ``EpisodeSampler(...,
    rows=train_rows)`` and ``EpisodeSampler(..., rows=test_rows)`` never share
    a row.

    Parameters
    ----------
    n_rows_or_y : int or array_like of shape (n_samples,)
        The number of rows, or the class ids of the rows (needed to stratify).
    fractions : sequence of float, default=(0.6, 0.2, 0.2)
        Positive fractions summing to 1, one per part.
    stratify : bool, default=True
        With class ids, split each class in these fractions (rounded by
        largest remainder within each class), so every part keeps the class
        proportions. Ignored when an int is given.
    random_state : None, int or numpy.random.Generator

    Returns
    -------
    tuple of ndarray of int64
        One sorted index array per fraction; disjoint, covering
        ``range(n_samples)``.
    """
    f = _check_fractions(fractions)
    if isinstance(n_rows_or_y, numbers.Integral) and not isinstance(n_rows_or_y, (bool, np.bool_)):
        N = check_int(n_rows_or_y, "n_rows_or_y", minimum=1)
        y = None
    else:
        y = np.asarray(n_rows_or_y)
        if y.ndim != 1 or y.size == 0:
            raise ValueError(
                f"n_rows_or_y: expected an int or a non-empty 1-d label array, got shape {shape_str(y.shape)}"
            )
        N = y.size
    rng = check_random_state(random_state)
    perm = rng.permutation(N)
    if y is None or not stratify:
        if N < f.size:
            raise ValueError(f"n_rows_or_y: {f.size} parts need at least {f.size} rows, got {N}")
        counts = _fill_empty_parts(_largest_remainder(N, f))
        part = np.repeat(np.arange(f.size), counts)
        return tuple(np.sort(perm[part == p]) for p in range(f.size))
    _, codes = np.unique(y, return_inverse=True)
    codes = codes.reshape(-1)
    # rows grouped by class, random order within each class
    by_class = perm[np.argsort(codes[perm], kind="stable")]
    sizes = np.bincount(codes)
    class_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(N) - np.repeat(class_start, sizes)
    # per class cumulative part boundaries: (n_classes, n_parts)
    cum = np.cumsum(np.stack([_largest_remainder(int(s), f) for s in sizes]), axis=1)
    cls_sorted = codes[by_class]
    part = (rank[:, None] >= cum[cls_sorted]).sum(axis=1)
    return tuple(np.sort(by_class[part == p]) for p in range(f.size))
