"""fastmaml.jax: the exact head as a differentiable JAX function (docs/design.md, "Framework front ends — JAX").

The oracle is plain JAX: the inner loop unrolled step by step and
differentiated by ``jax.grad`` (for first-order MAML each inner gradient is
taken at ``lax.stop_gradient(phi_j)``, DESIGN's surrogate, "Feature
gradients"). float64 agrees to 1e-10 and float32 to the float32 tolerance of
tests/tolerances.py, for the loss and the gradients with respect to theta,
inner_lr, l2 and both feature arrays.

float64 needs ``jax_enable_x64``: an autouse fixture turns it on for each test
of this module only, with JAX's thread-local context manager, so the setting
does not leak into other test files. (benchmarks/peers.py, when collected in
the same session, enables it process-wide for its own float64 peers; these
tests pass either way.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

if os.environ.get("FASTMAML_REQUIRE_FRAMEWORKS"):
    import jax  # CI installs the extras: a missing jax must fail, not skip
else:
    jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import fastmaml  # noqa: E402
import fastmaml.jax as fj  # noqa: E402
from tolerances import RTOL_F32, RTOL_F64, assert_rel, rel_error  # noqa: E402


def _x64(on: bool = True):
    """JAX's thread-local x64 context (jax.enable_x64 in new releases, jax.experimental.enable_x64 before)."""
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(on)
    from jax.experimental import disable_x64, enable_x64  # pragma: no cover - older jax

    return enable_x64() if on else disable_x64()  # pragma: no cover


@pytest.fixture(autouse=True)
def x64():
    with _x64(True):
        yield


# --------------------------------------------------------------------------
# problems and the unrolled oracle
# --------------------------------------------------------------------------

T, N, M, D, K = 3, 5, 4, 3, 3


def make_problem(C=1, seed=0, dtype=np.float64, T=T, n=N, m=M, d=D):
    """A meta-batch whose gradients are all clearly non-zero (C=1: binary theta)."""
    rng = np.random.default_rng(seed)
    hi = 2 if C == 1 else C
    shape = (d + 1,) if C == 1 else (d + 1, C)
    return dict(
        theta=rng.normal(scale=0.7, size=shape),
        Xs=rng.uniform(-1, 1, size=(T, n, d)).astype(dtype),
        ys=rng.integers(0, hi, size=(T, n)),
        Xq=rng.uniform(-1, 1, size=(T, m, d)).astype(dtype),
        yq=rng.integers(0, hi, size=(T, m)),
    )


def _support_loss(phi, X, y, lam, binary):
    z = X @ phi[:-1] + phi[-1]
    if binary:
        data = jnp.mean(jax.nn.softplus(z) - y * z)
    else:
        data = jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])
    return data + 0.5 * lam * jnp.sum(phi[:-1] ** 2)


def _lr_tables(lr, n_tasks, K, theta_shape, task_axis):
    """inner_lr broadcast to one (K, *theta_shape) table per task, by DESIGN's rules (autodiff reduces it back)."""
    lr = jnp.asarray(lr)
    full = (K,) + tuple(theta_shape)
    if task_axis:
        rest = lr.shape[1:]
        lead = lr.reshape((lr.shape[0],) + (1,) * (len(full) - len(rest)) + rest)
        return jnp.broadcast_to(lead, (n_tasks,) + full)
    return jnp.broadcast_to(jnp.broadcast_to(lr, full)[None], (n_tasks,) + full)


def oracle_adapt(theta, Xs, ys, lr, lam, *, inner_steps, first_order=False, task_axis=False):
    binary = theta.ndim == 1
    n_tasks = Xs.shape[0]
    tables = _lr_tables(lr, n_tasks, inner_steps, theta.shape, task_axis)
    lams = jnp.broadcast_to(jnp.asarray(lam), (n_tasks,))
    grad = jax.grad(_support_loss)

    def one(X, y, a, l):
        phi = theta
        for j in range(inner_steps):
            at = lax.stop_gradient(phi) if first_order else phi
            phi = phi - a[j] * grad(at, X, y, l, binary)
        return phi

    return jax.vmap(one)(Xs, ys, tables, lams)


