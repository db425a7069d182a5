"""Scores, confidence intervals, paired comparisons and baselines, for your own tasks.

Everything here works on :class:`fastmaml.Tasks` (support sets to adapt on,
query sets to score) through the public API, so a meta-learned start can be
judged on any task family against what a user would otherwise do:

Scores
    :func:`accuracy` and :func:`log_loss` of logits; :func:`query_logits` and
    :func:`query_scores` of per-task parameters on the query sets;
    :func:`adaptation_accuracy` adapts a start (a ``theta`` or a fitted
    :class:`fastmaml.MAML`) on every support set and scores it, after the last
    step or after every step.
Statistics
    :func:`mean_ci` (a normal 95% confidence interval of a mean, or with
    ``groups`` one that treats groups of tasks -- e.g. the episodes of one
    pair of classes -- as the independent units) and
    :func:`paired_difference` (the same for per-task differences of two
    methods scored on the same tasks -- the comparison to report);
    :func:`select_candidate` (keep the simplest method unless another is
    clearly better on validation tasks).
Baselines
    the zero start or any fixed start with the step size chosen on
    validation tasks (:func:`choose_inner_lr`); a jointly pre-trained start
    (:func:`pretrained_start`); per-task scikit-learn ``LogisticRegression``
    with C chosen by cross-validation on the support set
    (:func:`grid_search_logistic_regression`, :func:`choose_C_on_validation`);
    random search over the inner step size, L2 strength and number of steps
    (:func:`random_search`).

Tie-breaking is deterministic everywhere: the first value of a grid wins.
scikit-learn is needed only by the grid-search baseline.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np

from .functional import DivergenceError, adapt
from ._links import row_correct, row_log_loss
from ._random import RandomState, check_random_state
from ._tasks import Tasks

__all__ = [
    "accuracy",
    "log_loss",
    "query_logits",
    "query_scores",
    "adaptation_accuracy",
    "mean_ci",
    "paired_difference",
    "select_candidate",
    "choose_inner_lr",
    "pretrained_start",
    "GridSearchResult",
    "grid_search_logistic_regression",
    "choose_C_on_validation",
    "RandomSearchResult",
    "random_search",
]

Z95 = 1.96  # two-sided 95% quantile of the normal distribution, as used by every interval over tasks here

# two-sided 95% quantiles of Student's t with 1..30 degrees of freedom: an interval over a few groups
# (digit pairs) must widen with how few there are, and numpy has no t quantile
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


# --------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------


def _logits_and_labels(logits, y) -> Tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(y)
    if z.ndim not in (1, 2):
        raise ValueError(f"logits: expected shape (n,) or (n, C), got {z.shape}")
    if labels.shape != z.shape[:1]:
        raise ValueError(f"y: expected shape ({z.shape[0]},) to match logits {z.shape}, got {labels.shape}")
    if labels.dtype.kind not in "biu":
        raise TypeError(f"y: expected integer labels, got dtype {labels.dtype}")
    C = 2 if z.ndim == 1 else z.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= C):
        raise ValueError(f"y: expected labels in [0, {C}), got values from {labels.min()} to {labels.max()}")
    return z, labels


def accuracy(logits, y) -> float:
    """Fraction of rows whose most probable class is their label.

    Parameters
    ----------
    logits : array_like of shape (n,) or (n, n_classes)
        Binary logits (P(y = 1) = sigmoid(z); class 1 is predicted when
        ``z > 0``) or multinomial logits.
    y : array_like of int, shape (n,)
        Labels 0/1, or in ``[0, n_classes)``.

    Returns
    -------
    float
    """
    z, labels = _logits_and_labels(logits, y)
    return float(np.mean(row_correct(z, labels)))


def log_loss(logits, y) -> float:
    """Mean negative log-likelihood (natural log) of the labels under the logits.

    Parameters
    ----------
    logits : array_like of shape (n,) or (n, n_classes)
    y : array_like of int, shape (n,)

    Returns
    -------
    float
        ``mean(softplus(z) - y z)`` (binary) or ``mean(logsumexp(z) - z[y])``,
        computed stably for any logit magnitude.
    """
    z, labels = _logits_and_labels(logits, y)
    return float(np.mean(row_log_loss(z, labels)))


def query_logits(params, tasks: Tasks) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of every query row under its task's parameters (in float64).

    Parameters
    ----------
    params : array_like of shape (n_tasks, n_features + 1) or (n_tasks, n_features + 1, n_classes)
        Per-task parameters, bias last (as returned by :func:`fastmaml.adapt`).
    tasks : Tasks

    Returns
    -------
    logits : ndarray of shape (total_query,) (binary) or (total_query, n_classes)
    y : ndarray of shape (total_query,)
        The query labels.
    ptr : ndarray of shape (n_tasks + 1,)
        Task t's query rows are ``ptr[t]:ptr[t + 1]``.
    """
    q = tasks.query
    d = tasks.n_features
    flat = q.X.reshape(-1, d)
    rows = flat[q.idx] if q.idx is not None else flat
    owner = np.repeat(np.arange(tasks.n_tasks), np.diff(q.ptr))
    params = np.asarray(params, dtype=np.float64)
    if params.ndim == 2:
        z = np.einsum("ij,ij->i", rows, params[owner, :-1], dtype=np.float64) + params[owner, -1]
    else:
        z = np.einsum("ij,ijc->ic", rows, params[owner, :-1], dtype=np.float64) + params[owner, -1]
    return z, q.y, q.ptr


