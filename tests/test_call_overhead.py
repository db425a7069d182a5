"""The fast paths of a call's prologue (issue 13: the Python side of a W1 call).

Each shortcut must give the answer and the error of the general check it
skips: the core's finite check of theta, the cached step-size table of a
scalar inner_lr, the plain-number paths of l2 and inner_steps, and the memory
bound of the inner-loop path that skips the pass over the offsets.
"""

import numpy as np
import pytest

import fastmaml
from fastmaml import _core, _validation
from fastmaml import functional as F


def _data(T=5, n=6, m=7, d=9, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    Xs = rng.normal(size=(T, n, d)).astype(dtype)
    Xq = rng.normal(size=(T, m, d)).astype(dtype)
    ys = rng.integers(0, 2, (T, n))
    yq = rng.integers(0, 2, (T, m))
    theta = rng.normal(scale=0.1, size=d + 1).astype(dtype)
    return theta, fastmaml.Tasks(Xs, ys, Xq, yq)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 785, 1000])
def test_all_finite_matches_numpy_at_every_position(dtype, size):
    x = np.linspace(-3, 3, size).astype(dtype)
    assert F._all_finite(x) is True
    for pos in {0, size // 2, size - 1} if size else ():
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[pos] = bad
            assert _core.all_finite(y) is False
            assert F._all_finite(y) is False
    big = np.full(size, np.finfo(dtype).max, dtype=dtype)  # finite values whose sum would overflow
    assert F._all_finite(big) is True


def test_all_finite_falls_back_to_numpy_for_other_arrays():
    x = np.arange(20.0).reshape(4, 5)
    assert _core.all_finite(x[:, ::2]) is None  # not C-contiguous
    assert _core.all_finite(np.arange(5)) is None  # integers
    assert _core.all_finite(np.ones(3, dtype=np.float16)) is None
    assert _core.all_finite(np.array([1.0, np.nan], dtype=">f8")) is None  # not native byte order
    assert _core.all_finite(np.float64(np.nan)) is None  # not an array
    assert _core.all_finite([1.0]) is None
    assert F._all_finite(np.array([1.0, np.nan], dtype=">f8")) is False
    unaligned = np.frombuffer(b"\0" + np.array([1.0, np.inf]).tobytes(), dtype=np.float64, offset=1)
    assert _core.all_finite(unaligned) is None  # misaligned: NumPy reads it
    assert F._all_finite(unaligned) is False
    y = x[:, ::2].copy(order="F")
    y[1, 1] = np.nan
    assert F._all_finite(y) is False
    assert F._all_finite(x[:, ::2]) is True
    assert F._all_finite(np.arange(5)) is True
    assert F._all_finite(x) is True  # 2-D, C-contiguous: the core


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["same", "strided", "other_dtype", "int"])
def test_theta_errors_are_unchanged(dtype, form):
    theta, tasks = _data(dtype=dtype)
    kw = dict(inner_lr=0.1, inner_steps=2)
    if form == "int":
        r = fastmaml.meta_value_and_grad(np.zeros(theta.shape, dtype=np.int64), tasks, **kw)
        assert np.isfinite(r.loss)
        return
    bad = theta.copy()
    bad[3] = np.nan
    if form == "strided":
        bad = np.repeat(bad, 2)[::2]
    elif form == "other_dtype":
        bad = bad.astype(np.float32 if dtype == np.float64 else np.float64)
    with pytest.raises(ValueError, match="theta: contains NaN or infinity"):
        fastmaml.meta_value_and_grad(bad, tasks, **kw)
    if dtype == np.float32:  # finite in float64, infinite once cast to the compute dtype
        huge = theta.astype(np.float64)
        huge[0] = 1e300
        with pytest.raises(ValueError, match="theta: values overflow the compute dtype float32"):
            fastmaml.meta_value_and_grad(huge, tasks, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_scalar_inner_lr_gives_the_bits_of_the_general_path(dtype):
    theta, tasks = _data(dtype=dtype)
    for lr in (0.1, 0.25, 1, -0.0, 0.0):
        F._SCALAR_LR_TABLES.clear()
        made, hit = (fastmaml.meta_value_and_grad(theta, tasks, inner_lr=lr, inner_steps=3) for _ in range(2))
        general = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=np.float64(lr), inner_steps=3)
        for r in (hit, general):
            assert r.loss == made.loss and r.grad_inner_lr == made.grad_inner_lr
            np.testing.assert_array_equal(r.grad, made.grad)
        assert isinstance(made.grad_inner_lr, float)


