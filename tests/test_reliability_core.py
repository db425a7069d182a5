"""Reliability of the core's entry points (issue 11): races, fork, memory, the IDX reader, messages.

The crash, hang and out-of-memory cases run in a subprocess with a timeout,
so that a regression fails the test instead of killing or hanging pytest.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
import warnings

import numpy as np
import pytest

import fastmaml
from fastmaml import functional as F
from fastmaml import _core
from fastmaml._validation import _cgroup_headroom
from fastmaml.datasets import load_idx

TIMEOUT = 300  # seconds; generous on a loaded 2-core machine, never a timing assertion


def run_script(code: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; a crash shows as a negative return code, a hang as a timeout."""
    try:
        # cwd outside the checkout: `python -c` puts the cwd first on sys.path,
        # and the source tree's fastmaml/ (no compiled _core) would shadow the install.
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - only on regression
        pytest.fail(f"the script hung for {timeout} s (stdout: {exc.stdout!r}, stderr: {exc.stderr!r})")


def small_batch(T=4, n=6, m=5, d=3, C=1, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    hi = 2 if C == 1 else C
    Xs, Xq = rng.random((T, n, d)).astype(dtype), rng.random((T, m, d)).astype(dtype)
    ys, yq = rng.integers(0, hi, (T, n)), rng.integers(0, hi, (T, m))
    theta = np.zeros(d + 1 if C == 1 else (d + 1, C), dtype=dtype)
    return theta, (Xs, ys, Xq, yq)


# ---------------------------------------------------------------------------
# 1. Arrays rewritten by another thread while the core runs
# ---------------------------------------------------------------------------

RACE_PRELUDE = """
import threading, time, numpy as np, fastmaml
from fastmaml import functional as F

def race(call, overwrite, reference):
    # Start the call; 50 ms later (the core runs with the GIL released)
    # another thread overwrites the arrays that guard memory.
    def writer():
        time.sleep(0.05)
        overwrite()
    th = threading.Thread(target=writer)
    th.start()
    try:
        result = call()
    except ValueError as exc:  # the write landed before the call's checks: a clear error
        th.join()
        print("valueerror", exc)
        return
    th.join()
    same = result.loss == reference.loss and np.array_equal(result.grad, reference.grad)
    print("ok" if same else "DIFFERENT")
"""


def test_index_array_rewritten_during_a_call_cannot_crash():
    """The core reads its own copy of support_idx: rewriting the caller's array mid-call changes nothing."""
    out = run_script(RACE_PRELUDE + """
rng = np.random.default_rng(0)
T, n, m, d, N = 4000, 10, 10, 64, 5000
X = rng.random((N, d))
sidx, qidx = rng.integers(0, N, (T, n)), rng.integers(0, N, (T, m))
sy, qy = rng.integers(0, 2, (T, n)), rng.integers(0, 2, (T, m))
theta = np.zeros(d + 1)
kw = dict(inner_lr=0.1, inner_steps=50, n_threads=2, sweep="plain")
tasks = fastmaml.Tasks.from_index(X, sidx, sy, qidx, qy)
ref = F.meta_value_and_grad(theta, tasks, **kw)
def call():
    return F.meta_value_and_grad(theta, tasks, **kw)
def overwrite():
    sidx[:] = 10**12
race(call, overwrite, ref)
""")
    assert out.returncode == 0, f"crashed with return code {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.startswith(("ok", "valueerror")), out.stdout + out.stderr


def test_labels_rewritten_during_a_call_cannot_crash():
    """A 3-class dense batch: labels set to 2**30 mid-call never reach the core's reads."""
    out = run_script(RACE_PRELUDE + """
rng = np.random.default_rng(1)
T, n, m, d, C = 4000, 10, 10, 64, 3
Xs, Xq = rng.random((T, n, d)), rng.random((T, m, d))
ys = rng.integers(0, C, (T, n)).astype(np.int32)
yq = rng.integers(0, C, (T, m)).astype(np.int32)
theta = np.zeros((d + 1, C))
kw = dict(inner_lr=0.1, inner_steps=50, n_threads=2, sweep="plain")
tasks = fastmaml.Tasks(Xs, ys, Xq, yq)
assert np.shares_memory(tasks.support.y, ys)  # used in place: the race is real
ref = F.meta_value_and_grad(theta, tasks, **kw)
def call():
    return F.meta_value_and_grad(theta, tasks, **kw)
def overwrite():
    ys[:] = 2**30
    yq[:] = 2**30
race(call, overwrite, ref)
""")
    assert out.returncode == 0, f"crashed with return code {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.startswith(("ok", "valueerror")), out.stdout + out.stderr


def test_offsets_rewritten_after_the_checks_are_not_read():
    """Every binding checks and then reads the same copy: valid results, and the caller's arrays untouched."""
    theta, batch = small_batch(T=3)
    tasks = fastmaml.Tasks(*batch)
    before = [a.copy() for a in (tasks.support.ptr, tasks.support.y, tasks.query.ptr, tasks.query.y)]
    ref = F.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=2)
    again = F.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=2)
    np.testing.assert_array_equal(ref.grad, again.grad)
    for a, b in zip(before, (tasks.support.ptr, tasks.support.y, tasks.query.ptr, tasks.query.y)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# 2. fork after the core used threads
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork") or not _core.openmp_enabled(), reason="needs fork and OpenMP")
def test_forked_child_runs_serially_with_one_warning_and_equal_results():
    """A child forked after a 2-thread call used to hang in libgomp; now it warns once and matches bitwise."""
    out = run_script("""
import multiprocessing as mp, warnings, numpy as np, fastmaml
from fastmaml import functional as F
rng = np.random.default_rng(0)
T, n, m, d = 512, 20, 20, 32
batch = (rng.random((T, n, d)), rng.integers(0, 2, (T, n)), rng.random((T, m, d)), rng.integers(0, 2, (T, m)))
theta = 0.01 * rng.standard_normal(d + 1)
kw = dict(inner_lr=0.1, inner_steps=5, n_threads=2)
parent = F.meta_value_and_grad(theta, batch, **kw)   # starts the OpenMP pool with 2 threads

def child(q):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = F.meta_value_and_grad(theta, batch, **kw)
        b = F.meta_value_and_grad(theta, batch, **kw)
    names = [type(w.message).__name__ for w in seen if issubclass(w.category, fastmaml.ForkWarning)]
    q.put((a.loss, a.grad.tobytes(), b.grad.tobytes(), names))

ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
loss, ga, gb, names = q.get(timeout=200)
p.join(timeout=60)
assert p.exitcode == 0, p.exitcode
assert loss == parent.loss, (loss, parent.loss)
assert ga == parent.grad.tobytes() and gb == ga, "child results differ from the parent's"
assert names == ["ForkWarning"], names
# The parent keeps its threads.
again = F.meta_value_and_grad(theta, batch, **kw)
assert again.grad.tobytes() == parent.grad.tobytes()
print("ok")
""")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]


