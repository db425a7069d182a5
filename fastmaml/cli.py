"""Command line: ``fastmaml demo | train | evaluate | info``.

Errors a user can cause (bad arguments, missing or malformed files) end in a
one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


class CLIError(Exception):
    pass


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmaml", description="Exact, fast meta-learning of logistic regression.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the digit-pair experiment (or --family grouped)",
                          description="Meta-train on digit pairs excluding a held-out pair, adapt to it from K "
                                      "examples per class, and compare with zero init, a pre-trained start, "
                                      "per-task grid search and random search.")
    demo.add_argument("--family", choices=("digits", "grouped"), default="digits",
                      help="digits: MNIST digit pairs (random labels per episode); grouped: synthetic groups "
                           "whose labels mean the same in every group")
    demo.add_argument("--holdout", type=_int_list, default=None,
                      help="held-out test classes, e.g. 2,3 (default; 2,3,5 for --ways 3)")
    demo.add_argument("--ways", type=_positive, default=2,
                      help="classes per task: 2 = digit pairs (sigmoid model), N > 2 = N-way (softmax model)")
    demo.add_argument("--all-pairs", action="store_true", help="leave-one-pair-out sweep over every pair")
    demo.add_argument("--shots", type=_int_list, default=None, help="K examples per class, e.g. 1,5,10")
    demo.add_argument("--quick", action="store_true", help="a small run (well under a minute)")
    demo.add_argument("--data", default="default",
                      help="default | mnist-subset | digits8x8 | a folder with the MNIST IDX files")
    demo.add_argument("--iterations", type=_positive, default=None, help="meta-training iterations")
    demo.add_argument("--test-episodes", type=_positive, default=None)
    demo.add_argument("--inner-steps", type=_positive, default=None)
    demo.add_argument("--threads", type=_positive, default=None, help="OpenMP threads (default: all cores)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    demo.add_argument("--plot", metavar="PATH", default="fastmaml_demo.png", help="PNG to write ('' for none)")
    demo.add_argument("--no-progress", action="store_true")

    train = sub.add_parser("train", help="meta-train on your own (features, label, group) file")
    train.add_argument("data", help="NPZ with arrays X, y, groups, or CSV with a header")
    train.add_argument("--out", required=True, help="where to save the model (.npz)")
    train.add_argument("--label-col", default="label")
    train.add_argument("--group-col", default="group")
    train.add_argument("--support-size", type=float, default=0.5, help="rows per group for adaptation "
                       "(an integer count, or a fraction in (0, 1))")
    train.add_argument("--inner-steps", type=_positive, default=5)
    train.add_argument("--inner-lr", type=float, default=0.1)
    train.add_argument("--learn-inner-lr", choices=("none", "scalar", "per_step", "per_parameter",
                                                    "per_step_parameter", "preconditioner"), default="scalar")
    train.add_argument("--l2", type=float, default=1e-3)
    train.add_argument("--learn-l2", action="store_true")
    train.add_argument("--algorithm", choices=("maml", "fomaml", "reptile", "imaml"), default="maml")
    train.add_argument("--imaml-mu", type=float, default=1.0, help="proximal strength of iMAML")
    train.add_argument("--iterations", type=_positive, default=500)
    train.add_argument("--meta-batch-size", type=_positive, default=32)
    train.add_argument("--meta-lr", type=float, default=0.01)
    train.add_argument("--val-fraction", type=float, default=0.2, help="groups held out for meta-validation")
    train.add_argument("--checkpoint", default=None, help="checkpoint file (resumed with --resume)")
    train.add_argument("--resume", action="store_true")
    train.add_argument("--threads", type=_positive, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--scheduler", metavar="ADDRESS", default=None,
                       help="meta-train on a Dask cluster, e.g. tcp://host:8786 (pip install \"fastmaml[distributed]\"): "
                            "the training groups become one fixed pool of tasks, sharded over the workers")
    train.add_argument("--shard-size", type=_positive, default=None,
                       help="tasks per shard with --scheduler, a multiple of 64 (default: one shard per worker)")

    ev = sub.add_parser("evaluate", help="evaluate a saved model on held-out groups")
    ev.add_argument("model")
    ev.add_argument("data")
    ev.add_argument("--label-col", default="label")
    ev.add_argument("--group-col", default="group")
    ev.add_argument("--support-size", type=float, default=0.5)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", metavar="PATH")

    sub.add_parser("info", help="version, OpenMP and thread configuration")
    return parser


def load_table(path: str, label_col: str = "label", group_col: str = "group"):
    """Read (X, y, groups) from an NPZ (arrays X, y, groups) or a CSV with a header row."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data: no such file {path!r}")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in ("X", "y", "groups") if k not in f.files]
                if missing:
                    raise CLIError(f"data: {path!r} lacks arrays {missing} (expected X, y, groups)")
                X, y, groups = f["X"], f["y"], f["groups"]
        except (OSError, ValueError) as exc:
            raise CLIError(f"data: cannot read {path!r} as NPZ ({exc})") from None
    else:
        with open(path, encoding="utf-8") as fh:
            header = fh.readline().strip().split(",")
        header = [h.strip() for h in header]
        for col, opt in ((label_col, "--label-col"), (group_col, "--group-col")):
            if col not in header:
                raise CLIError(f"{opt}: column {col!r} is not in the CSV header {header}")
        try:
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        except ValueError as exc:
            raise CLIError(f"data: {path!r} has a non-numeric or malformed row ({exc})") from None
        if table.shape[1] != len(header):
            raise CLIError(f"data: rows have {table.shape[1]} columns, the header has {len(header)}")
        li, gi = header.index(label_col), header.index(group_col)
        feat = [i for i in range(len(header)) if i not in (li, gi)]
        X, y, groups = table[:, feat], table[:, li], table[:, gi]
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != len(y) or len(groups) != len(y):
        raise CLIError(f"data: expected X of shape (n, d) with n labels and n groups, got X {X.shape}, "
                       f"{len(y)} labels, {len(groups)} groups")
    if not np.isfinite(X).all():
        raise CLIError("data: features contain NaN or infinity")
    yv = np.asarray(y)
    if not np.isin(yv, (0, 1)).all():
        raise CLIError("data: labels must be 0 or 1 (binary tasks)")
    return X, yv.astype(np.int64), np.asarray(groups)


