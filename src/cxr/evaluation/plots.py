"""Figures for MLflow: confusion matrix, ROC and PR curves, training curves."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # stages run headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def confusion_figure(cells: list[list[int]], names: list[str], title: str) -> Figure:
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.4 * k + 1.2, 1.3 * k + 1), layout="constrained")
    ax.imshow(cells, cmap="Blues")
    top = max(map(max, cells))
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(cells[i][j]), ha="center", va="center", fontsize=13,
                    color="white" if cells[i][j] > top / 2 else "black")
    ax.set(xticks=range(k), yticks=range(k), xticklabels=names, yticklabels=names, xlabel="predicted",
           ylabel="actual", title=title)
    return fig


def curve_figure(series: dict[str, list[dict[str, float]]], x: str, y: str, title: str,
                 diagonal: bool = False) -> Figure:
    """One line per entry of series (label -> rows)."""
    fig, ax = plt.subplots(figsize=(4.4, 3.8), layout="constrained")
    for label, rows in series.items():
        ax.plot([r[x] for r in rows], [r[y] for r in rows], label=label)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set(xlabel=x, ylabel=y, title=title, xlim=(0, 1), ylim=(0, 1.02))
    return fig


def history_figure(history: list[dict[str, Any]], title: str) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), layout="constrained")
    epochs = [r["epoch"] for r in history]
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split in ("train", "val"):
            ax.plot(epochs, [r[f"{split}_{metric}"] for r in history], marker="o", label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{title}: {metric}")
        ax.legend()
    return fig
