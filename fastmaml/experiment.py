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

Every choice (step size, when to stop, which meta-learner, C at K = 1) is made
on meta-validation episodes built from digits the meta-training of that fold
never saw (leave-digits-out folds over the meta-training digits, then a refit
on all of them); the test pair is used only for the final numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from .functional import DivergenceError
from .functional import adapt as _adapt
from ._scoring import mean_ci, query_scores
from ._tasks import Tasks
from .estimator import MAML

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
META_LEARNERS = (MAML_FIXED, MAML_LEARNED, METASGD, PRECOND)


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
    val_folds: int = 2
    random_configs_cap: int = 400
    seed: int = 0
    data: str = "default"
    n_threads: Optional[int] = None
    progress: bool = True
    c_grid: tuple = C_GRID
    lr_grid: tuple = LR_GRID

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        base = dict(shots=(1, 5), test_episodes=100, val_episodes=40, n_iterations=100, validate_every=25,
                    val_folds=1, random_configs_cap=30, c_grid=(0.01, 0.1, 1.0, 10.0))
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------ helpers
class _Log:
    def __init__(self, fn: Optional[Callable[[str], None]], progress: bool, total: int):
        self.fn = fn
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="fastmaml demo", unit="stage", leave=False)
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


def _path_accuracy(theta, inner_lr, l2, steps, tasks: Tasks, n_threads=None) -> np.ndarray:
    """Query accuracy after 0..steps inner steps, shape (steps + 1, n_tasks).

    A diverging inner loop scores 0 (a step size that blows up is a bad choice).
    """
    try:
        path = _adapt(theta, tasks, inner_lr=inner_lr, inner_steps=steps, l2=l2, return_path=True,
                      n_threads=n_threads)
    except DivergenceError:
        return np.zeros((steps + 1, tasks.n_tasks))
    return np.stack([query_scores(path[:, j], tasks)["accuracy"] for j in range(steps + 1)])


def _model_path_accuracy(model: MAML, tasks: Tasks, n_threads=None) -> np.ndarray:
    """Like _path_accuracy for a fitted meta-learner (any inner-update kind)."""
    K = int(model.inner_steps)
    try:
        path = model._adapt_batch(tasks, None, K, return_path=True, n_threads=n_threads)
    except DivergenceError:
        return np.zeros((K + 1, tasks.n_tasks))
    return np.stack([query_scores(path[:, j], tasks)["accuracy"] for j in range(K + 1)])


def _final_accuracy(theta, inner_lr, l2, steps, tasks, n_threads=None) -> np.ndarray:
    try:
        phi = _adapt(theta, tasks, inner_lr=inner_lr, inner_steps=steps, l2=l2, n_threads=n_threads)
    except DivergenceError:
        return np.zeros(tasks.n_tasks)
    return query_scores(phi, tasks)["accuracy"]


