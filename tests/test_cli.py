"""The command line and the demo, end to end on small data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fastmaml import cli, demo
from fastmaml.datasets import make_grouped_tasks

pytest.importorskip("sklearn")


def fastmaml_exe():
    exe = shutil.which("fastmaml")
    return [exe] if exe else [sys.executable, "-m", "fastmaml.cli"]


def test_demo_quick_on_the_8x8_fallback_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json = tmp_path / "r.json"
    png = tmp_path / "p.png"
    code = cli.main(["demo", "--quick", "--data", "digits8x8", "--shots", "1,5", "--json", str(out_json),
                     "--plot", str(png), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "K = 1 shots" in text and "K = 5 shots" in text
    assert "oracle" in text and "Summary" in text
    results = json.loads(out_json.read_text())
    assert png.stat().st_size > 10_000
    for K in ("1", "5"):
        table = results["shots"][K]["table"]
        for name in (demo.ZERO, demo.PRETRAINED, demo.MAML_FIXED, demo.MAML_LEARNED,
                     demo.METASGD, demo.RANDOM, demo.ORACLE):
            assert 0.0 <= table[name]["accuracy"] <= 1.0
            assert len(table[name]["per_task"]) == demo.DemoConfig.quick().test_episodes
        grid = demo.GRID_K1 if K == "1" else demo.GRID
        assert grid in table
        # the oracle picks C on the query set, so it can never lose to the grid search
        assert table[demo.ORACLE]["accuracy"] >= table[grid]["accuracy"]
    # validation never used the test pair
    assert all(2 not in fold and 3 not in fold for fold in results["validation_folds"])
    assert len(results["summary"]) == 2


def test_summary_reports_a_loss_when_the_baseline_wins():
    fake = {"shots": {"5": {
        "selected_meta_learner": demo.MAML_FIXED,
        "grid_method": demo.GRID,
        "table": {
            demo.MAML_FIXED: {"accuracy": 0.80, "accuracy_ci95": 0.01, "vs_zero": {"mean": -0.05, "ci95": 0.01},
                                    "vs_grid": {"mean": 0.0, "ci95": 0.02}},
            demo.ZERO: {"accuracy": 0.85, "accuracy_ci95": 0.01, "vs_zero": {"mean": 0, "ci95": 0},
                              "vs_grid": {"mean": 0.05, "ci95": 0.01}},
            demo.GRID: {"accuracy": 0.80, "accuracy_ci95": 0.01, "vs_zero": None, "vs_grid": None},
        }}}}
    (line,) = demo.summarize(fake)
    assert "LOSES to zero init by 5.0 points" in line
    assert "not distinguishable from grid-search" in line
    assert "Best non-oracle method on the held-out classes: zero init" in line


def test_grouped_family_meta_learning_beats_the_zero_start(capsys):
    cfg = demo.DemoConfig.quick(shots=(2,), test_episodes=150, progress=False)
    res = demo.run_grouped(cfg, n_groups=150, log=None)
    table = res["shots"]["2"]["table"]
    d = table[demo.MAML_FIXED]["vs_zero"]
    assert d["mean"] - d["ci95"] > 0.05, d


@pytest.fixture
def table_file(tmp_path):
    X, y, groups = make_grouped_tasks(n_groups=60, n_per_group=30, n_features=6, random_state=0)
    path = tmp_path / "data.npz"
    np.savez(path, X=X, y=y, groups=groups)
    csv = tmp_path / "data.csv"
    header = ",".join([f"f{i}" for i in range(6)] + ["label", "group"])
    np.savetxt(csv, np.column_stack([X, y, groups]), delimiter=",", header=header, comments="")
    return path, csv


def test_train_then_evaluate_on_npz_and_csv(table_file, tmp_path, capsys):
    npz, csv = table_file
    model = tmp_path / "model.npz"
    assert cli.main(["train", str(npz), "--out", str(model), "--iterations", "40", "--no-progress"]) == 0
    assert "model saved" in capsys.readouterr().out
    out_json = tmp_path / "ev.json"
    assert cli.main(["evaluate", str(model), str(csv), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "meta-learned start" in text and "zero start" in text
    assert json.loads(out_json.read_text())["n_groups"] == 60


@pytest.mark.parametrize("extra", [["--algorithm", "imaml"], ["--algorithm", "reptile"],
                                   ["--learn-inner-lr", "preconditioner"], ["--algorithm", "fomaml"]])
def test_train_runs_every_algorithm_from_the_cli(table_file, tmp_path, capsys, extra):
    npz, _ = table_file
    assert cli.main(["train", str(npz), "--out", str(tmp_path / "m.npz"), "--iterations", "10", "--no-progress"]
                    + extra) == 0
    assert "model saved" in capsys.readouterr().out


def test_a_meta_batch_larger_than_the_training_groups_says_it_uses_them_all(table_file, tmp_path, capsys):
    npz, _ = table_file
    args = ["train", str(npz), "--out", str(tmp_path / "m.npz"), "--iterations", "3", "--no-progress"]
    assert cli.main(args + ["--meta-batch-size", "500"]) == 0
    from fastmaml import MAML

    # 60 groups, 20% held out for meta-validation: 48 training groups
    assert "--meta-batch-size 500 is more than the 48 training groups" in capsys.readouterr().err
    assert MAML.load(str(tmp_path / "m.npz")).meta_batch_size == 48
    assert cli.main(args + ["--meta-batch-size", "16"]) == 0
    assert "--meta-batch-size" not in capsys.readouterr().err


def test_train_resumes_from_a_checkpoint(table_file, tmp_path, capsys):
    npz, _ = table_file
    ckpt = tmp_path / "ckpt.npz"
    args = ["train", str(npz), "--out", str(tmp_path / "m.npz"), "--checkpoint", str(ckpt), "--no-progress"]
    assert cli.main(args + ["--iterations", "20"]) == 0
    assert cli.main(args + ["--iterations", "30", "--resume"]) == 0
    assert "trained 30 iterations" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["demo", "--holdout", "2"], "expected 2 different classes"),
        (["demo", "--ways", "3", "--holdout", "2,3"], "expected 3 different classes"),
        (["demo", "--shots", "a,b"], "comma-separated integers"),
        (["demo", "--iterations", "0"], "positive integer"),
        (["demo", "--data", "/no/such/folder", "--quick"], "/no/such/folder"),
        (["demo", "--holdout", "2,42", "--quick", "--data", "digits8x8"], "holdout"),
        (["train", "/no/such.npz", "--out", "m.npz"], "no such file"),
        (["evaluate", "/no/model.npz", "/no/data.npz"], "no such"),
    ],
)
def test_bad_arguments_give_one_line_errors_and_nonzero_exit(argv, match, tmp_path):
    proc = subprocess.run(fastmaml_exe() + argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert match in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_files_give_one_line_errors(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a,b,label\n1,2,0\n")
    bad_labels = tmp_path / "lab.npz"
    np.savez(bad_labels, X=np.zeros((4, 2)), y=np.array([0, 2, 2, 0]), groups=np.array([0, 0, 1, 1]))
    not_model = tmp_path / "model.npz"
    not_model.write_bytes(b"garbage")
    cases = [
        (["train", str(bad_csv), "--out", "m.npz"], "--group-col"),
        (["train", str(bad_labels), "--out", "m.npz"], "labels must be 0..C-1 with every class present"),
        (["evaluate", str(not_model), str(bad_labels)], "corrupt"),
    ]
    for argv, match in cases:
        proc = subprocess.run(fastmaml_exe() + argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert match in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_info_prints_the_configuration(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "openmp" in out and "max_threads" in out


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch, tmp_path):
    from fastmaml import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.plot_results({"shots": {}}, str(tmp_path / "p.png"))


def test_demo_is_a_client_of_the_public_api():
    """No private module, name or attribute: what the demo does, a user can do."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(demo))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert not (node.module or "").startswith("_"), node.module
            assert not any(alias.name.startswith("_") for alias in node.names), ast.dump(node)
        if isinstance(node, ast.Attribute):
            assert not node.attr.startswith("_") or node.attr.startswith("__"), node.attr


