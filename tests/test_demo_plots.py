"""The demo's plot and wording: one colour per method everywhere, coinciding curves visible, one legend,
and each task family described in its own words (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastmaml import demo

pytest.importorskip("sklearn")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def _tiny(**kw):
    return demo.DemoConfig.quick(shots=(1, 2), n_iterations=4, test_episodes=10, val_episodes=10,
                                 random_configs_cap=3, validate_every=2, progress=False, c_grid=(1.0,), **kw)


@pytest.fixture(scope="module")
def digit_results():
    return demo.run_digit_pairs(_tiny(data="digits8x8"), log=None)


@pytest.fixture(scope="module")
def grouped_results():
    return demo.run_grouped(_tiny(), n_groups=60, n_per_group=20, n_features=5, log=None)


def _method_lines(fig):
    """(axes index, method, colour) of every drawn curve or reference line."""
    from matplotlib.colors import to_hex

    out = []
    for i, ax in enumerate(fig.axes):
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                out.append((i, line.get_label(), to_hex(line.get_color())))
    return out


def test_each_method_has_one_colour_in_every_panel(digit_results):
    from fastmaml import plots

    fig = plots.make_figure(digit_results)
    lines = _method_lines(fig)
    styles = plots.method_styles(digit_results)
    colours = {}
    for _, name, colour in lines:
        colours.setdefault(name, set()).add(colour)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert {name: c.pop() for name, c in colours.items()} == {n: styles[n][0] for n in colours}
    assert len(set(s[0] for s in styles.values())) == len(styles)  # no two methods share a colour
    # the meta-learners appear in both rows (test curves and meta-validation curves), in the same colour
    rows = {(i // len(digit_results["shots"]) == 0, name) for i, name, _ in lines}
    for name in demo.META_LEARNERS:
        assert (True, name) in rows and (False, name) in rows
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_one_shared_legend_and_coinciding_curves_are_named(digit_results):
    from fastmaml import plots

    fig = plots.make_figure(digit_results)
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    legend_names = [t.get_text() for t in fig.legends[0].get_texts()]
    for name in digit_results["shots"]["1"]["table"]:
        assert any(label.startswith(name) for label in legend_names), name
    # this tiny run stops MAML at iteration 0 on the validation digits: its test curve is the zero start's
    for i, K in enumerate(digit_results["shots"]):
        curves = digit_results["shots"][K]["steps_curves"]
        zero = np.asarray(curves[demo.ZERO])
        same = [n for n in curves if n != demo.ZERO and np.shape(curves[n]) == zero.shape
                and np.allclose(curves[n], zero, rtol=0, atol=1e-12)]
        notes = fig.axes[i].get_xlabel()
        for name in same:
            assert "identical" in notes and name in notes
        # identical curves get different marker sizes, so the one drawn first is not hidden
        sizes = {line.get_label(): line.get_markersize() for line in fig.axes[i].get_lines()}
        if same:
            assert len({sizes[n] for n in same + [demo.ZERO]}) == len(same) + 1
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_the_plot_renders_to_a_png(digit_results, tmp_path):
    from fastmaml import plots

    path = tmp_path / "p.png"
    plots.plot_results(digit_results, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    assert plots.output_path(str(tmp_path / "noext")) == str(tmp_path / "noext") + ".png"
    with pytest.raises(ValueError, match="xyz"):
        plots.output_path(str(tmp_path / "p.xyz"))


def test_grouped_family_speaks_of_groups_not_digits(grouped_results):
    from fastmaml import plots

    text = demo.format_table(grouped_results)
    blob = json.loads(demo.to_json(grouped_results))
    assert "digit" not in text.lower() and "images" not in text
    assert "held-out groups" in text
    assert not [k for k in blob if "digit" in k or k in ("holdout", "validation_folds")]
    assert blob["n_test_groups"] + blob["n_train_groups"] + blob["n_validation_groups"] == 60
    fig = plots.make_figure(grouped_results)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "digit" not in titles and "held-out groups" in titles and "meta-validation groups" in titles
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_digit_results_keep_their_words_and_use_accuracy_ci95(digit_results):
    text = demo.format_table(digit_results)
    assert "Digit pairs" in text and "2 vs 3" in text
    row = digit_results["shots"]["1"]["table"][demo.ZERO]
    assert "accuracy_ci95" in row and "ci95" not in row


def test_an_interrupted_meta_training_is_not_passed_off_as_finished(monkeypatch):
    """MAML.fit turns Ctrl-C into interrupted_ = True; the demo must stop, not tabulate a half-trained model."""
    from fastmaml import MAML

    original = MAML.fit

    def interrupted_fit(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.interrupted_ = True
        return self

    monkeypatch.setattr(MAML, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt, match="interrupted"):
        demo.run_digit_pairs(_tiny(data="digits8x8"), log=None)