def _time_adaptation(method: dict, tasks: Tasks, n_threads=None, repeats=3) -> float:
    """Seconds per task of the adaptation alone (best of a few batched runs)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            if "model" in method:
                method["model"]._adapt_batch(tasks, None, method["steps"], n_threads=n_threads)
            else:
                _adapt(method["theta"], tasks, inner_lr=method["inner_lr"], inner_steps=method["steps"],
                       l2=method["l2"], n_threads=n_threads)
        except DivergenceError:
            pass
        best = min(best, time.perf_counter() - t0)
    return best / tasks.n_tasks


def _concat_acc(fn, val_sets) -> float:
    return float(np.mean(np.concatenate([fn(v) for v in val_sets])))


def _sklearn_lr():
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return None, None
    return LogisticRegression, ConvergenceWarning


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


def grid_search_baseline(tasks: Tasks, c_grid, *, fixed_C=None, cv_folds=5, seed=0, fallback_C=None):
    """Per-task LogisticRegression: C by stratified CV on the support set (or fixed_C).

    Returns (accuracy per task, oracle accuracy per task, chosen C per task, seconds per task).
    """
    LogisticRegression, ConvergenceWarning = _sklearn_lr()
    if LogisticRegression is None:
        return None
    from sklearn.model_selection import StratifiedKFold

    c_grid = tuple(sorted(c_grid))
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
                cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed + t)
                scores = np.zeros(len(c_grid))
                for tr, te in cv.split(Xs, ys):
                    scores += _c_path_accuracy(Xs[tr], ys[tr], Xs[te], ys[te], c_grid, LogisticRegression)
                best = int(np.argmax(scores))  # ties: the smallest C (most regularised)
            chosen[t] = c_grid[best]
            acc[t] = on_query[best]
    seconds = (time.perf_counter() - t0) / tasks.n_tasks
    return acc, oracle, chosen, seconds


def _choose_c_on_validation(val_sets, c_grid):
    LogisticRegression, ConvergenceWarning = _sklearn_lr()
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


def _paired(a, b) -> dict:
    diff = np.asarray(a) - np.asarray(b)
    mean, ci = mean_ci(diff)
    return {"mean": mean, "ci95": ci}


# --------------------------------------------------------------- the run
def run_digit_pairs(config: DemoConfig, *, log: Optional[Callable[[str], None]] = print) -> dict:
    """Run the experiment; return every number as a JSON-able dict.

    Parameters
    ----------
    config : DemoConfig
    log : callable or None
        Receives progress messages when no tqdm bar is shown.
    """
    from .datasets import load_digits_dataset
    from .samplers import EpisodeSampler

    t_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_digits_dataset(config.data)
    notes = [str(w.message) for w in caught]
    X, y = data.X, data.y
    classes = sorted(int(c) for c in np.unique(y))
    n_way = int(config.n_way)
    holdout = [int(c) for c in config.holdout]
    if n_way < 2:
        raise ValueError(f"n_way: expected at least 2 classes per task, got {n_way}")
    if len(holdout) != n_way or len(set(holdout)) != n_way:
        raise ValueError(f"holdout: expected {n_way} different classes for {n_way}-way tasks, got {holdout}")
    for c in holdout:
        if c not in classes:
            raise ValueError(f"holdout: class {c} is not in the data (classes {classes})")
    train_digits = [c for c in classes if c not in holdout]
    n_folds = int(config.val_folds)
    if n_folds < 1 or (n_folds > 1 and len(train_digits) // n_folds < n_way):
        raise ValueError(f"val_folds: {n_folds} folds leave fewer than {n_way} validation digits each")
    rng = np.random.default_rng(config.seed)
    perm = [int(c) for c in rng.permutation(train_digits)]
    if n_folds == 1:
        n_val = max(n_way, len(perm) // 3)
        fold_digits = [sorted(perm[:n_val])]
    else:
        fold_digits = [sorted(perm[i::n_folds]) for i in range(n_folds)]

    K_inner = int(config.inner_steps)
    stages = len(config.shots) * (4 + len(META_LEARNERS) * (len(fold_digits) + 1))
    logger = _Log(log, config.progress, stages)
    results = {
        "config": dataclasses.asdict(config),
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
            folds = []
            for f, vd in enumerate(fold_digits):
                tr = [c for c in train_digits if c not in vd]
                folds.append((mk(tr, seeds[4 + 2 * f]), mk(vd, seeds[5 + 2 * f]).sample(config.val_episodes)))
            val_sets = [v for _, v in folds]
            refit_sampler = mk(train_digits, seeds[1])
            res = _run_shot(K, K_inner, config, test_tasks, folds, val_sets, refit_sampler, seeds, logger)
            results["shots"][str(K)] = res
    finally:
        logger.close()
    results["total_seconds"] = time.perf_counter() - t_start
    results["summary"] = summarize(results)
    return results


def _train(config, K_inner, sampler, n_iterations, validation=None, **kw):
    model = MAML(inner_steps=K_inner, meta_lr=config.meta_lr, meta_batch_size=config.meta_batch_size,
                 n_iterations=n_iterations, validate_every=config.validate_every, n_threads=config.n_threads,
                 progress=False, **kw)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # the step-size warning is for interactive users; the demo chose the step on validation
        warnings.simplefilter("ignore")
        model.fit(sampler, validation=validation)
    return model, time.perf_counter() - t0


def _run_shot(K, K_inner, config, test_tasks, folds, val_sets, refit_sampler, seeds, logger):
    methods = {}
    timing = {}
    nt = config.n_threads

    # 1. Zero start: step size on meta-validation.
    logger(f"K={K}: zero start, choosing the step size on meta-validation")
    D = test_tasks.n_features + 1
    n_way = int(config.n_way)
    zero = np.zeros(D) if n_way == 2 else np.zeros((D, n_way))
    val_lr = {lr: _concat_acc(lambda v: _final_accuracy(zero, lr, 0.0, K_inner, v, nt), val_sets)
              for lr in config.lr_grid}
    lr0 = max(val_lr, key=val_lr.get)
    methods[ZERO] = {"theta": zero, "inner_lr": lr0, "l2": 0.0, "steps": K_inner,
                     "val_accuracy": val_lr[lr0], "choice": {"inner_lr": lr0}}
    logger.step()

    # 2. Jointly pre-trained start (inner_steps=0 training = one model on all episodes).
    logger(f"K={K}: jointly pre-trained start")
    t0 = time.perf_counter()
    val_pre = {lr: [] for lr in config.lr_grid}
    for sampler, val in folds:
        pre, _ = _train(config, 0, sampler, config.n_iterations, inner_lr=lr0)
        for lr in config.lr_grid:
            val_pre[lr].append(_final_accuracy(pre.theta_, lr, 0.0, K_inner, val, nt))
    val_pre = {lr: float(np.mean(np.concatenate(v))) for lr, v in val_pre.items()}
    lr_pre = max(val_pre, key=val_pre.get)
    pre, _ = _train(config, 0, refit_sampler, config.n_iterations, inner_lr=lr0)
    timing[PRETRAINED] = time.perf_counter() - t0
    methods[PRETRAINED] = {"theta": pre.theta_, "inner_lr": lr_pre, "l2": 0.0, "steps": K_inner,
                           "val_accuracy": val_pre[lr_pre], "choice": {"inner_lr": lr_pre}}
    logger.step()

    # 3. Meta-learners: per fold, train with validation; choose the stopping
    #    iteration on validation; refit on all meta-training digits.
    variants = {
        MAML_FIXED: dict(inner_lr=lr0),
        MAML_LEARNED: dict(inner_lr=lr0, learn_inner_lr="scalar", l2=1e-3, learn_l2=True),
        METASGD: dict(inner_lr=lr0, learn_inner_lr="per_parameter"),
        PRECOND: dict(inner_lr=lr0, learn_inner_lr="preconditioner", precond_rank=4, random_state=seeds[3]),
    }
    curves = {}
    budget_units = 0
    for name, kw in variants.items():
        t0 = time.perf_counter()
        per_fold = []
        for f, (sampler, val) in enumerate(folds):
            logger(f"K={K}: {name}, fold {f + 1}/{len(folds)}")
            model, _ = _train(config, K_inner, sampler, config.n_iterations, validation=val, **kw)
            per_fold.append([(r["iteration"], r["val_accuracy"]) for r in model.history_ if "val_accuracy" in r])
            budget_units += config.n_iterations * config.meta_batch_size * 2 * K_inner
            logger.step()
        its = [it for it, _ in per_fold[0]]
        mean_val = np.mean([[acc for _, acc in fold] for fold in per_fold], axis=0)
        best = int(np.argmax(mean_val))
        n_best = its[best]
        curves[name] = {"iterations": its, "val_accuracy": mean_val.tolist()}
        logger(f"K={K}: {name}, refit for {n_best} iterations")
        model, _ = _train(config, K_inner, refit_sampler, n_best, **kw)
        timing[name] = time.perf_counter() - t0
        curves[name]["refit_loss"] = [r["loss"] for r in model.history_]
        lr = model._lr_for_steps(K_inner)
        methods[name] = {"model": model, "theta": model.theta_, "inner_lr": lr, "l2": model.l2_, "steps": K_inner,
                         "val_accuracy": float(mean_val[best]),
                         "choice": {"iterations": n_best,
                                    "inner_lr": float(np.mean(lr)), "l2": model.l2_}}
        logger.step()
    selected = max(META_LEARNERS, key=lambda n: methods[n]["val_accuracy"])

    # 4. Random search over (inner_lr, l2, steps) from a zero start, same budget.
    logger(f"K={K}: random search over inner hyperparameters")
    rs_rng = np.random.default_rng(seeds[2])
    t0 = time.perf_counter()
    n_val = sum(v.n_tasks for v in val_sets)
    best_rs, spent, tried = None, 0, 0
    while spent < budget_units and tried < config.random_configs_cap:
        lr = float(10 ** rs_rng.uniform(-3, 1))
        l2 = float(10 ** rs_rng.uniform(-5, 0)) if rs_rng.random() < 0.5 else 0.0
        steps = int(rs_rng.integers(1, 2 * K_inner + 1))
        acc = _concat_acc(lambda v: _final_accuracy(zero, lr, l2, steps, v, nt), val_sets)
        spent += n_val * steps
        tried += 1
        if best_rs is None or acc > best_rs[0]:
            best_rs = (acc, lr, l2, steps)
    timing[RANDOM] = time.perf_counter() - t0
    methods[RANDOM] = {"theta": zero, "inner_lr": best_rs[1], "l2": best_rs[2], "steps": best_rs[3],
                       "val_accuracy": best_rs[0],
                       "choice": {"inner_lr": best_rs[1], "l2": best_rs[2], "steps": best_rs[3],
                                  "configs_tried": tried, "budget_units": budget_units, "spent_units": spent}}
    logger.step()

    # Evaluate the gradient-based methods on the test episodes (same for all).
    table = {}
    steps_curves = {}
    for name, m in methods.items():
        if "model" in m:
            path = _model_path_accuracy(m["model"], test_tasks, nt)
        else:
            path = _path_accuracy(m["theta"], m["inner_lr"], m["l2"], m["steps"], test_tasks, nt)
        seconds = _time_adaptation(m, test_tasks, nt)
        acc = path[-1]
        mean, ci = mean_ci(acc)
        steps_curves[name] = path.mean(axis=1).tolist()
        table[name] = {"accuracy": mean, "ci95": ci, "per_task": acc, "val_accuracy": m["val_accuracy"],
                       "choice": m["choice"], "seconds_per_task": seconds,
                       "meta_train_seconds": timing.get(name, 0.0)}

    # 5. Grid search (and the oracle) with scikit-learn.
    logger(f"K={K}: per-task grid search of LogisticRegression")
    grid_name = None
    if _sklearn_lr()[0] is not None:
        if K >= 2:
            C_val, _ = _choose_c_on_validation(val_sets, config.c_grid)
            gs = grid_search_baseline(test_tasks, config.c_grid, cv_folds=5, seed=seeds[3], fallback_C=C_val)
            grid_name = GRID
            choice = {"C": "per task, by stratified CV on the support set"}
        else:
            C, _ = _choose_c_on_validation(val_sets, config.c_grid)
            gs = grid_search_baseline(test_tasks, config.c_grid, fixed_C=C)
            grid_name = GRID_K1
            choice = {"C": C, "note": "K=1: no split holds both classes, C chosen on meta-validation"}
        acc, oracle, chosen, seconds = gs
        mean, ci = mean_ci(acc)
        table[grid_name] = {"accuracy": mean, "ci95": ci, "per_task": acc, "val_accuracy": None,
                            "choice": choice, "seconds_per_task": seconds, "meta_train_seconds": 0.0}
        mean, ci = mean_ci(oracle)
        table[ORACLE] = {"accuracy": mean, "ci95": ci, "per_task": oracle, "val_accuracy": None,
                         "choice": {"C": "best on each query set (oracle)"}, "seconds_per_task": seconds,
                         "meta_train_seconds": 0.0, "oracle": True}
    logger.step()

    for name, row in table.items():
        row["vs_zero"] = _paired(row["per_task"], table[ZERO]["per_task"])
        row["vs_grid"] = _paired(row["per_task"], table[grid_name]["per_task"]) if grid_name else None
        row["per_task"] = np.asarray(row["per_task"]).tolist()
    return {"table": table, "steps_curves": steps_curves, "training_curves": curves,
            "selected_meta_learner": selected, "grid_method": grid_name,
            "n_test_episodes": test_tasks.n_tasks}


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
                 f"({100 * row['accuracy']:.1f}% +/- {100 * row['ci95']:.1f})."]
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
                f"  {name:<34} {100 * row['accuracy']:>7.1f} +/- {100 * row['ci95']:>4.1f} {fmt(row['vs_zero']):>18} "
                f"{fmt(row['vs_grid']):>18} {val:>8} {row['meta_train_seconds']:>12.1f} "
                f"{1000 * row['seconds_per_task']:>11.3f}"
            )
        out.append(f"  meta-learner selected on validation: {res['selected_meta_learner']}")
    out.append("")
    out.append("Summary (computed from the numbers above):")
    for line in results["summary"]:
        out.append("  " + line)
    out.append(f"total time {results['total_seconds']:.1f} s")
    return "\n".join(out)


def plot_results(results: dict, path: str) -> None:
    """Accuracy against adaptation steps per method (one panel per K) and meta-validation curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'fastmaml[demo]'") from exc
    shots = list(results["shots"])
    fig, axes = plt.subplots(2, len(shots), figsize=(5 * len(shots), 8), squeeze=False)
    for i, K in enumerate(shots):
        res = results["shots"][K]
        ax = axes[0, i]
        for name, curve in res["steps_curves"].items():
            ax.plot(range(len(curve)), 100 * np.asarray(curve), marker="o", ms=3, label=name)
        for name in (res["grid_method"], ORACLE):
            if name and name in res["table"]:
                ax.axhline(100 * res["table"][name]["accuracy"], ls="--" if name == ORACLE else ":", lw=1,
                           color="gray" if name == ORACLE else "black", label=name)
        held = " vs ".join(str(c) for c in results["holdout"])
        ax.set_title(f"{held}, K={K}: test accuracy")
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("query accuracy (%)")
        ax.grid(alpha=0.3)
        ax = axes[1, i]
        for name, c in res["training_curves"].items():
            ax.plot(c["iterations"], 100 * np.asarray(c["val_accuracy"]), marker=".", label=name)
        ax.set_title(f"K={K}: meta-validation accuracy (held-out digits)")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(results: dict) -> str:
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

    Tasks come from :func:`fastmaml.samplers.make_grouped_tasks` (a shared
    teacher with per-group deviations). Groups are split into meta-train /
    meta-validation / test; K is the number of support rows per class on
    average (2K support rows per group). Same methods and table as the digits.
    """
    from .samplers import GroupedSampler, make_grouped_tasks, split_groups

    t_start = time.perf_counter()
    X, y, groups = make_grouped_tasks(n_groups=n_groups, n_per_group=n_per_group, n_features=n_features,
                                      random_state=config.seed)
    train_g, val_g, test_g = split_groups(groups, fractions=(0.6, 0.2, 0.2), random_state=config.seed)
    stages = len(config.shots) * (4 + len(META_LEARNERS) * 2)
    logger = _Log(log, config.progress, stages)
    results = {
        "config": dataclasses.asdict(config),
        "family": "grouped",
        "data": {"name": "grouped (shared teacher + per-group deviation)", "n_samples": int(X.shape[0]),
                 "n_features": int(X.shape[1]), "n_groups": int(n_groups), "notes": []},
        "holdout": ["test groups", f"{len(test_g)}"],
        "train_digits": f"{len(train_g)} meta-training groups",
        "validation_folds": f"{len(val_g)} meta-validation groups",
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
            results["shots"][str(K)] = _run_shot(K, int(config.inner_steps), config, test_tasks, folds,
                                                 [val_tasks], refit, seeds, logger)
    finally:
        logger.close()
    results["total_seconds"] = time.perf_counter() - t_start
    results["summary"] = summarize(results)
    return results


def run_all_pairs(config: DemoConfig, *, log: Optional[Callable[[str], None]] = print) -> dict:
    """Leave-one-pair-out sweep: the digit-pair experiment with every pair held out in turn."""
    from .datasets import load_digits_dataset

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
            }
        out["pairs"][f"{a},{b}"] = row
    out["total_seconds"] = time.perf_counter() - t0
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
    lines.append(f"total time {results['total_seconds']:.1f} s")
    return "\n".join(lines)