def oracle_loss(theta, lr, lam, Xs, ys, Xq, yq, *, inner_steps, first_order=False, task_axis=False):
    binary = theta.ndim == 1
    phi = oracle_adapt(theta, Xs, ys, lr, lam, inner_steps=inner_steps, first_order=first_order,
                       task_axis=task_axis)
    q = jax.vmap(lambda p, X, y: _support_loss(p, X, y, 0.0, binary))(phi, Xq, yq)
    return jnp.mean(q)


ARGNUMS = (0, 1, 2, 3, 4)  # theta, inner_lr, l2, support_X, query_X
NAMES = ("loss", "theta", "inner_lr", "l2", "support_X", "query_X")


def head_value_and_grad(p, lr, lam, *, inner_steps=K, first_order=False, task_axis=False, jit=False):
    def f(theta, lr, lam, Xs, Xq):
        return fj.meta_loss(theta, Xs, p["ys"], Xq, p["yq"], inner_lr=lr, inner_steps=inner_steps, l2=lam,
                            first_order=first_order, task_axis=task_axis)

    vg = jax.value_and_grad(f, argnums=ARGNUMS)
    if jit:
        vg = jax.jit(vg)
    dt = p["Xs"].dtype
    v, g = vg(jnp.asarray(p["theta"], dt), jnp.asarray(lr, dt), jnp.asarray(lam, dt), jnp.asarray(p["Xs"]),
              jnp.asarray(p["Xq"]))
    return (v,) + tuple(g)


def oracle_value_and_grad(p, lr, lam, *, inner_steps=K, first_order=False, task_axis=False):
    """The oracle in float64, whatever the problem's dtype."""
    def f(theta, lr, lam, Xs, Xq):
        return oracle_loss(theta, lr, lam, Xs, jnp.asarray(p["ys"]), Xq, jnp.asarray(p["yq"]),
                           inner_steps=inner_steps, first_order=first_order, task_axis=task_axis)

    f64 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float64))  # noqa: E731
    v, g = jax.value_and_grad(f, argnums=ARGNUMS)(f64(p["theta"]), f64(lr), f64(lam), f64(p["Xs"]), f64(p["Xq"]))
    return (v,) + tuple(g)


def assert_all_rel(got, want, rtol, what=""):
    for name, a, b in zip(NAMES, got, want):
        assert_rel(np.asarray(a), np.asarray(b), rtol, err_msg=f"{name} {what}")


# (C, inner_lr, l2, task_axis): binary and softmax; scalar, per-step, per-parameter and per-task inner_lr;
# scalar and per-task l2.
rng_cfg = np.random.default_rng(42)
CONFIGS = {
    "binary-scalar": (1, 0.6, 0.1, False),
    "binary-per-step": (1, np.array([[0.9], [0.5], [0.3]]), 0.2, False),
    "binary-per-param": (1, rng_cfg.uniform(0.2, 0.8, size=D + 1), 0.05, False),
    "binary-per-task-l2": (1, 0.5, np.array([0.0, 0.3, 1.1]), False),
    "binary-task-axis": (1, np.array([0.3, 0.6, 0.9]), np.array([0.2, 0.0, 0.5]), True),
    "binary-task-axis-per-step": (1, rng_cfg.uniform(0.2, 0.9, size=(T, K, 1)), 0.1, True),
    "softmax-scalar": (3, 0.7, 0.1, False),
    "softmax-per-step": (3, np.array([[[0.9]], [[0.5]], [[0.3]]]), 0.0, False),
    "softmax-per-task": (3, np.array([0.4, 0.8, 0.6]), np.array([0.1, 0.4, 0.0]), True),
}


