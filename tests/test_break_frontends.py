"""Adversarial review of the framework front ends and the hyperparameter policy (regressions).

Each test is a way a user (or a hand-edited file) broke fastmaml.torch,
fastmaml.jax or MAML(hyper_policy=...) before its fix: a silently wrong
second derivative, an unnamed low-level error, or a value silently dropped.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import fastmaml
from fastmaml.checkpoint import CheckpointError


def _framework(name):
    if os.environ.get("FASTMAML_REQUIRE_FRAMEWORKS"):
        return __import__(name)  # CI installs the extras: a missing framework must fail, never skip
    return pytest.importorskip(name)


T, N_SUP, N_QRY, D_FEAT = 4, 5, 6, 3


def _torch_batch(torch, dtype=None):
    dtype = dtype or torch.float64
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(T, N_SUP, D_FEAT, dtype=dtype, generator=g)
    xq = torch.randn(T, N_QRY, D_FEAT, dtype=dtype, generator=g)
    ys = torch.arange(T * N_SUP).reshape(T, N_SUP) % 2
    yq = torch.arange(T * N_QRY).reshape(T, N_QRY) % 2
    return xs, ys, xq, yq


# --------------------------------------------------------------------------- torch


def test_torch_second_derivative_raises_instead_of_silently_zero():
    """create_graph=True, then differentiating the gradient (a gradient penalty): was silently 0, now raises."""
    torch = _framework("torch")
    import fastmaml.torch as fmt

    xs, ys, xq, yq = _torch_batch(torch)
    theta = torch.zeros(D_FEAT + 1, dtype=torch.float64, requires_grad=True)
    loss = fmt.meta_loss(theta, xs, ys, xq, yq, inner_lr=0.3, inner_steps=2)
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    # The first derivative is still the exact one.
    (plain,) = torch.autograd.grad(fmt.meta_loss(theta, xs, ys, xq, yq, inner_lr=0.3, inner_steps=2), theta)
    assert torch.equal(g.detach(), plain)
    penalty = (g * g).sum() + theta.sum()  # d/dtheta of the first term is a Hessian product, not 0
    with pytest.raises(RuntimeError, match="differentiable once"):
        penalty.backward()


def test_torch_create_graph_first_order_use_still_works():
    """Under create_graph=True a gradient that is only used as a value (not differentiated) is fine."""
    torch = _framework("torch")
    import fastmaml.torch as fmt

    xs, ys, xq, yq = _torch_batch(torch)
    theta = torch.zeros(D_FEAT + 1, dtype=torch.float64, requires_grad=True)
    x = xs.clone().requires_grad_()
    loss = fmt.meta_loss(theta, x, ys, xq, yq, inner_lr=0.3, inner_steps=2)
    g_theta, g_x = torch.autograd.grad(loss, (theta, x), create_graph=True)
    fmt.meta_loss(theta, x, ys, xq, yq, inner_lr=0.3, inner_steps=2).backward()
    assert torch.equal(g_theta.detach(), theta.grad) and torch.equal(g_x.detach(), x.grad)
    assert float(g_theta.detach().norm()) > 0  # a value, e.g. for logging or clipping


def test_torch_gradients_handed_on_unscaled_are_never_aliased_by_what_users_write():
    """backward passes the saved gradients on as they are when the seed is 1: writing into a leaf's
    .grad, or aliasing support_X and query_X, must not change what a second backward gives."""
    torch = _framework("torch")
    import fastmaml.torch as fmt

    xs, ys, xq, yq = _torch_batch(torch)
    theta = torch.zeros(D_FEAT + 1, dtype=torch.float64, requires_grad=True)
    xs.requires_grad_()
    loss = fmt.meta_loss(theta, xs, ys, xq, yq, inner_lr=0.3, inner_steps=3)
    loss.backward(retain_graph=True)
    first = xs.grad.clone()
    xs.grad.mul_(0.0)
    theta.grad.fill_(7.0)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(xs.grad, first, rtol=0, atol=0)
    (2.0 * loss).backward()  # a seed other than 1 scales
    torch.testing.assert_close(xs.grad, 3.0 * first, rtol=1e-15, atol=0)
    # one tensor as both feature sets: the two parts are summed, neither saved part is overwritten
    x = torch.randn(T, N_SUP, D_FEAT, dtype=torch.float64, requires_grad=True)
    both = fmt.meta_loss(theta.detach(), x, ys, x, ys, inner_lr=0.3, inner_steps=3)
    both.backward(retain_graph=True)
    g1 = x.grad.clone()
    both.backward()
    torch.testing.assert_close(x.grad, 2.0 * g1, rtol=1e-15, atol=0)


def _second_backward_after(torch, mutate, **kw):
    """theta's gradient from loss.backward(retain_graph=True), then again after ``mutate`` ran in between."""
    import fastmaml.torch as fmt

    xs, ys, xq, yq = _torch_batch(torch)
    ys, yq = ys.numpy().copy(), yq.numpy().copy()  # NumPy labels: allowed, and invisible to torch
    args = dict(inner_lr=0.5, inner_steps=2)
    args.update(kw)
    theta = (torch.arange(D_FEAT + 1, dtype=torch.float64) * 0.1).requires_grad_(True)
    loss = fmt.meta_loss(theta, xs, ys, xq, yq, **args)
    loss.backward(retain_graph=True)
    first = theta.grad.clone()
    theta.grad = None
    mutate(ys, args)
    loss.backward()  # the second backward calls the core again
    return first, theta.grad


