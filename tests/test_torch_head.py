"""fastmaml.torch, the PyTorch front end (issue 14, item 2).

``meta_loss`` against an oracle in plain torch autograd that unrolls the inner
loop with ``create_graph=True`` (float64 to RTOL_F64, float32 to RTOL_F32
against the float64 oracle; first-order MAML against DESIGN's surrogate, whose
inner gradients are taken at ``phi_j.detach()`` with the graph kept), with
``torch.autograd.gradcheck``; bitwise across thread counts; the zero-copy
hand-over; the errors a user can cause; ``adapt`` / ``query_logits`` against
``fastmaml.adapt``; ``MetaHead`` in a tiny ANIL loop.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("FASTMAML_REQUIRE_FRAMEWORKS"):
    import torch  # CI sets the variable: a missing torch must fail, never skip
else:
    torch = pytest.importorskip("torch")

import fastmaml  # noqa: E402
import fastmaml.torch as fmt  # noqa: E402
from tolerances import RTOL_F32, RTOL_F64, assert_rel, rel_error  # noqa: E402

T, N_SUP, N_QRY, D_FEAT, C, K = 4, 5, 6, 3, 3, 3


# --------------------------------------------------------------------------- oracle


def _set_loss(phi, X, y, kind):
    """Sum over tasks of each task's mean loss; phi (T, D) or (T, D, C), X (T, n, d)."""
    if kind == "binary":
        z = torch.einsum("tnd,td->tn", X, phi[:, :-1]) + phi[:, -1:]
        rows = torch.nn.functional.softplus(z) - y.to(z.dtype) * z
    else:
        Z = torch.einsum("tnd,tdc->tnc", X, phi[:, :-1]) + phi[:, -1:]
        rows = torch.logsumexp(Z, dim=-1) - Z.gather(-1, y[..., None])[..., 0]
    return rows.mean(dim=1).sum()


def oracle_loss(theta, Xs, ys, Xq, yq, inner_lr, inner_steps, l2=0.0, first_order=False, task_axis=False):
    """The meta-loss unrolled in torch autograd (differentiable w.r.t. every tensor argument).

    Each inner gradient comes from ``torch.autograd.grad(..., create_graph=True)``
    of the support loss; with ``first_order`` it is taken at ``phi_j.detach()``
    (DESIGN's surrogate: no path through phi_j, but through X_s and lam).
    """
    kind = "binary" if theta.ndim == 1 else "softmax"
    n_tasks = Xs.shape[0]
    ys_l, yq_l = torch.as_tensor(ys).long(), torch.as_tensor(yq).long()
    full = (inner_steps,) + tuple(theta.shape)
    lr = torch.as_tensor(inner_lr, dtype=theta.dtype)
    if task_axis:
        rest = lr.shape[1:]
        lead = lr.reshape((lr.shape[0],) + (1,) * (len(full) - len(rest)) + tuple(rest))
        alpha = torch.broadcast_to(lead, (n_tasks,) + full)
    else:
        alpha = torch.broadcast_to(lr, full)[None].expand((n_tasks,) + full)
    lam = torch.as_tensor(l2, dtype=theta.dtype)
    lam = lam.reshape(n_tasks, *(1,) * theta.ndim) if lam.ndim == 1 else lam
    wmask = torch.ones_like(theta)
    wmask[-1] = 0  # L2 on the weights only, never the bias

    def support_loss(phi):
        return _set_loss(phi, Xs, ys_l, kind) + (0.5 * lam * (phi * wmask) ** 2).flatten(1).sum(1).sum()

    phi = theta[None].expand((n_tasks,) + tuple(theta.shape))
    if not phi.requires_grad:
        phi = phi.clone().requires_grad_(True)
    for j in range(inner_steps):
        at = phi.detach().requires_grad_(True) if first_order else phi
        (g,) = torch.autograd.grad(support_loss(at), at, create_graph=True)
        phi = phi - alpha[:, j] * g
    return _set_loss(phi, Xq, yq_l, kind) / n_tasks


