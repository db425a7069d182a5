"""The ragged family and its demo, and the selection rule of the digit demo (issue 15, items 3 and 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastmaml import cli, demo
from fastmaml.datasets import RAGGED_BUCKETS, make_grouped_tasks, make_ragged_family
from fastmaml.evaluation import select_candidate


# ------------------------------------------------------------------ the family's stated distribution
@pytest.fixture(scope="module")
def family():
    return make_ragged_family(n_groups=1500, random_state=3)


def test_support_sizes_are_log_uniform_on_2_to_200_per_class(family):
    k = family.shots
    assert k.min() >= 2 and k.max() <= 200
    # log-uniform: each third of [log 2, log 200] holds about a third of the groups (uniform sizes would put
    # about 78% in the top third, (200 - 43) / 198), and the median is near sqrt(2 * 200) = 20, not 100
    counts = np.bincount(family.bucket(), minlength=3) / k.size
    assert np.all(np.abs(counts - 1 / 3) < 0.05), counts
    assert 14 <= np.median(k) <= 28
    assert [tuple(b) for b in RAGGED_BUCKETS] == [(2, 9), (10, 43), (44, 200)]


def test_label_noise_is_uniform_on_0_to_1_per_group(family):
    t = family.noise
    assert t.shape == (1500,) and t.min() >= 0.0 and t.max() <= 1.0
    assert abs(t.mean() - 0.5) < 0.03 and abs(np.mean(t < 0.25) - 0.25) < 0.04


def test_every_task_has_k_rows_of_each_class_and_15_query_rows_of_each(family):
    tasks = family.tasks([0, 1, 2, 1499])
    for i, g in enumerate([0, 1, 2, 1499]):
        Xs, ys, Xq, yq = tasks.task(i)
        assert np.bincount(ys, minlength=2).tolist() == [family.shots[g]] * 2
        assert np.bincount(yq, minlength=2).tolist() == [15, 15]
        assert Xs.shape[1] == 20 and np.all((Xs >= 0) & (Xs <= 1))
        # support and query rows are different rows
        assert not np.any((Xs[:, None, :] == Xq[None, :, :]).all(axis=2))


def test_the_family_is_reproducible_from_its_seed_and_differs_between_seeds(family):
    again = make_ragged_family(n_groups=1500, random_state=3)
    assert np.array_equal(again.X, family.X) and np.array_equal(again.y, family.y)
    assert np.array_equal(again.shots, family.shots) and np.array_equal(again.noise, family.noise)
    other = make_ragged_family(n_groups=1500, random_state=4)
    assert not np.array_equal(other.shots, family.shots)


def test_the_teacher_is_the_grouped_generator_and_is_reused_for_fresh_rows(family):
    # same generator as make_grouped_tasks: a shared teacher of logit std 4 plus deviations of relative size 0.5
    w0, W = family.teacher["w0"], family.teacher["W"]
    assert np.linalg.norm(w0) == pytest.approx(4 * np.sqrt(12))
    assert np.allclose(np.linalg.norm(W - w0, axis=1), 0.5 * 4 * np.sqrt(12))
    # fresh rows of the least noisy group follow its own teacher (and not another group's)
    g = int(np.argmin(family.noise))
    X, y = family.draw(g, 300, random_state=0)
    assert np.bincount(y).tolist() == [300, 300]
    z = X @ W[g] + family.teacher["b"][g]
    assert np.mean((z > 0) == (y == 1)) > 0.97
    fresh = family.fresh_tasks([g, 5], 300, random_state=1)
    Xs, ys, Xq, yq = fresh.task(0)
    assert np.array_equal(Xs, family.tasks([g]).task(0)[0]) and Xq.shape == (600, 20)


def test_make_grouped_tasks_is_unchanged_by_the_shared_generator():
    # values pinned before the generator was shared with the ragged family
    X, y, groups, teacher = make_grouped_tasks(n_groups=3, n_per_group=4, n_features=2, noise=0.5, random_state=0,
                                               return_teacher=True)
    X2, y2, _, t2 = make_grouped_tasks(n_groups=3, n_per_group=4, n_features=2, noise=0.5,
                                       random_state=np.random.default_rng(0), return_teacher=True)
    assert np.array_equal(X, X2) and np.array_equal(y, y2) and np.allclose(teacher["W"], t2["W"])
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(2)
    w0 *= 4 * np.sqrt(12) / np.linalg.norm(w0)
    assert np.allclose(teacher["w0"], w0)


def test_bad_family_settings_are_named():
    with pytest.raises(ValueError, match="shots"):
        make_ragged_family(n_groups=3, shots=(1, 10))
    with pytest.raises(ValueError, match="noise"):
        make_ragged_family(n_groups=3, noise=(0.5, 0.1))
    with pytest.raises(TypeError, match="random_state"):
        make_ragged_family(n_groups=3, random_state=np.random.default_rng(0))
    with pytest.raises(ValueError, match="groups"):
        make_ragged_family(n_groups=3).tasks([3])


# ------------------------------------------------------------------ the selection rule
def _scores(rng, n, **means):
    """Per-task scores around a shared base, each candidate's mean shifted by exactly its given amount."""
    base = 0.2 + 0.6 * rng.random(n)
    out = {}
    for name, m in means.items():
        noise = 0.05 * rng.standard_normal(n)
        out[name] = base + m + noise - noise.mean()
    return out