def query_scores(params, tasks: Tasks) -> dict:
    """Per-task query accuracy and log-loss of per-task parameters (binary or multinomial).

    Parameters
    ----------
    params : array_like of shape (n_tasks, n_features + 1) or (n_tasks, n_features + 1, n_classes)
    tasks : Tasks

    Returns
    -------
    dict
        ``accuracy`` and ``loss`` (mean negative log-likelihood), each an
        ndarray of shape (n_tasks,): one number per task, every task weighted
        alike whatever its query size.
    """
    z, y, ptr = query_logits(params, tasks)
    correct = row_correct(z, y)
    nll = row_log_loss(z, y)
    counts = np.diff(ptr).astype(np.float64)
    starts = ptr[:-1]
    return {
        "accuracy": np.add.reduceat(correct, starts) / counts,
        "loss": np.add.reduceat(nll, starts) / counts,
    }


def adaptation_accuracy(start, tasks: Tasks, *, inner_lr=None, inner_steps=None, l2: float = 0.0,
                        return_path: bool = False, n_threads: Optional[int] = None) -> np.ndarray:
    """Query accuracy of every task after adapting a start on its support set.

    Parameters
    ----------
    start : array_like or MAML
        Either ``theta`` (shape (n_features + 1,) or (n_features + 1, n_classes))
        adapted by :func:`fastmaml.adapt` with ``inner_lr``, ``inner_steps``
        and ``l2``, or a fitted :class:`fastmaml.MAML`, adapted with what it
        learned (:meth:`fastmaml.MAML.adapt_tasks`; ``inner_lr`` and ``l2``
        must then be None / 0).
    tasks : Tasks
    inner_lr : float or array_like, optional
        Required with a ``theta``.
    inner_steps : int, optional
        Required with a ``theta``; defaults to the model's with a MAML.
    l2 : float, default=0.0
    return_path : bool, default=False
        Score after every step 0..inner_steps instead of after the last.
    n_threads : int or None

    Returns
    -------
    ndarray of shape (n_tasks,), or (inner_steps + 1, n_tasks) with ``return_path``
        Per-task query accuracy. An inner loop that diverges (a step size far
        too large) scores 0 for every task: a step size that blows up is a bad
        choice, not an error, when choosing among candidates.
    """
    is_model = hasattr(start, "adapt_tasks")
    if is_model:
        if inner_lr is not None or l2 != 0.0:
            raise ValueError("inner_lr, l2: a fitted MAML adapts with what it learned; leave them unset")
        K = int(start.inner_steps if inner_steps is None else inner_steps)
    else:
        if inner_lr is None or inner_steps is None:
            raise ValueError("inner_lr, inner_steps: required to adapt a theta")
        K = int(inner_steps)
    try:
        if is_model:
            phi = start.adapt_tasks(tasks, inner_steps=K, return_path=return_path)
        else:
            phi = adapt(start, tasks, inner_lr=inner_lr, inner_steps=K, l2=l2, return_path=return_path,
                        n_threads=n_threads)
    except DivergenceError:
        return np.zeros((K + 1, tasks.n_tasks)) if return_path else np.zeros(tasks.n_tasks)
    if not return_path:
        return query_scores(phi, tasks)["accuracy"]
    return np.stack([query_scores(phi[:, j], tasks)["accuracy"] for j in range(K + 1)])