# --------------------------------------------------------------------------- data


def make_case(kind, dtype=torch.float64, seed=0, n_tasks=T):
    g = np.random.default_rng(seed)
    Xs = torch.tensor(g.uniform(size=(n_tasks, N_SUP, D_FEAT)), dtype=dtype)
    Xq = torch.tensor(g.uniform(size=(n_tasks, N_QRY, D_FEAT)), dtype=dtype)
    hi = 2 if kind == "binary" else C
    ys = torch.tensor(g.integers(0, hi, size=(n_tasks, N_SUP)))
    yq = torch.tensor(g.integers(0, hi, size=(n_tasks, N_QRY)))
    shape = (D_FEAT + 1,) if kind == "binary" else (D_FEAT + 1, C)
    theta = torch.tensor(g.normal(size=shape) * 0.5, dtype=dtype)
    return theta, Xs, ys, Xq, yq


def lr_value(spec, kind, n_tasks=T, seed=1):
    """(inner_lr as a float64 array or float, task_axis) for each step-size layout under test."""
    g = np.random.default_rng(seed)
    tail = (1,) if kind == "binary" else (1, 1)
    shape = (D_FEAT + 1,) if kind == "binary" else (D_FEAT + 1, C)
    if spec == "scalar":
        return 0.7, False
    if spec == "per_step":
        return g.uniform(0.3, 1.0, size=(K,) + tail), False
    if spec == "per_param":
        return g.uniform(0.3, 1.0, size=shape), False
    if spec == "task":
        return g.uniform(0.3, 1.0, size=(n_tasks,)), True
    if spec == "task_step":
        return g.uniform(0.3, 1.0, size=(n_tasks, K) + tail), True
    raise AssertionError(spec)


def leaf(x, dtype=torch.float64):
    return torch.tensor(np.asarray(x), dtype=dtype).requires_grad_(True)


def grads_of(fn, theta, Xs, ys, Xq, yq, lr, l2, **kw):
    """The loss and the gradients w.r.t. (theta, inner_lr, l2, support_X, query_X), as float64 arrays."""
    dtype = Xs.dtype
    args = [theta.detach().clone().requires_grad_(True), leaf(lr, dtype), leaf(l2, dtype),
            Xs.detach().clone().requires_grad_(True), Xq.detach().clone().requires_grad_(True)]
    th, lr_t, l2_t, xs, xq = args
    loss = fn(th, xs, ys, xq, yq, inner_lr=lr_t, inner_steps=K, l2=l2_t, **kw)
    loss.backward()
    return float(loss.detach()), [a.grad.double().numpy() for a in args]


def torch_meta_loss(theta, Xs, ys, Xq, yq, **kw):
    return fmt.meta_loss(theta, Xs, ys, Xq, yq, **kw)


def oracle(theta, Xs, ys, Xq, yq, *, inner_lr, inner_steps, l2, first_order=False, task_axis=False,
           n_threads=None):
    return oracle_loss(theta, Xs, ys, Xq, yq, inner_lr, inner_steps, l2, first_order, task_axis)


NAMES = ("theta", "inner_lr", "l2", "support_X", "query_X")

CASES = [
    ("binary", "scalar", "scalar"),
    ("binary", "per_step", "scalar"),
    ("binary", "per_param", "scalar"),
    ("binary", "task", "per_task"),
    ("binary", "task_step", "scalar"),
    ("binary", "scalar", "per_task"),
    ("softmax", "scalar", "scalar"),
    ("softmax", "per_step", "per_task"),
    ("softmax", "task_step", "scalar"),
]


def l2_value(spec, n_tasks=T):
    return 0.3 if spec == "scalar" else np.linspace(0.1, 0.6, n_tasks)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind,lr_spec,l2_spec", CASES)