def test_selection_keeps_the_simplest_candidate_when_the_difference_is_within_the_ci():
    rng = np.random.default_rng(0)
    scores = _scores(rng, 60, zero=0.0, policy=0.004, maml=0.008)
    # the most complex candidate has the highest mean, but not clearly
    assert max(scores, key=lambda n: scores[n].mean()) == "maml"
    chosen, details = select_candidate(scores, ["zero", "policy", "maml"])
    assert chosen == "zero"
    assert details["beaten_by"]["zero"] == []


def test_selection_switches_when_another_candidate_is_clearly_better():
    rng = np.random.default_rng(1)
    scores = _scores(rng, 200, zero=0.0, policy=0.002, maml=0.05)
    chosen, details = select_candidate(scores, ["zero", "policy", "maml"])
    assert chosen == "maml"
    assert "maml" in details["beaten_by"]["zero"] and details["beaten_by"]["maml"] == []
    # the policy, second simplest, is kept when it is the one clearly better than the zero start
    scores = _scores(rng, 200, zero=0.0, policy=0.05, maml=0.052)
    assert select_candidate(scores, ["zero", "policy", "maml"])[0] == "policy"


def test_selection_errors_name_the_argument():
    with pytest.raises(ValueError, match="order"):
        select_candidate({"a": [1.0, 0.0]}, ["a", "b"])
    with pytest.raises(ValueError, match="order"):
        select_candidate({"a": [1.0, 0.0]}, [])


def test_the_digit_demo_reports_its_rule_and_picks_from_the_candidates():
    pytest.importorskip("sklearn")
    cfg = demo.DemoConfig.quick(shots=(2,), n_iterations=4, test_episodes=10, val_episodes=10, random_configs_cap=3,
                                validate_every=2, progress=False, c_grid=(1.0,), data="digits8x8")
    res = demo.run_digit_pairs(cfg, log=None)["shots"]["2"]
    assert res["selection"]["rule"] == "simplest"
    assert res["selected_meta_learner"] in demo.selection_order()
    assert set(res["selection"]["mean"]) == set(demo.selection_order())
    old = demo.run_digit_pairs(cfg.__class__(**dict(cfg.__dict__, selection="best-mean")), log=None)["shots"]["2"]
    assert old["selected_meta_learner"] in demo.meta_learners()


def test_all_pairs_summary_counts_selections_and_finds_the_worst_pair():
    def row(sel, acc_sel, acc_zero):
        return {"1": {"selected": sel, "selected_accuracy": acc_sel, "vs_zero": None, "vs_grid": None,
                      "accuracy": {demo.ZERO: acc_zero, sel: acc_sel}}}

    results = {"pairs": {"0,1": row(demo.ZERO, 0.9, 0.9), "0,2": row(demo.MAML_FIXED, 0.7, 0.75),
                         "1,2": row(demo.ZERO, 0.8, 0.8)}, "total_seconds": 1.0}
    sm = demo.summarize_all_pairs(results)["1"]
    assert sm["selected_counts"] == {demo.ZERO: 2, demo.MAML_FIXED: 1}
    assert sm["worst_pair"] == "0,2" and sm["worst_vs_zero"] == pytest.approx(-0.05)
    assert sm["pairs_losing_over_2_points"] == 1
    assert sm["selected_mean"] == pytest.approx(0.8) and sm["zero_mean"] == pytest.approx(0.8166666, abs=1e-6)
    text = demo.format_all_pairs(results)
    assert "worst pair 0,2 (-5.0 points vs zero init)" in text