# --------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------


def _t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t distribution with ``df`` degrees of freedom.

    Tabulated for 1..30 (to 3 decimals); beyond, the Cornish-Fisher expansion
    around :data:`Z95` (within 1e-3 of the exact quantile).
    """
    df = int(df)
    if df < 1:
        raise ValueError(f"df: expected at least 1 degree of freedom, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = Z95
    return float(z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2))


def _group_ids(groups, n: int) -> np.ndarray:
    """Integer ids 0..G-1 of a per-task group label array (any labels; rows of a 2-d array are labels)."""
    try:
        g = np.asarray(groups)
    except ValueError:  # ragged rows (labels of different lengths)
        raise ValueError("groups: expected one label per task, or rows of labels all of one length "
                         "(an array of shape (n,) or (n, k)); got rows of different lengths") from None
    if g.shape[:1] != (n,) or g.ndim not in (1, 2):
        raise ValueError(f"groups: expected one label per task, shape ({n},) or ({n}, k), got {g.shape}")
    try:
        return np.unique(g, axis=0, return_inverse=True)[1].reshape(-1)
    except TypeError:  # labels numpy cannot sort (None, mixed objects): name the argument
        raise TypeError(f"groups: expected labels that can be sorted (numbers or strings, one kind), got "
                        f"dtype {g.dtype} holding e.g. {g.reshape(-1)[0]!r}") from None


def mean_ci(values, groups=None) -> Tuple[float, float]:
    """Mean and half-width of a 95% confidence interval of the mean.

    Parameters
    ----------
    values : array_like of shape (n,)
        Per-task numbers (accuracies, say).
    groups : array_like of shape (n,) or (n, k), optional
        A label per task (a row per task for a 2-d array, e.g. the pair of
        classes of an episode). Without it the tasks are the independent units.
        With it the *groups* are: tasks of one group may share a cause (the
        same two digits are easy or hard for a method), so the interval is the
        cluster-robust one, ``t(G - 1) * sqrt(G / (G - 1) * sum_g S_g**2) / n``
        with G groups, ``S_g`` the sum of ``values - mean`` over group g and
        ``t(G - 1)`` the 95% quantile of Student's t. It is as wide as the
        spread *between* groups says, and NaN (nothing can be
        claimed) with a single group, however many tasks it holds.

    Returns
    -------
    mean : float
    half_width : float
        Without groups ``1.96 * std(values, ddof=1) / sqrt(n)``; NaN when n < 2
        (or, with groups, fewer than 2 groups).
    """
    values = np.asarray(values, dtype=np.float64)
    if groups is not None:
        if values.ndim != 1:
            raise ValueError(f"values: expected a 1-d array with groups, got shape {values.shape}")
        ids = _group_ids(groups, values.size)
        G = int(ids.max()) + 1 if ids.size else 0
        if G < 2:
            return float(values.mean()) if values.size else float("nan"), float("nan")
        mean = float(values.mean())
        sums = np.bincount(ids, weights=values - mean, minlength=G)
        var = G / (G - 1) * float(np.sum(sums ** 2)) / values.size ** 2
        return mean, float(_t95(G - 1) * np.sqrt(var))
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(Z95 * values.std(ddof=1) / np.sqrt(values.size))


def paired_difference(a, b, *, groups=None) -> dict:
    """Mean per-task difference of two methods scored on the same tasks, with its 95% interval.

    Pairing removes the task-to-task variation both methods share, so the
    interval is far narrower than the difference of two separate intervals.

    Parameters
    ----------
    a, b : array_like of shape (n_tasks,)
        Per-task scores of two methods, task t in both at position t.
    groups : array_like of shape (n_tasks,) or (n_tasks, k), optional
        Group label of every task (e.g. its pair of classes): the interval is
        then over groups, not tasks (see :func:`mean_ci`).

    Returns
    -------
    dict
        ``mean`` (of ``a - b``) and ``ci95`` (half-width, see :func:`mean_ci`):
        ``a`` is better with 95% confidence when ``mean - ci95 > 0``. With
        ``groups``, also ``n_groups``.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a, b: expected two 1-d arrays of the same length (one score per task), "
                         f"got shapes {a.shape} and {b.shape}")
    if groups is None:
        mean, ci = mean_ci(a - b)
        return {"mean": mean, "ci95": ci}
    mean, ci = mean_ci(a - b, groups)
    return {"mean": mean, "ci95": ci, "n_groups": int(_group_ids(groups, a.size).max()) + 1 if a.size else 0}