# --------------------------------------------------------------------------
# exactness
# --------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "first-order"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_float64_loss_and_every_gradient_match_unrolled_jax_autograd(cfg, first_order):
    C, lr, lam, task_axis = CONFIGS[cfg]
    p = make_problem(C, seed=1)
    got = head_value_and_grad(p, lr, lam, first_order=first_order, task_axis=task_axis)
    want = oracle_value_and_grad(p, lr, lam, first_order=first_order, task_axis=task_axis)
    assert got[0].dtype == jnp.float64 and got[4].dtype == jnp.float64
    assert_all_rel(got, want, RTOL_F64, cfg)
    # every gradient is informative here: a zero or dropped term would not pass by accident
    for name, g in zip(NAMES[1:], got[1:]):
        assert np.max(np.abs(np.asarray(g))) > 1e-3, name


@pytest.mark.parametrize("cfg", ["binary-per-step", "softmax-per-task"])
def test_first_order_is_the_stop_gradient_surrogate_not_maml(cfg):
    """fastmaml's first-order gradients differ from MAML's by far more than rounding (so a mode mix-up fails)."""
    C, lr, lam, task_axis = CONFIGS[cfg]
    p = make_problem(C, seed=2)
    fo = head_value_and_grad(p, lr, lam, first_order=True, task_axis=task_axis)
    so = oracle_value_and_grad(p, lr, lam, first_order=False, task_axis=task_axis)
    for name in ("theta", "support_X"):
        i = NAMES.index(name)
        assert rel_error(np.asarray(fo[i]), np.asarray(so[i])) > 1e-3, name


@pytest.mark.parametrize("C", [1, 3], ids=["binary", "softmax"])
def test_float32_computes_in_float32_within_tolerance(C):
    p = make_problem(C, seed=3, dtype=np.float32)
    lr, lam = (0.6, np.array([0.1, 0.0, 0.4])) if C == 1 else (np.array([[[0.9]], [[0.5]], [[0.3]]]), 0.1)
    got = head_value_and_grad(p, lr, lam)
    for name, g in zip(NAMES, got):
        assert g.dtype == jnp.float32, name
    want = oracle_value_and_grad(p, lr, lam)
    assert_all_rel(got, want, RTOL_F32)
    # the float64 answer of the same data is not what came back (it really ran in float32)
    p64 = dict(p, Xs=p["Xs"].astype(np.float64), Xq=p["Xq"].astype(np.float64))
    assert float(got[0]) != float(head_value_and_grad(p64, lr, lam)[0])