@pytest.mark.skipif(not hasattr(os, "fork") or not _core.openmp_enabled(), reason="needs fork and OpenMP")
def test_fork_warning_is_an_error_under_warnings_as_errors():
    """With -W error the child's first call raises fastmaml.ForkWarning (named) instead of hanging."""
    out = run_script("""
import os, warnings, numpy as np, fastmaml
from fastmaml import functional as F
rng = np.random.default_rng(0)
T, n, d = 512, 20, 32
batch = (rng.random((T, n, d)), rng.integers(0, 2, (T, n)), rng.random((T, n, d)), rng.integers(0, 2, (T, n)))
theta = np.zeros(d + 1)
F.meta_value_and_grad(theta, batch, inner_lr=0.1, inner_steps=5, n_threads=2)
pid = os.fork()
if pid == 0:
    warnings.simplefilter("error")
    try:
        F.meta_value_and_grad(theta, batch, inner_lr=0.1, inner_steps=5, n_threads=2)
        os._exit(3)
    except fastmaml.ForkWarning as w:
        os._exit(0 if "forked" in str(w) and "spawn" in str(w) else 4)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
""")
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stdout + out.stderr[-3000:]


def test_fork_warning_is_public_and_a_runtime_warning():
    assert issubclass(fastmaml.ForkWarning, RuntimeWarning)
    assert fastmaml.ForkWarning is F.ForkWarning and "ForkWarning" in fastmaml.__all__


# ---------------------------------------------------------------------------
# 3. Memory: the step table and the path of the reverse sweep
# ---------------------------------------------------------------------------

