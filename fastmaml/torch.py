"""PyTorch front end: fastmaml's exact MAML head as a differentiable torch operation.

A logistic-regression head that adapts in an inner loop (ANIL, MAML on a
linear model) is one call here instead of an inner loop unrolled through
autograd::

    import fastmaml.torch as fmt
    loss = fmt.meta_loss(theta, backbone(xs), ys, backbone(xq), yq,
                         inner_lr=0.1, inner_steps=5)
    loss.backward()     # exact gradients to theta, inner_lr, l2 and both feature tensors

:func:`meta_loss` is a ``torch.autograd.Function``: its forward makes ONE call
into the compiled core that returns the meta-loss together with every
gradient the backward will need (the features' gradients only when a feature
tensor requires grad); its backward multiplies them by the incoming gradient.
It is differentiable once (no double backward).

Hand-over (docs/design.md, "Framework front ends"): C-contiguous CPU float32 /
float64 tensors reach the core without a copy (``t.numpy(force=True)`` shares
the tensor's memory); a non-contiguous tensor is made contiguous first (one
copy). The core reads that memory while it runs, with the GIL released: do not
write to the tensors from another thread during the call. Tensors on any other device raise a ValueError telling you to call
``.cpu()`` (nothing is moved silently). Every floating tensor of a call
(theta, both feature sets, and inner_lr / l2 when they are tensors) must
share one dtype, float32 or float64.

Importing :mod:`fastmaml` never imports torch; this module needs it
(``pip install "fastmaml[torch]"``).
"""

from __future__ import annotations

import copy
import numbers

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without torch
    raise ImportError(
        "fastmaml.torch needs PyTorch, which is not installed: pip install \"fastmaml[torch]\" "
        "(or install torch for your platform from https://pytorch.org)"
    ) from exc

import numpy as np

from . import functional as _functional
from ._validation import check_float, check_int, check_memory, check_threads

__all__ = ["meta_loss", "adapt", "query_logits", "MetaHead"]

_FLOAT_DTYPES = (torch.float32, torch.float64)
_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _check_device(t: "torch.Tensor", name: str) -> None:
    # The common case without building a device object (a subclass may override .device: read it).
    if type(t) in _PLAIN_TENSORS and t.is_cpu and t.layout == torch.strided:
        return
    if t.device.type != "cpu":
        raise ValueError(
            f"{name}: tensor is on device '{t.device}', but fastmaml's core runs on the CPU and never moves "
            f"data silently; pass {name}.cpu() (and move the result back with .to(device) if needed)"
        )
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}; use .to_dense()")


def _host(t: "torch.Tensor", name: str) -> np.ndarray:
    """The tensor's memory as a NumPy array: no copy when it is C-contiguous (else one contiguous copy)."""
    if not t.is_contiguous():
        t = t.detach().contiguous()
    try:
        # force=True: detach and resolve a negative / conjugate bit in one call (a copy only for those
        # bits; the device was checked, so never a move). No copy for a plain contiguous CPU tensor.
        return t.numpy(force=True)
    except RuntimeError as exc:
        # torch.func's wrapped tensors (grad, vmap, jacrev) have no storage the core could read
        raise TypeError(
            f"{name}: fastmaml's core cannot read this tensor's memory ({exc}), as happens inside the torch.func "
            "transforms (grad, vmap, jacrev, ...), which are not supported: differentiate with loss.backward() or "
            "torch.autograd.grad, and loop over batches instead of vmap"
        ) from None


