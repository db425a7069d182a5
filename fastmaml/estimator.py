"""`MAML`: the meta-training estimator a script uses.

MAML and first-order MAML meta-train in blocks of iterations inside one
compiled call (draws, meta-gradient and optimizer step; see `MAML.fit`); the
other algorithms run one call of the core per meta-iteration.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import numbers
import os
import signal
import sys
import threading
import textwrap
import time
import warnings
from typing import Callable, Optional

import numpy as np

from . import checkpoint as _checkpoint
from .functional import ConvergenceWarning, adapt_preconditioned, hessian_vector_product, imaml_value_and_grad
from .functional import adapt as _adapt
from .functional import meta_value_and_grad, precond_value_and_grad, reptile_grad
from .optim import SGD, Adam
from ._links import sigmoid, softmax
from .evaluation import mean_ci, query_scores
from ._tasks import Tasks, _Side
from ._validation import as_feature_array, check_bool, check_float, check_int, check_threads
from .functional import _prepare_inner_lr
from . import _core
from . import policy as _policy
from .policy import HyperPolicy

__all__ = ["MAML", "LogisticModel", "StepSizeWarning"]

ALGORITHMS = ("maml", "fomaml", "reptile", "imaml")
LR_MODES = (None, "scalar", "per_step", "per_parameter", "per_step_parameter", "preconditioner")
SELECT = ("final", "best_accuracy", "best_loss")


class StepSizeWarning(UserWarning):
    """The inner step size is large for the data (inner_lr * largest Hessian eigenvalue > 2)."""


class LogisticModel:
    """A fitted binary logistic-regression model (the result of :meth:`MAML.adapt`).

    Attributes
    ----------
    coef_ : ndarray of shape (1, n_features)
    intercept_ : ndarray of shape (1,)
    classes_ : ndarray of shape (2,)
        The original labels; ``classes_[1]`` is the positive class.
    """

    def __init__(self, params, classes=(0, 1)):
        params = np.asarray(params, dtype=np.float64)
        if params.ndim == 1:  # binary: one weight row, like scikit-learn
            self.coef_ = params[:-1].reshape(1, -1).copy()
            self.intercept_ = params[-1:].copy()
        else:  # multinomial (d+1, C): one row per class
            self.coef_ = params[:-1].T.copy()
            self.intercept_ = params[-1].copy()
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = self.coef_.shape[1]

    def decision_function(self, X) -> np.ndarray:
        """Logits: shape (n,) for a binary model, (n, C) for a multinomial one."""
        Xa = as_feature_array(X, "X", ndim=2)
        if Xa.shape[1] != self.n_features_in_:
            raise ValueError(f"X: expected {self.n_features_in_} features, got {Xa.shape[1]}")
        z = Xa.astype(np.float64, copy=False) @ self.coef_.T + self.intercept_
        return z[:, 0] if self.coef_.shape[0] == 1 else z

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), columns in the order of ``classes_``."""
        z = self.decision_function(X)
        if z.ndim == 1:
            p1 = sigmoid(z)
            return np.column_stack([1.0 - p1, p1])
        return softmax(z)

    def predict(self, X) -> np.ndarray:
        z = self.decision_function(X)
        if z.ndim == 1:
            return self.classes_[(z > 0).astype(int)]
        return self.classes_[np.argmax(z, axis=1)]

    def score(self, X, y) -> float:
        """Mean accuracy on (X, y)."""
        return float(np.mean(self.predict(X) == np.asarray(y)))

    def to_sklearn(self):
        """The same model as a fitted ``sklearn.linear_model.LogisticRegression``.

        ``predict`` and ``decision_function`` agree exactly, and so do the
        multinomial probabilities (both softmax). Binary probabilities agree to
        the last bit or so: scikit-learn computes ``1 / (1 + exp(-z))``, this
        model ``exp(-log(1 + exp(-z)))``.

        Returns
        -------
        sklearn.linear_model.LogisticRegression
        """
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError as exc:  # pragma: no cover
            raise ImportError("to_sklearn needs scikit-learn: pip install scikit-learn") from exc
        model = LogisticRegression()
        model.coef_ = self.coef_.copy()
        model.intercept_ = self.intercept_.copy()
        model.classes_ = self.classes_.copy()
        model.n_features_in_ = self.n_features_in_
        model.n_iter_ = np.array([0])
        return model


class _Interrupt:
    """Turns the first Ctrl-C during fit into a flag checked between iterations."""

    def __init__(self):
        self.flag = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.flag:  # second Ctrl-C: give up at once
                    signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)
                    raise KeyboardInterrupt
                self.flag = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# --------------------------------------------------------------------------
# the parameters of MAML: one table drives __init__, validation, the
# docstring's Parameters section, get_params/set_params, __repr__ and the
# configuration saved with a model
# --------------------------------------------------------------------------


def _one_of(options):
    def check(value, name):
        if value not in options:
            raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return check


def _integer(minimum):
    def check(value, name):
        check_int(value, name, minimum=minimum)
    return check


def _real(minimum):
    def check(value, name):
        check_float(value, name, minimum=minimum)
    return check


def _finite_array(value, name):
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number or an array of numbers, got {value!r}") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinity")


def _threads(value, name):
    check_threads(value)


def _seed(value, name):
    if value is None or isinstance(value, np.random.Generator):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected None, an integer seed or a numpy.random.Generator, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative integer seed, got {value}")


def _hyper_policy(value, name):
    if value is None:
        return
    if not isinstance(value, HyperPolicy):
        raise TypeError(f"{name}: expected None or a fastmaml.HyperPolicy, got {value!r}")
    value._check()


def _callables(value, name):
    for cb in value:
        if not callable(cb):
            raise TypeError(f"{name}: expected callables, got {cb!r}")


@dataclasses.dataclass(frozen=True)
class _Param:
    name: str
    default: object
    kind: str  # the numpydoc type line after "name : "
    doc: str
    check: Optional[Callable] = None  # check(value, name) raises a ValueError/TypeError naming the parameter
    saved: bool = True  # part of a saved model's configuration (else a run-time setting)


_PARAMS = (
    _Param("algorithm", "maml", '{"maml", "fomaml", "reptile", "imaml"}',
           "Exact second-order MAML, first-order MAML, Reptile, or iMAML (implicit gradients of a proximal "
           "inner problem with strength ``imaml_mu``; at adaptation time iMAML runs ``inner_steps`` gradient "
           "steps of ``inner_lr``).", _one_of(ALGORITHMS)),
    _Param("inner_steps", 5, "int", "Inner gradient steps K (>= 0).", _integer(0)),
    _Param("inner_lr", 0.1, "float or array_like",
           "Inner step size (initial value when learned). Broadcast as in :func:`fastmaml.meta_value_and_grad`. "
           "Features scaled to [0, 1] (as the bundled datasets are) make 0.1-1 a sensible range.",
           _finite_array),
    _Param("learn_inner_lr", None,
           '{None, "scalar", "per_step", "per_parameter", "per_step_parameter", "preconditioner"}',
           "Which inner step sizes are meta-learned (in log space). None keeps ``inner_lr`` fixed; "
           '"per_parameter" is Meta-SGD; "preconditioner" learns P = diag(exp(s)) + U U^T (U of rank '
           "``precond_rank``) in place of the step size, starting from a scalar ``inner_lr``.", _one_of(LR_MODES)),
    _Param("l2", 0.0, "float", "L2 strength of the inner (support) loss (>= 0).", _real(0.0)),
    _Param("learn_l2", False, "bool", "Meta-learn l2 (in log space; needs l2 > 0 to start).", check_bool),
    _Param("learn_init", True, "bool",
           "Meta-learn the initialization theta (False keeps the start -- zero, or the theta of fit's "
           "``init`` -- and learns only the hyperparameters).", check_bool),
    _Param("hyper_policy", None, "HyperPolicy or None",
           "Per-task step sizes (one per inner step) and L2 from a descriptor of each task's support set, "
           "meta-learned with the initialization (:class:`fastmaml.HyperPolicy`; docs/design.md, \"The "
           "hyperparameter policy\"). Starts from ``inner_lr`` (a scalar or one value per step) and ``l2`` for "
           "every task; needs algorithm maml or fomaml, learn_inner_lr=None and learn_l2=False.", _hyper_policy),
    _Param("meta_lr", 1e-3, "float", "Step size of the meta-optimizer (>= 0).", _real(0.0)),
    _Param("meta_optimizer", "adam", '{"adam", "sgd"}', "The meta-optimizer (:mod:`fastmaml.optim`).",
           _one_of(("adam", "sgd"))),
    _Param("lr_schedule", None, '{None, "cosine"}', "Decay of ``meta_lr`` over ``n_iterations``.",
           _one_of((None, "cosine"))),
    _Param("meta_batch_size", 32, "int",
           "Tasks drawn from a sampler per iteration. A fixed :class:`fastmaml.Tasks` passed to :meth:`fit` "
           "is used whole every iteration: ``meta_batch_size`` does not apply to it (slice it yourself, or "
           "use a sampler, for minibatches).", _integer(1)),
    _Param("n_iterations", 1000, "int", "Meta-iterations (outer steps).", _integer(0)),
    _Param("validate_every", 50, "int", "Meta-validation period (iterations) when fit gets ``validation``.",
           _integer(1)),
    _Param("select", "final", '{"final", "best_accuracy", "best_loss"}',
           "Keep the final parameters or the best on meta-validation (accuracy and log-loss can disagree, so "
           "the criterion is explicit).", _one_of(SELECT)),
    _Param("checkpoint_path", None, "str or None",
           "Where to write checkpoints (atomically) every ``checkpoint_every`` iterations and when fit ends or "
           "is interrupted. The history goes to an append-only sidecar ``<checkpoint_path>.history-<token>`` "
           "beside it, so a checkpoint costs the same however long the history: keep the two files together.",
           saved=False),
    _Param("checkpoint_every", 100, "int", "Checkpoint period (iterations).", _integer(1)),
    _Param("imaml_mu", 1.0, "float", 'Proximal strength of iMAML (> 0; used by algorithm="imaml").'),
    _Param("precond_rank", 4, "int", "Rank of U for the learned preconditioner.", _integer(1)),
    _Param("n_threads", None, "int or None",
           "Threads of the compiled core; None: OpenMP's default. Results do not depend on it.", _threads,
           saved=False),
    _Param("random_state", None, "None, int or numpy.random.Generator",
           "Seeds the random initial U of the learned preconditioner. A Generator is not advanced: each fit "
           "draws from a copy of its state at the start of fit, so two fits given the same Generator (or the "
           "same int) are identical; None draws fresh entropy.", _seed, saved=False),
    _Param("progress", "auto", 'bool or "auto"',
           'A tqdm progress bar (when tqdm is installed; "auto": only on a terminal).', saved=False),
    _Param("callbacks", (), "sequence of callables",
           "``callback(model, record)`` after every iteration; return True to stop.", _callables, saved=False),
)
_PARAM_NAMES = tuple(p.name for p in _PARAMS)
# settings a resumed run may change: they cannot change its results (n_iterations may change only without a
# learning-rate schedule and without a hyper_policy warm-up, since both depend on it)
_RESUME_FREE = ("checkpoint_path", "checkpoint_every", "n_threads", "random_state", "progress", "callbacks")


