"""Meta-optimizers over a dict of named float64 arrays (state is plain data)."""

from __future__ import annotations

import math

import numpy as np

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

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, schedule=None, total_steps=1):
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.schedule = schedule
        self.total_steps = max(int(total_steps), 1)
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def current_lr(self) -> float:
        if self.schedule == "cosine":
            frac = min(self.t, self.total_steps) / self.total_steps
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.lr

    def step(self, params: dict, grads: dict) -> None:
        """Update ``params`` in place from ``grads`` (same keys)."""
        lr = self.current_lr()
        self.t += 1
        c1 = 1.0 - self.beta1**self.t
        c2 = 1.0 - self.beta2**self.t
        for key, g in grads.items():
            g = np.asarray(g, dtype=np.float64)
            m = self.m.setdefault(key, np.zeros_like(g))
            v = self.v.setdefault(key, np.zeros_like(g))
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * g * g
            update = lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
            params[key] = params[key] - update

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

    def step(self, params: dict, grads: dict) -> None:
        lr = self.current_lr()
        self.t += 1
        for key, g in grads.items():
            params[key] = params[key] - lr * np.asarray(g, dtype=np.float64)