@pytest.mark.parametrize("cfg", ["binary-per-task-l2", "softmax-per-task"])
def test_under_jit_equals_eager_bitwise_and_the_oracle(cfg):
    C, lr, lam, task_axis = CONFIGS[cfg]
    p = make_problem(C, seed=4)
    eager = head_value_and_grad(p, lr, lam, task_axis=task_axis)
    jitted = head_value_and_grad(p, lr, lam, task_axis=task_axis, jit=True)
    for name, a, b in zip(NAMES, eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert_all_rel(jitted, oracle_value_and_grad(p, lr, lam, task_axis=task_axis), RTOL_F64)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("argnums", [(0,), (0, 1, 2), (3,), (4,)], ids=["theta", "hyper", "support_X", "query_X"])
def test_any_subset_of_arguments_gets_the_exact_gradient(argnums, jit):
    """Feature gradients are computed only when a feature array is differentiated; every subset is exact."""
    C, lr, lam, task_axis = CONFIGS["binary-per-step"]
    p = make_problem(C, seed=21)
    args = (jnp.asarray(p["theta"]), jnp.asarray(lr), jnp.asarray(lam), jnp.asarray(p["Xs"]), jnp.asarray(p["Xq"]))
    ys, yq = jnp.asarray(p["ys"]), jnp.asarray(p["yq"])

    def f(theta, lr, lam, Xs, Xq):
        return fj.meta_loss(theta, Xs, ys, Xq, yq, inner_lr=lr, inner_steps=K, l2=lam)

    vg = jax.value_and_grad(f, argnums=argnums)
    got = (jax.jit(vg) if jit else vg)(*args)
    want = jax.value_and_grad(lambda *a: oracle_loss(a[0], a[1], a[2], a[3], ys, a[4], yq, inner_steps=K),
                              argnums=argnums)(*args)
    assert_rel(np.asarray(got[0]), np.asarray(want[0]), RTOL_F64)
    for a, b in zip(got[1], want[1]):
        assert_rel(np.asarray(a), np.asarray(b), RTOL_F64)
    # the loss alone (no differentiation) is the same meta-loss
    assert_rel(np.asarray(f(*args)), np.asarray(want[0]), RTOL_F64)


def test_gradients_agree_with_the_numpy_core_bitwise():
    p = make_problem(1, seed=5)
    got = head_value_and_grad(p, np.array([[0.9], [0.5], [0.3]]), np.array([0.1, 0.2, 0.3]))
    r = fastmaml.meta_value_and_grad(p["theta"], (p["Xs"], p["ys"], p["Xq"], p["yq"]),
                                     inner_lr=np.array([[0.9], [0.5], [0.3]]), inner_steps=K,
                                     l2=np.array([0.1, 0.2, 0.3]), grad_features=True)
    for a, b in zip(got, (r.loss, r.grad, r.grad_inner_lr, r.grad_l2, r.grad_support_X, r.grad_query_X)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_backward_scales_by_the_cotangent():
    """d/dtheta of 3 L^2 is 6 L dL/dtheta: the custom VJP multiplies by the incoming cotangent."""
    p = make_problem(1, seed=6)
    ys, yq = jnp.asarray(p["ys"]), jnp.asarray(p["yq"])

    def head(theta, Xs):
        return 3.0 * fj.meta_loss(theta, Xs, ys, jnp.asarray(p["Xq"]), yq, inner_lr=0.5, inner_steps=K) ** 2

    def ref(theta, Xs):
        return 3.0 * oracle_loss(theta, 0.5, 0.0, Xs, ys, jnp.asarray(p["Xq"]), yq, inner_steps=K) ** 2

    args = (jnp.asarray(p["theta"]), jnp.asarray(p["Xs"]))
    got, want = jax.grad(head, argnums=(0, 1))(*args), jax.grad(ref, argnums=(0, 1))(*args)
    for a, b in zip(got, want):
        assert_rel(np.asarray(a), np.asarray(b), RTOL_F64)


def test_mixed_parameter_dtypes_get_gradients_in_their_own_dtype():
    """A float32 theta with float64 features: computed in float64, theta's gradient cast back to float32."""
    p = make_problem(1, seed=7)
    ys, yq, Xq = jnp.asarray(p["ys"]), jnp.asarray(p["yq"]), jnp.asarray(p["Xq"])
    theta32 = jnp.asarray(p["theta"], jnp.float32)
    g = jax.grad(lambda th: fj.meta_loss(th, jnp.asarray(p["Xs"]), ys, Xq, yq, inner_lr=0.5, inner_steps=K))(theta32)
    assert g.dtype == jnp.float32
    want = jax.grad(lambda th: oracle_loss(th, 0.5, 0.0, jnp.asarray(p["Xs"]), ys, Xq, yq, inner_steps=K))(
        jnp.asarray(theta32, jnp.float64))
    assert_rel(np.asarray(g), np.asarray(want), RTOL_F32)


def test_zero_inner_steps_and_boolean_labels():
    p = make_problem(1, seed=8)
    ysb, yqb = jnp.asarray(p["ys"] == 1), jnp.asarray(p["yq"] == 1)

    def head(theta, Xs, Xq):
        return fj.meta_loss(theta, Xs, ysb, Xq, yqb, inner_lr=jnp.zeros((0, 1)), inner_steps=0)

    def ref(theta, Xs, Xq):
        return oracle_loss(theta, jnp.zeros((0, 1)), 0.0, Xs, jnp.asarray(p["ys"]), Xq, jnp.asarray(p["yq"]),
                           inner_steps=0)

    args = (jnp.asarray(p["theta"]), jnp.asarray(p["Xs"]), jnp.asarray(p["Xq"]))
    got, want = jax.value_and_grad(head, (0, 1, 2))(*args), jax.value_and_grad(ref, (0, 1, 2))(*args)
    assert_rel(np.asarray(got[0]), np.asarray(want[0]), RTOL_F64)
    for a, b in zip(got[1], want[1]):
        assert_rel(np.asarray(a), np.asarray(b), RTOL_F64)
    assert not np.any(np.asarray(got[1][1]))  # no inner step: the support rows do not matter


# --------------------------------------------------------------------------
# vmap, higher order
# --------------------------------------------------------------------------


def test_vmap_runs_one_meta_batch_per_element():
    """vmap over theta and over stacked meta-batches: each element is its own meta-loss, as a loop gives."""
    p = make_problem(1, seed=9)
    q = make_problem(1, seed=10)
    ys, yq = jnp.asarray(p["ys"]), jnp.asarray(p["yq"])

    def f(theta, Xs, Xq):
        return fj.meta_loss(theta, Xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K, l2=0.1)

    thetas = jnp.stack([jnp.asarray(p["theta"]), jnp.asarray(q["theta"])])
    Xss, Xqs = jnp.stack([p["Xs"], q["Xs"]]), jnp.stack([p["Xq"], q["Xq"]])
    per = jax.vmap(f)(thetas, Xss, Xqs)
    loop = jnp.stack([f(thetas[i], Xss[i], Xqs[i]) for i in range(2)])
    np.testing.assert_array_equal(np.asarray(per), np.asarray(loop))
    shared = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(thetas, Xss[0], Xqs[0])
    np.testing.assert_array_equal(np.asarray(shared), np.asarray([f(thetas[i], Xss[0], Xqs[0]) for i in range(2)]))
    # per-example gradients under vmap: each against the oracle
    grads = jax.vmap(jax.grad(f, argnums=(0, 1)))(thetas, Xss, Xqs)
    for i in range(2):
        want = jax.grad(lambda th, xs: oracle_loss(th, 0.5, 0.1, xs, ys, Xqs[i], yq, inner_steps=K), (0, 1))(
            thetas[i], Xss[i])
        assert_rel(np.asarray(grads[0][i]), np.asarray(want[0]), RTOL_F64)
        assert_rel(np.asarray(grads[1][i]), np.asarray(want[1]), RTOL_F64)


def test_forward_mode_and_second_derivatives_raise():
    """Reverse mode only: the gradients are the core's constants, so JAX refuses to differentiate them again."""
    p = make_problem(1, seed=11)
    ys, yq, Xs, Xq = (jnp.asarray(p[k]) for k in ("ys", "yq", "Xs", "Xq"))

    def f(theta):
        return fj.meta_loss(theta, Xs, ys, Xq, yq, inner_lr=0.5, inner_steps=K)

    theta = jnp.asarray(p["theta"])
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (theta,), (jnp.ones_like(theta),))
    with pytest.raises(ValueError, match="(?i)callback"):
        jax.hessian(f)(theta)


# --------------------------------------------------------------------------
# adapt and query_logits
# --------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 3], ids=["binary", "softmax"])
def test_adapt_equals_fastmaml_adapt_and_query_logits_give_the_meta_loss(C):
    p = make_problem(C, seed=12)
    Xs, ys, Xq, yq = (jnp.asarray(p[k]) for k in ("Xs", "ys", "Xq", "yq"))
    theta = jnp.asarray(p["theta"])
    phi = fj.adapt(theta, Xs, ys, inner_lr=0.6, inner_steps=K, l2=0.2)
    want = fastmaml.adapt(p["theta"], p["Xs"], p["ys"], inner_lr=0.6, inner_steps=K, l2=0.2)
    np.testing.assert_array_equal(np.asarray(phi), want)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda t: fj.adapt(t, Xs, ys, inner_lr=0.6, inner_steps=K, l2=0.2))(theta)), want)
    logits = fj.query_logits(phi, Xq)
    ref = np.einsum("tmd,td...->tm...", p["Xq"], want[:, :-1]) + want[:, None, -1]
    assert_rel(np.asarray(logits), ref, RTOL_F64)
    assert logits.shape == ((T, M) if C == 1 else (T, M, C))
    # the mean query loss of those logits is the meta-loss
    if C == 1:
        q = jnp.mean(jax.nn.softplus(logits) - yq * logits)
    else:
        q = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, yq[..., None], -1)[..., 0])
    loss = fj.meta_loss(theta, Xs, ys, Xq, yq, inner_lr=0.6, inner_steps=K, l2=0.2)
    assert_rel(np.asarray(q), np.asarray(loss), RTOL_F64)