def select_candidate(scores: dict, order: Sequence[str], *, groups=None) -> Tuple[str, dict]:
    """The simplest candidate that no other beats clearly on the same validation tasks.

    Choosing the best validation mean among many candidates picks noise as
    often as skill when the differences are small: the winner's validation
    score is biased up, and the choice can lose to the simplest candidate on
    new tasks. This rule keeps the simplest candidate unless another beats it
    by more than the 95% interval of their paired difference
    (:func:`paired_difference` ``mean - ci95 > 0``): it returns the first
    candidate of ``order`` that no other candidate beats clearly. One always
    exists (nothing beats the candidate with the highest mean).

    When the validation tasks come in groups that may favour one method as a
    whole (episodes of the same pair of held-out classes), the question is
    whether a method wins on *new groups*, and the episodes of one group are
    not independent evidence of that: give ``groups`` and the interval is over
    groups (:func:`mean_ci`). A win on one or two groups then cannot pass, and
    with a single group no candidate beats the simplest.

    Parameters
    ----------
    scores : dict of str -> array_like of shape (n_tasks,)
        Per-task validation scores (accuracy, higher is better) of every
        candidate, task t at position t for all of them.
    order : sequence of str
        The candidates from simplest to most complex (keys of ``scores``;
        candidates not listed are not considered).
    groups : array_like of shape (n_tasks,) or (n_tasks, k), optional
        Group label of every validation task (the same for every candidate).

    Returns
    -------
    name : str
        The chosen candidate.
    details : dict
        ``beaten_by``: for each candidate, the candidates that beat it
        clearly; ``mean``: its mean validation score; with ``groups``, also
        ``n_groups``.
    """
    order = list(order)
    if not order:
        raise ValueError("order: expected at least one candidate")
    missing = [n for n in order if n not in scores]
    if missing:
        raise ValueError(f"order: candidates {missing} have no scores (scores has {sorted(scores)})")
    arrays = {n: np.asarray(scores[n], dtype=np.float64) for n in order}
    beaten_by = {}
    for n in order:
        beaten_by[n] = []
        for other in order:
            if other == n:
                continue
            d = paired_difference(arrays[other], arrays[n], groups=groups)
            if d["mean"] - d["ci95"] > 0:  # False when the interval is NaN: nothing is claimed
                beaten_by[n].append(other)
    chosen = next(n for n in order if not beaten_by[n])
    details = {"beaten_by": beaten_by, "mean": {n: float(a.mean()) for n, a in arrays.items()}}
    if groups is not None:
        details["n_groups"] = int(_group_ids(groups, arrays[order[0]].size).max()) + 1
    return chosen, details


