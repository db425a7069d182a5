"""Fuzzing the command line's argument surface (issue 11).

Every option that ``fastmaml train / evaluate / demo --help`` lists is given
random values (valid, out of range, non-numbers, NaN, huge, paths that are
missing, folders or unwritable) and ``cli.main(argv)`` runs in-process on
small data. Every outcome must be exit 0, or exit 2 with a one-line error;
never a traceback (an exception out of ``main``) or any other status.

Budget: FASTMAML_FUZZ_EXAMPLES examples per command (default 15, a few
seconds each at most); CI's longer run: FASTMAML_FUZZ_EXAMPLES=300.
Options whose valid values only cost time (--iterations, --inner-steps, ...)
get small valid values or invalid ones, so that an example stays fast. The
demo's computation is replaced by one tiny real run made once (its path
checks, argument checks and output writing are what run per example).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os

import numpy as np
import pytest

from fastmaml import cli, demo

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("sklearn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("FASTMAML_FUZZ_EXAMPLES", "15"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FASTMAML_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])

# options whose valid values cost run time: small valid values only (plus the invalid ones)
COSTLY = {"--iterations": 8, "--inner-steps": 6, "--meta-batch-size": 64, "--test-episodes": 20,
          "--shard-size": 64}

JUNK = st.sampled_from(["", "-1", "0", "1e30", "inf", "-inf", "nan", "2147483648", "9" * 40, "abc", "0.5",
                        "1,2", "é", "--", "-", "1.5", "1e-300", " 3", "0x10", "None"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    from fastmaml.datasets import make_grouped_tasks

    X, y, groups = make_grouped_tasks(n_groups=24, n_per_group=12, n_features=3, random_state=0)
    np.savez(root / "data.npz", X=X, y=y, groups=groups)
    with open(root / "data.csv", "w") as fh:
        fh.write("id,a,b,c,label,group\n")
        for i in range(len(y)):
            fh.write(f"r{i},{X[i, 0]},{X[i, 1]},{X[i, 2]},{int(y[i])},g{int(groups[i])}\n")
    (root / "header_only.csv").write_text("a,label,group\n")
    (root / "garbage.npz").write_bytes(b"PK\x03\x04 not really")
    (root / "a_folder").mkdir()
    (root / "a_file").write_text("x")
    assert cli.main(["train", str(root / "data.npz"), "--out", str(root / "model.npz"), "--iterations", "3",
                     "--no-progress"]) == 0
    tiny = demo.DemoConfig.quick(data="digits8x8", shots=(1,), n_iterations=2, test_episodes=6, val_episodes=6,
                                 random_configs_cap=2, validate_every=1, progress=False, c_grid=(1.0,))
    canned = demo.run_digit_pairs(tiny, log=None)
    return root, canned


def _paths(root):
    return st.sampled_from([str(root / n) for n in ("data.npz", "data.csv", "header_only.csv", "garbage.npz",
                                                    "a_folder", "a_file", "model.npz", "missing.npz",
                                                    "a_file/below.npz", "missing_dir/x.npz", "out.npz", "out.json",
                                                    "out", "out.png", "out.xyz")])


def _value(action, root):
    """A strategy of values for one option."""
    if action.choices:
        return st.one_of(st.sampled_from(sorted(action.choices)), JUNK)
    name = action.option_strings[0] if action.option_strings else action.dest
    if name in COSTLY:
        return st.one_of(st.integers(1, COSTLY[name]).map(str), JUNK)
    if name in ("--out", "--json", "--plot", "--checkpoint", "--data", "data", "model"):
        return st.one_of(_paths(root), JUNK)
    if name in ("--label-col", "--group-col", "--feature-cols", "--ignore-cols"):
        return st.one_of(st.sampled_from(["label", "group", "id", "a", "a,b", "c,a", "id,zzz", "label,a", ","]), JUNK)
    if name == "--scheduler":
        return st.sampled_from(["tcp://127.0.0.1:9", "not a url"])
    if name == "--holdout":
        return st.one_of(st.sampled_from(["2,3", "2", "2,42", "3,3", "2,3,5", "0,1"]), JUNK)
    if name == "--shots":
        return st.one_of(st.sampled_from(["1", "1,2", "0", "1000"]), JUNK)
    return st.one_of(st.integers(-3, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                     JUNK)


def _argv(command, root):
    sub = cli._subparsers_of(cli._build_parser())[command]

    @st.composite
    def build(draw):
        argv = [command]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                if action.dest in ("scheduler", "data") and command == "demo" and not draw(st.booleans()):
                    continue
                if not (action.required or draw(st.integers(0, 3)) == 0):
                    continue
                flag = action.option_strings[0]
                if action.nargs == 0:
                    argv.append(flag)
                else:
                    argv += [flag, draw(_value(action, root))]
            else:
                argv.append(draw(_value(action, root)))
        return argv

    return build()


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)  # an exception escaping main is the failure hypothesis reports
    return code, out.getvalue(), err.getvalue()


def _check(argv, code, err):
    assert code in (0, 2), (argv, code, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert all(ln.startswith("fastmaml") for ln in lines), (argv, err)  # errors, warnings, notes: one line each
    assert "Traceback" not in err
    if code == 2:
        errors = [ln for ln in lines if "error:" in ln]
        assert len(errors) == 1, (argv, err)


def test_fuzz_train(world, monkeypatch):
    root, _ = world
    monkeypatch.chdir(root)

    @FUZZ
    @given(argv=_argv("train", root))
    def run(argv):
        if "--scheduler" in argv:  # no cluster here: only the argument checks before connecting
            argv = argv + ["--shard-size", "7"]
        code, _, err = _run(argv)
        _check(argv, code, err)

    run()


def test_fuzz_evaluate(world, monkeypatch):
    root, _ = world
    monkeypatch.chdir(root)

    @FUZZ
    @given(argv=_argv("evaluate", root))
    def run(argv):
        code, _, err = _run(argv)
        _check(argv, code, err)

    run()


def test_fuzz_demo(world, monkeypatch):
    root, canned = world
    monkeypatch.chdir(root)
    for name in ("run_digit_pairs", "run_grouped", "run_all_pairs", "run_ragged"):
        monkeypatch.setattr(demo, name, lambda config, log=None, **kw: canned)
    monkeypatch.setattr(demo, "format_all_pairs", lambda r: "pairs")
    monkeypatch.setattr(demo, "format_ragged", lambda r: "ragged")
    # --backbone cnn: its argument checks run; its computing (torch, when installed) is canned too
    from fastmaml import anil

    monkeypatch.setattr(anil, "run_cnn_demo", lambda config, log=None: canned)
    monkeypatch.setattr(anil, "format_table", lambda r: "cnn")
    monkeypatch.setattr(anil, "to_json", lambda r: "{}")

    @FUZZ
    @given(argv=_argv("demo", root))
    def run(argv):
        code, _, err = _run(argv)
        _check(argv, code, err)

    run()