def _params_doc() -> str:
    """The numpydoc Parameters section of MAML, from the table."""
    lines = ["Parameters", "----------"]
    for p in _PARAMS:
        lines.append(f"{p.name} : {p.kind}, default={p.default!r}")
        lines.extend("    " + line for line in textwrap.wrap(p.doc, 88))
    return "\n".join("    " + line if line else line for line in lines)


def _same(value, default) -> bool:
    """Whether a parameter value equals its default (arrays compare by value)."""
    if isinstance(value, np.ndarray) or isinstance(default, np.ndarray):
        return np.array_equal(value, default)
    if type(value) is not type(default) and not (
        isinstance(value, numbers.Real) and isinstance(default, numbers.Real)
        and not isinstance(value, bool) and not isinstance(default, bool)
    ):
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError):
        return False


class MAML:
    """Meta-learn a logistic-regression initialization and inner-loop hyperparameters.

    Every parameter is keyword-only; :meth:`get_params` / :meth:`set_params`
    follow scikit-learn's estimator protocol, so ``sklearn.base.clone`` and
    scikit-learn's model-selection tools work (scikit-learn itself is not
    needed). Parameters are checked when :meth:`fit` starts.

{parameters}

    Attributes
    ----------
    theta_ : ndarray of shape (n_features + 1,) or (n_features + 1, n_classes)
    inner_lr_ : float or ndarray
        With a ``hyper_policy``: the per-step step sizes, shape
        (inner_steps, 1) (or (inner_steps, 1, 1)), of a task whose descriptor
        is the meta-training mean; each task's own are
        :meth:`task_hyperparameters`.
    l2_ : float
        With a ``hyper_policy`` likewise that of the mean task.
    history_ : list of dict
        One record per iteration (loss, time, hyperparameters) and, at
        validation iterations, ``val_accuracy`` and ``val_loss``.
    n_iter_ : int
    interrupted_ : bool
    """

    def __init__(self, **params):
        unknown = [name for name in params if name not in _PARAM_NAMES]
        if unknown:
            raise TypeError(f"MAML() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            f"valid parameters are {', '.join(_PARAM_NAMES)}")
        # stored exactly as given (sklearn.base.clone checks identity); checked when fit starts
        for p in _PARAMS:
            setattr(self, p.name, params.get(p.name, p.default))

    # the signature help() and IDEs show: every parameter keyword-only, with its default
    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default) for p in _PARAMS]
    )

    # ------------------------------------------------------------------ config
    def get_params(self, deep: bool = True) -> dict:
        """The estimator's parameters, as scikit-learn's estimator protocol defines them.

        Parameters
        ----------
        deep : bool, default=True
            Accepted for scikit-learn; MAML holds no sub-estimators, so it
            changes nothing.

        Returns
        -------
        dict
            Parameter name -> value, for every parameter of the constructor.
        """
        return {name: getattr(self, name) for name in _PARAM_NAMES}

    def set_params(self, **params) -> "MAML":
        """Set parameters by name (checked when :meth:`fit` starts).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            Naming every unknown parameter (and listing the valid ones).
        """
        unknown = [name for name in params if name not in _PARAM_NAMES]
        if unknown:
            raise ValueError(f"set_params: unknown parameter(s) {', '.join(map(repr, unknown))} for MAML; "
                             f"valid parameters are {', '.join(_PARAM_NAMES)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def _config(self) -> dict:
        cfg = {p.name: getattr(self, p.name) for p in _PARAMS if p.saved}
        cfg["inner_lr"] = np.asarray(self.inner_lr, dtype=np.float64).tolist()
        if self.hyper_policy is None:
            del cfg["hyper_policy"]  # files of models without a policy stay as they were
        else:
            cfg["hyper_policy"] = self.hyper_policy._config()
        return cfg

    def _validate_config(self):
        for p in _PARAMS:
            if p.check is not None:
                p.check(getattr(self, p.name), p.name)
        # constraints between parameters
        if self.algorithm in ("reptile", "imaml") and (self.learn_inner_lr or self.learn_l2):
            raise ValueError(
                f"algorithm: {self.algorithm!r} has no hypergradients; use learn_inner_lr=None and learn_l2=False"
            )
        if self.hyper_policy is not None:
            self._validate_policy()
        if self.algorithm == "imaml":
            mu = check_float(self.imaml_mu, "imaml_mu")
            if not mu > 0:
                raise ValueError(f"imaml_mu: expected a number > 0, got {mu}")
        if self.learn_inner_lr == "preconditioner" and np.size(self.inner_lr) != 1:
            raise ValueError("inner_lr: the preconditioner starts from one scalar inner_lr (diag(inner_lr))")
        if self.learn_inner_lr and np.any(np.asarray(self.inner_lr, dtype=np.float64) <= 0):
            raise ValueError("inner_lr: must be > 0 when it is learned (it is learned in log space)")
        if self.learn_l2 and not self.l2 > 0:
            raise ValueError("l2: must be > 0 when learn_l2=True (it is learned in log space)")
        if self.learn_inner_lr in ("per_step", "per_step_parameter") and int(self.inner_steps) == 0:
            raise ValueError(
                f"learn_inner_lr: {self.learn_inner_lr!r} learns one step size per inner step and needs "
                "inner_steps >= 1, got inner_steps=0"
            )
        return int(self.inner_steps)

    def _validate_policy(self):
        if self.algorithm not in ("maml", "fomaml"):
            raise ValueError(f"hyper_policy: needs algorithm 'maml' or 'fomaml' (per-task hypergradients), got "
                             f"{self.algorithm!r}")
        if self.learn_inner_lr is not None or self.learn_l2:
            raise ValueError(
                "hyper_policy: the policy learns the step sizes (and, with HyperPolicy(learn_l2=True), l2) itself; "
                f"leave learn_inner_lr=None and learn_l2=False (got learn_inner_lr={self.learn_inner_lr!r}, "
                f"learn_l2={self.learn_l2!r})"
            )
        K = int(self.inner_steps)
        if K < 1:
            raise ValueError("inner_steps: hyper_policy learns one step size per inner step and needs inner_steps >= 1, "
                             f"got {K}")
        lr = np.asarray(self.inner_lr, dtype=np.float64)
        if lr.size not in (1, K) or (lr.size == K and K > 1 and max(lr.shape) != K):
            raise ValueError(f"inner_lr: hyper_policy starts from a scalar inner_lr or one per step ({K} values), "
                             f"got shape {lr.shape}")
        if np.any(lr <= 0):
            raise ValueError("inner_lr: must be > 0 with hyper_policy (step sizes are learned in log space)")
        if self.hyper_policy.learn_l2 and not self.l2 > 0:
            raise ValueError("l2: must be > 0 when HyperPolicy(learn_l2=True) learns it (in log space)")

    def _fit_rng(self) -> np.random.Generator:
        """The Generator of one fit: a copy of a given Generator's state, so fits repeat and it is not advanced."""
        if isinstance(self.random_state, np.random.Generator):
            return copy.deepcopy(self.random_state)
        return np.random.default_rng(None if self.random_state is None else int(self.random_state))

    def _initial_lr(self, K: int, theta_shape: tuple) -> np.ndarray:
        lr = np.asarray(self.inner_lr, dtype=np.float64)
        mode = self.learn_inner_lr
        if mode is None:
            return lr
        ones = (1,) * len(theta_shape)
        shapes = {"scalar": (), "per_step": (K,) + ones, "per_parameter": tuple(theta_shape),
                  "per_step_parameter": (K,) + tuple(theta_shape)}
        target = shapes[mode]
        try:
            return np.broadcast_to(lr, target).copy()
        except ValueError:
            raise ValueError(
                f"inner_lr: shape {lr.shape} cannot initialise a {mode} inner learning rate of shape {target}"
            ) from None

    # --------------------------------------------------------------- accessors
    @property
    def theta_(self) -> np.ndarray:
        self._check_fitted()
        return self._params["theta"].copy()

    @property
    def inner_lr_(self):
        self._check_fitted()
        lr = self._lr_value(self._params)
        return float(lr) if lr.ndim == 0 else lr

    @property
    def l2_(self) -> float:
        self._check_fitted()
        return float(self._l2_value(self._params))

    def _check_fitted(self):
        if not hasattr(self, "_params"):
            raise AttributeError("this MAML model is not fitted yet: call fit(...) or MAML.load(path)")

    def _lr_value(self, params):
        if _policy.LR_INTERCEPT in params:  # the policy's steps for z = 0 (the meta-training mean)
            a = np.exp(params[_policy.LR_INTERCEPT])
            return a.reshape((a.size,) + (1,) * params["theta"].ndim)
        if "log_inner_lr" in params:
            return np.exp(params["log_inner_lr"])
        if "log_scale" in params:  # the diagonal of P = diag(exp(s)) + U U^T
            return np.exp(params["log_scale"]) + (params["U"] ** 2).sum(axis=1)
        return self._fixed_lr

    def _l2_value(self, params):
        if _policy.L2_INTERCEPT in params:
            return float(np.exp(params[_policy.L2_INTERCEPT]))
        if "log_l2" in params:
            return float(np.exp(params["log_l2"]))
        return float(self.l2)

    def _lr_arg(self, params):
        lr = self._lr_value(params)
        return float(lr) if np.ndim(lr) == 0 else lr

    # --------------------------------------------------------------------- fit
    def _init_state(self, n_features: int, K: int, n_classes: int, start: Optional[dict] = None):
        D = n_features + 1
        self.n_features_in_ = n_features
        self.n_classes_ = n_classes
        self._fixed_lr = np.asarray(self.inner_lr, dtype=np.float64)
        shape = (D,) if n_classes <= 2 else (D, n_classes)
        params = {"theta": np.zeros(shape) if start is None else start["theta"].copy()}
        if self.learn_inner_lr == "preconditioner":
            rng = self._fit_rng()
            params["log_scale"] = np.full(D, math.log(float(self._fixed_lr.reshape(-1)[0])))
            # U = 0 is a stationary point of d/dU = (M + M^T) U: start slightly off it
            params["U"] = 1e-3 * rng.standard_normal((D, int(self.precond_rank)))
        elif self.learn_inner_lr:
            if start is None:
                params["log_inner_lr"] = np.log(self._initial_lr(K, shape))
            else:
                params["log_inner_lr"] = np.log(self._start_lr(start, K, shape))
        if self.learn_l2:
            params["log_l2"] = np.asarray(math.log(self.l2 if start is None else start["l2"]))
        self._params = params
        opt_cls = Adam if self.meta_optimizer == "adam" else SGD
        self._opt = opt_cls(lr=self.meta_lr, schedule=self.lr_schedule, total_steps=self.n_iterations)
        self.history_ = []
        self.n_iter_ = 0
        self.interrupted_ = False
        self._best = None  # (score, iteration, params)
        self._last_extra = {}

    def fit(self, tasks, *, validation=None, val_episodes=200, resume=False, init=None):
        """Meta-train.

        Parameters
        ----------
        tasks : sampler or Tasks
            A task sampler (an object with ``sample(n_tasks) -> Tasks`` and
            ``get_state()/set_state()``, e.g. :class:`fastmaml.EpisodeSampler`)
            drawing a fresh meta-batch every iteration, or a fixed Tasks used
            whole every iteration.
        validation : sampler or Tasks, optional
            Meta-validation tasks (use classes/groups the meta-training never
            sees). A sampler is drawn from once, ``val_episodes`` tasks, at
            the start, so every validation uses the same episodes.
        val_episodes : int, default=200
        resume : bool, default=False
            Continue from ``checkpoint_path`` (exactly: parameters, optimizer
            moments, sampler RNG state, history) up to ``n_iterations``. The
            model's settings must equal the checkpoint's, except those that
            cannot change the result: ``checkpoint_path``,
            ``checkpoint_every``, ``n_threads``, ``random_state``,
            ``progress``, ``callbacks`` and, without ``lr_schedule`` and
            without a ``hyper_policy`` warm-up, ``n_iterations``. Any other difference is a ``ValueError``
            naming each setting; a file that is not a valid checkpoint for
            this configuration is a :class:`fastmaml.CheckpointError`.
        init : MAML, optional
            A fitted model to start from (a warm start) instead of the zero
            initialization and ``inner_lr`` / ``l2``: its ``theta_`` and, for
            what this model learns, its learned values -- the step size
            (``learn_inner_lr`` "scalar", "per_step", "per_parameter" or
            "per_step_parameter": ``init.inner_lr_for(inner_steps)`` broadcast
            to this model's shape), ``l2`` (``learn_l2``) and a
            ``hyper_policy``'s intercepts (``init``'s step sizes, one per step,
            and, with ``HyperPolicy(learn_l2=True)``, its ``l2_``; the slopes
            start at 0, so before training every task gets ``init``'s
            setting). Hyperparameters this model keeps fixed stay its own
            ``inner_lr`` and ``l2`` (which are checked as without ``init``:
            e.g. ``l2 > 0`` when it is learned). With ``learn_init=False``
            the start ``init.theta_`` is kept, so only the hyperparameters are
            learned: e.g. a per-task policy on top of a global model,
            ``MAML(hyper_policy=HyperPolicy(warmup=0), learn_init=False).fit(
            sampler, init=global_model)``. The model is copied, not changed. A
            resumed fit continues from its checkpoint and takes no ``init``.

        Returns
        -------
        self

        Notes
        -----
        With ``algorithm="maml"`` or ``"fomaml"`` (every ``learn_inner_lr`` and
        ``learn_l2`` option) the meta-iterations run in the compiled core in
        blocks, with no Python between them: the meta-batch draw of an
        :class:`~fastmaml.EpisodeSampler`, a :class:`~fastmaml.GroupedSampler`
        or a fixed Tasks, the meta-gradient and the optimizer step. A block
        returns to Python at the next validation (``validate_every``),
        checkpoint (``checkpoint_every``), progress-bar update or, when
        ``callbacks`` are given, after every iteration; Ctrl-C stops it
        between two iterations and keeps every finished one. The results are
        bitwise those of drawing each batch with the sampler's ``sample``.

        These stay on the Python loop (one call of the core per iteration),
        with the same compiled optimizer step: Reptile and iMAML (other
        gradient computations than the loop's), a ``hyper_policy`` (each
        iteration computes the drawn tasks' descriptors in NumPy or with the
        user's callable), a task source that computes
        its own meta-gradient (``fastmaml.distributed.DaskTaskSource``: the
        work runs on the cluster), and samplers the loop does not draw itself
        -- other sampler classes (any ``sample(n_tasks)``), an
        ``EpisodeSampler`` with ``pairs`` and a ``GroupedSampler`` with
        ``meta_batch_size`` larger than its number of groups (their draws use
        ``Generator.integers``, whose algorithm belongs to NumPy); for the
        latter the batch drawn in Python goes through the compiled step.
        """
        K = self._validate_config()
        if not isinstance(tasks, Tasks) and not hasattr(tasks, "sample") and not _is_gradient_source(tasks):
            raise TypeError(f"tasks: expected a Tasks or a sampler with sample(n_tasks), got {type(tasks).__name__}")
        if self.hyper_policy is not None and _is_gradient_source(tasks):
            raise ValueError("tasks: a distributed task source does not support hyper_policy (the policy needs each "
                             "task's support set for its descriptor); use a sampler or a Tasks")
        n_features = _n_features(tasks)
        if init is not None and resume:
            raise ValueError("init: a resumed fit continues from checkpoint_path's parameters; pass init only to "
                             "a fresh fit (resume=False)")
        start = self._warm_start(init, K, n_features, _n_classes(tasks)) if init is not None else None
        val_tasks = None
        val_state = None
        if validation is not None:
            if isinstance(validation, Tasks):
                val_tasks = validation
            elif hasattr(validation, "sample"):
                check_int(val_episodes, "val_episodes", minimum=1)
                val_state = validation.get_state()
            else:
                raise TypeError(f"validation: expected a Tasks or a sampler, got {type(validation).__name__}")
        self._train_source = tasks
        if resume:
            if not self.checkpoint_path:
                raise ValueError("resume: needs checkpoint_path to be set")
            self._restore(self.checkpoint_path, tasks)
            if val_state is not None and "val_sampler_state" in self._resume_meta:
                val_state = self._resume_meta["val_sampler_state"]
        else:
            self._init_state(n_features, K, _n_classes(tasks), start)
            if self.hyper_policy is not None:
                self._init_policy(tasks, K, start=start)
        if val_state is not None:
            validation.set_state(val_state)
            val_tasks = validation.sample(val_episodes)
        self._val_state = val_state
        if val_tasks is not None and val_tasks.n_features != n_features:
            raise ValueError(f"validation: expected {n_features} features, got {val_tasks.n_features}")
        if self.n_iter_ == 0:
            self._warn_step_size(tasks)
        self._run(tasks, val_tasks, K)
        return self

    def _warm_start(self, init, K: int, n_features: int, n_classes: int) -> dict:
        """fit's ``init``, checked: {"theta", "inner_lr" (init's, for K steps), "l2"} as copies."""
        if not isinstance(init, MAML):
            raise TypeError(f"init: expected a fitted fastmaml.MAML to start from, got {type(init).__name__}")
        if not hasattr(init, "_params"):
            raise ValueError("init: the model is not fitted; call its fit first")
        if init.n_features_in_ != n_features or init.n_classes_ != n_classes:
            raise ValueError(f"init: the model was fitted on {init.n_features_in_} features and {init.n_classes_} "
                             f"classes, these tasks have {n_features} and {n_classes}")
        if self.learn_inner_lr == "preconditioner":
            raise ValueError("init: a warm start does not support learn_inner_lr='preconditioner' (its P is not a "
                             "step size of the start); use learn_inner_lr=None, 'scalar', 'per_step', "
                             "'per_parameter' or 'per_step_parameter'")
        if init.learn_inner_lr == "preconditioner" and (self.learn_inner_lr or self.hyper_policy is not None):
            raise ValueError("init: the model learned a preconditioner, not a step size to start from; use it "
                             "with learn_inner_lr=None and no hyper_policy, or start from another model")
        theta = np.array(init._params["theta"], dtype=np.float64)
        if not np.isfinite(theta).all():
            raise ValueError("init: the model's theta contains NaN or infinity; start from a model with finite "
                             "parameters")
        l2 = float(init.l2_)
        if (self.learn_l2 or (self.hyper_policy is not None and self.hyper_policy.learn_l2)) and not l2 > 0:
            raise ValueError(f"init: the model's l2 is {l2!r}; learning l2 (in log space) needs a start > 0")
        if not (self.learn_inner_lr or self.hyper_policy is not None):
            # this model keeps its own fixed inner_lr: init's step size (whatever its steps) is not used
            return {"theta": theta, "inner_lr": None, "l2": l2}
        try:
            lr = np.array(init.inner_lr_for(K), dtype=np.float64)
        except ValueError as exc:
            raise ValueError(f"init: {exc}") from None
        if not (np.isfinite(lr).all() and math.isfinite(l2)):
            raise ValueError("init: the model's learned step size or l2 is NaN or infinite; start from a model "
                             "with finite values")
        if K == 1 and lr.ndim == theta.ndim + 1:  # a one-step schedule's only row is that step's size
            lr = lr[0] if lr[0].size > 1 else lr.reshape(())
        if init._has_policy:  # its per-step intercepts: one row per step, as a learned per-step schedule
            if lr.size != K:
                raise ValueError(f"init: the model's policy has one step size per step for {lr.size} steps; "
                                 f"this model takes inner_steps={K}")
            lr = lr.reshape((K,) + (1,) * init._params["theta"].ndim)
        if self.hyper_policy is not None and lr.size not in (1, K):
            raise ValueError(f"init: the model's step size has shape {lr.shape}; a hyper_policy starts from a "
                             f"scalar or one step size per inner step ({K})")
        return {"theta": theta, "inner_lr": lr, "l2": l2}

    def _start_lr(self, start: dict, K: int, theta_shape: tuple) -> np.ndarray:
        """The warm start's step size in this model's learned shape."""
        ones = (1,) * len(theta_shape)
        target = {"scalar": (), "per_step": (K,) + ones, "per_parameter": tuple(theta_shape),
                  "per_step_parameter": (K,) + tuple(theta_shape)}[self.learn_inner_lr]
        try:
            lr = start["inner_lr"]
            # a single step size (a one-step schedule's, or a policy's one intercept) suits every shape
            return np.broadcast_to(lr.reshape(()) if lr.size == 1 else lr, target).copy()
        except ValueError:
            raise ValueError(f"init: the model's step size of shape {start['inner_lr'].shape} does not broadcast "
                             f"to learn_inner_lr={self.learn_inner_lr!r}'s shape {target}") from None

    # ---------------------------------------------------------------- policy
    def _init_policy(self, tasks, K: int, n_probe: int = 256, start: Optional[dict] = None):
        """Fix the descriptor's standardisation from meta-training tasks and start the policy at the global setting.

        A Tasks pool is described whole; a sampler gives max(n_probe,
        meta_batch_size) tasks and is then put back to its state, so the
        training stream does not shift.
        """
        if isinstance(tasks, Tasks):
            probe = tasks
        else:
            state = tasks.get_state()
            probe = tasks.sample(max(n_probe, int(self.meta_batch_size)))
            tasks.set_state(state)
        desc = self.hyper_policy.describe(probe, n_classes=self.n_classes_)
        self._policy_mean, self._policy_scale = _policy.standardisation(desc)
        lr = self.inner_lr if start is None else start["inner_lr"]
        lr = np.broadcast_to(np.asarray(lr, dtype=np.float64).reshape(-1), (K,))
        self._params.update(_policy.initial_params(lr, float(self.l2 if start is None else start["l2"]),
                                                   desc.shape[1], bool(self.hyper_policy.learn_l2)))

    def _policy_warmup_end(self) -> int:
        """The first iteration whose slopes are learned (HyperPolicy.warmup of n_iterations)."""
        return int(math.ceil(float(self.hyper_policy.warmup) * int(self.n_iterations)))

    @property
    def _has_policy(self) -> bool:
        return hasattr(self, "_params") and _policy.LR_INTERCEPT in self._params

    def _check_policy_state(self) -> None:
        """The fitted state must match ``hyper_policy``: set_params after fit must not break adapt or save."""
        pol, fitted = self.hyper_policy, self._has_policy
        learns_l2 = fitted and _policy.L2_INTERCEPT in self._params
        if (pol is None) == fitted or (fitted and bool(pol.learn_l2) != learns_l2):
            have = (f"a hyperparameter policy that {'learns' if learns_l2 else 'does not learn'} l2" if fitted
                    else "no hyperparameter policy")
            raise ValueError(f"hyper_policy: the model was fitted with {have}, but hyper_policy is now {pol!r}; "
                             "set it back with set_params(hyper_policy=...) or call fit again")

    def _descriptor(self):
        self._check_policy_state()
        return self.hyper_policy.descriptor

    def _policy_params(self) -> dict:
        return {k: self._params[k] for k in _policy.POLICY_KEYS if k in self._params}

    def _task_hyper(self, tasks: Tasks) -> tuple:
        """(descriptors (T, F), alpha (T, K), lam (T,) or float) of a batch of tasks."""
        desc = _policy.task_descriptors(tasks, self._descriptor(), n_classes=self.n_classes_,
                                        length=self._policy_mean.size)
        z = _policy.standardise(desc, self._policy_mean, self._policy_scale)
        alpha, lam = _policy.hyperparameters(self._policy_params(), z, float(self.l2))
        return desc, alpha, lam

    def task_hyperparameters(self, X, y=None) -> dict:
        """The step sizes and L2 the fitted policy gives a task (or every task of a batch).

        Parameters
        ----------
        X : array_like of shape (n, n_features), or a Tasks
            One task's support rows, or a batch of tasks (their support sets).
        y : array_like of shape (n,), optional
            The task's labels (as for :meth:`adapt`); None with a Tasks.

        Returns
        -------
        dict
            ``inner_lr``: ndarray of shape (inner_steps,) (one task) or
            (n_tasks, inner_steps); ``l2``: float or ndarray of shape
            (n_tasks,); ``descriptor``: the raw descriptor, shape
            (n_descriptor,) or (n_tasks, n_descriptor).

        Raises
        ------
        ValueError
            If the model has no ``hyper_policy``.
        """
        self._check_fitted()
        if not self._has_policy:
            raise ValueError("hyper_policy: this model has no hyperparameter policy (MAML(hyper_policy=None)); "
                             "its step sizes are inner_lr_ and its l2 is l2_")
        if isinstance(X, Tasks):
            if y is not None:
                raise ValueError("y: must be None when X is a Tasks (its support labels are used)")
            self._check_tasks(X)
            desc, alpha, lam = self._task_hyper(X)
            lam = np.full(alpha.shape[0], lam) if np.ndim(lam) == 0 else lam
            return {"inner_lr": alpha, "l2": lam, "descriptor": desc}
        Xa, codes, _ = self._task_codes(X, y)
        return self._one_task_hyper(Xa, codes)

    def _one_task_hyper(self, Xa, codes) -> dict:
        desc = _policy._one_task_descriptor(Xa, codes, self._descriptor(), self.n_classes_)
        if desc.size != self._policy_mean.size:
            raise ValueError(f"descriptor: returned {desc.size} values, the model was fitted with "
                             f"{self._policy_mean.size}")
        z = _policy.standardise(desc[None], self._policy_mean, self._policy_scale)
        alpha, lam = _policy.hyperparameters(self._policy_params(), z, float(self.l2))
        return {"inner_lr": alpha[0], "l2": float(lam if np.ndim(lam) == 0 else lam[0]), "descriptor": desc}

    def _check_tasks(self, tasks: Tasks):
        if tasks.n_features != self.n_features_in_:
            raise ValueError(f"tasks: expected {self.n_features_in_} features, got {tasks.n_features}")

    def _draw(self, tasks):
        if isinstance(tasks, Tasks) or _is_gradient_source(tasks):
            return tasks
        return tasks.sample(self.meta_batch_size)

    def _gradients(self, batch, K: int):
        params = self._params
        lr = self._lr_arg(params)
        l2 = self._l2_value(params)
        if _is_gradient_source(batch):
            # A source that computes the meta-gradient itself (e.g. on a Dask
            # cluster, fastmaml.distributed): same maths, same result.
            if self.algorithm not in ("maml", "fomaml") or "U" in params:
                raise ValueError(
                    "tasks: a distributed task source supports algorithm 'maml' / 'fomaml' with a fixed or "
                    "learned step size (not reptile, imaml or the preconditioner)"
                )
            res = batch.meta_value_and_grad(params["theta"], inner_lr=lr, inner_steps=K, l2=l2,
                                            first_order=self.algorithm == "fomaml", iteration=self.n_iter_)
            return res.loss, self._grads_from(res, params, l2)
        if self.algorithm == "reptile":
            # Reptile has no meta-loss of its own; .loss is the query loss after adaptation.
            res = reptile_grad(params["theta"], batch, inner_lr=lr, inner_steps=K, l2=l2, n_threads=self.n_threads)
            return res.loss, {"theta": np.asarray(res.grad, dtype=np.float64)}
        if self.algorithm == "imaml":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = imaml_value_and_grad(params["theta"], batch, mu=float(self.imaml_mu), l2=l2,
                                           n_threads=self.n_threads)
            self._last_extra = {"imaml_converged": res.converged,
                                "imaml_inner_residual": float(res.inner_residual.max())}
            return res.loss, {"theta": np.asarray(res.grad, dtype=np.float64)}
        if _policy.LR_INTERCEPT in params:
            z = _policy.standardise(
                _policy.task_descriptors(batch, self.hyper_policy.descriptor, n_classes=self.n_classes_,
                                         length=self._policy_mean.size),
                self._policy_mean, self._policy_scale)
            loss, grad_theta, grads, stats = _policy.policy_value_and_grad(
                params["theta"], batch, self._policy_params(), z, inner_steps=K, l2=float(self.l2),
                first_order=self.algorithm == "fomaml", n_threads=self.n_threads)
            if self.learn_init:
                grads["theta"] = grad_theta
            if self.n_iter_ < self._policy_warmup_end():
                # warm-up: the slopes keep their zero gradient (and zero Adam moments) until it ends
                for key in (_policy.LR_SLOPE, _policy.L2_SLOPE):
                    if key in grads:
                        grads[key] = np.zeros_like(grads[key])
            self._last_extra = stats
            return loss, grads
        if "U" in params:
            res = precond_value_and_grad(
                params["theta"], batch, log_scale=params["log_scale"], U=params["U"], inner_steps=K, l2=l2,
                first_order=self.algorithm == "fomaml", n_threads=self.n_threads,
            )
            grads = {"log_scale": np.asarray(res.grad_log_scale, dtype=np.float64),
                     "U": np.asarray(res.grad_U, dtype=np.float64)}
            if self.learn_init:
                grads["theta"] = np.asarray(res.grad, dtype=np.float64)
            if "log_l2" in params:
                grads["log_l2"] = np.asarray(res.grad_l2 * l2)
            return res.loss, grads
        res = meta_value_and_grad(
            params["theta"], batch, inner_lr=lr, inner_steps=K, l2=l2,
            first_order=self.algorithm == "fomaml", n_threads=self.n_threads,
        )
        return res.loss, self._grads_from(res, params, l2)

    def _grads_from(self, res, params, l2):
        grads = {}
        if self.learn_init:
            grads["theta"] = np.asarray(res.grad, dtype=np.float64)
        if "log_inner_lr" in params:
            grads["log_inner_lr"] = np.asarray(res.grad_inner_lr, dtype=np.float64) * np.exp(params["log_inner_lr"])
        if "log_l2" in params:
            grads["log_l2"] = np.asarray(res.grad_l2 * l2)
        return grads

    def _make_bar(self, total, initial):
        show = self.progress
        if show == "auto":
            show = sys.stderr.isatty()
        if not show:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=initial, desc="meta-training", unit="it", leave=False, mininterval=0.5)

    def _block_end(self, val_tasks, bar) -> int:
        """The iteration a compiled block runs up to: the next callback, validation, checkpoint or bar update."""
        i, end = self.n_iter_, self.n_iterations
        if self.callbacks:
            return i + 1  # callbacks run after every iteration
        if val_tasks is not None:
            end = min(end, (i // self.validate_every + 1) * self.validate_every)
        if self.checkpoint_path:
            end = min(end, (i // self.checkpoint_every + 1) * self.checkpoint_every)
        if bar is not None:
            end = min(end, i + max(1, self.n_iterations // 100))
        return end

    def _run(self, tasks, val_tasks, K):
        bar = self._make_bar(self.n_iterations, self.n_iter_)
        stop = False
        if val_tasks is not None and self.n_iter_ == 0 and not self.history_:
            # iteration 0 = the untrained start: "stop before training" is a choice validation can make
            scores = self.evaluate(val_tasks)
            record = {"iteration": 0, "val_accuracy": scores["accuracy"], "val_loss": scores["loss"]}
            self._track_best(record)
            self.history_.append(record)
        # the policy runs on the Python loop: the compiled loop has no descriptors (docs/design.md)
        loop = (_TrainingLoop(self, tasks, K) if self.algorithm in ("maml", "fomaml") and self.hyper_policy is None
                else None)
        try:
            with _Interrupt() as interrupt:
                while self.n_iter_ < self.n_iterations and not stop:
                    if loop is not None:
                        # MAML / first-order MAML: a block of iterations in one compiled call
                        records = loop.run(self._block_end(val_tasks, bar), interrupt)
                    else:
                        records = [self._python_iteration(tasks, K)]
                    if not records:
                        break
                    record = records[-1]
                    if val_tasks is not None and (
                        self.n_iter_ % self.validate_every == 0 or self.n_iter_ == self.n_iterations
                    ):
                        t0 = time.perf_counter()
                        seconds = record.pop("seconds")
                        scores = self.evaluate(val_tasks)
                        record["val_accuracy"] = scores["accuracy"]
                        record["val_loss"] = scores["loss"]
                        self._track_best(record)
                        record["seconds"] = seconds + time.perf_counter() - t0
                    self.history_.extend(records)
                    if bar is not None:
                        bar.update(len(records))
                        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)  # redraws follow tqdm's mininterval
                    for cb in self.callbacks:
                        if cb(self, record):
                            stop = True
                    if self.checkpoint_path and self.n_iter_ % self.checkpoint_every == 0:
                        self._write_checkpoint(self.checkpoint_path)
                    if interrupt.flag:
                        self.interrupted_ = True
                        stop = True
        finally:
            if bar is not None:
                bar.close()
        if self.checkpoint_path:
            self._write_checkpoint(self.checkpoint_path)
        if self.interrupted_:
            warnings.warn(
                f"meta-training interrupted after {self.n_iter_} iterations; the model holds the parameters "
                "of the last complete iteration" + (" and a checkpoint was written" if self.checkpoint_path else ""),
                RuntimeWarning,
                stacklevel=3,
            )
        if self.select != "final" and self._best is not None:
            self._final_params = {k: v.copy() for k, v in self._params.items()}
            self._params = {k: v.copy() for k, v in self._best[2].items()}
            self.best_iteration_ = self._best[1]

    def _python_iteration(self, tasks, K) -> dict:
        """One iteration of Reptile, iMAML or a gradient source (the loop the compiled one does not cover)."""
        t0 = time.perf_counter()
        batch = self._draw(tasks)
        loss, grads = self._gradients(batch, K)
        self._opt.step(self._params, grads)
        self.n_iter_ += 1
        record = {"iteration": self.n_iter_, "loss": float(loss), "meta_lr": self._opt.current_lr()}
        lr = self._lr_value(self._params)
        record["inner_lr_mean"] = float(np.mean(lr))
        record["l2"] = self._l2_value(self._params)
        record.update(getattr(self, "_last_extra", {}))  # the policy's: means over the batch's tasks
        record["seconds"] = time.perf_counter() - t0
        return record

    def _track_best(self, record):
        if self.select == "final":
            return
        score = record["val_accuracy"] if self.select == "best_accuracy" else -record["val_loss"]
        if self._best is None or score > self._best[0]:
            self._best = (score, record["iteration"], {k: v.copy() for k, v in self._params.items()})

    def _warn_step_size(self, tasks, n_probe=8, n_power=30):
        """Warn when inner_lr * lambda_max(H) > 2 on a few tasks (power iteration on HVPs)."""
        if _is_gradient_source(tasks):
            return  # its data lives elsewhere; the source may warn itself
        if isinstance(tasks, Tasks):
            probe = tasks
        else:
            state = tasks.get_state()
            probe = tasks.sample(min(n_probe, self.meta_batch_size))
            tasks.set_state(state)  # probing must not shift the training stream
        lam_max = self.largest_curvature(probe, n_power=n_power)
        lr_max = float(np.max(self._lr_value(self._params)))
        if lr_max * lam_max > 2.0:
            warnings.warn(
                f"inner_lr={lr_max:.3g} times the largest support-loss Hessian eigenvalue {lam_max:.3g} is "
                f"{lr_max * lam_max:.3g} > 2: the inner loop overshoots and meta-training becomes unstable; "
                f"use inner_lr < {2.0 / lam_max:.3g}",
                StepSizeWarning,
                stacklevel=3,
            )

    def largest_curvature(self, tasks: Tasks, n_power: int = 30) -> float:
        """Largest eigenvalue of the support-loss Hessian at theta, max over tasks (power iteration)."""
        theta = self._params["theta"] if hasattr(self, "_params") else np.zeros(tasks.n_features + 1)
        l2 = self._l2_value(self._params) if hasattr(self, "_params") else float(self.l2)
        T = min(tasks.n_tasks, 64)
        sub = tasks if T == tasks.n_tasks else _first_tasks(tasks, T)
        params = np.broadcast_to(theta, (sub.n_tasks,) + theta.shape).copy()
        rng = np.random.default_rng(0)
        v = rng.standard_normal(params.shape).reshape(sub.n_tasks, -1)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        lam = np.zeros(sub.n_tasks)
        for _ in range(n_power):
            hv = hessian_vector_product(params, sub, None, v.reshape(params.shape), l2=l2, n_threads=self.n_threads)
            hv = np.asarray(hv, dtype=np.float64).reshape(sub.n_tasks, -1)
            if not np.isfinite(hv).all():
                # finite features whose squares overflow (|x| ~ 1e155 and beyond): no step size is stable
                raise ValueError("support_X: the features are too large for a step size to be meaningful "
                                 "(the curvature of the support loss overflows); rescale them, e.g. to [0, 1]")
            lam = np.einsum("ij,ij->i", v, hv)
            with np.errstate(over="ignore"):
                norm = np.linalg.norm(hv, axis=1, keepdims=True)
            if not np.isfinite(norm).all():
                raise ValueError("support_X: the features are too large for a step size to be meaningful "
                                 "(the curvature of the support loss overflows); rescale them, e.g. to [0, 1]")
            norm[norm == 0] = 1.0
            v = hv / norm
        return float(lam.max())

    # ------------------------------------------------------------- adaptation
    def adapt(self, X, y, *, inner_steps=None):
        """Adapt the meta-learned start to one task's labelled examples.

        Parameters
        ----------
        X : array_like of shape (n, n_features)
        y : array_like of shape (n,)
            Labels of any sortable kind (numbers, strings), no NaN: exactly
            two distinct labels for a binary model (the larger is the
            positive class), exactly ``n_classes_`` for a multinomial one
            (sorted, the i-th smallest is class i).
        inner_steps : int, optional
            Defaults to the meta-training inner_steps.

        Returns
        -------
        LogisticModel
            With a ``hyper_policy`` it also reports what the policy chose for
            this task: ``inner_lr_`` (ndarray of shape (inner_steps,)),
            ``l2_`` (float) and ``descriptor_`` (the raw descriptor, ndarray
            of shape (n_descriptor,)).

        Raises
        ------
        ValueError
            Naming ``y``: a NaN label, or a number of distinct labels other
            than the model's number of classes (a task of one class has no
            decision to adapt).
        TypeError
            Naming ``y``: labels that cannot be compared with each other.
        """
        self._check_fitted()
        Xa, codes, classes = self._task_codes(X, y)
        K = self.inner_steps if inner_steps is None else check_int(inner_steps, "inner_steps")
        if self._has_policy:
            self._check_policy_steps(K)
            hyper = self._one_task_hyper(Xa, codes)
            side = _Side(Xa[None], None, np.array([0, Xa.shape[0]], dtype=np.int64), codes)
            phi = _policy.adapt_per_task(self._params["theta"], side, hyper["inner_lr"][None], hyper["l2"],
                                         inner_steps=K, n_threads=self.n_threads)[0]
            model = LogisticModel(phi, classes)
            model.inner_lr_ = hyper["inner_lr"]
            model.l2_ = hyper["l2"]
            model.descriptor_ = hyper["descriptor"]
            return model
        phi = self._adapt_batch(Xa, codes, K)
        return LogisticModel(phi, classes)

    def _check_policy_steps(self, K: int):
        steps = self._params[_policy.LR_INTERCEPT].size
        if K != steps:
            raise ValueError(f"inner_steps: the hyper_policy learned one step size per step for {steps} steps; "
                             f"got inner_steps={K}")

    def _task_codes(self, X, y) -> tuple:
        """(X (n, d), class codes int32 (n,), classes) of one task, checked against the model."""
        Xa = as_feature_array(X, "X", ndim=2)
        if Xa.shape[1] != self.n_features_in_:
            raise ValueError(f"X: expected {self.n_features_in_} features, got {Xa.shape[1]}")
        y = np.asarray(y)
        if y.shape != (Xa.shape[0],):
            raise ValueError(f"y: expected shape ({Xa.shape[0]},), got {y.shape}")
        C = max(2, getattr(self, "n_classes_", 2))
        classes = _distinct_labels(y)
        if classes.size != C:
            shown = ", ".join(repr(c) for c in classes[:8].tolist()) + (", ..." if classes.size > 8 else "")
            raise ValueError(
                f"y: the model has {C} classes, so y needs exactly {C} distinct labels, got {classes.size} ({shown})"
            )
        codes = np.searchsorted(classes, y).astype(np.int32)
        return Xa, codes, classes

    def _adapt_batch(self, X, y, K, **kw):
        params = self._params
        if self._has_policy:  # X is a Tasks (adapt handles one task itself)
            self._check_policy_steps(K)
            self._check_tasks(X)
            _, alpha, lam = self._task_hyper(X)
            return _policy.adapt_per_task(params["theta"], X.support, alpha, lam, inner_steps=K, **kw)
        l2 = self._l2_value(params)
        if "U" in params:
            return adapt_preconditioned(params["theta"], X, y, log_scale=params["log_scale"], U=params["U"],
                                        inner_steps=K, l2=l2, **kw)
        return _adapt(params["theta"], X, y, inner_lr=self.inner_lr_for(K), inner_steps=K, l2=l2, **kw)

    def inner_lr_for(self, inner_steps: int):
        """The learned (or fixed) inner step size, as :func:`fastmaml.adapt` takes it for ``inner_steps`` steps.

        Parameters
        ----------
        inner_steps : int
            Steps of the adaptation. A per-step schedule fixes it to the
            number of steps it was learned for.

        Returns
        -------
        float or ndarray
            A float for a scalar step size, else an array broadcast by the
            rule of :func:`fastmaml.meta_value_and_grad`. With the learned
            preconditioner this is the diagonal of P (the preconditioner
            itself is applied by :meth:`adapt` / :meth:`adapt_tasks`).

        Raises
        ------
        ValueError
            If the step size is per step and ``inner_steps`` differs from its
            number of steps.
        """
        self._check_fitted()
        K = check_int(inner_steps, "inner_steps")
        lr = self._lr_value(self._params)
        if np.ndim(lr) == self._params["theta"].ndim + 1 and lr.shape[0] != K:
            raise ValueError(
                f"inner_steps: the learned inner_lr has one row per step ({lr.shape[0]} steps); got {K}"
            )
        return float(lr) if np.ndim(lr) == 0 else lr

    def adapt_tasks(self, tasks: Tasks, *, inner_steps=None, return_path: bool = False) -> np.ndarray:
        """Adapt the meta-learned start to every task's support set, in one call of the core.

        Parameters
        ----------
        tasks : Tasks
        inner_steps : int, optional
            Defaults to the meta-training ``inner_steps``.
        return_path : bool, default=False
            Return every iterate phi_0 .. phi_K instead of phi_K alone.

        Returns
        -------
        ndarray of shape (n_tasks, *theta_.shape), or (n_tasks, inner_steps + 1, *theta_.shape) with ``return_path``
            Per-task parameters, bias last (score them with
            :func:`fastmaml.evaluation.query_scores`). With a
            ``hyper_policy`` each task adapts with its own step sizes and
            L2 (:meth:`task_hyperparameters`).

        Raises
        ------
        fastmaml.DivergenceError
            If an inner loop produces a non-finite value.
        """
        self._check_fitted()
        K = self.inner_steps if inner_steps is None else check_int(inner_steps, "inner_steps")
        return self._adapt_batch(tasks, None, K, n_threads=self.n_threads, return_path=bool(return_path))

    def evaluate(self, tasks, *, n_episodes=600, inner_steps=None) -> dict:
        """Adapt on each task's support set and score on its query set.

        Parameters
        ----------
        tasks : Tasks or sampler
            A sampler is drawn from once (``n_episodes`` tasks). With a
            ``hyper_policy`` each task adapts with its own step sizes and L2.

        Returns
        -------
        dict
            ``accuracy`` (mean), ``accuracy_ci95`` (half-width), ``loss`` (mean
            query log-loss), ``per_task_accuracy`` (ndarray).
        """
        if not isinstance(tasks, Tasks):
            if not hasattr(tasks, "sample"):
                raise TypeError(f"tasks: expected a Tasks or a sampler, got {type(tasks).__name__}")
            tasks = tasks.sample(check_int(n_episodes, "n_episodes", minimum=1))
        phi = self.adapt_tasks(tasks, inner_steps=inner_steps)
        scores = query_scores(phi, tasks)
        acc, ci = mean_ci(scores["accuracy"])
        return {
            "accuracy": acc,
            "accuracy_ci95": ci,
            "loss": float(scores["loss"].mean()),
            "per_task_accuracy": scores["accuracy"],
        }

    # ------------------------------------------------------------ persistence
    def _state_arrays(self) -> dict:
        arrays = {f"param.{k}": v for k, v in self._params.items()}
        arrays["fixed_inner_lr"] = np.asarray(self._fixed_lr, dtype=np.float64)
        if self._has_policy:
            arrays["policy_mean"] = self._policy_mean
            arrays["policy_scale"] = self._policy_scale
        if self._best is not None:
            arrays.update({f"best.{k}": v for k, v in self._best[2].items()})
        if getattr(self, "_final_params", None) is not None:
            arrays.update({f"final.{k}": v for k, v in self._final_params.items()})
        return arrays

    def _meta(self) -> dict:
        from . import __version__

        self._check_policy_state()  # else the file would not load (its arrays would disagree with its config)
        return {
            "fastmaml_version": __version__,
            "config": self._config(),
            "n_features": int(self.n_features_in_),
            "n_classes": int(getattr(self, "n_classes_", 2)),
            "n_iter": int(self.n_iter_),
            "interrupted": bool(self.interrupted_),
            "history": self.history_,
            "best": None if self._best is None else [self._best[0], self._best[1]],
            "best_iteration": getattr(self, "best_iteration_", None),
        } | ({"n_descriptor": int(self._policy_mean.size)} if self._has_policy else {})

    def save(self, path) -> None:
        """Save the fitted model (plain NumPy arrays + JSON; atomic write)."""
        self._check_fitted()
        _checkpoint.write(path, self._state_arrays(), dict(self._meta(), kind="model"))

    def _write_checkpoint(self, path):
        # the history goes to an append-only sidecar: a write costs the same at every iteration
        log = getattr(self, "_history_log", None)
        fresh = (log is None or log.records is not self.history_ or log.count > len(self.history_)
                 or log.checkpoint_path != os.fspath(path))
        if fresh:
            log = self._history_log = _checkpoint.HistoryLog(path, self.history_)
        arrays = self._state_arrays()
        arrays.update(self._opt.state_arrays())
        meta = dict(self._meta(), kind="checkpoint", opt_t=self._opt.t)
        meta["history"] = log.flush()
        meta["sampler_state"] = self._sampler_state
        if getattr(self, "_val_state", None) is not None:
            meta["val_sampler_state"] = self._val_state
        _checkpoint.write(path, arrays, meta)
        if fresh:  # only now is the previous run's sidecar referenced by no checkpoint
            _checkpoint.remove_stale_sidecars(path, keep=log.name)

    @property
    def _sampler_state(self):
        src = getattr(self, "_train_source", None)
        return None if src is None or isinstance(src, Tasks) else src.get_state()

    def _restore(self, path, tasks):
        arrays, meta = _checkpoint.read(path)
        if meta.get("kind") != "checkpoint":
            raise _checkpoint.CheckpointError(f"path: {path!r} is a saved model, not a training checkpoint")
        cfg = meta.get("config")
        if not isinstance(cfg, dict):
            raise _checkpoint.CheckpointError(f"path: {path!r}: metadata has no configuration")
        mine = self._config()
        # n_iterations sets the cosine schedule and the policy's warm-up: only without both may it change
        warmup = self.hyper_policy is not None and float(self.hyper_policy.warmup) > 0
        free = set(_RESUME_FREE) | ({"n_iterations"} if self.lr_schedule is None and not warmup else set())
        differ = [key for key in sorted(set(cfg) | set(mine)) if key not in free and cfg.get(key) != mine.get(key)]
        if differ:
            raise ValueError(
                f"resume: the checkpoint {path!r} was written with other settings; a resumed run must use the "
                "same ones (only " + ", ".join(sorted(free)) + " may change): "
                + "; ".join(f"{key}={cfg.get(key, '<unset>')!r} in the checkpoint, {mine.get(key, '<unset>')!r} "
                            "in this model" for key in differ)
            )
        self._check_file(arrays, meta, path)
        n_features = _n_features(tasks)
        if n_features != meta["n_features"]:
            raise ValueError(
                f"tasks: the checkpoint {path!r} was trained on {meta['n_features']} features, got {n_features}"
            )
        n_classes = meta.get("n_classes") or 2
        if _n_classes(tasks) != n_classes:
            raise ValueError(
                f"tasks: the checkpoint {path!r} was trained with {n_classes} classes, got {_n_classes(tasks)}"
            )
        if meta.get("sampler_state") is not None and not isinstance(tasks, Tasks):
            # the state's format is the sampler's own (a Dask source keeps more than a bit generator)
            try:
                tasks.set_state(meta["sampler_state"])
            except Exception as exc:  # noqa: BLE001 - whatever the sampler rejects, the file is at fault
                raise _checkpoint.CheckpointError(
                    f"path: {path!r}: the sampler rejects the saved sampler_state ({type(exc).__name__}: {exc})"
                ) from None
        self._load_arrays(arrays, meta, path)
        opt_cls = Adam if self.meta_optimizer == "adam" else SGD
        self._opt = opt_cls(lr=self.meta_lr, schedule=self.lr_schedule, total_steps=self.n_iterations)
        self._opt.load_state(arrays, meta.get("opt_t", 0))
        self._resume_meta = meta
        self.interrupted_ = False

    def _param_shapes(self, n_features: int, n_classes: int, n_descriptor: int = 0) -> dict:
        """Shape of every entry of ``self._params`` for this configuration (no allocation)."""
        D = n_features + 1
        theta = (D,) if n_classes <= 2 else (D, n_classes)
        shapes = {"theta": theta}
        K = int(self.inner_steps)
        mode = self.learn_inner_lr
        if mode == "preconditioner":
            shapes["log_scale"] = (D,)
            shapes["U"] = (D, int(self.precond_rank))
        elif mode:
            ones = (1,) * len(theta)
            shapes["log_inner_lr"] = {"scalar": (), "per_step": (K,) + ones, "per_parameter": theta,
                                      "per_step_parameter": (K,) + theta}[mode]
        if self.learn_l2:
            shapes["log_l2"] = ()
        if self.hyper_policy is not None:
            shapes[_policy.LR_INTERCEPT] = (K,)
            shapes[_policy.LR_SLOPE] = (n_descriptor,)
            if self.hyper_policy.learn_l2:
                shapes[_policy.L2_INTERCEPT] = ()
                shapes[_policy.L2_SLOPE] = (n_descriptor,)
        return shapes

    def _check_file(self, arrays: dict, meta: dict, path) -> None:
        """Every array's name, shape and dtype and every metadata field against the configuration.

        Raises CheckpointError naming ``path`` and the first fault. Run before
        anything of the model is replaced.
        """
        def fail(what):
            raise _checkpoint.CheckpointError(f"path: {path!r}: {what}")

        def integer(key, lo, hi, optional=False, nullable=False):
            value = meta.get(key)
            if (optional and key not in meta) or (nullable and value is None):
                return None
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                fail(f"metadata {key}={value!r} is not an integer in [{lo}, {hi}]")
            return value

        if meta.get("kind") not in ("model", "checkpoint"):
            fail(f"metadata kind={meta.get('kind')!r} is neither 'model' nor 'checkpoint'")
        n_features = integer("n_features", 1, 2**31 - 2)
        n_classes = integer("n_classes", 2, 2**31 - 1, optional=True) or 2
        integer("n_iter", 0, 2**62, optional=True)
        integer("opt_t", 0, 2**62, optional=True)
        integer("best_iteration", 0, 2**62, optional=True, nullable=True)
        if not isinstance(meta.get("interrupted", False), bool):
            fail("metadata interrupted is not a boolean")
        best = meta.get("best")
        if best is not None and not (isinstance(best, list) and len(best) == 2
                                     and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in best)):
            fail(f"metadata best={best!r} is not [score, iteration]")
        history = meta.get("history", [])
        if isinstance(history, list):
            if not all(isinstance(r, dict) for r in history):
                fail("metadata history holds a record that is not an object")
        elif not (meta.get("kind") == "checkpoint" and isinstance(history, dict)):
            fail("metadata history is neither a list of records nor a sidecar description")
        n_descriptor = integer("n_descriptor", 1, 2**31 - 1) if self.hyper_policy is not None else 0
        shapes = self._param_shapes(n_features, n_classes, n_descriptor)
        want = {f"param.{k}": v for k, v in shapes.items()}
        want["fixed_inner_lr"] = np.shape(np.asarray(self.inner_lr, dtype=np.float64))
        if self.hyper_policy is not None:
            want["policy_mean"] = want["policy_scale"] = (n_descriptor,)
        for prefix in ("best.", "final."):
            present = [name for name in arrays if name.startswith(prefix)]
            if present:
                want.update({f"{prefix}{k}": v for k, v in shapes.items()})
        if (best is not None) != any(name.startswith("best.") for name in arrays):
            fail("metadata best and the best.* arrays disagree")
        optimizer_keys = {k for k in shapes}
        if self.meta_optimizer == "adam":
            for name in arrays:
                for prefix in ("opt.m.", "opt.v."):
                    if name.startswith(prefix) and name[len(prefix):] in optimizer_keys:
                        key = name[len(prefix):]
                        want["opt.m." + key] = want["opt.v." + key] = shapes[key]
        unexpected = sorted(set(arrays) - set(want))
        if unexpected:
            fail(f"unexpected array(s) {', '.join(map(repr, unexpected[:8]))} for this configuration")
        for name, shape in want.items():
            if name not in arrays:
                fail(f"array {name!r} is missing")
            arr = arrays[name]
            if arr.dtype != np.float64 or arr.shape != tuple(shape):
                fail(f"array {name!r} has shape {arr.shape} and dtype {arr.dtype}; the metadata "
                     f"(n_features={n_features}, n_classes={n_classes} and the configuration) needs shape "
                     f"{tuple(shape)} of float64")
            if not np.isfinite(arr).all():
                fail(f"array {name!r} contains NaN or infinity")
            if name.startswith("opt.v.") and (arr < 0).any():
                fail(f"array {name!r} (second moments) contains negative values")
            if name == "policy_scale" and (arr <= 0).any():
                fail(f"array {name!r} (the descriptor's standard deviations) contains values <= 0")

    def _load_arrays(self, arrays, meta, path="<model>"):
        self._check_file(arrays, meta, path)
        history = meta.get("history", [])
        log = None
        if isinstance(history, dict):
            history, log = _checkpoint.read_history(path, history)
        self.n_features_in_ = int(meta["n_features"])
        self.n_classes_ = int(meta.get("n_classes", 2))
        self._params = {k[6:]: np.array(v, dtype=np.float64) for k, v in arrays.items() if k.startswith("param.")}
        self._fixed_lr = np.array(arrays["fixed_inner_lr"], dtype=np.float64)
        if "policy_mean" in arrays:
            self._policy_mean = np.array(arrays["policy_mean"], dtype=np.float64)
            self._policy_scale = np.array(arrays["policy_scale"], dtype=np.float64)
        self._last_extra = {}
        best = {k[5:]: np.array(v) for k, v in arrays.items() if k.startswith("best.")}
        self._best = None if not best or meta.get("best") is None else (meta["best"][0], meta["best"][1], best)
        final = {k[6:]: np.array(v) for k, v in arrays.items() if k.startswith("final.")}
        self._final_params = final or None
        if meta.get("best_iteration") is not None:
            self.best_iteration_ = meta["best_iteration"]
        self.history_ = list(history)
        if log is not None:
            log.records = self.history_  # a resumed run appends to the same sidecar
        self._history_log = log
        self.n_iter_ = int(meta.get("n_iter", 0))
        self.interrupted_ = bool(meta.get("interrupted", False))

    @classmethod
    def load(cls, path, *, descriptor=None) -> "MAML":
        """Load a model written by :meth:`save` (or a training checkpoint).

        Parameters
        ----------
        path : str or path-like
        descriptor : callable, optional
            The custom descriptor of a model saved with
            ``HyperPolicy(descriptor=f)``: the file records only its name, so
            ``f`` must be passed again (and only then).

        Raises
        ------
        ValueError
            Naming ``descriptor``: the model needs its custom descriptor and
            none was given, or one was given for a model without one.
        FileNotFoundError
            If ``path`` does not exist.
        fastmaml.CheckpointError
            Naming the file and the fault, for any file that is not a valid
            model or checkpoint: corrupt, truncated, foreign, too new, an
            array whose shape or dtype disagrees with the metadata, invalid
            metadata, or a checkpoint whose history sidecar is missing.
        """
        arrays, meta = _checkpoint.read(path)
        cfg = meta.get("config", {})
        if not isinstance(cfg, dict):
            raise _checkpoint.CheckpointError(f"path: {path!r}: metadata config is not an object")
        cfg = dict(cfg)
        saved_policy = cfg.pop("hyper_policy", None)
        if saved_policy is None:
            if descriptor is not None:
                raise ValueError(f"descriptor: the model {path!r} has no hyper_policy; pass descriptor only for a "
                                 "model saved with a custom descriptor")
        else:
            if not (isinstance(saved_policy, dict) and isinstance(saved_policy.get("descriptor"), str)
                    and isinstance(saved_policy.get("custom"), bool)
                    and isinstance(saved_policy.get("learn_l2"), bool)
                    and isinstance(saved_policy.get("warmup", 0.5), numbers.Real)
                    and not isinstance(saved_policy.get("warmup", 0.5), bool)):
                raise _checkpoint.CheckpointError(f"path: {path!r}: metadata hyper_policy={saved_policy!r} is not "
                                                  "a saved policy")
            cfg["hyper_policy"] = HyperPolicy._from_config(saved_policy, descriptor, path)
        try:
            inner_lr = cfg.pop("inner_lr", 0.1)
            model = cls(**cfg, inner_lr=inner_lr if np.ndim(inner_lr) else float(inner_lr))
            model._validate_config()
        except (TypeError, KeyError, ValueError, OverflowError) as exc:
            raise _checkpoint.CheckpointError(f"path: {path!r} holds an unreadable model ({exc})") from exc
        model._load_arrays(arrays, meta, path)
        opt_cls = Adam if model.meta_optimizer == "adam" else SGD
        model._opt = opt_cls(lr=model.meta_lr, schedule=model.lr_schedule, total_steps=model.n_iterations)
        model._opt.load_state(arrays, meta.get("opt_t", 0))
        return model

    def __repr__(self) -> str:
        """Like scikit-learn: the parameters that differ from their defaults."""
        shown = [f"{p.name}={getattr(self, p.name)!r}" for p in _PARAMS if not _same(getattr(self, p.name), p.default)]
        return f"MAML({', '.join(shown)})"


if MAML.__doc__:  # None under python -OO
    MAML.__doc__ = MAML.__doc__.replace("{parameters}", _params_doc())


def _distinct_labels(y: np.ndarray) -> np.ndarray:
    """Sorted distinct labels of ``y``; NaN and labels that cannot be ordered are errors naming ``y``."""
    if y.dtype.kind in "fc" and not np.isfinite(y).all():
        raise ValueError("y: contains NaN or infinity; every example needs a label")
    if y.dtype.kind == "O":
        for value in y:
            if value is None or (isinstance(value, numbers.Real) and not math.isfinite(value)):
                raise ValueError(f"y: contains the label {value!r}; every example needs a label")
    if y.dtype.kind not in "biufcUSO":
        raise TypeError(f"y: expected numbers or strings as labels, got dtype {y.dtype}")
    try:
        return np.unique(y)
    except TypeError as exc:
        raise TypeError(f"y: labels must be comparable with each other ({exc})") from None


def _is_gradient_source(obj) -> bool:
    return not isinstance(obj, Tasks) and callable(getattr(obj, "meta_value_and_grad", None))


def _n_classes(source) -> int:
    """Classes of a Tasks or sampler: 2 means the binary (sigmoid) model."""
    if hasattr(source, "n_way"):
        return int(source.n_way)
    if hasattr(source, "n_classes"):
        return int(source.n_classes)
    if isinstance(source, Tasks):
        tasks = source
    else:
        state = source.get_state()
        tasks = source.sample(1)
        source.set_state(state)
    return max(2, int(max(tasks.support.y.max(), tasks.query.y.max())) + 1)


def _n_features(source) -> int:
    """Feature count of a Tasks or a sampler (drawing one task if the sampler does not say)."""
    if isinstance(source, Tasks) or hasattr(source, "n_features"):
        return int(source.n_features)
    state = source.get_state()
    probe = source.sample(1)
    source.set_state(state)
    return int(probe.n_features)


def _first_tasks(tasks: Tasks, count: int) -> Tasks:
    """The first `count` tasks of a batch, as dense copies (small: used for probing)."""
    parts = [tasks.task(t) for t in range(count)]
    sizes_s = {p[0].shape[0] for p in parts}
    sizes_q = {p[2].shape[0] for p in parts}
    if len(sizes_s) == 1 and len(sizes_q) == 1:
        return Tasks(*(np.stack([p[i] for p in parts]) for i in range(4)))
    X = np.concatenate([np.concatenate([p[0], p[2]]) for p in parts])
    s_idx, q_idx, s_ptr, q_ptr, off = [], [], [0], [0], 0
    for p in parts:
        n, m = p[0].shape[0], p[2].shape[0]
        s_idx.append(np.arange(off, off + n))
        q_idx.append(np.arange(off + n, off + n + m))
        off += n + m
        s_ptr.append(s_ptr[-1] + n)
        q_ptr.append(q_ptr[-1] + m)
    return Tasks.from_index(
        X, np.concatenate(s_idx), np.concatenate([p[1] for p in parts]), np.concatenate(q_idx),
        np.concatenate([p[3] for p in parts]), support_ptr=s_ptr, query_ptr=q_ptr,
    )


# The compiled training loop draws EpisodeSampler / GroupedSampler batches
# itself; False makes fit draw every batch in Python and hand it to the same
# compiled step (the tests compare both).
_COMPILED_DRAWS = True


def _lr_extent(lr_shape: tuple, theta_shape: tuple) -> tuple:
    """The (steps, rows, classes) extents of an inner_lr array broadcast against (K, *theta.shape)."""
    full_ndim = 1 + len(theta_shape)
    padded = (1,) * (full_ndim - len(lr_shape)) + tuple(lr_shape)
    return tuple(int(e) for e in (padded if len(padded) == 3 else padded + (1,)))


class _TrainingLoop:
    """Runs MAML / first-order MAML meta-iterations through ``_core.train_block`` (csrc/fastmaml/train.hpp).

    Every iteration -- draw, log-hyperparameter transforms, meta-gradient,
    optimizer step -- is compiled and runs with the GIL released; a block comes
    back to Python for validation, checkpoints, callbacks, the progress bar and
    Ctrl-C. EpisodeSampler (without ``pairs``), GroupedSampler (with
    ``meta_batch_size <= n_groups``) and Tasks pools are drawn in the compiled
    loop; any other sampler is drawn in Python, one iteration per call, and the
    batch goes through the same compiled step.
    """

    def __init__(self, model, tasks, K: int):
        from .samplers import EpisodeSampler, GroupedSampler

        self.model, self.tasks, self.K = model, tasks, int(K)
        self.kind = "python"
        if _is_gradient_source(tasks):
            self.kind = "source"
        elif isinstance(tasks, Tasks):
            self.kind = "tasks"
        elif _COMPILED_DRAWS and isinstance(tasks, EpisodeSampler) and tasks.pairs is None and (
            type(tasks).sample is EpisodeSampler.sample
        ):
            self.kind = "episode"
        elif _COMPILED_DRAWS and isinstance(tasks, GroupedSampler) and (
            type(tasks).sample is GroupedSampler.sample and type(tasks)._build is GroupedSampler._build
            and model.meta_batch_size <= tasks.n_groups
        ):
            self.kind = "grouped"

    def _source(self) -> dict:
        tasks, B = self.tasks, int(self.model.meta_batch_size)
        if self.kind == "tasks":
            return dict(support=tasks.support.core(), query=tasks.query.core(), kernel=tasks.kernel)
        if self.kind == "episode":
            self.last = np.zeros(B * tasks.n_way, dtype=np.int64)
            return dict(batch_size=B, last_draw=self.last, episode=(
                tasks.X, tasks._flat, tasks._start, tasks.class_counts, tasks.n_way, tasks.k_shot, tasks.n_query,
                tasks.random_labels, tasks.kernel))
        if self.kind == "grouped":
            self.last = np.zeros(B, dtype=np.int64)
            return dict(batch_size=B, last_draw=self.last, grouped=(
                tasks.X, tasks.y, tasks._order, tasks._start, tasks.group_sizes, tasks.support_sizes,
                tasks.query_sizes))
        batch = tasks.sample(B)  # any other sampler: drawn in Python, one iteration per call
        return dict(support=batch.support.core(), query=batch.query.core(), kernel=batch.kernel)

    def run(self, end: int, interrupt) -> list:
        """Iterations up to ``end`` (fewer on Ctrl-C or error); returns their history records."""
        model, opt = self.model, self.model._opt
        params = model._params
        for key in params:
            params[key] = np.asarray(params[key], dtype=np.float64, order="C")  # keeps 0-d arrays 0-d
        learned = [k for k in params if k != "theta" or model.learn_init]
        if opt._adam:
            opt.moments(params, learned)
        theta = params["theta"]
        if "log_inner_lr" in params:
            extent = _lr_extent(params["log_inner_lr"].shape, theta.shape)
            fixed = np.zeros(0)
        else:
            fixed = np.asarray(model._fixed_lr, dtype=np.float64, order="C")
            if "log_scale" not in params:
                _prepare_inner_lr(fixed, self.K, theta.shape, np.float64)  # the named error for a bad shape
            extent = _lr_extent(fixed.shape, theta.shape) if "log_scale" not in params else (1, 1, 1)
        if self.kind == "source":
            return [self._source_iteration(extent, fixed)]
        source = self._source()
        n = end - model.n_iter_ if self.kind != "python" else 1
        records = np.zeros((n, 5))
        progress = np.array([0, opt.t], dtype=np.int64)
        rng = getattr(self.tasks, "_rng", None) if self.kind in ("episode", "grouped") else None

        def call(**kw):
            return _core.train_block(
                params, opt.m, opt.v, fixed_lr=fixed, lr_extent=extent, l2=float(model.l2),
                learn_init=bool(model.learn_init), n_classes=1 if theta.ndim == 1 else int(theta.shape[1]),
                inner_steps=self.K, mode=_core.Mode.first_order if model.algorithm == "fomaml" else _core.Mode.maml,
                optimizer=opt.config(), t=opt.t, n_iterations=n, records=records, progress=progress,
                n_threads=check_threads(model.n_threads), should_stop=lambda: interrupt.flag, **source, **kw)

        try:
            if rng is not None:
                # The block draws from a private copy of the sampler's bit generator and writes its
                # state back afterwards: the sampler's own lock is held only for the two copies, so a
                # process forked meanwhile (or another thread) never finds it held for a whole block.
                bitgen = rng.bit_generator
                with bitgen.lock:
                    private = type(bitgen)()
                    private.state = bitgen.state
                try:
                    with private.lock:
                        call(bit_generator=private.capsule)
                finally:
                    with bitgen.lock:
                        bitgen.state = private.state
            else:
                call()
        except BaseException:
            # an error (DivergenceError) or a second Ctrl-C: the finished iterations still count
            model.history_.extend(self._finish(records, progress))
            raise
        return self._finish(records, progress)

    def _source_iteration(self, extent, fixed) -> dict:
        """One iteration with a task source that computes the meta-gradient itself (e.g. on a Dask cluster).

        The step sizes it gets and the step taken from its gradient are the
        compiled loop's own (``_core.step_sizes``, ``_core.apply_step``).
        """
        model, opt, K = self.model, self.model._opt, self.K
        params = model._params
        if "U" in params:
            raise ValueError(
                "tasks: a distributed task source supports algorithm 'maml' / 'fomaml' with a fixed or "
                "learned step size (not reptile, imaml or the preconditioner)"
            )
        t0 = time.perf_counter()
        theta = params["theta"]
        common = dict(fixed_lr=fixed, lr_extent=extent, l2=float(model.l2),
                      n_classes=1 if theta.ndim == 1 else int(theta.shape[1]), inner_steps=K)
        flat, l2 = _core.step_sizes(params, **common)
        shape = params["log_inner_lr"].shape if "log_inner_lr" in params else fixed.shape
        lr = float(flat[0]) if len(shape) == 0 else flat.reshape(shape)
        res = self.tasks.meta_value_and_grad(theta, inner_lr=lr, inner_steps=K, l2=l2,
                                             first_order=model.algorithm == "fomaml", iteration=model.n_iter_)
        hyper = np.asarray(res.grad_inner_lr, dtype=np.float64).reshape(-1)
        t, loss, meta_lr, lr_mean, l2_now = _core.apply_step(
            params, opt.m, opt.v, learn_init=bool(model.learn_init), optimizer=opt.config(), t=opt.t,
            loss=float(res.loss), grad=np.asarray(res.grad, dtype=np.float64).reshape(-1), hyper=hyper,
            grad_l2=float(res.grad_l2), **common)
        opt.t = int(t)
        model.n_iter_ += 1
        return {"iteration": model.n_iter_, "loss": loss, "meta_lr": meta_lr, "inner_lr_mean": lr_mean, "l2": l2_now,
                "seconds": time.perf_counter() - t0}

    def _finish(self, records, progress) -> list:
        """Book the iterations a block finished: step count, sampler attributes, history records."""
        model = self.model
        done = int(progress[0])
        model._opt.t = int(progress[1])
        if done and self.kind == "episode":
            self.tasks.episode_classes = self.tasks.classes[self.last.reshape(-1, self.tasks.n_way)]
        elif done and self.kind == "grouped":
            self.tasks.task_groups = self.tasks.groups[self.last]
        out = []
        for row in records[:done]:
            model.n_iter_ += 1
            out.append({"iteration": model.n_iter_, "loss": float(row[0]), "meta_lr": float(row[1]),
                        "inner_lr_mean": float(row[2]), "l2": float(row[3]), "seconds": float(row[4])})
        return out
