"""Command line: ``fastmaml demo | train | evaluate | info``.

Errors a user can cause (bad arguments, missing, unwritable or malformed
files, a diverging step size, too little memory) end in a one-line message on
stderr and exit status 2, never a traceback; warnings print as one line in the
CLI's words; Ctrl-C ends with exit status 130.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import warnings

import numpy as np

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MAX_THREADS = 1024  # far beyond any machine's cores; keeps absurd values out of OpenMP


class CLIError(Exception):
    """A user error the CLI reports as one line (exit status 2)."""


# ------------------------------------------------------------------ argument types
def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if any(not 0 <= v < 10**6 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers in [0, 1000000), got {text!r}")
    return values


def _bounded_int(low: int, high: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} in [{low}, {high}], got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


_positive = _bounded_int(1, 10**9, "a positive integer")
_threads = _bounded_int(1, MAX_THREADS, "a thread count")
_seed = _bounded_int(0, 2**63 - 1, "a non-negative integer seed")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _support_size(text: str):
    """An integer count of rows (>= 1) or a fraction in (0, 1)."""
    value = _finite(text)
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value) and value <= 10**9:
        return int(value)
    raise argparse.ArgumentTypeError(
        f"expected an integer count of rows (1 to 10^9) or a fraction in (0, 1), got {text!r}")


def _columns(text: str) -> tuple:
    names = tuple(c.strip() for c in text.split(","))
    if not names or any(not c for c in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"column {twice[0]!r} is named twice in {text!r}")
    return names


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: ...)' unless the help text already says what the default does."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _version() -> str:
    from . import __version__

    return __version__


# ------------------------------------------------------------------ the parser
def _table_options(p) -> None:
    """The options that say how to read a data file (train and evaluate)."""
    p.add_argument("--label-col", default="label", metavar="NAME",
                   help="CSV column holding the class labels, integers 0..C-1 (C = 2: binary, C > 2: N-way softmax)")
    p.add_argument("--group-col", default="group", metavar="NAME",
                   help="CSV column holding the group (task) ids; numbers or text")
    p.add_argument("--feature-cols", type=_columns, default=None, metavar="A,B,...",
                   help="CSV feature columns (default: every column except the label, group and --ignore-cols "
                        "columns; all must be numeric)")
    p.add_argument("--ignore-cols", type=_columns, default=(), metavar="A,B,...",
                   help="CSV columns to skip, e.g. a non-numeric id column (default: none)")
    p.add_argument("--support-size", type=_support_size, default=0.5, metavar="N_OR_FRACTION",
                   help="rows of each group used for adaptation (the rest are scored): an integer count, "
                        "or a fraction in (0, 1)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (splits and episodes)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastmaml", formatter_class=_Help,
                     description="Exact, fast meta-learning of logistic regression across many small tasks. "
                                 "Run 'fastmaml COMMAND --help' for the options of each command.")
    parser.add_argument("--version", action="version", version=f"fastmaml {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", formatter_class=_Help, help="the digit-pair experiment (or --family grouped)",
                          description="Meta-train on digit pairs excluding a held-out pair, adapt to it from K "
                                      "examples per class, and compare with zero init, a pre-trained start, "
                                      "per-task grid search and random search. Prints a table; writes a PNG "
                                      "plot (--plot) and, with --json, every number. Output paths are checked "
                                      "before anything is computed.")
    demo.add_argument("--family", choices=("digits", "grouped", "ragged"), default="digits",
                      help="digits: MNIST digit pairs (random labels per episode); grouped: synthetic groups "
                           "whose labels mean the same in every group; ragged: such groups with support sizes "
                           "from 2 to 200 rows per class and per-group label noise, per-task hyperparameters "
                           "against one global setting, grid search and an oracle (no plot)")
    demo.add_argument("--selection", choices=("simplest", "best-mean"), default=None,
                      help="(--family digits and grouped; default: simplest) how validation picks the meta-learner: simplest = keep the simplest candidate (zero "
                           "start, then the per-task policy) unless another beats it by more than the paired 95%% "
                           "CI on the validation folds; best-mean = the highest mean validation accuracy")
    demo.add_argument("--backbone", choices=("pixels", "cnn"), default="pixels",
                      help="pixels: logistic regression on raw pixels (NumPy only); cnn: a small CNN meta-trained "
                           "through fastmaml's head (ANIL) against a pre-trained embedding and the same ANIL "
                           "unrolled in torch (digit pairs only, no plot; pip install \"fastmaml[torch]\")")
    demo.add_argument("--holdout", type=_int_list, default=None, metavar="A,B",
                      help="held-out test digits (default: 2,3; 2,3,5 for --ways 3)")
    demo.add_argument("--ways", type=_positive, default=2,
                      help="classes per task: 2 = digit pairs (sigmoid model), N > 2 = N-way (softmax model)")
    demo.add_argument("--all-pairs", action="store_true",
                      help="leave-one-pair-out sweep over every digit pair (long; no plot)")
    demo.add_argument("--shots", type=_int_list, default=None, metavar="K,K,...",
                      help="K examples per class (default: 1,5,10; 1,5 with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="a small run: fewer iterations, episodes and shots (at most 30 s on a quiet 2-core machine)")
    demo.add_argument("--data", default="default",
                      help="default | mnist-subset | digits8x8 | a folder with the MNIST IDX files")
    demo.add_argument("--iterations", type=_positive, default=None,
                      help="meta-training iterations per fit (default: 500; 60 with --quick)")
    demo.add_argument("--test-episodes", type=_positive, default=None,
                      help="test episodes per K, the same for every method (default: 600; 60 with --quick); "
                           "with --family ragged, test groups (default: 2000, set by power; 100 with --quick)")
    demo.add_argument("--inner-steps", type=_positive, default=None,
                      help="adaptation steps (default: 5)")
    demo.add_argument("--threads", type=_threads, default=None, help="OpenMP threads (default: all cores)")
    demo.add_argument("--seed", type=_seed, default=0, help="random seed of the whole experiment")
    demo.add_argument("--json", metavar="PATH", default=None,
                      help="write every number to this JSON file (default: no JSON)")
    demo.add_argument("--plot", metavar="PATH", default=None,
                      help="PNG file to write; '.png' is added when PATH has no extension; '' for no plot "
                           "(default: fastmaml_demo.png)")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress bar; print one line per stage instead")

    train = sub.add_parser("train", formatter_class=_Help,
                           help="meta-train on your own (features, label, group) file",
                           description="Meta-train a logistic-regression start (and step size) on your own table: "
                                       "each group is a task, split into support rows (for adaptation) and query "
                                       "rows. Labels 0..C-1: C = 2 trains a binary model, C > 2 an N-way softmax "
                                       "model. Part of the groups (--val-fraction) is held out for "
                                       "meta-validation.")
    train.add_argument("data", help="NPZ with arrays X (n, d), y (n,), groups (n,), or a CSV with a header row")
    train.add_argument("--out", required=True, metavar="PATH",
                       help="where to save the model (.npz); its folder must exist (required, no default)")
    _table_options(train)
    train.add_argument("--inner-steps", type=_positive, default=5, help="gradient steps of adaptation")
    train.add_argument("--inner-lr", type=_finite, default=0.1,
                       help="adaptation step size (the starting value when it is learned)")
    train.add_argument("--learn-inner-lr", choices=("none", "scalar", "per_step", "per_parameter",
                                                    "per_step_parameter", "preconditioner"), default="scalar",
                       help="which step sizes meta-training learns (ignored for reptile and imaml)")
    train.add_argument("--l2", type=_finite, default=1e-3, help="L2 strength of adaptation")
    train.add_argument("--learn-l2", action="store_true", help="meta-learn the L2 strength too")
    train.add_argument("--algorithm", choices=("maml", "fomaml", "reptile", "imaml"), default="maml",
                       help="meta-learning algorithm")
    train.add_argument("--imaml-mu", type=_finite, default=1.0, help="proximal strength of iMAML")
    train.add_argument("--iterations", type=_positive, default=500, help="meta-training iterations")
    train.add_argument("--meta-batch-size", type=_positive, default=32,
                       help="groups per meta-iteration (at most the number of training groups)")
    train.add_argument("--meta-lr", type=_finite, default=0.01, help="Adam step size of meta-training")
    train.add_argument("--val-fraction", type=_finite, default=0.2,
                       help="fraction of the groups held out for meta-validation, in (0, 1)")
    train.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="checkpoint file written during training (default: none); see --resume")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    train.add_argument("--threads", type=_threads, default=None, help="OpenMP threads (default: all cores)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--scheduler", metavar="ADDRESS", default=None,
                       help="meta-train on a Dask cluster, e.g. tcp://host:8786 (pip install \"fastmaml[distributed]\"): "
                            "the training groups become one fixed pool of tasks, sharded over the workers "
                            "(default: this machine)")
    train.add_argument("--shard-size", type=_positive, default=None,
                       help="tasks per shard with --scheduler, a multiple of 64 (default: one shard per worker)")

    ev = sub.add_parser("evaluate", formatter_class=_Help, help="evaluate a saved model on held-out groups",
                        description="Adapt a model saved by 'fastmaml train' to every group of a data file "
                                    "(support rows), score it on the group's other rows (query), and compare "
                                    "with a zero start given the same steps and step size. Use groups the "
                                    "model was not trained on.")
    ev.add_argument("model", help="a model saved by 'fastmaml train --out' (.npz)")
    ev.add_argument("data", help="held-out groups: NPZ with X, y, groups, or a CSV with a header row, "
                                 "with the training file's feature columns")
    _table_options(ev)
    ev.add_argument("--json", metavar="PATH", default=None,
                    help="write the scores to this JSON file (default: no JSON)")

    sub.add_parser("info", formatter_class=_Help, help="version, OpenMP and thread configuration",
                   description="Print version, OpenMP, threads, SIMD level and compiler (for bug reports).")
    return parser


def _subparsers_of(parser) -> dict:
    """``{command: its parser}`` (for the tests of help texts and the fuzzer)."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