def test_the_scalar_table_cache_is_read_only_bounded_and_keeps_signed_zeros_apart():
    F._SCALAR_LR_TABLES.clear()
    t0, *_ = F._prepare_inner_lr(0.0, 2, (4,), np.float64)
    tneg, *_ = F._prepare_inner_lr(-0.0, 2, (4,), np.float64)
    assert not t0.flags.writeable and not tneg.flags.writeable
    assert np.signbit(tneg).all() and not np.signbit(t0).any()
    again, *_ = F._prepare_inner_lr(0.0, 2, (4,), np.float64)
    assert again is t0
    assert F._prepare_inner_lr(0.0, 3, (4,), np.float64)[0].shape == (3, 4)
    assert F._prepare_inner_lr(0.0, 2, (4,), np.float32)[0].dtype == np.float32
    for k in range(100):
        F._prepare_inner_lr(0.5 + k, 2, (4,), np.float64)
    assert len(F._SCALAR_LR_TABLES) <= F._SCALAR_LR_CACHE_SIZE
    big, *_ = F._prepare_inner_lr(0.1, 100, (1000,), np.float64)  # 800 KB: made, not kept
    assert big.flags.writeable
    assert all(t.nbytes <= F._SCALAR_LR_CACHE_BYTES for t in F._SCALAR_LR_TABLES.values())
    with pytest.raises(ValueError, match="inner_lr: contains NaN or infinity"):
        F._prepare_inner_lr(float("nan"), 2, (4,), np.float64)
    with pytest.raises(ValueError, match="overflow the compute dtype"):
        F._prepare_inner_lr(1e300, 2, (4,), np.float32)


@pytest.mark.parametrize("l2,err,match", [
    (-0.5, ValueError, r"l2: expected a number >= 0\.0, got -0\.5"),
    (float("nan"), ValueError, "l2: expected a finite number, got nan"),
    (float("inf"), ValueError, "l2: expected a finite number, got inf"),
    (10**400, OverflowError, "int too large"),
    (True, TypeError, "l2: expected a real number, got True"),
    ("0.1", TypeError, "l2: expected a real number, got '0.1'"),
])
def test_plain_number_l2_errors_are_unchanged(l2, err, match):
    theta, tasks = _data()
    with pytest.raises(err, match=match):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=2, l2=l2)


def test_l2_beyond_float32_is_an_overflow_error_only_in_float32():
    theta, tasks = _data(dtype=np.float32)
    with pytest.raises(ValueError, match="l2: 1e\\+39 overflows the compute dtype float32"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=2, l2=1e39)
    theta64, tasks64 = _data(dtype=np.float64)
    r = fastmaml.meta_value_and_grad(theta64, tasks64, inner_lr=1e-45, inner_steps=1, l2=1e39)
    assert np.isfinite(r.loss)
    for l2 in (0, 2, 0.5):  # ints and floats on the plain-number path give the same bits
        a = fastmaml.meta_value_and_grad(theta64, tasks64, inner_lr=0.1, inner_steps=2, l2=l2)
        b = fastmaml.meta_value_and_grad(theta64, tasks64, inner_lr=0.1, inner_steps=2, l2=np.float64(l2))
        assert a.loss == b.loss and a.grad_l2 == b.grad_l2
        np.testing.assert_array_equal(a.grad, b.grad)


@pytest.mark.parametrize("K,err,match", [
    (-1, ValueError, "inner_steps: expected an integer >= 0, got -1"),
    (True, TypeError, "inner_steps: expected an integer >= 0, got True"),
    (2.0, TypeError, "inner_steps: expected an integer >= 0, got 2.0"),
])
def test_inner_steps_errors_are_unchanged(K, err, match):
    theta, tasks = _data()
    with pytest.raises(err, match=match):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=K)
    r = fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=np.int64(2))
    assert np.isfinite(r.loss)


def test_the_path_memory_bound_still_counts_the_largest_task(monkeypatch):
    # Ragged tasks: 30 support rows in all, at most 12 in one task.
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 6))
    y = rng.integers(0, 2, 40)
    support, query = np.arange(30), np.arange(30, 40)
    tasks = fastmaml.Tasks.from_index(X, support, y[support], query, y[query], support_ptr=[0, 12, 20, 30],
                                      query_ptr=[0, 5, 8, 10])
    theta = np.zeros(7)
    K, P = 4, 7
    call = F._prologue(theta, tasks, l2=0.0, n_threads=1, inner_steps=K, inner_lr=0.1, per_task_l2=True)

    def need(n):
        return max((2 * K + 1) * P * 8 + K * n * 8, 4 * (K + 1) * n * 8 + n * n * 8)

    monkeypatch.setattr(_validation, "_ALWAYS_FITS", 0)
    monkeypatch.setattr(_validation, "available_memory", lambda: need(12))  # the largest task fits
    F._check_path_memory(call)
    fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=K, n_threads=1)
    monkeypatch.setattr(_validation, "available_memory", lambda: need(12) - 1)
    with pytest.raises(MemoryError, match=r"inner_steps: the inner-loop path kept for the reverse sweep \(4 steps"):
        fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=K, n_threads=1)


def test_the_table_cache_under_racing_threads():
    import sys
    import threading

    errors, old = [], sys.getswitchinterval()

    def work(base):
        try:
            for k in range(2000):
                table, *_ = F._prepare_inner_lr(base + (k % 40) * 1e-3, 2, (4,), np.float64)
                assert table[0, 0] == np.float64(base + (k % 40) * 1e-3)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(0.5 + i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    assert len(F._SCALAR_LR_TABLES) <= F._SCALAR_LR_CACHE_SIZE
