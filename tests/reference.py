"""Plain float64 NumPy reference for fastmaml (DESIGN.md section 1).

This module is the ground truth the C++ core is tested against. It favours
clarity over speed: Python loops over tasks and inner steps, vectorised NumPy
inside a task. Only NumPy is used.

Conventions
-----------
* Binary: ``theta`` has shape (d+1,) = [w, b] (bias last), labels in {0, 1}.
* Multinomial: ``theta`` has shape (d+1, C) (bias in the last row), integer
  labels in [0, C).  Binary vs multinomial is chosen by ``theta.ndim``.
* ``X~ = [X, 1]``.  The support loss adds ``(lam/2)||w||^2`` (weights only,
  never the bias row); the query loss has no penalty (call with ``lam=0``).
* ``tasks`` is a list of ``(Xs, ys, Xq, yq)`` tuples, one per task (tasks may
  have different sizes).  A 4-tuple of stacked arrays ``(T,n,d), (T,n),
  (T,m,d), (T,m)`` is accepted as well.
"""

from types import SimpleNamespace

import numpy as np

F64 = np.float64


# ----------------------------------------------------------------------------
# Numerically stable scalar functions
# ----------------------------------------------------------------------------

def _softplus(z):
    """log(1 + exp(z)), stable for any z."""
    return np.logaddexp(0.0, z)


def _sigmoid(z):
    """1 / (1 + exp(-z)), stable for any z (no overflow)."""
    return np.exp(-np.logaddexp(0.0, -z))


def _logsumexp_rows(Z):
    """Row-wise log(sum(exp(Z))), with max subtraction (and log1p for accuracy)."""
    k = np.argmax(Z, axis=1)
    rows = np.arange(Z.shape[0])
    m = Z[rows, k]
    E = np.exp(Z - m[:, None])
    E[rows, k] = 0.0                       # the max term contributes exactly 1
    return m + np.log1p(E.sum(axis=1))