# --------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------


def choose_inner_lr(start, val_sets: Sequence[Tasks], lr_grid: Sequence[float], *, inner_steps: int,
                    l2: float = 0.0, n_threads: Optional[int] = None) -> Tuple[float, dict]:
    """The inner step size of a fixed start that scores best on validation tasks.

    With ``start = 0`` this is the zero-start baseline: plain gradient descent
    from zero, with only its step size tuned.

    Parameters
    ----------
    start : array_like or sequence of array_like
        One ``theta`` for every validation set, or one per validation set
        (``len(val_sets)`` of them: e.g. a start trained per fold).
    val_sets : sequence of Tasks
        Validation tasks (from classes or groups the start was not trained on).
    lr_grid : sequence of float
        Candidate step sizes.
    inner_steps : int
    l2 : float, default=0.0
    n_threads : int or None

    Returns
    -------
    best_lr : float
        The first step size of the grid with the highest accuracy.
    accuracy : dict
        Mean query accuracy over all validation tasks, per step size.
    """
    val_sets = list(val_sets)
    if isinstance(start, (list, tuple)):
        if len(start) != len(val_sets):
            raise ValueError(f"start: expected one theta per validation set ({len(val_sets)}), got {len(start)}")
        starts = list(start)
    else:
        starts = [start] * len(val_sets)
    scores = {}
    for lr in lr_grid:
        per_task = [adaptation_accuracy(theta, val, inner_lr=lr, inner_steps=inner_steps, l2=l2, n_threads=n_threads)
                    for theta, val in zip(starts, val_sets)]
        scores[lr] = float(np.mean(np.concatenate(per_task)))
    best = max(scores, key=scores.get)
    return best, scores


def pretrained_start(tasks, *, n_iterations: int = 1000, meta_lr: float = 1e-3, meta_batch_size: int = 32,
                     n_threads: Optional[int] = None, **params) -> np.ndarray:
    """A start trained jointly on all training tasks: one model fit to every episode.

    This is MAML with no inner step (``inner_steps=0``): the meta-loss is then
    the query loss of ``theta`` itself, so meta-training is ordinary training
    on the pooled tasks.

    Parameters
    ----------
    tasks : sampler or Tasks
        Training tasks, as for :meth:`fastmaml.MAML.fit`.
    n_iterations, meta_lr, meta_batch_size, n_threads
        As for :class:`fastmaml.MAML`.
    **params
        Further :class:`fastmaml.MAML` parameters (not ``inner_steps``).

    Returns
    -------
    ndarray of shape (n_features + 1,) or (n_features + 1, n_classes)
        The trained ``theta``, to adapt from with a step size chosen by
        :func:`choose_inner_lr`.
    """
    from .estimator import MAML

    if "inner_steps" in params:
        raise TypeError("pretrained_start: inner_steps is 0 by definition")
    model = MAML(inner_steps=0, meta_lr=meta_lr, meta_batch_size=meta_batch_size, n_iterations=n_iterations,
                 n_threads=n_threads, **dict({"progress": False}, **params))
    model.fit(tasks)
    return model.theta_


@dataclasses.dataclass
class GridSearchResult:
    """Per-task scores of :func:`grid_search_logistic_regression`.

    Attributes
    ----------
    accuracy : ndarray of shape (n_tasks,)
        Query accuracy with the chosen C.
    oracle_accuracy : ndarray of shape (n_tasks,)
        Query accuracy with the best C *on the query set itself*: an upper
        bound, not a method.
    C : ndarray of shape (n_tasks,)
        The chosen C of each task.
    seconds_per_task : float
        Wall time of the whole search per task.
    """

    accuracy: np.ndarray
    oracle_accuracy: np.ndarray
    C: np.ndarray
    seconds_per_task: float


def _sklearn():
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold
    except ImportError as exc:
        raise ImportError("the grid-search baseline needs scikit-learn: pip install scikit-learn") from exc
    return LogisticRegression, ConvergenceWarning, StratifiedKFold