# ------------------------------------------------------------------ the demo end to end, through the CLI
@pytest.fixture(scope="module")
def ragged_run(tmp_path_factory):
    pytest.importorskip("sklearn")
    tmp = tmp_path_factory.mktemp("ragged")
    out = tmp / "r.json"
    small = demo.RaggedConfig.quick
    mp = pytest.MonkeyPatch()
    # smaller than --quick (the test machine is shared): the same code path, fewer groups and iterations
    mp.setattr(demo.RaggedConfig, "quick", classmethod(lambda cls, **kw: small.__func__(
        cls, **dict(dict(test_groups=30, val_groups=20, train_groups=40, n_iterations=6, policy_iterations=3,
                         validate_every=3,
                         random_configs_cap=3, c_grid=(1.0,), oracle_rows_per_class=50), **kw))))
    mp.chdir(tmp)
    try:
        code = cli.main(["demo", "--family", "ragged", "--quick", "--no-progress", "--json", str(out)])
    finally:
        mp.undo()
    assert code == 0
    return json.loads(out.read_text()), tmp


def test_ragged_quick_runs_end_to_end_through_the_cli(ragged_run, capsys):
    results, tmp = ragged_run
    assert results["family"] == "ragged" and results["n_test_groups"] == 30
    assert not (tmp / "fastmaml_demo.png").exists()  # the ragged family draws no plot
    table = results["table"]
    expected = {demo.ZERO, demo.GLOBAL, demo.RANDOM, demo.GRID, demo.ORACLE_GRID}
    if results["policy_available"]:
        expected |= {demo.POLICY, demo.GLOBAL_STEPS}
    assert set(table) == expected


def test_ragged_json_holds_per_task_scores_buckets_comparisons_and_compute(ragged_run):
    results, _ = ragged_run
    buckets = np.array(results["bucket_of_task"])
    shots = np.array(results["shots_of_task"])
    assert len(buckets) == 30
    for b, (lo, hi) in enumerate(RAGGED_BUCKETS):
        assert np.all((shots[buckets == b] >= lo) & (shots[buckets == b] <= hi))
    for name, row in results["table"].items():
        acc = np.array(row["per_task"])
        assert acc.shape == (30,) and np.all((acc >= 0) & (acc <= 1))
        assert row["accuracy"] == pytest.approx(acc.mean())
        assert sum(x["n_tasks"] for x in row["by_bucket"]) == 30
        for b, x in enumerate(row["by_bucket"]):
            if x["n_tasks"]:
                assert x["accuracy"] == pytest.approx(acc[buckets == b].mean())
                assert x["seconds_per_task"] > 0
    comp = results["comparisons"]
    assert "oracle vs " + demo.GLOBAL in comp
    if results["policy_available"]:
        for ref in (demo.GLOBAL, demo.GLOBAL_STEPS, demo.GRID):
            d = comp[f"policy vs {ref}"]
            diff = np.array(results["table"][demo.POLICY]["per_task"]) - np.array(results["table"][ref]["per_task"])
            assert d["mean"] == pytest.approx(diff.mean()) and d["ci95"] >= 0 and len(d["by_bucket"]) == 3
        assert "fraction" in comp["gap closed toward the oracle"]
        # the best global setting is the global row with the higher meta-validation score, and the headline
        # comparison and the gap closed are against that row
        bg = results["best_global"]
        vals = {n: results["table"][n]["val_accuracy"] for n in (demo.GLOBAL, demo.GLOBAL_STEPS)}
        assert bg["val_accuracy"] == vals
        assert bg["name"] == (demo.GLOBAL_STEPS if vals[demo.GLOBAL_STEPS] > vals[demo.GLOBAL] else demo.GLOBAL)
        d = comp[f"policy vs {demo.BEST_GLOBAL}"]
        diff = np.array(results["table"][demo.POLICY]["per_task"]) - np.array(results["table"][bg["name"]]["per_task"])
        assert d["reference"] == bg["name"] and d["mean"] == pytest.approx(diff.mean())
        assert comp["gap closed toward the oracle"]["reference"] == bg["name"]
        p = results["power"]
        assert p["validation_groups"] == 20 and p["test_groups"] == 30 and p["validation_sd_difference"] >= 0
    a = results["oracle_analysis"]
    assert a["std_log10_step"] >= 0 and -2 <= a["mean_log10_step"] <= 1
    assert results["summary"] and all(isinstance(line, str) for line in results["summary"])