def _softmax_rows(Z):
    """Row-wise softmax with max subtraction."""
    E = np.exp(Z - Z.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------
# Single-task loss, gradient, Hessian-vector product
# ----------------------------------------------------------------------------

def augment(X):
    """Return X~ = [X, 1] in float64 (a column of ones appended)."""
    X = np.asarray(X, dtype=F64)
    return np.hstack([X, np.ones((X.shape[0], 1), dtype=F64)])


def _weights(phi):
    """[w; 0]: phi with the bias (last entry / last row) zeroed."""
    w = np.array(phi, dtype=F64, copy=True)
    w[-1] = 0.0
    return w


def _prep(phi, X, y):
    phi = np.asarray(phi, dtype=F64)
    Xt = augment(X)
    if phi.ndim == 1:
        y = np.asarray(y, dtype=F64)
    elif phi.ndim == 2:
        y = np.asarray(y).astype(np.int64)
    else:
        raise ValueError("theta must have shape (d+1,) or (d+1, C)")
    return phi, Xt, y


def _one_hot(y, C):
    Y = np.zeros((y.shape[0], C), dtype=F64)
    Y[np.arange(y.shape[0]), y] = 1.0
    return Y


def loss(phi, X, y, lam=0.0):
    """Mean logistic / softmax cross-entropy plus (lam/2)||w||^2."""
    phi, Xt, y = _prep(phi, X, y)
    Z = Xt @ phi
    if phi.ndim == 1:
        # softplus(z) - y z == (1-y) softplus(z) + y softplus(-z)  (accurate form)
        data = np.mean((1.0 - y) * _softplus(Z) + y * _softplus(-Z))
    else:
        rows = np.arange(Z.shape[0])
        data = np.mean(_logsumexp_rows(Z - Z[rows, y][:, None]))
    return float(data + 0.5 * float(lam) * np.sum(phi[:-1] ** 2))


def grad(phi, X, y, lam=0.0):
    """Gradient of ``loss``: X~^T (p - y)/n + lam [w; 0]."""
    phi, Xt, y = _prep(phi, X, y)
    n = Xt.shape[0]
    Z = Xt @ phi
    if phi.ndim == 1:
        R = (1.0 - y) * _sigmoid(Z) - y * _sigmoid(-Z)   # p - y, accurate form
    else:
        R = _softmax_rows(Z) - _one_hot(y, phi.shape[1])
    return Xt.T @ R / n + float(lam) * _weights(phi)


def hvp(phi, X, y, v, lam=0.0):
    """Hessian of ``loss`` (including the L2 term) at phi, times v."""
    phi, Xt, y = _prep(phi, X, y)
    v = np.asarray(v, dtype=F64)
    n = Xt.shape[0]
    Z = Xt @ phi
    U = Xt @ v
    if phi.ndim == 1:
        s = _sigmoid(Z) * _sigmoid(-Z)     # p (1 - p), accurate for large |z|
        R = s * U
    else:
        P = _softmax_rows(Z)
        PU = P * U
        R = PU - P * PU.sum(axis=1, keepdims=True)
    return Xt.T @ R / n + float(lam) * _weights(v)


def predict_proba(phi, X):
    """Binary: (n,) P(y=1).  Multinomial: (n, C) class probabilities."""
    phi = np.asarray(phi, dtype=F64)
    Z = augment(X) @ phi
    return _sigmoid(Z) if phi.ndim == 1 else _softmax_rows(Z)


# ----------------------------------------------------------------------------
# Step-size broadcasting
# ----------------------------------------------------------------------------

def broadcast_inner_lr(inner_lr, inner_steps, theta_shape):
    """Broadcast inner_lr by NumPy rules to shape (K, *theta_shape), float64."""
    K = int(inner_steps)
    if K < 0:
        raise ValueError("inner_steps must be >= 0")
    theta_shape = tuple(theta_shape)
    target = (K,) + theta_shape
    a = np.asarray(inner_lr, dtype=F64)
    try:
        return np.array(np.broadcast_to(a, target), dtype=F64)
    except ValueError:
        per_step = (K,) + (1,) * len(theta_shape)
        raise ValueError(
            f"inner_lr of shape {a.shape} does not broadcast to (K, *theta.shape) "
            f"= {target}; for a per-step schedule use shape {per_step}") from None


def sum_to_shape(full, shape):
    """Sum ``full`` over the axes broadcasting added or stretched, back to ``shape``."""
    full = np.asarray(full, dtype=F64)
    shape = tuple(shape)
    lead = full.ndim - len(shape)
    if lead < 0:
        raise ValueError(f"cannot sum shape {full.shape} to {shape}")
    out = full.sum(axis=tuple(range(lead)))
    stretched = tuple(i for i, s in enumerate(shape) if s == 1 and out.shape[i] != 1)
    out = out.sum(axis=stretched, keepdims=True)
    return np.asarray(out).reshape(shape)


def _like_input(value, template):
    """Python float for a scalar (non-ndarray) template, else an array of its shape."""
    if np.ndim(template) == 0 and not isinstance(template, np.ndarray):
        return float(value)
    return np.asarray(value, dtype=F64).reshape(np.shape(template))


def _task_list(tasks):
    """Accept a list of (Xs, ys, Xq, yq) or a 4-tuple of stacked arrays."""
    if isinstance(tasks, tuple) and len(tasks) == 4 and np.ndim(tasks[0]) == 3:
        return list(zip(*tasks))
    return list(tasks)


# ----------------------------------------------------------------------------
# MAML: inner loop, meta-loss, exact meta-gradient
# ----------------------------------------------------------------------------

def adapt(theta, X, y, inner_lr, inner_steps, l2=0.0):
    """Inner loop on one task; returns the list [phi_0, ..., phi_K]."""
    theta = np.asarray(theta, dtype=F64)
    alpha = broadcast_inner_lr(inner_lr, inner_steps, theta.shape)
    phis = [theta.copy()]
    for j in range(alpha.shape[0]):
        phi = phis[-1] - alpha[j] * grad(phis[-1], X, y, l2)
        if not np.all(np.isfinite(phi)):
            raise FloatingPointError(f"inner loop diverged at step {j + 1}")
        phis.append(phi)
    return phis


def meta_loss(theta, tasks, inner_lr, inner_steps, l2=0.0):
    """Mean over tasks of the query loss at phi_K."""
    tasks = _task_list(tasks)
    total = 0.0
    for Xs, ys, Xq, yq in tasks:
        phi_K = adapt(theta, Xs, ys, inner_lr, inner_steps, l2)[-1]
        total += loss(phi_K, Xq, yq)
    return total / len(tasks)


def meta_value_and_grad(theta, tasks, inner_lr, inner_steps, l2=0.0,
                        first_order=False):
    """Meta-loss and its exact gradients w.r.t. theta, inner_lr and l2 (reverse sweep)."""
    theta = np.asarray(theta, dtype=F64)
    tasks = _task_list(tasks)
    T = len(tasks)
    lam = float(l2)
    alpha = broadcast_inner_lr(inner_lr, inner_steps, theta.shape)
    K = alpha.shape[0]
    total, g_theta = 0.0, np.zeros_like(theta)
    d_alpha, d_lam = np.zeros_like(alpha), 0.0
    for Xs, ys, Xq, yq in tasks:
        phis = adapt(theta, Xs, ys, inner_lr, K, lam)
        total += loss(phis[K], Xq, yq) / T
        gbar = grad(phis[K], Xq, yq) / T                 # gbar_K
        for j in range(K - 1, -1, -1):
            g_j = grad(phis[j], Xs, ys, lam)
            u = alpha[j] * gbar                          # u_j = alpha_j * gbar_{j+1}
            d_alpha[j] += -gbar * g_j
            d_lam += -np.sum(u * _weights(phis[j]))
            if not first_order:
                gbar = gbar - hvp(phis[j], Xs, ys, u, lam)
        g_theta += gbar                                  # gbar_0
    return SimpleNamespace(
        loss=float(total),
        grad=g_theta,
        grad_inner_lr=_like_input(sum_to_shape(d_alpha, np.shape(inner_lr)), inner_lr),
        grad_l2=float(d_lam),
    )


def reptile_grad(theta, tasks, inner_lr, inner_steps, l2=0.0):
    """Reptile direction: mean_t (theta - phi_K^(t))."""
    theta = np.asarray(theta, dtype=F64)
    tasks = _task_list(tasks)
    out = np.zeros_like(theta)
    for Xs, ys, Xq, yq in tasks:
        out += theta - adapt(theta, Xs, ys, inner_lr, inner_steps, l2)[-1]
    return out / len(tasks)


# ----------------------------------------------------------------------------
# iMAML (implicit gradients), dense solves
# ----------------------------------------------------------------------------

def _dense_hessian(phi, X, y, lam):
    """Dense Hessian of the support loss (flattened parameters), built by HVPs."""
    p = phi.size
    H = np.empty((p, p), dtype=F64)
    for k in range(p):
        e = np.zeros(p, dtype=F64)
        e[k] = 1.0
        H[:, k] = hvp(phi, X, y, e.reshape(phi.shape), lam).ravel()
    return 0.5 * (H + H.T)


def _proximal_solve(theta, X, y, mu, lam, tol, max_iter):
    """argmin_phi l_s(phi) + mu/2 ||phi - theta||^2 by damped Newton."""
    def objective(phi):
        return loss(phi, X, y, lam) + 0.5 * mu * np.sum((phi - theta) ** 2)

    phi = theta.copy()
    for _ in range(max_iter):
        g = grad(phi, X, y, lam) + mu * (phi - theta)
        if np.linalg.norm(g) <= tol:
            return phi
        A = _dense_hessian(phi, X, y, lam) + mu * np.eye(phi.size)
        step = np.linalg.solve(A, g.ravel()).reshape(phi.shape)
        decrement = float(np.sum(g * step))
        t, f0 = 1.0, objective(phi)
        # Backtracking (Armijo); in the quadratic region take the full step.
        while decrement > 1e-12 and t > 1e-12 and \
                objective(phi - t * step) > f0 - 1e-4 * t * decrement:
            t *= 0.5
        phi = phi - t * step
    g = grad(phi, X, y, lam) + mu * (phi - theta)
    if np.linalg.norm(g) <= tol:
        return phi
    raise RuntimeError(f"iMAML inner solve did not reach tol={tol} in {max_iter} "
                       f"iterations (gradient norm {np.linalg.norm(g):.3e})")


def imaml_value_and_grad(theta, tasks, mu, l2=0.0, tol=1e-12, max_iter=100):
    """iMAML: loss = mean query loss at phi*; grad = mean (I + H/mu)^{-1} grad l_q(phi*)."""
    theta = np.asarray(theta, dtype=F64)
    tasks = _task_list(tasks)
    mu, lam = float(mu), float(l2)
    total, g_theta = 0.0, np.zeros_like(theta)
    for Xs, ys, Xq, yq in tasks:
        phi = _proximal_solve(theta, Xs, ys, mu, lam, tol, max_iter)
        total += loss(phi, Xq, yq)
        A = np.eye(phi.size) + _dense_hessian(phi, Xs, ys, lam) / mu
        g_theta += np.linalg.solve(A, grad(phi, Xq, yq).ravel()).reshape(theta.shape)
    T = len(tasks)
    return SimpleNamespace(loss=float(total / T), grad=g_theta / T)


# ----------------------------------------------------------------------------
# Learned preconditioner P = diag(exp(s)) + U U^T
# ----------------------------------------------------------------------------

def precond_value_and_grad(theta, tasks, log_scale, U, inner_steps, l2=0.0,
                           first_order=False):
    """Meta-loss and gradients for phi_{j+1} = phi_j - P g_j, P = diag(e^s) + U U^T."""
    theta = np.asarray(theta, dtype=F64)
    s = np.asarray(log_scale, dtype=F64)
    U = np.asarray(U, dtype=F64)
    D = theta.shape[0]
    if s.shape != (D,) or U.ndim != 2 or U.shape[0] != D:
        raise ValueError("log_scale must be (d+1,) and U (d+1, r)")
    tasks = _task_list(tasks)
    T, K, lam = len(tasks), int(inner_steps), float(l2)
    P = np.diag(np.exp(s)) + U @ U.T          # acts on axis 0 (each class column)

    total, g_theta = 0.0, np.zeros_like(theta)
    M, d_lam = np.zeros((D, D), dtype=F64), 0.0
    rowsum = np.zeros(D, dtype=F64)           # sum_j rowsum(gbar_{j+1} * g_j)
    for Xs, ys, Xq, yq in tasks:
        phis, gs = [theta.copy()], []
        for j in range(K):
            gs.append(grad(phis[j], Xs, ys, lam))
            phi = phis[j] - P @ gs[j]
            if not np.all(np.isfinite(phi)):
                raise FloatingPointError(f"inner loop diverged at step {j + 1}")
            phis.append(phi)
        total += loss(phis[K], Xq, yq) / T
        gbar = grad(phis[K], Xq, yq) / T
        for j in range(K - 1, -1, -1):
            Pg = P @ gbar
            M -= gbar.reshape(D, -1) @ gs[j].reshape(D, -1).T   # summed over classes
            rowsum += (gbar * gs[j]).reshape(D, -1).sum(axis=1)
            d_lam += -np.sum(Pg * _weights(phis[j]))
            if not first_order:
                gbar = gbar - hvp(phis[j], Xs, ys, Pg, lam)
        g_theta += gbar
    return SimpleNamespace(
        loss=float(total),
        grad=g_theta,
        grad_log_scale=-np.exp(s) * rowsum,
        grad_U=(M + M.T) @ U,
        grad_l2=float(d_lam),
    )
