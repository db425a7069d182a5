"""Print fastmaml's speed against its peers as one ratio table.

Usage::

    python benchmarks/report.py [--quick] [--workloads W1,W2,W3,W4,E1]
                                [--dtypes float32,float64] [--threads 1,2]
                                [--numpy-loop] [--json out.json]

In one process, for every workload x dtype x thread count, times the exact
second-order meta-gradient of fastmaml and of every installed peer (NumPy
vectorised across tasks, JAX, torch.func; see peers.py and numpy_batched.py;
with --numpy-loop also the per-task loop of tests/reference.py, which is a
correctness oracle and not a speed peer): each implementation's gradient is
first checked against fastmaml's (float64: relative error <= 1e-8, float32:
<= 2e-3), warmed up (JAX compiles), then timed timeit-style; the
implementations of one row are timed in interleaved repeats, so that a change
of background load hits them alike. The table gives medians, the ratios
peer time / fastmaml time (> 1: fastmaml is faster), and fastmaml's effective
GFLOP/s by the model F = T (d+1) (8 K n + 4 m) beside the machine's measured
matrix-multiply peak (numpy's a @ b, 2048 x 2048, with the same number of BLAS
threads).

Roofline, per row: F / P, the time the work would take at the machine's
measured matrix-multiply peak P (same dtype and thread count; when
OPENBLAS_CORETYPE is set, the larger of the peaks with and without it), and
B / BW, the time to read the row's task data once (B bytes: features and
labels as passed) at BW, the best streaming-read bandwidth measured over a
buffer of B bytes with the same thread count (several read kernels, best of
several runs, at the start and at the end; each thread reads its share
repeatedly within one dispatch, so that the thread pool's dispatch is not
timed as reading). Beside them fastmaml's time and
its ratio to the issue's bound max(2.5 F/P, 2 B/BW) (<= 1: within it).

E1 rows give meta-iterations per second of episodic training on MNIST digit
pairs, sampling included: ``MAML.fit`` on an ``EpisodeSampler`` (the path
users run), a hand-written fastmaml loop (sampler + meta_value_and_grad +
NumPy Adam) and the JAX loop.

The run prints the configuration it measured (CPU, BLAS and its threads,
OPENBLAS_CORETYPE, library versions, load average): this script changes no
environment variable. When OPENBLAS_CORETYPE is set, the matmul peak is also
measured in a child process without it, for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

# the environment as given (imported libraries may add to it: torch sets KMP_DUPLICATE_LIB_OK)
_ENV_AT_START = dict(os.environ)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

IMPLS = ["fastmaml", "numpy", "jax", "torch.func", "numpy loop"]
E1_LOOPS = ["fastmaml fit", "fastmaml hand loop", "jax"]
NOISY = 0.25  # CPUs used by other processes above which a row counts as noisy
GEMM_N = 2048

_GEMM_CHILD = """
import sys, time, numpy as np
n, dtype, reps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
a = rng.random((n, n)).astype(dtype); b = rng.random((n, n)).astype(dtype)
a @ b
best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(reps))
print(2.0 * n**3 / best / 1e9)
"""


# ---------------------------------------------------------------------------
# Configuration and matmul peak
# ---------------------------------------------------------------------------


def machine_config() -> dict:
    """What was measured: CPU, libraries, BLAS, thread-related environment, load."""
    cfg = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            cfg["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        cfg["cpu"] = platform.processor()
    try:
        from fastmaml._config import config

        cfg["fastmaml"] = config()
    except ImportError:  # pragma: no cover
        import fastmaml

        cfg["fastmaml"] = {"fastmaml": fastmaml.__version__}
    cfg["numpy"] = np.__version__
    if peers.threadpoolctl is not None:
        cfg["threadpools"] = [
            {k: info.get(k) for k in ("user_api", "internal_api", "version", "architecture", "num_threads", "prefix")}
            for info in peers.threadpoolctl.threadpool_info()
        ]
    else:
        cfg["threadpools"] = "threadpoolctl not installed: BLAS threads NOT limited (numpy reference, matmul peak)"
    if peers.HAVE_JAX:
        cfg["jax"] = peers.jax.__version__
        cfg["jax_devices"] = [str(d) for d in peers.jax.devices()]
    if peers.HAVE_TORCH:
        cfg["torch"] = peers.torch.__version__
    cfg["env"] = {
        k: v for k, v in _ENV_AT_START.items()
        if k.startswith(("OPENBLAS", "OMP_", "MKL_", "XLA_", "GOMP", "KMP_")) or k in ("BLIS_NUM_THREADS",)
    }
    cfg["loadavg_start"] = _loadavg()
    return cfg


def _loadavg():
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover
        return None


def print_config(cfg: dict, out=sys.stdout) -> None:
    """The configuration, one line per item."""
    for key, value in cfg.items():
        if key == "fastmaml" and isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if k not in ("python", "platform", "numpy"))
        elif key == "threadpools" and isinstance(value, list):
            value = "; ".join(", ".join(f"{k}={v}" for k, v in pool.items() if v is not None) for pool in value)
        elif key == "env":
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "(none set)"
        print(f"  {key:>14}: {value}", file=out)


def gemm_peak(dtype: str, n_threads: int, reps: int) -> float:
    """Best GFLOP/s of numpy's a @ b (GEMM_N x GEMM_N) with BLAS limited to n_threads."""
    rng = np.random.default_rng(0)
    a = rng.random((GEMM_N, GEMM_N)).astype(dtype)
    b = rng.random((GEMM_N, GEMM_N)).astype(dtype)
    with peers.limit_threads(n_threads):
        a @ b
        best = np.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2.0 * GEMM_N**3 / best / 1e9