LIMITED = """
import resource, numpy as np
from fastmaml import functional as F
# 2 GiB of address space beyond what the interpreter holds now: the memory
# estimate must see the limit and refuse before allocating.
with open("/proc/self/statm") as fh:
    used = int(fh.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + 2 * 2**30, resource.RLIM_INFINITY))
rng = np.random.default_rng(0)
d = 784
batch = (rng.random((2, 5, d)), rng.integers(0, 2, (2, 5)), rng.random((2, 5, d)), rng.integers(0, 2, (2, 5)))
try:
    F.meta_value_and_grad(np.zeros(d + 1), batch, inner_lr=0.01, inner_steps=K, n_threads=1)
    print("ran")
except MemoryError as exc:
    print("MemoryError", exc)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets RLIMIT_AS")
def test_a_million_inner_steps_is_a_named_memory_error_not_an_oom_kill():
    """inner_steps=10**6 at d=784: the 6 GiB step table is refused, naming inner_steps, before allocating."""
    out = run_script("K = 10**6\n" + LIMITED)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("MemoryError inner_steps:"), out.stdout + out.stderr[-2000:]
    assert "step-size table" in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets RLIMIT_AS")
def test_the_path_kept_for_the_reverse_sweep_is_checked_too():
    """A step table that fits (1.3 GiB) with a path that does not (2.5 GiB per worker) is refused, naming it."""
    out = run_script("K = 2 * 10**5\n" + LIMITED)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("MemoryError inner_steps:"), out.stdout + out.stderr[-2000:]
    assert "path kept for the reverse sweep" in out.stdout


def test_cgroup_v2_limit_caps_the_memory_estimate(tmp_path):
    (tmp_path / "proc").write_text("0::/job\n")
    job = tmp_path / "cg" / "job"
    job.mkdir(parents=True)
    (job / "memory.max").write_text(f"{3 * 2**30}\n")
    (job / "memory.current").write_text(f"{2**30}\n")
    assert _cgroup_headroom(str(tmp_path / "cg"), str(tmp_path / "proc")) == 2 * 2**30


def test_cgroup_v1_limit_caps_the_memory_estimate(tmp_path):
    (tmp_path / "proc").write_text("5:cpu,cpuacct:/\n4:memory:/job\n")
    job = tmp_path / "cg" / "memory" / "job"
    job.mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(f"{2**31}\n")
    (job / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    assert _cgroup_headroom(str(tmp_path / "cg"), str(tmp_path / "proc")) == 2**30


def test_cgroup_without_limit_is_ignored(tmp_path):
    (tmp_path / "proc").write_text("0::/\n")
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    assert _cgroup_headroom(str(tmp_path / "cg"), str(tmp_path / "proc")) is None


# ---------------------------------------------------------------------------
# 4. IDX reader: the declared size is checked against the stream as it is read
# ---------------------------------------------------------------------------


def idx_header(code: int, shape) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(int(s).to_bytes(4, "big") for s in shape)


def test_idx_gzip_bomb_fails_early_without_reading_the_stream_whole(tmp_path):
    """A small gzip file whose stream runs 64 MiB past its declared 10 bytes: refused with a few MiB of peak."""
    path = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=9) as gz:
        gz.write(idx_header(0x08, (10,)) + bytes(range(10)))
        zeros = bytes(2**20)
        for _ in range(64):
            gz.write(zeros)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="run on past") as info:
            load_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB: the stream was read whole"


def test_idx_header_declaring_more_than_memory_is_a_memory_error_naming_the_file(tmp_path):
    path = tmp_path / "huge-idx3-ubyte.gz"
    with gzip.open(path, "wb") as gz:
        gz.write(idx_header(0x0E, (2**31, 2**31, 4)) + bytes(64))
    with pytest.raises(MemoryError, match="huge-idx3-ubyte.gz"):
        load_idx(path)


def test_idx_short_stream_is_a_clear_error(tmp_path):
    path = tmp_path / "short-idx1-ubyte.gz"
    with gzip.open(path, "wb") as gz:
        gz.write(idx_header(0x0B, (1000,)) + bytes(10))
    with pytest.raises(ValueError, match="truncated IDX file") as info:
        load_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x0B, np.int16), (0x0C, np.int32), (0x0E, np.float64)])
@pytest.mark.parametrize("compressed", [False, True])
def test_idx_streamed_read_returns_native_owned_arrays(tmp_path, code, dtype, compressed):
    values = (np.arange(2 * 3 * 5) * 3 - 7).astype(dtype).reshape(2, 3, 5)
    raw = idx_header(code, values.shape) + values.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    path = tmp_path / ("x.gz" if compressed else "x")
    if compressed:
        with gzip.open(path, "wb") as gz:
            gz.write(raw)
    else:
        path.write_bytes(raw)
    got = load_idx(path)
    np.testing.assert_array_equal(got, values)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    assert got.flags.c_contiguous and got.flags.writeable and got.flags.owndata or got.base is not None


# ---------------------------------------------------------------------------
# 5. Messages that name the argument
# ---------------------------------------------------------------------------


def test_huge_n_threads_names_n_threads():
    theta, batch = small_batch()
    with pytest.raises(ValueError, match=r"n_threads: expected an integer in \[1, 2147483647\], got 2147483648"):
        F.meta_value_and_grad(theta, batch, inner_lr=0.1, inner_steps=2, n_threads=2**31)


def test_many_threads_for_few_tasks_give_the_same_result():
    theta, batch = small_batch()
    one = F.meta_value_and_grad(theta, batch, inner_lr=0.1, inner_steps=2, n_threads=1)
    many = F.meta_value_and_grad(theta, batch, inner_lr=0.1, inner_steps=2, n_threads=2**31 - 1)
    np.testing.assert_array_equal(one.grad, many.grad)


def test_sweep_as_a_list_names_sweep():
    theta, batch = small_batch()
    with pytest.raises(ValueError, match=r"sweep: expected one of \('auto', 'plain', 'gram'\), got \['gram'\]"):
        F.meta_value_and_grad(theta, batch, inner_lr=0.1, inner_steps=2, sweep=["gram"])


def test_ragged_support_list_points_to_from_index():
    ragged = [[[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]]]
    with pytest.raises(ValueError, match="support_X: .*unequal lengths.*Tasks.from_index.*support_ptr"):
        fastmaml.Tasks(ragged, [[0], [0, 1]], np.zeros((2, 1, 2)), np.zeros((2, 1)))


def test_absurd_inner_steps_blames_inner_steps_not_inner_lr():
    theta, batch = small_batch()
    with pytest.raises(MemoryError, match="^inner_steps: the step-size table"):
        F.meta_value_and_grad(theta, batch, inner_lr=0.1, inner_steps=2**62)


@pytest.mark.parametrize("budget,error", [("big", TypeError), (True, TypeError), (1.5, TypeError), (-1, ValueError)])
def test_kernel_budget_must_be_a_byte_count(budget, error):
    X = np.random.default_rng(0).random((20, 3))
    y = np.arange(20) % 4
    with pytest.raises(error, match="kernel_budget"):
        fastmaml.EpisodeSampler(X, y, kernel_budget=budget)


def test_dataset_kernel_budget_must_be_a_byte_count():
    from fastmaml.datasets import dataset_kernel

    with pytest.raises(TypeError, match="memory_budget"):
        dataset_kernel(np.zeros((3, 2)), memory_budget="big")


def test_l2_overflowing_float32_is_a_value_error_even_with_warnings_as_errors():
    theta, batch = small_batch(dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="l2: 1e[+]?39 overflows the compute dtype float32"):
            F.meta_value_and_grad(theta, batch, inner_lr=0.1, inner_steps=2, l2=1e39)


def _precond_model(random_state):
    return fastmaml.MAML(inner_lr=0.1, inner_steps=1, learn_inner_lr="preconditioner", n_iterations=1,
                         random_state=random_state)


def test_random_state_string_is_refused_by_the_estimator():
    theta, batch = small_batch()
    with pytest.raises(TypeError, match="random_state"):
        _precond_model("abc").fit(fastmaml.Tasks(*batch))


def test_generator_random_state_is_used_reproducibly():
    theta, batch = small_batch()
    a = _precond_model(np.random.default_rng(5)).fit(fastmaml.Tasks(*batch))
    b = _precond_model(np.random.default_rng(5)).fit(fastmaml.Tasks(*batch))
    np.testing.assert_array_equal(a._params["U"], b._params["U"])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_multinomial_predict_proba_with_huge_finite_parameters_is_the_limit_not_nan(dtype):
    X = np.array([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]], dtype=dtype)
    big = np.finfo(dtype).max / 2
    P = np.array([[big, -big, 0.0], [big, 0.0, -big], [0.0, 0.0, 0.0]], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proba = F.predict_proba(P, X)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    # Row 0: logits (3 big, -big, -2 big) -> class 0 certain; row 1: (-big/2, big, -big/2) -> class 1.
    np.testing.assert_array_equal(proba[0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(proba[1], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(proba[2], [1 / 3] * 3, rtol=1e-6)
    binary = F.predict_proba(np.array([big, big, 0.0]), X)
    np.testing.assert_array_equal(binary, [1.0, 0.0, 0.5])


def test_predict_proba_of_ordinary_parameters_is_unchanged_bitwise():
    rng = np.random.default_rng(3)
    X, P = rng.standard_normal((7, 4)), rng.standard_normal((5, 3))
    z = X @ P[:-1] + P[-1]
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    np.testing.assert_array_equal(F.predict_proba(P, X), e / e.sum(axis=-1, keepdims=True))