def test_meta_loss_float64_equals_unrolled_autograd(kind, lr_spec, l2_spec, first_order):
    """Loss and all five gradients agree with the unrolled torch oracle to 1e-10 (float64)."""
    theta, Xs, ys, Xq, yq = make_case(kind)
    lr, task_axis = lr_value(lr_spec, kind)
    l2 = l2_value(l2_spec)
    kw = dict(first_order=first_order, task_axis=task_axis)
    loss, got = grads_of(torch_meta_loss, theta, Xs, ys, Xq, yq, lr, l2, **kw)
    loss_ref, want = grads_of(oracle, theta, Xs, ys, Xq, yq, lr, l2, **kw)
    assert_rel(loss, loss_ref, RTOL_F64, "loss")
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, name
        assert_rel(a, b, RTOL_F64, name)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind,lr_spec,l2_spec", [CASES[1], CASES[3], CASES[7]])
def test_meta_loss_float32_within_tolerance_of_float64_oracle(kind, lr_spec, l2_spec, first_order):
    """float32 tensors compute in float32 and agree with the float64 oracle to RTOL_F32."""
    theta, Xs, ys, Xq, yq = make_case(kind)
    lr, task_axis = lr_value(lr_spec, kind)
    l2 = l2_value(l2_spec)
    kw = dict(first_order=first_order, task_axis=task_axis)
    th32, xs32, xq32 = theta.float(), Xs.float(), Xq.float()
    loss, got = grads_of(torch_meta_loss, th32, xs32, ys, xq32, yq, lr, l2, **kw)
    # The oracle sees the float32-rounded inputs in float64.
    loss_ref, want = grads_of(oracle, th32.double(), xs32.double(), ys, xq32.double(), yq,
                              np.asarray(lr, np.float32).astype(np.float64),
                              np.asarray(l2, np.float32).astype(np.float64), **kw)
    assert_rel(loss, loss_ref, RTOL_F32, "loss")
    for name, a, b in zip(NAMES, got, want):
        assert_rel(a, b, RTOL_F32, name)


def test_oracle_separates_plausible_wrong_answers():
    """The comparisons above would fail on a dropped Hessian term or a missing 1/T.

    First-order and exact gradients differ by far more than RTOL_F64 on every
    input, and the loss summed over tasks is T times the mean.
    """
    theta, Xs, ys, Xq, yq = make_case("binary")
    lr, l2 = 0.7, 0.3
    loss_ex, exact = grads_of(torch_meta_loss, theta, Xs, ys, Xq, yq, lr, l2)
    _, fo = grads_of(oracle, theta, Xs, ys, Xq, yq, lr, l2, first_order=True)
    # The query features' gradient depends on phi_K only, the same forward in both.
    for name, a, b in zip(NAMES[:4], exact[:4], fo[:4]):
        assert rel_error(a, b) > 1e-3, name
    summed = oracle_loss(theta, Xs, ys, Xq, yq, lr, K, l2).detach() * T
    assert rel_error(loss_ex, float(summed)) > 0.5


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_gradcheck_float64(kind):
    """torch.autograd.gradcheck (finite differences) w.r.t. theta, inner_lr, l2, support_X, query_X.

    Exact MAML only: first-order MAML's gradient is that of a surrogate, not of
    the loss (the oracle comparison above checks it).
    """
    theta, Xs, ys, Xq, yq = make_case(kind, n_tasks=2)
    lr, _ = lr_value("per_step", kind)
    inputs = (theta.clone().requires_grad_(True), leaf(lr), leaf(0.2),
              Xs.clone().requires_grad_(True), Xq.clone().requires_grad_(True))

    def f(th, lr_t, l2_t, xs, xq):
        return fmt.meta_loss(th, xs, ys, xq, yq, inner_lr=lr_t, inner_steps=K, l2=l2_t)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_per_task_l2_and_task_axis_inner_lr():
    """gradcheck with a per-task l2 (T,) and task_axis inner_lr (T, K, 1)."""
    theta, Xs, ys, Xq, yq = make_case("binary", n_tasks=2)
    lr, _ = lr_value("task_step", "binary", n_tasks=2)
    inputs = (theta.clone().requires_grad_(True), leaf(lr), leaf([0.1, 0.4]),
              Xs.clone().requires_grad_(True), Xq.clone().requires_grad_(True))

    def f(th, lr_t, l2_t, xs, xq):
        return fmt.meta_loss(th, xs, ys, xq, yq, inner_lr=lr_t, inner_steps=K, l2=l2_t, task_axis=True)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_threads_bitwise_equal(kind):
    """n_threads 1 and 2 give bitwise the same loss and gradients."""
    theta, Xs, ys, Xq, yq = make_case(kind, n_tasks=9)
    lr, task_axis = lr_value("task", kind, n_tasks=9)
    out = [grads_of(torch_meta_loss, theta, Xs, ys, Xq, yq, lr, np.linspace(0.1, 0.5, 9), task_axis=task_axis,
                    n_threads=nt) for nt in (1, 2)]
    assert out[0][0] == out[1][0]
    for a, b in zip(out[0][1], out[1][1]):
        np.testing.assert_array_equal(a, b)


