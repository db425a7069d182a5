"""The MAML estimator: training, adaptation, persistence, exact resume, interruption."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import fastmaml
from fastmaml import MAML, LogisticModel, StepSizeWarning
from fastmaml.checkpoint import CheckpointError
from fastmaml.datasets import make_grouped_tasks
from fastmaml.samplers import GroupedSampler
from fastmaml.splits import split_groups


@pytest.fixture(scope="module")
def family():
    X, y, groups = make_grouped_tasks(n_groups=120, n_per_group=40, n_features=10, random_state=0)
    train_g, val_g, test_g = split_groups(groups, fractions=(0.6, 0.2, 0.2), random_state=0)
    return X, y, groups, train_g, val_g, test_g


def sampler(family, which, seed, support=6):
    X, y, groups, train_g, val_g, test_g = family
    gs = {"train": train_g, "val": val_g, "test": test_g}[which]
    return GroupedSampler(X, y, groups, support_size=support, groups_subset=gs, random_state=seed)


def small_model(**kw):
    base = dict(inner_steps=3, inner_lr=0.3, meta_lr=0.05, meta_batch_size=8, n_iterations=30,
                validate_every=10, progress=False)
    base.update(kw)
    return MAML(**base)


def test_maml_learns_a_start_that_beats_the_zero_start_on_a_shared_teacher_family(family):
    test = sampler(family, "test", 7).sample(300)
    model = small_model(n_iterations=150).fit(sampler(family, "train", 1))
    zero = small_model(n_iterations=0).fit(sampler(family, "train", 1))
    learned = model.evaluate(test)["per_task_accuracy"]
    base = zero.evaluate(test)["per_task_accuracy"]
    diff = learned - base
    assert diff.mean() - 1.96 * diff.std(ddof=1) / np.sqrt(diff.size) > 0.02


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(algorithm="fomaml"),
        dict(algorithm="reptile"),
        dict(learn_inner_lr="scalar", l2=0.01, learn_l2=True),
        dict(learn_inner_lr="per_step"),
        dict(learn_inner_lr="per_parameter"),
        dict(learn_inner_lr="per_step_parameter", lr_schedule="cosine"),
        dict(meta_optimizer="sgd"),
    ],
)
def test_every_configuration_trains_and_moves_the_parameters(family, kw):
    model = small_model(**kw).fit(sampler(family, "train", 1), validation=sampler(family, "val", 2), val_episodes=20)
    assert model.n_iter_ == 30
    assert np.abs(model.theta_).max() > 0
    assert all(np.isfinite(r["loss"]) for r in model.history_ if r["iteration"] > 0)
    assert [r["iteration"] for r in model.history_ if "val_accuracy" in r] == [0, 10, 20, 30]
    lr = np.asarray(model.inner_lr_)
    if kw.get("learn_inner_lr"):
        assert not np.allclose(lr, 0.3)
        expected = {"scalar": (), "per_step": (3, 1), "per_parameter": (11,), "per_step_parameter": (3, 11)}
        assert lr.shape == expected[kw["learn_inner_lr"]]
    if kw.get("learn_l2"):
        assert model.l2_ != 0.01


def test_best_on_validation_selection_returns_the_best_recorded_iteration(family):
    model = small_model(select="best_loss", n_iterations=40).fit(
        sampler(family, "train", 1), validation=sampler(family, "val", 2), val_episodes=30
    )
    vals = [(r["val_loss"], r["iteration"]) for r in model.history_ if "val_loss" in r]
    assert model.best_iteration_ == min(vals)[1]


def test_adapt_returns_a_logistic_model_with_sklearn_like_api(family):
    model = small_model().fit(sampler(family, "train", 1))
    Xs, ys, Xq, yq = sampler(family, "test", 3).sample(1).task(0)
    clf = model.adapt(Xs, ys)
    assert isinstance(clf, LogisticModel)
    assert clf.coef_.shape == (1, Xs.shape[1]) and clf.intercept_.shape == (1,)
    proba = clf.predict_proba(Xq)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    phi = fastmaml.adapt(model.theta_, Xs, ys, inner_lr=model.inner_lr_, inner_steps=3, l2=model.l2_)
    np.testing.assert_allclose(proba[:, 1], fastmaml.predict_proba(phi, Xq), rtol=1e-12)
    assert clf.score(Xq, yq) == np.mean(clf.predict(Xq) == yq)
    # original labels are kept: 2 and 3 instead of 0 and 1
    clf23 = model.adapt(Xs, np.where(ys == 1, 3, 2))
    np.testing.assert_array_equal(clf23.predict(Xq), np.where(clf.predict(Xq) == 1, 3, 2))
    sk = clf.to_sklearn()
    np.testing.assert_array_equal(sk.predict(Xq), clf.predict(Xq))
    np.testing.assert_allclose(sk.predict_proba(Xq), proba, rtol=1e-12)


def test_save_load_round_trip_keeps_parameters_and_history(family, tmp_path):
    model = small_model(learn_inner_lr="per_parameter", l2=0.01, learn_l2=True).fit(sampler(family, "train", 1))
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = MAML.load(path)
    np.testing.assert_array_equal(loaded.theta_, model.theta_)
    np.testing.assert_array_equal(loaded.inner_lr_, model.inner_lr_)
    assert loaded.l2_ == model.l2_
    assert loaded.history_ == model.history_
    tasks = sampler(family, "test", 5).sample(20)
    np.testing.assert_array_equal(loaded.evaluate(tasks)["per_task_accuracy"], model.evaluate(tasks)["per_task_accuracy"])


def test_resume_from_checkpoint_is_bitwise_identical_to_an_uninterrupted_run(family, tmp_path):
    kw = dict(learn_inner_lr="scalar", l2=0.01, learn_l2=True, n_iterations=40, checkpoint_every=10)
    full = small_model(**kw).fit(sampler(family, "train", 11), validation=sampler(family, "val", 12), val_episodes=20)
    ckpt = tmp_path / "ckpt.npz"

    def stop_at_17(model, record):
        return record["iteration"] == 17

    part = small_model(**kw, checkpoint_path=str(ckpt), callbacks=[stop_at_17])
    part.fit(sampler(family, "train", 11), validation=sampler(family, "val", 12), val_episodes=20)
    assert part.n_iter_ == 17
    resumed = small_model(**kw, checkpoint_path=str(ckpt))
    resumed.fit(sampler(family, "train", 11), validation=sampler(family, "val", 12), val_episodes=20, resume=True)
    assert resumed.n_iter_ == 40
    np.testing.assert_array_equal(resumed.theta_, full.theta_)
    assert resumed.inner_lr_ == full.inner_lr_ and resumed.l2_ == full.l2_
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history_) == strip(full.history_)


def test_ctrl_c_stops_after_the_current_iteration_and_keeps_the_model_usable(family, tmp_path):
    ckpt = tmp_path / "ckpt.npz"

    def press_ctrl_c(model, record):
        if record["iteration"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    model = small_model(checkpoint_path=str(ckpt), callbacks=[press_ctrl_c])
    with pytest.warns(RuntimeWarning, match="interrupted after 5 iterations"):
        model.fit(sampler(family, "train", 1))
    assert model.interrupted_ and model.n_iter_ == 5
    assert np.isfinite(model.theta_).all()
    assert MAML.load(ckpt).n_iter_ == 5
    model.evaluate(sampler(family, "test", 2).sample(5))


def test_step_size_warning_when_inner_lr_times_curvature_exceeds_two(family):
    with pytest.warns(StepSizeWarning, match="inner_lr"):
        small_model(inner_lr=500.0, n_iterations=0).fit(sampler(family, "train", 1))


def test_largest_curvature_matches_dense_eigenvalue(family):
    tasks = sampler(family, "train", 1).sample(4)
    model = small_model(n_iterations=0, l2=0.1).fit(tasks)
    lam = model.largest_curvature(tasks, n_power=200)
    best = 0.0
    for t in range(4):
        Xs = tasks.task(t)[0]
        Xt = np.hstack([Xs, np.ones((Xs.shape[0], 1))])
        H = 0.25 * Xt.T @ Xt / Xs.shape[0] + 0.1 * np.diag(np.r_[np.ones(Xs.shape[1]), 0.0])
        best = max(best, np.linalg.eigvalsh(H).max())
    np.testing.assert_allclose(lam, best, rtol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(algorithm="anil"), "algorithm"),
        (dict(inner_steps=-1), "inner_steps"),
        (dict(learn_inner_lr="diagonal"), "learn_inner_lr"),
        (dict(learn_l2=True, l2=0.0), "l2"),
        (dict(learn_inner_lr="scalar", inner_lr=-0.1), "inner_lr"),
        (dict(algorithm="reptile", learn_inner_lr="scalar"), "reptile"),
        (dict(meta_batch_size=0), "meta_batch_size"),
        (dict(select="best"), "select"),
        (dict(n_threads=0), "n_threads"),
        (dict(meta_optimizer="rmsprop"), "meta_optimizer"),
    ],
)
def test_bad_configuration_names_the_argument(family, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        small_model(**kw).fit(sampler(family, "train", 1))


def test_unfitted_model_and_bad_tasks_give_clear_errors():
    with pytest.raises(AttributeError, match="not fitted"):
        MAML().theta_
    with pytest.raises(TypeError, match="tasks"):
        MAML().fit([1, 2, 3])


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"PK\x03\x04garbage"])
def test_loading_a_corrupt_or_foreign_file_fails_cleanly(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.npz"):
        MAML.load(path)


def test_loading_a_foreign_npz_or_a_newer_format_is_refused(tmp_path, family):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.arange(3))
    with pytest.raises(CheckpointError, match="not a fastmaml"):
        MAML.load(foreign)
    model = small_model(n_iterations=2).fit(sampler(family, "train", 1))
    path = tmp_path / "m.npz"
    model.save(path)
    from fastmaml import checkpoint as _checkpoint

    arrays, meta = _checkpoint.read(path)
    meta["format_version"] = _checkpoint.FORMAT_VERSION + 1
    import io
    import json

    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    newer = tmp_path / "newer.npz"
    newer.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="newer"):
        MAML.load(newer)
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        MAML.load(truncated)


# --------------------------------------------------------------------------
# scikit-learn conventions
# --------------------------------------------------------------------------


def test_clone_round_trips_the_parameters():
    sklearn_base = pytest.importorskip("sklearn.base")
    model = MAML(inner_lr=0.3, learn_inner_lr="per_step", callbacks=[print])
    copy = sklearn_base.clone(model)
    assert copy is not model and type(copy) is MAML
    assert copy.get_params() == model.get_params()
    assert copy.inner_lr == 0.3 and copy.learn_inner_lr == "per_step"


def test_clone_of_a_fitted_model_is_unfitted(family):
    sklearn_base = pytest.importorskip("sklearn.base")
    model = small_model(n_iterations=2).fit(sampler(family, "train", 1))
    copy = sklearn_base.clone(model)
    assert copy.get_params() == model.get_params()
    with pytest.raises(AttributeError, match="not fitted"):
        copy.theta_


def test_get_params_lists_every_constructor_parameter_and_set_params_sets_them():
    import inspect

    model = MAML()
    names = [n for n in inspect.signature(MAML).parameters]
    assert list(model.get_params(deep=True)) == names == list(model.get_params(deep=False))
    assert model.set_params(inner_steps=3, l2=0.5) is model
    assert model.inner_steps == 3 and model.l2 == 0.5
    assert model.get_params()["inner_steps"] == 3


def test_set_params_rejects_unknown_names_naming_them():
    with pytest.raises(ValueError, match="'inner_rate'.*'foo'|'foo'.*'inner_rate'"):
        MAML().set_params(inner_rate=0.1, foo=1, inner_lr=0.2)
    with pytest.raises(TypeError, match="inner_rate"):
        MAML(inner_rate=0.1)


def test_repr_shows_the_parameters_that_differ_from_their_defaults():
    assert repr(MAML()) == "MAML()"
    assert repr(MAML(inner_lr=0.3, learn_inner_lr="per_step")) == "MAML(inner_lr=0.3, learn_inner_lr='per_step')"
    assert repr(MAML(inner_lr=0.1, l2=0)) == "MAML()"  # equal values are defaults, whatever their type
    assert "inner_lr=array" in repr(MAML(inner_lr=np.array([0.1, 0.2])))


def test_docstring_documents_every_parameter_once():
    doc = MAML.__doc__
    for name in MAML().get_params():
        assert doc.count(f"\n    {name} : ") == 1, name
    assert "used whole" in doc  # meta_batch_size does not apply to a fixed Tasks pool


def test_inner_lr_for_gives_what_adapt_takes(family):
    model = small_model(n_iterations=3, learn_inner_lr="per_step").fit(sampler(family, "train", 1))
    lr = model.inner_lr_for(3)
    assert lr.shape == (3, 1)
    tasks = sampler(family, "test", 2).sample(5)
    direct = fastmaml.adapt(model.theta_, tasks, inner_lr=lr, inner_steps=3, l2=model.l2_)
    np.testing.assert_array_equal(model.adapt_tasks(tasks), direct)
    path = model.adapt_tasks(tasks, return_path=True)
    assert path.shape == (5, 4, model.theta_.size)
    np.testing.assert_array_equal(path[:, -1], direct)
    with pytest.raises(ValueError, match="inner_steps"):
        model.inner_lr_for(4)
    fixed = small_model(n_iterations=1).fit(sampler(family, "train", 1))
    assert fixed.inner_lr_for(7) == 0.3


@pytest.mark.parametrize("n_classes", [2, 3])
def test_to_sklearn_round_trips_predictions_and_probabilities(n_classes):
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(n_classes)
    d = 5
    params = rng.normal(size=d + 1) * 3 if n_classes == 2 else rng.normal(size=(d + 1, n_classes)) * 3
    classes = np.array([3, 7]) if n_classes == 2 else np.array([0, 4, 9])
    ours = LogisticModel(params, classes)
    theirs = ours.to_sklearn()
    for X in (rng.normal(size=(300, d)) * 4, rng.random((50, d)).astype(np.float32)):
        np.testing.assert_array_equal(theirs.predict(X), ours.predict(X))
        np.testing.assert_array_equal(theirs.decision_function(X), ours.decision_function(X))
        if n_classes == 2:
            # scikit-learn's expit(z) = 1 / (1 + exp(-z)) and fastmaml's exp(-log(1 + exp(-z)))
            # round differently in the last bit
            np.testing.assert_allclose(theirs.predict_proba(X), ours.predict_proba(X), rtol=0, atol=4e-16)
        else:
            np.testing.assert_array_equal(theirs.predict_proba(X), ours.predict_proba(X))
        assert theirs.score(X, ours.predict(X)) == 1.0


def test_logistic_model_probabilities_are_float64_and_stable():
    model = LogisticModel(np.array([1000.0, -1000.0, 0.0]))
    X = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    P = model.predict_proba(X)
    assert P.dtype == np.float64
    np.testing.assert_array_equal(P, [[0.0, 1.0], [1.0, 0.0]])
