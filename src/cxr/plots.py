"""Figures for MLflow: confusion matrix, ROC and PR curves, training curves."""

from __future__ import annotations

import itertools
from typing import Any

import matplotlib

matplotlib.use("Agg")  # stages run headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

LABELS = {"fpr": "false positive rate (1 - specificity)", "tpr": "true positive rate (sensitivity)",
          "recall": "recall (sensitivity)", "precision": "precision", "val_loss": "validation loss",
          "val_auroc": "validation AUROC", "train_loss": "training loss", "loss": "loss", "accuracy": "accuracy"}


def area(rows: list[dict[str, float]], x: str, y: str) -> float:
    """The area under a curve given as rows (trapezoids over x sorted), e.g. AUROC from ROC points."""
    pts = sorted((r[x], r[y]) for r in rows)
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(pts))


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
                 diagonal: bool = False, areas: dict[str, float | None] | None = None, name: str = "AUC") -> Figure:
    """One line per entry of series (label -> rows), each labelled with its score `name`: `areas`, the exact
    figures (AUROC, average precision), or else the area under the plotted points."""
    fig, ax = plt.subplots(figsize=(4.6, 4.0), layout="constrained")
    for label, rows in series.items():
        value = (areas or {}).get(label)
        ax.plot([r[x] for r in rows], [r[y] for r in rows],
                label=f"{label} ({name} {area(rows, x, y) if value is None else value:.3f})")
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.legend(fontsize=8, loc="lower right" if diagonal else "lower left")
    ax.set(xlabel=LABELS.get(x, x), ylabel=LABELS.get(y, y), title=title, xlim=(0, 1), ylim=(0, 1.02))
    return fig


def reliability_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """Reliability diagram: observed frequency against mean confidence per bin, one line per split and
    stage (before / after temperature scaling); on the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.6, 4.0), layout="constrained")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    for split in ("val", "test"):
        for stage, style in (("before", ":"), ("after", "-")):
            sel = [r for r in rows if r["split"] == split and r["stage"] == stage]
            if sel:
                ax.plot([r["confidence"] for r in sel], [r["frequency"] for r in sel], ls=style, marker="o", ms=3,
                        label=f"{split} {stage} scaling")
    ax.legend(fontsize=8)
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title=f"{title}: reliability",
           xlim=(0, 1), ylim=(0, 1.02))
    return fig


def history_figure(history: list[dict[str, Any]], title: str) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), layout="constrained")
    epochs = [r["epoch"] for r in history]
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split in ("train", "val"):
            ax.plot(epochs, [r[f"{split}_{metric}"] for r in history], marker="o", label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{title}: {metric}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    return fig


def bars_figure(rows: list[dict[str, Any]], metrics: list[str], title: str) -> Figure:
    """Grouped bars: one group per metric, one bar per row (variant), best first, each with its value; the
    y axis starts just under the lowest score, so that a 0.01 difference is visible."""
    fig, ax = plt.subplots(figsize=(min(9.5, max(7.0, 1.2 * len(metrics) + 0.35 * len(rows) * len(metrics))), 4.2),
                           layout="constrained")
    width = 0.8 / max(len(rows), 1)
    values = [v for r in rows for k in metrics if (v := r[k]) is not None]
    for i, r in enumerate(rows):
        bars = ax.bar([m + (i - (len(rows) - 1) / 2) * width for m in range(len(metrics))],
                      [float("nan") if r[k] is None else r[k] for k in metrics], width, label=r["variant"])
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    low = max(0.0, int((min(values, default=0.0) - 0.05) * 20) / 20)  # a multiple of 0.05 below the lowest
    ax.set(xticks=range(len(metrics)), xticklabels=metrics, ylim=(low, 1.06), title=title)
    ax.legend(fontsize=7, ncols=min(len(rows), 4), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    return fig


def histories_figure(histories: dict[str, list[dict[str, float]]], keys: tuple[str, ...]) -> Figure:
    """One panel per key (val_loss, ...), one line per variant over its epochs."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.5), layout="constrained", squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for variant, rows in histories.items():
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker=".", label=variant)
        ax.set(xlabel="epoch", title=LABELS.get(key, key))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=7)
    return fig