# ------------------------------------------------------------------ data files
def _labels(y, path: str) -> np.ndarray:
    """Integer class labels 0..C-1 (C >= 2) from whatever the file holds."""
    try:
        yf = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError):
        raise CLIError(f"data: {path!r}: labels must be integers 0..C-1, got non-numeric values") from None
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(yf) | (yf != np.rint(yf)) | (yf < 0) | (yf > 10**6)
    if bad.any():
        raise CLIError(f"data: {path!r}: labels must be integers 0..C-1 (0/1 for binary tasks, 0..C-1 for "
                       f"C-way tasks), got values such as {_sample(yf[bad])}")
    yi = yf.astype(np.int64)
    present = np.unique(yi)
    if present.size < 2:
        raise CLIError(f"data: {path!r}: every row has the label {present.tolist()}: at least two classes are needed")
    missing = np.setdiff1d(np.arange(present[-1] + 1), present)
    if missing.size:
        raise CLIError(f"data: {path!r}: labels must be 0..C-1 with every class present; "
                       f"missing {_sample(missing)} (relabel the classes 0..{present.size - 1})")
    return yi


def _sample(values, n=5) -> str:
    v = np.asarray(values).reshape(-1)[:n].tolist()
    return ", ".join(repr(x) for x in v) or "(none)"


