"""Regressions found by adversarial review (session 4): fit(init=...) warm starts and grouped intervals."""

from __future__ import annotations

import numpy as np
import pytest

import fastmaml
from fastmaml.evaluation import mean_ci, paired_difference, select_candidate


def _sampler(seed=0, d=5):
    X, y, g = fastmaml.make_grouped_tasks(n_groups=40, n_per_group=(8, 60), n_features=d, noise=0.5,
                                          random_state=seed)
    return fastmaml.GroupedSampler(X, y, g, support_size=0.5, random_state=seed)


def _maml(**kw):
    base = dict(inner_steps=3, inner_lr=0.3, l2=0.01, meta_batch_size=8, meta_lr=1e-2, n_iterations=3,
                progress=False)
    base.update(kw)
    return fastmaml.MAML(**base)


@pytest.mark.parametrize("init_kw", [dict(learn_inner_lr="per_step"),
                                     dict(hyper_policy=fastmaml.HyperPolicy(warmup=0.0))])
def test_warm_start_of_a_fixed_step_model_ignores_inits_per_step_schedule_of_other_length(init_kw):
    """A model with its own fixed inner_lr takes only theta from init: init's step schedule (3 steps) is not
    used, so a 5-step model must start from it rather than be refused over init's inner_steps."""
    init = _maml(**init_kw).fit(_sampler())
    model = _maml(inner_steps=5, inner_lr=0.1, n_iterations=0).fit(_sampler(1), init=init)
    assert np.array_equal(model.theta_, init.theta_)
    assert model.inner_lr_for(5) == 0.1


@pytest.mark.parametrize("init_kw", [dict(learn_inner_lr="per_step"),
                                     dict(hyper_policy=fastmaml.HyperPolicy(warmup=0.0))])
@pytest.mark.parametrize("mode", ["scalar", "per_parameter"])
def test_warm_start_from_a_one_step_schedule_gives_its_step_size_to_a_scalar_or_per_parameter_learner(init_kw, mode):
    """With inner_steps=1 a per-step schedule (or a policy's per-step intercepts) is one step size: it starts a
    scalar / per-parameter learner instead of being refused as shape (1, 1)."""
    init = _maml(inner_steps=1, learn_inner_lr=init_kw.get("learn_inner_lr"),
                 hyper_policy=init_kw.get("hyper_policy")).fit(_sampler())
    model = _maml(inner_steps=1, inner_lr=0.05, learn_inner_lr=mode, n_iterations=0).fit(_sampler(1), init=init)
    want = float(np.asarray(init.inner_lr_for(1)).reshape(-1)[0])
    assert np.allclose(model.inner_lr_for(1), want, rtol=1e-14)
    assert np.array_equal(model.theta_, init.theta_)


def test_warm_start_from_a_model_with_non_finite_parameters_is_named_init():
    """A start holding NaN (a hand-edited or diverged model) is refused naming init, not 'params' or a
    DivergenceError blaming this model's inner_lr."""
    init = _maml(learn_inner_lr="scalar").fit(_sampler())
    init._params["theta"][0] = np.nan
    with pytest.raises(ValueError, match=r"init: the model's theta contains NaN"):
        _maml(learn_inner_lr="scalar").fit(_sampler(1), init=init)
    init._params["theta"][0] = 0.0
    init._params["log_inner_lr"] = np.asarray(np.inf)
    with pytest.raises(ValueError, match=r"init: the model's learned step size or l2 is NaN or infinite"):
        _maml(learn_inner_lr="scalar").fit(_sampler(1), init=init)


@pytest.mark.parametrize("groups", [[None] * 6, [None, 1, None, 1, 2, 2]])
def test_unsortable_group_labels_are_a_type_error_naming_groups(groups):
    v = np.arange(6.0)
    with pytest.raises(TypeError, match=r"groups: expected labels that can be sorted"):
        mean_ci(v, groups)
    with pytest.raises(TypeError, match=r"groups:"):
        paired_difference(v, v[::-1], groups=groups)
    with pytest.raises(TypeError, match=r"groups:"):
        select_candidate({"a": v, "b": v + 1}, ["a", "b"], groups=groups)


def test_group_rows_of_different_lengths_are_a_value_error_naming_groups():
    """Ragged group rows (a pair for some tasks, a single class for others) used to surface numpy's
    'inhomogeneous shape' error, which names neither the argument nor what was expected."""
    with pytest.raises(ValueError, match=r"groups: .*different lengths"):
        mean_ci([1.0, 2.0, 3.0, 4.0], [(1, 2), (3,), (1, 2), (3,)])
