"""The digit demo's validation protocol for the selection rule, and the all-pairs sweep's rows (issue 15).

The rule's interval is over pairs of validation digits, on episodes that chose nothing else.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fastmaml import EpisodeSampler, demo
from fastmaml.datasets import load_digits_dataset


def _tiny(**overrides):
    base = dict(shots=(2,), n_iterations=4, test_episodes=10, val_episodes=12, random_configs_cap=3,
                validate_every=2, progress=False, c_grid=(1.0,), data="digits8x8")
    base.update(overrides)
    return demo.DemoConfig.quick(**base)


def _capture_shots(monkeypatch):
    """Run the demo as is, keeping every _Shot it builds."""
    shots = []
    real = demo._run_shot

    def spy(shot):
        shots.append(shot)
        return real(shot)

    monkeypatch.setattr(demo, "_run_shot", spy)
    return shots


def test_quick_validates_on_several_digit_pairs_like_the_full_run():
    # one fold of the 8 meta-training digits holds out 2 of them: a single validation pair, on which the
    # rule's interval over pairs can show nothing
    quick = demo.DemoConfig.quick()
    assert quick.val_folds == demo.DemoConfig().val_folds >= 2
    folds = demo._validation_folds(list(range(2, 10)), 2, quick.val_folds, quick.seed)
    pairs = [p for vd in folds for p in itertools.combinations(vd, 2)]
    assert len(pairs) >= 6


def test_selection_scores_fresh_episodes_of_the_validation_digits_grouped_by_pair(monkeypatch):
    pytest.importorskip("sklearn")
    shots = _capture_shots(monkeypatch)
    res = demo.run_digit_pairs(_tiny(), log=None)
    (shot,) = shots
    folds = res["validation_folds"]
    assert len(shot.sel_sets) == len(shot.val_sets) == len(folds) == 2
    seen = set()
    for f, (val, sel) in enumerate(zip(shot.val_sets, shot.sel_sets)):
        assert sel.n_tasks == val.n_tasks == 12
        # not the episodes that chose the step sizes and stopping iterations
        assert not np.array_equal(sel.support.idx, val.support.idx)
        n = sel.n_tasks
        pairs = shot.sel_groups[sum(s.n_tasks for s in shot.sel_sets[:f]):][:n]
        assert set(np.unique(pairs)) <= set(folds[f])  # classes of this fold's validation digits only
        assert np.all(pairs[:, 0] < pairs[:, 1])  # unordered pairs: 2 vs 4 and 4 vs 2 are one group
        seen |= {tuple(p) for p in pairs}
    selection = res["shots"]["2"]["selection"]
    assert selection["n_groups"] == len(seen) >= 2
    assert selection["n_episodes"] == 24
    assert set(selection["vs_zero"]) == set(demo.selection_order()) - {demo.ZERO}
    for name, d in selection["vs_zero"].items():
        assert d["n_groups"] == len(seen)
        assert d["mean"] == pytest.approx(selection["mean"][name] - selection["mean"][demo.ZERO], abs=1e-12)


def test_the_choosing_episodes_are_those_of_the_protocol_before_the_selection_episodes(monkeypatch):
    # drawing the selection episodes after them leaves the step sizes and stopping iterations as they were
    pytest.importorskip("sklearn")
    shots = _capture_shots(monkeypatch)
    cfg = _tiny()
    demo.run_digit_pairs(cfg, log=None)
    (shot,) = shots
    data = load_digits_dataset("digits8x8")
    train_digits = [c for c in range(10) if c not in cfg.holdout]
    for f, vd in enumerate(demo._validation_folds(train_digits, 2, cfg.val_folds, cfg.seed)):
        alone = EpisodeSampler(data.X, data.y, n_way=2, k_shot=2, n_query=cfg.n_query, classes=vd,
                               random_state=shot.seeds[5 + 2 * f]).sample(cfg.val_episodes)
        assert np.array_equal(alone.support.idx, shot.val_sets[f].support.idx)
        assert np.array_equal(alone.query.idx, shot.val_sets[f].query.idx)


def test_one_validation_pair_keeps_the_zero_start():
    # one fold of two digits: every selection episode is the same pair, from which no win can be generalised
    pytest.importorskip("sklearn")
    res = demo.run_digit_pairs(_tiny(val_folds=1), log=None)["shots"]["2"]
    assert res["selection"]["n_groups"] == 1
    assert res["selected_meta_learner"] == demo.ZERO
    assert all(np.isnan(d["ci95"]) for d in res["selection"]["vs_zero"].values())


def test_all_pairs_rows_carry_what_validation_said(monkeypatch):
    def fake(config, log=None):
        a, b = config.holdout
        table = {n: {"accuracy": 0.5 + 0.01 * a, "vs_zero": {"mean": 0.0, "ci95": 0.0}, "vs_grid": None}
                 for n in demo.selection_order()}
        selection = {"rule": "simplest", "mean": {n: 0.7 for n in demo.selection_order()}, "n_groups": 12,
                     "n_episodes": 80, "beaten_by": {}, "vs_zero": {demo.POLICY: {"mean": 0.0, "ci95": 0.01}}}
        return {"validation_folds": [[c] for c in range(10) if c not in (a, b)],
                "shots": {"1": {"table": table, "selected_meta_learner": demo.ZERO, "selection": selection}}}

    monkeypatch.setattr(demo, "run_digit_pairs", fake)
    out = demo.run_all_pairs(demo.DemoConfig.quick(data="digits8x8"), log=None)
    assert len(out["pairs"]) == 45
    row = out["pairs"]["5,7"]["1"]
    assert row["validation"]["n_groups"] == 12 and row["validation"]["n_episodes"] == 80
    assert row["validation"]["vs_zero"][demo.POLICY]["ci95"] == 0.01
    assert [5] not in row["validation_folds"] and [7] not in row["validation_folds"]
    assert "beaten_by" not in row["validation"]