def test_ragged_policy_and_its_control_start_from_the_fitted_global_model(monkeypatch):
    """With 0 policy iterations the warm-started policy and the per-step control are the global model's setting
    (its theta, its step for every step and task, its L2): they score task for task what the global row scores;
    the JSON names the start and its iterations."""
    if not demo._have_policy():
        pytest.skip("no HyperPolicy in this build")
    monkeypatch.setattr(demo, "_have_sklearn", lambda: False)
    cfg = demo.RaggedConfig.quick(test_groups=30, val_groups=20, train_groups=40, n_iterations=6, policy_iterations=0,
                                  validate_every=3, random_configs_cap=3, oracle_rows_per_class=50, progress=False)
    results = demo.run_ragged(cfg, log=None)
    table = results["table"]
    glob = table[demo.GLOBAL]
    assert glob["choice"]["iterations"] > 0  # a trained start, else the equality below would be trivial
    for name in (demo.POLICY, demo.GLOBAL_STEPS):
        assert table[name]["per_task"] == glob["per_task"], name
        assert table[name]["choice"]["warm_start"] == demo.GLOBAL
        assert table[name]["choice"]["warm_start_iterations"] == glob["choice"]["iterations"]
        assert table[name]["choice"]["l2"] == pytest.approx(glob["choice"]["l2"], rel=1e-12)
    # equal validation scores: the best global setting is the simpler scalar one
    assert results["best_global"]["name"] == demo.GLOBAL


def test_the_best_global_setting_is_chosen_on_meta_validation_scores_only():
    """Rows whose validation and test scores disagree: the choice follows validation, whatever test says;
    a tie keeps the simpler scalar setting; without the control the scalar setting is the only choice."""
    def row(val, test):
        return {"val_accuracy": val, "per_task": [test] * 5, "accuracy": test}

    rows = {demo.GLOBAL: row(0.86, 0.80), demo.GLOBAL_STEPS: row(0.85, 0.90), demo.POLICY: row(0.87, 0.99)}
    assert demo._best_global(rows) == demo.GLOBAL
    rows = {demo.GLOBAL: row(0.85, 0.90), demo.GLOBAL_STEPS: row(0.86, 0.80), demo.ORACLE_GRID: row(None, 1.0)}
    assert demo._best_global(rows) == demo.GLOBAL_STEPS
    assert demo._best_global({demo.GLOBAL: row(0.86, 0.8), demo.GLOBAL_STEPS: row(0.86, 0.9)}) == demo.GLOBAL
    assert demo._best_global({demo.GLOBAL: row(0.5, 0.5)}) == demo.GLOBAL
    # a diverged fit's NaN validation score never wins, wherever it is listed
    assert demo._best_global({demo.GLOBAL: row(float("nan"), 0.99), demo.GLOBAL_STEPS: row(0.6, 0.5)}) \
        == demo.GLOBAL_STEPS


def test_the_power_estimate_is_the_groups_a_target_half_width_needs():
    """n = (1.96 sd / 0.0012)^2 from the validation-side sd of the per-task paired difference: an sd of 2.73
    points (the seed-0 test-side value of policy - per-step control) needs about 1990 groups."""
    rng = np.random.default_rng(0)
    diff = rng.standard_normal(400)
    diff = (diff - diff.mean()) / diff.std(ddof=1) * 0.0273
    p = demo._power(diff, 2000)
    assert p["validation_sd_difference"] == pytest.approx(0.0273)
    assert p["groups_needed"] == int(np.ceil((1.96 * 0.0273 / 0.0012) ** 2)) == 1989
    assert p["expected_half_width"] == pytest.approx(1.96 * 0.0273 / np.sqrt(2000))


def test_ragged_summary_says_loses_when_the_numbers_show_it():
    d_lose = {"mean": -0.02, "ci95": 0.01}
    assert demo._verdict(d_lose, "X").startswith("LOSES to X by 2.0 points")
    assert demo._verdict({"mean": 0.001, "ci95": 0.01}, "X").startswith("is not distinguishable from X")
    assert demo._verdict({"mean": 0.02, "ci95": 0.01}, "X").startswith("beats X by 2.0 points")


def test_ragged_rejects_digit_only_options(capsys):
    assert cli.main(["demo", "--family", "ragged", "--holdout", "2,3"]) == 2
    assert "--family digits" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--backbone", "cnn", "--plot", "y.png"], "--plot: --backbone cnn draws no plot"),
    (["--all-pairs", "--plot", "fastmaml_demo.png"], "--plot: --all-pairs draws no plot"),
    (["--family", "ragged", "--plot", "fastmaml_demo.png"], "--plot: --family ragged draws no plot"),
    (["--family", "ragged", "--selection", "best-mean"], "--selection: --family ragged selects no meta-learner"),
    (["--backbone", "cnn", "--selection", "simplest"], "--selection: --backbone cnn selects no meta-learner"),
    (["--backbone", "cnn", "--family", "ragged"], "not --family ragged"),
])
def test_demo_refuses_options_the_run_would_silently_ignore(argv, match, capsys):
    """A newcomer's --plot or --selection that a run would ignore is refused in one line, before any
    computing (an explicit default value included)."""
    from fastmaml import cli

    assert cli.main(["demo", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
