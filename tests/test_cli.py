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
            assert len(table[name]["per_task"]) == 100
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
            demo.MAML_FIXED: {"accuracy": 0.80, "ci95": 0.01, "vs_zero": {"mean": -0.05, "ci95": 0.01},
                                    "vs_grid": {"mean": 0.0, "ci95": 0.02}},
            demo.ZERO: {"accuracy": 0.85, "ci95": 0.01, "vs_zero": {"mean": 0, "ci95": 0},
                              "vs_grid": {"mean": 0.05, "ci95": 0.01}},
            demo.GRID: {"accuracy": 0.80, "ci95": 0.01, "vs_zero": None, "vs_grid": None},
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
    np.savez(bad_labels, X=np.zeros((4, 2)), y=np.array([0, 1, 2, 0]), groups=np.array([0, 0, 1, 1]))
    not_model = tmp_path / "model.npz"
    not_model.write_bytes(b"garbage")
    cases = [
        (["train", str(bad_csv), "--out", "m.npz"], "--group-col"),
        (["train", str(bad_labels), "--out", "m.npz"], "labels must be 0 or 1"),
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
