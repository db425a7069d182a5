"""Argument checking shared by every public entry point.

Each helper names the argument, what was expected and what was received, and
raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind,
wrong value or shape). Arrays that are already what the core needs are
returned as they are, never copied.
"""

from __future__ import annotations

import numbers
import operator
import os

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def shape_str(shape) -> str:
    shape = tuple(shape)
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join(str(s) for s in shape) + ")"


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable), or a large number when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_memory(nbytes: int, name: str, what: str) -> None:
    """Fail before allocating when a request cannot fit in memory."""
    avail = available_memory()
    if nbytes > avail:
        raise MemoryError(
            f"{name}: {what} needs {nbytes / 2**30:.2f} GiB but only {avail / 2**30:.2f} GiB of memory is "
            "available; pass C-contiguous float32/float64 data (used in place), or smaller batches"
        )


def as_feature_array(X, name: str, *, ndim=None, check_finite: bool = True) -> np.ndarray:
    """Return X as a C-contiguous float32/float64 array (no copy when it already is one).

    Other numeric dtypes become float64. Non-numeric input raises TypeError.
    """
    if isinstance(X, (str, bytes)):
        raise TypeError(f"{name}: expected a numeric array, got {type(X).__name__}")
    arr = np.asarray(X)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.dtype not in FLOAT_DTYPES:
        check_memory(arr.size * 8, name, "converting to float64")
        arr = arr.astype(np.float64)
    if not arr.flags.c_contiguous:
        check_memory(arr.size * arr.itemsize, name, "a C-contiguous copy")
        arr = np.ascontiguousarray(arr)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(f"{k}-d" for k in allowed)
            raise ValueError(f"{name}: expected a {want} array, got shape {shape_str(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {shape_str(arr.shape)}")
    if check_finite and not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return arr


def as_labels(y, name: str, *, shape=None) -> np.ndarray:
    """Return integer labels as a C-contiguous int32 array.

    Floats are accepted when they hold whole numbers; NaN, infinity or a
    fractional value raise ValueError. The range (0/1 for binary tasks) is
    checked by the core, which sees every label anyway.
    """
    if isinstance(y, (str, bytes)):
        raise TypeError(f"{name}: expected an array of integer labels, got {type(y).__name__}")
    arr = np.asarray(y)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected integer labels, got dtype {arr.dtype}")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {shape_str(shape)}, got {shape_str(arr.shape)}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: labels contain NaN or infinity")
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name}: labels must be whole numbers, got fractional values")
        if arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
            raise ValueError(f"{name}: label values out of range")
    if arr.dtype.kind in "iu" and arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
        raise ValueError(f"{name}: label values out of range")
    if arr.dtype != np.int32 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.int32)
    return arr


def as_index(idx, name: str) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer index array, got dtype {arr.dtype}")
    if arr.dtype != np.int64 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.int64)
    return arr


def check_int(value, name: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def check_float(value, name: str, *, minimum=None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum}, got {value}")
    return value


def check_threads(n_threads) -> int:
    """None -> 0 (OpenMP's default: OMP_NUM_THREADS, else all cores)."""
    if n_threads is None:
        return 0
    return check_int(n_threads, "n_threads", minimum=1)