def test_torch_second_backward_ignores_numpy_labels_edited_after_forward():
    torch = _framework("torch")
    first, second = _second_backward_after(torch, lambda ys, args: ys.__setitem__((0, 0), 1 - ys[0, 0]))
    assert torch.equal(first, second)


@pytest.mark.parametrize("which", ["inner_lr", "l2"])
def test_torch_second_backward_ignores_numpy_hyperparameters_edited_after_forward(which):
    torch = _framework("torch")
    value = np.array([[0.5], [0.4]]) if which == "inner_lr" else np.array([0.1, 0.2, 0.3, 0.4])

    def scale(ys, args):
        value[...] *= 0.5

    first, second = _second_backward_after(torch, scale, **{which: value})
    assert torch.equal(first, second)


def test_torch_func_transforms_give_a_named_error():
    """torch.func.grad / vmap: was 'Cannot access data pointer of Tensor that doesn't have storage'."""
    torch = _framework("torch")
    import fastmaml.torch as fmt

    xs, ys, xq, yq = _torch_batch(torch)
    f = lambda th: fmt.meta_loss(th, xs, ys, xq, yq, inner_lr=0.3, inner_steps=2)  # noqa: E731
    with pytest.raises(TypeError, match=r"torch\.func transforms"):
        torch.func.grad(f)(torch.zeros(D_FEAT + 1, dtype=torch.float64))
    g = lambda x: fmt.meta_loss(torch.zeros(D_FEAT + 1, dtype=torch.float64), x, ys, xq, yq,  # noqa: E731
                                inner_lr=0.3, inner_steps=2)
    with pytest.raises(TypeError, match=r"torch\.func transforms"):
        torch.func.vmap(g)(xs[None].expand(2, T, N_SUP, D_FEAT))


def test_torch_adapt_per_task_wrong_label_shape_names_support_y():
    """adapt(task_axis=True) with labels of the wrong shape: was "y: expected shape (1, 5), got (0, 5)"."""
    torch = _framework("torch")
    import fastmaml.torch as fmt

    xs, ys, _, _ = _torch_batch(torch)
    lr = torch.full((T,), 0.3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"support_y: expected shape \(4, 5\)"):
        fmt.adapt(torch.zeros(D_FEAT + 1, dtype=torch.float64), xs, ys[:2], inner_lr=lr, inner_steps=2,
                  task_axis=True)
    with pytest.raises(ValueError, match=r"support_y: expected shape \(4, 5\)"):
        fmt.adapt(torch.zeros(D_FEAT + 1, dtype=torch.float64), xs, 1, inner_lr=lr, inner_steps=2, task_axis=True)


# --------------------------------------------------------------------------- jax


def test_jax_huge_inner_steps_is_a_named_memory_error():
    """inner_steps=10**12: was NumPy's 'Unable to allocate 29.1 TiB', now names inner_steps like the NumPy API."""
    _framework("jax")
    import jax.numpy as jnp

    import fastmaml.jax as fj

    xs = jnp.ones((T, N_SUP, D_FEAT), jnp.float32)
    ys = jnp.zeros((T, N_SUP), jnp.int32)
    with pytest.raises(MemoryError, match="inner_steps"):
        fj.meta_loss(jnp.zeros(D_FEAT + 1), xs, ys, xs, ys, inner_lr=0.1, inner_steps=10**12)
    with pytest.raises(MemoryError, match="inner_steps"):
        fj.adapt(jnp.zeros(D_FEAT + 1), xs, ys, inner_lr=0.1, inner_steps=10**12)


# --------------------------------------------------------------------------- policy


@pytest.fixture(scope="module")
def grouped():
    X, y, groups = fastmaml.make_grouped_tasks(n_groups=20, n_per_group=(10, 40), random_state=0)
    return X, y, groups


def _policy_model(descriptor="support", **kw):
    base = dict(inner_lr=0.3, l2=1e-3, n_iterations=3, meta_batch_size=4, random_state=0)
    base.update(kw)
    return fastmaml.MAML(hyper_policy=fastmaml.HyperPolicy(descriptor=descriptor, warmup=0.0), **base)