@pytest.mark.parametrize("cfg", ["binary-task-axis", "binary-task-axis-per-step", "softmax-per-task",
                                 "binary-per-task-l2"])
def test_adapt_with_per_task_hyperparameters_matches_the_oracle(cfg):
    C, lr, lam, task_axis = CONFIGS[cfg]
    p = make_problem(C, seed=13)
    got = fj.adapt(jnp.asarray(p["theta"]), jnp.asarray(p["Xs"]), jnp.asarray(p["ys"]), inner_lr=jnp.asarray(lr),
                   inner_steps=K, l2=jnp.asarray(lam), task_axis=task_axis)
    want = oracle_adapt(jnp.asarray(p["theta"]), jnp.asarray(p["Xs"]), jnp.asarray(p["ys"]), jnp.asarray(lr),
                        jnp.asarray(lam), inner_steps=K, task_axis=task_axis)
    assert_rel(np.asarray(got), np.asarray(want), RTOL_F64)
    # tasks really used their own values: the shared (first task's) hyperparameters give another answer
    lr0 = jnp.asarray(lr)[:1] if task_axis else lr
    lam0 = jnp.asarray(lam).reshape(-1)[0]
    shared = fj.adapt(jnp.asarray(p["theta"]), jnp.asarray(p["Xs"]), jnp.asarray(p["ys"]), inner_lr=lr0,
                      inner_steps=K, l2=lam0, task_axis=task_axis)
    assert rel_error(np.asarray(shared), np.asarray(want)) > 1e-4


