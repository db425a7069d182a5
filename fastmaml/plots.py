"""Plots of the demo's results (the only module that imports matplotlib).

matplotlib is optional (``pip install "fastmaml[demo]"``); it is imported when
a plot is drawn, with the Agg backend (files, no window).
"""

from __future__ import annotations

import numpy as np

__all__ = ["plot_results"]


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


def plot_results(results: dict, path: str) -> None:
    """Accuracy against adaptation steps per method (one panel per K) and meta-validation curves.

    Parameters
    ----------
    results : dict
        What :func:`fastmaml.demo.run_digit_pairs` or :func:`fastmaml.demo.run_grouped` return.
    path : str
        The image file to write (PNG by its extension).
    """
    plt = _pyplot()
    shots = list(results["shots"])
    fig, axes = plt.subplots(2, len(shots), figsize=(5 * len(shots), 8), squeeze=False)
    for i, K in enumerate(shots):
        res = results["shots"][K]
        ax = axes[0, i]
        for name, curve in res["steps_curves"].items():
            ax.plot(range(len(curve)), 100 * np.asarray(curve), marker="o", ms=3, label=name)
        oracles = [name for name, row in res["table"].items() if row.get("oracle")]
        for name in [res["grid_method"]] + oracles:
            if name and name in res["table"]:
                oracle = name in oracles
                ax.axhline(100 * res["table"][name]["accuracy"], ls="--" if oracle else ":", lw=1,
                           color="gray" if oracle else "black", label=name)
        held = " vs ".join(str(c) for c in results["holdout"])
        ax.set_title(f"{held}, K={K}: test accuracy")
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("query accuracy (%)")
        ax.grid(alpha=0.3)
        ax = axes[1, i]
        for name, c in res["training_curves"].items():
            ax.plot(c["iterations"], 100 * np.asarray(c["val_accuracy"]), marker=".", label=name)
        ax.set_title(f"K={K}: meta-validation accuracy (held-out digits)")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