def test_policy_complex_descriptor_is_rejected(grouped):
    """A descriptor returning complex numbers: its imaginary part was dropped with only a ComplexWarning."""
    X, y, groups = grouped
    sampler = fastmaml.GroupedSampler(X, y, groups, support_size=0.5, random_state=0)

    def complex_desc(sX, sy):
        return np.array([np.log(len(sy)) + 1j])

    with pytest.raises(TypeError, match="descriptor: .*complex"):
        _policy_model(complex_desc).fit(sampler)


@pytest.mark.parametrize("warmup", ["abc", None, [0.5], True])
def test_policy_load_malformed_warmup_is_a_checkpoint_error(grouped, tmp_path, warmup):
    """A hand-edited warmup in a saved policy: was a bare ValueError/TypeError from float()."""
    X, y, groups = grouped
    sampler = fastmaml.GroupedSampler(X, y, groups, support_size=0.5, random_state=0)
    path = tmp_path / "model.npz"
    _policy_model().fit(sampler).save(path)
    with np.load(path) as f:
        arrays = dict(f)
    meta = json.loads(bytes(arrays.pop("__meta__")).decode("utf-8"))
    meta["config"]["hyper_policy"]["warmup"] = warmup
    edited = tmp_path / "edited.npz"
    np.savez(edited, __meta__=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8), **arrays)
    with pytest.raises(CheckpointError, match="hyper_policy"):
        fastmaml.MAML.load(edited)
    fastmaml.MAML.load(path)  # the untouched file loads


def test_policy_changed_after_fit_gives_named_errors_not_unloadable_files(grouped, tmp_path):
    """set_params(hyper_policy=...) after fit: save wrote a file load rejected; adapt raised AttributeError."""
    X, y, groups = grouped
    sampler = fastmaml.GroupedSampler(X, y, groups, support_size=0.5, random_state=0)
    model = _policy_model().fit(sampler)
    fitted = model.task_hyperparameters(X[:10], y[:10])
    model.set_params(hyper_policy=fastmaml.HyperPolicy(learn_l2=False, warmup=0.0))
    with pytest.raises(ValueError, match="hyper_policy: the model was fitted with a hyperparameter policy that learns"):
        model.save(tmp_path / "changed.npz")
    assert not (tmp_path / "changed.npz").exists()
    model.set_params(hyper_policy=None)
    with pytest.raises(ValueError, match="hyper_policy: the model was fitted with"):
        model.adapt(X[:10], y[:10])
    with pytest.raises(ValueError, match="hyper_policy: the model was fitted with"):
        model.save(tmp_path / "none.npz")
    # set back: everything works again and the file round-trips
    model.set_params(hyper_policy=fastmaml.HyperPolicy(warmup=0.0))
    model.save(tmp_path / "ok.npz")
    again = fastmaml.MAML.load(tmp_path / "ok.npz").task_hyperparameters(X[:10], y[:10])
    np.testing.assert_array_equal(again["inner_lr"], fitted["inner_lr"])

    plain = fastmaml.MAML(inner_lr=0.3, n_iterations=2, meta_batch_size=4, random_state=0).fit(sampler)
    plain.set_params(hyper_policy=fastmaml.HyperPolicy())
    with pytest.raises(ValueError, match="hyper_policy: the model was fitted with no hyperparameter policy"):
        plain.save(tmp_path / "plain.npz")


def test_policy_descriptor_cannot_overwrite_the_training_data():
    """A custom descriptor writing into its support_X silently zeroed the user's dense Tasks arrays."""
    rng = np.random.default_rng(0)
    xs, xq = rng.normal(size=(6, 8, 5)), rng.normal(size=(6, 8, 5))
    ys = np.arange(48).reshape(6, 8) % 2
    tasks = fastmaml.Tasks(xs, ys, xq, ys)
    before = xs.copy()

    def overwrite(sX, sy):
        sX[...] = 0.0
        return [float(len(sy))]

    with pytest.raises(ValueError, match="read-only"):
        _policy_model(overwrite, n_iterations=2).fit(tasks)
    np.testing.assert_array_equal(xs, before)


def test_torch_metahead_checks_threads_and_inner_steps_when_built():
    """MetaHead(n_threads=0) failed only at the first forward; inner_steps=10**12 was torch's unnamed RuntimeError."""
    _framework("torch")
    import fastmaml.torch as fmt

    with pytest.raises(ValueError, match="n_threads"):
        fmt.MetaHead(3, n_threads=0)
    with pytest.raises(MemoryError, match="inner_steps"):
        fmt.MetaHead(3, inner_steps=10**12)


def test_policy_descriptor_too_large_to_standardise_is_named(grouped):
    """Finite descriptors whose spread overflows float64: the feature was silently dropped (scale inf) and the
    saved model did not load ('policy_scale contains NaN or infinity')."""
    X, y, groups = grouped
    sampler = fastmaml.GroupedSampler(X, y, groups, support_size=0.5, random_state=0)

    def huge(sX, sy):
        return [1e300 * len(sy), 1.0]

    with pytest.raises(ValueError, match="descriptor: feature 0 .*too large"):
        _policy_model(huge).fit(sampler)
