"""Argument checking shared by every public entry point.

Each helper names the argument, what was expected and what was received, and
raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind,
wrong value or shape). Arrays that are already what the core needs are
returned as they are, never copied.
"""

from __future__ import annotations

import math
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


def _cgroup_headroom(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes this process's cgroup may still allocate (limit minus usage), or None without a limit.

    Containers and batch schedulers cap memory with a cgroup far below the
    machine's MemAvailable; beyond the cap the kernel's OOM killer ends the
    process without an exception. cgroup v2 exposes ``memory.max`` and
    ``memory.current``, v1 ``memory.limit_in_bytes`` and ``memory.usage_in_bytes``.
    """
    paths = []
    try:
        with open(proc_cgroup, encoding="ascii") as fh:
            for line in fh:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) != 3:
                    continue
                if parts[0] == "0" and parts[1] == "":
                    paths.append((root + parts[2].rstrip("/"), "memory.max", "memory.current"))
                elif "memory" in parts[1].split(","):
                    paths.append((root + "/memory" + parts[2].rstrip("/"), "memory.limit_in_bytes",
                                  "memory.usage_in_bytes"))
    except OSError:
        pass
    # Inside a container the process's own cgroup is usually mounted as the root.
    paths += [(root, "memory.max", "memory.current"),
              (root + "/memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]
    best = None
    for base, limit_name, usage_name in paths:
        try:
            with open(os.path.join(base, limit_name), encoding="ascii") as fh:
                raw = fh.read().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:  # v1 writes ~2**63 for "no limit"
            continue
        try:
            with open(os.path.join(base, usage_name), encoding="ascii") as fh:
                used = int(fh.read().strip())
        except (OSError, ValueError):
            used = 0
        room = max(int(raw) - used, 0)
        best = room if best is None else min(best, room)
    return best


def available_memory() -> int:
    """Bytes of memory available now: MemAvailable (Linux), capped by the cgroup's limit and ``ulimit -v``.

    A large number when nothing is known.
    """
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62
    for room in (_cgroup_headroom(), _address_space_headroom()):
        if room is not None:
            avail = min(avail, room)
    return avail


def _address_space_headroom() -> int | None:
    """Address space left under ``ulimit -v`` (RLIMIT_AS), or None without a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm", encoding="ascii") as fh:
            used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return max(soft - used, 0)
    except (ImportError, OSError, ValueError, AttributeError):
        return None


# Requests below this size are not checked: reading /proc and the cgroup files
# costs about half a millisecond, more than a small meta-batch's whole call.
_ALWAYS_FITS = 64 * 2**20


def check_memory(nbytes: int, name: str, what: str, hint: str | None = None) -> None:
    """Fail before allocating when a request cannot fit in memory.

    ``name`` is the argument that made the request large, ``what`` the
    allocation, ``hint`` how to make it smaller (default: in-place data or
    smaller batches).
    """
    if nbytes <= _ALWAYS_FITS:
        return
    avail = available_memory()
    if nbytes > avail:
        if hint is None:
            hint = "pass C-contiguous float32/float64 data (used in place), or smaller batches"
        raise MemoryError(
            f"{name}: {what} needs {nbytes / 2**30:.2f} GiB but only {avail / 2**30:.2f} GiB of memory is "
            f"available; {hint}"
        )


def as_feature_array(X, name: str, *, ndim=None, check_finite: bool = True) -> np.ndarray:
    """Return X as a C-contiguous float32/float64 array (no copy when it already is one).

    Other numeric dtypes become float64. Non-numeric input raises TypeError.
    """
    if isinstance(X, (str, bytes)):
        raise TypeError(f"{name}: expected a numeric array, got {type(X).__name__}")
    try:
        arr = np.asarray(X)
    except ValueError as exc:  # NumPy refuses nested lists of unequal lengths
        raise ValueError(
            f"{name}: expected a rectangular numeric array, got nested sequences of unequal lengths ({exc}); "
            "for tasks with different numbers of rows, pass one dataset and flat row indices with offsets: "
            "fastmaml.Tasks.from_index(X, support_idx, support_y, query_idx, query_y, support_ptr=..., "
            "query_ptr=...)"
        ) from None
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


def check_bool(value, name: str) -> bool:
    """``value`` as a bool; anything but True/False (or a NumPy bool) is a TypeError naming ``name``.

    A string such as ``"False"`` is truthy: taking flags by truthiness would
    silently switch modes, so it is refused.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {value!r}")


def check_int(value, name: str, *, minimum: int = 0) -> int:
    if type(value) is int and value >= minimum:  # the common case, without the ABC checks below
        return value
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
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum}, got {value}")
    return value


MAX_THREADS = 2**31 - 1  # the core's thread count is a C int


def check_threads(n_threads) -> int:
    """None -> 0 (OpenMP's default: OMP_NUM_THREADS, else all cores)."""
    if n_threads is None:
        return 0
    n_threads = check_int(n_threads, "n_threads", minimum=1)
    if n_threads > MAX_THREADS:
        raise ValueError(f"n_threads: expected an integer in [1, {MAX_THREADS}], got {n_threads}")
    return n_threads
