"""The few-shot head's forward + backward: fastmaml.torch vs the heads a PyTorch user would write (issue 14, item 4).

Group "head": T=32 tasks, n=10 support, m=30 query, d=256 features, K=5 inner
steps, binary, float32, 2 threads (``torch.set_num_threads(2)``, fastmaml
``n_threads=2``). Each implementation computes the meta-loss and its
gradients with respect to theta and both feature tensors (which require grad,
as they do under a backbone):

* ``fastmaml``: ``fastmaml.torch.meta_loss(...).backward()``, the hand-over of
  the tensors to the core included;
* ``torch unrolled (autograd.grad)``: the inner loop unrolled in torch autograd,
  batched over tasks with ``bmm``, each inner gradient by
  ``torch.autograd.grad(create_graph=True)`` (as learn2learn / higher scripts do);
* ``torch unrolled (closed form)``: the same, with the logistic gradient
  written out (``bmm``), so autograd differentiates it once instead of twice
  (the strongest plain-torch head);
* ``torch.func``: ``torch.func.grad`` of the mean over ``vmap`` of a per-task
  unrolled loss (``torch.func.grad`` inside).

Every implementation is first checked against fastmaml's float64 result (so
speed is compared on equal work). Run for real with::

    pytest benchmarks/test_bench_head.py --benchmark-enable

The test command runs it with --benchmark-disable (each function once).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.func  # noqa: E402

import fastmaml.torch as fmt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tolerances import assert_rel  # noqa: E402

T, N_SUP, N_QRY, D_FEAT, K = 32, 10, 30, 256, 5
INNER_LR = 0.05  # features in [0, 1): about a fifth of 2 / (largest support Hessian eigenvalue)
N_THREADS = 2
# float32 implementations that sum in different orders, against the float64 result.
RTOL_CHECK = 2e-3


@pytest.fixture(scope="module")
def data():
    g = np.random.default_rng(0)
    return dict(
        theta=g.normal(size=D_FEAT + 1) * 0.1,
        Xs=g.uniform(size=(T, N_SUP, D_FEAT)),
        ys=g.integers(0, 2, size=(T, N_SUP)),
        Xq=g.uniform(size=(T, N_QRY, D_FEAT)),
        yq=g.integers(0, 2, size=(T, N_QRY)),
    )


@pytest.fixture(scope="module")
def reference(data):
    """fastmaml's float64 loss and gradients (theta, support_X, query_X): the check for every implementation."""
    run = _fastmaml(_leaves(data, torch.float64))
    return [np.asarray(r, dtype=np.float64) for r in run()]


@pytest.fixture(autouse=True)
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(N_THREADS)
    yield
    torch.set_num_threads(old)


def _leaves(data, dtype=torch.float32):
    as_t = lambda a, grad: torch.tensor(a, dtype=dtype, requires_grad=grad)  # noqa: E731
    return dict(theta=as_t(data["theta"], True), Xs=as_t(data["Xs"], True), Xq=as_t(data["Xq"], True),
                ys=torch.tensor(data["ys"]), yq=torch.tensor(data["yq"]))


def _outputs(loss, t):
    return [loss.detach().numpy(), t["theta"].grad.numpy(), t["Xs"].grad.numpy(), t["Xq"].grad.numpy()]


def _clear(t):
    for k in ("theta", "Xs", "Xq"):
        t[k].grad = None


def _fastmaml(t):
    def run():
        _clear(t)
        loss = fmt.meta_loss(t["theta"], t["Xs"], t["ys"], t["Xq"], t["yq"], inner_lr=INNER_LR, inner_steps=K,
                             n_threads=N_THREADS)
        loss.backward()
        return _outputs(loss, t)

    return run


def _batched_loss(phi, X, y):
    """Sum over tasks of each task's mean logistic loss; phi (T, d+1), X (T, n, d)."""
    z = torch.bmm(X, phi[:, :-1, None])[..., 0] + phi[:, -1:]
    return (torch.nn.functional.softplus(z) - y * z).mean(dim=1).sum()


def _unrolled_autograd(t):
    ysf, yqf = t["ys"].to(t["Xs"].dtype), t["yq"].to(t["Xs"].dtype)

    def run():
        _clear(t)
        phi = t["theta"].expand(T, -1)
        for _ in range(K):
            (g,) = torch.autograd.grad(_batched_loss(phi, t["Xs"], ysf), phi, create_graph=True)
            phi = phi - INNER_LR * g
        loss = _batched_loss(phi, t["Xq"], yqf) / T
        loss.backward()
        return _outputs(loss, t)

    return run


def _unrolled_closed_form(t):
    ysf, yqf = t["ys"].to(t["Xs"].dtype), t["yq"].to(t["Xs"].dtype)

    def run():
        _clear(t)
        Xs = t["Xs"]
        phi = t["theta"].expand(T, -1)
        for _ in range(K):
            z = torch.bmm(Xs, phi[:, :-1, None])[..., 0] + phi[:, -1:]
            r = (torch.sigmoid(z) - ysf) / N_SUP
            g = torch.cat([torch.bmm(r[:, None, :], Xs)[:, 0], r.sum(dim=1, keepdim=True)], dim=1)
            phi = phi - INNER_LR * g
        loss = _batched_loss(phi, t["Xq"], yqf) / T
        loss.backward()
        return _outputs(loss, t)

    return run


def _task_loss(theta, Xs, ys, Xq, yq):
    def loss(phi, X, y):
        z = X @ phi[:-1] + phi[-1]
        return torch.mean(torch.nn.functional.softplus(z) - y * z)

    support_grad = torch.func.grad(loss)
    phi = theta
    for _ in range(K):
        phi = phi - INNER_LR * support_grad(phi, Xs, ys)
    return loss(phi, Xq, yq)


def _torch_func(t):
    ysf, yqf = t["ys"].to(t["Xs"].dtype), t["yq"].to(t["Xs"].dtype)

    def meta(theta, Xs, Xq):
        return torch.func.vmap(_task_loss, in_dims=(None, 0, 0, 0, 0))(theta, Xs, ysf, Xq, yqf).mean()

    value_and_grad = torch.func.grad_and_value(meta, argnums=(0, 1, 2))
    args = [t[k].detach() for k in ("theta", "Xs", "Xq")]

    def run():
        (g_theta, g_xs, g_xq), loss = value_and_grad(*args)
        return [loss.numpy(), g_theta.numpy(), g_xs.numpy(), g_xq.numpy()]

    return run


IMPLEMENTATIONS = {
    "fastmaml": _fastmaml,
    "torch unrolled (autograd.grad)": _unrolled_autograd,
    "torch unrolled (closed form)": _unrolled_closed_form,
    "torch.func": _torch_func,
}


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_head_forward_backward(benchmark, data, reference, name):
    """One meta-loss forward + backward (gradients to theta, support_X, query_X), T=32, d=256, K=5, float32."""
    benchmark.group = "head"
    run = IMPLEMENTATIONS[name](_leaves(data))
    for label, got, want in zip(("loss", "theta", "support_X", "query_X"), run(), reference):
        assert_rel(got, want, RTOL_CHECK, f"{name}: {label}")
    benchmark(run)
