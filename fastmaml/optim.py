"""Meta-optimizers over a dict of named float64 arrays (state is plain data).

The arithmetic of a step is compiled (``_core.optimizer_step``): the training
loop of :meth:`fastmaml.MAML.fit` runs the same code without returning to
Python, so both loops take bitwise the same steps.
"""

from __future__ import annotations

import numpy as np

from . import _core

__all__ = ["Adam", "SGD"]


class Adam:
    """Adam with bias correction and an optional cosine decay of the step size.

    Parameters
    ----------
    lr : float
        Peak meta learning rate.
    betas : (float, float)
    eps : float
    schedule : {None, "cosine"}
        Cosine decays lr to 0 over ``total_steps``.
    total_steps : int
    """

    _adam = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, schedule=None, total_steps=1):
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.schedule = schedule
        self.total_steps = max(int(total_steps), 1)
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def config(self) -> tuple:
        """The optimizer as the compiled step reads it: (adam, lr, beta1, beta2, eps, cosine, total_steps)."""
        return (self._adam, self.lr, self.beta1, self.beta2, self.eps, self.schedule == "cosine", self.total_steps)

    def current_lr(self) -> float:
        """The step size of the next step (after ``t`` steps)."""
        return float(_core.scheduled_lr(self.config(), self.t))

    def moments(self, params: dict, keys) -> None:
        """Create zero moments for ``keys`` of ``params`` not tracked yet (the compiled loop updates them in place)."""
        for key in keys:
            if key not in self.m:
                self.m[key] = np.zeros(np.shape(params[key]))
                self.v[key] = np.zeros(np.shape(params[key]))

    def step(self, params: dict, grads: dict) -> None:
        """Update ``params`` from ``grads`` (same keys); each updated array is replaced by a new one."""
        keys = list(grads)
        values = [np.array(params[k], dtype=np.float64, order="C") for k in keys]
        g = [np.ascontiguousarray(grads[k], dtype=np.float64).reshape(np.shape(params[k])) for k in keys]
        if self._adam:
            self.moments(params, keys)
        ms = [self.m[k] for k in keys] if self._adam else []
        vs = [self.v[k] for k in keys] if self._adam else []
        self.t = int(_core.optimizer_step(values, g, ms, vs, self.config(), self.t))
        for key, value in zip(keys, values):
            params[key] = value

    def state_arrays(self, prefix="opt") -> dict:
        out = {}
        for key in self.m:
            out[f"{prefix}.m.{key}"] = self.m[key]
            out[f"{prefix}.v.{key}"] = self.v[key]
        return out

    def load_state(self, arrays: dict, t: int, prefix="opt") -> None:
        self.t = int(t)
        self.m, self.v = {}, {}
        for name, value in arrays.items():
            if name.startswith(f"{prefix}.m."):
                self.m[name[len(prefix) + 3 :]] = np.array(value, dtype=np.float64)
            elif name.startswith(f"{prefix}.v."):
                self.v[name[len(prefix) + 3 :]] = np.array(value, dtype=np.float64)


class SGD(Adam):
    """Plain gradient descent (same interface and schedule as :class:`Adam`)."""

    _adam = False
