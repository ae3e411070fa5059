"""Figures for MLflow: confusion matrix, ROC and PR curves, training curves."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # stages run headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cxr import LABELS  # noqa: E402


def confusion_figure(s: dict[str, float], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(4, 3.6), layout="constrained")
    cells = [[s["tn"], s["fp"]], [s["fn"], s["tp"]]]
    ax.imshow(cells, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, int(cells[i][j]), ha="center", va="center", fontsize=13,
                    color="white" if cells[i][j] > max(map(max, cells)) / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=LABELS, yticklabels=LABELS, xlabel="predicted",
           ylabel="actual", title=title)
    return fig


def curve_figure(rows: list[dict[str, float]], x: str, y: str, title: str, diagonal: bool = False) -> Figure:
    fig, ax = plt.subplots(figsize=(4, 3.6), layout="constrained")
    ax.plot([r[x] for r in rows], [r[y] for r in rows])
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
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