def test_backward_scales_by_grad_output_and_accumulates():
    """3 * loss gives three times the gradients, and two calls accumulate into .grad."""
    theta, Xs, ys, Xq, yq = make_case("binary")
    th = theta.clone().requires_grad_(True)
    xs = Xs.clone().requires_grad_(True)
    fmt.meta_loss(th, xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K).backward()
    g_theta, g_xs = th.grad.clone(), xs.grad.clone()
    th.grad, xs.grad = None, None
    (3.0 * fmt.meta_loss(th, xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K)).backward()
    assert_rel(th.grad, 3 * g_theta, RTOL_F64)
    assert_rel(xs.grad, 3 * g_xs, RTOL_F64)
    fmt.meta_loss(th, xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K).backward()
    assert_rel(th.grad, 4 * g_theta, RTOL_F64)


def test_backward_hands_the_cores_gradients_to_the_leaves_without_a_copy(monkeypatch):
    """loss.backward(): each leaf's .grad is the very array the core returned (no copy in between)."""
    seen = {}
    real = fastmaml.functional.meta_value_and_grad

    def spy(*args, **kw):
        seen["result"] = real(*args, **kw)
        return seen["result"]

    monkeypatch.setattr(fastmaml.functional, "meta_value_and_grad", spy)
    theta, Xs, ys, Xq, yq = make_case("binary")
    th, xs, xq = (a.clone().requires_grad_(True) for a in (theta, Xs, Xq))
    fmt.meta_loss(th, xs, ys, xq, yq, inner_lr=0.5, inner_steps=K).backward()
    r = seen["result"]
    assert xs.grad.data_ptr() == r.grad_support_X.ctypes.data
    assert xq.grad.data_ptr() == r.grad_query_X.ctypes.data
    assert th.grad.data_ptr() == r.grad.ctypes.data


