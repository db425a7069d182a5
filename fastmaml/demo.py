"""The digit-pair experiment: does meta-learning beat what a user would otherwise do?

Meta-train on binary tasks made of pairs of digits that exclude a held-out
pair (2 vs 3 by default), then adapt to the held-out pair from K examples per
class and compare, on the same test episodes, with:

* a zero start with the same number of steps (step size chosen on meta-validation);
* a jointly pre-trained start (one model trained on all meta-training episodes);
* per-task scikit-learn ``LogisticRegression`` with C chosen by cross-validated
  grid search on the support set (at K = 1 no split holds both classes, so C
  comes from meta-validation, and the table says so);
* a random search over the inner hyperparameters (step size, L2, steps) on
  meta-validation with the same compute budget as meta-training;
* the grid search with C chosen on the query set: an *oracle* upper bound, not a method.

The meta-learners are MAML (fixed step), MAML (learned step and L2), Meta-SGD,
a learned preconditioner and, when the build has it, the per-task
hyperparameter policy (``MAML(hyper_policy=HyperPolicy())``). Validation keeps
the simplest candidate -- the zero start, then the policy -- unless another
beats it by more than the paired 95% interval on the validation folds
(:func:`fastmaml.evaluation.select_candidate`; ``selection="best-mean"`` is the
former highest-mean rule). That interval is over the *pairs of validation
digits*, not over episodes: whether a meta-learner helps depends on which two
digits a task holds (at K = 1, validated on the single pair 2 vs 4, the learned
preconditioner gained 7 to 15 points over the zero start), and the test pair is
a new pair. The selection scores come from fresh episodes of the validation
digits, not the ones that chose the step sizes and the stopping iterations, so
no candidate's score is the maximum of the very numbers it is judged on.

:func:`run_ragged` is the other question: on the ragged family
(:func:`fastmaml.datasets.make_ragged_family`, support sizes 2..200 per class,
per-group label noise) does the per-task policy beat one global meta-learned
setting, per-task grid search and random search, and how much of the gap to a
per-task oracle does it close, by support-size bucket.

The baselines and statistics come from :mod:`fastmaml.evaluation`, the plots
from :mod:`fastmaml.plots`; ``fastmaml demo`` runs this module.

Every choice (step size, when to stop, which meta-learner, C at K = 1) is made
on meta-validation episodes built from digits the meta-training of that fold
never saw (leave-digits-out folds over the meta-training digits, then a refit
on all of them); the test pair is used only for the final numbers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
import warnings
from typing import Callable, Optional, Tuple

import numpy as np

# The demo is a client of the public API: everything it uses, a user can use.
import fastmaml as _fastmaml
from . import MAML, DivergenceError, EpisodeSampler, GroupedSampler, Tasks, adapt, make_grouped_tasks, split_groups
from .datasets import RAGGED_BUCKETS, load_digits_dataset, make_ragged_family
from .evaluation import (
    adaptation_accuracy,
    choose_C_on_validation,
    choose_inner_lr,
    grid_search_logistic_regression,
    mean_ci,
    paired_difference,
    query_scores,
    random_search,
    select_candidate,
)

LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)

ZERO = "zero init"
PRETRAINED = "pretrained init"
MAML_FIXED = "MAML (fixed lr)"
MAML_LEARNED = "MAML (learned lr, L2)"
METASGD = "Meta-SGD (per-param lr)"
RANDOM = "random search (lr, L2, steps)"
GRID = "grid-search LR (C by CV)"
GRID_K1 = "grid-search LR (C from meta-val)"
ORACLE = "oracle: LR, C chosen on query"
PRECOND = "Preconditioned (diag + rank-4)"
POLICY = "per-task policy (step, L2)"
META_LEARNERS = (MAML_FIXED, MAML_LEARNED, METASGD, PRECOND)


def _have_policy() -> bool:
    """The per-task hyperparameter policy (fastmaml.HyperPolicy) is in this build."""
    return hasattr(_fastmaml, "HyperPolicy")


def meta_learners() -> tuple:
    """The meta-learners the digit demo trains: today's four and, when available, the per-task policy."""
    return META_LEARNERS + ((POLICY,) if _have_policy() else ())


def selection_order() -> tuple:
    """Candidates of the selection rule, simplest first: the zero start, the per-task policy, then the
    meta-learners with more learned hyperparameters (see :func:`fastmaml.evaluation.select_candidate`)."""
    return (ZERO,) + ((POLICY,) if _have_policy() else ()) + META_LEARNERS


