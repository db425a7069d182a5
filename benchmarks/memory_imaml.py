"""Peak memory of MAML (grows with K) vs iMAML (independent of solver steps).

Each configuration runs in a fresh subprocess and reports its peak resident
set size (ru_maxrss) minus the baseline of the same process after the data
were built. Usage: python benchmarks/memory_imaml.py [--ks 5,50,200,800]
(about a minute on 2 cores; each child needs up to a few hundred MiB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys
import numpy as np
import fastmaml
algo, K = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
T, C, n, m, d = 32, 5, 25, 75, 784
Xs = rng.random((T, n, d)); Xq = rng.random((T, m, d))
ys = rng.integers(0, C, (T, n)); yq = rng.integers(0, C, (T, m))
tasks = fastmaml.Tasks(Xs, ys, Xq, yq)
theta = np.zeros((d + 1, C))
fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.1, inner_steps=1, n_threads=2)  # warm up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if algo == "maml":
    fastmaml.meta_value_and_grad(theta, tasks, inner_lr=0.05, inner_steps=K, n_threads=2, sweep="plain")
else:
    r = fastmaml.imaml_value_and_grad(theta, tasks, mu=1.0, max_iter=K, n_threads=2)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"algo": algo, "K": K, "extra_MiB": (peak - base) / 1024}))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="5,50,200,800",
                        help="MAML inner steps / iMAML solver iterations to measure (default: %(default)s)")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    rows = []
    for algo in ("maml", "imaml"):
        for K in ks:
            # the child runs outside the checkout: from its root, the source folder fastmaml/ would shadow
            # the installed package
            proc = subprocess.run([sys.executable, "-c", CHILD, algo, str(K)], capture_output=True, text=True,
                                  cwd=tempfile.gettempdir())
            if proc.returncode != 0:
                sys.exit(f"memory_imaml.py: the {algo} K={K} child failed (exit {proc.returncode}):\n"
                         f"{proc.stderr.strip()}")
            rows.append(json.loads(proc.stdout))
    print(f"{'algorithm':<10} {'K / max_iter':>12} {'extra peak RSS (MiB)':>22}")
    for r in rows:
        print(f"{r['algo']:<10} {r['K']:>12} {r['extra_MiB']:>22.1f}")


if __name__ == "__main__":
    main()
