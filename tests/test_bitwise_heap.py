"""No result may depend on where the core's buffers sit in memory.

GCC's -O3 vectoriser used to version loops on run-time alias and alignment
checks (and to peel for alignment); the vector and scalar versions round
differently (an in-order vector sum does not fuse its multiply-adds), so the
Gram sweep's grad_inner_lr and grad_l2 changed in the last bit between
identical calls, following the heap's layout and the thread count. The build
turns that versioning off (CMakeLists.txt). Here each call runs with the heap
shifted by other allocations, at several thread counts, and every output must
keep its bits.
"""

import numpy as np
import pytest

import fastmaml

# (n, m, d, K): tiny support sets (Gram sweep, one task at a time), lock-step
# groups, a W1-like shape.
SHAPES = [(4, 3, 62, 2), (4, 3, 256, 2), (10, 10, 64, 5), (20, 30, 100, 3)]


def _outputs(r):
    return (float(r.loss).hex(), r.grad.tobytes(), np.asarray(r.grad_inner_lr).tobytes(),
            np.asarray(r.grad_l2).tobytes())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sweep", ["gram", "plain", "auto"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n%d_m%d_d%d_K%d" % s)
def test_outputs_keep_their_bits_whatever_the_heap_and_threads(dtype, sweep, shape):
    n, m, d, K = shape
    rng = np.random.default_rng(d + n)
    for T in (5, 33):
        Xs = rng.uniform(size=(T, n, d)).astype(dtype)
        Xq = rng.uniform(size=(T, m, d)).astype(dtype)
        ys, yq = rng.integers(0, 2, (T, n)), rng.integers(0, 2, (T, m))
        theta = (0.1 * rng.normal(size=d + 1)).astype(dtype)
        for l2 in (0.0, 0.1):
            seen = set()
            keep = []
            for rep in range(12):
                # Shift the heap: small arrays of varying sizes stay alive
                # across calls, and a call of another shape and path in between
                # leaves the workers' own allocations elsewhere.
                keep.append([np.empty(int(k)) for k in rng.integers(1, 40, size=rep % 5)])
                other = int(rng.integers(1, 9))
                fastmaml.meta_value_and_grad(theta, (Xs[:, :other], ys[:, :other], Xq, yq),
                                             inner_lr=np.full(d + 1, 0.05), inner_steps=K, n_threads=1 + rep % 3)
                r = fastmaml.meta_value_and_grad(theta, (Xs, ys, Xq, yq), inner_lr=0.05, inner_steps=K, l2=l2,
                                                 n_threads=1 + rep % 3, sweep=sweep)
                seen.add(_outputs(r))
            assert len(seen) == 1, f"T={T} l2={l2}: {len(seen)} different results from identical calls"