@dataclasses.dataclass
class DemoConfig:
    """Settings of the digit-pair experiment (see ``fastmaml demo --help``)."""

    holdout: tuple = (2, 3)
    n_way: int = 2
    shots: tuple = (1, 5, 10)
    n_query: int = 15
    test_episodes: int = 600
    val_episodes: int = 200
    inner_steps: int = 5
    meta_batch_size: int = 32
    n_iterations: int = 500
    validate_every: int = 50
    meta_lr: float = 0.01
    val_folds: int = 2  # leave-digits-out folds; the selection rule needs validation pairs from >= 2 folds
    random_configs_cap: int = 400
    seed: int = 0
    data: str = "default"
    n_threads: Optional[int] = None
    progress: bool = True
    c_grid: tuple = C_GRID
    lr_grid: tuple = LR_GRID
    selection: str = "simplest"  # or "best-mean" (the rule before issue 15)

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        # sized for at most 30 s on a quiet 2-core machine (the per-task grid search dominates). Two folds, as
        # in the full run: one fold holds out two digits, a single validation pair, on which the selection
        # rule (an interval over validation pairs) can show nothing, and what it showed before the interval
        # was over pairs was that pair's quirks (issue 15: the preconditioner chosen on 2 vs 4 for five test pairs)
        base = dict(shots=(1, 5), test_episodes=60, val_episodes=40, n_iterations=60, validate_every=20,
                    val_folds=2, random_configs_cap=12, c_grid=(0.1, 1.0, 10.0))
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------ helpers
class _Log:
    """A tqdm bar over work units when tqdm is installed (and wanted), else one log line per stage."""

    def __init__(self, fn: Optional[Callable[[str], None]], progress: bool, total: int,
                 desc: str = "fastmaml demo", unit: str = "stage"):
        self.fn = fn
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
            except ImportError:
                self.bar = None

    def __call__(self, msg: str):
        if self.bar is not None:
            self.bar.set_postfix_str(msg[:60])
        elif self.fn is not None:
            self.fn(msg)

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _have_sklearn() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def _time_adaptation(method: dict, tasks: Tasks, n_threads=None, repeats=3) -> float:
    """Seconds per task of the adaptation alone (best of a few batched runs)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            if "model" in method:
                method["model"].adapt_tasks(tasks, inner_steps=method["steps"])
            else:
                adapt(method["theta"], tasks, inner_lr=method["inner_lr"], inner_steps=method["steps"],
                      l2=method["l2"], n_threads=n_threads)
        except DivergenceError:
            pass
        best = min(best, time.perf_counter() - t0)
    return best / tasks.n_tasks


def _fit(model, sampler, validation=None):
    """Fit quietly, but never let an interrupted fit (Ctrl-C) pass for a finished one."""
    with warnings.catch_warnings():
        # the step-size warning is for interactive users; the demo chose the step on validation
        warnings.simplefilter("ignore")
        model.fit(sampler, validation=validation)
    if model.interrupted_:
        # MAML.fit turns Ctrl-C into a clean stop; a table from a half-trained model would differ silently
        raise KeyboardInterrupt(f"meta-training interrupted after {model.n_iter_} of {model.n_iterations} iterations")
    return model


def _train(config, K_inner, sampler, n_iterations, validation=None, **kw):
    model = MAML(inner_steps=K_inner, meta_lr=config.meta_lr, meta_batch_size=config.meta_batch_size,
                 n_iterations=n_iterations, validate_every=config.validate_every, n_threads=config.n_threads,
                 progress=False, **kw)
    return _fit(model, sampler, validation)


def _pretrain(config, sampler, inner_lr):
    # what fastmaml.evaluation.pretrained_start computes (MAML with no inner step), keeping the model
    # so that an interruption is seen
    model = MAML(inner_steps=0, meta_lr=config.meta_lr, meta_batch_size=config.meta_batch_size,
                 n_iterations=config.n_iterations, n_threads=config.n_threads, progress=False, inner_lr=inner_lr)
    return _fit(model, sampler).theta_


# ------------------------------------------------------- one K, step by step
@dataclasses.dataclass
class _Shot:
    """Everything one K of the protocol works with (the same for every method)."""

    K: int  # support examples per class
    K_inner: int  # adaptation steps
    config: DemoConfig
    test_tasks: Tasks
    folds: list  # (meta-training sampler, validation Tasks) per fold
    val_sets: list  # the validation Tasks of the folds
    refit_sampler: object  # all meta-training classes/groups
    seeds: list
    log: _Log
    # fresh episodes of each fold's validation classes that only the selection rule scores (the val_sets
    # chose step sizes and stopping iterations: scoring the choice on them would favour whoever chose most),
    # and the group (pair of validation classes) of each of their episodes, folds concatenated; None: the
    # selection scores the val_sets and the interval is over episodes (the grouped family)
    sel_sets: Optional[list] = None
    sel_groups: Optional[np.ndarray] = None

    @property
    def n_threads(self):
        return self.config.n_threads

    def zero(self) -> np.ndarray:
        D = self.test_tasks.n_features + 1
        n_way = int(self.config.n_way)
        return np.zeros(D) if n_way == 2 else np.zeros((D, n_way))


def _zero_start(shot: _Shot) -> dict:
    """1. Zero start: only the step size, chosen on meta-validation."""
    shot.log(f"K={shot.K}: zero start, choosing the step size on meta-validation")
    lr0, val_lr = choose_inner_lr(shot.zero(), shot.val_sets, shot.config.lr_grid, inner_steps=shot.K_inner,
                                  n_threads=shot.n_threads)
    per_task = np.concatenate([adaptation_accuracy(shot.zero(), v, inner_lr=lr0, inner_steps=shot.K_inner,
                                                   n_threads=shot.n_threads) for v in shot.sel_sets or shot.val_sets])
    shot.log.step()
    return {"theta": shot.zero(), "inner_lr": lr0, "l2": 0.0, "steps": shot.K_inner,
            "val_accuracy": val_lr[lr0], "val_per_task": per_task, "choice": {"inner_lr": lr0}}


def _pretrained_start(shot: _Shot, lr0: float) -> dict:
    """2. Jointly pre-trained start: the step size chosen on meta-validation, per fold; then a refit."""
    shot.log(f"K={shot.K}: jointly pre-trained start")
    t0 = time.perf_counter()
    per_fold = [_pretrain(shot.config, sampler, lr0) for sampler, _ in shot.folds]
    lr_pre, val_pre = choose_inner_lr(per_fold, shot.val_sets, shot.config.lr_grid, inner_steps=shot.K_inner,
                                      n_threads=shot.n_threads)
    theta = _pretrain(shot.config, shot.refit_sampler, lr0)
    shot.log.step()
    return {"theta": theta, "inner_lr": lr_pre, "l2": 0.0, "steps": shot.K_inner,
            "val_accuracy": val_pre[lr_pre], "choice": {"inner_lr": lr_pre},
            "meta_train_seconds": time.perf_counter() - t0}


def _meta_learner(shot: _Shot, name: str, params: dict) -> Tuple[dict, dict]:
    """3. One meta-learner: trained per fold with validation, stopped at the best mean validation
    iteration, then refit on all meta-training classes for that many iterations."""
    config, K = shot.config, shot.K
    t0 = time.perf_counter()
    per_fold, per_task = [], []
    for f, (sampler, val) in enumerate(shot.folds):
        shot.log(f"K={K}: {name}, fold {f + 1}/{len(shot.folds)}")
        # per-task accuracy at every validation iteration on the selection episodes, for the paired
        # selection rule (the stopping iteration is chosen on val; see _Shot.sel_sets)
        sel = shot.sel_sets[f] if shot.sel_sets else val
        scores = {0: adaptation_accuracy(_train(config, shot.K_inner, sampler, 0, **params), sel)}

        def keep(model, record, scores=scores, sel=sel):
            if "val_accuracy" in record:
                scores[record["iteration"]] = adaptation_accuracy(model, sel)

        model = _train(config, shot.K_inner, sampler, config.n_iterations, validation=val, callbacks=[keep], **params)
        per_fold.append([(r["iteration"], r["val_accuracy"]) for r in model.history_ if "val_accuracy" in r])
        per_task.append(scores)
        shot.log.step()
    its = [it for it, _ in per_fold[0]]
    mean_val = np.mean([[acc for _, acc in fold] for fold in per_fold], axis=0)
    best = int(np.argmax(mean_val))
    n_best = its[best]
    val_per_task = np.concatenate([scores[n_best] for scores in per_task])
    curve = {"iterations": its, "val_accuracy": mean_val.tolist()}
    shot.log(f"K={K}: {name}, refit for {n_best} iterations")
    model = _train(config, shot.K_inner, shot.refit_sampler, n_best, **params)
    curve["refit_loss"] = [r["loss"] for r in model.history_]
    lr = model.inner_lr_for(shot.K_inner)
    shot.log.step()
    method = {"model": model, "theta": model.theta_, "inner_lr": lr, "l2": model.l2_, "steps": shot.K_inner,
              "val_accuracy": float(mean_val[best]), "val_per_task": val_per_task,
              "choice": {"iterations": n_best, "inner_lr": float(np.mean(lr)), "l2": model.l2_},
              "meta_train_seconds": time.perf_counter() - t0}
    return method, curve


def _meta_learner_variants(shot: _Shot, lr0: float) -> dict:
    return {
        MAML_FIXED: dict(inner_lr=lr0),
        MAML_LEARNED: dict(inner_lr=lr0, learn_inner_lr="scalar", l2=1e-3, learn_l2=True),
        METASGD: dict(inner_lr=lr0, learn_inner_lr="per_parameter"),
        PRECOND: dict(inner_lr=lr0, learn_inner_lr="preconditioner", precond_rank=4, random_state=shot.seeds[3]),
        **({POLICY: dict(inner_lr=lr0, l2=1e-3, hyper_policy=_fastmaml.HyperPolicy())} if _have_policy() else {}),
    }


def _random_search(shot: _Shot, budget_units: int) -> dict:
    """4. Random search over (inner_lr, l2, steps) from a zero start, with meta-training's budget."""
    shot.log(f"K={shot.K}: random search over inner hyperparameters")
    t0 = time.perf_counter()
    found = random_search(shot.zero(), shot.val_sets, budget=budget_units, max_configs=shot.config.random_configs_cap,
                          inner_steps_range=(1, 2 * shot.K_inner), random_state=shot.seeds[2],
                          n_threads=shot.n_threads)
    shot.log.step()
    return {"theta": shot.zero(), "inner_lr": found.inner_lr, "l2": found.l2, "steps": found.inner_steps,
            "val_accuracy": found.accuracy,
            "choice": {"inner_lr": found.inner_lr, "l2": found.l2, "steps": found.inner_steps,
                       "configs_tried": found.configs_tried, "budget_units": budget_units,
                       "spent_units": found.spent},
            "meta_train_seconds": time.perf_counter() - t0}


def _test_rows(shot: _Shot, methods: dict) -> Tuple[dict, dict]:
    """Every gradient-based method on the same test episodes: accuracy after each step."""
    table, steps_curves = {}, {}
    for name, m in methods.items():
        if "model" in m:
            path = adaptation_accuracy(m["model"], shot.test_tasks, return_path=True)
        else:
            path = adaptation_accuracy(m["theta"], shot.test_tasks, inner_lr=m["inner_lr"], inner_steps=m["steps"],
                                       l2=m["l2"], return_path=True, n_threads=shot.n_threads)
        seconds = _time_adaptation(m, shot.test_tasks, shot.n_threads)
        acc = path[-1]
        mean, ci = mean_ci(acc)
        steps_curves[name] = path.mean(axis=1).tolist()
        table[name] = {"accuracy": mean, "accuracy_ci95": ci, "per_task": acc, "val_accuracy": m["val_accuracy"],
                       "choice": m["choice"], "seconds_per_task": seconds,
                       "meta_train_seconds": m.get("meta_train_seconds", 0.0)}
    return table, steps_curves


