"""Bitwise snapshot of fastmaml's outputs on the benchmark shapes.

    python tools/snapshot.py save out.npz      # record every output
    python tools/snapshot.py compare out.npz   # exit 1 unless all are bitwise equal

Covers the functional core (binary and softmax, float32/float64, plain and
Gram sweeps, every inner_lr layout, MAML / first-order / Reptile,
preconditioner, iMAML, adapt, primitives, index-form and ragged tasks) and a
short MAML.fit on an EpisodeSampler, so that a refactor can prove it changed
no result. Run it from outside the checkout (or with an installed package).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

import fastmaml as fm

SHAPES = {  # the benchmark workloads (W2, W3 shrunk along T to keep this quick)
    "W1": dict(T=32, n=20, m=30, d=784, K=5, lr=0.1),
    "W2": dict(T=8, n=100, m=100, d=784, K=10, lr=0.1),
    "W3": dict(T=300, n=10, m=10, d=64, K=5, lr=0.5),
    "W4": dict(T=8, n=20, m=30, d=784, K=50, lr=0.05),
}


def _tasks(spec, dtype, C, seed):
    rng = np.random.default_rng(seed)
    T, n, m, d = spec["T"], spec["n"], spec["m"], spec["d"]
    Xs = rng.random((T, n, d)).astype(dtype)
    Xq = rng.random((T, m, d)).astype(dtype)
    ys = rng.integers(0, C, (T, n))
    yq = rng.integers(0, C, (T, m))
    shape = (d + 1,) if C == 2 else (d + 1, C)
    theta = (0.01 * rng.standard_normal(shape)).astype(dtype)
    return theta, (Xs, ys, Xq, yq)


def _put(out, key, res):
    for name in ("loss", "grad", "grad_inner_lr", "grad_l2", "grad_log_scale", "grad_U"):
        if hasattr(res, name):
            out[f"{key}.{name}"] = np.asarray(getattr(res, name))


def collect() -> dict:
    out = {}
    for wname, spec in SHAPES.items():
        K, lr = spec["K"], spec["lr"]
        for dtype in ("float32", "float64"):
            for C in (2, 3):
                theta, tasks = _tasks(spec, dtype, C, seed=len(out))
                ts = fm.Tasks(*tasks)
                P = theta.shape
                layouts = {"scalar": lr, "step": np.full((K,) + (1,) * len(P), lr)}
                if wname in ("W1", "W3"):
                    layouts["param"] = np.full(P, lr)
                    layouts["stepparam"] = np.full((K,) + P, lr)
                for lname, ilr in layouts.items():
                    for sweep in ("plain", "gram"):
                        if sweep == "gram" and lname in ("param", "stepparam"):
                            continue
                        for fo in (False, True):
                            key = f"{wname}.{dtype}.C{C}.{lname}.{sweep}.fo{int(fo)}"
                            _put(out, key, fm.meta_value_and_grad(
                                theta, ts, inner_lr=ilr, inner_steps=K, l2=0.01, first_order=fo, sweep=sweep))
                key = f"{wname}.{dtype}.C{C}"
                out[key + ".reptile"] = fm.reptile_grad(theta, ts, inner_lr=lr, inner_steps=K, l2=0.01).grad
                out[key + ".adapt"] = fm.adapt(theta, ts, inner_lr=lr, inner_steps=K, l2=0.01)
                if wname == "W1":
                    D = theta.shape[0]
                    rng = np.random.default_rng(1)
                    s = np.log(np.full(D, lr)).astype(dtype)
                    U = (0.01 * rng.standard_normal((D, 2))).astype(dtype)
                    _put(out, key + ".precond", fm.precond_value_and_grad(
                        theta, ts, log_scale=s, U=U, inner_steps=K, l2=0.01))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        _put(out, key + ".imaml", fm.imaml_value_and_grad(theta, ts, mu=1.0, l2=0.01))
                    phis = np.repeat(theta[None], ts.n_tasks, axis=0)
                    lg = fm.loss_and_grad(phis, tasks[0], tasks[1], l2=0.01)
                    for i, a in enumerate(lg if isinstance(lg, tuple) else (lg,)):
                        out[key + f".loss_and_grad{i}"] = np.asarray(a)
                    out[key + ".hvp"] = np.asarray(fm.hessian_vector_product(
                        phis, tasks[0], tasks[1], v=phis, l2=0.01))
                    # index-form and ragged tasks over one shared X
                    N = 2000
                    rng = np.random.default_rng(2)
                    X = rng.random((N, spec["d"])).astype(dtype)
                    T = 16
                    sidx = rng.integers(0, N, (T, spec["n"]))
                    qidx = rng.integers(0, N, (T, spec["m"]))
                    sy = rng.integers(0, C, (T, spec["n"]))
                    qy = rng.integers(0, C, (T, spec["m"]))
                    ti = fm.Tasks.from_index(X, sidx, sy, qidx, qy)
                    _put(out, key + ".index", fm.meta_value_and_grad(theta, ti, inner_lr=lr, inner_steps=K, l2=0.01))
                    sizes = rng.integers(1, spec["n"] + 1, T)
                    ptr = np.concatenate([[0], np.cumsum(sizes)])
                    tr = fm.Tasks.from_index(X, sidx.reshape(-1)[: ptr[-1]], sy.reshape(-1)[: ptr[-1]],
                                             qidx, qy, support_ptr=ptr)
                    _put(out, key + ".ragged", fm.meta_value_and_grad(theta, tr, inner_lr=lr, inner_steps=K, l2=0.01))
    # a short estimator run on an episode sampler
    rng = np.random.default_rng(3)
    X = rng.random((600, 30)).astype(np.float32)
    y = rng.integers(0, 5, 600)
    for learn in (None, "scalar", "per_parameter", "preconditioner"):
        sampler = fm.EpisodeSampler(X, y, n_way=2, k_shot=3, n_query=5, random_state=0)
        model = fm.MAML(inner_steps=3, inner_lr=0.1, meta_batch_size=8, n_iterations=20,
                        learn_inner_lr=learn, learn_l2=learn is not None, l2=0.01, progress=False, random_state=0)
        model.fit(sampler)
        out[f"fit.{learn}.theta"] = model.theta_
        out[f"fit.{learn}.loss"] = np.array([h["loss"] for h in model.history_])
    return out


def main(argv) -> int:
    if len(argv) != 3 or argv[1] not in ("save", "compare"):
        print(__doc__)
        return 2
    out = collect()
    if argv[1] == "save":
        np.savez(argv[2], **out)
        print(f"saved {len(out)} arrays to {argv[2]}")
        return 0
    ref = np.load(argv[2])
    bad = [k for k in ref.files if k not in out or out[k].shape != ref[k].shape
           or out[k].tobytes() != ref[k].tobytes()]
    new = sorted(set(out) - set(ref.files))
    for k in bad:
        if k in out and out[k].shape == ref[k].shape:
            diff = np.abs(out[k].astype(np.float64) - ref[k]).max()
            print(f"DIFFERS {k}: max abs diff {diff:.3g}")
        else:
            print(f"MISSING/SHAPE {k}")
    print(f"{len(ref.files) - len(bad)} of {len(ref.files)} arrays bitwise equal; {len(new)} new")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