def _c_path_accuracy(Xs, ys, Xe, ye, c_grid, LogisticRegression) -> np.ndarray:
    """Accuracy on (Xe, ye) of LogisticRegression fitted on (Xs, ys) for every C (warm-started path)."""
    out = np.empty(len(c_grid))
    if np.unique(ys).size < 2:
        majority = ys[0]
        out[:] = np.mean(ye == majority)
        return out
    clf = LogisticRegression(C=c_grid[0], warm_start=True, max_iter=300)
    for i, C in enumerate(c_grid):
        clf.set_params(C=C)
        clf.fit(Xs, ys)
        out[i] = np.mean(clf.predict(Xe) == ye)
    return out


def grid_search_logistic_regression(tasks: Tasks, c_grid: Sequence[float], *, fixed_C: Optional[float] = None,
                                    cv_folds: int = 5, random_state: int = 0,
                                    fallback_C: Optional[float] = None) -> GridSearchResult:
    """Per task, scikit-learn ``LogisticRegression`` on the support set with C chosen by grid search.

    C is chosen by stratified ``cv_folds``-fold cross-validation on the task's
    support set (ties: the smallest C, the most regularised). With too few
    rows of a class for two folds no split exists: then C is ``fallback_C``
    (e.g. from :func:`choose_C_on_validation`), else the middle of the grid.
    A support set with one class predicts that class.

    Parameters
    ----------
    tasks : Tasks
    c_grid : sequence of float
        Candidate inverse L2 strengths (sorted here).
    fixed_C : float, optional
        Skip the search and use this C (a value of ``c_grid``) for every task.
    cv_folds : int, default=5
    random_state : int, default=0
        Task t shuffles its folds with seed ``random_state + t``.
    fallback_C : float, optional

    Returns
    -------
    GridSearchResult
    """
    LogisticRegression, ConvergenceWarning, StratifiedKFold = _sklearn()
    c_grid = tuple(sorted(c_grid))
    if fixed_C is not None and fixed_C not in c_grid:
        raise ValueError(f"fixed_C: expected a value of c_grid {c_grid}, got {fixed_C!r}")
    acc = np.empty(tasks.n_tasks)
    oracle = np.empty(tasks.n_tasks)
    chosen = np.empty(tasks.n_tasks)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for t in range(tasks.n_tasks):
            Xs, ys, Xq, yq = tasks.task(t)
            on_query = _c_path_accuracy(Xs, ys, Xq, yq, c_grid, LogisticRegression)
            oracle[t] = on_query.max()
            if fixed_C is not None:
                best = c_grid.index(fixed_C)
            else:
                k = int(min(cv_folds, np.bincount(ys, minlength=int(ys.max()) + 1).min()))
                if k < 2:  # a class with one example: no stratified split exists
                    best = c_grid.index(fallback_C) if fallback_C in c_grid else len(c_grid) // 2
                    chosen[t] = c_grid[best]
                    acc[t] = on_query[best]
                    continue
                cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=random_state + t)
                scores = np.zeros(len(c_grid))
                for tr, te in cv.split(Xs, ys):
                    scores += _c_path_accuracy(Xs[tr], ys[tr], Xs[te], ys[te], c_grid, LogisticRegression)
                best = int(np.argmax(scores))  # ties: the smallest C (most regularised)
            chosen[t] = c_grid[best]
            acc[t] = on_query[best]
    seconds = (time.perf_counter() - t0) / tasks.n_tasks
    return GridSearchResult(accuracy=acc, oracle_accuracy=oracle, C=chosen, seconds_per_task=seconds)