def test_a_later_backward_calls_the_core_again_and_names_what_changed():
    """Once handed on, the gradients are recomputed for a second backward: the same bits with
    retain_graph=True, torch's own errors for a freed graph or an input changed in place."""
    theta, Xs, ys, Xq, yq = make_case("binary")
    th, xs = theta.clone().requires_grad_(True), Xs.clone().requires_grad_(True)
    loss = fmt.meta_loss(th, xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K)
    loss.backward(retain_graph=True)
    first = xs.grad.clone()
    xs.grad = None
    loss.backward()
    assert torch.equal(xs.grad, first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    for changed in (Xq, ys):
        loss = fmt.meta_loss(th, xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K)
        loss.backward(retain_graph=True)
        with torch.no_grad():
            changed[0, 0] = 1 - changed[0, 0]
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_features_grad_only_when_required(monkeypatch):
    """grad_features is asked of the core only when a feature tensor requires grad."""
    seen = []
    real = fastmaml.functional.meta_value_and_grad

    def spy(*args, **kw):
        seen.append(kw["grad_features"])
        return real(*args, **kw)

    monkeypatch.setattr(fastmaml.functional, "meta_value_and_grad", spy)
    theta, Xs, ys, Xq, yq = make_case("binary")
    th = theta.clone().requires_grad_(True)
    fmt.meta_loss(th, Xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K).backward()
    fmt.meta_loss(th, Xs, ys, Xq.clone().requires_grad_(True), yq, inner_lr=0.5, inner_steps=K).backward()
    assert seen == [False, True]


def test_no_grad_returns_the_loss_without_graph():
    theta, Xs, ys, Xq, yq = make_case("binary")
    th = theta.clone().requires_grad_(True)
    with torch.no_grad():
        loss = fmt.meta_loss(th, Xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K)
    assert loss.grad_fn is None and loss.shape == ()
    assert_rel(float(loss), float(oracle_loss(theta, Xs, ys, Xq, yq, 0.5, K).detach()), RTOL_F64)


# --------------------------------------------------------------------------- hand-over


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contiguous_cpu_tensors_reach_the_core_without_copy(monkeypatch, dtype):
    """The arrays the core receives share memory with the tensors (np.shares_memory)."""
    seen = {}
    real = fastmaml.functional.meta_value_and_grad

    def spy(theta, tasks, **kw):
        seen["theta"], seen["tasks"] = theta, tasks
        return real(theta, tasks, **kw)

    monkeypatch.setattr(fastmaml.functional, "meta_value_and_grad", spy)
    theta, Xs, ys, Xq, yq = make_case("binary", dtype=dtype)
    xs, xq = Xs.requires_grad_(True), Xq.requires_grad_(True)
    fmt.meta_loss(theta, xs, ys, xq, yq, inner_lr=0.5, inner_steps=K).backward()
    sXs, _, sXq, _ = seen["tasks"]
    assert np.shares_memory(sXs, xs.detach().numpy())
    assert np.shares_memory(sXq, xq.detach().numpy())
    assert np.shares_memory(seen["theta"], theta.numpy())
    # ... and the core uses them in place too (no conversion in the NumPy API).
    assert fastmaml.Tasks(sXs, seen["tasks"][1], sXq, seen["tasks"][3]).support.X is sXs


def test_non_contiguous_tensors_are_made_contiguous():
    """A transposed view gives the result of its contiguous copy, gradients shaped like the view."""
    theta, Xs, ys, Xq, yq = make_case("binary")
    base = Xs.transpose(1, 2).contiguous().requires_grad_(True)  # (T, d, n)
    view = base.transpose(1, 2)  # (T, n, d), not contiguous
    assert not view.is_contiguous()
    loss = fmt.meta_loss(theta, view, ys, Xq, yq, inner_lr=0.5, inner_steps=K)
    loss.backward()
    xs = Xs.clone().requires_grad_(True)
    loss2 = fmt.meta_loss(theta, xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K)
    loss2.backward()
    assert float(loss.detach()) == float(loss2.detach())
    np.testing.assert_array_equal(base.grad.transpose(1, 2).numpy(), xs.grad.numpy())


# --------------------------------------------------------------------------- errors


def _call(**over):
    theta, Xs, ys, Xq, yq = make_case("binary")
    args = dict(theta=theta, support_X=Xs, support_y=ys, query_X=Xq, query_y=yq)
    kw = dict(inner_lr=0.5, inner_steps=K, l2=0.0)
    for k, v in over.items():
        (args if k in args else kw)[k] = v(args[k] if k in args else kw[k]) if callable(v) else v
    return fmt.meta_loss(args["theta"], args["support_X"], args["support_y"], args["query_X"], args["query_y"], **kw)


@pytest.mark.parametrize("name", ["theta", "support_X", "query_X", "support_y", "query_y"])
def test_tensor_on_another_device_raises_value_error_telling_cpu(name):
    with pytest.raises(ValueError, match=rf"{name}: .*device 'meta'.*\.cpu\(\)"):
        _call(**{name: lambda t: t.to("meta")})


@pytest.mark.parametrize("name", ["inner_lr", "l2"])
def test_hyperparameter_on_another_device_raises(name):
    with pytest.raises(ValueError, match=rf"{name}: .*\.cpu\(\)"):
        _call(**{name: torch.tensor(0.5, dtype=torch.float64, device="meta")})


def test_cuda_device_is_refused_without_moving_data(monkeypatch):
    """A tensor whose .device is CUDA is refused before any data is read."""
    theta, Xs, ys, Xq, yq = make_case("binary")

    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    fake = Xs.as_subclass(FakeCuda)
    with pytest.raises(ValueError, match=r"support_X: .*cuda:0.*support_X\.cpu\(\)"):
        fmt.meta_loss(theta, fake, ys, Xq, yq, inner_lr=0.5, inner_steps=K)


@pytest.mark.parametrize("name", ["theta", "support_X", "query_X"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_unsupported_dtypes_raise_type_error(name, dtype):
    with pytest.raises(TypeError, match=rf"{name}: expected a float32 or float64 tensor, got {dtype}"):
        _call(**{name: lambda t: t.to(dtype)})


@pytest.mark.parametrize("name", ["theta", "query_X", "inner_lr", "l2"])
def test_mixed_dtypes_raise_type_error(name):
    """Every floating tensor must share support_X's dtype (float64 here)."""
    value = (lambda t: t.float()) if name in ("theta", "query_X") else torch.tensor(0.5, dtype=torch.float32)
    with pytest.raises(TypeError, match=rf"{name}: dtype torch.float32 differs from support_X's torch.float64"):
        _call(**{name: value})


@pytest.mark.parametrize("name", ["support_y", "query_y"])
def test_labels_requiring_grad_raise_value_error(name):
    with pytest.raises(ValueError, match=rf"{name}: labels must not require grad"):
        _call(**{name: lambda y: y.double().requires_grad_(True)})


def test_float_labels_without_grad_are_accepted():
    theta, Xs, ys, Xq, yq = make_case("binary")
    a = fmt.meta_loss(theta, Xs, ys.double(), Xq, yq.float(), inner_lr=0.5, inner_steps=K)
    b = fmt.meta_loss(theta, Xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K)
    assert float(a) == float(b)


def test_shape_errors_are_the_cores_named_errors():
    with pytest.raises(ValueError, match="query_X: expected 3 features like support_X"):
        _call(query_X=lambda t: t[..., :2])
    with pytest.raises(ValueError, match=r"theta: expected shape \(4,\)"):
        _call(theta=lambda t: t[:3])
    with pytest.raises(ValueError, match="support_y: expected shape"):
        _call(support_y=lambda y: y[:, :2])
    with pytest.raises(ValueError, match="support_y: binary labels must be 0 or 1"):
        _call(support_y=lambda y: y + 2)
    with pytest.raises(ValueError, match="l2: expected a scalar or shape"):
        _call(l2=torch.zeros(T + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="support_X: expected a torch.Tensor"):
        _call(support_X=lambda t: t.numpy())


def test_import_fastmaml_never_imports_torch():
    code = "import sys, fastmaml; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.abspath(__file__)))


def test_import_without_torch_gives_install_hint():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if torch were not installed\n"
        "try:\n"
        "    import fastmaml.torch\n"
        "except ImportError as exc:\n"
        "    assert 'pip install \"fastmaml[torch]\"' in str(exc), str(exc)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- adapt, query_logits


@pytest.mark.parametrize("kind", ["binary", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adapt_equals_fastmaml_adapt(kind, dtype):
    theta, Xs, ys, Xq, yq = make_case(kind, dtype=dtype)
    lr, _ = lr_value("per_step", kind)
    phi = fmt.adapt(theta.requires_grad_(True), Xs, ys, inner_lr=lr, inner_steps=K, l2=0.2)
    want = fastmaml.adapt(theta.detach().numpy(), Xs.numpy(), ys.numpy(), inner_lr=lr, inner_steps=K, l2=0.2)
    assert phi.shape == (T,) + tuple(theta.shape) and phi.dtype == dtype and not phi.requires_grad
    np.testing.assert_array_equal(phi.numpy(), want)


@pytest.mark.parametrize("kind", ["binary", "softmax"])
def test_adapt_per_task_hyperparameters_and_query_logits_reproduce_the_meta_loss(kind):
    """adapt with task_axis inner_lr and per-task l2, then query_logits: the mean query loss is meta_loss."""
    theta, Xs, ys, Xq, yq = make_case(kind)
    lr, _ = lr_value("task_step", kind)
    l2 = torch.linspace(0.1, 0.6, T, dtype=torch.float64)
    phi = fmt.adapt(theta, Xs, ys, inner_lr=lr, inner_steps=K, l2=l2, task_axis=True)
    for t in range(T):
        one = fastmaml.adapt(theta.numpy(), Xs[t].numpy(), ys[t].numpy(), inner_lr=lr[t], inner_steps=K,
                             l2=float(l2[t]))
        np.testing.assert_array_equal(phi[t].numpy(), one)
    logits = fmt.query_logits(phi, Xq)
    if kind == "binary":
        assert logits.shape == (T, N_QRY)
        rows = torch.nn.functional.softplus(logits) - yq * logits
    else:
        assert logits.shape == (T, N_QRY, C)
        rows = torch.logsumexp(logits, -1) - logits.gather(-1, yq[..., None])[..., 0]
    loss = fmt.meta_loss(theta, Xs, ys, Xq, yq, inner_lr=lr, inner_steps=K, l2=l2, task_axis=True)
    assert_rel(float(rows.mean()), float(loss), RTOL_F64)


def test_query_logits_equal_numpy_and_are_differentiable():
    theta, Xs, ys, Xq, yq = make_case("binary")
    phi = torch.tensor(np.random.default_rng(3).normal(size=(T, D_FEAT + 1)), requires_grad=True)
    logits = fmt.query_logits(phi, Xq)
    want = np.einsum("tmd,td->tm", Xq.numpy(), phi.detach().numpy()[:, :-1]) + phi.detach().numpy()[:, -1:]
    assert_rel(logits.detach().numpy(), want, RTOL_F64)
    logits.sum().backward()
    assert_rel(phi.grad[:, -1].numpy(), np.full(T, N_QRY, dtype=np.float64), RTOL_F64)
    with pytest.raises(ValueError, match=r"phi: expected shape \(4, 4\)"):
        fmt.query_logits(phi[:, :3], Xq)


# --------------------------------------------------------------------------- MetaHead


def test_metahead_forward_equals_meta_loss_with_its_parameters():
    """head(...) is meta_loss with exp(log step sizes) and exp(log l2); the chain rule reaches the logs."""
    theta, Xs, ys, Xq, yq = make_case("softmax")
    head = fmt.MetaHead(D_FEAT, n_classes=C, inner_steps=K, inner_lr=0.4, l2=0.2, learn_l2=True).double()
    with torch.no_grad():
        head.theta.copy_(theta)
    assert head.theta.shape == (D_FEAT + 1, C) and head.log_inner_lr.shape == (K,)
    lr = head.inner_lr().detach().numpy()
    lam = float(head.l2_value().detach())
    assert lr.shape == (K, 1, 1)
    assert_rel(lr, np.full((K, 1, 1), 0.4), 1e-6)  # the logs were made in float32, then .double()
    loss, want = grads_of(oracle, theta, Xs, ys, Xq, yq, lr, lam)
    out = head(Xs, ys, Xq, yq)
    assert_rel(float(out.detach()), loss, RTOL_F64)
    out.backward()
    # d/dlog(a) = a * d/da
    assert_rel(head.theta.grad.numpy(), want[0], RTOL_F64)
    assert_rel(head.log_inner_lr.grad.numpy(), lr.reshape(K) * want[1].reshape(K), RTOL_F64)
    assert_rel(head.log_l2.grad.numpy(), lam * want[2], RTOL_F64)


def test_metahead_in_anil_loop_trains_backbone_through_exact_gradients():
    """A linear backbone + MetaHead: backbone gradients equal the unrolled oracle's; loss decreases."""
    torch.manual_seed(0)
    g = np.random.default_rng(5)
    d_in, d_feat, n_tasks = 6, 4, 8
    backbone = torch.nn.Linear(d_in, d_feat).double()
    head = fmt.MetaHead(d_feat, inner_steps=K, inner_lr=0.5).double()

    w = g.normal(size=d_in)  # every task's labels follow one direction, the sign flipped at random

    def episode():
        xs, xq = g.normal(size=(n_tasks, N_SUP, d_in)), g.normal(size=(n_tasks, N_QRY, d_in))
        flip = g.integers(0, 2, size=(n_tasks, 1))
        lab = lambda x: ((x @ w > 0) ^ flip).astype(np.int64)  # noqa: E731
        return torch.tensor(xs), torch.tensor(lab(xs)), torch.tensor(xq), torch.tensor(lab(xq))

    xs, ys, xq, yq = episode()
    loss = head(backbone(xs), ys, backbone(xq), yq)
    loss.backward()
    got = [p.grad.clone() for p in backbone.parameters()]
    backbone.zero_grad()
    ref = oracle_loss(head.theta, backbone(xs), ys, backbone(xq), yq, head.inner_lr(), K)
    ref.backward()
    for a, p in zip(got, backbone.parameters()):
        assert float(a.abs().max()) > 0
        assert_rel(a.numpy(), p.grad.numpy(), RTOL_F64)

    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=0.05)
    fixed = [episode() for _ in range(4)]

    def mean_loss():
        with torch.no_grad():
            return sum(float(head(backbone(a), b, backbone(c), d)) for a, b, c, d in fixed) / len(fixed)

    before = mean_loss()
    for _ in range(30):
        for a, b, c, d in fixed:
            opt.zero_grad()
            head(backbone(a), b, backbone(c), d).backward()
            opt.step()
    after = mean_loss()
    assert after < 0.5 * before, (before, after)  # measured: 0.62 -> 0.013
    phi = head.adapt(backbone(xs), ys)
    pred = head.predict(phi, backbone(xq))
    assert phi.shape == (n_tasks, d_feat + 1) and pred.shape == (n_tasks, N_QRY) and pred.dtype == torch.int64


def test_adapt_needs_a_batch_of_tasks():
    theta, Xs, ys, Xq, yq = make_case("binary")
    with pytest.raises(ValueError, match=r"support_X: expected a 3-d tensor"):
        fmt.adapt(theta, Xs[0], ys[0], inner_lr=0.5, inner_steps=K)


def test_metahead_fixed_step_sizes_are_a_buffer_not_a_parameter():
    head = fmt.MetaHead(3, inner_steps=2, inner_lr=0.3, learn_inner_lr=False)
    assert [name for name, _ in head.named_parameters()] == ["theta"]
    assert "log_inner_lr" in dict(head.named_buffers())
    assert_rel(head.inner_lr().numpy(), np.full((2, 1), 0.3), 1e-6)


def test_metahead_argument_errors():
    with pytest.raises(ValueError, match="l2: a learned L2 strength"):
        fmt.MetaHead(3, learn_l2=True)
    with pytest.raises(ValueError, match="n_classes"):
        fmt.MetaHead(3, n_classes=1)