def _float_tensor(t, name: str, dtype=None) -> np.ndarray:
    """A floating CPU tensor (theta, features) as a NumPy array; ``dtype`` is the call's compute dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    _check_device(t, name)
    if t.dtype not in _FLOAT_DTYPES:
        hint = (" (half precision is not supported: convert with .float())" if t.dtype.is_floating_point
                else " (convert with .float() or .double())")
        raise TypeError(f"{name}: expected a float32 or float64 tensor, got {t.dtype}{hint}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(
            f"{name}: dtype {t.dtype} differs from support_X's {dtype}; every floating tensor of a call must "
            f"share one dtype (convert with .to({dtype}))"
        )
    return _host(t, name)


def _labels(y, name: str):
    """Labels as an array the core validates (integers, or floats holding whole numbers)."""
    if isinstance(y, torch.Tensor):
        _check_device(y, name)
        if y.requires_grad:
            raise ValueError(
                f"{name}: labels must not require grad (they are class indices, not differentiable inputs); "
                f"pass {name}.detach()"
            )
        if y.dtype.is_complex:
            raise TypeError(f"{name}: expected integer labels, got {y.dtype}")
        return _host(y, name)
    return y


def _hyper(value, name: str, dtype):
    """inner_lr / l2: a number or array (constant), or a tensor (differentiable); returns (host value, tensor)."""
    if isinstance(value, torch.Tensor):
        host = _float_tensor(value, name, dtype)
        # A 0-d l2 is one strength for every task (the core takes a float).
        return (float(host) if name == "l2" and host.ndim == 0 else host), value
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: expected a number, an array or a torch.Tensor, got {value!r}")
    if isinstance(value, numbers.Real) or isinstance(value, np.ndarray) or isinstance(value, (list, tuple)):
        return value, None
    raise TypeError(f"{name}: expected a number, an array or a torch.Tensor, got {type(value).__name__}")


def _frozen(value):
    """A private copy of a NumPy array or a (nested) list / tuple; anything else (numbers, tensors) as is."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (list, tuple)):
        return copy.deepcopy(value)
    return value


class _MetaLoss(torch.autograd.Function):
    """One core call in forward; backward scales the saved exact gradients by grad_output."""

    @staticmethod
    def forward(ctx, theta, support_X, query_X, inner_lr, l2, call, labels):
        ctx.call = call
        ctx.likes = [None if t is None else (t.shape, t.dtype) for t in (theta, support_X, query_X, inner_lr, l2)]
        # The inputs the core read, for a second backward that calls it again (below): torch's own
        # checks then name an input changed in place since, or a graph already freed.
        ctx.save_for_backward(theta, support_X, query_X, inner_lr, l2, *labels)
        result = call()
        ctx.grads = _MetaLoss.grads(result, ctx.likes)
        return torch.from_numpy(np.array(result.loss, dtype=_NUMPY_DTYPES[theta.dtype]))

    @staticmethod
    def grads(result, likes):
        """The core's gradients as tensors shaped like their inputs (no copy where shape and dtype match)."""
        out = []
        for grad, like in zip((result.grad, result.grad_support_X, result.grad_query_X, result.grad_inner_lr,
                               result.grad_l2), likes):
            if like is None or grad is None:
                out.append(None)
            elif type(grad) is np.ndarray and grad.shape == like[0] and grad.dtype == _NUMPY_DTYPES[like[1]]:
                out.append(torch.from_numpy(grad))
            else:
                out.append(torch.as_tensor(np.asarray(grad)).reshape(like[0]).to(like[1]))
        return out

    @staticmethod
    def backward(ctx, grad_output):
        needs = ctx.needs_input_grad
        grads = ctx.grads
        if grads is None:
            # An earlier backward handed the gradients on (below): the same core call again (deterministic,
            # so the same bits), after torch's checks of the saved inputs (in-place changes, a freed graph).
            ctx.saved_tensors  # noqa: B018 - raises torch's own error when the inputs cannot be trusted
            grads = ctx.grads = _MetaLoss.grads(ctx.call(), ctx.likes)
        # loss.backward() seeds 1: hand the saved gradients on as they are and keep no reference, so that
        # autograd adopts them as the leaves' .grad without a copy (a pass over both feature sets);
        # what users write there then never reaches a later backward, which calls the core again.
        unit = not grad_output.requires_grad and grad_output.dim() == 0 and grad_output.item() == 1
        if unit:
            ctx.grads = None
            out = [grad if need else None for need, grad in zip(needs[:5], grads)]
        else:
            with torch.no_grad():
                out = [grad * grad_output if (need and grad is not None) else None
                       for need, grad in zip(needs[:5], grads)]
        if torch.is_grad_enabled():
            # create_graph=True: the saved gradients are constants to autograd, so a second derivative
            # (a gradient penalty, a Hessian-vector product) would silently be 0; mark them so that
            # differentiating them raises instead. (torch's once_differentiable marks them only when
            # grad_output requires grad, which it does not here.)
            present = [g for g in out if g is not None]
            if present:
                marked = iter(_FirstOrderOnly.apply(*(g.detach().requires_grad_() for g in present)))
                out = [next(marked) if g is not None else None for g in out]
        return tuple(out) + (None, None)