def choose_C_on_validation(val_sets: Sequence[Tasks], c_grid: Sequence[float]) -> Tuple[float, np.ndarray]:
    """The one C of ``LogisticRegression`` that scores best on validation tasks' query sets.

    For support sets too small to cross-validate (one example per class).

    Parameters
    ----------
    val_sets : sequence of Tasks
    c_grid : sequence of float

    Returns
    -------
    C : float
        The first (smallest) C with the highest mean accuracy.
    accuracy : ndarray of shape (len(c_grid),)
        Mean query accuracy per C, in sorted-grid order.
    """
    LogisticRegression, ConvergenceWarning, _ = _sklearn()
    c_grid = tuple(sorted(c_grid))
    total = np.zeros(len(c_grid))
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for tasks in val_sets:
            for t in range(tasks.n_tasks):
                Xs, ys, Xq, yq = tasks.task(t)
                total += _c_path_accuracy(Xs, ys, Xq, yq, c_grid, LogisticRegression)
                count += 1
    return c_grid[int(np.argmax(total))], total / max(count, 1)


@dataclasses.dataclass
class RandomSearchResult:
    """The best configuration found by :func:`random_search`.

    Attributes
    ----------
    accuracy : float
        Its mean query accuracy over the validation tasks.
    inner_lr, l2 : float
    inner_steps : int
    configs_tried : int
    spent : int
        Budget used, in inner steps times validation tasks.
    """

    accuracy: float
    inner_lr: float
    l2: float
    inner_steps: int
    configs_tried: int
    spent: int


def random_search(start, val_sets: Sequence[Tasks], *, budget: float, max_configs: int,
                  inner_steps_range: Tuple[int, int], log10_lr_range: Tuple[float, float] = (-3, 1),
                  log10_l2_range: Tuple[float, float] = (-5, 0), l2_probability: float = 0.5,
                  random_state: RandomState = None, n_threads: Optional[int] = None) -> RandomSearchResult:
    """Random search over the inner step size, L2 strength and number of steps of a fixed start.

    Each configuration draws, in this order, ``inner_lr = 10**u`` with ``u``
    uniform on ``log10_lr_range``; with probability ``l2_probability`` an
    ``l2 = 10**v``, ``v`` uniform on ``log10_l2_range``, else ``l2 = 0``; and
    ``inner_steps`` uniform on the inclusive ``inner_steps_range``. It is
    scored by :func:`adaptation_accuracy` on every validation task. The
    search stops once the budget is spent or ``max_configs`` were tried.

    Parameters
    ----------
    start : array_like
        The ``theta`` to adapt from (e.g. zeros).
    val_sets : sequence of Tasks
    budget : float
        In inner steps times validation tasks: a configuration with K steps
        costs K times the number of validation tasks. Compare with the cost
        of meta-training (iterations x meta-batch size x inner steps x 2 for
        the reverse sweep) for an equal-compute comparison.
    max_configs : int
    inner_steps_range : (int, int)
    log10_lr_range, log10_l2_range : (float, float)
    l2_probability : float, default=0.5
    random_state : None, int or numpy.random.Generator
    n_threads : int or None

    Returns
    -------
    RandomSearchResult
        The first configuration with the highest validation accuracy.
    """
    rng = check_random_state(random_state)
    val_sets = list(val_sets)
    n_val = sum(v.n_tasks for v in val_sets)
    lo_steps, hi_steps = (int(s) for s in inner_steps_range)
    best, spent, tried = None, 0, 0
    while spent < budget and tried < max_configs:
        lr = float(10 ** rng.uniform(*log10_lr_range))
        l2 = float(10 ** rng.uniform(*log10_l2_range)) if rng.random() < l2_probability else 0.0
        steps = int(rng.integers(lo_steps, hi_steps + 1))
        acc = float(np.mean(np.concatenate([
            adaptation_accuracy(start, v, inner_lr=lr, inner_steps=steps, l2=l2, n_threads=n_threads)
            for v in val_sets
        ])))
        spent += n_val * steps
        tried += 1
        if best is None or acc > best[0]:
            best = (acc, lr, l2, steps)
    if best is None:
        raise ValueError("budget, max_configs: no configuration was tried; give a positive budget and max_configs")
    return RandomSearchResult(accuracy=best[0], inner_lr=best[1], l2=best[2], inner_steps=best[3],
                              configs_tried=tried, spent=spent)