# ---------------------------------------------------------------- help, version, one-line messages
def _subparsers(parser):
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_option_of_every_command_has_help_text_that_states_its_default():
    """A new user reads what each option does and what happens without it (issue 12)."""
    import argparse

    parser = cli._build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"demo", "train", "evaluate", "info"}
    for name, sub in commands.items():
        assert sub.description, f"{name} has no description"
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and len(action.help) > 10, f"{name} {label}: no help text"
            if action.option_strings and not isinstance(action, argparse._StoreTrueAction) and not action.required:
                # either argparse's "(default: X)" or the help's own words about the default
                shown = action.help if action.default is None else sub._get_formatter()._get_help_string(action)
                assert "default" in shown, f"{name} {label}: the default is not stated"
        assert "%(default)" not in text


def test_help_of_every_command_shows_its_defaults(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 500)" in out and "(default: 0.1)" in out and "(default: 0)" in out
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "fastmaml_demo.png" in out and "'.png' is added" in out


def test_version_prints_the_installed_version(capsys):
    import fastmaml

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastmaml {fastmaml.__version__}"
    proc = subprocess.run(fastmaml_exe() + ["--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fastmaml {fastmaml.__version__}"


def test_usage_errors_are_one_line_with_exit_2(capsys):
    assert cli.main(["train", "x.npz"]) == 2  # --out missing
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--out" in err and "usage" not in err


@pytest.mark.parametrize("argv, match", [
    (["train", "d.npz", "--out", "m.npz", "--threads", "2147483648"], "--threads"),
    (["train", "d.npz", "--out", "m.npz", "--support-size", "inf"], "--support-size"),
    (["train", "d.npz", "--out", "m.npz", "--support-size", "1e30"], "--support-size"),
    (["train", "d.npz", "--out", "m.npz", "--support-size", "nan"], "--support-size"),
    (["train", "d.npz", "--out", "m.npz", "--inner-lr", "nan"], "--inner-lr"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--seed", "-1"], "--seed"),
    (["evaluate", "m.npz", "d.npz", "--seed", "1e3"], "--seed"),
])
def test_out_of_range_numbers_are_refused_by_name_in_one_line(argv, match, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err


def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(str(v) for v in r) for r in rows]) + "\n")


def _three_class_table(n_groups=40, n_per_group=30, d=5, seed=0):
    """Every group holds all three classes (labels by tertile of a shared score)."""
    X, _, groups = make_grouped_tasks(n_groups=n_groups, n_per_group=n_per_group, n_features=d, random_state=seed)
    score = X @ np.random.default_rng(seed + 1).standard_normal(d)
    y = np.zeros(len(X), dtype=np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        rank = np.argsort(np.argsort(score[idx]))
        y[idx] = 3 * rank // len(idx)
    return X, y, groups


def test_n_way_train_and_evaluate_on_a_small_file(tmp_path, capsys):
    X, y, groups = _three_class_table()
    data = tmp_path / "three.npz"
    np.savez(data, X=X, y=y, groups=groups)
    model_path = tmp_path / "m3.npz"
    assert cli.main(["train", str(data), "--out", str(model_path), "--iterations", "30", "--no-progress"]) == 0
    assert "(3-way)" in capsys.readouterr().out
    from fastmaml import MAML

    model = MAML.load(str(model_path))
    assert model.n_classes_ == 3 and model.theta_.shape == (X.shape[1] + 1, 3)  # softmax, not sigmoid
    out_json = tmp_path / "e.json"
    assert cli.main(["evaluate", str(model_path), str(data), "--json", str(out_json)]) == 0
    scores = json.loads(out_json.read_text())
    assert scores["n_classes"] == 3 and 0 <= scores["accuracy"] <= 1
    assert "accuracy_ci95" in scores and "ci95" not in scores  # the public name, as MAML.evaluate returns
    # a binary file against a 3-way model is refused in one line
    binary = tmp_path / "bin.npz"
    np.savez(binary, X=X, y=(y > 0).astype(int), groups=groups)
    assert cli.main(["evaluate", str(model_path), str(binary)]) == 2
    assert "3-way" in capsys.readouterr().err


def test_csv_with_an_id_column_text_groups_and_named_columns(tmp_path, capsys):
    X, y, groups = make_grouped_tasks(n_groups=40, n_per_group=20, n_features=3, random_state=0)
    header = ["id", "a", "b", "c", "site", "outcome"]
    rows = [[f"row-{i}", *X[i], f"site-{int(groups[i])}", int(y[i])] for i in range(len(y))]
    csv_path = tmp_path / "data.csv"
    _write_csv(csv_path, header, rows)
    base = ["train", str(csv_path), "--out", str(tmp_path / "m.npz"), "--label-col", "outcome",
            "--group-col", "site", "--iterations", "5", "--no-progress"]
    # an id column that is not skipped: one line naming the column and the two ways out
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert "'id'" in err and "--ignore-cols id" in err and "--feature-cols" in err and len(err.splitlines()) == 1
    assert cli.main(base + ["--ignore-cols", "id"]) == 0
    capsys.readouterr()
    from fastmaml import MAML

    assert MAML.load(str(tmp_path / "m.npz")).n_features_in_ == 3
    # --feature-cols picks a subset, in the order given
    X2, y2, g2 = cli.load_table(str(csv_path), "outcome", "site", feature_cols=("c", "a"))
    np.testing.assert_array_equal(X2, X[:, [2, 0]])
    np.testing.assert_array_equal(y2, y)
    assert g2[0] == f"site-{int(groups[0])}"
    assert cli.main(base + ["--feature-cols", "a,zzz"]) == 2
    assert "--feature-cols: column 'zzz'" in capsys.readouterr().err
    # a column named twice would silently train on a duplicated feature
    assert cli.main(base + ["--feature-cols", "a,c,a"]) == 2
    err = capsys.readouterr().err
    assert "--feature-cols" in err and "'a' is named twice" in err and len(err.splitlines()) == 1
    with pytest.raises(cli.CLIError, match="--feature-cols: column 'c' is named twice"):
        cli.load_table(str(csv_path), "outcome", "site", feature_cols=("c", "a", "c"))


def test_a_csv_with_only_a_header_is_one_line_and_no_numpy_warning(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("a,b,label,group\n")
    proc = subprocess.run(fastmaml_exe() + ["train", str(path), "--out", "m.npz"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fastmaml: error: data: {str(path)!r} has a header but no data rows"]


def test_step_size_warning_is_one_line_naming_the_option(table_file, tmp_path):
    npz, _ = table_file
    proc = subprocess.run(fastmaml_exe() + ["train", str(npz), "--out", str(tmp_path / "m.npz"), "--iterations", "3",
                                            "--inner-lr", "1000", "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = proc.stderr.strip().splitlines()
    warning = [ln for ln in lines if "warning" in ln]
    assert len(warning) == 1, proc.stderr
    assert warning[0].startswith("fastmaml: warning: --inner-lr 1e+03") and "use --inner-lr <" in warning[0]
    assert "inner_lr" not in proc.stderr and "warnings.warn" not in proc.stderr and ".py:" not in proc.stderr


def test_sampler_advice_speaks_of_cli_options_not_library_arguments(table_file, tmp_path, capsys):
    npz, _ = table_file
    assert cli.main(["train", str(npz), "--out", str(tmp_path / "m.npz"), "--support-size", "30"]) == 2
    err = capsys.readouterr().err
    assert "groups_subset" not in err and "--support-size" in err and len(err.strip().splitlines()) == 1


def test_train_out_in_a_missing_folder_fails_before_training_and_creates_nothing(table_file, tmp_path, capsys):
    npz, _ = table_file
    missing = tmp_path / "no_such_dir"
    assert cli.main(["train", str(npz), "--out", str(missing / "m.npz"), "--iterations", "5"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()
    assert cli.main(["train", str(npz), "--out", str(tmp_path), "--iterations", "5"]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("edit", ["infinite_n_features", "nested"])
def test_edited_model_metadata_is_one_line_exit_2(table_file, tmp_path, capsys, edit):
    npz, _ = table_file
    good = tmp_path / "m.npz"
    assert cli.main(["train", str(npz), "--out", str(good), "--iterations", "3", "--no-progress"]) == 0
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    if edit == "infinite_n_features":
        text = json.dumps(meta).replace(f'"n_features": {meta["n_features"]}', '"n_features": Infinity')
        assert "Infinity" in text
    else:
        text = json.dumps(meta)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    arrays["__meta__"] = np.frombuffer(text.encode(), dtype=np.uint8)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    capsys.readouterr()
    code = cli.main(["evaluate", str(bad), str(npz)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fastmaml: error:")


# ---------------------------------------------------------------- demo output paths (checked first)
@pytest.fixture
def no_demo_run(monkeypatch):
    """The demo's computation replaced by a tripwire: a path check must come before it."""
    calls = []

    def tripwire(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the demo ran before its output paths were checked")

    for name in ("run_digit_pairs", "run_grouped", "run_all_pairs"):
        monkeypatch.setattr(demo, name, tripwire)
    return calls


@pytest.mark.parametrize("option, make_path, match", [
    ("--json", lambda t: t / "missing_dir" / "r.json", "does not exist"),
    ("--json", lambda t: t, "is a folder"),
    ("--json", lambda t: t / "a_file.txt" / "r.json", "does not exist"),
    ("--plot", lambda t: t / "missing_dir" / "p.png", "does not exist"),
    ("--plot", lambda t: t / "p.xyz", "cannot write a '.xyz' image"),
])
def test_demo_refuses_unwritable_outputs_before_computing(option, make_path, match, tmp_path, no_demo_run, capsys):
    (tmp_path / "a_file.txt").write_text("x")
    code = cli.main(["demo", "--quick", option, str(make_path(tmp_path)), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and not no_demo_run
    assert option in err and match in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def fake_demo(monkeypatch):
    """A finished demo run with canned numbers (the CLI's handling of its outputs is under test)."""
    results = {"shots": {}, "marker": 42}
    monkeypatch.setattr(demo, "run_digit_pairs", lambda config, log=None: results)
    monkeypatch.setattr(demo, "format_table", lambda r: "the table")
    return results


def test_demo_writes_the_json_before_the_plot(fake_demo, monkeypatch, tmp_path, capsys):
    from fastmaml import plots

    out_json = tmp_path / "r.json"

    def failing_plot(results, path):
        assert out_json.exists(), "the plot was drawn before the JSON was written"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_results", failing_plot)
    code = cli.main(["demo", "--json", str(out_json), "--plot", str(tmp_path / "p.png"), "--no-progress"])
    assert code == 2
    assert json.loads(out_json.read_text())["marker"] == 42  # the numbers survive a failed plot
    assert "No space left" in capsys.readouterr().err


def test_demo_plot_without_extension_reports_the_file_it_wrote(fake_demo, monkeypatch, tmp_path, capsys):
    from fastmaml import plots

    written = []
    monkeypatch.setattr(plots, "plot_results", lambda results, path: written.append(path))
    target = tmp_path / "myplot"
    assert cli.main(["demo", "--plot", str(target), "--no-progress"]) == 0
    assert written == [str(target) + ".png"]
    assert f"plot written to {target}.png" in capsys.readouterr().out


def test_ctrl_c_during_demo_meta_training_stops_it_with_exit_130(tmp_path):
    """Ctrl-C while a meta-learner trains: no table, no JSON, exit 130 (issue 11); never a silently different table."""
    import os
    import signal
    import time

    out_json = tmp_path / "r.json"
    proc = subprocess.Popen(fastmaml_exe() + ["demo", "--quick", "--data", "digits8x8", "--shots", "1",
                                              "--iterations", "100000", "--json", str(out_json), "--plot", "",
                                              "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        seen = ""
        while "jointly pre-trained start" not in seen:  # MAML.fit of the pre-trained start: 100000 iterations
            line = proc.stderr.readline()
            assert line, f"the demo ended early: {seen}"
            seen += line
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    assert "K = 1 shots" not in out and not out_json.exists()


def test_import_from_the_checkout_root_explains_the_shadowing_source_tree():
    """From the checkout's root, the source folder (no extension) hides the installed package: say so."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", "import fastmaml"], capture_output=True, text=True, cwd=root,
                          timeout=120)
    if proc.returncode == 0:
        pytest.skip("the source tree holds a built extension here (an in-place build)")
    assert "source tree" in proc.stderr and "another folder" in proc.stderr
    assert "Did you build it" not in proc.stderr


def test_dir_of_the_package_lists_no_import_helpers():
    import fastmaml

    assert "annotations" not in dir(fastmaml) and "PackageNotFoundError" not in dir(fastmaml)


def test_memory_benchmark_script_honours_help_and_reports_a_child_failure(tmp_path):
    import os

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "memory_imaml.py")
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout and "algorithm" not in proc.stdout
    proc = subprocess.run([sys.executable, script, "--ks", "-5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "child failed" in proc.stderr
    assert "CalledProcessError" not in proc.stderr


def test_progress_bar_redraws_are_throttled(monkeypatch):
    """3,000 fast iterations once drew ~3,100 frames (520 KB of terminal output): redraws follow mininterval."""
    import functools
    import io

    tqdm_auto = pytest.importorskip("tqdm.auto")
    from fastmaml import MAML, Tasks

    buf = io.StringIO()
    monkeypatch.setattr(tqdm_auto, "tqdm", functools.partial(tqdm_auto.tqdm, file=buf))
    rng = np.random.default_rng(0)
    T, n, m, d = 8, 4, 4, 3
    tasks = Tasks(rng.random((T, n, d)), rng.integers(0, 2, (T, n)), rng.random((T, m, d)), rng.integers(0, 2, (T, m)))
    MAML(n_iterations=3000, progress=True, meta_batch_size=8, inner_steps=1).fit(tasks)
    # at most one frame per 0.5 s (plus first and last); a frame per iteration would be 3,000
    assert buf.getvalue().count("\r") < 300
