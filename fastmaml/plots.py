"""Plots of the demo's results (the only module that imports matplotlib).

matplotlib is optional (``pip install "fastmaml[demo]"``); it is imported when
a plot is drawn, with the Agg backend (files, no window).

One colour and one marker per method in every panel, one legend for the whole
figure; curves that coincide exactly are drawn with shrinking markers so each
stays visible, and each panel names them ("identical: ...").
"""

from __future__ import annotations

import os
import re

import numpy as np

__all__ = ["plot_results", "make_figure", "method_styles", "output_path"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "fastmaml.plots needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'fastmaml[demo]' for everything the demo uses)"
        ) from exc
    return plt


def output_path(path: str) -> str:
    """The file :func:`plot_results` writes for ``path``: ``.png`` is added when it has no extension.

    Raises ValueError for an extension matplotlib cannot write, ImportError without matplotlib.
    """
    root, ext = os.path.splitext(path)
    if not ext:
        return path + ".png"
    _pyplot()
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if ext[1:].lower() not in formats:
        raise ValueError(f"cannot write a {ext!r} image; use one of {', '.join('.' + f for f in sorted(formats))}")
    return path


def method_styles(results: dict) -> dict:
    """``{method: (colour, marker)}``, fixed for the whole figure (first appearance order)."""
    import matplotlib

    names = []
    for res in results["shots"].values():
        for name in list(res["table"]) + list(res.get("training_curves", {})):
            if name not in names:
                names.append(name)
    # tab10, then tab20's light shades: eleven methods (with the per-task policy) keep distinct colours
    cmap = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["tab20"].colors[1::2])
    return {n: (matplotlib.colors.to_hex(cmap[i % len(cmap)]), _MARKERS[i % len(_MARKERS)])
            for i, n in enumerate(names)}


def _labels(results: dict):
    """(what the test tasks are, what meta-validation uses) in the family's own words."""
    if results.get("family") == "grouped":
        return f"{results['n_test_groups']} held-out groups", "meta-validation groups"
    return " vs ".join(str(c) for c in results["holdout"]), "held-out digits"


def _identical(curves: dict) -> list:
    """Lists of method names whose curves are equal (to 1e-12), each list in drawing order."""
    sets, seen = [], set()
    names = list(curves)
    for i, a in enumerate(names):
        if a in seen:
            continue
        same = [a] + [b for b in names[i + 1:] if b not in seen and np.shape(curves[a]) == np.shape(curves[b])
                      and np.allclose(curves[a], curves[b], rtol=0, atol=1e-12)]
        seen.update(same)
        sets.append(same)
    return sets


def _draw(ax, xs: dict, curves: dict, styles: dict, base_ms: float) -> list:
    """Draw each curve, markers shrinking (white-edged) in drawing order so that curves that coincide
    or nearly coincide all stay visible. Returns the sets of identical curves, as notes."""
    notes = []
    sets = _identical(curves)
    # every curve drawn later gets a smaller marker on top: identical or merely close curves nest, none hides
    step = min(2.0, (base_ms - 3.0) / max(1, len(curves) - 1))
    order = 0
    for same in sets:
        for rank, name in enumerate(same):
            colour, marker = styles[name]
            ax.plot(xs[name], 100 * np.asarray(curves[name]), color=colour, marker=marker, label=name,
                    ms=base_ms - step * order, lw=2.2 if rank == 0 else 1.0,
                    ls="-" if rank == 0 else "--", mec="white" if order else colour, mew=0.7, zorder=2 + 0.1 * order)
            order += 1
        if len(same) > 1:
            notes.append(" = ".join(same))
    return notes


def _label_with_notes(ax, label: str, notes: list) -> None:
    """Axis label plus a wrapped line naming the curves that coincide (so none seems missing)."""
    if notes:
        # wrap only between method names, so each name stays whole on one line
        parts = re.split(r"(?<= = )|(?<=; )", "identical: " + "; ".join(notes))
        lines = [""]
        for part in parts:
            if lines[-1] and len(lines[-1]) + len(part) > 55:
                lines.append("")
            lines[-1] += part
        label += "\n" + "\n".join(line.rstrip() for line in lines)
    ax.set_xlabel(label, fontsize=9)


def plot_results(results: dict, path: str) -> None:
    """Accuracy against adaptation steps per method (one panel per K) and meta-validation curves.

    Parameters
    ----------
    results : dict
        What :func:`fastmaml.demo.run_digit_pairs` or :func:`fastmaml.demo.run_grouped` return.
    path : str
        The image file to write (PNG by its extension; see :func:`output_path`).
    """
    plt = _pyplot()
    fig = make_figure(results)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def make_figure(results: dict):
    """The figure :func:`plot_results` saves (top row: test accuracy per step; bottom: meta-validation)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    styles = method_styles(results)
    test_label, val_label = _labels(results)
    shots = list(results["shots"])
    fig, axes = plt.subplots(2, len(shots), figsize=(5 * len(shots), 8.8), squeeze=False)
    for i, K in enumerate(shots):
        res = results["shots"][K]
        ax = axes[0, i]
        curves = res["steps_curves"]
        notes = _draw(ax, {n: range(len(c)) for n, c in curves.items()}, curves, styles, base_ms=13)
        oracles = [name for name, row in res["table"].items() if row.get("oracle")]
        levels = {}
        for name in [res["grid_method"]] + oracles:
            if name and name in res["table"]:
                levels[name] = 100 * res["table"][name]["accuracy"]
                ax.axhline(levels[name], ls="--" if name in oracles else (0, (1, 3)), lw=1.6 if name in oracles else 2.4,
                           color=styles[name][0], label=name, zorder=1.5 if name in oracles else 1)
        notes += [" = ".join(same) for same in _identical(levels) if len(same) > 1]
        ax.set_title(f"{test_label}, K={K}: test accuracy")
        _label_with_notes(ax, "adaptation steps", notes)
        ax.set_ylabel("query accuracy (%)")
        ax.grid(alpha=0.3)
        ax = axes[1, i]
        tc = res["training_curves"]
        notes = _draw(ax, {n: c["iterations"] for n, c in tc.items()},
                      {n: c["val_accuracy"] for n, c in tc.items()}, styles, base_ms=12)
        ax.set_title(f"K={K}: meta-validation accuracy ({val_label})")
        _label_with_notes(ax, "meta-iteration", notes)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    handles = []
    for name, (colour, marker) in styles.items():
        horizontal = all(name not in r["steps_curves"] for r in results["shots"].values())
        oracle = any(r["table"].get(name, {}).get("oracle") for r in results["shots"].values())
        ls = ("--" if oracle else (0, (1, 3))) if horizontal else "-"
        handles.append(Line2D([], [], color=colour, marker=None if horizontal else marker, ls=ls,
                              lw=2 if horizontal else 1.5, label=name + (" (horizontal line)" if horizontal else "")))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