def _support(value: float):
    return int(value) if value >= 1 else float(value)


def _cmd_demo(args) -> int:
    from . import demo, plots

    overrides = {"seed": args.seed, "data": args.data, "n_threads": args.threads,
                 "progress": not args.no_progress and sys.stderr.isatty()}
    if args.shots:
        overrides["shots"] = args.shots
    if args.iterations:
        overrides["n_iterations"] = args.iterations
    if args.test_episodes:
        overrides["test_episodes"] = args.test_episodes
    if args.inner_steps:
        overrides["inner_steps"] = args.inner_steps
    make = demo.DemoConfig.quick if args.quick else demo.DemoConfig
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.family == "grouped":
        results = demo.run_grouped(make(**overrides), log=log)
        print(demo.format_table(results))
    elif args.all_pairs:
        results = demo.run_all_pairs(make(**overrides), log=log)
        print(demo.format_all_pairs(results))
    else:
        default_holdout = (2, 3, 5, 8, 9, 0, 1, 4, 6, 7)[: args.ways]
        holdout = args.holdout or default_holdout
        if len(holdout) != args.ways or len(set(holdout)) != args.ways:
            raise CLIError(f"--holdout: expected {args.ways} different classes for --ways {args.ways}, got {holdout}")
        if args.ways < 2:
            raise CLIError("--ways: expected at least 2")
        overrides["holdout"] = holdout
        overrides["n_way"] = args.ways
        results = demo.run_digit_pairs(make(**overrides), log=log)
        print(demo.format_table(results))
    if args.plot and not args.all_pairs:
        try:
            plots.plot_results(results, args.plot)
            print(f"plot written to {args.plot}")
        except ImportError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(demo.to_json(results))
        print(f"results written to {args.json}")
    return 0