def _one_blas_thread():
    """One thread for BLAS and OpenMP during thousands of tiny scikit-learn fits: threads only add overhead
    there (BLAS: measured 9x slower per fit on 2 shared cores; scikit-learn's loss and gradient run on OpenMP,
    whose threads spin between the tiny parallel loops: 10x slower per task on a loaded 2-core machine).
    A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _grid_search_rows(shot: _Shot) -> Tuple[Optional[str], dict]:
    """5. Per-task grid search of scikit-learn's LogisticRegression, and the oracle (C chosen on the query)."""
    shot.log(f"K={shot.K}: per-task grid search of LogisticRegression")
    with _one_blas_thread():
        return _grid_search_rows_in(shot)


def _grid_search_rows_in(shot: _Shot) -> Tuple[Optional[str], dict]:
    rows = {}
    name = None
    if _have_sklearn():
        c_grid = shot.config.c_grid
        C_val, _ = choose_C_on_validation(shot.val_sets, c_grid)
        if shot.K >= 2:
            gs = grid_search_logistic_regression(shot.test_tasks, c_grid, cv_folds=5, random_state=shot.seeds[3],
                                                 fallback_C=C_val)
            name = GRID
            choice = {"C": "per task, by stratified CV on the support set"}
        else:
            gs = grid_search_logistic_regression(shot.test_tasks, c_grid, fixed_C=C_val)
            name = GRID_K1
            choice = {"C": C_val, "note": "K=1: no split holds both classes, C chosen on meta-validation"}
        mean, ci = mean_ci(gs.accuracy)
        rows[name] = {"accuracy": mean, "accuracy_ci95": ci, "per_task": gs.accuracy, "val_accuracy": None,
                      "choice": choice, "seconds_per_task": gs.seconds_per_task, "meta_train_seconds": 0.0}
        mean, ci = mean_ci(gs.oracle_accuracy)
        rows[ORACLE] = {"accuracy": mean, "accuracy_ci95": ci, "per_task": gs.oracle_accuracy, "val_accuracy": None,
                        "choice": {"C": "best on each query set (oracle)"}, "seconds_per_task": gs.seconds_per_task,
                        "meta_train_seconds": 0.0, "oracle": True}
    shot.log.step()
    return name, rows


def _run_shot(shot: _Shot) -> dict:
    """The whole protocol for one K; every choice on meta-validation, the test episodes scored last."""
    methods = {ZERO: _zero_start(shot)}
    lr0 = methods[ZERO]["inner_lr"]
    methods[PRETRAINED] = _pretrained_start(shot, lr0)
    curves = {}
    budget_units = 0
    for name, params in _meta_learner_variants(shot, lr0).items():
        methods[name], curves[name] = _meta_learner(shot, name, params)
        budget_units += shot.config.n_iterations * shot.config.meta_batch_size * 2 * shot.K_inner * len(shot.folds)
    # keep the simplest candidate unless another is clearly better on the validation folds
    if shot.config.selection == "best-mean":
        selected = max(meta_learners(), key=lambda n: methods[n]["val_accuracy"])
        selection = {"rule": "best-mean"}
    elif shot.config.selection == "simplest":
        sel_scores = {n: methods[n]["val_per_task"] for n in selection_order()}
        selected, selection = select_candidate(sel_scores, selection_order(), groups=shot.sel_groups)
        selection["rule"] = "simplest"
        selection["n_episodes"] = int(sel_scores[ZERO].size)
        # what validation said about the choice against the zero start, for sweeps to report
        selection["vs_zero"] = {n: paired_difference(sel_scores[n], sel_scores[ZERO], groups=shot.sel_groups)
                                for n in selection_order() if n != ZERO}
    else:
        raise ValueError(f"selection: expected 'simplest' or 'best-mean', got {shot.config.selection!r}")
    methods[RANDOM] = _random_search(shot, budget_units)

    table, steps_curves = _test_rows(shot, methods)
    grid_name, grid_rows = _grid_search_rows(shot)
    table.update(grid_rows)
    for row in table.values():
        row["vs_zero"] = paired_difference(row["per_task"], table[ZERO]["per_task"])
        row["vs_grid"] = paired_difference(row["per_task"], table[grid_name]["per_task"]) if grid_name else None
        row["per_task"] = np.asarray(row["per_task"]).tolist()
    return {"table": table, "steps_curves": steps_curves, "training_curves": curves,
            "selected_meta_learner": selected, "selection": selection, "grid_method": grid_name,
            "n_test_episodes": shot.test_tasks.n_tasks}


def _class_split(y, holdout, n_way: int) -> Tuple[list, list]:
    """The held-out classes (checked) and the meta-training classes (all others)."""
    classes = sorted(int(c) for c in np.unique(y))
    holdout = [int(c) for c in holdout]
    if n_way < 2:
        raise ValueError(f"n_way: expected at least 2 classes per task, got {n_way}")
    if len(holdout) != n_way or len(set(holdout)) != n_way:
        raise ValueError(f"holdout: expected {n_way} different classes for {n_way}-way tasks, got {holdout}")
    for c in holdout:
        if c not in classes:
            raise ValueError(f"holdout: class {c} is not in the data (classes {classes})")
    return holdout, [c for c in classes if c not in holdout]