def _read_npz(path: str):
    try:
        with open(path, "rb") as fh:  # np.load would leave the file open when it is not a zip
            raw = io.BytesIO(fh.read())
        with np.load(raw, allow_pickle=False) as f:
            missing = [k for k in ("X", "y", "groups") if k not in f.files]
            if missing:
                raise CLIError(f"data: {path!r} lacks arrays {missing} (expected X, y, groups)")
            return f["X"], f["y"], f["groups"]
    except CLIError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise CLIError(f"data: cannot read {path!r} as NPZ ({_one_line(exc)})") from None
    except Exception as exc:  # zipfile.BadZipFile and friends: a damaged file, not a bug
        raise CLIError(f"data: cannot read {path!r} as NPZ ({type(exc).__name__}: {_one_line(exc)})") from None


def _read_csv(path, label_col, group_col, feature_cols, ignore_cols):
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as exc:
        raise CLIError(f"data: {path!r} is not a UTF-8 text CSV ({exc.reason})") from None
    except csv.Error as exc:
        raise CLIError(f"data: {path!r} is not a readable CSV ({exc})") from None
    if not rows:
        raise CLIError(f"data: {path!r} is empty (expected a header row, then one row per example)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise CLIError(f"data: {path!r} has repeated column names in its header {header}")
    if len(rows) == 1:
        raise CLIError(f"data: {path!r} has a header but no data rows")
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise CLIError(f"data: {path!r} row {i} has {len(r)} columns, the header has {len(header)}")
    named = [(label_col, "--label-col"), (group_col, "--group-col")]
    named += [(c, "--feature-cols") for c in feature_cols or ()] + [(c, "--ignore-cols") for c in ignore_cols]
    for col, opt in named:
        if col not in header:
            raise CLIError(f"{opt}: column {col!r} is not in the CSV header {header}")
    if feature_cols is None:
        feature_cols = [h for h in header if h not in (label_col, group_col) and h not in ignore_cols]
    elif len(set(feature_cols)) < len(feature_cols):
        twice = sorted({c for c in feature_cols if list(feature_cols).count(c) > 1})
        raise CLIError(f"--feature-cols: column {twice[0]!r} is named twice")
    elif set(feature_cols) & {label_col, group_col}:
        raise CLIError("--feature-cols: the label and group columns cannot be features")
    if not feature_cols:
        raise CLIError(f"data: {path!r} has no feature columns besides the label and group columns")
    table = np.array(rows[1:], dtype=str)
    col = {h: i for i, h in enumerate(header)}
    X = np.empty((table.shape[0], len(feature_cols)))
    for j, name in enumerate(feature_cols):
        try:
            X[:, j] = table[:, col[name]].astype(np.float64)
        except ValueError:
            bad = next(v for v in table[:, col[name]] if not _is_number(v))
            raise CLIError(f"data: column {name!r} of {path!r} is not numeric (e.g. {bad!r}); name the feature "
                           f"columns with --feature-cols or skip this one with --ignore-cols {name}") from None
    y = np.char.strip(table[:, col[label_col]])
    groups = np.char.strip(table[:, col[group_col]])
    if all(_is_number(g) for g in groups):
        groups = groups.astype(np.float64)
    return X, y, groups


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_table(path: str, label_col: str = "label", group_col: str = "group", feature_cols=None, ignore_cols=()):
    """Read (X, y, groups) from an NPZ (arrays X, y, groups) or a CSV with a header row.

    Parameters
    ----------
    path : str
        ``.npz`` with arrays ``X`` (n, d), ``y`` (n,) and ``groups`` (n,); anything else is read as CSV.
    label_col, group_col : str
        CSV columns of the labels (integers 0..C-1) and of the group ids (numbers or text).
    feature_cols : sequence of str, optional
        CSV feature columns; by default every other column not in ``ignore_cols``.
    ignore_cols : sequence of str
        CSV columns to skip (an id, a comment).

    Returns
    -------
    X : ndarray of shape (n, d), float64
    y : ndarray of shape (n,), int64, labels 0..C-1 with C >= 2
    groups : ndarray of shape (n,)
    """
    if not os.path.exists(path):
        raise CLIError(f"data: no such file {path!r}")
    if os.path.isdir(path):
        raise CLIError(f"data: {path!r} is a folder, not a data file")
    if path.endswith(".npz"):
        X, y, groups = _read_npz(path)
    else:
        X, y, groups = _read_csv(path, label_col, group_col, feature_cols, ignore_cols)
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError):
        raise CLIError(f"data: {path!r}: X must be numeric, got dtype {np.asarray(X).dtype}") from None
    y, groups = np.asarray(y), np.asarray(groups)
    if X.ndim != 2 or X.shape[0] == 0 or y.shape != (X.shape[0],) or groups.shape != (X.shape[0],):
        raise CLIError(f"data: expected X of shape (n, d) with n >= 1 labels and n groups, got X {X.shape}, "
                       f"y {y.shape}, groups {groups.shape}")
    if not np.isfinite(X).all():
        raise CLIError("data: features contain NaN or infinity")
    if groups.dtype.kind not in "iufUS":
        raise CLIError(f"data: groups must be numbers or text, got dtype {groups.dtype}")
    return X, _labels(y, path), groups


