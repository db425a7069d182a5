"""Nothing lost: a training process killed (SIGKILL) or interrupted (Ctrl-C) resumes bitwise.

A child process meta-trains with a checkpoint written every iteration; the
parent kills it mid-run, resumes from the checkpoint, and compares the final
parameters with a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fastmaml import MAML
from fastmaml.checkpoint import CheckpointError

N_ITER = 120

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from fastmaml import MAML, GroupedSampler, make_grouped_tasks

    ckpt, n_iter, resume, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
    X, y, groups = make_grouped_tasks(n_groups=80, n_per_group=30, n_features=8, random_state=0)
    sampler = GroupedSampler(X, y, groups, support_size=6, random_state=5)
    pause = (lambda model, record: time.sleep(slow)) if slow else None
    model = MAML(inner_steps=3, inner_lr=0.3, learn_inner_lr="per_step", l2=0.01, learn_l2=True,
                 meta_lr=0.03, meta_batch_size=8, n_iterations=n_iter, checkpoint_path=ckpt,
                 checkpoint_every=1, progress=False, callbacks=[pause] if pause else [])
    model.fit(sampler, resume=resume)
    np.save(ckpt + ".theta.npy", model.theta_)
    print("done", model.n_iter_, model.interrupted_, flush=True)
    """
)


def run_child(tmp_path, ckpt, *, resume=False, slow=0.0, wait=True):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    args = [sys.executable, str(script), str(ckpt), str(N_ITER), "1" if resume else "0", str(slow)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return out
    return proc


def wait_for_iteration(ckpt, at_least, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        assert proc.poll() is None, "the child finished before it could be interrupted"
        if os.path.exists(ckpt):
            try:
                if MAML.load(ckpt).n_iter_ >= at_least:
                    return
            except CheckpointError:  # pragma: no cover - atomic writes make this unreachable
                pytest.fail("a checkpoint was read half-written")
        time.sleep(0.02)
    pytest.fail("the child made no progress")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    ckpt = tmp / "full.npz"
    run_child(tmp, ckpt)
    return np.load(str(ckpt) + ".theta.npy")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_killed_or_interrupted_training_resumes_bitwise(tmp_path, uninterrupted, how):
    ckpt = tmp_path / "run.npz"
    proc = run_child(tmp_path, ckpt, slow=0.02, wait=False)
    wait_for_iteration(ckpt, 20, proc)
    proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    stopped_at = MAML.load(ckpt).n_iter_
    assert 20 <= stopped_at < N_ITER
    if how == "SIGINT":
        # Ctrl-C: a clean stop after the current iteration, model usable, checkpoint saved
        assert proc.returncode == 0, err
        assert "done" in out and "True" in out
        assert "interrupted" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    run_child(tmp_path, ckpt, resume=True)
    resumed = np.load(str(ckpt) + ".theta.npy")
    assert MAML.load(ckpt).n_iter_ == N_ITER
    np.testing.assert_array_equal(resumed, uninterrupted)


def test_requests_that_cannot_fit_in_memory_fail_before_allocating():
    import fastmaml

    huge = np.broadcast_to(np.zeros(784, np.float32), (10**8, 784))  # a 313 GB copy if made contiguous
    with pytest.raises(MemoryError, match="support_X"):
        fastmaml.Tasks(huge.reshape(10**6, 100, 784), np.zeros((10**6, 100)), huge[:10].reshape(1, 10, 784),
                       np.zeros((1, 10)))
    with pytest.raises(MemoryError, match="return_path"):  # a 3 TB path
        fastmaml.adapt(np.zeros(785), np.zeros((1000, 1, 784), np.float32), np.zeros((1000, 1)),
                       inner_lr=0.1, inner_steps=10**6, return_path=True)


@pytest.mark.skipif(not os.environ.get("FASTMAML_BIG_TESTS"), reason="several GiB; set FASTMAML_BIG_TESTS=1")
def test_a_meta_batch_of_several_gib_runs_in_place():
    import fastmaml

    T, n, m, d = 4096, 100, 100, 784  # 2.6 GB of float32 features
    rng = np.random.default_rng(0)
    Xs = rng.random((T, n, d), dtype=np.float32)
    Xq = rng.random((T, m, d), dtype=np.float32)
    tasks = fastmaml.Tasks(Xs, rng.integers(0, 2, (T, n)), Xq, rng.integers(0, 2, (T, m)))
    assert tasks.support.X is Xs and tasks.query.X is Xq
    res = fastmaml.meta_value_and_grad(np.zeros(d + 1), tasks, inner_lr=0.1, inner_steps=2)
    assert np.isfinite(res.grad).all()