def gemm_peak_child(dtype: str, n_threads: int, reps: int, drop_coretype: bool) -> float | None:
    """The same in a child process (OPENBLAS_CORETYPE removed from its environment when asked)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(n_threads), OMP_NUM_THREADS=str(n_threads))
    if drop_coretype:
        env.pop("OPENBLAS_CORETYPE", None)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _GEMM_CHILD, str(GEMM_N), dtype, str(reps)],
            env=env, capture_output=True, text=True, check=True, timeout=300,
        )
        return float(out.stdout.strip())
    except (subprocess.SubprocessError, ValueError):  # pragma: no cover
        return None


# ---------------------------------------------------------------------------
# Streaming-read bandwidth
# ---------------------------------------------------------------------------

#: Read kernels: each reads every byte of its chunk once and does little else
#: (the best of them is taken, so that no single kernel's compute limits BW).
_READ_KERNELS = {
    "max": lambda chunk: chunk.view(np.float32).max(),
    "bitwise_or": lambda chunk: np.bitwise_or.reduce(chunk.view(np.uint64)),
    "dot": lambda chunk: np.dot(chunk.view(np.float32), chunk.view(np.float32)),
}


def read_bandwidth(nbytes: int, n_threads: int, reps: int) -> float:
    """Best GB/s reading a buffer of about ``nbytes`` bytes, split over ``n_threads`` threads.

    The buffer holds float32 values in [0, 1) (like the task data); each of
    ``n_threads`` Python threads runs a NumPy reduction (which releases the
    GIL; BLAS limited to one thread per caller) over its contiguous share, on
    the first ``n_threads`` CPUs (``peers.limit_threads``), ``passes`` times
    in a row within one dispatch, so that the thread pool's dispatch (34-70 us
    measured here, a third of one read of W1's 5 MB) is paid once per about
    4 ms of reading instead of once per read; GB/s = passes * bytes / time.
    A share larger than the thread's L2 streams from L3 or memory on every
    pass (cyclic reads leave nothing to hit); a smaller one reads from L2
    after the first pass, as repeated calls on the same tasks would. Best of
    ``reps`` runs of each read kernel.
    """
    from concurrent.futures import ThreadPoolExecutor

    unit = 8 * n_threads
    nbytes = max(unit, (int(nbytes) // unit) * unit)
    buf = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32).view(np.uint8)
    chunks = np.split(buf, n_threads)
    best = np.inf
    one_blas_thread = (peers.threadpoolctl.threadpool_limits(limits=1, user_api="blas")
                       if peers.threadpoolctl is not None else contextlib.nullcontext())
    passes = max(1, -(-120_000_000 // nbytes))  # about 4 ms of reading at 30 GB/s

    def read_share(kernel, chunk):
        for _ in range(passes):
            kernel(chunk)

    with peers.limit_threads(n_threads), one_blas_thread, ThreadPoolExecutor(n_threads) as pool:
        for kernel in _READ_KERNELS.values():
            list(pool.map(kernel, chunks))  # warm-up: pages touched, caches filled
            for _ in range(reps):
                t0 = time.perf_counter()
                list(pool.map(read_share, [kernel] * n_threads, chunks))
                best = min(best, time.perf_counter() - t0)
    return passes * nbytes / best / 1e9


# ---------------------------------------------------------------------------
# Background load: CPU time used by other processes while we measure
# ---------------------------------------------------------------------------

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ForeignLoad:
    """Average number of CPUs kept busy by *other* processes since the last ``read()``.

    Machine-wide busy time from /proc/stat minus this process's own CPU time;
    None where /proc/stat is unavailable. Used to flag (and avoid) timings
    taken while something else was running.
    """

    def __init__(self):
        self._last = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        t = os.times()
        return time.perf_counter(), (sum(fields[:8]) - idle) / _HZ, t.user + t.system

    def read(self):
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))


def wait_for_quiet(log, threshold=NOISY, window=1.0, max_wait=120.0):
    """Wait (at most ``max_wait`` s) until other processes use less than ``threshold`` CPUs."""
    if max_wait <= 0:
        return None
    probe = ForeignLoad()
    t0 = time.perf_counter()
    while True:
        time.sleep(window)
        load = probe.read()
        if load is None or load < threshold:
            return load
        if time.perf_counter() - t0 > max_wait:
            log(f"  (still {load:.2f} CPUs busy with other processes after {max_wait:.0f} s; measuring anyway)")
            return load


# ---------------------------------------------------------------------------
# Interleaved timing
# ---------------------------------------------------------------------------


def time_interleaved(fns: dict, *, min_time: float, repeat: int, max_total: float, settle: float = 0.0) -> dict:
    """Median seconds per call of each warmed-up zero-argument callable.

    Each callable gets a number of calls per repeat (so that a repeat takes
    about ``min_time``) and a number of repeats (``repeat``, fewer when that
    would exceed ``max_total`` seconds, at least one). Repeats are interleaved
    across callables. Every timed repeat starts after ``settle`` idle seconds:
    the peers share one process, and the worker pools of the one that ran
    before (XLA's, torch's, an OpenMP team) keep spinning on the cores for a
    while after their last call. Measured at W1 (float32, 2 threads, on a
    2-core EPYC): fastmaml's median call was 390-520 us in the 0.1 s after
    torch.func and JAX had run, and 366-374 us after a 0.2 s pause, as with
    no peer loaded at all (359-366 us).
    """
    plan = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        single = max(time.perf_counter() - t0, 1e-9)
        number = max(1, int(min_time / single))
        plan[name] = (number, max(1, min(repeat, int(max_total / (single * number)))))
    times = {name: [] for name in fns}
    for r in range(max(rep for _, rep in plan.values())):
        for name, fn in fns.items():
            number, rep = plan[name]
            if r >= rep:
                continue
            if settle > 0:
                time.sleep(settle)
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - t0) / number)
    return {
        name: dict(median=float(np.median(t)), min=float(np.min(t)), number=plan[name][0], repeat=len(t))
        for name, t in times.items()
    }


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------


class Runner:
    """Measures one row (workload, dtype, threads) at a time; inputs and compiled peers are cached."""

    def __init__(self, budget: dict, log, quiet_wait: float, peer_set: dict | None = None):
        self.budget, self.log, self.quiet_wait = budget, log, quiet_wait
        self.peer_set = dict(peers.PEERS) if peer_set is None else peer_set
        self._prepared: dict = {}
        self._digits = None

    def _prepare(self, name: str, dtype: str):
        """(workload, checked peers, relative errors), once per workload and dtype."""
        key = (name, dtype)
        if key not in self._prepared:
            w = peers.make_workload(name, dtype)
            s = w.shape
            self.log(f"{name} {dtype}: T={s['T']} n={s['n']} m={s['m']} d={s['d']} K={w.K}")
            ours = peers.to_numpy(peers.prepare_fastmaml(w)())[1]
            prepared, errors = {}, {}
            for impl, prepare in self.peer_set.items():
                fn = prepare(w)
                try:
                    errors[impl] = peers.check_agreement(fn(), ours, dtype, impl)  # also the warm-up
                    prepared[impl] = fn
                except AssertionError as exc:
                    errors[impl] = str(exc)
                    self.log(f"  {impl}: NOT TIMED: {exc}")
            self._prepared[key] = (w, prepared, errors)
        return self._prepared[key]

    def row(self, name: str, dtype: str, nt: int) -> dict:
        if name == "E1":
            return self.e1_row(dtype, nt)
        w, prepared, errors = self._prepare(name, dtype)
        fns = {"fastmaml": peers.prepare_fastmaml(w, n_threads=nt), **prepared}
        wait_for_quiet(self.log, max_wait=self.quiet_wait)
        with peers.limit_threads(nt):
            for fn in fns.values():  # warm up under this thread count
                fn()
            probe = ForeignLoad()
            res = time_interleaved(fns, **self.budget)
            foreign = probe.read()
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        kernel = getattr(fns.get("numpy"), "plan", {}).get(cpus)  # which of its kernels the numpy peer ran
        self.log(f"  {name} {dtype} {nt} thread(s): "
                 + ", ".join(f"{k} {_fmt_time(v['median'])}" for k, v in res.items())
                 + (f"  (numpy kernel: {kernel})" if kernel else "")
                 + f"  [other processes: {_fmt_load(foreign)} CPUs]")
        return dict(workload=name, dtype=dtype, threads=nt, shape=w.shape, flops=w.flops, nbytes=w.nbytes,
                    times=res, grad_rel_error=errors, numpy_kernel=kernel, foreign_load=foreign)

    def e1_row(self, dtype: str, nt: int) -> dict:
        """Meta-iterations per second of the E1 loops (fresh loops; JAX compiles in the warm-up)."""
        if self._digits is None:
            self._digits = peers.load_digits("float64")
        X64, y = self._digits
        X = np.ascontiguousarray(X64, dtype=dtype)
        loops = {"fastmaml fit": peers.FitEpisodic(X, y, n_threads=nt),
                 "fastmaml hand loop": peers.FastmamlEpisodic(X, y, n_threads=nt)}
        if peers.HAVE_JAX:
            loops["jax"] = peers.JaxEpisodic(X, y)
        wait_for_quiet(self.log, max_wait=self.quiet_wait)
        with peers.limit_threads(nt):
            for loop in loops.values():
                loop.run(5)  # warm-up (JAX compiles)
            chunk = {}
            for k, loop in loops.items():  # iterations per timed chunk: about min_time seconds
                t0 = time.perf_counter()
                loop.run(20)
                per_it = (time.perf_counter() - t0) / 20
                chunk[k] = max(20, int(self.budget["min_time"] / per_it))
            fns = {k: (lambda loop=loop, n=chunk[k]: loop.run(n)) for k, loop in loops.items()}
            probe = ForeignLoad()
            res = time_interleaved(fns, min_time=0.0, repeat=self.budget["repeat"],
                                   max_total=self.budget["max_total"], settle=self.budget.get("settle", 0.0))
            foreign = probe.read()
        its = {k: chunk[k] / v["median"] for k, v in res.items()}
        self.log(f"  E1 {dtype} {nt} thread(s): " + ", ".join(f"{k} {v:.0f} it/s" for k, v in its.items())
                 + f"  [other processes: {_fmt_load(foreign)} CPUs]")
        return dict(workload="E1", dtype=dtype, threads=nt, iterations_per_second=its,
                    iterations_per_repeat=chunk, foreign_load=foreign)


def _noisy(row, threshold: float) -> bool:
    return row.get("foreign_load") is not None and row["foreign_load"] > threshold


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt_time(s) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_load(x) -> str:
    return "?" if x is None else f"{x:.2f}"


def _fmt_ratio(x) -> str:
    return "-" if x is None else (f"{x:.2f}x" if x < 10 else f"{x:.0f}x" if x < 1000 else f"{x:.3g}x")


def print_table(rows, e1_rows, peaks, out=sys.stdout):
    peers_shown = [p for p in IMPLS[1:] if any(p in r["times"] for r in rows)] or IMPLS[1:]
    head = ["workload", "dtype", "thr", "fastmaml"] + peers_shown + [f"{p}:fm" for p in peers_shown]
    head += ["fm GFLOP/s", "GEMM peak", "% peak", "bg"]
    table = []
    for r in rows:
        t = r["times"]
        fm = t["fastmaml"]["median"]
        cells = [r["workload"], r["dtype"], str(r["threads"]), _fmt_time(fm)]
        cells += [_fmt_time(t[p]["median"]) if p in t else "-" for p in peers_shown]
        cells += [_fmt_ratio(t[p]["median"] / fm) if p in t else "-" for p in peers_shown]
        gf = r["flops"] / fm / 1e9
        peak = peaks.get((r["dtype"], r["threads"]))
        cells += [f"{gf:.1f}", f"{peak:.1f}" if peak else "-", f"{100 * gf / peak:.0f}%" if peak else "-",
                  _fmt_load(r.get("foreign_load"))]
        table.append(cells)
    if table:
        _print_cols(head, table, out)
    if e1_rows:
        print("\nE1: episodic meta-training on MNIST digit pairs (T=32, 2-way 5-shot, 15 queries/class, K=5), "
              "meta-iterations per second including sampling.", file=out)
        print("fit = MAML(inner_steps=5, inner_lr=0.1, meta_lr=1e-3, meta_batch_size=32, progress=False).fit(sampler), "
              "a fresh fit per timed chunk (its start-up included);", file=out)
        print("hand = EpisodeSampler + meta_value_and_grad + NumPy Adam written by hand; jax = sampling in NumPy, "
              "gather + meta-gradient + Adam in one jit step", file=out)
        head = ["workload", "dtype", "thr", "fit it/s", "hand it/s", "jax it/s", "fit:jax", "hand:jax", "bg"]
        table = []
        for r in e1_rows:
            its = r["iterations_per_second"]
            fit, hand, jx = its.get("fastmaml fit"), its.get("fastmaml hand loop"), its.get("jax")
            table.append([r["workload"], r["dtype"], str(r["threads"]), f"{fit:.0f}", f"{hand:.0f}",
                          f"{jx:.0f}" if jx else "-", _fmt_ratio(fit / jx) if jx else "-",
                          _fmt_ratio(hand / jx) if jx else "-", _fmt_load(r.get("foreign_load"))])
        _print_cols(head, table, out)


def roofline_peak(peaks, peaks_child, dtype, nt):
    """P: the matmul peak of this dtype and thread count (the larger with / without OPENBLAS_CORETYPE)."""
    values = [v for v in (peaks.get((dtype, nt)), peaks_child.get((dtype, nt))) if v]
    return max(values) if values else None


def print_roofline(rows, peaks, peaks_child, bandwidth, out=sys.stdout):
    """Per row: F/P, B/BW, fastmaml's time and its ratio to the issue's bound max(2.5 F/P, 2 B/BW)."""
    head = ["workload", "dtype", "thr", "F MFLOP", "B MB", "P GFLOP/s", "BW GB/s", "F/P", "B/BW",
            "fastmaml", "fm/(F/P)", "fm/(B/BW)", "bound", "fm/bound", "numpy/bound"]
    table = []
    for r in rows:
        fm = r["times"]["fastmaml"]["median"]
        peak = roofline_peak(peaks, peaks_child, r["dtype"], r["threads"])
        bw = bandwidth.get((r["nbytes"], r["threads"]))
        t_flop = r["flops"] / (peak * 1e9) if peak else None
        t_byte = r["nbytes"] / (bw * 1e9) if bw else None
        bound = max(2.5 * t_flop if t_flop else 0.0, 2.0 * t_byte if t_byte else 0.0) or None
        np_t = r["times"]["numpy"]["median"] if "numpy" in r["times"] else None
        table.append([
            r["workload"], r["dtype"], str(r["threads"]), f"{r['flops'] / 1e6:.1f}", f"{r['nbytes'] / 1e6:.2f}",
            f"{peak:.1f}" if peak else "-", f"{bw:.1f}" if bw else "-", _fmt_time(t_flop), _fmt_time(t_byte),
            _fmt_time(fm), _fmt_ratio(fm / t_flop) if t_flop else "-", _fmt_ratio(fm / t_byte) if t_byte else "-",
            _fmt_time(bound), f"{fm / bound:.2f}" if bound else "-",
            f"{np_t / bound:.2f}" if (bound and np_t) else "-",
        ])
    if table:
        _print_cols(head, table, out)


def _print_cols(head, table, out):
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    line = "  ".join(h.rjust(wd) for h, wd in zip(head, widths))
    print(line, file=out)
    print("-" * len(line), file=out)
    for row in table:
        print("  ".join(c.rjust(wd) for c, wd in zip(row, widths)), file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter repeats (noisier)")
    ap.add_argument("--workloads", default="W1,W2,W3,W4,E1", help="comma-separated subset of W1,W2,W3,W4,E1")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")
    ap.add_argument("--numpy-loop", action="store_true",
                    help="also time tests/reference.py's per-task loop (the correctness oracle, "
                         "slow; not a speed peer)")
    ap.add_argument("--retries", type=int, default=None, metavar="N",
                    help=f"re-measure rows taken while other processes used > {NOISY} CPUs, up to N times "
                         "(default 2, 0 with --quick)")
    ap.add_argument("--quiet-wait", type=float, default=None, metavar="SECONDS",
                    help="before each row, wait up to this long for other processes to go idle "
                         "(default 60, 0 with --quick)")
    args = ap.parse_args(argv)

    workloads = [s.strip().upper() for s in args.workloads.split(",") if s.strip()]
    unknown = [s for s in workloads if s not in peers.WORKLOADS and s != "E1"]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {list(peers.WORKLOADS) + ['E1']}")
    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    threads = [int(s) for s in args.threads.split(",") if s.strip()]
    budget = dict(min_time=0.05, repeat=3, max_total=5.0, settle=0.05) if args.quick else dict(
        min_time=0.25, repeat=7, max_total=30.0, settle=0.2)

    if args.retries is None:
        args.retries = 0 if args.quick else 2
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 60.0)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    cfg = machine_config()
    print("== configuration measured ==")
    print_config(cfg)
    peer_set = dict(peers.PEERS)
    if args.numpy_loop:
        peer_set.update(peers.OPTIONAL_PEERS)
    print(f"peers timed: {', '.join(peer_set)}  (missing: "
          f"{', '.join(p for p in IMPLS[1:4] if p not in peers.PEERS) or 'none'})")
    print("numpy = numpy_batched.py, vectorised across tasks (frozen; checked against tests/reference.py)"
          + ("; numpy loop = tests/reference.py, the per-task correctness oracle" if args.numpy_loop else ""))

    reps = 3 if args.quick else 7

    # The matmul peak is the best of measurements at the start and at the end
    # of the run (background load only ever lowers it).
    peaks, peaks_child = {}, {}

    def measure_peaks():
        wait_for_quiet(log, max_wait=quiet_wait)
        for dtype in dtypes:
            for nt in threads:
                key = (dtype, nt)
                peaks[key] = max(peaks.get(key, 0.0), gemm_peak(dtype, nt, reps))
                if os.environ.get("OPENBLAS_CORETYPE"):
                    child = gemm_peak_child(dtype, nt, reps, drop_coretype=True)
                    if child is not None:
                        peaks_child[key] = max(peaks_child.get(key, 0.0), child)

    # Streaming-read bandwidth over a buffer of each W workload's task-data size,
    # also the best of the start and the end of the run.
    bandwidth: dict = {}
    sizes = sorted({peers.make_workload(name, dtype, T=1).nbytes * peers.WORKLOADS[name]["T"]
                    for name in workloads if name != "E1" for dtype in dtypes})

    def measure_bandwidth():
        wait_for_quiet(log, max_wait=quiet_wait)
        for nbytes in sizes:
            for nt in threads:
                bandwidth[(nbytes, nt)] = max(bandwidth.get((nbytes, nt), 0.0), read_bandwidth(nbytes, nt, reps))

    measure_peaks()
    measure_bandwidth()
    runner = Runner(budget, log, quiet_wait, peer_set)
    units = [(name, dtype, nt) for name in workloads for dtype in dtypes for nt in threads]
    results: dict = {}
    skipped: set = set()
    for attempt in range(1 + args.retries):
        todo = [u for u in units if u[0] not in skipped and (u not in results or _noisy(results[u], NOISY))]
        if not todo:
            break
        if attempt:
            log(f"re-measuring {len(todo)} row(s) taken while other processes used > {NOISY} CPUs "
                f"(attempt {attempt + 1} of {1 + args.retries}; the quietest measurement is kept)")
        for unit in todo:
            if unit[0] in skipped:
                continue
            try:
                row = runner.row(*unit)
            except ImportError as exc:  # E1 without the MNIST subset
                log(f"{unit[0]} skipped: {exc}")
                skipped.add(unit[0])
                continue
            old = results.get(unit)
            if old is None or (row["foreign_load"] or 0.0) < (old["foreign_load"] or 0.0):
                results[unit] = row
    rows = [results[u] for u in units if u in results and u[0] != "E1"]
    e1_rows = [results[u] for u in units if u in results and u[0] == "E1"]

    if rows:
        measure_peaks()
        measure_bandwidth()
    print(f"\n== numpy matmul peak ({GEMM_N}x{GEMM_N} a @ b, best of {reps} at the start and at the end, GFLOP/s) ==")
    for (dtype, nt), gf in peaks.items():
        extra = ""
        if peaks_child.get((dtype, nt)):
            extra = (f"   (child process without OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}: "
                     f"{peaks_child[(dtype, nt)]:.1f})")
        print(f"  {dtype} {nt} thread(s): {gf:.1f}{extra}")
    if peers.threadpoolctl is None:
        print("  NOTE: threadpoolctl is not installed; BLAS thread count was not limited")
    if bandwidth:
        print(f"\n== streaming-read bandwidth (buffer of a workload's task data; best of {reps} runs of "
              f"{len(_READ_KERNELS)} read kernels ({', '.join(_READ_KERNELS)}), at the start and at the end, GB/s) ==")
        for (nbytes, nt), gbs in sorted(bandwidth.items()):
            print(f"  {nbytes / 1e6:8.2f} MB {nt} thread(s): {gbs:.1f}")

    print("\n== exact second-order meta-gradient, median time per call; peer:fm = peer time / fastmaml time ==")
    print("flop model F = T (d+1) (8 K n + 4 m); GEMM peak = numpy a @ b with the same BLAS thread count;")
    print("% peak above 100 means fastmaml does fewer flops than the model counts (the support-side")
    print("recursion in the span of the support rows, docs/design.md section 3: O(K n^2) per task for deep K);")
    print(f"bg = CPUs kept busy by other processes during the row (> {NOISY}: noisy, read with care);")
    print(f"every timed block (each library in turn, {budget['repeat']} rounds) starts after a {budget.get('settle', 0)} s pause, "
          "so that the previous library's idle worker threads have stopped spinning\n")
    print_table(rows, e1_rows, peaks)
    if rows:
        print("\n== roofline: F/P = time at the matmul peak P, B/BW = time to read the task data once at BW; "
              "bound = max(2.5 F/P, 2 B/BW), the issue's W1 target is fastmaml/bound <= 1 ==")
        print("F by the flop model above; B = bytes of the task arrays as passed (features and labels); "
              "P = matmul peak (same dtype and threads; the larger with/without OPENBLAS_CORETYPE);")
        print("BW = streaming-read bandwidth with the same threads over a buffer of B bytes\n")
        print_roofline(rows, peaks, peaks_child, bandwidth)
    cfg["loadavg_end"] = _loadavg()
    elapsed = time.perf_counter() - t_start
    print(f"\nload average at start {cfg['loadavg_start']}, at end {cfg['loadavg_end']}; run took {elapsed:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=cfg, budget=budget,
                           gemm_peak_gflops={f"{d} {t}": v for (d, t), v in peaks.items()},
                           gemm_peak_gflops_without_coretype={f"{d} {t}": v for (d, t), v in peaks_child.items()},
                           read_bandwidth_gbs={f"{b} bytes {t}": v for (b, t), v in bandwidth.items()},
                           workloads=rows, e1=e1_rows, elapsed_seconds=elapsed),
                      f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