def test_adapt_is_a_constant_for_autodiff():
    p = make_problem(1, seed=14)
    g = jax.grad(lambda th: jnp.sum(fj.adapt(th, jnp.asarray(p["Xs"]), jnp.asarray(p["ys"]), inner_lr=0.5,
                                             inner_steps=K)))(jnp.asarray(p["theta"]))
    assert not np.any(np.asarray(g))


# --------------------------------------------------------------------------
# ANIL: a feature map trained through the head
# --------------------------------------------------------------------------


def test_anil_linear_feature_map_learns_through_the_head():
    """Features f(X) = X W (raw width 6 -> 3): the outer loss decreases and W's gradient is the oracle's."""
    rng = np.random.default_rng(15)
    n_tasks, n, m, raw, d = 8, 6, 6, 6, 3
    # tasks that a direction of the raw space separates, labels drawn at random per task
    direction = rng.normal(size=raw)
    sx = rng.normal(size=(n_tasks, n, raw))
    qx = rng.normal(size=(n_tasks, m, raw))
    sign = rng.choice([-1.0, 1.0], size=(n_tasks, 1))
    ys = jnp.asarray((sign * (sx @ direction) > 0).astype(np.int32))
    yq = jnp.asarray((sign * (qx @ direction) > 0).astype(np.int32))
    sx, qx = jnp.asarray(sx), jnp.asarray(qx)

    def outer(params, head):
        return head(params["theta"], sx @ params["W"], ys, qx @ params["W"], yq, inner_lr=2.0, inner_steps=3)

    def oracle_head(theta, xs, ys_, xq, yq_, *, inner_lr, inner_steps):
        return oracle_loss(theta, inner_lr, 0.0, xs, ys_, xq, yq_, inner_steps=inner_steps)

    params = {"W": jnp.asarray(rng.normal(scale=0.3, size=(raw, d))), "theta": jnp.zeros(d + 1)}
    vg = jax.jit(jax.value_and_grad(lambda prm: outer(prm, fj.meta_loss)))
    first, g = vg(params)
    g_ref = jax.grad(lambda prm: outer(prm, oracle_head))(params)
    assert_rel(np.asarray(g["W"]), np.asarray(g_ref["W"]), RTOL_F64)
    assert np.max(np.abs(np.asarray(g["W"]))) > 1e-3
    losses = [float(first)]
    for _ in range(30):
        loss, g = vg(params)
        params = jax.tree_util.tree_map(lambda a, b: a - 0.5 * b, params, g)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def _args(p):
    return dict(theta=jnp.asarray(p["theta"]), support_X=jnp.asarray(p["Xs"]), support_y=jnp.asarray(p["ys"]),
                query_X=jnp.asarray(p["Xq"]), query_y=jnp.asarray(p["yq"]))