def _validation_folds(train_digits: list, n_way: int, n_folds: int, seed: int) -> list:
    """Leave-digits-out folds: the validation digits of each fold (a third of them for one fold)."""
    if n_folds < 1 or (n_folds > 1 and len(train_digits) // n_folds < n_way):
        raise ValueError(f"val_folds: {n_folds} folds leave fewer than {n_way} validation digits each")
    rng = np.random.default_rng(seed)
    perm = [int(c) for c in rng.permutation(train_digits)]
    if n_folds == 1:
        n_val = max(n_way, len(perm) // 3)
        return [sorted(perm[:n_val])]
    return [sorted(perm[i::n_folds]) for i in range(n_folds)]


# --------------------------------------------------------------- the run
def run_digit_pairs(config: DemoConfig, *, log: Optional[Callable[[str], None]] = print) -> dict:
    """Run the experiment; return every number as a JSON-able dict.

    Parameters
    ----------
    config : DemoConfig
    log : callable or None
        Receives progress messages when no tqdm bar is shown.
    """
    t_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_digits_dataset(config.data)
    notes = [str(w.message) for w in caught]
    X, y = data.X, data.y
    n_way = int(config.n_way)
    holdout, train_digits = _class_split(y, config.holdout, n_way)
    fold_digits = _validation_folds(train_digits, n_way, int(config.val_folds), config.seed)

    K_inner = int(config.inner_steps)
    stages = len(config.shots) * (4 + len(meta_learners()) * (len(fold_digits) + 1))
    logger = _Log(log, config.progress, stages)
    results = {
        "config": dataclasses.asdict(config),
        "family": "digits",
        "data": {"name": data.name, "description": data.description, "n_samples": int(X.shape[0]),
                 "n_features": int(X.shape[1]), "notes": notes},
        "holdout": holdout,
        "n_way": n_way,
        "train_digits": train_digits,
        "validation_folds": fold_digits,
        "shots": {},
    }
    if notes and log is not None:
        for n in notes:
            log(f"note: {n}")
    seed_stream = np.random.SeedSequence(config.seed)
    try:
        for K in config.shots:
            K = int(K)
            seeds = [int(s.generate_state(1)[0]) for s in seed_stream.spawn(4 + 2 * len(fold_digits))]
            mk = lambda cls, seed: EpisodeSampler(  # noqa: E731
                X, y, n_way=n_way, k_shot=K, n_query=config.n_query, classes=cls, random_state=seed)
            test_tasks = mk(holdout, seeds[0]).sample(config.test_episodes)
            folds, sel_sets, sel_groups = [], [], []
            for f, vd in enumerate(fold_digits):
                tr = [c for c in train_digits if c not in vd]
                val_sampler = mk(vd, seeds[5 + 2 * f])
                folds.append((mk(tr, seeds[4 + 2 * f]), val_sampler.sample(config.val_episodes)))
                # the same sampler's next episodes: the choosing episodes above stay what they were
                sel_sets.append(val_sampler.sample(config.val_episodes))
                sel_groups.append(np.sort(val_sampler.episode_classes, axis=1))  # folds hold disjoint digits
            shot = _Shot(K, K_inner, config, test_tasks, folds, [v for _, v in folds], mk(train_digits, seeds[1]),
                         seeds, logger, sel_sets=sel_sets, sel_groups=np.concatenate(sel_groups))
            results["shots"][str(K)] = _run_shot(shot)
    finally:
        logger.close()
    results["total_seconds"] = time.perf_counter() - t_start
    results["summary"] = summarize(results)
    return results


def summarize(results: dict) -> list:
    """One sentence per K, computed from the numbers, whatever they show."""
    lines = []
    for K, res in results["shots"].items():
        table = res["table"]
        sel = res["selected_meta_learner"]
        row = table[sel]
        contenders = [n for n, r in table.items() if not r.get("oracle")]
        best = max(contenders, key=lambda n: table[n]["accuracy"])
        parts = [f"K={K}: the meta-learner chosen on meta-validation is {sel} "
                 f"({100 * row['accuracy']:.1f}% +/- {100 * row['accuracy_ci95']:.1f})."]
        if (row.get("choice") or {}).get("iterations") == 0:
            parts.append("Meta-validation stopped it at iteration 0, before any meta-training: "
                         "meta-training did not improve on its starting point on held-out classes.")
        for ref_name, key in ((ZERO, "vs_zero"), (res["grid_method"], "vs_grid")):
            if ref_name is None or row[key] is None:
                continue
            d = row[key]
            lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
            if lo > 0:
                verdict = f"beats {ref_name} by {100 * d['mean']:.1f} points (95% CI {100 * lo:.1f} to {100 * hi:.1f})"
            elif hi < 0:
                verdict = f"LOSES to {ref_name} by {100 * -d['mean']:.1f} points (95% CI {100 * lo:.1f} to {100 * hi:.1f})"
            else:
                verdict = (f"is not distinguishable from {ref_name} ({100 * d['mean']:+.1f} points, "
                           f"95% CI {100 * lo:.1f} to {100 * hi:.1f})")
            parts.append(f"It {verdict}.")
        parts.append(f"Best non-oracle method on the held-out classes: {best} ({100 * table[best]['accuracy']:.1f}%).")
        lines.append(" ".join(parts))
    return lines


def format_table(results: dict) -> str:
    """The results table as text."""
    out = []
    if results.get("family") == "grouped":
        d = results["data"]
        out.append(f"Grouped tasks: meta-train on {results['n_train_groups']} groups, choose on "
                   f"{results['n_validation_groups']} meta-validation groups, test on {results['n_test_groups']} "
                   f"held-out groups ({d['name']}: {d['n_groups']} groups, {d['n_samples']} rows, "
                   f"{d['n_features']} features)")
    else:
        held = " vs ".join(str(c) for c in results["holdout"])
        kind = "Digit pairs" if results.get("n_way", 2) == 2 else f"{results['n_way']}-way digit tasks"
        out.append(f"{kind}: meta-train on {results['train_digits']}, test on {held} "
                   f"({results['data']['name']}, {results['data']['n_samples']} images)")
        out.append(f"validation folds (digits never meta-trained on in that fold): {results['validation_folds']}")
    for K, res in results["shots"].items():
        out.append("")
        out.append(f"K = {K} shots per class, {res['n_test_episodes']} test episodes (the same for every method)")
        header = (f"  {'method':<34} {'accuracy':>15} {'vs zero init':>18} {'vs grid search':>18} "
                  f"{'val acc':>8} {'meta-train s':>12} {'ms/new task':>11}")
        out.append(header)
        for name, row in res["table"].items():
            def fmt(d):
                return "" if d is None else f"{100 * d['mean']:+.1f} +/- {100 * d['ci95']:.1f}"
            val = "" if row["val_accuracy"] is None else f"{100 * row['val_accuracy']:.1f}"
            out.append(
                f"  {name:<34} {100 * row['accuracy']:>7.1f} +/- {100 * row['accuracy_ci95']:>4.1f} {fmt(row['vs_zero']):>18} "
                f"{fmt(row['vs_grid']):>18} {val:>8} {row['meta_train_seconds']:>12.1f} "
                f"{1000 * row['seconds_per_task']:>11.3f}"
            )
        out.append(f"  meta-learner selected on validation: {res['selected_meta_learner']}")
    return _with_summary(out, results)


def _with_summary(out: list, results: dict) -> str:
    """A results table's closing lines: the summary sentences and the total time (every demo prints them)."""
    out.append("")
    out.append("Summary (computed from the numbers above):")
    out.extend("  " + line for line in results["summary"])
    out.append(f"total time {results['total_seconds']:.1f} s")
    return "\n".join(out)


def to_json(results: dict) -> str:
    """Every number as JSON (NumPy scalars and arrays converted)."""
    def default(o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        raise TypeError(type(o).__name__)

    return json.dumps(results, default=default, indent=1)


# ------------------------------------------------------ other task families
def run_grouped(config: DemoConfig, *, n_groups=300, n_per_group=60, n_features=20,
                log: Optional[Callable[[str], None]] = print) -> dict:
    """The other regime: groups whose labels mean the same thing in every group.

    Tasks come from :func:`fastmaml.datasets.make_grouped_tasks` (a shared
    teacher with per-group deviations). Groups are split into meta-train /
    meta-validation / test; K is the number of support rows per class on
    average (2K support rows per group). Same methods and table as the digits;
    the results name groups (``n_train_groups``, ``n_validation_groups``,
    ``n_test_groups``) where the digit experiment names digits.
    """
    t_start = time.perf_counter()
    X, y, groups = make_grouped_tasks(n_groups=n_groups, n_per_group=n_per_group, n_features=n_features,
                                      random_state=config.seed)
    train_g, val_g, test_g = split_groups(groups, fractions=(0.6, 0.2, 0.2), random_state=config.seed)
    stages = len(config.shots) * (4 + len(meta_learners()) * 2)
    logger = _Log(log, config.progress, stages)
    results = {
        "config": dataclasses.asdict(config),
        "family": "grouped",
        "data": {"name": "grouped (shared teacher + per-group deviation)", "n_samples": int(X.shape[0]),
                 "n_features": int(X.shape[1]), "n_groups": int(n_groups), "notes": []},
        "n_train_groups": int(len(train_g)),
        "n_validation_groups": int(len(val_g)),
        "n_test_groups": int(len(test_g)),
        "shots": {},
    }
    seed_stream = np.random.SeedSequence(config.seed)
    query = n_per_group // 2
    try:
        for K in config.shots:
            K = int(K)
            seeds = [int(s.generate_state(1)[0]) for s in seed_stream.spawn(6)]
            mk = lambda gs, seed: GroupedSampler(  # noqa: E731
                X, y, groups, support_size=2 * K, query_size=query, groups_subset=gs, random_state=seed)
            test_tasks = mk(test_g, seeds[0]).sample(config.test_episodes)
            val_tasks = mk(val_g, seeds[4]).sample(config.val_episodes)
            folds = [(mk(train_g, seeds[5]), val_tasks)]
            refit = mk(np.concatenate([train_g, val_g]), seeds[1])
            shot = _Shot(K, int(config.inner_steps), config, test_tasks, folds, [val_tasks], refit, seeds, logger)
            results["shots"][str(K)] = _run_shot(shot)
    finally:
        logger.close()
    results["total_seconds"] = time.perf_counter() - t_start
    results["summary"] = summarize(results)
    return results


def run_all_pairs(config: DemoConfig, *, log: Optional[Callable[[str], None]] = print) -> dict:
    """Leave-one-pair-out sweep: the digit-pair experiment with every pair held out in turn."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classes = sorted(int(c) for c in np.unique(load_digits_dataset(config.data).y))
    pairs = [(a, b) for i, a in enumerate(classes) for b in classes[i + 1:]]
    out = {"config": dataclasses.asdict(config), "pairs": {}}
    t0 = time.perf_counter()
    for n, (a, b) in enumerate(pairs):
        if log is not None:
            log(f"pair {n + 1}/{len(pairs)}: {a} vs {b}")
        res = run_digit_pairs(dataclasses.replace(config, holdout=(a, b)), log=None)
        row = {}
        for K, shot in res["shots"].items():
            table = shot["table"]
            sel = shot["selected_meta_learner"]
            row[K] = {
                "selected": sel,
                "selected_accuracy": table[sel]["accuracy"],
                "vs_zero": table[sel]["vs_zero"],
                "vs_grid": table[sel]["vs_grid"],
                "accuracy": {name: r["accuracy"] for name, r in table.items()},
                # the validation side of the choice: what the rule saw (scores on the validation digits only)
                "validation": {k: shot["selection"][k] for k in ("mean", "vs_zero", "n_groups", "n_episodes")
                               if k in shot["selection"]},
                "validation_folds": res["validation_folds"],
            }
        out["pairs"][f"{a},{b}"] = row
        if log is not None:  # the numbers as they come: a long sweep that is stopped still says something
            log(f"pair {a},{b}: " + "; ".join(
                f"K={K} {r['selected']} {100 * r['selected_accuracy']:.1f}% (zero init "
                f"{100 * r['accuracy'][ZERO]:.1f}%, random search {100 * r['accuracy'][RANDOM]:.1f}%)"
                for K, r in row.items()))
    out["total_seconds"] = time.perf_counter() - t0
    out["summary"] = summarize_all_pairs(out)
    return out


def summarize_all_pairs(results: dict) -> dict:
    """Per K over the pairs: mean accuracy of every method and of the selected one, the worst pair of the
    selected one against the zero start, and how often each candidate was selected."""
    out = {}
    Ks = list(next(iter(results["pairs"].values())).keys()) if results["pairs"] else []
    for K in Ks:
        rows = {pair: r[K] for pair, r in results["pairs"].items()}
        sel = np.array([r["selected_accuracy"] for r in rows.values()])
        zero = np.array([r["accuracy"][ZERO] for r in rows.values()])
        methods = list(next(iter(rows.values()))["accuracy"])
        means = {m: float(np.mean([r["accuracy"][m] for r in rows.values()])) for m in methods}
        diff = sel - zero
        worst = int(np.argmin(diff))
        counts = {}
        for r in rows.values():
            counts[r["selected"]] = counts.get(r["selected"], 0) + 1
        out[K] = {"selected_mean": float(sel.mean()), "zero_mean": float(zero.mean()), "method_means": means,
                  "worst_pair": list(rows)[worst], "worst_vs_zero": float(diff[worst]),
                  "pairs_losing_over_2_points": int(np.sum(diff < -0.02)), "selected_counts": counts,
                  "n_pairs": len(rows)}
    return out


def format_all_pairs(results: dict) -> str:
    lines = ["Leave-one-pair-out: the meta-learner chosen on meta-validation vs zero init and grid search",
             f"  {'pair':<6} {'K':>3} {'selected meta-learner':<26} {'acc':>6} {'vs zero':>16} {'vs grid':>16}"]
    wins = {}
    for pair, row in results["pairs"].items():
        for K, r in row.items():
            def fmt(d):
                return "" if d is None else f"{100 * d['mean']:+.1f} +/- {100 * d['ci95']:.1f}"
            lines.append(f"  {pair:<6} {K:>3} {r['selected']:<26} {100 * r['selected_accuracy']:>6.1f} "
                         f"{fmt(r['vs_zero']):>16} {fmt(r['vs_grid']):>16}")
            w = wins.setdefault(K, {"zero": [0, 0, 0], "grid": [0, 0, 0]})
            for key, d in (("zero", r["vs_zero"]), ("grid", r["vs_grid"])):
                if d is None:
                    continue
                idx = 0 if d["mean"] - d["ci95"] > 0 else (2 if d["mean"] + d["ci95"] < 0 else 1)
                w[key][idx] += 1
    lines.append("")
    for K, w in wins.items():
        lines.append(f"K={K}: vs zero init: {w['zero'][0]} pairs won, {w['zero'][1]} ties, {w['zero'][2]} lost; "
                     f"vs grid search: {w['grid'][0]} won, {w['grid'][1]} ties, {w['grid'][2]} lost "
                     "(won/lost = 95% CI of the paired difference excludes 0)")
    summary = results.get("summary") or summarize_all_pairs(results)
    for K, sm in summary.items():
        lines.append(f"K={K}: mean over {sm['n_pairs']} pairs: selected {100 * sm['selected_mean']:.1f}%, zero init "
                     f"{100 * sm['zero_mean']:.1f}%; worst pair {sm['worst_pair']} "
                     f"({100 * sm['worst_vs_zero']:+.1f} points vs zero init); "
                     f"{sm['pairs_losing_over_2_points']} pairs lose more than 2 points")
        lines.append("  selected: " + ", ".join(f"{n} {c}x" for n, c in sorted(sm["selected_counts"].items(),
                                                                               key=lambda kv: -kv[1])))
        lines.append("  means: " + ", ".join(f"{n} {100 * m:.1f}%" for n, m in sm["method_means"].items()))
    lines.append(f"total time {results['total_seconds']:.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------- the ragged family
GLOBAL = "MAML (global learned step, L2)"
GLOBAL_STEPS = "MAML (global per-step schedule, L2; warm)"
ORACLE_GRID = "oracle: per-task (step, L2) on 600 fresh rows"
GLOBAL_ROWS = (GLOBAL, GLOBAL_STEPS)  # the global meta-learned settings, simpler first (ties keep it)
BEST_GLOBAL = "best global setting (on meta-validation)"
POWER_TARGET = (0.0025, 0.0012)  # a 0.25-point paired difference should have a 95% half-width of about 0.12
BUCKET_NAMES = ("small", "medium", "large")
ORACLE_STEP_OFFSETS = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0)  # log10 multiples of the global step
ORACLE_L2_OFFSETS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)  # log10 multiples of the global L2


@dataclasses.dataclass
class RaggedConfig:
    """Settings of ``fastmaml demo --family ragged`` (the family itself is fixed: see
    :func:`fastmaml.datasets.make_ragged_family`).

    ``inner_steps=20`` is fixed, not chosen: per-task step sizes matter only when the inner loop runs
    long enough for a step size to decide how far a task moves (issue 15 measured the per-task gain at
    K=20 about twice that at K=5), and a 400-row support set needs the steps to converge.

    ``n_iterations`` trains the global model (kept at its best meta-validation iteration; 2000: its
    validation accuracy still rose by 0.5 points from 500 to 2000 iterations, measured).
    ``policy_iterations`` then trains, from that fitted global model (``fit(init=...)``, its
    initialization kept), the per-task policy and, as its control, a global per-step schedule.

    ``test_groups=2000`` is set by power, not taste: the policy's effect over the best global setting is
    about 0.25 points, and the 95% half-width of a mean paired difference is 1.96 sd / sqrt(n). The sd of
    the per-task difference (policy minus the best global setting) is 2.6 points on the 400 meta-validation
    groups (seed 0; 2.7 on the 600 test groups of the earlier run), so a half-width of 0.12 needs about
    1870 groups (1990 with the test-side sd); at 600 it was 0.2, the size of the effect. Every run reports
    this estimate again (``results["power"]``; the seed-0 run at 2000 groups measured sd 2.9 there and a
    half-width of 0.13). The cost is the grid-search baseline: it still runs on every test group (the
    comparison is paired) and its definition (C by 5-fold CV on the support set, warm-started C path, as
    before) is unchanged, so it is the largest part of the run (measured on a quiet 2-core machine: 66 ms
    per task, 156 s for the whole run; under a load average of 4-5, 0.47 s per task and 17.5 min).
    """

    test_groups: int = 2000
    val_groups: int = 400
    train_groups: int = 1000
    n_features: int = 20
    inner_steps: int = 20
    meta_batch_size: int = 32
    n_iterations: int = 2000
    policy_iterations: int = 1000
    validate_every: int = 50
    meta_lr: float = 0.01
    random_configs_cap: int = 400
    oracle_rows_per_class: int = 300
    seed: int = 0
    n_threads: Optional[int] = None
    progress: bool = True
    c_grid: tuple = C_GRID
    lr_grid: tuple = LR_GRID

    @classmethod
    def quick(cls, **overrides) -> "RaggedConfig":
        base = dict(test_groups=100, val_groups=60, train_groups=140, n_iterations=60, policy_iterations=40,
                    validate_every=20,
                    random_configs_cap=12, c_grid=(0.1, 1.0, 10.0))
        base.update(overrides)
        return cls(**base)


class _PoolSampler:
    """Meta-batches drawn (without replacement within a batch) from a fixed list of groups of the family."""

    def __init__(self, family, groups, random_state):
        self.family = family
        self.groups = np.asarray(groups)
        self.rng = np.random.default_rng(random_state)
        self.n_classes = 2

    def sample(self, n_tasks):
        pick = self.rng.choice(self.groups.size, size=min(int(n_tasks), self.groups.size), replace=False)
        return self.family.tasks(self.groups[pick])

    def get_state(self):
        return self.rng.bit_generator.state

    def set_state(self, state):
        self.rng.bit_generator.state = state


def _oracle(family, test_g, tasks, model, config, K, log):
    """Per task, the (step, L2) of a fixed 7 x 7 grid around the global setting that scores best on 600
    fresh rows of the task's own teacher, adapted from the global start; scored on the reported query set."""
    log("ragged: oracle (7 x 7 grid per task, fresh rows)")
    t0 = time.perf_counter()
    fresh = family.fresh_tasks(test_g, config.oracle_rows_per_class, random_state=config.seed + 7)
    lr_g = np.asarray(model.inner_lr_for(K), dtype=np.float64)
    l2_g = float(model.l2_)
    T = tasks.n_tasks
    n = len(ORACLE_STEP_OFFSETS) * len(ORACLE_L2_OFFSETS)
    fresh_acc = np.zeros((n, T))
    fresh_loss = np.full((n, T), np.inf)
    query_acc = np.zeros((n, T))
    combos = [(s, l) for s in ORACLE_STEP_OFFSETS for l in ORACLE_L2_OFFSETS]
    for i, (s, l) in enumerate(combos):
        lr, l2 = lr_g * 10.0 ** s, l2_g * 10.0 ** l
        try:
            phi = adapt(model.theta_, fresh, inner_lr=lr, inner_steps=K, l2=l2, n_threads=config.n_threads)
        except DivergenceError:
            # one diverging task stops the batch: adapt task by task, a diverged task scores nothing
            phi = np.full((T,) + model.theta_.shape, np.nan)
            for t in range(T):
                Xs, ys, _, _ = tasks.task(t)
                try:
                    phi[t] = adapt(model.theta_, Xs, ys, inner_lr=lr, inner_steps=K, l2=l2)
                except DivergenceError:
                    pass
        ok = np.isfinite(phi).all(axis=1)
        phi_ok = np.where(ok[:, None], phi, 0.0)
        f = query_scores(phi_ok, fresh)
        q = query_scores(phi_ok, tasks)
        fresh_acc[i] = np.where(ok, f["accuracy"], 0.0)
        fresh_loss[i] = np.where(ok, f["loss"], np.inf)
        query_acc[i] = np.where(ok, q["accuracy"], 0.0)
    # best fresh-row accuracy, ties by the lower fresh-row log-loss
    best = np.lexsort((fresh_loss, -fresh_acc), axis=0)[0]
    acc = query_acc[best, np.arange(T)]
    choice = np.array([combos[b] for b in best])  # (T, 2): log10 offsets of step and L2
    seconds = (time.perf_counter() - t0) / T
    return acc, choice, seconds


def _r2(target: np.ndarray, features: np.ndarray) -> float:
    """Fraction of the variance of target explained by an affine least-squares fit on features."""
    A = np.column_stack([np.ones(len(target)), features])
    coef, *_ = np.linalg.lstsq(A, target, rcond=None)
    resid = target - A @ coef
    var = float(np.var(target))
    return float("nan") if var == 0 else 1.0 - float(np.var(resid)) / var


def _gap_closed(policy, glob, oracle, seed) -> dict:
    """(policy - global) / (oracle - global) on the same tasks, with a bootstrap 95% interval over tasks."""
    gain, gap = policy - glob, oracle - glob
    point = float(gain.mean() / gap.mean()) if gap.mean() > 0 else float("nan")
    rng = np.random.default_rng(seed)
    T = gain.size
    draws = []
    for _ in range(2000):
        i = rng.integers(0, T, T)
        g = gap[i].mean()
        if g > 0:
            draws.append(gain[i].mean() / g)
    lo, hi = (np.percentile(draws, [2.5, 97.5]) if len(draws) > 100 else (float("nan"), float("nan")))
    return {"fraction": point, "ci95_low": float(lo), "ci95_high": float(hi),
            "oracle_minus_global": float(gap.mean())}


def _best_global(rows: dict) -> str:
    """The global row (of ``GLOBAL_ROWS`` present in ``rows``) with the highest meta-validation accuracy.

    Only ``rows[name]["val_accuracy"]`` is read, never the test scores, so the reference the policy is
    compared with is fixed before the test groups are seen; ties keep the simpler row (listed first).
    """
    names = [n for n in GLOBAL_ROWS if n in rows]

    def score(n):  # a NaN score (a diverged fit) never wins: max() would keep whichever came first
        v = float(rows[n]["val_accuracy"])
        return (v if np.isfinite(v) else -np.inf, -names.index(n))

    return max(names, key=score)


def _power(diff_val: np.ndarray, n_test: int) -> dict:
    """The test groups a paired difference needs, from the per-task differences on the meta-validation groups.

    The 95% half-width of a mean paired difference is 1.96 sd / sqrt(n); with sd estimated on validation,
    ``groups_needed`` is the n at which it equals ``POWER_TARGET[1]``.
    """
    sd = float(np.std(diff_val, ddof=1)) if diff_val.size > 1 else float("nan")
    need = int(np.ceil((1.96 * sd / POWER_TARGET[1]) ** 2)) if np.isfinite(sd) else None
    return {"validation_mean_difference": float(np.mean(diff_val)), "validation_sd_difference": sd,
            "validation_groups": int(diff_val.size), "effect": POWER_TARGET[0], "target_half_width": POWER_TARGET[1],
            "groups_needed": need, "test_groups": int(n_test),
            "expected_half_width": 1.96 * sd / np.sqrt(n_test) if np.isfinite(sd) else float("nan")}


def run_ragged(config: RaggedConfig, *, log: Optional[Callable[[str], None]] = print) -> dict:
    """The ragged family: per-task hyperparameters against one global setting, grid search and an oracle.

    Groups of :func:`fastmaml.datasets.make_ragged_family` are split once into meta-training,
    meta-validation and test groups; every method is scored on the same test groups (paired) and
    broken down by support-size bucket (``fastmaml.datasets.RAGGED_BUCKETS``). The per-task policy
    is trained in two stages: the global model first, then the policy from it
    (``fit(init=global_model)``, its initialization frozen), next to a control trained the same way
    that learns one global step per inner step instead (so the table separates the per-task gain
    from the per-step schedule's). Every choice (iterations kept, the zero start's step) is made on
    the meta-validation groups, and so is the *best global setting* the policy is judged against: of the
    two global rows (one learned step and L2; the per-step control), the one with the higher
    meta-validation accuracy (:func:`_best_global`; test scores never enter). The headline comparison
    (``comparisons["policy vs best global setting (on meta-validation)"]``) and the gap closed toward the
    oracle are against it; ``results["power"]`` estimates, from the per-task differences on the
    meta-validation groups, how many test groups that comparison needs (see :class:`RaggedConfig`).
    """
    t_start = time.perf_counter()
    G = config.test_groups + config.val_groups + config.train_groups
    family = make_ragged_family(n_groups=G, n_features=config.n_features, random_state=config.seed)
    perm = np.random.default_rng(config.seed).permutation(G)
    test_g = np.sort(perm[:config.test_groups])
    val_g = np.sort(perm[config.test_groups:config.test_groups + config.val_groups])
    train_g = np.sort(perm[config.test_groups + config.val_groups:])
    test, val = family.tasks(test_g), family.tasks(val_g)
    K = int(config.inner_steps)
    bucket = family.bucket()[test_g]
    stages = 7 + 2 * int(_have_policy())
    logger = _Log(log, config.progress, stages)
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(config.seed).spawn(4)]
    methods, trained = {}, {}
    try:
        logger("ragged: zero start, choosing the step size on meta-validation")
        zero = np.zeros(config.n_features + 1)
        lr0, val_lr = choose_inner_lr(zero, [val], config.lr_grid, inner_steps=K, n_threads=config.n_threads)
        methods[ZERO] = {"theta": zero, "inner_lr": lr0, "l2": 0.0, "steps": K, "val_accuracy": val_lr[lr0],
                         "choice": {"inner_lr": lr0}}
        logger.step()
        # The global model first; the per-task policy then starts from it (fit(init=...): its theta kept,
        # the policy's intercepts at its step and L2, the slopes at 0) and learns only the hyperparameters.
        # Trained jointly from zero the policy learned a weak initialization and lost 3 points (issue 15).
        # The per-step global schedule from the same start and budget is the control: the policy also
        # learns one step size per inner step, so it separates the schedule's gain from the per-task one.
        learners = {GLOBAL: (dict(inner_lr=lr0, learn_inner_lr="scalar", l2=1e-3, learn_l2=True), None)}
        warm = dict(learn_init=False, n_iterations=config.policy_iterations, l2=1e-3)
        if _have_policy():
            learners[GLOBAL_STEPS] = (dict(warm, learn_inner_lr="per_step", learn_l2=True), GLOBAL)
            learners[POLICY] = (dict(warm, hyper_policy=_fastmaml.HyperPolicy(warmup=0.0)), GLOBAL)
        for name, (params, start) in learners.items():
            logger(f"ragged: meta-training {name}")
            t0 = time.perf_counter()
            params = dict(dict(n_iterations=config.n_iterations), **params)
            model = MAML(inner_steps=K, meta_lr=config.meta_lr, meta_batch_size=config.meta_batch_size,
                         validate_every=config.validate_every, n_threads=config.n_threads, progress=False,
                         select="best_accuracy", random_state=seeds[1], **params)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the step-size warning: the demo chose the step on validation
                model.fit(_PoolSampler(family, train_g, seeds[0]), validation=val,
                          init=None if start is None else trained[start])
            if model.interrupted_:
                raise KeyboardInterrupt(f"meta-training interrupted after {model.n_iter_} iterations")
            trained[name] = model
            best_val = max(r["val_accuracy"] for r in model.history_ if "val_accuracy" in r)
            lr = model.inner_lr_for(K)
            methods[name] = {"model": model, "steps": K, "val_accuracy": best_val,
                             "choice": {"iterations": int(model.best_iteration_), "inner_lr": float(np.mean(lr)),
                                        "l2": float(model.l2_)}
                             | ({"warm_start": start, "warm_start_iterations": int(trained[start].best_iteration_)}
                                if start is not None else {}),
                             "meta_train_seconds": time.perf_counter() - t0
                             + (methods[start]["meta_train_seconds"] if start is not None else 0.0)}
            logger.step()
        # per-task meta-validation scores: the spread of the policy's paired difference there sets how many
        # test groups the comparison needs (results["power"]); the test groups are not looked at for it
        val_per_task = {name: np.asarray(adaptation_accuracy(trained[name], val)) for name in trained}
        budget = sum(p.get("n_iterations", config.n_iterations) for p, _ in learners.values()) \
            * config.meta_batch_size * 2 * K
        logger("ragged: random search over (step, L2, steps)")
        t0 = time.perf_counter()
        found = random_search(zero, [val], budget=budget, max_configs=config.random_configs_cap,
                              inner_steps_range=(1, 2 * K), random_state=seeds[2], n_threads=config.n_threads)
        methods[RANDOM] = {"theta": zero, "inner_lr": found.inner_lr, "l2": found.l2, "steps": found.inner_steps,
                           "val_accuracy": found.accuracy,
                           "choice": {"inner_lr": found.inner_lr, "l2": found.l2, "steps": found.inner_steps,
                                      "configs_tried": found.configs_tried},
                           "meta_train_seconds": time.perf_counter() - t0}
        logger.step()

        rows = {}
        bucket_tasks = [family.tasks(test_g[bucket == b]) if np.any(bucket == b) else None for b in range(3)]
        for name, m in methods.items():
            logger(f"ragged: scoring {name}")
            if "model" in m:
                acc = adaptation_accuracy(m["model"], test)
            else:
                acc = adaptation_accuracy(m["theta"], test, inner_lr=m["inner_lr"], inner_steps=m["steps"],
                                          l2=m["l2"], n_threads=config.n_threads)
            secs = [None if bt is None else _time_adaptation(m, bt, config.n_threads) for bt in bucket_tasks]
            rows[name] = {"per_task": acc, "val_accuracy": m["val_accuracy"], "choice": m["choice"],
                          "seconds_per_task_by_bucket": secs, "meta_train_seconds": m.get("meta_train_seconds", 0.0)}
        logger.step()
        if _have_sklearn():
            logger("ragged: per-task grid search of LogisticRegression")
            acc = np.zeros(test.n_tasks)
            secs = []
            with _one_blas_thread():
                for b in range(3):
                    sel = np.flatnonzero(bucket == b)
                    if sel.size == 0:
                        secs.append(None)
                        continue
                    gs = grid_search_logistic_regression(bucket_tasks[b], config.c_grid, cv_folds=5,
                                                         random_state=seeds[3])
                    acc[sel] = gs.accuracy
                    secs.append(gs.seconds_per_task)
            rows[GRID] = {"per_task": acc, "val_accuracy": None,
                          "choice": {"C": "per task, by stratified CV on the support set"},
                          "seconds_per_task_by_bucket": secs, "meta_train_seconds": 0.0}
        logger.step()
        o_acc, o_choice, o_secs = _oracle(family, test_g, test, trained[GLOBAL], config, K, logger)
        rows[ORACLE_GRID] = {"per_task": o_acc, "val_accuracy": None, "oracle": True,
                             "choice": {"grid": "7 x 7: log10 step offsets " + str(ORACLE_STEP_OFFSETS)
                                        + ", log10 L2 offsets " + str(ORACLE_L2_OFFSETS) + " around the global"},
                             "seconds_per_task_by_bucket": [o_secs] * 3, "meta_train_seconds": 0.0}
        logger.step()
    finally:
        logger.close()

    table = {}
    for name, r in rows.items():
        acc = np.asarray(r["per_task"], dtype=np.float64)
        mean, ci = mean_ci(acc)
        by_bucket = []
        for b in range(3):
            sel = bucket == b
            m_b, ci_b = mean_ci(acc[sel]) if np.any(sel) else (float("nan"), float("nan"))
            by_bucket.append({"accuracy": m_b, "accuracy_ci95": ci_b, "n_tasks": int(sel.sum()),
                              "seconds_per_task": r["seconds_per_task_by_bucket"][b]})
        table[name] = dict(r, accuracy=mean, accuracy_ci95=ci, by_bucket=by_bucket)
    comparisons = {}
    best = _best_global(table)
    power = None
    if POLICY in table:
        pol = np.asarray(table[POLICY]["per_task"])
        best_acc = np.asarray(table[best]["per_task"])
        comparisons[f"policy vs {BEST_GLOBAL}"] = dict(
            paired_difference(pol, best_acc), reference=best,
            by_bucket=[paired_difference(pol[bucket == b], best_acc[bucket == b]) if np.sum(bucket == b) > 1
                       else None for b in range(3)])
        for ref in (GLOBAL, GLOBAL_STEPS, GRID, ZERO, RANDOM):
            if ref in table:
                ref_acc = np.asarray(table[ref]["per_task"])
                comparisons[f"policy vs {ref}"] = dict(
                    paired_difference(pol, ref_acc),
                    by_bucket=[paired_difference(pol[bucket == b], ref_acc[bucket == b]) if np.sum(bucket == b) > 1
                               else None for b in range(3)])
        comparisons["gap closed toward the oracle"] = dict(_gap_closed(
            pol, best_acc, np.asarray(table[ORACLE_GRID]["per_task"]), config.seed), reference=best)
        if best != GLOBAL:
            comparisons[f"gap closed toward the oracle from {GLOBAL}"] = _gap_closed(
                pol, np.asarray(table[GLOBAL]["per_task"]), np.asarray(table[ORACLE_GRID]["per_task"]), config.seed)
        power = _power(val_per_task[POLICY] - val_per_task[best], test.n_tasks)
    for ref in GLOBAL_ROWS:
        if ref in table:
            comparisons["oracle vs " + ref] = paired_difference(table[ORACLE_GRID]["per_task"], table[ref]["per_task"])
    analysis = _oracle_analysis(o_choice, family, test_g, test, trained.get(POLICY))
    for r in table.values():
        r["per_task"] = np.asarray(r["per_task"]).tolist()
    results = {
        "config": dataclasses.asdict(config),
        "family": "ragged",
        "data": {"name": "ragged (make_ragged_family)", "n_groups": G, "n_features": config.n_features,
                 "shots": [2, 200], "noise": [0.0, 1.0], "deviation": 0.5, "n_query": 15,
                 "buckets": {n: list(b) for n, b in zip(BUCKET_NAMES, RAGGED_BUCKETS)}},
        "n_train_groups": int(train_g.size), "n_validation_groups": int(val_g.size), "n_test_groups": int(test_g.size),
        "inner_steps": K,
        "bucket_of_task": bucket.tolist(),
        "shots_of_task": family.shots[test_g].tolist(),
        "table": table,
        "comparisons": comparisons,
        "oracle_analysis": analysis,
        "policy_available": _have_policy(),
        "best_global": {"name": best, "rule": "highest meta-validation accuracy among " + ", ".join(GLOBAL_ROWS),
                        "val_accuracy": {n: table[n]["val_accuracy"] for n in GLOBAL_ROWS if n in table}},
        "power": power,
    }
    results["total_seconds"] = time.perf_counter() - t_start
    results["summary"] = summarize_ragged(results)
    return results


def _oracle_analysis(choice, family, test_g, tasks, policy_model) -> dict:
    """How far the oracle's per-task choices vary, and how much of it the support descriptor explains."""
    out = {"std_log10_step": float(np.std(choice[:, 0])), "std_log10_l2": float(np.std(choice[:, 1])),
           "mean_log10_step": float(np.mean(choice[:, 0])), "mean_log10_l2": float(np.mean(choice[:, 1]))}
    log_size = np.log(family.shots[test_g].astype(np.float64))[:, None]
    out["r2_step_log_support_size"] = _r2(choice[:, 0], log_size)
    out["r2_l2_log_support_size"] = _r2(choice[:, 1], log_size)
    out["r2_step_noise"] = _r2(choice[:, 0], family.noise[test_g][:, None])
    if _have_policy():
        try:
            desc = _fastmaml.HyperPolicy().describe(tasks)
            out["r2_step_descriptor"] = _r2(choice[:, 0], desc)
            out["r2_l2_descriptor"] = _r2(choice[:, 1], desc)
        except Exception as exc:  # the policy's API is young: report, do not fail the demo
            out["descriptor_error"] = f"{type(exc).__name__}: {exc}"
    by_bucket = []
    bucket = family.bucket()[test_g]
    for b in range(3):
        sel = bucket == b
        by_bucket.append({"mean_log10_step": float(np.mean(choice[sel, 0])) if sel.any() else None,
                          "mean_log10_l2": float(np.mean(choice[sel, 1])) if sel.any() else None})
    out["by_bucket"] = by_bucket
    return out


def _verdict(d: dict, ref: str) -> str:
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    if lo > 0:
        return f"beats {ref} by {100 * d['mean']:.1f} points (95% CI {100 * lo:.1f} to {100 * hi:.1f})"
    if hi < 0:
        return f"LOSES to {ref} by {100 * -d['mean']:.1f} points (95% CI {100 * lo:.1f} to {100 * hi:.1f})"
    return f"is not distinguishable from {ref} ({100 * d['mean']:+.1f} points, 95% CI {100 * lo:.1f} to {100 * hi:.1f})"


def summarize_ragged(results: dict) -> list:
    """Plain sentences computed from the ragged table, whatever it shows."""
    table, comp = results["table"], results["comparisons"]
    lines = []
    if POLICY not in table:
        lines.append("The per-task policy (fastmaml.HyperPolicy) is not in this build: only the other methods ran.")
    else:
        bg = results["best_global"]
        best = bg["name"]
        vals = ", ".join(f"{n} {100 * v:.2f}%" for n, v in bg["val_accuracy"].items())
        lines.append(f"Best global setting, chosen on meta-validation accuracy only ({vals}): {best}.")
        parts = [f"Against the best global setting it {_verdict(comp[f'policy vs {BEST_GLOBAL}'], best)}."]
        for ref in (GLOBAL, GLOBAL_STEPS, GRID, ZERO, RANDOM):
            key = f"policy vs {ref}"
            if key in comp and ref != best:
                parts.append(f"It {_verdict(comp[key], ref)}.")
        row = table[POLICY]
        lines.append(f"The per-task policy scores {100 * row['accuracy']:.1f}% +/- {100 * row['accuracy_ci95']:.1f} on "
                     f"{results['n_test_groups']} held-out groups. " + " ".join(parts))
        g = comp["gap closed toward the oracle"]
        if g["oracle_minus_global"] > 0:
            lines.append(f"It closes {100 * g['fraction']:.0f}% of the gap between the best global setting and the "
                         f"per-task oracle ({100 * g['oracle_minus_global']:.1f} points; bootstrap 95% CI "
                         f"{100 * g['ci95_low']:.0f}% to {100 * g['ci95_high']:.0f}%).")
        else:
            lines.append("The per-task oracle does not beat the best global setting here: there is no gap to close.")
        for b, name in enumerate(BUCKET_NAMES):
            d = comp[f"policy vs {BEST_GLOBAL}"]["by_bucket"][b]
            if d is not None:
                lines.append(f"  {name} support sets: the policy {_verdict(d, 'the best global setting')}.")
        pw = results.get("power")
        if pw and pw["groups_needed"] is not None:
            lines.append(f"Power: the policy's per-task difference from the best global setting has sd "
                         f"{100 * pw['validation_sd_difference']:.1f} points on the {pw['validation_groups']} "
                         f"meta-validation groups, so a {100 * pw['effect']:.2f}-point difference needs about "
                         f"{pw['groups_needed']} test groups for a 95% half-width of {100 * pw['target_half_width']:.2f}; "
                         f"{pw['test_groups']} were used (expected half-width {100 * pw['expected_half_width']:.2f}).")
    for ref in GLOBAL_ROWS:
        if "oracle vs " + ref in comp:
            lines.append(f"The oracle's per-task choice {_verdict(comp['oracle vs ' + ref], ref)}.")
    a = results["oracle_analysis"]
    expl = f"The oracle's choices vary by {a['std_log10_step']:.2f} decades of step size and {a['std_log10_l2']:.2f} of L2"
    expl += f"; log support size explains {100 * a['r2_step_log_support_size']:.0f}% of the step's variation"
    if "r2_step_descriptor" in a:
        expl += f", the policy's descriptor {100 * a['r2_step_descriptor']:.0f}%"
    lines.append(expl + ".")
    contenders = [n for n, r in table.items() if not r.get("oracle")]
    best = max(contenders, key=lambda n: table[n]["accuracy"])
    lines.append(f"Best non-oracle method: {best} ({100 * table[best]['accuracy']:.1f}%).")
    return lines


def format_ragged(results: dict) -> str:
    """The ragged table as text: accuracy per bucket, paired differences, compute per new task."""
    b = results["data"]["buckets"]
    out = [f"Ragged family: meta-train on {results['n_train_groups']} groups, choose on "
           f"{results['n_validation_groups']} meta-validation groups, test on {results['n_test_groups']} held-out "
           f"groups (support rows per class log-uniform in [2, 200], label noise uniform in [0, 1], "
           f"{results['data']['n_features']} features, {results['inner_steps']} inner steps)"]
    counts = [results["table"][next(iter(results["table"]))]["by_bucket"][i]["n_tasks"] for i in range(3)]
    heads = [f"{n} {b[n][0]}-{b[n][1]} ({c})" for n, c in zip(BUCKET_NAMES, counts)]
    out.append(f"  {'method':<46} {'all':>13} " + " ".join(f"{h:>19}" for h in heads) + f" {'ms/task s/m/l':>20}")
    for name, row in results["table"].items():
        cells = [f"{100 * x['accuracy']:5.1f} +/- {100 * x['accuracy_ci95']:3.1f}" for x in row["by_bucket"]]
        ms = "/".join("-" if x["seconds_per_task"] is None else f"{1000 * x['seconds_per_task']:.2f}"
                      for x in row["by_bucket"])
        out.append(f"  {name:<46} {100 * row['accuracy']:5.1f} +/- {100 * row['accuracy_ci95']:3.1f} "
                   + " ".join(f"{c:>19}" for c in cells) + f" {ms:>20}")
    out.append("")
    out.append("Paired differences (points, 95% CI), all / small / medium / large:")
    for key, d in results["comparisons"].items():
        if "fraction" in d:
            if "reference" in d:
                key = f"{key} (from {d['reference']})"
            out.append(f"  {key}: {100 * d['fraction']:.0f}% (bootstrap 95% CI {100 * d['ci95_low']:.0f}% to "
                       f"{100 * d['ci95_high']:.0f}%) of {100 * d['oracle_minus_global']:.1f} points")
            continue
        if "reference" in d:
            key = f"{key} = {d['reference']}"
        cells = [f"{100 * d['mean']:+.1f} +/- {100 * d['ci95']:.1f}"]
        for x in d.get("by_bucket", []):
            cells.append("-" if x is None else f"{100 * x['mean']:+.1f} +/- {100 * x['ci95']:.1f}")
        out.append(f"  {key:<50} " + " | ".join(cells))
    return _with_summary(out, results)
