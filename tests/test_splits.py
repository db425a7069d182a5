"""Tests for fastmaml.splits: disjoint random splits of group ids, class ids and rows."""

import numpy as np
import pytest

from fastmaml.splits import split_groups, split_rows


def test_split_groups_disjoint_covering():
    g = np.repeat(np.arange(100, 150), 3)
    parts = split_groups(g, random_state=0)
    assert [p.size for p in parts] == [30, 10, 10]
    allp = np.concatenate(parts)
    assert np.array_equal(np.sort(allp), np.arange(100, 150))
    again = split_groups(g, random_state=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    two = split_groups(np.arange(7), fractions=(0.5, 0.5), random_state=1)
    assert sum(p.size for p in two) == 7 and not np.intersect1d(*two).size
    # every part gets at least one id
    small = split_groups(np.arange(3), fractions=(0.9, 0.05, 0.05), random_state=0)
    assert [p.size for p in small] == [1, 1, 1]
    with pytest.raises(ValueError, match="fractions"):
        split_groups(g, fractions=(0.5, 0.2))
    with pytest.raises(ValueError, match="fractions"):
        split_groups(g, fractions=(1.2, -0.2))
    with pytest.raises(ValueError, match="groups"):
        split_groups([1, 2], fractions=(0.4, 0.3, 0.3))


def test_split_rows_disjoint_covering_and_stratified():
    parts = split_rows(103, fractions=(0.7, 0.3), random_state=0)
    assert [p.size for p in parts] == [72, 31]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    y = np.repeat([5, 6, 9], [50, 30, 20])
    y = np.random.default_rng(0).permutation(y)
    tr, va, te = split_rows(y, fractions=(0.6, 0.2, 0.2), random_state=0)
    assert np.array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(100))
    for part, frac in ((tr, 0.6), (va, 0.2), (te, 0.2)):
        counts = [np.sum(y[part] == c) for c in (5, 6, 9)]
        assert counts == [50 * frac, 30 * frac, 20 * frac]
    unstrat = split_rows(y, fractions=(0.5, 0.5), stratify=False, random_state=0)
    assert [p.size for p in unstrat] == [50, 50]
    a = split_rows(y, random_state=4)
    b = split_rows(y, random_state=4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="fractions"):
        split_rows(10, fractions=(0.5, 0.6))
    with pytest.raises(ValueError, match="n_rows_or_y"):
        split_rows(np.zeros((2, 2)))
