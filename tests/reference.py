"""Plain float64 NumPy reference for fastmaml (docs/design.md section 1).

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


# ----------------------------------------------------------------------------
# Extensions (issues 14 and 15): per-task hyperparameters, feature gradients,
# index-form accumulation, task descriptor.
# ----------------------------------------------------------------------------
#
# Everything below is new; the functions above keep their behaviour and
# results (the core is tested against them). ``meta_value_and_grad_ext`` with
# its defaults (task_axis=False, a scalar l2, grad_features=False) returns the
# same numbers as ``meta_value_and_grad``.
#
# first_order=True, in both functions, differentiates docs/design.md's surrogate
#     phi_{j+1} = phi_j - alpha_j (*) grad l_s(stopgrad(phi_j); X_s, lam):
# phi_K = theta - sum_j alpha_j (*) g_j with every g_j a constant in phi but a
# live function of alpha, lam and X_s. Its exact gradient is the reverse sweep
# with gbar_j = gbar_K (no H term): dL/dtheta = gbar_K, dL/dalpha_j =
# -gbar_K (*) g_j, dL/dlam = -sum_j <alpha_j (*) gbar_K, [w_j; 0]>, and the
# support features get the docs/design.md formulas with u_j = alpha_j (*) gbar_K.
# (The existing ``meta_value_and_grad`` already returns exactly this surrogate's
# grad_inner_lr and grad_l2 for first_order=True.)


def _task_inner_lr(inner_lr, T, task_axis):
    """Split inner_lr into per-task step sizes.

    Returns (a, shared): ``a`` the float64 array of inner_lr, and a function
    ``lr(t)`` giving task t's inner_lr (before broadcasting to (K, *theta.shape)).
    ``shared`` is True when one value serves every task (no task axis, or a
    leading axis of length 1 under task_axis=True)."""
    a = np.asarray(inner_lr, dtype=F64)
    if not task_axis:
        return a, True, (lambda t: inner_lr)
    if a.ndim == 0:
        raise ValueError(
            f"inner_lr: with task_axis=True expected a leading axis of length {T} "
            f"(n_tasks) or 1, got a scalar")
    if a.shape[0] not in (T, 1):
        raise ValueError(
            f"inner_lr: with task_axis=True expected a leading axis of length {T} "
            f"(n_tasks) or 1, got shape {a.shape}")
    if a.shape[0] == 1:
        return a, True, (lambda t: a[0])
    return a, False, (lambda t: a[t])


def _task_l2(l2, T):
    """Per-task L2 strengths as a float64 (T,) array; True if l2 is one shared scalar."""
    lam = np.asarray(l2, dtype=F64)
    if lam.ndim == 0:
        return np.full(T, float(lam)), True
    if lam.shape != (T,):
        raise ValueError(f"l2: expected a scalar or shape ({T},) = (n_tasks,), got shape {lam.shape}")
    return lam.copy(), False


def _is_stacked(tasks):
    return isinstance(tasks, tuple) and len(tasks) == 4 and np.ndim(tasks[0]) == 3


def _support_feature_grad(phi, X, y, u):
    """-<u, d grad l_s(phi; X)/dX> for one step: (n, d), without the 1/T.

    Binary:  -(1/n) [ (p_i - y_i) u_w + s_i (x~_i . u) w ]
    Softmax: -(1/n) [ U_w (p_i - y_i) + W (p_i (*) v_i - p_i (p_i . v_i)) ],  v_i = U^T x~_i
    (the L2 term of grad l_s does not depend on X)."""
    phi, Xt, y = _prep(phi, X, y)
    n = Xt.shape[0]
    Z = Xt @ phi
    v = Xt @ u
    if phi.ndim == 1:
        R = (1.0 - y) * _sigmoid(Z) - y * _sigmoid(-Z)      # p - y
        s = _sigmoid(Z) * _sigmoid(-Z)                       # p (1 - p)
        rows = np.outer(R, u[:-1]) + np.outer(s * v, phi[:-1])
    else:
        P = _softmax_rows(Z)
        R = P - _one_hot(y, phi.shape[1])
        PV = P * v
        Q = PV - P * PV.sum(axis=1, keepdims=True)
        rows = R @ u[:-1].T + Q @ phi[:-1].T
    return -rows / n


def _query_feature_grad(phi, X, y):
    """d l_q(phi; X)/dX: (m, d), without the 1/T.

    Binary: (1/m)(p_i - y_i) w;  softmax: (1/m) W (p_i - y_i)."""
    phi, Xt, y = _prep(phi, X, y)
    m = Xt.shape[0]
    Z = Xt @ phi
    if phi.ndim == 1:
        R = (1.0 - y) * _sigmoid(Z) - y * _sigmoid(-Z)
        rows = np.outer(R, phi[:-1])
    else:
        R = _softmax_rows(Z) - _one_hot(y, phi.shape[1])
        rows = R @ phi[:-1].T
    return rows / m


def meta_loss_ext(theta, tasks, inner_lr, inner_steps, l2=0.0, task_axis=False):
    """Meta-loss (mean over tasks) with per-task hyperparameters (see meta_value_and_grad_ext)."""
    tasks = _task_list(tasks)
    T = len(tasks)
    _, _, lr_of = _task_inner_lr(inner_lr, T, task_axis)
    lam, _ = _task_l2(l2, T)
    total = 0.0
    for t, (Xs, ys, Xq, yq) in enumerate(tasks):
        phi_K = adapt(theta, Xs, ys, lr_of(t), inner_steps, lam[t])[-1]
        total += loss(phi_K, Xq, yq)
    return total / T


def meta_value_and_grad_ext(theta, tasks, inner_lr, inner_steps, l2=0.0,
                            first_order=False, task_axis=False,
                            grad_features=False):
    """``meta_value_and_grad`` with per-task hyperparameters and feature gradients.

    Parameters (beyond ``meta_value_and_grad``)
    -------------------------------------------
    l2 : float or array of shape (T,)
        One L2 strength for all tasks, or lam_t for task t.
    task_axis : bool, default False
        If True, ``inner_lr`` has a leading axis of length T (or 1) and
        ``inner_lr[t]`` is task t's step size under ``broadcast_inner_lr``'s rule:
        (T,) one scalar per task, (T, K, 1) per task and step (binary theta),
        (T, K, 1, 1) likewise for a multinomial theta, (T, *theta.shape) per task
        and parameter, (T, K, *theta.shape) per task, step and parameter, and any
        other shape whose ``[t]`` broadcasts to (K, *theta.shape). A leading
        axis of length 1 is shared by every task (its gradient sums over tasks).
        If False, inner_lr is read exactly as by ``meta_value_and_grad`` (never per task).
    grad_features : bool, default False
        If True, also return dL/dX for every support and query feature value
        (the bias column of X~ is not an input).

    Returns
    -------
    SimpleNamespace with
      loss           float, mean over tasks of the query loss at phi_K
      grad           ndarray shaped like theta
      grad_inner_lr  shaped like inner_lr (a Python float for a non-array scalar);
                     with task_axis and a leading axis T, entry t is
                     dL/d(inner_lr[t]) = -(1/T) sum_j gbar^(t)_{j+1} (*) g^(t)_j
                     reduced to inner_lr[t]'s shape
      grad_l2        float for a scalar l2, else (T,) with entry t
                     dL/dlam_t = -(1/T) sum_j <u^(t)_j, [w^(t)_j; 0]>
      grad_support_X, grad_query_X  (only with grad_features=True)
                     stacked arrays (T, n, d) / (T, m, d) for stacked input,
                     otherwise lists of per-task (n_t, d) / (m_t, d) arrays.

    first_order=True differentiates the surrogate described above (gbar_j = gbar_K).
    A diverging inner loop raises FloatingPointError naming the step and the task.
    """
    theta = np.asarray(theta, dtype=F64)
    stacked = _is_stacked(tasks)
    tasks = _task_list(tasks)
    T = len(tasks)
    if T == 0:
        raise ValueError("tasks: expected at least one task")
    K = int(inner_steps)
    a, lr_shared, lr_of = _task_inner_lr(inner_lr, T, task_axis)
    lam, l2_shared = _task_l2(l2, T)

    total, g_theta = 0.0, np.zeros_like(theta)
    d_lam = np.zeros(T, dtype=F64)
    d_alpha_shared = np.zeros((K,) + theta.shape, dtype=F64)   # summed over tasks
    d_alpha_tasks = np.zeros(a.shape, dtype=F64) if not lr_shared else None
    gs_X, gq_X = [], []
    for t, (Xs, ys, Xq, yq) in enumerate(tasks):
        alpha = broadcast_inner_lr(lr_of(t), K, theta.shape)
        try:
            phis = adapt(theta, Xs, ys, lr_of(t), K, lam[t])
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc} of task {t}") from None
        total += loss(phis[K], Xq, yq)
        gbar_K = grad(phis[K], Xq, yq)       # task t's adjoint, without the 1/T
        gbar = gbar_K
        d_alpha_t = np.zeros_like(alpha)
        gs = np.zeros(np.shape(Xs), dtype=F64)
        for j in range(K - 1, -1, -1):
            g_j = grad(phis[j], Xs, ys, lam[t])
            u = alpha[j] * gbar                   # u_j = alpha_j (*) gbar_{j+1}
            d_alpha_t[j] = -gbar * g_j
            d_lam[t] += -np.sum(u * _weights(phis[j]))
            if grad_features:
                gs += _support_feature_grad(phis[j], Xs, ys, u)
            if not first_order:
                gbar = gbar - hvp(phis[j], Xs, ys, u, lam[t])
        g_theta += gbar                           # gbar_0 (gbar_K for first order)
        if lr_shared:
            d_alpha_shared += d_alpha_t
        else:
            d_alpha_tasks[t] = sum_to_shape(d_alpha_t, a.shape[1:])
        if grad_features:
            gs_X.append(gs / T)
            gq_X.append(_query_feature_grad(phis[K], Xq, yq) / T)

    d_lam /= T
    if lr_shared:
        d_alpha_shared /= T
        if task_axis:
            g_lr = sum_to_shape(d_alpha_shared, a.shape[1:]).reshape(a.shape)
        else:
            g_lr = _like_input(sum_to_shape(d_alpha_shared, np.shape(inner_lr)), inner_lr)
    else:
        g_lr = d_alpha_tasks / T
    out = SimpleNamespace(
        loss=float(total / T),
        grad=g_theta / T,
        grad_inner_lr=g_lr,
        grad_l2=float(d_lam.sum()) if l2_shared else d_lam,
    )
    if l2_shared and isinstance(l2, np.ndarray):
        out.grad_l2 = np.asarray(d_lam.sum(), dtype=F64).reshape(np.shape(l2))
    if grad_features:
        if stacked:
            gs_X = np.stack(gs_X) if gs_X else gs_X
            gq_X = np.stack(gq_X) if gq_X else gq_X
        out.grad_support_X = gs_X
        out.grad_query_X = gq_X
    return out


def gather_index_tasks(X, support_idx, support_y, query_idx, query_y,
                       support_ptr=None, query_ptr=None):
    """Dense tasks from index form (``fastmaml.Tasks.from_index``'s arguments).

    With 2-D idx arrays (T, n) / (T, m) (and no ptr) returns the stacked 4-tuple
    (Xs (T, n, d), ys, Xq (T, m, d), yq); with flat idx and ptr offsets returns
    a list of per-task (Xs, ys, Xq, yq). Either way the rows are X[idx] in idx
    order, so ``meta_value_and_grad_ext(..., grad_features=True)`` on the result
    gives the per-occurrence gradients: stacked (T, n, d) for 2-D idx, and for
    flat idx ``np.concatenate`` of the per-task lists is (total, d) in flat
    idx order."""
    X = np.asarray(X, dtype=F64)

    def side(idx, y, ptr):
        idx, y = np.asarray(idx), np.asarray(y)
        if ptr is None:
            if idx.ndim != 2:
                raise ValueError("idx: expected shape (T, n) or a flat array with ptr")
            return [X[i] for i in idx], list(y)
        ptr = np.asarray(ptr)
        return ([X[idx[ptr[t]:ptr[t + 1]]] for t in range(ptr.size - 1)],
                [y[ptr[t]:ptr[t + 1]] for t in range(ptr.size - 1)])

    Xs, ys = side(support_idx, support_y, support_ptr)
    Xq, yq = side(query_idx, query_y, query_ptr)
    if len(Xs) != len(Xq):
        raise ValueError("support and query describe different numbers of tasks")
    if support_ptr is None and query_ptr is None:
        return (np.stack(Xs), np.stack(ys), np.stack(Xq), np.stack(yq))
    return list(zip(Xs, ys, Xq, yq))


def accumulate_index_grads(n_samples, idx, rows, out=None):
    """Accumulate per-occurrence feature gradients into the shared X's shape.

    ``idx`` is support_idx or query_idx (any shape: (T, n), or flat (total,));
    ``rows`` has shape idx.shape + (d,) (the gathered rows' gradients, in idx
    order). Returns ``out`` (zeros (n_samples, d) if None) plus, for each
    occurrence k in row-major (C) order of idx, rows[k] added to out[idx[k]]:
    a fixed order that does not depend on threads. To combine both sides, call
    it for the support side and then for the query side with ``out=``."""
    idx = np.asarray(idx, dtype=np.int64)
    rows = np.asarray(rows, dtype=F64)
    if rows.shape[:-1] != idx.shape:
        raise ValueError(f"rows: expected shape {idx.shape} + (d,), got {rows.shape}")
    d = rows.shape[-1]
    if out is None:
        out = np.zeros((int(n_samples), d), dtype=F64)
    flat_idx = idx.reshape(-1)
    if flat_idx.size and (flat_idx.min() < 0 or flat_idx.max() >= out.shape[0]):
        raise ValueError(f"idx: indices must lie in [0, {out.shape[0]})")
    np.add.at(out, flat_idx, rows.reshape(-1, d))      # unbuffered, in index order
    return out


def task_descriptor(Xs, ys, n_classes=None):
    """Descriptor of one task's support set (support data only; no theta).

    Returns a float64 array of 4 features:
      [0] log(n): natural log of the number of support rows n;
      [1] class balance: binary (n_classes=None) the fraction of labels equal
          to 1, in [0, 1]; multinomial (n_classes=C) the largest class
          fraction max_c #{y_i = c}/n, in [1/C, 1] (1/C when balanced; so a
          C = 2 multinomial task reads max(f, 1 - f), not the binary f);
      [2] trace(X~ X~^T)/n = (1/n) sum_i ||x~_i||^2 = 1 + (1/n) sum_i ||x_i||^2,
          the mean squared row norm including the bias column of ones;
      [3] the largest eigenvalue of X~^T X~ / n (numpy.linalg.eigvalsh of the
          (d+1) x (d+1) matrix; equal to that of the Gram matrix X~ X~^T / n).
    """
    Xt = augment(Xs)
    y = np.asarray(ys)
    n = Xt.shape[0]
    if n == 0:
        raise ValueError("Xs: expected at least one support row")
    if n_classes is None:
        balance = float(np.mean(y == 1))
    else:
        C = int(n_classes)
        counts = np.bincount(y.astype(np.int64), minlength=C)
        if counts.size != C:
            raise ValueError(f"ys: labels must lie in [0, {C})")
        balance = float(counts.max() / n)
    trace = float(np.sum(Xt * Xt) / n)
    lam_max = float(np.linalg.eigvalsh(Xt.T @ Xt / n)[-1])
    return np.array([np.log(n), balance, trace, lam_max], dtype=F64)


def task_descriptors(tasks, n_classes=None):
    """``task_descriptor`` of each task's support set: (T, 4)."""
    return np.stack([task_descriptor(Xs, ys, n_classes) for Xs, ys, _, _ in _task_list(tasks)])