def _call(a, **kw):
    kw = {"inner_lr": 0.5, "inner_steps": K, **kw}
    return fj.meta_loss(a["theta"], a["support_X"], a["support_y"], a["query_X"], a["query_y"], **kw)


@pytest.mark.parametrize("name, value, match", [
    ("support_X", lambda a: a["support_X"].astype(jnp.float16), "support_X: expected a float32 or float64"),
    ("query_X", lambda a: a["query_X"].astype(jnp.float32), "query_X: dtype float32 differs"),
    ("theta", lambda a: a["theta"].astype(jnp.int32), "theta: expected a number or a float32/float64 array"),
    ("theta", lambda a: a["theta"].astype(jnp.bfloat16), "theta: .*bfloat16"),
    ("support_y", lambda a: a["support_y"].astype(jnp.float64), "support_y: expected integer"),
    ("query_y", lambda a: [[0, 1]], "query_y: expected an integer or boolean label array"),
    ("support_X", lambda a: "x", "support_X: expected a float32 or float64 array"),
])
def test_wrong_dtypes_raise_type_errors_naming_the_argument(name, value, match):
    a = _args(make_problem(1, seed=16))
    a[name] = value(a)
    with pytest.raises(TypeError, match=match):
        _call(a)


@pytest.mark.parametrize("kw, match", [
    ({"inner_lr": jnp.zeros(3, jnp.int32)}, "inner_lr: expected a number or a float32/float64 array"),
    ({"l2": True}, "l2: expected a number"),
    ({"inner_steps": 2.0}, "inner_steps: expected an integer"),
    ({"first_order": 1}, "first_order: expected True or False"),
])
def test_wrong_argument_types_raise_type_errors(kw, match):
    a = _args(make_problem(1, seed=16))
    with pytest.raises(TypeError, match=match):
        _call(a, **kw)


@pytest.mark.parametrize("change, kw, match", [
    (lambda a: a.update(theta=jnp.zeros(3)), {}, r"theta: expected shape \(4,\)"),
    (lambda a: a.update(query_X=a["query_X"][:, :, :2]), {}, "query_X: expected shape"),
    (lambda a: a.update(support_y=a["support_y"][:, :2]), {}, "support_y: expected shape"),
    (lambda a: a.update(support_X=a["support_X"][0]), {}, "support_X: expected a 3-d array"),
    (lambda a: None, {"l2": jnp.zeros(2)}, r"l2: expected a scalar or shape \(3,\)"),
    (lambda a: None, {"inner_lr": jnp.zeros(5)}, "inner_lr: shape"),
    (lambda a: None, {"inner_lr": jnp.zeros(2), "task_axis": True}, "inner_lr: with task_axis=True"),
])
def test_wrong_shapes_raise_value_errors_naming_the_argument(change, kw, match):
    a = _args(make_problem(1, seed=16))
    change(a)
    with pytest.raises(ValueError, match=match):
        _call(a, **kw)


def test_float64_without_x64_is_a_type_error_not_a_silent_float32():
    p = make_problem(1, seed=17)
    with _x64(False):
        with pytest.raises(TypeError, match="support_X: float64 input needs jax_enable_x64"):
            fj.meta_loss(p["theta"], p["Xs"], p["ys"], p["Xq"], p["yq"], inner_lr=0.5, inner_steps=K)
        # float32 runs without x64
        loss = fj.meta_loss(p["theta"].astype(np.float32), p["Xs"].astype(np.float32), p["ys"],
                            p["Xq"].astype(np.float32), p["yq"], inner_lr=0.5, inner_steps=K)
        assert loss.dtype == jnp.float32