class _FirstOrderOnly(torch.autograd.Function):
    """meta_loss's gradients under create_graph=True: differentiating them again is an error."""

    @staticmethod
    def forward(ctx, *grads):
        return tuple(g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise RuntimeError(
            "fastmaml.torch.meta_loss is differentiable once: its gradients (from create_graph=True) cannot be "
            "differentiated again (no Hessian-vector products or gradient penalties through the head)"
        )


def meta_loss(theta, support_X, support_y, query_X, query_y, *, inner_lr, inner_steps, l2=0.0,
              first_order=False, task_axis=False, n_threads=None):
    """Mean query loss after the inner loop, as a differentiable torch scalar (exact MAML).

    The same maths as :func:`fastmaml.meta_value_and_grad` (docs/design.md,
    section 1): for each task, ``inner_steps`` gradient steps on the support
    loss from ``theta``; the loss is the mean over tasks of the query loss.
    ``loss.backward()`` gives the exact (second-order, or first-order
    surrogate with ``first_order=True``) gradients with respect to every
    tensor argument that requires grad.

    Parameters
    ----------
    theta : Tensor of shape (n_features + 1,) or (n_features + 1, n_classes)
        Initial head ``[w, b]``, bias last: binary (sigmoid) or softmax.
    support_X : Tensor of shape (n_tasks, n_support, n_features)
        float32 or float64 on the CPU; it sets the compute dtype.
    support_y : Tensor or array_like of shape (n_tasks, n_support)
        Labels: 0/1 (binary theta) or integers in [0, n_classes). Never
        differentiable.
    query_X : Tensor of shape (n_tasks, n_query, n_features)
    query_y : Tensor or array_like of shape (n_tasks, n_query)
    inner_lr : float, array_like or Tensor
        Step sizes, broadcast to (inner_steps, *theta.shape) as in
        :func:`fastmaml.meta_value_and_grad` (a scalar; per step
        (inner_steps, 1) for a binary theta; ...); with ``task_axis=True`` a
        leading axis of length n_tasks (or 1). A tensor receives a gradient.
    inner_steps : int
    l2 : float, Tensor of shape () or (n_tasks,), default=0.0
        L2 strength of the support loss (weights only); (n_tasks,) is one per
        task. A tensor receives a gradient.
    first_order : bool, default=False
        First-order MAML: differentiate docs/design.md's surrogate (inner
        gradients taken at stopgrad(phi_j)); every input still gets a gradient.
    task_axis : bool, default=False
        Read inner_lr's leading axis as the task axis.
    n_threads : int or None
        OpenMP threads across tasks; the result does not depend on it.

    Returns
    -------
    Tensor of shape ()
        The meta-loss, in the compute dtype, differentiable once.

    Raises
    ------
    ValueError
        A tensor not on the CPU (call ``.cpu()``), labels that require grad,
        and the core's named errors for shapes and values.
    TypeError
        A tensor that is not float32 / float64, or floating tensors of
        different dtypes.
    """
    if not isinstance(support_X, torch.Tensor):
        raise TypeError(f"support_X: expected a torch.Tensor, got {type(support_X).__name__}")
    Xs = _float_tensor(support_X, "support_X")
    dtype = support_X.dtype
    th = _float_tensor(theta, "theta", dtype)
    Xq = _float_tensor(query_X, "query_X", dtype)
    ys = _labels(support_y, "support_y")
    yq = _labels(query_y, "query_y")
    lr_host, lr_tensor = _hyper(inner_lr, "inner_lr", dtype)
    l2_host, l2_tensor = _hyper(l2, "l2", dtype)
    grad_on = torch.is_grad_enabled()
    grad_features = grad_on and (support_X.requires_grad or query_X.requires_grad)

    def call():
        return _functional.meta_value_and_grad(
            th, (Xs, ys, Xq, yq), inner_lr=lr_host, inner_steps=inner_steps, l2=l2_host,
            first_order=first_order, n_threads=n_threads, task_axis=task_axis, grad_features=grad_features,
        )

    if not grad_on or not any(t is not None and t.requires_grad
                              for t in (theta, support_X, query_X, lr_tensor, l2_tensor)):
        # Nothing to differentiate: the same single core call, no graph node.
        return torch.from_numpy(np.array(call().loss, dtype=_NUMPY_DTYPES[dtype]))
    # A later backward calls the core again (_MetaLoss.backward). Torch's version counter guards the
    # tensors; NumPy or list labels and step sizes it cannot see are frozen now, so an in-place edit
    # after forward can never reach that call (a small copy: labels and hyperparameters only).
    if not isinstance(support_y, torch.Tensor):
        ys = _frozen(ys)
    if not isinstance(query_y, torch.Tensor):
        yq = _frozen(yq)
    if lr_tensor is None:
        lr_host = _frozen(lr_host)
    if l2_tensor is None:
        l2_host = _frozen(l2_host)
    labels = tuple(y for y in (support_y, query_y) if isinstance(y, torch.Tensor))
    return _MetaLoss.apply(theta, support_X, query_X, lr_tensor, l2_tensor, call, labels)


def adapt(theta, support_X, support_y, *, inner_lr, inner_steps, l2=0.0, task_axis=False, n_threads=None):
    """Adapted head of every task (the inner loop), for evaluation; not differentiable.

    Parameters
    ----------
    theta : Tensor of shape (n_features + 1,) or (n_features + 1, n_classes)
    support_X : Tensor of shape (n_tasks, n_support, n_features)
    support_y : Tensor or array_like of shape (n_tasks, n_support)
    inner_lr, inner_steps, l2, task_axis, n_threads
        As in :func:`meta_loss` (tensors are read as constants).

    Returns
    -------
    Tensor of shape (n_tasks, *theta.shape)
        phi_K of each task, in the compute dtype, detached. One core call;
        with ``task_axis=True`` or a per-task ``l2`` one call per task.
    """
    if not isinstance(support_X, torch.Tensor):
        raise TypeError(f"support_X: expected a torch.Tensor, got {type(support_X).__name__}")
    Xs = _float_tensor(support_X, "support_X")
    dtype = support_X.dtype
    th = _float_tensor(theta, "theta", dtype)
    ys = _labels(support_y, "support_y")
    lr_host = _hyper(inner_lr, "inner_lr", dtype)[0]
    l2_host = _hyper(l2, "l2", dtype)[0]
    task_axis = _functional._check_flag(task_axis, "task_axis")
    if Xs.ndim != 3:
        raise ValueError(f"support_X: expected a 3-d tensor (n_tasks, n_support, n_features), got shape "
                         f"{tuple(Xs.shape)}")
    per_task_l2 = not isinstance(l2_host, numbers.Real) and np.ndim(l2_host) > 0
    if not (task_axis or per_task_l2):
        phi = _functional.adapt(th, Xs, ys, inner_lr=lr_host, inner_steps=inner_steps, l2=l2_host,
                                n_threads=n_threads)
        return torch.from_numpy(phi)
    T = Xs.shape[0]
    K = check_int(inner_steps, "inner_steps", minimum=0)
    # Validate the per-task shapes exactly as meta_loss does (same messages).
    theta_c = _functional._prepare_theta(th, Xs.shape[2], Xs.dtype)
    if task_axis:
        table, _, _, per_task = _functional._prepare_task_inner_lr(lr_host, T, K, theta_c.shape, Xs.dtype)
        lrs = [table[t] if per_task else table for t in range(T)]
    else:
        lrs = [lr_host] * T
    l2s = [float(v) for v in _functional._check_task_l2(l2_host, T, Xs.dtype)] if per_task_l2 else [l2_host] * T
    ys_arr = np.asarray(ys)
    if ys_arr.shape != Xs.shape[:2]:  # the per-task slices below would otherwise name a one-task shape
        raise ValueError(f"support_y: expected shape {tuple(Xs.shape[:2])} (n_tasks, n_support), got "
                         f"{tuple(ys_arr.shape)}")
    phis = [
        _functional.adapt(theta_c, Xs[t:t + 1], ys_arr[t:t + 1], inner_lr=lrs[t], inner_steps=K, l2=l2s[t],
                          n_threads=n_threads)
        for t in range(T)
    ]
    return torch.from_numpy(np.concatenate(phis, axis=0))


def query_logits(phi, query_X):
    """Logits of adapted heads on each task's query rows (plain torch, differentiable).

    Parameters
    ----------
    phi : Tensor of shape (n_tasks, n_features + 1) or (n_tasks, n_features + 1, n_classes)
        Adapted heads, bias last (as returned by :func:`adapt`).
    query_X : Tensor of shape (n_tasks, n_query, n_features)

    Returns
    -------
    Tensor of shape (n_tasks, n_query) (binary: the logit of class 1) or
    (n_tasks, n_query, n_classes) (softmax).
    """
    for t, name in ((phi, "phi"), (query_X, "query_X")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if query_X.ndim != 3:
        raise ValueError(f"query_X: expected shape (n_tasks, n_query, n_features), got {tuple(query_X.shape)}")
    T, _, d = query_X.shape
    if phi.ndim not in (2, 3) or phi.shape[0] != T or phi.shape[1] != d + 1:
        raise ValueError(
            f"phi: expected shape ({T}, {d + 1}) or ({T}, {d + 1}, n_classes) for {T} tasks and {d} features "
            f"(bias last), got {tuple(phi.shape)}"
        )
    if phi.dtype != query_X.dtype:
        raise TypeError(f"phi: dtype {phi.dtype} differs from query_X's {query_X.dtype}")
    if phi.ndim == 2:
        return torch.bmm(query_X, phi[:, :-1, None])[..., 0] + phi[:, -1:]
    return torch.bmm(query_X, phi[:, :-1, :]) + phi[:, -1:, :]


class MetaHead(torch.nn.Module):
    """A logistic-regression head adapted per task by fastmaml (ANIL's head in one call).

    Parameters
    ----------
    n_features : int
        Width of the features the head sees (the backbone's output).
    n_classes : int, default=2
        2 gives a binary (sigmoid) head, theta of shape (n_features + 1,);
        more gives a softmax head, theta of shape (n_features + 1, n_classes).
    inner_steps : int, default=5
    inner_lr : float, default=0.1
        Initial step size of every inner step.
    l2 : float, default=0.0
        Initial (or fixed) L2 strength of the support loss.
    learn_inner_lr : bool, default=True
        Learn one step size per inner step, in log space (``log_inner_lr``,
        shape (inner_steps,)); otherwise it is a fixed buffer.
    learn_l2 : bool, default=False
        Learn the L2 strength in log space (``log_l2``); needs l2 > 0.
    first_order : bool, default=False
    n_threads : int or None

    Attributes
    ----------
    theta : Parameter, the shared initialization [w, b] (zeros).
    log_inner_lr : Parameter or buffer of shape (inner_steps,)
    log_l2 : Parameter of shape () (only with ``learn_l2``)

    Examples
    --------
    >>> loss = head(backbone(xs), ys, backbone(xq), yq)   # doctest: +SKIP
    >>> loss.backward()                                    # doctest: +SKIP
    """

    def __init__(self, n_features, n_classes=2, inner_steps=5, inner_lr=0.1, l2=0.0, learn_inner_lr=True,
                 learn_l2=False, first_order=False, n_threads=None):
        super().__init__()
        d = check_int(n_features, "n_features", minimum=1)
        C = check_int(n_classes, "n_classes", minimum=2)
        self.inner_steps = check_int(inner_steps, "inner_steps", minimum=0)
        lr = check_float(inner_lr, "inner_lr", minimum=0.0)
        lam = check_float(l2, "l2", minimum=0.0)
        if learn_inner_lr and lr <= 0:
            raise ValueError(f"inner_lr: a learned step size is kept in log space and must be > 0, got {lr}")
        if learn_l2 and lam <= 0:
            raise ValueError(f"l2: a learned L2 strength is kept in log space and must be > 0, got {lam}")
        check_threads(n_threads)  # here rather than at the first forward
        # the core's float64 step-size table of every call (inner_steps x theta's entries), before
        # torch's unnamed allocation failure for the (inner_steps,) parameter
        n_theta = (d + 1) * (1 if C == 2 else C)
        check_memory(self.inner_steps * n_theta * 8, "inner_steps",
                     f"the step-size table of {self.inner_steps} inner steps x {n_theta} parameters",
                     hint="use fewer inner_steps")
        self.n_classes = C
        self.first_order = _functional._check_flag(first_order, "first_order")
        self.n_threads = n_threads
        self.theta = torch.nn.Parameter(torch.zeros((d + 1,) if C == 2 else (d + 1, C)))
        log_lr = torch.full((self.inner_steps,), float(np.log(lr)) if lr > 0 else -np.inf)
        if learn_inner_lr:
            self.log_inner_lr = torch.nn.Parameter(log_lr)
        else:
            self.register_buffer("log_inner_lr", log_lr)
        self.learn_l2 = bool(learn_l2)
        if self.learn_l2:
            self.log_l2 = torch.nn.Parameter(torch.tensor(float(np.log(lam))))
        else:
            self.l2 = lam

    def inner_lr(self):
        """The step sizes as fastmaml reads them: (inner_steps, 1) binary, (inner_steps, 1, 1) softmax."""
        lr = self.log_inner_lr.exp()
        return lr.reshape((self.inner_steps,) + (1,) * self.theta.ndim)

    def l2_value(self):
        """The L2 strength: a tensor with ``learn_l2``, else the fixed float."""
        return self.log_l2.exp() if self.learn_l2 else self.l2

    def forward(self, support_X, support_y, query_X, query_y):
        """Meta-loss of the batch of tasks; shapes as in :func:`meta_loss`."""
        return meta_loss(self.theta, support_X, support_y, query_X, query_y, inner_lr=self.inner_lr(),
                         inner_steps=self.inner_steps, l2=self.l2_value(), first_order=self.first_order,
                         n_threads=self.n_threads)

    @torch.no_grad()
    def adapt(self, support_X, support_y):
        """Adapted heads phi of each task, Tensor of shape (n_tasks, *theta.shape) (detached)."""
        l2 = self.l2_value()
        return adapt(self.theta.detach(), support_X.detach(), support_y, inner_lr=self.inner_lr().detach(),
                     inner_steps=self.inner_steps, l2=float(l2) if self.learn_l2 else l2,
                     n_threads=self.n_threads)

    def predict(self, phi, query_X):
        """Predicted class of each query row, Tensor of shape (n_tasks, n_query) (int64).

        Use :func:`query_logits` for the logits.
        """
        logits = query_logits(phi, query_X.detach())
        if self.theta.ndim == 1:
            return (logits > 0).long()
        return logits.argmax(dim=-1)