def _cmd_train(args) -> int:
    from .estimator import MAML
    from .samplers import GroupedSampler
    from .splits import split_groups

    X, y, groups = load_table(args.data, args.label_col, args.group_col)
    if not 0 < args.val_fraction < 1:
        raise CLIError("--val-fraction: expected a number in (0, 1)")
    train_g, val_g = split_groups(groups, fractions=(1 - args.val_fraction, args.val_fraction),
                                  random_state=args.seed)
    sampler = GroupedSampler(X, y, groups, support_size=_support(args.support_size), groups_subset=train_g,
                             random_state=args.seed)
    val = GroupedSampler(X, y, groups, support_size=_support(args.support_size), groups_subset=val_g,
                         random_state=args.seed + 1).tasks_for()
    learn = None if args.learn_inner_lr == "none" else args.learn_inner_lr
    model = MAML(algorithm=args.algorithm, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                 learn_inner_lr=None if args.algorithm in ("reptile", "imaml") else learn, l2=args.l2,
                 learn_l2=args.learn_l2 and args.algorithm not in ("reptile", "imaml"), meta_lr=args.meta_lr,
                 imaml_mu=args.imaml_mu,
                 meta_batch_size=min(args.meta_batch_size, len(train_g)), n_iterations=args.iterations,
                 validate_every=max(1, args.iterations // 20), select="best_loss",
                 checkpoint_path=args.checkpoint, n_threads=args.threads, random_state=args.seed,
                 progress=not args.no_progress and sys.stderr.isatty())
    if args.scheduler:
        source = _dask_source(args, sampler)
        try:
            model.fit(source, validation=val, resume=args.resume)
        finally:
            source.close()
            source.client.close()
    else:
        if args.shard_size:
            raise CLIError("--shard-size: only with --scheduler")
        model.fit(sampler, validation=val, resume=args.resume)
    model.save(args.out)
    last = [r for r in model.history_ if "val_accuracy" in r]
    print(f"trained {model.n_iter_} iterations on {len(train_g)} groups; meta-validation on {len(val_g)} groups: "
          f"accuracy {100 * last[-1]['val_accuracy']:.1f}% (best-loss iteration {getattr(model, 'best_iteration_', model.n_iter_)})")
    print(f"model saved to {args.out}")
    return 0


def _dask_source(args, sampler):
    """The training groups as a fixed pool of tasks on the Dask cluster at ``args.scheduler``."""
    try:
        from distributed import Client
    except ImportError:
        raise CLIError('--scheduler: needs Dask distributed: pip install "fastmaml[distributed]"') from None
    from .distributed import REDUCE_BLOCK, DaskTaskSource, split_tasks

    if args.shard_size and args.shard_size % REDUCE_BLOCK:
        raise CLIError(f"--shard-size: expected a multiple of {REDUCE_BLOCK} tasks, got {args.shard_size}")
    try:
        client = Client(args.scheduler, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise CLIError(f"--scheduler: cannot connect to {args.scheduler!r} ({exc})") from None
    try:
        # one support/query split per training group, fixed for the run (a sampler would redraw it)
        pool = sampler.tasks_for(seed=args.seed)
        n_workers = max(1, len(client.scheduler_info()["workers"]))
        shards = (split_tasks(pool, shard_size=args.shard_size) if args.shard_size
                  else split_tasks(pool, n_shards=n_workers))
        whole = sum(s.n_tasks // REDUCE_BLOCK for s in shards) * REDUCE_BLOCK
        mbs = args.meta_batch_size // REDUCE_BLOCK * REDUCE_BLOCK
        batch = mbs if 0 < mbs < whole else None
        print(f"Dask: {pool.n_tasks} tasks in {len(shards)} shards on {n_workers} workers; meta-batch "
              f"{'all tasks' if batch is None else f'{batch} tasks (whole blocks of {REDUCE_BLOCK})'}",
              file=sys.stderr)
        return DaskTaskSource(client, shards, meta_batch_size=batch, random_state=args.seed,
                              n_threads_per_worker=args.threads)
    except BaseException:
        client.close()
        raise


def _cmd_evaluate(args) -> int:
    from .evaluation import paired_difference
    from .estimator import MAML
    from .samplers import GroupedSampler

    model = MAML.load(args.model)
    X, y, groups = load_table(args.data, args.label_col, args.group_col)
    if X.shape[1] != model.n_features_in_:
        raise CLIError(f"data: the model expects {model.n_features_in_} features, the file has {X.shape[1]}")
    tasks = GroupedSampler(X, y, groups, support_size=_support(args.support_size),
                           random_state=args.seed).tasks_for()
    res = model.evaluate(tasks)
    zero = MAML(inner_steps=model.inner_steps, inner_lr=model.inner_lr_, l2=model.l2_, n_iterations=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zero.fit(tasks)
    base = zero.evaluate(tasks)
    diff = paired_difference(res["per_task_accuracy"], base["per_task_accuracy"])
    print(f"{tasks.n_tasks} groups: meta-learned start {100 * res['accuracy']:.1f}% +/- {100 * res['accuracy_ci95']:.1f}; "
          f"zero start with the same steps {100 * base['accuracy']:.1f}% +/- {100 * base['accuracy_ci95']:.1f}; "
          f"difference {100 * diff['mean']:+.1f} +/- {100 * diff['ci95']:.1f} points")
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"accuracy": res["accuracy"], "ci95": res["accuracy_ci95"], "loss": res["loss"],
                       "zero_start_accuracy": base["accuracy"], "difference": diff["mean"], "difference_ci95": diff["ci95"],
                       "n_groups": tasks.n_tasks}, fh, indent=1)
    return 0


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        from . import show_config

        show_config()
        return 0
    except KeyboardInterrupt:
        print("fastmaml: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, ImportError, CheckpointError, OSError) as exc:
        print(f"fastmaml: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