# ------------------------------------------------------------------ output paths
def _check_output(path: str, option: str) -> str:
    """Refuse an output path that cannot be written, before any computing (never creates folders)."""
    if not path:
        raise CLIError(f"{option}: expected a file name, got ''")
    if os.path.isdir(path):
        raise CLIError(f"{option}: {path!r} is a folder; give a file name inside it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{option}: the folder {folder!r} does not exist (it is not created for you)")
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CLIError(f"{option}: cannot write to the folder {folder!r} ({exc.strerror or exc})") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CLIError(f"{option}: {path!r} exists and is not writable")
    return path


def _write_text(path: str, text: str, option: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise CLIError(f"{option}: cannot write {path!r} ({exc.strerror or exc})") from None


# ------------------------------------------------------------------ commands
def _cmd_demo(args) -> int:
    # Options a run would ignore are refused, naming the run (an explicit --plot or --selection only).
    no_plot = ("--backbone cnn" if args.backbone == "cnn" else "--all-pairs" if args.all_pairs
               else "--family ragged" if args.family == "ragged" else None)
    if no_plot and args.plot:
        raise CLIError(f"--plot: {no_plot} draws no plot; leave --plot out")
    no_selection = ("--backbone cnn" if args.backbone == "cnn" else "--family ragged" if args.family == "ragged"
                    else None)
    if no_selection and args.selection is not None:
        raise CLIError(f"--selection: {no_selection} selects no meta-learner (the rule is for --family digits "
                       "and grouped); leave --selection out")
    if args.backbone == "cnn":
        from . import anil  # imports torch only when a run starts

        return anil.main(args)
    from . import demo

    plot_path = None
    if args.plot is None and not no_plot:
        args.plot = "fastmaml_demo.png"
    if args.json:
        _check_output(args.json, "--json")
    if args.plot and not no_plot:
        from . import plots

        try:
            plot_path = _check_output(plots.output_path(args.plot), "--plot")
        except ImportError as exc:
            print(f"fastmaml: note: no plot ({_one_line(exc)})", file=sys.stderr)
        except ValueError as exc:
            raise CLIError(f"--plot: {_one_line(exc)}") from None
        if plot_path and args.json and os.path.abspath(plot_path) == os.path.abspath(args.json):
            raise CLIError("--plot and --json name the same file")

    overrides = {"seed": args.seed, "data": args.data, "n_threads": args.threads,
                 "progress": not args.no_progress and sys.stderr.isatty(), "selection": args.selection or "simplest"}
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
    if args.ways < 2:
        raise CLIError("--ways: expected at least 2")
    if args.family == "ragged":
        if args.holdout or args.ways != 2 or args.all_pairs or args.shots or args.data != "default":
            raise CLIError("--holdout, --ways, --all-pairs, --shots and --data are for --family digits; the ragged "
                           "family is fixed (support sizes 2..200 per class), tested on held-out groups")
        ragged = {k: v for k, v in overrides.items() if k in ("seed", "n_threads", "progress", "n_iterations",
                                                              "inner_steps")}
        if args.test_episodes:
            ragged["test_groups"] = args.test_episodes
        results = demo.run_ragged((demo.RaggedConfig.quick if args.quick else demo.RaggedConfig)(**ragged), log=log)
        text = demo.format_ragged(results)
    elif args.family == "grouped":
        if args.holdout or args.ways != 2:
            raise CLIError("--holdout and --ways are for --family digits; grouped tasks are binary, "
                           "tested on held-out groups")
        results = demo.run_grouped(make(**overrides), log=log)
        text = demo.format_table(results)
    elif args.all_pairs:
        results = demo.run_all_pairs(make(**overrides), log=log)
        text = demo.format_all_pairs(results)
    else:
        default_holdout = (2, 3, 5, 8, 9, 0, 1, 4, 6, 7)[: args.ways]
        holdout = args.holdout or default_holdout
        if len(holdout) != args.ways or len(set(holdout)) != args.ways:
            raise CLIError(f"--holdout: expected {args.ways} different classes for --ways {args.ways}, got {holdout}")
        overrides["holdout"] = holdout
        overrides["n_way"] = args.ways
        results = demo.run_digit_pairs(make(**overrides), log=log)
        text = demo.format_table(results)
    print(text)
    # the JSON first: it holds every number, the plot only draws some of them
    if args.json:
        _write_text(args.json, demo.to_json(results), "--json")
        print(f"results written to {args.json}")
    if plot_path:
        from . import plots

        try:
            plots.plot_results(results, plot_path)
        except OSError as exc:
            raise CLIError(f"--plot: cannot write {plot_path!r} ({exc.strerror or exc})") from None
        print(f"plot written to {plot_path}")
    return 0


def _sampler_error(exc: ValueError) -> CLIError:
    """The sampler's advice in the CLI's words (it has no groups_subset option)."""
    msg = _one_line(exc)
    msg = msg.replace("lower the sizes or leave these groups out with groups_subset",
                      "lower --support-size or remove these groups from the data file")
    msg = msg.replace("leave them out with groups_subset", "remove these groups from the data file")
    msg = msg.replace("support_size", "--support-size")
    return CLIError(f"data: {msg}")


def _cmd_train(args) -> int:
    from .estimator import MAML
    from .samplers import GroupedSampler
    from .splits import split_groups

    _check_output(args.out, "--out")
    if args.checkpoint:
        if args.resume and not os.path.isfile(args.checkpoint):
            raise CLIError(f"--resume: no checkpoint file {args.checkpoint!r}")
        _check_output(args.checkpoint, "--checkpoint")
        if os.path.abspath(args.checkpoint) == os.path.abspath(args.out):
            raise CLIError("--checkpoint: must differ from --out (the saved model would overwrite the checkpoint)")
    elif args.resume:
        raise CLIError("--resume: needs --checkpoint PATH")
    if not 0 < args.val_fraction < 1:
        raise CLIError("--val-fraction: expected a number in (0, 1)")
    if args.shard_size and not args.scheduler:
        raise CLIError("--shard-size: only with --scheduler")
    X, y, groups = load_table(args.data, args.label_col, args.group_col, args.feature_cols, args.ignore_cols)
    train_g, val_g = split_groups(groups, fractions=(1 - args.val_fraction, args.val_fraction),
                                  random_state=args.seed)
    try:
        sampler = GroupedSampler(X, y, groups, support_size=args.support_size, groups_subset=train_g,
                                 random_state=args.seed)
        val = GroupedSampler(X, y, groups, support_size=args.support_size, groups_subset=val_g,
                             random_state=args.seed + 1).tasks_for()
    except ValueError as exc:
        raise _sampler_error(exc) from None
    learn = None if args.learn_inner_lr == "none" else args.learn_inner_lr
    if args.meta_batch_size > len(train_g) and not args.scheduler:
        print(f"fastmaml: --meta-batch-size {args.meta_batch_size} is more than the {len(train_g)} training "
              f"groups; each meta-batch uses all {len(train_g)}", file=sys.stderr)
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
        model.fit(sampler, validation=val, resume=args.resume)
    model.save(args.out)
    last = [r for r in model.history_ if "val_accuracy" in r]
    C = max(2, int(getattr(model, "n_classes_", 2)))
    kind = "binary" if C == 2 else f"{C}-way"
    print(f"trained {model.n_iter_} iterations ({kind}) on {len(train_g)} groups; meta-validation on "
          f"{len(val_g)} groups: accuracy {100 * last[-1]['val_accuracy']:.1f}% "
          f"(best-loss iteration {getattr(model, 'best_iteration_', model.n_iter_)})")
    print(f"model saved to {args.out}")
    if model.interrupted_:
        print(f"fastmaml: interrupted after {model.n_iter_} complete iterations; the saved model holds the "
              f"iterate meta-validation selected among them (iteration {getattr(model, 'best_iteration_', model.n_iter_)})"
              + (" (resume with --resume)" if args.checkpoint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
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
        raise CLIError(f"--scheduler: cannot connect to {args.scheduler!r} ({_one_line(exc)})") from None
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
    from .estimator import MAML
    from .evaluation import paired_difference
    from .samplers import GroupedSampler

    if args.json:
        _check_output(args.json, "--json")
    if not os.path.isfile(args.model):
        raise CLIError(f"model: no such file {args.model!r}")
    model = MAML.load(args.model)
    X, y, groups = load_table(args.data, args.label_col, args.group_col, args.feature_cols, args.ignore_cols)
    if X.shape[1] != model.n_features_in_:
        raise CLIError(f"data: the model expects {model.n_features_in_} features, the file has {X.shape[1]}")
    C = max(2, int(getattr(model, "n_classes_", 2)))
    if int(y.max()) + 1 != C:
        raise CLIError(f"data: the model is {'binary' if C == 2 else f'{C}-way'} (labels 0..{C - 1}), "
                       f"the file has labels 0..{int(y.max())}")
    try:
        tasks = GroupedSampler(X, y, groups, support_size=args.support_size, random_state=args.seed).tasks_for()
    except ValueError as exc:
        raise _sampler_error(exc) from None
    res = model.evaluate(tasks)
    zero = MAML(inner_steps=model.inner_steps, inner_lr=model.inner_lr_, l2=model.l2_, n_iterations=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zero start is a baseline: its step size is the model's
        zero.fit(tasks)
    base = zero.evaluate(tasks)
    diff = paired_difference(res["per_task_accuracy"], base["per_task_accuracy"])
    print(f"{tasks.n_tasks} groups: meta-learned start {100 * res['accuracy']:.1f}% +/- {100 * res['accuracy_ci95']:.1f}; "
          f"zero start with the same steps {100 * base['accuracy']:.1f}% +/- {100 * base['accuracy_ci95']:.1f}; "
          f"difference {100 * diff['mean']:+.1f} +/- {100 * diff['ci95']:.1f} points")
    if args.json:
        import json

        _write_text(args.json, json.dumps(
            {"accuracy": res["accuracy"], "accuracy_ci95": res["accuracy_ci95"], "loss": res["loss"],
             "zero_start_accuracy": base["accuracy"], "zero_start_accuracy_ci95": base["accuracy_ci95"],
             "difference": diff["mean"], "difference_ci95": diff["ci95"], "n_groups": tasks.n_tasks,
             "n_classes": C}, indent=1), "--json")
    return 0


# ------------------------------------------------------------------ one-line messages
def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not text:
        text = type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _warning_text(message, category) -> str:
    from .estimator import StepSizeWarning

    text = " ".join(str(message).split())
    if issubclass(category, StepSizeWarning):
        # the library speaks of the parameter inner_lr; here it is the option --inner-lr
        text = text.replace("inner_lr=", "--inner-lr ").replace("use inner_lr <", "use --inner-lr <")
    return text


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"fastmaml: warning: {_warning_text(message, category)}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, 2 for user errors, 130 for Ctrl-C)."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    from .checkpoint import CheckpointError

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
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
            return EXIT_INTERRUPTED
        except MemoryError as exc:
            print(f"fastmaml: error: not enough memory ({_one_line(exc)}); try smaller sizes or fewer --threads",
                  file=sys.stderr)
            return EXIT_USAGE
        except Warning as exc:  # a warning turned into an error (python -W error): still one line
            print(f"fastmaml: error: {_warning_text(exc, type(exc))}", file=sys.stderr)
            return EXIT_USAGE
        except (CLIError, CheckpointError, ValueError, TypeError, ImportError, OSError, ArithmeticError,
                RecursionError) as exc:
            # ArithmeticError covers DivergenceError (a diverging --inner-lr) and OverflowError
            print(f"fastmaml: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