class _OnGpu:
    """A concrete array as JAX would report one on a GPU (this machine has none): its .devices() is not the CPU."""

    def __init__(self, arr):
        self._arr = arr
        self.dtype, self.shape = arr.dtype, arr.shape

    def devices(self):
        return {_GpuDevice()}


class _GpuDevice:
    platform = "gpu"

    def __str__(self):
        return "cuda:0"


@pytest.mark.parametrize("name", ["theta", "support_X", "query_X", "support_y"])
def test_arrays_on_another_device_raise_value_error_about_the_host(name):
    a = _args(make_problem(1, seed=18))
    a[name] = _OnGpu(a[name])
    with pytest.raises(ValueError, match=f"{name}: is on device .*runs on the host CPU"):
        _call(a)
    if name == "query_X":
        with pytest.raises(ValueError, match="query_X: is on device"):
            fj.query_logits(jnp.zeros((T, D + 1)), a["query_X"])
        return
    with pytest.raises(ValueError, match=f"{name}: is on device"):
        fj.adapt(a["theta"], a["support_X"], a["support_y"], inner_lr=0.5, inner_steps=K)


@pytest.mark.parametrize("where, match", [
    ("support_X", "support_X: contains NaN or infinity"),
    ("query_X", "query_X: contains NaN or infinity"),
])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_non_finite_features_surface_the_core_error(where, match, jit):
    a = _args(make_problem(1, seed=19))
    a[where] = a[where].at[1, 2, 0].set(jnp.nan)

    def loss(theta):
        return _call(dict(a, theta=theta))

    fn = jax.jit(jax.grad(loss)) if jit else jax.grad(loss)
    # eager: the core's ValueError itself; under jit, JAX's runtime error (a ValueError subclass or
    # RuntimeError, by version) carrying the core's message
    with pytest.raises((ValueError, RuntimeError), match=match) as info:
        fn(a["theta"])
    if not jit:
        assert type(info.value) is ValueError


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_labels_out_of_range_and_divergence_surface_the_core_error(jit):
    a = _args(make_problem(1, seed=20))
    bad = dict(a, query_y=a["query_y"].at[0, 0].set(2))
    call = (lambda b, **kw: jax.jit(lambda: _call(b, **kw))()) if jit else _call
    with pytest.raises((ValueError, RuntimeError), match="query_y: binary labels must be 0 or 1, got 2"):
        call(bad)
    # each step multiplies w by about (1 - inner_lr * l2) = -1e200: inf by the second step
    with pytest.raises((fastmaml.DivergenceError, RuntimeError, ValueError), match="inner loop diverged") as info:
        call(a, inner_lr=1e200, l2=1.0)
    if not jit:
        assert type(info.value) is fastmaml.DivergenceError


# --------------------------------------------------------------------------
# imports
# --------------------------------------------------------------------------


def _run(code):
    # from / : the checkout's fastmaml/ (no compiled core) must not shadow the installed package
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd="/",
                          timeout=300)


def test_importing_fastmaml_never_imports_jax():
    r = _run("""
        import sys, fastmaml
        fastmaml.MAML; fastmaml.meta_value_and_grad
        assert "jax" not in sys.modules, sorted(m for m in sys.modules if m.startswith("jax"))
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_fastmaml_jax_without_jax_names_the_extra():
    r = _run("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "jax" or name.startswith("jax."):
                    raise ImportError("No module named 'jax' (blocked)")
        sys.meta_path.insert(0, Block())
        import fastmaml
        try:
            import fastmaml.jax
        except ImportError as exc:
            print("MSG", exc)
    """)
    assert r.returncode == 0, r.stderr
    assert 'pip install "fastmaml[jax]"' in r.stdout, r.stdout
